"""Python client for pitchkeras.v1.ReviewService (installed as pitchkeras.client). Must not import TensorFlow."""

"""gRPC server for pitchkeras.v1.ReviewService (installed as pitchkeras.server)."""

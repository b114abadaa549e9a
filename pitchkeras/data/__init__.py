"""Data: `prepare` (sources, cleaning, statistics) turns dumps into examples; `pipeline` feeds them to tf.data.

`make_dataset` and `read_examples` are importable from here (TensorFlow loads on first use).
"""

from pitchkeras.data.pipeline import make_dataset, read_examples  # noqa: F401 - public names

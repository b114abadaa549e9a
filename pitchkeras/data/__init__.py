"""Data: `prepare` (sources, cleaning, statistics) turns dumps into examples; `pipeline` feeds them to tf.data."""

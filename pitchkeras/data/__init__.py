"""Data: `prepare` turns dumps into examples; `pipeline` feeds them to tf.data.

Modules: `prepare` (the run: filters as masks over each chunk, examples, dedupe, split), `sources` (one pandas reader
per dump format), `cleaning` (texts, numeric and categorical conditions), `language` (the langid classifier),
`options` (`PrepareOptions`), `outputs` (the CSVs and the split repair), `stats` (`stats.json`, `stats.png`),
`pipeline` (tf.data). `make_dataset` and `read_examples` are importable from here (TensorFlow loads on first use).
"""

from pitchkeras.data.pipeline import make_dataset, read_examples  # noqa: F401 - public names

"""The sample dump shipped with pitchkeras: invented reviews in the Kaggle Pitchfork schema.

`SAMPLE_DUMP` is an SQLite file with the six tables of the public Kaggle
Pitchfork dump (`reviews`, `artists`, `genres`, `labels`, `years`, `content`,
keyed by `reviewid`): 300 short reviews written for this project by
`scripts/make_sample_dump.py`, across the seed's eight genres (lower case, as in
the Kaggle dump) and the whole 0.0-10.0 score range. It lets `pitchkeras demo`
and the tests run the whole job offline. Importing this module is cheap (no
TensorFlow).

Example:

>>> import sqlite3
>>> from pitchkeras.sample_data import SAMPLE_DUMP
>>> conn = sqlite3.connect(SAMPLE_DUMP)
>>> conn.execute("SELECT COUNT(*) FROM reviews").fetchone()
(300,)
"""

from pathlib import Path

SAMPLE_DUMP: Path = Path(__file__).resolve().parent / "pitchfork_sample.sqlite"

__all__ = ["SAMPLE_DUMP"]

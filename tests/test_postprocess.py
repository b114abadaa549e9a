"""Post-processing table tests: fixed strings in, exact text or rejection reason out."""

import sqlite3

import pytest

from pitchkeras.conditioning import END_OF_TEXT, PLAIN, REVIEWS, START_OF_TEXT
from pitchkeras.postprocess import (
    PostprocessOptions,
    find_repetition,
    last_sentence_end,
    normalize_whitespace,
    postprocess,
    starts_second_document,
    strip_to_last_start,
    trim_to_sentence,
)
from pitchkeras.sample_data import SAMPLE_DUMP

ROCK8 = {"score": 8.0, "genre": "Rock"}

# (raw, requested, expected text, expected rejection)
CASES = [
    # The seed's cases: prompt/header stripped, cut at the last period, fragments dropped.
    ("8.0\nRock\nLoud and clear. The drums roll on and", ROCK8, "Loud and clear.", None),
    ("8.0\nRock\nA record. Another record! Is it good? Then it", ROCK8, "A record. Another record! Is it good?", None),
    ("8.0\nRock\nno full stop anywhere in this fragment", ROCK8, "", "no_sentence"),
    ("8.0\nRock\n", ROCK8, "", "empty"),
    ("8.0\nRock\n   \n  ", ROCK8, "", "empty"),
    # Abbreviations, initials and decimals do not end a sentence.
    ("8.0\nRock\nIt rocks. Mr. Smith said so", ROCK8, "It rocks.", None),
    ("8.0\nRock\nIt rocks, e.g. on track two", ROCK8, "", "no_sentence"),
    ("8.0\nRock\nGreat album. Rap vs. rock is", ROCK8, "Great album.", None),
    ("8.0\nRock\nA tribute. J. Dilla made", ROCK8, "A tribute.", None),
    ("8.0\nRock\nIt scores 8.4 out of ten and", ROCK8, "", "no_sentence"),
    ("8.0\nRock\nThey toured the U.S. and Europe", ROCK8, "", "no_sentence"),
    ("8.0\nRock\nIt ended there. The end etc.", ROCK8, "It ended there. The end etc.", None),
    # Sentence ends inside closing quotes and brackets.
    ('8.0\nRock\nShe sang "I am here." Then the', ROCK8, 'She sang "I am here."', None),
    ("8.0\nRock\nA fine record (mostly.) But", ROCK8, "A fine record (mostly.)", None),
    ("8.0\nRock\nHe said \u201cnever again!\u201d and", ROCK8, "He said \u201cnever again!\u201d", None),
    ("8.0\nRock\nIt trails off... and", ROCK8, "It trails off...", None),
    # Whitespace is normalised; paragraphs survive.
    ("8.0\nRock\n  Loud   and\tclear.  \n\n\n\nSecond  paragraph. x", ROCK8, "Loud and clear.\n\nSecond paragraph.", None),
    # Condition check.
    ("7.5\nRock\nLoud and clear.", ROCK8, "", "condition_mismatch"),
    ("8.0\nJazz\nLoud and clear.", ROCK8, "", "condition_mismatch"),
    ("8.0\nrock\nLoud and clear.", ROCK8, "Loud and clear.", None),  # genre matches case-insensitively
    ("eight\nRock\nLoud and clear.", ROCK8, "", "bad_header"),
    ("8.0", ROCK8, "", "bad_header"),
    # A second document starting.
    ("8.0\nRock\nLoud. " + END_OF_TEXT + "6.0\nJazz\nSoft.", ROCK8, "", "second_document"),
    ("8.0\nRock\nLoud and clear.\n6.5\nJazz\nSoft and slow.", ROCK8, "", "second_document"),
    ("8.0\nRock\nLoud and clear." + END_OF_TEXT, ROCK8, "Loud and clear.", None),  # its own end marker
    # A lone number line without a full header block after it is just text.
    ("8.0\nRock\nTrack list:\n1.5\nminutes long. Fine.", ROCK8, "Track list:\n1.5\nminutes long. Fine.", None),
    # gpt-2-simple style: junk before the last start marker is dropped.
    ("tail of another review." + END_OF_TEXT + "\n" + START_OF_TEXT + "8.0\nRock\nFresh text. and", ROCK8,
     "Fresh text.", None),
    (END_OF_TEXT + "8.0\nRock\nFresh text.", ROCK8, "Fresh text.", None),
]


@pytest.mark.parametrize("raw, requested, text, rejected", CASES)
def test_postprocess_table(raw, requested, text, rejected):
    result = postprocess(raw, REVIEWS, requested)
    assert result.rejected == rejected
    if rejected is None:
        assert result.text == text
        assert result.conditions["score"] == 8.0
    else:
        assert result.text == ""


def test_start_marker_in_body_is_a_second_document_when_the_prompt_anchors_the_start():
    # The Generator's setting: its prompt starts the document, so a later
    # start marker is the model running on into another one.
    anchored = PostprocessOptions(strip_to_last_start=False)
    result = postprocess("8.0\nRock\nLoud. " + START_OF_TEXT + "More.", REVIEWS, ROCK8, anchored)
    assert result.rejected == "second_document"


def test_parsed_conditions_come_back():
    result = postprocess("7.5\nElectronic\nPulsing and bright.", REVIEWS, None)
    assert result.rejected is None
    assert result.conditions == {"score": 7.5, "genre": "Electronic"}
    assert result.text == "Pulsing and bright."


def test_plain_format_has_no_header():
    result = postprocess("DJ Foo was born in Leeds. He started", PLAIN, None)
    assert (result.text, result.conditions, result.rejected) == ("DJ Foo was born in Leeds.", {}, None)
    # A number on its own line is not a header in a plain corpus.
    assert postprocess("Born in\n1999.\nStill playing.", PLAIN).rejected is None


def test_each_step_can_be_switched_off():
    raw = "8.0\nRock\nLoud   and clear. Then it"
    off = PostprocessOptions(trim_to_sentence=False, normalize_whitespace=False)
    assert postprocess(raw, REVIEWS, ROCK8, off).text == "Loud   and clear. Then it"
    no_header = PostprocessOptions(split_header=False)
    assert postprocess(raw, REVIEWS, ROCK8, no_header).text == "8.0\nRock\nLoud and clear."
    no_check = PostprocessOptions(check_conditions=False)
    assert postprocess("7.5\nRock\nFine.", REVIEWS, ROCK8, no_check).conditions == {"score": 7.5, "genre": "Rock"}
    fragments_ok = PostprocessOptions(require_sentence=False)
    assert postprocess("8.0\nRock\na fragment", REVIEWS, ROCK8, fragments_ok).text == "a fragment"
    second_ok = PostprocessOptions(reject_second_document=False)
    assert postprocess("8.0\nRock\nGood.\n6.5\nJazz\nBad.", REVIEWS, ROCK8, second_ok).rejected is None
    keep_junk = PostprocessOptions(strip_to_last_start=False)
    assert postprocess("junk" + START_OF_TEXT + "8.0\nRock\nA.", REVIEWS, ROCK8, keep_junk).rejected == "bad_header"


def test_helpers():
    assert strip_to_last_start("a" + START_OF_TEXT + "b" + START_OF_TEXT + "c") == "c"
    assert strip_to_last_start(END_OF_TEXT + END_OF_TEXT + "x") == "x"
    assert last_sentence_end("No end here") == -1
    assert last_sentence_end("One. Two") == 4
    assert trim_to_sentence("Dr. Who") is None
    assert normalize_whitespace(" a  b \r\n\r\n\r\n c ") == "a b\n\nc"
    assert starts_second_document("Fine text." + END_OF_TEXT + "\n", REVIEWS) is False
    assert starts_second_document("Fine.\n9.0\nPop/R&B\nMore.", REVIEWS) is True


# -- repetition ------------------------------------------------------------------------

# The two loops quoted in issue 15: a tiny model on DJ biographies continuing
# "Stella Zekri", and the seed's 355M model (dozens of such lines).
STELLA_ZEKRI = ("Stella Zekri from became a resident resident resident resident resident resident resident "
                "resident at resident resident resident.")
I_HATE = "\n".join(f"I HATE {thing}." for thing in (
    "MODELS", "PRODUCTIONS", "GARAGE PARTIES", "DJS", "THE RADIO", "MORNINGS", "CLUBS", "PROMOTERS",
    "MODELS", "PRODUCTIONS", "GARAGE PARTIES", "DJS", "THE RADIO", "MORNINGS", "CLUBS", "PROMOTERS"))
# Real reviews say an artist's and an album's name again and again; this must pass.
NAMES_REPEATED = (
    "Stella Zekri has spent a decade behind other people's records. On Night Shift, Stella Zekri finally "
    "steps forward, and Night Shift sounds like the record she was saving. The opener builds from a single "
    "kick drum into a wall of synths. Stella Zekri sings on three songs, and her voice is the surprise: dry, "
    "close, unbothered. Night Shift sags in the middle, where two long instrumentals drift. But the closer, "
    "a slow-burning duet, is the best thing Stella Zekri has put her name to. Night Shift is a very, very "
    "good debut, and Stella Zekri is no longer anyone's secret.")

REPETITION_CASES = [
    (STELLA_ZEKRI, "repetition"),
    (I_HATE, "repetition"),
    ("The album is fine. " * 4, "repetition"),  # one sentence said over and over
    ("It builds. " + "one more time " * 4 + "it ends.", "repetition"),  # a 3-word run
    (NAMES_REPEATED, None),
    ("No, no, no. It was never going to work, and it does not. Still, it is loud.", None),  # three in a row is fine
    ("I love it. I love the drums. The bass is warm. The end is sudden. Then silence. It works.", None),
]


@pytest.mark.parametrize("body, rejected", REPETITION_CASES)
def test_repetition_table(body, rejected):
    result = postprocess("8.0\nRock\n" + body, REVIEWS, ROCK8)
    assert result.rejected == rejected
    assert (find_repetition(body) is not None) == (rejected is not None)


def test_seed_loops_say_what_repeats():
    assert find_repetition(STELLA_ZEKRI) == "'resident' 8 times in a row"
    assert find_repetition(I_HATE) == "16 of 16 sentences start 'i hate'"


def test_every_bundled_sample_review_passes():
    conn = sqlite3.connect(f"file:{SAMPLE_DUMP}?mode=ro", uri=True)
    try:
        texts = [text for (text,) in conn.execute("SELECT content FROM content")]
    finally:
        conn.close()
    assert len(texts) == 300
    flagged = [(find_repetition(t), t[:60]) for t in texts if find_repetition(t)]
    assert flagged == []
    assert all(postprocess("8.0\nRock\n" + t, REVIEWS, ROCK8).rejected is None for t in texts)


def test_repetition_check_can_be_switched_off():
    keep_loops = PostprocessOptions(reject_repetition=False)
    assert postprocess("8.0\nRock\n" + STELLA_ZEKRI, REVIEWS, ROCK8, keep_loops).rejected is None
    assert postprocess(STELLA_ZEKRI, PLAIN).rejected == "repetition"

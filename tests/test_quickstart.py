"""The README's first command, `pitchkeras demo`, end to end in a subprocess (short settings); its usage errors
in this process."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys

import pytest


# Short but real: every stage runs as the README's command runs it, on 30 training steps (the demo's own text
# quality is not what these tests check; the stored review's id, row and count are).
SHORT = ["--steps", "30", "--learning-rate", "6e-3", "--scores", "8", "--genres", "rock,jazz",
         "--per-pair", "1", "--length", "60", "--no-progress"]


def _demo(workdir, *extra, timeout=600):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "pitchkeras.cli", "demo", "--workdir", str(workdir), *SHORT, *extra],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    result = _demo(workdir)
    assert result.returncode == 0, f"demo failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return workdir, result


@pytest.mark.slow
def test_demo_serves_a_stored_review_through_grpc(first_run):
    workdir, result = first_run
    out = result.stdout
    for stage in ("prepare", "finetune", "populate", "serve"):
        assert re.search(rf"\[\d/4\] {stage}: done in [\d.]+ s", out), f"stage {stage} did not report its time:\n{out}"
    served = re.search(r"GetReview\(score=8\.0, genre='(rock|jazz)'\) -> .*\nid ([0-9a-f]{24})  score 8\.0", out)
    assert served, f"no review came back through GetReview:\n{out}"
    review_id = served.group(2)
    # The id the client printed is a row of the SQLite store the demo populated, counted as shown once.
    with sqlite3.connect(workdir / "reviews.db") as db:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT * FROM reviews WHERE id = ?", (review_id,)).fetchone()
    assert row is not None, f"review {review_id} is not in {workdir / 'reviews.db'}"
    assert row["selection_count"] == 1 and row["score"] == 8.0 and row["text"].strip()
    assert f"GetById('{review_id}')" in out
    # HTTP was on too: the page's URL is printed and the seed's route answered the same review.
    page = re.search(r"web page and HTTP/JSON on (http://127\.0\.0\.1:\d+/)", out)
    assert page, f"the demo printed no web page URL:\n{out}"
    assert f"GET {page.group(1)}review/{review_id} -> the same review as the seed's JSON (id, text, score" in out
    # Every artifact the report names exists.
    for name in ("stats.png", "loss.png", "pitchkeras.json"):
        assert any(workdir.rglob(name)), f"{name} missing under {workdir}"
    info = json.loads(next(workdir.rglob("pitchkeras.json")).read_text())
    assert info["model_version"]
    assert "artifacts:" in out and str(workdir) in out


@pytest.mark.slow
def test_demo_rerun_reuses_finished_stages(first_run, cli):
    """The same command again, in this process (the first run already proved it as a process of its own)."""
    workdir, _ = first_run
    code, out, err = cli("demo", "--workdir", workdir, *SHORT)
    assert code == 0, err[-3000:]
    assert "[1/4] prepare: reused" in out and "[2/4] finetune: reused" in out
    # Populate finds every pair full: nothing new generated.
    assert re.search(r"\[3/4\] populate: done in [\d.]+ s \(0 stored now", out), out


def test_demo_bad_flag_is_one_line_exit_2(tmp_path, cli):
    code, _, err = cli("demo", "--workdir", tmp_path, *SHORT, "--per-pair", "0")
    assert code == 2
    assert err.strip().count("\n") == 0 and "per_pair" in err, err


def test_demo_fresh_refuses_a_directory_it_did_not_make(tmp_path, cli):
    (tmp_path / "precious.txt").write_text("keep me")
    code, _, err = cli("demo", "--workdir", tmp_path, *SHORT, "--fresh")
    assert code == 2 and "not a pitchkeras demo workdir" in err, err
    assert (tmp_path / "precious.txt").exists()

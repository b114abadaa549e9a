"""`pitchkeras demo`: the main job end to end, offline, on the CPU, on the bundled sample dump.

Stages (each timed; a finished stage leaves a marker in the workdir and is
reused on the next run unless `fresh=True`):

1. prepare   the bundled Kaggle-schema sample dump -> WORKDIR/data
2. finetune  the `tiny` preset (or `preset`) -> WORKDIR/checkpoint/demo/model
3. populate  a small (score, genre) grid -> sqlite:///WORKDIR/reviews.db
4. serve     the gRPC ReviewService on a free 127.0.0.1 port, with the model for Generate,
             and HTTP/JSON + the web page on another (its URL is printed)
5. call      GetReview, GetById and Generate through `pitchkeras.client.ReviewClient`,
             and the seed's `GET /review/<id>` over HTTP
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from pitchkeras.errors import FailedPrecondition, InvalidArgument
from pitchkeras.io import atomic_write_json, atomic_write_text
from pitchkeras.model import load_model
from pitchkeras.populate import PopulateConfig, format_table, populate
from pitchkeras.quality import MemorizationIndex
from pitchkeras.sample_data import SAMPLE_DUMP
from pitchkeras.sampling import Generator
from pitchkeras.server.config import ServerConfig
from pitchkeras.store import open_store

# Imported where used, for start-up time (`pitchkeras --help` imports this module): pandas (data.prepare),
# Keras (train) and grpc (client, server.app).

STAGES = ("prepare", "finetune", "populate", "serve")
GENERATE_SEED_OFFSET = 500_000


@dataclasses.dataclass
class DemoConfig:
    """Settings of the demo; the defaults finish in a few minutes on 2 CPU cores.

    Args:
        workdir: str. Where every artifact goes.
        fresh: bool. Start over instead of reusing finished stages.
        preset: str. `tiny` (offline) or a keras-hub preset name / local preset dir.
        steps: int. Fine-tuning steps.
        batch_size: int. Training batch size.
        sequence_length: int. Training sequence length (tokens).
        learning_rate: float. Peak learning rate.
        scores: list of float. Score grid to populate.
        genres: list of str or None. Genres to populate (None = the seed's eight).
        per_pair: int. Reviews per (score, genre) pair.
        length: int. Max new tokens per generated review.
        seed: int. Seed for every stage.
    """

    workdir: str = "pitchkeras-demo"
    fresh: bool = False
    preset: str = "tiny"
    steps: int = 1000  # enough for whole sentences on the sample dump (time and loss: BUILD_NOTES.md)
    batch_size: int = 8
    sequence_length: int = 128
    learning_rate: float = 3e-3  # a randomly initialised tiny model wants a high rate
    scores: Sequence[float] = (2.0, 5.0, 8.0)
    genres: Optional[Sequence[str]] = None
    per_pair: int = 2
    length: int = 120
    seed: int = 0
    port: int = 0
    http_port: int = 0  # the web page and HTTP/JSON; 0 picks a free port
    progress: bool = True

    def validate(self) -> "DemoConfig":
        """Return self, or raise InvalidArgument naming the bad setting."""
        for name in ("steps", "batch_size", "sequence_length", "per_pair", "length"):
            if int(getattr(self, name)) < 1:
                raise InvalidArgument(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise InvalidArgument(f"learning_rate must be positive, got {self.learning_rate}")
        if not self.scores:
            raise InvalidArgument("scores must name at least one score")
        for name in ("port", "http_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise InvalidArgument(f"{name} must be in [0, 65535], got {getattr(self, name)}")
        return self


class _Stages:
    """Runs named stages with timing and a reuse marker per stage."""

    def __init__(self, workdir: Path, fresh: bool, out: Callable[[str], None]):
        self.workdir, self.fresh, self.out = workdir, fresh, out
        self.total = len(STAGES)

    def run(self, index: int, name: str, fn: Callable[[], dict], reusable: bool = True) -> dict:
        marker = self.workdir / f".{name}.done.json"
        if reusable and not self.fresh and marker.exists():
            info = json.loads(marker.read_text(encoding="utf-8"))
            self.out(f"[{index}/{self.total}] {name}: reused from an earlier run ({info.get('summary', '')})")
            return info
        self.out(f"[{index}/{self.total}] {name} ...")
        start = time.perf_counter()
        info = fn()
        info["seconds"] = round(time.perf_counter() - start, 1)
        self.out(f"[{index}/{self.total}] {name}: done in {info['seconds']:.1f} s ({info.get('summary', '')})")
        if reusable:
            atomic_write_json(marker, info)
        return info


@dataclasses.dataclass
class DemoResult:
    """What the demo did and where it left things.

    Args:
        workdir: Path. Root of every artifact.
        artifacts: dict. Name -> path of each artifact.
        stages: dict. Stage name -> its info (summary, seconds).
        served: dict. Method name -> the review (as a dict) the client got back through gRPC.
        seconds: float. Wall time of the whole demo.
    """

    workdir: Path
    artifacts: dict
    stages: dict
    served: dict
    seconds: float


def _review_text(review, width: int = 100) -> str:
    import textwrap

    head = f"id {review.id}  score {review.score if review.score is not None else '-'}  genre {review.genre or '-'}"
    head += f"  shown {review.selection_count}x  ({review.length} words)"
    body = textwrap.fill(review.text, width=width, initial_indent="    ", subsequent_indent="    ")
    return f"{head}\n{body}"


def run_demo(config: DemoConfig, *, out: Callable[[str], None] = print) -> DemoResult:
    """Run the whole job offline: prepare, fine-tune, populate, serve and call.

    Args:
        config: DemoConfig. The demo's settings.
        out: callable. Receives each line of the report.

    Returns:
        A `DemoResult`.
    """
    config.validate()
    started = time.perf_counter()
    paths = _DemoPaths(_open_workdir(config, out))
    stages = _Stages(paths.workdir, config.fresh, out)
    stage_info = {
        "prepare": stages.run(1, "prepare", lambda: _prepare_stage(config, paths)),
        "finetune": stages.run(2, "finetune", lambda: _finetune_stage(config, paths, out)),
    }
    # The model is loaded once: populate and the server's Generate share one compiled generator.
    generator = _load_generator(config, paths)
    # Not marker-reused: populate is itself resumable and generates nothing for full pairs.
    stage_info["populate"] = stages.run(3, "populate", lambda: _populate_stage(config, paths, generator, out),
                                        reusable=False)
    served: dict = {}
    stage_info["serve"] = stages.run(
        4, "serve", lambda: _serve_and_call(config, paths.store_uri, generator, served, out), reusable=False)
    artifacts = _list_artifacts(paths, out)
    seconds = time.perf_counter() - started
    out(f"pitchkeras demo: done in {seconds:.0f} s (rerun reuses finished stages; --fresh starts over)")
    return DemoResult(workdir=paths.workdir, artifacts=artifacts, stages=stage_info, served=served, seconds=seconds)


@dataclasses.dataclass(frozen=True)
class _DemoPaths:
    """Where each stage of a demo run reads and writes, under its workdir."""

    workdir: Path

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def run_dir(self) -> Path:
        return self.workdir / "checkpoint" / "demo"

    @property
    def model_dir(self) -> Path:
        return self.run_dir / "model"

    @property
    def store_uri(self) -> str:
        return f"sqlite:///{self.workdir / 'reviews.db'}"


def _open_workdir(config: DemoConfig, out) -> Path:
    """The workdir, emptied first with `fresh` (only if a demo made it), and marked as a demo's."""
    workdir = Path(config.workdir).resolve()
    if config.fresh and workdir.exists():
        _check_is_demo_dir(workdir)
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(workdir / ".pitchkeras-demo", "a `pitchkeras demo` workdir; `--fresh` deletes it\n")
    out(f"pitchkeras demo: working in {workdir}")
    return workdir


def _prepare_stage(config: DemoConfig, paths: _DemoPaths) -> dict:
    from pitchkeras.data.prepare import PrepareOptions, prepare  # here, not at the top: pandas (start-up time)

    result = prepare(SAMPLE_DUMP, paths.data_dir, options=PrepareOptions(seed=config.seed, val_fraction=0.1,
                                                                           progress=config.progress))
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(result.dropped.items()) if v) or "none"
    return {"summary": f"{result.train} train / {result.val} val examples from {result.read} rows; dropped: {dropped}"}


def _finetune_stage(config: DemoConfig, paths: _DemoPaths, out) -> dict:
    from pitchkeras.train import TrainConfig, finetune  # here, not at the top: Keras (start-up time)

    train_config = TrainConfig(
        dataset=str(paths.data_dir), run_name=paths.run_dir.name, checkpoint_dir=str(paths.run_dir.parent),
        preset=config.preset, steps=config.steps, batch_size=config.batch_size,
        sequence_length=config.sequence_length,
        # Quarters: a log line, a checkpoint and a validation pass together, the last one on the final step.
        learning_rate=config.learning_rate, print_every=max(config.steps // 4, 1),
        save_every=max(config.steps // 4, 1), val_every=max(config.steps // 4, 1), val_batches=4,
        seed=config.seed, restore_from="latest", progress=config.progress,
    ).validate()
    result = finetune(train_config, log=out)
    if result.interrupted or result.model_dir is None:
        raise FailedPrecondition("fine-tuning was interrupted; run `pitchkeras demo` again to resume it")
    val = f", val loss {result.val_loss:.3f}" if result.val_loss is not None else ""
    last = result.losses[-1][1] if result.losses else float("nan")
    return {"summary": f"{result.step} steps, loss {last:.3f}{val}, {result.tokens_per_sec:,.0f} tokens/s, "
                       f"policy {result.policy}", "model_version": result.model_version}


def _load_generator(config: DemoConfig, paths: _DemoPaths):
    """The fine-tuned model's generator, rejecting copies of the prepared data."""
    model = load_model(paths.model_dir)
    memorization = MemorizationIndex.from_examples(paths.data_dir, prompt_format=model.prompt_format)
    return Generator(model, batch_size=8, max_new_tokens=config.length, memorization=memorization)


def _populate_stage(config: DemoConfig, paths: _DemoPaths, generator, out) -> dict:
    populate_config = PopulateConfig(
        model=str(paths.model_dir), store=paths.store_uri, per_pair=config.per_pair, scores=list(config.scores),
        genres=list(config.genres) if config.genres else None, dataset=str(paths.data_dir), length=config.length,
        seed=config.seed,
    ).validate()
    result = populate(populate_config, generator=generator, progress=config.progress, log=out)
    out(format_table(result))
    rejected = sum(result.rejected.values())
    return {"summary": f"{result.stored} stored now, {rejected} rejected, store {paths.store_uri}"}


def _list_artifacts(paths: _DemoPaths, out) -> dict:
    artifacts = {
        "dataset": paths.data_dir,
        "dataset statistics": paths.data_dir / "stats.png",
        "run directory": paths.run_dir,
        "loss curve": paths.run_dir / "loss.png",
        "model (keras-hub preset)": paths.model_dir,
        "review store": paths.workdir / "reviews.db",
    }
    out("")
    out("artifacts:")
    width = max(len(k) for k in artifacts)
    for name, path in artifacts.items():
        out(f"  {name.ljust(width)}  {path}")
    return artifacts


def _serve_and_call(config: DemoConfig, store_uri: str, generator, served: dict, out) -> dict:
    """Start the gRPC server on a local port, call every method through the Python client, stop it."""
    from pitchkeras.client import ReviewClient  # here, not at the top: grpc and aiohttp (start-up time)
    from pitchkeras.server.app import BackgroundServer

    with open_store(store_uri) as store:
        counts = [c for c in store.counts() if c.count > 0]
    if not counts:
        raise FailedPrecondition(
            f"no review was accepted into {store_uri}; train longer (--steps) or ask for more (--per-pair)"
        )
    # Ask for the best-stocked pair, so the demo shows a filtered pick.
    best = max(counts, key=lambda c: (c.count, c.score or 0))
    score, genre = best.score, best.genre
    server_config = ServerConfig(max_batch_size=2, default_max_length=config.length, grace_s=5.0)
    with BackgroundServer(store_uri, host="127.0.0.1", port=config.port, http_port=config.http_port,
                          generator=generator, config=server_config) as background:
        target = f"127.0.0.1:{background.port}"
        page = f"http://127.0.0.1:{background.http_port}/"
        out(f"  gRPC server on {target}, web page and HTTP/JSON on {page}; warming up the model ...")
        state = background.wait_until_ready(timeout=600)
        out(f"  model {state}; calling pitchkeras.v1.ReviewService through pitchkeras.client.ReviewClient")
        with ReviewClient(target, timeout=10.0, generate_timeout=300.0) as client:
            review = client.get_review(score=score, genre=genre)
            out(f"\nGetReview(score={score}, genre={genre!r}) -> the least-shown match:\n{_review_text(review)}")
            served["GetReview"] = review.to_dict()
            again = client.get_by_id(review.id)
            out(f"\nGetById({review.id!r}) -> the permalink (not counted as shown):\n{_review_text(again)}")
            served["GetById"] = again.to_dict()
            served["HTTP"] = _http_get_json(f"{page}review/{review.id}")
            out(f"\nGET {page}review/{review.id} -> the same review as the seed's JSON "
                f"({', '.join(list(served['HTTP'])[:7])}, ...); its page: {page}r/{review.id}")
            generated = None
            # Seeds away from populate's (base seed * 1000003 + attempt), so the fresh review is a new one.
            seed = GENERATE_SEED_OFFSET + config.seed
            for attempt in range(4):  # a tiny model writes a fragment now and then; the service says why
                (item,) = client.generate(score=score, genre=genre, seed=seed + attempt, num_samples=1, store=True)
                if item.accepted:
                    generated = item
                    break
                out(f"  Generate(seed={seed + attempt}) rejected: {item.rejection_reason}")
            if generated is not None:
                out(f"\nGenerate(score={score}, genre={genre!r}, store=True) -> a fresh review, now stored:\n"
                    f"{_review_text(generated.review)}")
                served["Generate"] = generated.review.to_dict()
    out(f"\n  the web page was on {page}; to browse it again: "
        f"pitchkeras serve --store {store_uri} --http-port 8080, then open http://127.0.0.1:8080/")
    summary = f"served on {target} and {page}; " + ", ".join(sorted(served)) + " answered"
    return {"summary": summary, "port": background.port}


def _http_get_json(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _check_is_demo_dir(workdir: Path) -> None:
    """Refuse to delete a directory the demo did not create."""
    if any(workdir.iterdir()) and not (workdir / ".pitchkeras-demo").exists():
        raise InvalidArgument(
            f"--fresh would delete {workdir}, which is not a pitchkeras demo workdir; choose another --workdir"
        )

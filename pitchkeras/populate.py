"""The grid job: generate -> post-process -> check -> store, for every (score, genre) pair.

Resumable and shardable by construction: every candidate review has a
deterministic id (`review_id(model_version, conditions, seed, attempt)`), so a
rerun asks the store which ids already exist and fills only what is missing,
and workers given disjoint `--shard-index` values never write the same pair.

Example:

    config = PopulateConfig(model="checkpoint/run1/model", store="sqlite:///reviews.db",
                            per_pair=3, scores=[2.0, 8.0], genres=["Rock", "Jazz"])
    result = populate(config)
    print(format_table(result))
"""

from __future__ import annotations

import collections
import dataclasses
import math
import sys
from typing import Any, Callable, Optional, Sequence

from pitchkeras.conditioning import validate_conditions
from pitchkeras.errors import InvalidArgument
from pitchkeras.model import ModelInfo, load_model
from pitchkeras.quality import MemorizationIndex
from pitchkeras.quantize import QUANTIZE_MODES, quantize_model
from pitchkeras.sampling.config import DEFAULT_LENGTH, GenerationRequest, SamplerConfig
from pitchkeras.sampling.engine import BULK_CACHE_BUCKETS, BULK_TOKENS_PER_STEP, DecodeEngine
from pitchkeras.sampling.generator import Generator
from pitchkeras.store import DEFAULT_STORE_URI, Review, ReviewStore, open_store, review_id

# Tokens per compiled engine call: nobody streams populate's text, so rows may join every few tokens.
TOKENS_PER_STEP = BULK_TOKENS_PER_STEP

# The seed project's eight Pitchfork genres.
SEED_GENRES = ("Rock", "Electronic", "Rap", "Pop/R&B", "Experimental", "Folk/Country", "Metal", "Jazz")


def score_grid(start: float = 0.0, stop: float = 10.0, step: float = 0.5) -> list[float]:
    """Scores from `start` to `stop` inclusive, one decimal (default 0.0, 0.5, ..., 10.0)."""
    if step <= 0:
        raise InvalidArgument(f"score step must be > 0, got {step}")
    if stop < start:
        raise InvalidArgument(f"score range stop {stop:g} is below its start {start:g}")
    count = int(math.floor((stop - start) / step + 1e-9)) + 1
    return [round(start + i * step, 1) for i in range(count)]


@dataclasses.dataclass
class PopulateConfig:
    """Settings of one populate run (the CLI flags mirror these names).

    Args:
        model: str. A pitchkeras model directory (`CHECKPOINT_DIR/RUN_NAME/model`).
        store: str. Store URI (`sqlite:///reviews.db`, `firestore://PROJECT/COLLECTION`).
        per_pair: int. Reviews wanted per (score, genre) pair.
        scores: list of float. The score grid; None = 0.0 to 10.0 in steps of 0.5.
        genres: list of str. The genres; None = the seed's eight.
        dataset: str or None. A prepared dataset dir (or train.csv) for the memorization check.
        max_copied_fraction: float. Reject a sample whose word n-grams are found in the
            training data at least this often (only with `dataset`).
        sampler: SamplerConfig. How tokens are drawn (the seed project's 0.7, top-k off, top-p 0.95 by
            default); stored with every review.
        length: int. Maximum new tokens per sample.
        batch_size: int. Slots of the decode engine: samples decoded together (mixed across pairs; a
            finished one is replaced at once).
        seed: int. Base seed; with the attempt index it fixes each review's id.
        max_attempts: int. Candidate generations per wanted review: a pair gets at most
            `per_pair * max_attempts` attempts in a run, then stays short (reported as missing).
        shard_index, num_shards: int. This worker takes pairs i with i % num_shards == shard_index.
        quantize: str or None. "int8": generate with int8 weights (`pitchkeras.quantize`).
    """

    model: str
    store: str = DEFAULT_STORE_URI
    per_pair: int = 5
    scores: Optional[Sequence[float]] = None
    genres: Optional[Sequence[str]] = None
    dataset: Optional[str] = None
    max_copied_fraction: float = 0.5  # half of a sample's 8-grams seen in training = a copy
    sampler: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)
    length: int = DEFAULT_LENGTH
    batch_size: int = 8
    seed: int = 0
    max_attempts: int = 4
    shard_index: int = 0
    num_shards: int = 1
    quantize: Optional[str] = None  # None = the weights as trained

    def validate(self) -> "PopulateConfig":
        if self.per_pair < 1:
            raise InvalidArgument(f"per_pair must be >= 1, got {self.per_pair}")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise InvalidArgument(
                f"shard_index must be in [0, num_shards); got {self.shard_index} of {self.num_shards}"
            )
        if self.max_attempts < 1:
            raise InvalidArgument(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.batch_size < 1:
            raise InvalidArgument(f"batch_size must be >= 1, got {self.batch_size}")
        if self.length < 1:
            raise InvalidArgument(f"length must be >= 1 token, got {self.length}")
        if not 0 < self.max_copied_fraction <= 1:
            raise InvalidArgument(f"max_copied_fraction must be in (0, 1], got {self.max_copied_fraction}")
        if self.quantize not in (None, *QUANTIZE_MODES):
            raise InvalidArgument(f"quantize must be one of {', '.join(QUANTIZE_MODES)} or None, got {self.quantize!r}")
        if self.scores is not None and not len(self.scores):
            raise InvalidArgument("scores is empty; give at least one score or None for the default grid")
        if self.genres is not None and not len(self.genres):
            raise InvalidArgument("genres is empty; give at least one genre or None for the seed's eight")
        self.sampler.validate()
        return self


@dataclasses.dataclass
class PairResult:
    """What happened to one grid pair."""

    conditions: dict
    requested: int
    existing: int = 0  # already in the store before this run
    stored: int = 0  # added by this run
    rejected: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    @property
    def missing(self) -> int:
        return max(0, self.requested - self.existing - self.stored)


@dataclasses.dataclass
class PopulateResult:
    model_version: str
    store: str
    pairs: list[PairResult]

    @property
    def stored(self) -> int:
        return sum(p.stored for p in self.pairs)

    @property
    def rejected(self) -> collections.Counter:
        total: collections.Counter = collections.Counter()
        for p in self.pairs:
            total.update(p.rejected)
        return total


def build_grid(prompt_format, condition_values: dict, scores, genres) -> list[dict]:
    """The condition dicts of the grid, in a stable order.

    Genres are matched case-insensitively to the spelling the model was trained
    with, so its prompts look like its training data.
    """
    names = prompt_format.conditions
    if not names:
        return [{}]
    unknown = [n for n in names if n not in ("score", "genre")]
    if unknown:
        raise InvalidArgument(
            f"populate builds a grid over score and genre; this model also needs {', '.join(unknown)}"
        )
    axes: list[list[tuple[str, Any]]] = []
    if "score" in names:
        axes.append([("score", s) for s in (score_grid() if scores is None else [round(float(s), 1) for s in scores])])
    if "genre" in names:
        wanted = list(SEED_GENRES if genres is None else genres)
        known = {str(g).casefold(): str(g) for g in condition_values.get("genre", [])}
        resolved = []
        for genre in wanted:
            if known and genre.casefold() not in known:
                raise InvalidArgument(
                    f"genre {genre!r} was not in this model's training data; "
                    f"known: {', '.join(sorted(known.values()))} (set --genres)"
                )
            resolved.append(known.get(genre.casefold(), genre))
        axes.append([("genre", g) for g in resolved])
    grid = [{}]
    for axis in axes:
        grid = [dict(cell, **{name: value}) for cell in grid for name, value in axis]
    # keep the order: for each score, every genre (so a partial run covers the score range evenly)
    return sorted(grid, key=lambda c: (c.get("score", 0.0), str(c.get("genre", ""))))


def attempt_seed(base_seed: int, attempt: int) -> int:
    """The sampler seed of one attempt: distinct per attempt, fixed by (base seed, attempt)."""
    return (int(base_seed) * 1_000_003 + attempt) % (2**31 - 1)


def populate(
    config: PopulateConfig,
    *,
    model=None,
    generator=None,
    store: Optional[ReviewStore] = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
) -> PopulateResult:
    """Fill the store with `per_pair` accepted reviews for every pair of this shard's grid.

    Every candidate goes through a `DecodeEngine` with `batch_size` slots:
    a review that ends frees its slot for the next candidate at once, so no
    batch waits for its longest review.

    Args:
        config: PopulateConfig. What to generate and where to store it.
        model: PitchModel or None. Already loaded model (else loaded from `config.model`).
        generator: sampling.Generator or None. Reuse a warm generator (the demo does).
        store: ReviewStore or None. Already opened store (else `open_store(config.store)`).
        progress: bool. Show a progress bar.
    """
    # Everything that can be wrong with the arguments fails here, before the
    # (slow) model load: the config, the grid against pitchkeras.json, the store URI.
    config.validate()
    info = generator.model.info if generator is not None else _model_info(config, model)
    pairs, grid_size = _my_pairs(config, info)
    own_store = store is None
    store = store or open_store(config.store)
    try:
        engine = DecodeEngine(generator or _generator(config, model), slots=config.batch_size,
                              tokens_per_step=TOKENS_PER_STEP, cache_buckets=BULK_CACHE_BUCKETS, prefill_together=True)
        pending = _pending_attempts(config, info, pairs, store)
        wanted = sum(p.missing for p in pairs)
        shard = ""
        if config.num_shards > 1:
            shard = f" (shard {config.shard_index} of {config.num_shards}: {len(pairs)} of {grid_size} pairs)"
        log(f"populate: {len(pairs)} pair(s){shard}, {sum(p.existing for p in pairs)} review(s) already stored, "
            f"{wanted} to generate (at most {config.max_attempts} attempts each)")
        from tqdm.auto import tqdm

        bar = tqdm(total=wanted, desc="populate", unit="review", disable=not progress or wanted == 0, dynamic_ncols=True)
        try:
            # Rounds: every pair still short gets its next `missing` attempts, until none is short or left.
            while work := _next_round(pairs, pending):
                _run_round(engine, config, info, pairs, work, store, bar)
        finally:
            bar.close()
        return PopulateResult(model_version=info.model_version, store=store.uri or config.store, pairs=pairs)
    finally:
        if own_store:
            store.close()


def _model_info(config: PopulateConfig, model):
    if model is not None:
        return model.info
    return ModelInfo.read(config.model)


def _my_pairs(config: PopulateConfig, info) -> tuple[list[PairResult], int]:
    """This shard's pairs of the grid, conditions checked against the model (scores in its trained range),
    and the size of the whole grid."""
    grid = build_grid(info.prompt_format, info.condition_values, config.scores, config.genres)
    grid = [validate_conditions(info, cell) if cell else {} for cell in grid]
    return [PairResult(conditions=c, requested=config.per_pair)
            for i, c in enumerate(grid) if i % config.num_shards == config.shard_index], len(grid)


def _generator(config: PopulateConfig, model):
    """Load (unless given), quantize and wrap the model, with the memorization check when a dataset is given."""
    if model is None:
        model = load_model(config.model)
    memorization = None
    if config.dataset:
        memorization = MemorizationIndex.from_dataset(config.dataset)
    return Generator(quantize_model(model, config.quantize), batch_size=config.batch_size,
                     max_new_tokens=config.length, memorization=memorization,
                     max_copied_fraction=config.max_copied_fraction)


def _pending_attempts(config: PopulateConfig, info, pairs: list[PairResult], store) -> dict[int, list[int]]:
    """Per pair, the attempts not yet stored, in order; fills each pair's `existing` (one store call per pair).

    Each wanted review gets at most max_attempts candidates, so a model that
    keeps failing the checks cannot keep a pair generating forever.
    """
    total_attempts = config.per_pair * config.max_attempts
    pending = {}
    for p_index, pair in enumerate(pairs):
        ids = [review_id(info.model_version, pair.conditions, config.seed, a) for a in range(total_attempts)]
        existing = store.existing_ids(ids)
        pair.existing = min(len(existing), config.per_pair)
        pending[p_index] = [a for a, rid in enumerate(ids) if rid not in existing]
    return pending


def _next_round(pairs: list[PairResult], pending: dict[int, list[int]]) -> list[tuple[int, int]]:
    """(pair index, attempt) for every pair still short: its next `missing` attempts."""
    work = []
    for p_index, pair in enumerate(pairs):
        take = pending[p_index][: pair.missing]
        del pending[p_index][: len(take)]
        work.extend((p_index, a) for a in take)
    return work


def _run_round(engine, config: PopulateConfig, info, pairs: list[PairResult], work: list, store, bar) -> None:
    """Generate one round's attempts through the engine; store accepted reviews as they finish, a batch at a time."""
    streams = [
        (pairs[p], attempt, engine.submit(GenerationRequest(conditions=dict(pairs[p].conditions) or None,
                                                            seed=attempt_seed(config.seed, attempt)),
                                          config.sampler, config.length, deltas=False))
        for p, attempt in work
    ]
    accepted: list = []
    while streams:
        engine.step()
        finished = [item for item in streams if item[2].done]
        streams = [item for item in streams if not item[2].done]
        for pair, attempt, stream in finished:
            sample = stream.result()
            if sample.rejected:
                pair.rejected[sample.rejected] += 1
                continue
            rid = review_id(info.model_version, pair.conditions, config.seed, attempt)
            accepted.append((pair, Review.from_sample(sample, pair.conditions, rid)))
        # Written a batch at a time: a run killed mid-way keeps everything stored so far.
        if accepted and (len(accepted) >= config.batch_size or not streams):
            store.add_reviews([review for _, review in accepted])
            for pair, _ in accepted:
                pair.stored += 1
            bar.update(len(accepted))
            accepted = []
        bar.set_postfix(rejected=sum(sum(p.rejected.values()) for p in pairs), refresh=False)


def format_table(result: PopulateResult) -> str:
    """A fixed-width table per pair: requested, already there, stored now, missing, rejected by reason."""
    reasons = sorted(result.rejected)
    header = ["score", "genre", "requested", "existing", "stored", "missing"] + [f"rej:{r}" for r in reasons]
    rows = []
    for p in result.pairs:
        score = p.conditions.get("score")
        rows.append(
            [
                "-" if score is None else f"{score:.1f}",
                str(p.conditions.get("genre", "-")),
                str(p.requested),
                str(p.existing),
                str(p.stored),
                str(p.missing),
            ]
            + [str(p.rejected.get(r, 0)) for r in reasons]
        )
    totals = ["total", "", str(sum(p.requested for p in result.pairs)), str(sum(p.existing for p in result.pairs)),
              str(result.stored), str(sum(p.missing for p in result.pairs))] + [str(result.rejected[r]) for r in reasons]
    rows.append(totals)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])

"""The engine feeds the generate metrics a generation server is expected to export (as TGI does): tokens and
rows per step, time to first token, time per output token, queue time, running and waiting gauges, and
cancellations by reason."""

from __future__ import annotations

import time
import urllib.request

import grpc
import pytest

pytest.importorskip("tensorflow")

from pitchkeras.server import ServerConfig  # noqa: E402
from tests.serve_fixtures import ready_server  # noqa: E402
from pitchkeras.v1 import review_service_pb2 as pb  # noqa: E402
from pitchkeras.v1 import review_service_pb2_grpc as pb_grpc  # noqa: E402

CONFIG = ServerConfig(max_batch_size=2, default_max_length=12, max_length_cap=24, num_samples_cap=2,
                      prompt_chars_cap=40, grace_s=5.0, warmup=False)


def scrape(port: int) -> dict:
    """The samples of GET /metrics as {"name{labels}": value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_a_streamed_generation_feeds_the_generate_metrics(tmp_path, tiny_generator):
    with ready_server(tmp_path, tiny_generator, CONFIG, http_port=0) as served:
        with grpc.insecure_channel(f"localhost:{served.port}") as channel:
            stub = pb_grpc.ReviewServiceStub(channel)
            before = scrape(served.http_port)
            chunks = list(stub.StreamGenerate(pb.GenerateRequest(score=8.0, genre="Rock", seed=1, max_length=24),
                                              timeout=60))
            assert chunks[-1].WhichOneof("chunk") == "review"
            counters = served.server.model.batcher.engine.counters
            after = scrape(served.http_port)
            produced = counters.tokens
            assert produced > 1
            assert after["pitchkeras_generate_tokens_total"] - before.get("pitchkeras_generate_tokens_total", 0) \
                == produced
            assert after["pitchkeras_generate_batch_size_count"] == counters.steps  # one call per token here
            for name in ("time_to_first_token_seconds", "time_per_output_token_seconds", "queue_duration_seconds"):
                assert after[f"pitchkeras_generate_{name}_count"] == 1, name
            assert after["pitchkeras_generate_running_rows"] == 0 and after["pitchkeras_generate_queue_depth"] == 0
            assert after['pitchkeras_generate_cancellations_total{reason="cancelled"}'] == 0
            # A caller that leaves mid-stream is counted by reason.
            call = stub.StreamGenerate(pb.GenerateRequest(score=8.0, genre="Rock", seed=2, max_length=24), timeout=60)
            next(call)
            call.cancel()
            engine = served.server.model.batcher.engine
            end = time.monotonic() + 60
            while engine.counters.cancelled + engine.counters.finished < 2 and time.monotonic() < end:
                time.sleep(0.01)
            cancelled = scrape(served.http_port)
            assert engine.counters.cancelled + engine.counters.finished == 2  # it left, or finished first
            assert cancelled['pitchkeras_generate_cancellations_total{reason="cancelled"}'] \
                == engine.counters.cancelled

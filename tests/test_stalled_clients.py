"""Slow and silent clients on real sockets are dropped within the configured timeouts while others are served."""

from __future__ import annotations

import dataclasses
import http.client
import socket
import threading
import time

import grpc
import pytest

from pitchkeras.server import BackgroundServer
from pitchkeras.v1 import review_service_pb2 as pb
from pitchkeras.v1 import review_service_pb2_grpc as pb_grpc
from tests.serve_fixtures import SERVER_CONFIG

HEADER_S, BODY_S, KEEPALIVE_S, GRPC_IDLE_S = 1.0, 1.5, 2.0, 1.0
CONFIG = dataclasses.replace(SERVER_CONFIG, header_timeout_s=HEADER_S, body_timeout_s=BODY_S,
                             keepalive_timeout_s=KEEPALIVE_S, grpc_max_idle_s=GRPC_IDLE_S)
SLACK_S = 1.5  # scheduling on a loaded 2-core machine; aiohttp's keep-alive check runs on whole-second ticks
LINGER_S = 1.0  # http_edge._LINGER_S


class Staller(threading.Thread):
    """Connect, send `parts` (pausing `pause_s` between them), then wait for the server to close the socket."""

    def __init__(self, port: int, parts: list[bytes], pause_s: float = 0.0):
        super().__init__(daemon=True)
        self.port, self.parts, self.pause_s = port, parts, pause_s
        self.closed_after = None
        self.answer = b""

    def run(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
            started = time.monotonic()
            try:
                if self._send(sock):
                    while chunk := sock.recv(4096):
                        self.answer += chunk
            except (ConnectionResetError, BrokenPipeError):
                pass
            except socket.timeout:
                return  # never closed: closed_after stays None
            self.closed_after = time.monotonic() - started

    def _send(self, sock) -> bool:
        """Send the parts, watching for the server's close during the pauses; False once it closed."""
        for part in self.parts:
            sock.sendall(part)
            if self.pause_s:
                sock.settimeout(self.pause_s)
                try:
                    chunk = sock.recv(4096)
                    if not chunk:
                        return False
                    self.answer += chunk
                except socket.timeout:
                    pass
                finally:
                    sock.settimeout(30)
        return True


def _serve_meanwhile(port: int, seconds: float) -> list[float]:
    """Latencies of GET /review/ calls made one after another for `seconds` (each on a new connection)."""
    latencies, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/review/")
        response = conn.getresponse()
        response.read()
        conn.close()
        assert response.status == 200
        latencies.append(time.monotonic() - started)
        time.sleep(0.05)
    return latencies


@pytest.fixture
def server(pool_uri):
    with BackgroundServer(pool_uri, config=CONFIG, http_port=0) as background:
        yield background


def test_stalled_http_clients_are_dropped_while_others_are_served(server):
    port = server.http_port
    head = (b"POST /v1/reviews:generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 900\r\n\r\n")
    groups = {
        "mid-headers": [Staller(port, [b"GET /review/ HTTP/1.1\r\nHost: x\r\nX-Slow: "]) for _ in range(40)],
        "trickling headers": [Staller(port, [b"GET /review/ HTTP/1.1\r\n"] + [b"X-A: b\r\n"] * 20, 0.25)
                              for _ in range(5)],
        "mid-body": [Staller(port, [head + b'{"score": ']) for _ in range(40)],
        "silent": [Staller(port, []) for _ in range(20)],
    }
    for stallers in groups.values():
        for staller in stallers:
            staller.start()
    latencies = _serve_meanwhile(port, KEEPALIVE_S + SLACK_S + 0.5)
    for stallers in groups.values():
        for staller in stallers:
            staller.join(30)
    limits = {"mid-headers": HEADER_S, "trickling headers": HEADER_S, "mid-body": BODY_S + LINGER_S,
              "silent": KEEPALIVE_S}
    for name, stallers in groups.items():
        closed = [s.closed_after for s in stallers]
        assert None not in closed, f"{name}: some connections were never closed"
        assert max(closed) <= limits[name] + SLACK_S, (name, max(closed))
        assert min(closed) >= limits[name] - LINGER_S - 0.2 if name == "mid-body" else min(closed) >= limits[name] - 0.2
    assert all(s.answer.startswith(b"HTTP/1.1 408") for s in groups["mid-body"])
    assert max(latencies) < 1.0 and len(latencies) >= 10
    print(f"served {len(latencies)} calls meanwhile, slowest {max(latencies) * 1e3:.0f} ms; closed after (s): "
          + ", ".join(f"{name} {max(s.closed_after for s in st):.2f}" for name, st in groups.items()))


def test_stalled_grpc_handshakes_and_idle_channels_are_dropped(server):
    stallers = [Staller(server.port, [b"PRI * HTTP/2.0\r\n"]) for _ in range(20)]  # half a preface
    for staller in stallers:
        staller.start()
    states = []
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    channel.subscribe(states.append, try_to_connect=False)
    try:
        pb_grpc.ReviewServiceStub(channel).GetReview(pb.GetReviewRequest(), timeout=10)
        deadline = time.monotonic() + GRPC_IDLE_S + 10
        while states[-1:] != [grpc.ChannelConnectivity.IDLE] and time.monotonic() < deadline:
            time.sleep(0.05)
        # The server closed the idle connection (GOAWAY); the channel reconnects on its next call.
        assert states[-1] == grpc.ChannelConnectivity.IDLE, states
        assert pb_grpc.ReviewServiceStub(channel).GetReview(pb.GetReviewRequest(), timeout=10).review.id
    finally:
        channel.close()
    for staller in stallers:
        staller.join(30)
    closed = [s.closed_after for s in stallers]
    assert None not in closed and max(closed) <= HEADER_S + SLACK_S, closed

"""`python -m tests.firestore_server --port N`: serve until SIGTERM/SIGINT.

Prints the bound `host:port` as its first line (flushed), so a caller that
passed `--port 0` learns which port it got.
"""

import argparse
import signal
import sys
import threading

from tests.firestore_server.servicer import FirestoreServer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.firestore_server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="TCP port; 0 picks a free one (default 8080)")
    parser.add_argument("--max-workers", type=int, default=32, help="concurrent RPCs served (default 32)")
    args = parser.parse_args(argv)
    try:
        server = FirestoreServer(args.host, args.port, args.max_workers).start()
    except (OSError, RuntimeError) as exc:
        print(f"error: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(server.address, flush=True)
    stop.wait()
    server.stop(grace=1).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())

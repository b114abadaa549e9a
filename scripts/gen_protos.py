"""Regenerate the Python code for the .proto files under protos/ (never edit pitchkeras/v1/*_pb2* by hand).

One protoc call through grpcio-tools, as the gRPC examples do:

    python scripts/gen_protos.py            # writes pitchkeras/v1/*_pb2.py, *_pb2.pyi, *_pb2_grpc.py
    python scripts/gen_protos.py --out DIR  # writes DIR/pitchkeras/v1/... (the drift test compares these)

Other languages use plain protoc on the same files, e.g.
`protoc -Iprotos --go_out=OUT protos/pitchkeras/v1/review_service.proto`.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"


def proto_files() -> list[str]:
    """The .proto files to compile, relative to protos/ (so imports read `pitchkeras/v1/...`).

    protos/google/api/ (the HTTP annotations) is only imported: its Python code
    ships in googleapis-common-protos.
    """
    return sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "pitchkeras").rglob("*.proto"))


def generate(out_dir: Path = ROOT) -> list[str]:
    """Run protoc on every file in `protos/`, writing Python, .pyi and gRPC stubs under `out_dir`.

    Returns:
        The .proto files compiled.
    """
    from grpc_tools import protoc

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # google/protobuf/*.proto (Timestamp) ship inside grpcio-tools.
    well_known = resources.files("grpc_tools") / "_proto"
    files = proto_files()
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *files,
    ]
    # protoc resolves the relative .proto names against the -I roots.
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed (exit {code}) on {', '.join(files)}")
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT), help="output root (default: the repository root)")
    args = parser.parse_args(argv)
    files = generate(Path(args.out))
    print(f"generated Python for {', '.join(files)} under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The .proto contract: committed Python code matches it, other languages compile it, AIP style holds."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROTO = "pitchkeras/v1/review_service.proto"
GENERATED = ("review_service_pb2.py", "review_service_pb2.pyi", "review_service_pb2_grpc.py")


def _protoc(*args: str) -> None:
    # In a child process: grpc_tools' protoc shares the process-wide descriptor pool with the
    # protobuf runtime already loaded by other tests, and crashes (SIGSEGV) when run in-process.
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    result = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'protos'}", f"-I{include}", *args],
                            capture_output=True, text=True)
    assert result.returncode == 0, f"protoc {' '.join(args)} failed with exit {result.returncode}: {result.stderr}"


def test_committed_code_matches_the_proto(tmp_path):
    # The documented regenerate command, into a temp dir.
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    for name in GENERATED:
        fresh, committed = tmp_path / "pitchkeras" / "v1" / name, ROOT / "pitchkeras" / "v1" / name
        assert fresh.exists(), f"regeneration did not write {name}"
        assert filecmp.cmp(fresh, committed, shallow=False), (
            f"pitchkeras/v1/{name} is out of date with protos/{PROTO}; run `python scripts/gen_protos.py`"
        )


@pytest.mark.skipif(shutil.which("protoc") is None, reason="plain protoc is not installed (apt-get install protobuf-compiler)")
@pytest.mark.parametrize("language", ["cpp", "java", "csharp", "ruby", "php", "objc", "python"])
def test_plain_protoc_compiles_for_other_languages(tmp_path, language):
    # The system protoc with its own well-known types, not grpcio-tools: what another team would run.
    result = subprocess.run(["protoc", f"-I{ROOT / 'protos'}", f"--{language}_out={tmp_path}", PROTO],
                            capture_output=True, text=True)
    assert result.returncode == 0, f"protoc --{language}_out failed: {result.stderr}"
    assert any(p.is_file() for p in tmp_path.rglob("*")), f"protoc --{language}_out wrote nothing"


def _descriptor(tmp_path):
    from google.protobuf import descriptor_pb2

    out = tmp_path / "set.pb"
    _protoc("--include_source_info", f"--descriptor_set_out={out}", PROTO)
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return files.file[0]


def test_aip_style(tmp_path):
    """package pitchkeras.v1, *Service, lower_snake_case fields, enum zero _UNSPECIFIED, one request/response per
    unary RPC; a `Stream<Name>` RPC takes its unary sibling's request (the same call, streamed, as TGI's
    generate_stream) and streams `<Name>Chunk` messages."""
    proto = _descriptor(tmp_path)
    assert proto.package == "pitchkeras.v1"
    (service,) = proto.service
    assert service.name.endswith("Service")
    unary = [m for m in service.method if not m.server_streaming]
    inputs = [m.input_type for m in unary]
    outputs = [m.output_type for m in unary]
    assert len(set(inputs)) == len(inputs) and len(set(outputs)) == len(outputs)
    for method in unary:
        assert method.input_type == f".pitchkeras.v1.{method.name}Request"
        assert method.output_type == f".pitchkeras.v1.{method.name}Response"
    for method in service.method:
        if method.server_streaming:
            sibling = method.name.removeprefix("Stream")
            assert method.name.startswith("Stream") and sibling in {m.name for m in unary}
            assert method.input_type == f".pitchkeras.v1.{sibling}Request"
            assert method.output_type == f".pitchkeras.v1.{sibling}Chunk"
    for message in proto.message_type:
        for field in message.field:
            assert field.name == field.name.lower() and " " not in field.name, f"{message.name}.{field.name}"
    for enum in proto.enum_type:
        assert enum.value[0].number == 0 and enum.value[0].name.endswith("_UNSPECIFIED"), enum.name


def test_every_element_has_a_comment(tmp_path):
    proto = _descriptor(tmp_path)
    commented = {
        tuple(loc.path) for loc in proto.source_code_info.location if loc.leading_comments.strip()
    }
    # Descriptor paths: 4 = message_type, 2 = field, 5 = enum_type, 2 = value, 6 = service, 2 = method.
    missing = []
    for i, message in enumerate(proto.message_type):
        if (4, i) not in commented:
            missing.append(message.name)
        missing += [f"{message.name}.{f.name}" for j, f in enumerate(message.field) if (4, i, 2, j) not in commented]
    for i, enum in enumerate(proto.enum_type):
        if (5, i) not in commented:
            missing.append(enum.name)
        missing += [v.name for j, v in enumerate(enum.value) if (5, i, 2, j) not in commented]
    for i, service in enumerate(proto.service):
        if (6, i) not in commented:
            missing.append(service.name)
        missing += [m.name for j, m in enumerate(service.method) if (6, i, 2, j) not in commented]
    assert not missing, f"elements without a // comment: {missing}"


def test_optional_means_absent_is_not_zero():
    from pitchkeras.v1 import review_service_pb2 as pb

    request = pb.GetReviewRequest()
    assert not request.HasField("score")
    request.score = 0.0
    assert request.HasField("score")
    for name in ("temperature", "top_k", "top_p", "seed", "max_length", "num_samples"):
        assert not pb.GenerateRequest().HasField(name)

"""The .proto contract: committed Python code matches it, other languages compile it, AIP style holds."""

from __future__ import annotations

import ast
import configparser
import importlib.util
import re
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


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _RecordingChannel:
    """Stands where a grpc.Channel goes and records each method the stub binds: kind, path, (de)serializers."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, kind):
        def bind(path, request_serializer=None, response_deserializer=None, **_):
            self.calls.append((kind, path, _qualname(request_serializer), _qualname(response_deserializer)))
        return bind


class _RecordingServer:
    def __init__(self):
        self.handlers = []

    def add_generic_rpc_handlers(self, handlers):
        for handler in handlers:
            self.handlers.append(("generic", handler.service_name() if hasattr(handler, "service_name") else None))

    def add_registered_method_handlers(self, service, handlers):
        for name, handler in sorted(handlers.items()):
            self.handlers.append((service, name, handler.request_streaming, handler.response_streaming,
                                  _qualname(handler.request_deserializer), _qualname(handler.response_serializer)))


def _qualname(fn):
    return None if fn is None else getattr(fn, "__qualname__", repr(fn))


def _service_shape(module):
    """What a generated _pb2_grpc module means: the stub's bound methods and the server's registered handlers."""
    channel, server = _RecordingChannel(), _RecordingServer()
    module.ReviewServiceStub(channel)
    module.add_ReviewServiceServicer_to_server(module.ReviewServiceServicer(), server)
    servicer_methods = sorted(n for n in vars(module.ReviewServiceServicer) if not n.startswith("_"))
    return channel.calls, server.handlers, servicer_methods


def _drop_json_names(messages) -> None:
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _drop_json_names(message.nested_type)


def _pyi_shape(path: Path) -> str:
    # Type stubs carry no version stamp today; compare their syntax tree so layout changes alone do not count.
    return ast.dump(ast.parse(path.read_text()))


def test_committed_code_matches_the_proto(tmp_path):
    """The committed Python code means what protos/ says: the same messages and enums (descriptor), the same
    service (stub methods, handlers) and the same type stubs. The generator's version stamps are not compared,
    so any compatible grpcio-tools patch release regenerates "the same" code (see the lower-bound test below)."""
    from google.protobuf import descriptor_pb2

    from pitchkeras.v1 import review_service_pb2, review_service_pb2_grpc

    hint = f"pitchkeras/v1 is out of date with protos/{PROTO}; run `python scripts/gen_protos.py`"
    # The documented regenerate command, into a temp dir.
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    fresh_dir = tmp_path / "pitchkeras" / "v1"
    for name in GENERATED:
        assert (fresh_dir / name).exists(), f"regeneration did not write {name}"

    # Messages, enums, options, the HTTP annotations: the serialized FileDescriptorProto the pb2 module embeds.
    out = tmp_path / "set.pb"
    _protoc(f"--descriptor_set_out={out}", PROTO)
    (fresh,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    _drop_json_names(fresh.message_type)  # protoc adds them to descriptor sets; the Python generator leaves them out
    committed = descriptor_pb2.FileDescriptorProto.FromString(review_service_pb2.DESCRIPTOR.serialized_pb)
    assert committed == fresh, hint

    # The service: what a client stub binds and what a server registers, method by method.
    fresh_grpc = _load(fresh_dir / "review_service_pb2_grpc.py", "_fresh_review_service_pb2_grpc")
    assert _service_shape(fresh_grpc) == _service_shape(review_service_pb2_grpc), hint

    assert _pyi_shape(fresh_dir / "review_service_pb2.pyi") == \
        _pyi_shape(ROOT / "pitchkeras" / "v1" / "review_service_pb2.pyi"), hint


def _lower_bound(requirement: str) -> tuple[int, ...]:
    match = re.search(r">=\s*([0-9][0-9.]*)", requirement)
    assert match, f"setup.cfg: {requirement!r} has no lower bound"
    return tuple(int(part) for part in match.group(1).split("."))


def _install_requires() -> dict[str, str]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    lines = [line.strip() for line in parser["options"]["install_requires"].splitlines() if line.strip()]
    return {re.split(r"[<>=!~\[ ]", line, maxsplit=1)[0].lower(): line for line in lines}


def test_setup_cfg_admits_no_runtime_older_than_the_committed_code():
    """The generated code refuses to import under an older runtime (grpc raises RuntimeError, protobuf's
    ValidateProtobufRuntimeVersion raises VersionError), so setup.cfg's lower bounds must be at least its stamps:
    otherwise a resolver may pick a version the package cannot import with."""
    requires = _install_requires()
    grpc_text = (ROOT / "pitchkeras" / "v1" / "review_service_pb2_grpc.py").read_text()
    grpc_stamp = re.search(r"GRPC_GENERATED_VERSION = '([0-9.]+)'", grpc_text)
    pb2_text = (ROOT / "pitchkeras" / "v1" / "review_service_pb2.py").read_text()
    pb2_stamp = re.search(r"# Protobuf Python Version: ([0-9.]+)", pb2_text)
    assert grpc_stamp and pb2_stamp, "the generated code no longer carries the version stamps this test reads"
    grpc_needed = tuple(int(p) for p in grpc_stamp.group(1).split("."))
    pb2_needed = tuple(int(p) for p in pb2_stamp.group(1).split("."))
    assert _lower_bound(requires["grpcio"]) >= grpc_needed, (
        f"setup.cfg allows {requires['grpcio']!r} but the committed stubs need grpcio>={grpc_stamp.group(1)}")
    assert _lower_bound(requires["protobuf"]) >= pb2_needed, (
        f"setup.cfg allows {requires['protobuf']!r} but the committed pb2 needs protobuf>={pb2_stamp.group(1)}")


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

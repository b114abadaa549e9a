"""An in-memory `google.firestore.v1.Firestore` gRPC service for tests.

Speaks the real wire protocol (the raw protobuf classes shipped inside
google-cloud-firestore), so the unchanged client runs against it through
FIRESTORE_EMULATOR_HOST. Implements what a document store client needs:
BatchGetDocuments, RunQuery (field/unary/composite filters, order_by,
cursors, offset, limit, projection), RunAggregationQuery (count, sum, avg),
Commit (update masks, update transforms, preconditions), BatchWrite,
BeginTransaction and Rollback.

Transactions use optimistic concurrency: every document a transaction reads
(found or missing, by get or by query) is recorded with the version it saw; at
Commit, if any of them has changed since, the commit fails with ABORTED and
writes nothing, and the client's transactional retry runs the function again.
All state sits behind one lock, so each Commit is atomic and serializable with
respect to the documents its transaction read. (The real emulator locks
pessimistically instead; both forbid lost updates.) Query ranges are not
locked, so a document inserted into a range a transaction already scanned
does not abort it: phantoms are possible, lost updates are not.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
import time
from concurrent import futures
from typing import Iterator, Optional

import grpc
from google.cloud.firestore_v1.types import document as document_types
from google.cloud.firestore_v1.types import firestore as firestore_types
from google.cloud.firestore_v1.types import query as query_types
from google.cloud.firestore_v1.types import write as write_types
from google.protobuf import empty_pb2, timestamp_pb2

from tests.firestore_server import values

SERVICE = "google.firestore.v1.Firestore"

Document = document_types.Document.pb()
Value = document_types.Value.pb()
WriteResult = write_types.WriteResult.pb()

_FieldOp = query_types.StructuredQuery.FieldFilter.Operator
_UnaryOp = query_types.StructuredQuery.UnaryFilter.Operator
_CompositeOp = query_types.StructuredQuery.CompositeFilter.Operator
_Direction = query_types.StructuredQuery.Direction
_RANGE_OPS = {
    int(_FieldOp.LESS_THAN): lambda c: c < 0,
    int(_FieldOp.LESS_THAN_OR_EQUAL): lambda c: c <= 0,
    int(_FieldOp.GREATER_THAN): lambda c: c > 0,
    int(_FieldOp.GREATER_THAN_OR_EQUAL): lambda c: c >= 0,
}


class _WriteError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclasses.dataclass
class _Stored:
    doc: object  # Document pb without create/update times; never mutated once stored
    create_us: int
    update_us: int


@dataclasses.dataclass
class _Transaction:
    read_only: bool
    # Document name -> update time (µs) seen at first read, None when missing.
    reads: dict = dataclasses.field(default_factory=dict)


def _timestamp(us: int):
    return timestamp_pb2.Timestamp(seconds=us // 1_000_000, nanos=(us % 1_000_000) * 1000)


def _micros(ts) -> int:
    return ts.seconds * 1_000_000 + ts.nanos // 1000


def _cmp(a: tuple, b: tuple) -> int:
    return (a > b) - (a < b)


class FirestoreServicer:
    """The documents, the transactions and one handler per RPC."""

    def __init__(self):
        self._lock = threading.Lock()
        self._docs: dict[str, _Stored] = {}
        # Document names per collection path, so a query reads its own collection only
        # (one server serves a whole test session: thousands of documents in other collections).
        self._collections: dict[str, set[str]] = {}
        self._transactions: dict[bytes, _Transaction] = {}
        self._clock_us = 0
        # Counters tests can read to prove contention really happened.
        self.stats = {"commits": 0, "aborted": 0}

    # -- helpers (call with the lock held) ---------------------------------

    def _tick(self) -> int:
        """A new commit time, strictly after every earlier one (versions must differ)."""
        self._clock_us = max(int(time.time() * 1_000_000), self._clock_us + 1)
        return self._clock_us

    def _read_time(self):
        return _timestamp(max(int(time.time() * 1_000_000), self._clock_us))

    def _version(self, name: str) -> Optional[int]:
        stored = self._docs.get(name)
        return stored.update_us if stored else None

    def _begin(self, options) -> bytes:
        tid = os.urandom(16)
        self._transactions[tid] = _Transaction(read_only=options.HasField("read_only"))
        return tid

    def _read_transaction(self, request, context) -> tuple[Optional[_Transaction], Optional[bytes]]:
        """The transaction a read runs in and, when it began one, its new id."""
        selector = request.WhichOneof("consistency_selector")
        if selector == "transaction":
            txn = self._transactions.get(request.transaction)
            if txn is None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "transaction is not active (expired, committed or rolled back)")
            return txn, None
        if selector == "new_transaction":
            tid = self._begin(request.new_transaction)
            return self._transactions[tid], tid
        if selector == "read_time":
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "read_time reads are not supported by the test server")
        return None, None

    @staticmethod
    def _observe(txn: Optional[_Transaction], name: str, version: Optional[int]) -> None:
        if txn is not None:
            txn.reads.setdefault(name, version)

    @staticmethod
    def _public(stored: _Stored, field_paths=None):
        """The document as a client sees it, optionally projected on `field_paths`."""
        doc = Document(name=stored.doc.name)
        if field_paths is None:
            for key, value in stored.doc.fields.items():
                doc.fields[key].CopyFrom(value)
        else:
            for path in field_paths:
                parts = values.parse_field_path(path)
                value = values.get_field(stored.doc.fields, parts)
                if value is not None:
                    values.set_field(doc.fields, parts, value)
        doc.create_time.CopyFrom(_timestamp(stored.create_us))
        doc.update_time.CopyFrom(_timestamp(stored.update_us))
        return doc

    # -- reads --------------------------------------------------------------

    def BatchGetDocuments(self, request, context) -> Iterator:
        responses = []
        with self._lock:
            txn, new_id = self._read_transaction(request, context)
            read_time = self._read_time()
            mask = list(request.mask.field_paths) if request.HasField("mask") else None
            for name in request.documents:
                stored = self._docs.get(name)
                self._observe(txn, name, stored.update_us if stored else None)
                response = firestore_types.BatchGetDocumentsResponse.pb()(read_time=read_time)
                if stored is None:
                    response.missing = name
                else:
                    response.found.CopyFrom(self._public(stored, mask))
                responses.append(response)
        if new_id is not None and responses:
            responses[0].transaction = new_id
        yield from responses

    def RunQuery(self, request, context) -> Iterator:
        Response = firestore_types.RunQueryResponse.pb()
        with self._lock:
            txn, new_id = self._read_transaction(request, context)
            read_time = self._read_time()
            matched = self._query(request.parent, request.structured_query, context)
            for stored in matched:
                self._observe(txn, stored.doc.name, stored.update_us)
            projection = None
            if request.structured_query.HasField("select"):
                projection = [f.field_path for f in request.structured_query.select.fields]
            responses = [Response(document=self._public(s, projection), read_time=read_time) for s in matched]
        if not responses:
            responses = [Response(read_time=read_time)]
        if new_id is not None:
            responses[0].transaction = new_id
        yield from responses

    def RunAggregationQuery(self, request, context) -> Iterator:
        Response = firestore_types.RunAggregationQueryResponse.pb()
        aggregation_query = request.structured_aggregation_query
        with self._lock:
            txn, new_id = self._read_transaction(request, context)
            read_time = self._read_time()
            matched = self._query(request.parent, aggregation_query.structured_query, context)
            for stored in matched:
                self._observe(txn, stored.doc.name, stored.update_us)
        response = Response(read_time=read_time)
        if new_id is not None:
            response.transaction = new_id
        for aggregation in aggregation_query.aggregations:
            kind = aggregation.WhichOneof("operator")
            alias = aggregation.alias or f"field_{len(response.result.aggregate_fields) + 1}"
            if kind == "count":
                count = len(matched)
                if aggregation.count.HasField("up_to"):
                    count = min(count, aggregation.count.up_to.value)
                result = Value(integer_value=count)
            else:
                path = values.parse_field_path(getattr(aggregation, kind).field.field_path)
                numbers = []
                for stored in matched:
                    v = values.get_field(stored.doc.fields, path)
                    if v is not None and v.WhichOneof("value_type") in ("integer_value", "double_value"):
                        numbers.append(getattr(v, v.WhichOneof("value_type")))
                if kind == "sum":
                    total = sum(numbers)
                    result = Value(integer_value=total) if all(isinstance(n, int) for n in numbers) else Value(double_value=float(total))
                else:  # avg
                    result = Value(double_value=sum(numbers) / len(numbers)) if numbers else Value(null_value=0)
            response.result.aggregate_fields[alias].CopyFrom(result)
        yield response

    def _query(self, parent: str, query, context) -> list[_Stored]:
        selectors = list(getattr(query, "from_"))
        if len(selectors) != 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a query needs exactly one collection selector")
        selector = selectors[0]
        prefix = parent.rstrip("/") + "/"
        candidates = []
        if selector.all_descendants:
            names = sorted(self._docs)
        else:
            names = sorted(self._collections.get(prefix + selector.collection_id, ()))
        for name in names:
            if not name.startswith(prefix):
                continue
            segments = name[len(prefix):].split("/")
            if selector.all_descendants:
                in_collection = len(segments) % 2 == 0 and (
                    not selector.collection_id or segments[-2] == selector.collection_id
                )
            else:
                in_collection = len(segments) == 2 and segments[0] == selector.collection_id
            if in_collection:
                candidates.append(self._docs[name])

        if query.HasField("where"):
            candidates = [s for s in candidates if self._matches(s, query.where, context)]

        orders = [(o.field.field_path, o.direction == _Direction.DESCENDING) for o in query.order_by]
        if not any(path == "__name__" for path, _ in orders):
            orders.append(("__name__", orders[-1][1] if orders else False))
        keyed = []
        for stored in candidates:
            key = []
            for path, _ in orders:
                value = self._field(stored, path)
                if value is None:
                    break  # ordering by a field excludes documents without it
                key.append(values.sort_key(value))
            else:
                keyed.append((key, stored))

        def compare(a, b) -> int:
            for (_, descending), x, y in zip(orders, a[0], b[0]):
                c = _cmp(x, y)
                if c:
                    return -c if descending else c
            return 0

        keyed.sort(key=functools.cmp_to_key(compare))

        def cursor_cmp(key, cursor) -> int:
            cursor_keys = [values.sort_key(v) for v in cursor.values]
            return compare((key, None), (cursor_keys, None))

        if query.HasField("start_at"):
            before = query.start_at.before
            keyed = [k for k in keyed if (c := cursor_cmp(k[0], query.start_at)) > 0 or (c == 0 and before)]
        if query.HasField("end_at"):
            before = query.end_at.before
            keyed = [k for k in keyed if (c := cursor_cmp(k[0], query.end_at)) < 0 or (c == 0 and not before)]
        matched = [stored for _, stored in keyed][query.offset:]
        if query.HasField("limit"):
            matched = matched[: query.limit.value]
        return matched

    @staticmethod
    def _field(stored: _Stored, path: str):
        if path == "__name__":
            return Value(reference_value=stored.doc.name)
        return values.get_field(stored.doc.fields, values.parse_field_path(path))

    def _matches(self, stored: _Stored, flt, context) -> bool:
        kind = flt.WhichOneof("filter_type")
        if kind == "composite_filter":
            results = (self._matches(stored, f, context) for f in flt.composite_filter.filters)
            return any(results) if flt.composite_filter.op == _CompositeOp.OR else all(results)
        if kind == "unary_filter":
            value = self._field(stored, flt.unary_filter.field.field_path)
            if value is None:
                return False
            is_null = value.WhichOneof("value_type") == "null_value"
            op = flt.unary_filter.op
            if op == _UnaryOp.IS_NAN:
                return values.is_nan(value)
            if op == _UnaryOp.IS_NOT_NAN:
                return not values.is_nan(value) and not is_null
            if op == _UnaryOp.IS_NULL:
                return is_null
            if op == _UnaryOp.IS_NOT_NULL:
                return not is_null
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown unary operator {op}")
        if kind == "field_filter":
            ff = flt.field_filter
            value = self._field(stored, ff.field.field_path)
            if value is None:
                return False  # a missing field never matches, not even != or not-in
            target = ff.value
            op = int(ff.op)
            if op == _FieldOp.EQUAL:
                return values.equal(value, target)
            if op == _FieldOp.NOT_EQUAL:
                return value.WhichOneof("value_type") != "null_value" and not values.equal(value, target)
            if op in _RANGE_OPS:
                if values.type_rank(value) != values.type_rank(target) or values.is_nan(value):
                    return False
                return _RANGE_OPS[op](_cmp(values.sort_key(value), values.sort_key(target)))
            if op == _FieldOp.IN:
                return any(values.equal(value, t) for t in target.array_value.values)
            if op == _FieldOp.NOT_IN:
                return value.WhichOneof("value_type") != "null_value" and not any(
                    values.equal(value, t) for t in target.array_value.values
                )
            if op in (_FieldOp.ARRAY_CONTAINS, _FieldOp.ARRAY_CONTAINS_ANY):
                if value.WhichOneof("value_type") != "array_value":
                    return False
                wanted = [target] if op == _FieldOp.ARRAY_CONTAINS else list(target.array_value.values)
                return any(values.equal(e, t) for e in value.array_value.values for t in wanted)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown field operator {op}")
        return True

    # -- transactions -------------------------------------------------------

    def BeginTransaction(self, request, context):
        with self._lock:
            tid = self._begin(request.options)
        return firestore_types.BeginTransactionResponse.pb()(transaction=tid)

    def Rollback(self, request, context):
        # Idempotent: the client rolls back after a commit that already
        # ended the transaction (ABORTED), and that must not mask the abort.
        with self._lock:
            self._transactions.pop(request.transaction, None)
        return empty_pb2.Empty()

    # -- writes -------------------------------------------------------------

    def Commit(self, request, context):
        with self._lock:
            if request.transaction:
                txn = self._transactions.pop(request.transaction, None)
                if txn is None:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "transaction is not active (expired, committed or rolled back)")
                if txn.read_only and request.writes:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "cannot write in a read-only transaction")
                changed = [name for name, seen in txn.reads.items() if self._version(name) != seen]
                if changed:
                    self.stats["aborted"] += 1
                    context.abort(
                        grpc.StatusCode.ABORTED,
                        f"transaction aborted: {len(changed)} document(s) it read changed since, e.g. {changed[0]}",
                    )
            now_us = self._tick()
            overlay: dict[str, Optional[_Stored]] = {}
            results = []
            try:
                for write in request.writes:
                    results.append(self._apply(overlay, write, now_us))
            except _WriteError as exc:
                context.abort(exc.code, exc.message)
            self._store(overlay)
            self.stats["commits"] += 1
        return firestore_types.CommitResponse.pb()(write_results=results, commit_time=_timestamp(now_us))

    def BatchWrite(self, request, context):
        response = firestore_types.BatchWriteResponse.pb()()
        with self._lock:
            now_us = self._tick()
            for write in request.writes:
                overlay: dict[str, Optional[_Stored]] = {}
                try:
                    result = self._apply(overlay, write, now_us)
                except _WriteError as exc:
                    response.write_results.add()
                    response.status.add(code=exc.code.value[0], message=exc.message)
                    continue
                self._store(overlay)
                response.write_results.append(result)
                response.status.add(code=0)
        return response

    def _store(self, overlay: dict) -> None:
        for name, stored in overlay.items():
            collection = name.rsplit("/", 1)[0]
            if stored is None:
                self._docs.pop(name, None)
                self._collections.get(collection, set()).discard(name)
            else:
                self._docs[name] = stored
                self._collections.setdefault(collection, set()).add(name)

    def _apply(self, overlay: dict, write, now_us: int):
        """Apply one Write to `overlay` (nothing reaches the store on error)."""
        kind = write.WhichOneof("operation")
        if kind == "update":
            name = write.update.name
        elif kind == "delete":
            name = write.delete
        elif kind == "transform":
            name = write.transform.document
        else:
            raise _WriteError(grpc.StatusCode.INVALID_ARGUMENT, "a write needs an operation")
        current = overlay[name] if name in overlay else self._docs.get(name)

        if write.HasField("current_document"):
            condition = write.current_document.WhichOneof("condition_type")
            if condition == "exists":
                if write.current_document.exists and current is None:
                    raise _WriteError(grpc.StatusCode.NOT_FOUND, f"no document to update: {name}")
                if not write.current_document.exists and current is not None:
                    raise _WriteError(grpc.StatusCode.ALREADY_EXISTS, f"document already exists: {name}")
            elif condition == "update_time":
                if current is None or current.update_us != _micros(write.current_document.update_time):
                    raise _WriteError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"document {name} was updated since the given update_time",
                    )

        if kind == "delete":
            overlay[name] = None
            return WriteResult()

        doc = Document(name=name)
        base_fields = current.doc.fields if current is not None else {}
        if kind == "update" and not write.HasField("update_mask"):
            base_fields = write.update.fields  # a set without a mask replaces the document
        for key, value in base_fields.items():
            doc.fields[key].CopyFrom(value)
        if kind == "update" and write.HasField("update_mask"):
            for path in write.update_mask.field_paths:
                parts = values.parse_field_path(path)
                value = values.get_field(write.update.fields, parts)
                if value is None:
                    values.delete_field(doc.fields, parts)
                else:
                    values.set_field(doc.fields, parts, value)

        transforms = write.update_transforms if kind == "update" else write.transform.field_transforms
        result = WriteResult(update_time=_timestamp(now_us))
        for transform in transforms:
            parts = values.parse_field_path(transform.field_path)
            existing = values.get_field(doc.fields, parts)
            which = transform.WhichOneof("transform_type")
            if which == "set_to_server_value":
                new = Value(timestamp_value=_timestamp(now_us))
            elif which == "increment":
                new = values.increment(existing, transform.increment)
            elif which == "maximum":
                new = values.maximum(existing, transform.maximum)
            elif which == "minimum":
                new = values.minimum(existing, transform.minimum)
            elif which == "append_missing_elements":
                new = values.append_missing(existing, Value(array_value=transform.append_missing_elements))
            elif which == "remove_all_from_array":
                new = values.remove_all(existing, Value(array_value=transform.remove_all_from_array))
            else:
                raise _WriteError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown transform on {transform.field_path}")
            values.set_field(doc.fields, parts, new)
            result.transform_results.append(new)

        create_us = current.create_us if current is not None else now_us
        overlay[name] = _Stored(doc=doc, create_us=create_us, update_us=now_us)
        return result


_METHODS = {
    # name: (server-streaming?, request type, response type)
    "BatchGetDocuments": (True, firestore_types.BatchGetDocumentsRequest, firestore_types.BatchGetDocumentsResponse),
    "RunQuery": (True, firestore_types.RunQueryRequest, firestore_types.RunQueryResponse),
    "RunAggregationQuery": (True, firestore_types.RunAggregationQueryRequest, firestore_types.RunAggregationQueryResponse),
    "BeginTransaction": (False, firestore_types.BeginTransactionRequest, firestore_types.BeginTransactionResponse),
    "Rollback": (False, firestore_types.RollbackRequest, None),
    "Commit": (False, firestore_types.CommitRequest, firestore_types.CommitResponse),
    "BatchWrite": (False, firestore_types.BatchWriteRequest, firestore_types.BatchWriteResponse),
}


def generic_handler(servicer: FirestoreServicer) -> grpc.GenericRpcHandler:
    """The `google.firestore.v1.Firestore` service bound to `servicer`."""
    handlers = {}
    for name, (streaming, request_type, response_type) in _METHODS.items():
        serializer = response_type.pb().SerializeToString if response_type else empty_pb2.Empty.SerializeToString
        make = grpc.unary_stream_rpc_method_handler if streaming else grpc.unary_unary_rpc_method_handler
        handlers[name] = make(
            getattr(servicer, name),
            request_deserializer=request_type.pb().FromString,
            response_serializer=serializer,
        )
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


class FirestoreServer:
    """A running test server on `host:port` (port 0 picks a free one).

    Args:
        host: str. Interface to bind; tests use 127.0.0.1 only.
        port: int. TCP port, 0 for any free port.
        max_workers: int. Concurrent RPCs served (streaming reads hold a worker).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, max_workers: int = 32):
        self.servicer = FirestoreServicer()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers))
        self._server.add_generic_rpc_handlers((generic_handler(self.servicer),))
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        if not self.port:
            raise OSError(f"cannot bind {host}:{port}")
        self.host = host

    @property
    def address(self) -> str:
        """`host:port`, the value for FIRESTORE_EMULATOR_HOST."""
        return f"{self.host}:{self.port}"

    def start(self) -> "FirestoreServer":
        self._server.start()
        return self

    def stop(self, grace: Optional[float] = None) -> threading.Event:
        """Stop serving; returns an event set once in-flight RPCs are done."""
        return self._server.stop(grace)

    def wait_for_termination(self, timeout: Optional[float] = None) -> bool:
        return self._server.wait_for_termination(timeout)

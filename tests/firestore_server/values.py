"""Firestore values: ordering, equality, field paths and transforms on raw `Value` protos.

Firestore orders values across types (null < bool < number < timestamp <
string < bytes < reference < geo point < array < map) and compares integers
and doubles as numbers; `sort_key` encodes exactly that as a Python tuple.
"""

from __future__ import annotations

import math
from typing import Optional

from google.cloud.firestore_v1.types import document as document_types

Value = document_types.Value.pb()
MapValue = document_types.MapValue.pb()

_INT64_MAX = 2**63 - 1
_INT64_MIN = -(2**63)


def sort_key(value) -> tuple:
    """A tuple that sorts like Firestore orders `value`."""
    kind = value.WhichOneof("value_type")
    if kind is None or kind == "null_value":
        return (0,)
    if kind == "boolean_value":
        return (1, value.boolean_value)
    if kind in ("integer_value", "double_value"):
        number = getattr(value, kind)
        if isinstance(number, float) and math.isnan(number):
            return (2, 0)  # NaN sorts before every other number
        return (2, 1, number)
    if kind == "timestamp_value":
        return (3, value.timestamp_value.seconds, value.timestamp_value.nanos)
    if kind == "string_value":
        return (4, value.string_value)
    if kind == "bytes_value":
        return (5, value.bytes_value)
    if kind == "reference_value":
        return (6, tuple(value.reference_value.split("/")))
    if kind == "geo_point_value":
        return (7, value.geo_point_value.latitude, value.geo_point_value.longitude)
    if kind == "array_value":
        return (8, tuple(sort_key(v) for v in value.array_value.values))
    if kind == "map_value":
        return (9, tuple(sorted((k, sort_key(v)) for k, v in value.map_value.fields.items())))
    raise ValueError(f"unsupported value type {kind}")


def type_rank(value) -> int:
    return sort_key(value)[0]


def is_nan(value) -> bool:
    return value.WhichOneof("value_type") == "double_value" and math.isnan(value.double_value)


def equal(a, b) -> bool:
    if is_nan(a) or is_nan(b):
        return False
    return sort_key(a) == sort_key(b)


def parse_field_path(path: str) -> list[str]:
    """`a.b` -> [a, b]; backtick-quoted segments may hold dots (`` `a.b`.c ``)."""
    parts, current, quoted, i = [], [], False, 0
    while i < len(path):
        ch = path[i]
        if ch == "`":
            quoted = not quoted
        elif ch == "\\" and quoted and i + 1 < len(path):
            i += 1
            current.append(path[i])
        elif ch == "." and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts


def get_field(fields, path: list[str]) -> Optional[object]:
    """The value at `path` in a fields map, or None when absent."""
    current = fields
    for i, segment in enumerate(path):
        if segment not in current:
            return None
        value = current[segment]
        if i == len(path) - 1:
            return value
        if value.WhichOneof("value_type") != "map_value":
            return None
        current = value.map_value.fields
    return None


def set_field(fields, path: list[str], value) -> None:
    """Set `path` in a fields map, creating intermediate maps."""
    current = fields
    for segment in path[:-1]:
        if segment not in current or current[segment].WhichOneof("value_type") != "map_value":
            current[segment].CopyFrom(Value(map_value=MapValue()))
        current = current[segment].map_value.fields
    current[path[-1]].CopyFrom(value)


def delete_field(fields, path: list[str]) -> None:
    current = fields
    for segment in path[:-1]:
        if segment not in current or current[segment].WhichOneof("value_type") != "map_value":
            return
        current = current[segment].map_value.fields
    if path[-1] in current:
        del current[path[-1]]


def _number(value):
    kind = value.WhichOneof("value_type") if value is not None else None
    if kind in ("integer_value", "double_value"):
        return getattr(value, kind)
    return None


def increment(current, operand):
    """Firestore's numeric add: int + int stays int (saturating), else double."""
    base = _number(current)
    delta = _number(operand)
    if base is None:
        base = 0
    if isinstance(base, int) and isinstance(delta, int):
        return Value(integer_value=max(_INT64_MIN, min(_INT64_MAX, base + delta)))
    return Value(double_value=float(base) + float(delta))


def maximum(current, operand):
    base = _number(current)
    if base is None or _number(operand) > base:
        return operand
    return current


def minimum(current, operand):
    base = _number(current)
    if base is None or _number(operand) < base:
        return operand
    return current


def append_missing(current, operand):
    existing = list(current.array_value.values) if current is not None and current.HasField("array_value") else []
    out = Value()
    out.array_value.values.extend(existing)
    for item in operand.array_value.values:
        if not any(equal(item, e) for e in out.array_value.values):
            out.array_value.values.append(item)
    return out


def remove_all(current, operand):
    existing = list(current.array_value.values) if current is not None and current.HasField("array_value") else []
    out = Value()
    out.array_value.SetInParent()
    out.array_value.values.extend(
        e for e in existing if not any(equal(e, item) for item in operand.array_value.values)
    )
    return out

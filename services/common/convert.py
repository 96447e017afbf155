"""Small proto <-> Python conversions every servicer needs."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp


def timestamp(seconds: float | None) -> Timestamp:
    """Unix seconds -> Timestamp (unset when None)."""
    value = Timestamp()
    if seconds is not None:
        value.FromNanoseconds(int(seconds * 1e9))
    return value


def seconds(value: Timestamp, has_value: bool) -> float | None:
    """Timestamp -> Unix seconds, or None when the field was not set."""
    if not has_value:
        return None
    return value.seconds + value.nanos / 1e9

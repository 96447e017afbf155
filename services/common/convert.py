"""Small conversions that several services need: proto <-> Python, ONNX types <-> Open Inference Protocol."""

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


# onnx.TensorProto.DataType -> Open Inference Protocol datatype
ONNX_TO_OIP = {
    1: "FP32",
    2: "UINT8",
    3: "INT8",
    4: "UINT16",
    5: "INT16",
    6: "INT32",
    7: "INT64",
    8: "BYTES",
    9: "BOOL",
    10: "FP16",
    11: "FP64",
    12: "UINT32",
    13: "UINT64",
    16: "BF16",
}

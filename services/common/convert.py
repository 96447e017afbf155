"""Small conversions that several services need: proto <-> Python, ONNX types <-> Open Inference Protocol."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf.timestamp_pb2 import Timestamp

from services.common.errors import InvalidArgument

if TYPE_CHECKING:
    import pyarrow as pa


def timestamp(seconds: float | None) -> Timestamp:
    """Unix seconds -> Timestamp (unset when None)."""
    value = Timestamp()
    if seconds is not None:
        set_timestamp(value, seconds)
    return value


def set_timestamp(field: Timestamp, seconds: float) -> None:
    """Unix seconds into a message's Timestamp field, in place (cheaper than assigning a new one)."""
    field.seconds, field.nanos = divmod(int(seconds * 1e9), 1_000_000_000)


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


def read_table_file(path: Path) -> pa.Table:
    """A CSV or Parquet file as a table (by its suffix; other files are refused)."""
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet as pq

    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pyarrow.csv.read_csv(path)
        if suffix in (".parquet", ".pq"):
            return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise InvalidArgument(f"{path.name} cannot be read as {suffix[1:]}: {error}", field="path") from None
    raise InvalidArgument(f"{path.name}: give a .csv or .parquet file", field="path")

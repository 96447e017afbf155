"""Reading what model and dataset files say about themselves: ONNX graphs, MLflow MLmodel files,
CSV and Parquet tables. Pure functions over local files; errors are InvalidArgument."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import yaml

from services.common.convert import ONNX_TO_OIP
from services.common.errors import InvalidArgument

OIP_DATATYPES = frozenset(
    {
        "BOOL",
        "UINT8",
        "UINT16",
        "UINT32",
        "UINT64",
        "INT8",
        "INT16",
        "INT32",
        "INT64",
        "FP16",
        "FP32",
        "FP64",
        "BF16",
        "BYTES",
    }
)


# numpy dtype names (MLflow tensor specs) -> OIP datatype
_NUMPY_TO_OIP = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
    "str": "BYTES",
    "object": "BYTES",
    "bytes": "BYTES",
}

# MLflow column types -> OIP datatype
_COLUMN_TO_OIP = {
    "boolean": "BOOL",
    "integer": "INT32",
    "long": "INT64",
    "float": "FP32",
    "double": "FP64",
    "string": "BYTES",
    "binary": "BYTES",
    "datetime": "INT64",
}


def _without_path(error: Exception, path: Path) -> str:
    """An error's text without the server's own file path in it."""
    return str(error).replace(str(path), "the file")


def onnx_signature(path: Path, display_name: str) -> dict[str, list[dict[str, Any]]]:
    """The inputs and outputs of an ONNX graph as OIP tensor specs; `display_name` names it in errors."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:
        raise InvalidArgument(
            f"{display_name} is not a valid ONNX model: {_without_path(error, path)}", field="files"
        ) from error
    initializers = {initializer.name for initializer in model.graph.initializer}

    def specs(values: Any) -> list[dict[str, Any]]:
        found = []
        for value in values:
            if value.name in initializers:
                continue
            tensor = value.type.tensor_type
            shape = [dim.dim_value if dim.HasField("dim_value") else -1 for dim in tensor.shape.dim]
            found.append({"name": value.name, "datatype": ONNX_TO_OIP.get(tensor.elem_type, "BYTES"), "shape": shape})
        return found

    return {"inputs": specs(model.graph.input), "outputs": specs(model.graph.output)}


def mlflow_model(mlmodel: Path) -> dict[str, Any]:
    """Framework, main file, signature and run id of an MLflow model directory's MLmodel file."""
    try:
        document = yaml.safe_load(mlmodel.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise InvalidArgument(f"MLmodel is not valid YAML: {error}", field="files") from error
    if not isinstance(document, dict) or not isinstance(document.get("flavors"), dict):
        raise InvalidArgument("MLmodel has no `flavors` section; is this an MLflow model?", field="files")
    flavors = document["flavors"]
    if isinstance(flavors.get("onnx"), dict):
        framework, main_file = "onnx", flavors["onnx"].get("data", "model.onnx")
    elif isinstance(flavors.get("sklearn"), dict):
        framework, main_file = "sklearn", flavors["sklearn"].get("pickled_model", "model.pkl")
    else:
        raise InvalidArgument(
            f"MLflow flavors {sorted(flavors)} are not supported; import an onnx or sklearn model",
            field="files",
        )
    signature: dict[str, list[dict[str, Any]]] = {"inputs": [], "outputs": []}
    raw_signature = document.get("signature") or {}
    if isinstance(raw_signature, dict):
        for side in ("inputs", "outputs"):
            if raw_signature.get(side):
                signature[side] = _mlflow_schema(raw_signature[side], side)
    return {
        "framework": framework,
        "main_file": str(main_file),
        "signature": signature,
        "run_id": str(document.get("run_id") or ""),
    }


def _mlflow_schema(encoded: Any, side: str) -> list[dict[str, Any]]:
    try:
        columns = json.loads(encoded) if isinstance(encoded, str) else encoded
    except ValueError as error:
        raise InvalidArgument(f"MLmodel signature {side} is not JSON: {error}", field="files") from error
    if not isinstance(columns, list):
        raise InvalidArgument(f"MLmodel signature {side} must be a list", field="files")
    specs = []
    for index, column in enumerate(columns):
        if not isinstance(column, dict):
            raise InvalidArgument(f"MLmodel signature {side}[{index}] is not an object", field="files")
        name = str(column.get("name") or f"{side[:-1]}_{index}")
        if column.get("type") == "tensor":
            spec = column.get("tensor-spec")
            shape = spec.get("shape", [-1]) if isinstance(spec, dict) else None
            if not isinstance(shape, list) or not all(type(dim) is int and dim >= -1 for dim in shape):
                raise InvalidArgument(
                    f"MLmodel signature {side}[{index}] needs a tensor-spec whose shape lists dimensions "
                    "(sizes >= 0, or -1 for a variable size)",
                    field="files",
                )
            datatype = _NUMPY_TO_OIP.get(str(spec.get("dtype", "")).lower())
        else:
            datatype = _COLUMN_TO_OIP.get(str(column.get("type", "")).lower())
            shape = [-1]
        if datatype is None:
            raise InvalidArgument(f"MLmodel signature {side}[{index}] has an unknown type", field="files")
        specs.append({"name": name, "datatype": datatype, "shape": shape})
    return specs


def table_summary(path: Path, file_format: str, display_name: str, max_columns: int = 2000) -> dict[str, Any]:
    """Schema, row count and per-column statistics of a CSV or Parquet file named `display_name`."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path) if file_format == "parquet" else pacsv.read_csv(path)
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as error:
        raise InvalidArgument(
            f"{display_name} is not a valid {file_format} table: {_without_path(error, path)}", field="file"
        ) from error
    if table.num_columns > max_columns:
        raise InvalidArgument(
            f"the table has {table.num_columns} columns; at most {max_columns} are supported",
            field="file",
        )
    columns = []
    for name, column in zip(table.column_names, table.columns, strict=True):
        summary: dict[str, Any] = {
            "name": name,
            "type": str(column.type),
            "count": len(column) - column.null_count,
            "null_count": column.null_count,
        }
        numeric = pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
        if numeric and summary["count"] > 0:
            values = pc.drop_null(column).cast(pa.float64())
            summary["min"] = _finite(pc.min(values).as_py())
            summary["max"] = _finite(pc.max(values).as_py())
            summary["mean"] = _finite(pc.mean(values).as_py())
            summary["stddev"] = _finite(pc.stddev(values).as_py())
            quantiles = pc.quantile(values, q=[i / 10 for i in range(1, 10)]).to_pylist()
            summary["quantiles"] = [q for q in (_finite(v) for v in quantiles) if q is not None]
        elif not numeric:
            summary.update(_category_summary(column))
        columns.append(summary)
    return {"row_count": table.num_rows, "columns": columns, "schema": str(table.schema)}


def _category_summary(column: Any) -> dict[str, Any]:
    """Distinct count and most frequent values of a non-numeric column (none for nested types)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
            as_text = column
        else:
            as_text = column if pa.types.is_string(column.type) else column.cast(pa.string())
        counts = pc.value_counts(pc.drop_null(as_text)).to_pylist()
        distinct = pc.count_distinct(as_text).as_py()
    except pa.ArrowException:
        return {}  # lists, structs and the like: schema and counts only

    def label(value: Any) -> str:
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        return text[:200]

    top = sorted(((entry["values"], entry["counts"]) for entry in counts), key=lambda item: -item[1])[:10]
    return {"distinct_count": distinct, "top_values": {label(value): count for value, count in top}}


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def fingerprint(schema: str, content_sha256: str) -> str:
    return hashlib.sha256(f"{schema}\n{content_sha256}".encode()).hexdigest()

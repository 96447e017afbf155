"""Captured requests decoded into columns: the runtime's capture messages in, Arrow tables out.

A capture message (subject `mlmesh.capture.<endpoint>.<deployment>`) is
`{"rows": [{"id", "model", "version", "time", "inputs": [...], "outputs": [...]}, ...]}`, one
record per request; a request split over several messages has `offset` (its first row) in each
piece. A tensor is `{"name", "datatype", "shape", "raw"}` with `raw` its little-endian row-major
bytes in base64, or for BYTES `{"name", "datatype", "shape", "data"}` with a list of strings.

A captured table has `request_id` (string), `time` (timestamp, microseconds, UTC) and `row`
(int32: the row's index within its request, counting a piece's offset), then the columns of each
input and each output, first dimension being the request's rows:

- shape [batch]: one column named like the tensor;
- [batch, F] with 1 <= F <= 1024: F columns `<tensor>.0` ... `<tensor>.<F-1>`;
- anything else: one list column `<tensor>`, each row's values flattened in row-major order.

Names never collide: an input whose columns would take a reserved name (the three above,
`deployment`, `model_version`, `label`, and the partition names `endpoint`, `date`, `hour`) is
stored as `input.<tensor>`; an output whose columns would take a reserved name or an input's
column is stored as `output.<tensor>`. Datatypes map to Arrow types of the same width (FP16 is
widened to float32, BYTES becomes string).

Nothing here knows about NATS: callers hand over each message's subject, stream sequence and bytes.
"""

from __future__ import annotations

import binascii
import functools
import itertools
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

CAPTURE_SUBJECT_PREFIX = "mlmesh.capture."
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
"""Endpoint and deployment names (a superset of the deployer's): safe as one folder name."""
VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
TENSOR_NAME_LIMIT = 200
MAX_SPLIT_FEATURES = 1024
# Capture times outside these bounds are taken for garbage rather than partitioned (UTC, 2000-2200).
EARLIEST_TIME, LATEST_TIME = 946_684_800.0, 7_258_118_400.0
HOUR = 3600

FIXED_COLUMNS = ("request_id", "time", "row")
RESERVED_COLUMNS = frozenset({*FIXED_COLUMNS, "deployment", "model_version", "label", "endpoint", "date", "hour"})
TIME_TYPE = pa.timestamp("us", tz="UTC")

# OIP datatype -> (numpy dtype of its raw bytes, Arrow type stored). BYTES travel as strings.
DATATYPES: dict[str, tuple[np.dtype[Any] | None, pa.DataType]] = {
    "BOOL": (np.dtype("?"), pa.bool_()),
    "UINT8": (np.dtype("<u1"), pa.uint8()),
    "UINT16": (np.dtype("<u2"), pa.uint16()),
    "UINT32": (np.dtype("<u4"), pa.uint32()),
    "UINT64": (np.dtype("<u8"), pa.uint64()),
    "INT8": (np.dtype("<i1"), pa.int8()),
    "INT16": (np.dtype("<i2"), pa.int16()),
    "INT32": (np.dtype("<i4"), pa.int32()),
    "INT64": (np.dtype("<i8"), pa.int64()),
    "FP16": (np.dtype("<f2"), pa.float32()),
    "FP32": (np.dtype("<f4"), pa.float32()),
    "FP64": (np.dtype("<f8"), pa.float64()),
    "BYTES": (None, pa.string()),
}

# How a tensor becomes columns: ONE_COLUMN ([batch]), LIST_COLUMN, or a positive F ([batch, F]).
ONE_COLUMN = 0
LIST_COLUMN = -1
INPUT, OUTPUT = 0, 1

# (direction, tensor name, datatype, form) of each tensor of a request, inputs first.
Layout = tuple[tuple[int, str, str, int], ...]


class MalformedCapture(ValueError):
    """A capture message, or one request in it, that cannot be decoded."""


def parse_subject(subject: str) -> tuple[str, str]:
    """(endpoint, deployment) of a capture subject `mlmesh.capture.<endpoint>.<deployment>`."""
    endpoint, _, deployment = subject.removeprefix(CAPTURE_SUBJECT_PREFIX).partition(".")
    if not subject.startswith(CAPTURE_SUBJECT_PREFIX) or not valid_name(endpoint) or not valid_name(deployment):
        raise MalformedCapture(
            f"subject {subject[:200]!r} is not mlmesh.capture.<endpoint>.<deployment> with names of "
            "letters, digits, '-' and '_'"
        )
    return endpoint, deployment


def valid_name(name: str) -> bool:
    return bool(NAME_PATTERN.fullmatch(name))


@functools.lru_cache(maxsize=4096)
def _valid_version(version: str) -> bool:
    # A version names a folder: no separators, no `..`.
    return bool(VERSION_PATTERN.fullmatch(version)) and ".." not in version


@functools.lru_cache(maxsize=1024)
def column_names(layout: Layout) -> tuple[tuple[str, ...], ...]:
    """The columns of each tensor of `layout`, after the collision rule of the module docstring."""
    taken = set(RESERVED_COLUMNS)
    named = []
    for direction, name, _, form in layout:
        prefix = "input." if direction == INPUT else "output."
        base = name
        while True:
            columns = (base,) if form <= ONE_COLUMN else tuple(f"{base}.{index}" for index in range(form))
            if taken.isdisjoint(columns) and len(set(columns)) == len(columns):
                break
            base = prefix + base
        taken.update(columns)
        named.append(columns)
    return tuple(named)


@dataclass(frozen=True)
class _Structure:
    """What every request with the same tensors (names, datatypes, shapes) has in common: checked
    once, then reused for each such request, which then costs a few lookups."""

    layout: Layout
    rows: int
    sizes: tuple[int, ...]
    """Per tensor: the bytes its raw data must have, or for BYTES the number of strings."""
    widths: tuple[int, ...]
    """Per tensor: values per row."""
    is_text: tuple[bool, ...]
    bytes: int
    """Bytes of a request's tensors (strings counted one byte each): what the buffer holds."""


MAX_STRUCTURES = 10_000


def _structure(key: tuple[tuple[tuple[str, str, tuple[int, ...]], ...], ...]) -> _Structure:
    """Check a request's tensors ((name, datatype, shape) of its inputs, then of its outputs) and
    lay them out as columns."""
    layout, sizes, widths, is_text = [], [], [], []
    rows = -1
    tensors = [(direction, *tensor) for direction, group in ((INPUT, key[0]), (OUTPUT, key[1])) for tensor in group]
    for direction, name, datatype, shape in tensors:
        if type(name) is not str or not 0 < len(name) <= TENSOR_NAME_LIMIT or not name.isprintable():
            raise MalformedCapture(f"tensor name {str(name)[:50]!r} is empty, too long or not printable")
        if datatype not in DATATYPES:
            raise MalformedCapture(f"tensor {name!r}: unknown datatype {str(datatype)[:20]!r}")
        if not shape or not all(type(extent) is int and extent >= 0 for extent in shape):
            raise MalformedCapture(f"tensor {name!r}: shape {list(shape)} is not a list of sizes")
        if rows >= 0 and shape[0] != rows:
            raise MalformedCapture(
                f"tensor {name!r}: shape {list(shape)} does not start with the request's {rows} rows"
            )
        rows = shape[0]
        width = math.prod(shape[1:])
        if len(shape) == 1:
            form = ONE_COLUMN
        elif len(shape) == 2 and 1 <= shape[1] <= MAX_SPLIT_FEATURES:
            form = shape[1]
        else:
            form = LIST_COLUMN
        dtype = DATATYPES[datatype][0]
        layout.append((direction, name, datatype, form))
        sizes.append(rows * width * (1 if dtype is None else dtype.itemsize))
        widths.append(width)
        is_text.append(dtype is None)
    if len({(direction, name) for direction, name, _, _ in layout}) != len(layout):
        raise MalformedCapture("two inputs, or two outputs, share a name")
    return _Structure(tuple(layout), max(rows, 0), tuple(sizes), tuple(widths), tuple(is_text), sum(sizes))


@dataclass
class _Group:
    """Requests of one partition and one tensor layout, as lists waiting to become columns."""

    request_ids: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    values: list[list[Any]] = field(default_factory=list)
    """Per tensor: each request's raw bytes, or list of strings for BYTES."""
    structures: list[_Structure] = field(default_factory=list)
    """Each request's structure: its values per row, which list columns need."""
    sequences: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class PartitionKey:
    endpoint: str
    deployment: str
    model_version: str
    hour: int
    """Start of the hour (Unix seconds, UTC)."""


@dataclass
class CapturedTable:
    """One flush's worth of rows of one partition and layout: what one Parquet file holds."""

    partition: PartitionKey
    table: pa.Table
    sequences: list[int]
    first_time: float
    last_time: float


@dataclass
class Added:
    rows: int
    malformed_records: int
    first_error: str = ""


# (endpoint, deployment, model version, hour, layout): plain tuples hash faster than dataclasses.
_GroupKey = tuple[str, str, str, int, Layout]


class CaptureBuffer:
    """Decoded requests waiting for a flush, grouped by partition and tensor layout."""

    def __init__(self) -> None:
        self._groups: dict[_GroupKey, _Group] = {}
        self.rows = 0
        self.bytes = 0
        self.sequences: list[int] = []
        """Stream sequences of the messages that contributed rows."""

    def add(self, endpoint: str, deployment: str, sequence: int, payload: bytes) -> Added:
        """Decode one capture message. Raises MalformedCapture when the message as a whole is not
        capture JSON; a request that cannot be decoded is left out and counted instead."""
        try:
            records = json.loads(payload)["rows"]
        except (ValueError, TypeError, KeyError) as error:
            raise MalformedCapture(f"not a capture message: {error}") from None
        if not isinstance(records, list):
            raise MalformedCapture("not a capture message: `rows` is not a list")
        added = Added(0, 0)
        group: _Group | None = None
        group_version, group_hour, group_structure = "", -1, None
        for record in records:
            try:
                request_id, version, moment, structure, values = _decode_record(record)
            except (MalformedCapture, KeyError, TypeError, ValueError, AttributeError, binascii.Error) as error:
                added.malformed_records += 1
                added.first_error = added.first_error or f"{type(error).__name__}: {error}"
                continue
            if not structure.rows:
                continue  # no tensors, or no rows: nothing to keep
            hour = int(moment // HOUR) * HOUR
            # Requests of one message nearly always share their group: look it up only when not.
            if group is None or structure is not group_structure or hour != group_hour or version != group_version:
                group_version, group_hour, group_structure = version, hour, structure
                group = self._group((endpoint, deployment, version, hour, structure.layout))
                group.sequences.add(sequence)
            group.request_ids.append(request_id)
            group.times.append(moment)
            group.counts.append(structure.rows)
            group.offsets.append(record.get("offset", 0))
            group.structures.append(structure)
            for slot, value in enumerate(values):
                group.values[slot].append(value)
            added.rows += structure.rows
            self.bytes += structure.bytes
        if added.rows:
            self.rows += added.rows
            self.sequences.append(sequence)
        return added

    def _group(self, key: _GroupKey) -> _Group:
        group = self._groups.get(key)
        if group is None:
            slots = range(len(key[4]))
            group = self._groups[key] = _Group(values=[[] for _ in slots])
        return group

    def tables(self) -> list[CapturedTable]:
        """Every group as an Arrow table, in the column layout of the module docstring."""
        return [
            _table(PartitionKey(*key[:4]), key[4], group)  # type: ignore[arg-type]
            for key, group in self._groups.items()
        ]


_structures: dict[Any, _Structure] = {}


def _decode_record(record: dict[str, Any]) -> tuple[str, str, float, _Structure, list[Any]]:
    """One captured request checked: (id, version, time, its structure, each tensor's bytes or strings).

    The hot path of ingest, once per request: what requests with the same tensors share is
    checked once (_structure) and each request then costs a few lookups.
    """
    request_id, version, moment = record["id"], record["version"], record["time"]
    offset = record.get("offset", 0)
    if type(request_id) is not str or type(version) is not str or not _valid_version(version):
        raise MalformedCapture("id and version must be strings, the version a folder name")
    if type(moment) not in (float, int) or not EARLIEST_TIME <= moment <= LATEST_TIME:
        raise MalformedCapture(f"time {moment!r} is not seconds since the epoch between 2000 and 2200")
    if type(offset) is not int or offset < 0:
        raise MalformedCapture(f"offset {offset!r} is not a row index")
    inputs, outputs = record["inputs"], record["outputs"]
    key = (
        tuple([(tensor["name"], tensor["datatype"], tuple(tensor["shape"])) for tensor in inputs]),
        tuple([(tensor["name"], tensor["datatype"], tuple(tensor["shape"])) for tensor in outputs]),
    )
    structure = _structures.get(key)
    if structure is None:
        structure = _structure(key)
        if len(_structures) >= MAX_STRUCTURES:
            _structures.clear()
        _structures[key] = structure
    values = []
    for tensor, size, is_text in zip([*inputs, *outputs], structure.sizes, structure.is_text, strict=True):
        if is_text:
            value = tensor["data"]
            if type(value) is not list or len(value) != size or not all(type(item) is str for item in value):
                raise MalformedCapture(f"tensor {tensor['name']!r}: `data` does not hold {size} strings")
        else:
            value = binascii.a2b_base64(tensor["raw"])
            if len(value) != size:
                raise MalformedCapture(f"tensor {tensor['name']!r}: {len(value)} bytes, not {size}")
        values.append(value)
    return request_id, version, moment, structure, values


def _table(partition: PartitionKey, layout: Layout, group: _Group) -> CapturedTable:
    counts = np.asarray(group.counts, dtype=np.int64)
    total = int(counts.sum())
    times = np.asarray(group.times, dtype=np.float64)
    microseconds = np.round(times * 1e6).astype(np.int64)
    offsets = np.asarray(group.offsets, dtype=np.int64)
    request_ids = pa.array(group.request_ids, pa.string())
    if total == len(counts):  # one row per request: nothing to repeat
        rows = offsets
    else:
        owner = np.repeat(np.arange(len(counts)), counts)
        request_ids = request_ids.take(pa.array(owner))
        microseconds = microseconds[owner]
        starts = np.cumsum(counts) - counts
        rows = np.arange(total) - starts[owner] + offsets[owner]
    arrays = [request_ids, pa.array(microseconds, TIME_TYPE), pa.array(rows.astype(np.int32))]
    names = list(FIXED_COLUMNS)
    for slot, ((_, _, datatype, form), columns, values) in enumerate(
        zip(layout, column_names(layout), group.values, strict=True)
    ):
        widths = [structure.widths[slot] for structure in group.structures] if form == LIST_COLUMN else []
        arrays.extend(_tensor_columns(datatype, form, values, widths, counts, total))
        names.extend(columns)
    return CapturedTable(
        partition=partition,
        table=pa.Table.from_arrays(arrays, names=names),
        sequences=sorted(group.sequences),
        first_time=float(times.min()),
        last_time=float(times.max()),
    )


def _tensor_columns(
    datatype: str, form: int, values: list[Any], widths: list[int], counts: np.ndarray, total: int
) -> list[pa.Array]:
    """One tensor's columns over every request of a group."""
    dtype, arrow_type = DATATYPES[datatype]
    if dtype is None:
        flat: pa.Array = pa.array(list(itertools.chain.from_iterable(values)), pa.string())
    else:
        numbers = np.frombuffer(b"".join(values), dtype=dtype)
        if datatype == "FP16":
            numbers = numbers.astype(np.float32)
        flat = pa.array(numbers, arrow_type)
    if form == ONE_COLUMN:
        return [flat]
    if form > 0:
        if dtype is None:
            return [flat.take(pa.array(np.arange(index, total * form, form))) for index in range(form)]
        # Column-major copy once, so each column is a contiguous slice Arrow takes without copying.
        by_column = np.ascontiguousarray(numbers.reshape(total, form).T)
        return [pa.array(by_column[index], arrow_type) for index in range(form)]
    row_widths = np.repeat(np.asarray(widths, dtype=np.int64), counts)
    ends = np.concatenate(([0], np.cumsum(row_widths)))
    if ends[-1] < 2**31:
        return [pa.ListArray.from_arrays(pa.array(ends.astype(np.int32)), flat)]
    return [pa.LargeListArray.from_arrays(pa.array(ends), flat)]


def sequence_ranges(sequences: Iterable[int]) -> list[list[int]]:
    """Sorted sequences as [[first, last], ...] of consecutive runs."""
    ranges: list[list[int]] = []
    for sequence in sorted(set(sequences)):
        if ranges and sequence == ranges[-1][1] + 1:
            ranges[-1][1] = sequence
        else:
            ranges.append([sequence, sequence])
    return ranges

"""Captured requests decoded into columns: the runtime's capture messages in, Arrow tables out.

A capture message (subject `mlmesh.capture.<endpoint>.<deployment>`) is a header line of JSON,
`{"records": [...]}`, then a binary body (services.common.capture). A record holds consecutive
requests of one model version with the same tensors, stacked along their first dimension:
`{"model", "version", "ids", "counts", "bytes", "inputs", "outputs"}`, where `ids` and `counts`
(each request's rows) have one entry per request and `bytes` is the length of the record's part
of the body, which follows the previous record's: the requests' times (little-endian float64
seconds), then each tensor's raw bytes (little-endian, row-major), inputs first. A tensor is
`{"name", "datatype", "shape"}`; a BYTES tensor carries `data`, a list of strings, in the header
instead. A request split over several messages is a record of its own in each, with `offset`
(its piece's first row). A record that cannot be decoded is left out whole and counted.

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

from services.common import capture

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
    bytes: int = field(init=False)
    """Bytes of a record's tensors (strings counted one byte each): what the buffer holds."""
    raw_bytes: int = field(init=False)
    """Bytes of a record's tensors in the message's body (all but BYTES tensors)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "bytes", sum(self.sizes))
        raw = sum(size for size, text in zip(self.sizes, self.is_text, strict=True) if not text)
        object.__setattr__(self, "raw_bytes", raw)

    def of_rows(self, rows: int) -> _Structure:
        """The same tensors with `rows` rows instead."""
        sizes = tuple(size // self.rows * rows for size in self.sizes)
        return _Structure(self.layout, rows, sizes, self.widths, self.is_text)


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
    return _Structure(tuple(layout), max(rows, 0), tuple(sizes), tuple(widths), tuple(is_text))


@dataclass
class _Group:
    """Records of one partition and one tensor layout, as chunks waiting to become columns."""

    request_ids: list[str] = field(default_factory=list)
    times: list[np.ndarray] = field(default_factory=list)
    counts: list[np.ndarray] = field(default_factory=list)
    """Per record: each request's rows."""
    offsets: list[int] = field(default_factory=list)
    """Per record: the first row of a piece of a split request (0 otherwise)."""
    values: list[list[Any]] = field(default_factory=list)
    """Per tensor: each record's raw bytes, or list of strings for BYTES."""
    structures: list[_Structure] = field(default_factory=list)
    """Each record's structure: its rows and values per row, which list columns need."""
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


@dataclass
class _Record:
    """One decoded record: requests of one model version stacked, with their tensors' values."""

    version: str
    request_ids: list[str]
    times: np.ndarray
    hour: int | None
    """The hour (Unix seconds, UTC) of every time, or None when they fall in different hours."""
    counts: np.ndarray
    offset: int
    structure: _Structure
    values: list[Any]


# (endpoint, deployment, model version, hour, layout): plain tuples hash faster than dataclasses.
_GroupKey = tuple[str, str, str, int, Layout]


class CaptureBuffer:
    """Decoded records waiting for a flush, grouped by partition and tensor layout."""

    def __init__(self) -> None:
        self._groups: dict[_GroupKey, _Group] = {}
        self.rows = 0
        self.bytes = 0
        self.sequences: list[int] = []
        """Stream sequences of the messages that contributed rows."""

    def add(self, endpoint: str, deployment: str, sequence: int, payload: bytes) -> Added:
        """Decode one capture message. Raises MalformedCapture when the message as a whole cannot
        be read; a record that cannot be decoded is left out and counted instead."""
        try:
            header, body = capture.split(payload)
            records = json.loads(header)["records"]
        except (ValueError, TypeError, KeyError) as error:
            raise MalformedCapture(f"not a capture message: {error}") from None
        if not isinstance(records, list):
            raise MalformedCapture("not a capture message: `records` is not a list")
        # Each record's part of the body, by the lengths the records declare.
        # Something that is not a record has no part: it is counted as a malformed record below.
        lengths = [record.get("bytes") if type(record) is dict else 0 for record in records]
        if not set(map(type, lengths)) <= {int} or min(lengths, default=0) < 0 or sum(lengths) != len(body):
            raise MalformedCapture(
                f"not a capture message: the records' `bytes` do not add up to the body's {len(body)} bytes"
            )
        ends = list(itertools.accumulate(lengths))
        added = Added(0, 0)
        for raw, end, length in zip(records, ends, lengths, strict=True):
            try:
                record = _decode_record(raw, body[end - length : end])
            except (MalformedCapture, KeyError, TypeError, ValueError, AttributeError) as error:
                added.malformed_records += 1
                added.first_error = added.first_error or f"{type(error).__name__}: {error}"
                continue
            if not record.structure.rows:
                continue  # no tensors, or no rows: nothing to keep
            for hour, part in _by_hour(record):
                group = self._group((endpoint, deployment, part.version, hour, part.structure.layout))
                group.sequences.add(sequence)
                group.request_ids += part.request_ids
                group.times.append(part.times)
                group.counts.append(part.counts)
                group.offsets.append(part.offset)
                group.structures.append(part.structure)
                for slot, value in enumerate(part.values):
                    group.values[slot].append(value)
            added.rows += record.structure.rows
            self.bytes += record.structure.bytes
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


def _decode_record(record: dict[str, Any], body: memoryview) -> _Record:
    """One record checked: its requests' ids, times and rows, and each tensor's bytes (views into
    the record's part of the body) or strings.

    The hot path of ingest, once per record: what records with the same tensors share is checked
    once (_structure); each request then costs its share of a few list and array operations.
    """
    version, request_ids, counts = record["version"], record["ids"], record["counts"]
    offset = record.get("offset", 0)
    if type(version) is not str or not _valid_version(version):
        raise MalformedCapture("the version must be a string that can name a folder")
    if type(request_ids) is not list or not request_ids or not set(map(type, request_ids)) <= {str}:
        raise MalformedCapture("ids must be a list of strings, one per request")
    if type(counts) is not list or not set(map(type, counts)) <= {int} or len(counts) != len(request_ids):
        raise MalformedCapture("counts must be a list of row counts, one per request")
    if type(offset) is not int or offset < 0 or (offset and len(request_ids) != 1):
        raise MalformedCapture(f"offset {offset!r} is not the first row of a single request's piece")
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
    # Python's ints do not wrap around: counts of at least 0 that add up to the rows are each at most that.
    if min(counts) < 0 or sum(counts) != structure.rows:
        raise MalformedCapture(f"counts {counts[:10]} do not add up to the tensors' {structure.rows} rows")
    expected = 8 * len(request_ids) + structure.raw_bytes
    if len(body) != expected:
        raise MalformedCapture(f"the record has {len(body)} bytes of body, its requests and tensors need {expected}")
    times = np.frombuffer(body[: 8 * len(request_ids)], dtype="<f8")
    first, last = float(times.min()), float(times.max())
    if not (first >= EARLIEST_TIME and last <= LATEST_TIME):
        raise MalformedCapture("times must be seconds since the epoch between 2000 and 2200")
    values: list[Any] = []
    start = 8 * len(request_ids)
    for tensor, size, is_text in zip([*inputs, *outputs], structure.sizes, structure.is_text, strict=True):
        if is_text:
            value = tensor["data"]
            if type(value) is not list or len(value) != size or not set(map(type, value)) <= {str}:
                raise MalformedCapture(f"tensor {tensor['name']!r}: `data` does not hold {size} strings")
            values.append(value)
        else:
            values.append(body[start : start + size])
            start += size
    first_hour, last_hour = int(first // HOUR) * HOUR, int(last // HOUR) * HOUR
    return _Record(
        version,
        request_ids,
        times,
        first_hour if first_hour == last_hour else None,
        np.asarray(counts, dtype=np.int64),
        offset,
        structure,
        values,
    )


def _by_hour(record: _Record) -> list[tuple[int, _Record]]:
    """The record's requests by the hour of their time: nearly always one part, the record itself."""
    if record.hour is not None:
        return [(record.hour, record)]
    hours = (record.times // HOUR).astype(np.int64) * HOUR
    structure = record.structure
    starts = np.cumsum(record.counts) - record.counts
    parts = []
    for hour in np.unique(hours):
        chosen = np.flatnonzero(hours == hour)
        counts = record.counts[chosen]
        rows = np.concatenate(
            [np.arange(start, start + count) for start, count in zip(starts[chosen], counts, strict=True)]
        )
        values = []
        for value, size, width in zip(record.values, structure.sizes, structure.widths, strict=True):
            if isinstance(value, list):
                values.append([value[row * width + index] for row in rows for index in range(width)])
            else:
                per_row = size // structure.rows
                values.append(np.frombuffer(value, np.uint8).reshape(structure.rows, per_row)[rows].data)
        part_structure = structure.of_rows(int(counts.sum()))
        parts.append(
            (
                int(hour),
                _Record(
                    record.version,
                    [record.request_ids[index] for index in chosen],
                    record.times[chosen],
                    int(hour),
                    counts,
                    record.offset,
                    part_structure,
                    values,
                ),
            )
        )
    return parts


def _table(partition: PartitionKey, layout: Layout, group: _Group) -> CapturedTable:
    counts = np.concatenate(group.counts)
    total = int(counts.sum())
    times = np.concatenate(group.times)
    microseconds = np.round(times * 1e6).astype(np.int64)
    offsets = np.repeat(np.asarray(group.offsets, dtype=np.int64), [len(chunk) for chunk in group.counts])
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
    record_rows = [structure.rows for structure in group.structures]
    for slot, ((_, _, datatype, form), columns, values) in enumerate(
        zip(layout, column_names(layout), group.values, strict=True)
    ):
        widths = (
            np.repeat([structure.widths[slot] for structure in group.structures], record_rows)
            if form == LIST_COLUMN
            else None
        )
        arrays.extend(_tensor_columns(datatype, form, values, widths, total))
        names.extend(columns)
    return CapturedTable(
        partition=partition,
        table=pa.Table.from_arrays(arrays, names=names),
        sequences=sorted(group.sequences),
        first_time=float(times.min()),
        last_time=float(times.max()),
    )


def _tensor_columns(
    datatype: str, form: int, values: list[Any], row_widths: np.ndarray | None, total: int
) -> list[pa.Array]:
    """One tensor's columns over every record of a group."""
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
    assert row_widths is not None
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

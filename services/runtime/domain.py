"""What the runtime does: hold loaded ONNX models, check tensors against their signatures, run them.

Tensors arrive and leave as numpy arrays; the servicer turns Open Inference Protocol messages
into `Tensor`s and back, and nothing here knows about gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import struct
import time
from collections import deque
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from services.common import capture
from services.common.errors import InvalidArgument, MlmeshError, NotFound, ResourceExhausted

PLATFORM = "onnx_onnxv1"
INLINE_SECONDS = 0.0002
"""An inference expected to take at most this long runs on the event loop: handing it to a
thread and back costs about as much (two thread wake-ups and the GIL handed over twice)."""


@functools.cache
def server_version() -> str:
    """mlmesh's version, as the runtime reports it in server metadata."""
    try:
        return package_metadata.version("mlmesh")
    except package_metadata.PackageNotFoundError:
        return "0+unknown"


# OIP datatype -> numpy dtype (little-endian, as raw contents are). BYTES elements are Python bytes.
DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}

# numpy dtype -> OIP datatype, for outputs (BYTES are told apart by kind).
_DATATYPE_OF = {dtype: datatype for datatype, dtype in DTYPES.items() if datatype != "BYTES"}

# onnxruntime's type strings -> OIP datatypes.
ONNX_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    array: np.ndarray


@dataclass
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]
    """-1 marks a dimension of any size."""


@dataclass
class Signature:
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


# ---------------------------------------------------------------- decoding tensors


def check_shape(name: str, shape: Sequence[int], max_elements: int) -> tuple[int, ...]:
    """The shape as a tuple, refusing negative dimensions and more elements than allowed."""
    if any(dimension < 0 for dimension in shape):
        raise InvalidArgument(f"input {name!r}: shape {list(shape)} has a negative dimension", field="inputs.shape")
    count = math.prod(shape)
    if count > max_elements:
        raise ResourceExhausted(
            f"input {name!r}: shape {list(shape)} holds {count} elements; at most {max_elements} are accepted "
            "(MLMESH_RUNTIME_MAX_ELEMENTS)"
        )
    return tuple(shape)


def tensor_from_values(name: str, datatype: str, shape: Sequence[int], values: Any, max_elements: int) -> Tensor:
    """A tensor from typed contents (any sequence of elements, flattened row-major)."""
    dtype = _dtype(name, datatype)
    dims = check_shape(name, shape, max_elements)
    if datatype in ("FP16", "BF16"):
        raise InvalidArgument(f"input {name!r}: {datatype} travels only as raw contents", field="inputs.contents")
    count = math.prod(dims)
    if len(values) != count:
        raise InvalidArgument(
            f"input {name!r}: shape {list(dims)} needs {count} elements but the contents hold {len(values)}",
            field="inputs.contents",
        )
    if datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
    else:
        array = np.asarray(values, dtype=dtype)
    return Tensor(name, datatype, dims, array.reshape(dims))


def tensor_from_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes, max_elements: int) -> Tensor:
    """A tensor from raw contents: elements row-major, little-endian; BYTES length-prefixed."""
    dtype = _dtype(name, datatype)
    dims = check_shape(name, shape, max_elements)
    count = math.prod(dims)
    if datatype == "BYTES":
        elements = _split_bytes(name, raw, count)
        array = np.empty(count, dtype=object)
        array[:] = elements
        return Tensor(name, datatype, dims, array.reshape(dims))
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise InvalidArgument(
            f"input {name!r}: {datatype} shape {list(dims)} needs {expected} raw bytes but {len(raw)} arrived",
            field="raw_input_contents",
        )
    return Tensor(name, datatype, dims, np.frombuffer(raw, dtype=dtype).reshape(dims))


def _split_bytes(name: str, raw: bytes, count: int) -> list[bytes]:
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidArgument(f"input {name!r}: raw BYTES end inside a length prefix", field="raw_input_contents")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidArgument(f"input {name!r}: raw BYTES element runs past the end", field="raw_input_contents")
        elements.append(bytes(raw[offset : offset + length]))
        offset += length
    if len(elements) != count:
        raise InvalidArgument(
            f"input {name!r}: the shape needs {count} BYTES elements but the raw contents hold {len(elements)}",
            field="raw_input_contents",
        )
    return elements


def _dtype(name: str, datatype: str) -> np.dtype[Any]:
    dtype = DTYPES.get(datatype)
    if dtype is None:
        known = ", ".join(DTYPES)
        raise InvalidArgument(f"input {name!r}: datatype {datatype[:40]!r} is not one of {known}", field="datatype")
    return dtype


# ---------------------------------------------------------------- encoding tensors


def raw_bytes(tensor: Tensor) -> bytes:
    """Raw contents of a tensor (BYTES elements length-prefixed)."""
    if tensor.datatype != "BYTES":
        return np.ascontiguousarray(tensor.array, dtype=DTYPES[tensor.datatype]).tobytes()
    parts = []
    for element in tensor.array.reshape(-1):
        data = element if isinstance(element, bytes) else str(element).encode()
        parts += [struct.pack("<I", len(data)), data]
    return b"".join(parts)


def output_tensor(name: str, array: np.ndarray) -> Tensor:
    """An output of onnxruntime as a tensor with its OIP datatype."""
    if array.dtype == object or array.dtype.kind in "US":
        return Tensor(name, "BYTES", tuple(array.shape), array.astype(object))
    datatype = _DATATYPE_OF.get(array.dtype)
    if datatype is not None:
        return Tensor(name, datatype, tuple(array.shape), array)
    raise InvalidArgument(f"output {name!r} has numpy type {array.dtype}, which the protocol cannot carry")


# ---------------------------------------------------------------- models


@dataclass
class LoadedModel:
    """One model version in an onnxruntime session."""

    name: str
    version: str
    signature: Signature
    session: Any
    onnx_outputs: list[str] = field(default_factory=list)
    batcher: Batcher | None = None
    seconds_per_element: float = 0.0
    """How long onnxruntime took per input element, a moving average over the calls so far (0: none yet)."""

    def check(self, tensors: Iterable[Tensor]) -> dict[str, Tensor]:
        """The inputs by name, each matching the signature; otherwise INVALID_ARGUMENT saying what was expected."""
        expected = {spec.name: spec for spec in self.signature.inputs}
        given: dict[str, Tensor] = {}
        for tensor in tensors:
            spec = expected.get(tensor.name)
            if spec is None:
                raise InvalidArgument(
                    f"model {self.name} has no input {tensor.name[:100]!r}; its inputs are {', '.join(expected)}",
                    field="inputs.name",
                )
            if tensor.name in given:
                raise InvalidArgument(f"input {tensor.name!r} is given twice", field="inputs.name")
            if tensor.datatype != spec.datatype:
                raise InvalidArgument(
                    f"input {tensor.name!r} must be {spec.datatype}, not {tensor.datatype}", field="inputs.datatype"
                )
            if len(tensor.shape) != len(spec.shape) or any(
                want not in (-1, got) for want, got in zip(spec.shape, tensor.shape, strict=True)
            ):
                raise InvalidArgument(
                    f"input {tensor.name!r} has shape {list(tensor.shape)}; the model takes {list(spec.shape)} "
                    "(-1: any size)",
                    field="inputs.shape",
                )
            given[tensor.name] = tensor
        missing = [name for name in expected if name not in given]
        if missing:
            raise InvalidArgument(f"inputs {', '.join(missing)} are missing", field="inputs")
        return given

    def infer(self, inputs: dict[str, Tensor], requested: Sequence[str] = (), elements: int = 0) -> list[Tensor]:
        """Run the model on checked inputs; `requested` names outputs (empty: every tensor output).
        `elements`: the inputs' element count, when the caller has it already."""
        names = list(requested) or self.onnx_outputs
        unknown = [name for name in names if name not in self.onnx_outputs]
        if unknown:
            raise InvalidArgument(
                f"model {self.name} has no output {unknown[0][:100]!r}; its outputs are {', '.join(self.onnx_outputs)}",
                field="outputs.name",
            )
        feeds = {name: _feed(tensor) for name, tensor in inputs.items()}
        started = time.perf_counter()
        try:
            results = self.session.run(names, feeds)
        except Exception as error:  # onnxruntime refuses values the signature could not rule out
            raise InvalidArgument(f"model {self.name} could not run on these inputs: {error}") from error
        per_element = (time.perf_counter() - started) / max(1, elements or _elements(inputs))
        known = self.seconds_per_element
        self.seconds_per_element = 0.8 * known + 0.2 * per_element if known else per_element
        return [output_tensor(name, np.asarray(result)) for name, result in zip(names, results, strict=True)]

    def is_quick(self, elements: int) -> bool:
        """Whether inference on inputs of `elements` elements should take at most INLINE_SECONDS,
        by the calls so far."""
        return 0 < self.seconds_per_element * elements <= INLINE_SECONDS


def _elements(inputs: dict[str, Tensor]) -> int:
    return sum(tensor.array.size for tensor in inputs.values())


async def run(model: LoadedModel, inputs: dict[str, Tensor], requested: Sequence[str] = ()) -> list[Tensor]:
    """Infer through the model's batcher if it has one; else on the event loop when the model
    has been quick for inputs of this size, off it otherwise (onnxruntime releases the GIL)."""
    if model.batcher is not None:
        return await model.batcher.infer(inputs, requested)
    elements = _elements(inputs)
    if model.is_quick(elements):
        return model.infer(inputs, requested, elements)
    return await asyncio.to_thread(model.infer, inputs, requested, elements)


@dataclass
class _Waiting:
    """A request waiting in a batcher."""

    key: tuple[Any, ...]
    """What must match to share a call: requested outputs, and each input's name, type and other dimensions."""
    inputs: dict[str, Tensor]
    requested: tuple[str, ...]
    rows: int
    answer: asyncio.Future[list[Tensor]]


class Batcher:
    """Adaptive batching: requests that reach one model within `max_wait_seconds` of each other
    are run as one onnxruntime call of at most `max_rows` rows, stacked on the first axis, and the
    answers are split back. Only for models whose every input has a variable first dimension;
    requests are merged only with others of the same outputs and the same other dimensions."""

    def __init__(self, model: LoadedModel, max_rows: int, max_wait_seconds: float) -> None:
        self.model = model
        self.max_rows = max_rows
        self.max_wait_seconds = max_wait_seconds
        self.calls = 0
        """onnxruntime calls made so far (merged ones count once)."""
        self._pending: list[_Waiting] = []
        self._pending_rows = 0
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None

    @staticmethod
    def suits(model: LoadedModel) -> bool:
        return all(spec.shape and spec.shape[0] == -1 for spec in model.signature.inputs)

    async def infer(self, inputs: dict[str, Tensor], requested: Sequence[str]) -> list[Tensor]:
        rows = {tensor.shape[0] for tensor in inputs.values()}
        if len(rows) != 1 or next(iter(rows)) > self.max_rows:
            self.calls += 1
            return await asyncio.to_thread(self.model.infer, inputs, requested)
        key = (tuple(requested), tuple(sorted((n, t.datatype, t.shape[1:]) for n, t in inputs.items())))
        waiting = _Waiting(key, inputs, tuple(requested), rows.pop(), asyncio.get_running_loop().create_future())
        self._pending.append(waiting)
        self._pending_rows += waiting.rows
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._run_batches())
        return await waiting.answer

    async def _run_batches(self) -> None:
        while True:
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = time.monotonic() + self.max_wait_seconds
            while self._pending_rows < self.max_rows:
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), max(0.0, deadline - time.monotonic()))
                if time.monotonic() >= deadline:
                    break
            batch, rows = self._take()
            await self._run(batch, rows)

    def _take(self) -> tuple[list[_Waiting], int]:
        """The oldest request and those after it with the same key, up to max_rows rows."""
        key = self._pending[0].key
        batch, rest, rows = [], [], 0
        for waiting in self._pending:
            if waiting.key == key and rows + waiting.rows <= self.max_rows:
                batch.append(waiting)
                rows += waiting.rows
            else:
                rest.append(waiting)
        self._pending = rest
        self._pending_rows -= rows
        return batch, rows

    async def _run(self, batch: list[_Waiting], rows: int) -> None:
        requested = batch[0].requested
        if len(batch) == 1:
            merged = batch[0].inputs
        else:
            merged = {
                name: Tensor(
                    name,
                    tensor.datatype,
                    (rows, *tensor.shape[1:]),
                    np.concatenate([waiting.inputs[name].array for waiting in batch]),
                )
                for name, tensor in batch[0].inputs.items()
            }
        self.calls += 1
        try:
            outputs = await asyncio.to_thread(self.model.infer, merged, requested)
            if len(batch) > 1 and any(not o.shape or o.shape[0] != rows for o in outputs):
                raise ValueError("an output does not have one row per input row")
        except Exception as error:
            if len(batch) == 1:
                _settle(batch[0].answer, error=error)
                return
            for waiting in batch:  # run them one by one, so that each gets its own answer or error
                self.calls += 1
                try:
                    _settle(waiting.answer, await asyncio.to_thread(self.model.infer, waiting.inputs, requested))
                except Exception as own:
                    _settle(waiting.answer, error=own)
            return
        start = 0
        for waiting in batch:
            end = start + waiting.rows
            _settle(
                waiting.answer,
                [Tensor(o.name, o.datatype, (waiting.rows, *o.shape[1:]), o.array[start:end]) for o in outputs],
            )
            start = end


def _settle(future: asyncio.Future[Any], result: Any = None, *, error: BaseException | None = None) -> None:
    if future.done():  # the caller went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _feed(tensor: Tensor) -> np.ndarray:
    if tensor.datatype == "BYTES":  # onnxruntime takes strings for tensor(string)
        return np.vectorize(lambda item: item.decode(errors="replace"), otypes=[object])(tensor.array)
    return tensor.array


def load_model(
    name: str, version: str, path: Path, signature: Signature | None, threads: tuple[int, int]
) -> LoadedModel:
    """An onnxruntime session for the ONNX file at `path`; the signature defaults to the graph's."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = Signature(
        inputs=[_spec(node) for node in session.get_inputs()],
        outputs=[_spec(node) for node in session.get_outputs() if node.type in ONNX_TYPES],
    )
    tensor_outputs = [spec.name for spec in graph.outputs]
    chosen = signature if signature and signature.inputs else graph
    return LoadedModel(name, version, chosen, session, tensor_outputs)


def _spec(node: Any) -> TensorSpec:
    shape = tuple(dimension if isinstance(dimension, int) and dimension >= 0 else -1 for dimension in node.shape)
    return TensorSpec(node.name, ONNX_TYPES.get(node.type, node.type), shape)


class ModelStore:
    """The models this runtime serves, by name and version."""

    def __init__(self) -> None:
        self._models: dict[str, dict[str, LoadedModel]] = {}
        self._versions: dict[str, list[str]] = {}
        """Each name's versions, oldest first, kept sorted as models are added (read on every request)."""

    def add(self, model: LoadedModel) -> None:
        versions = self._models.setdefault(model.name, {})
        versions[model.version] = model
        self._versions[model.name] = sorted(versions, key=_version_order)

    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> list[str]:
        """The versions of `name` served, oldest first (do not change the list)."""
        return self._versions.get(name, [])

    def serves(self, name: str, version: str = "") -> bool:
        """Whether `name` (at `version`, when given) is served here."""
        versions = self._models.get(name)
        return versions is not None and (not version or version in versions)

    def get(self, name: str, version: str = "") -> LoadedModel:
        """The model `name` at `version`; an empty version picks the newest served."""
        versions = self._models.get(name)
        if not versions:
            served = ", ".join(self.names()) or "none"
            raise NotFound(f"model {name[:200]!r} is not served here (served: {served})", reason="MODEL_NOT_FOUND")
        if not version:
            return versions[self._versions[name][-1]]
        model = versions.get(version)
        if model is None:
            raise NotFound(
                f"model {name!r} has no version {version[:40]!r} here (served: {', '.join(self.versions(name))})",
                reason="VERSION_NOT_FOUND",
            )
        return model


def _version_order(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (1 << 62, version)


# ---------------------------------------------------------------- capture


class Captured:
    """One captured request: its tensors' names, datatypes and shapes (`layout`), and their arrays
    (inputs first). Few objects that the garbage collector follows (this one alone, in the end),
    since many wait in the queue at once: every tracked object that survives adds to each
    collection's work. Made on every answered request, so in one pass over the tensors."""

    __slots__ = ("arrays", "bytes", "id", "inputs_count", "layout", "model", "time", "version")

    def __init__(
        self, request_id: str, model: str, version: str, tensors: list[Tensor], inputs_count: int, at: float
    ) -> None:
        self.id, self.model, self.version, self.time = request_id, model, version, at
        self.inputs_count = inputs_count
        layout, arrays, size = [], [], 0
        for tensor in tensors:
            array = tensor.array
            layout.append((tensor.name, tensor.datatype, array.shape))
            arrays.append(array)
            size += array.nbytes
        self.layout: tuple[tuple[str, str, tuple[int, ...]], ...] = tuple(layout)
        self.arrays: tuple[np.ndarray, ...] = tuple(arrays)
        self.bytes: int = size

    def tensors(self, arrays: Sequence[np.ndarray] | None = None) -> list[Tensor]:
        """Its tensors, inputs first (with `arrays` in place of its own, when given)."""
        return [
            Tensor(name, datatype, array.shape, array)
            for (name, datatype, _), array in zip(self.layout, self.arrays if arrays is None else arrays, strict=True)
        ]


class CaptureQueue:
    """Requests and answers waiting to be sent to the capture stream. `offer` never waits and
    never fails: when the queue holds `capacity` requests or `capacity_bytes` of tensor data, the
    request is dropped and counted."""

    def __init__(self, capacity: int, batch_rows: int, metrics: Metrics, capacity_bytes: int = 256 * 1024**2) -> None:
        self.capacity = capacity
        self.capacity_bytes = capacity_bytes
        self.batch_rows = batch_rows
        self.metrics = metrics
        self._rows: deque[Captured] = deque()
        self._bytes = 0
        self._some = asyncio.Event()
        self._batch = asyncio.Event()

    def offer(self, model: LoadedModel, request_id: str, inputs: Collection[Tensor], outputs: Iterable[Tensor]) -> None:
        row = Captured(request_id, model.name, model.version, [*inputs, *outputs], len(inputs), time.time())
        if len(self._rows) >= self.capacity or self._bytes + row.bytes > self.capacity_bytes:
            self.metrics.capture_rows.labels("dropped").inc()
            return
        self._rows.append(row)
        self._bytes += row.bytes
        self._some.set()
        if len(self._rows) >= self.batch_rows:
            self._batch.set()

    async def next_batch(self, wait_seconds: float) -> list[Captured]:
        """Up to `batch_rows` rows, once there are that many or the first has waited `wait_seconds`."""
        await self._some.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._batch.wait(), wait_seconds)
        batch = [self._rows.popleft() for _ in range(min(self.batch_rows, len(self._rows)))]
        self._bytes -= sum([row.bytes for row in batch])
        if len(self._rows) < self.batch_rows:
            self._batch.clear()
        if not self._rows:
            self._some.clear()
        return batch

    def lost(self, rows: int) -> None:
        """Rows that could not be sent (NATS away, or too large for a message): dropped and counted."""
        self.metrics.capture_rows.labels("dropped").inc(rows)

    def sent(self, rows: int) -> None:
        self.metrics.capture_rows.labels("published").inc(rows)


@dataclass
class CaptureMessage:
    """One capture message laid out: its header and the parts of its body (views of the requests'
    arrays, not copies), below the size limit once framed; `requests` those it completes."""

    header: bytes
    body: list[Any]
    requests: int

    def payload(self) -> bytes:
        """The message framed for the capture stream (services.common.capture), its tensor bytes
        copied: framed one at a time as they are sent, only the message on its way is held whole
        (a batch of large requests is tens of MB)."""
        return capture.frame(self.header, self.body)


@dataclass
class CaptureMessages:
    """A batch of captured requests laid out for NATS, and `too_large`, the requests left out."""

    messages: list[CaptureMessage]
    too_large: int

    @property
    def requests(self) -> list[int]:
        """The requests that each message completes."""
        return [message.requests for message in self.messages]

    @property
    def payloads(self) -> list[bytes]:
        """Every message framed."""
        return [message.payload() for message in self.messages]


def capture_messages(rows: list[Captured], max_bytes: int) -> CaptureMessages:
    """Pack captured requests into messages of at most `max_bytes`, in the format of
    services.common.capture: a header line `{"records": [...]}`, then the binary body. A record
    holds consecutive requests of one model version whose tensors agree in name, datatype and
    shape, stacked along the first dimension (the format allows requests of different rows; the
    runtime stacks only alike ones, the single-row requests of online traffic above all):
    `{model, version, ids, counts, bytes, inputs, outputs}`, `counts` being each request's rows
    and `bytes` the length of the record's part of the body: its requests' times (little-endian
    float64 seconds), then the raw bytes (little-endian, row-major) of each tensor in order. A
    tensor is `{name, datatype, shape}`; a BYTES tensor carries `data`, a list of strings, in the
    header instead. A record too large for one message is cut between requests; a single request
    too large is split along its first dimension, each piece carrying `offset`, the index of its
    first row. A request that cannot be split small enough is left out (`too_large`)."""
    head, tail = b'{"records":[', b"]}"
    room = max_bytes - len(head) - len(tail) - len(capture.HEADER_END)
    messages = CaptureMessages([], 0)
    texts: list[str] = []
    body: list[Any] = []
    size = completed = 0

    def close() -> None:
        messages.messages.append(CaptureMessage(head + ",".join(texts).encode() + tail, body, completed))

    for run in _capture_runs(rows):
        records, left_out = _capture_records(run, room)
        messages.too_large += left_out
        for record in records:
            if texts and size + record.size + 1 > room:
                close()
                texts, body, size, completed = [], [], 0, 0
            texts.append(record.text)
            body += record.body
            size += record.size + 1
            completed += record.requests
    if texts:
        close()
    return messages


@dataclass
class _CaptureRecord:
    text: str
    body: list[Any]
    """bytes-like parts (bytes, and the arrays' memory as uint8 arrays)."""
    size: int
    """Bytes of the header text and the body together."""
    requests: int
    """The requests that this record completes (a piece of a split request but the last: none)."""


STACK_BELOW_BYTES = 64 * 1024
"""Requests with fewer tensor bytes are stacked into one record with those like them; a larger one
is a record of its own, its arrays copied only into the message (a record costs ~100 bytes)."""


def _capture_runs(rows: list[Captured]) -> list[list[Captured]]:
    """`rows` cut into runs of consecutive requests that stack into one record: same model
    version, same tensors of the same shapes, all with the same first dimension, each smaller
    than STACK_BELOW_BYTES. Any other request is a run of its own."""
    runs: list[list[Captured]] = []
    previous: Any = None
    stackable = False
    for row in rows:
        key = (row.model, row.version, row.inputs_count, row.layout)
        if key != previous:
            runs.append([])
            shapes = [shape for _, _, shape in row.layout]
            previous, stackable = key, _common_rows(shapes) is not None and row.bytes < STACK_BELOW_BYTES
        elif not stackable:
            runs.append([])
        runs[-1].append(row)
    return runs


def _common_rows(shapes: list[tuple[int, ...]]) -> int | None:
    """The first dimension that tensors of these shapes share, or None (none, or a scalar among them)."""
    firsts = {shape[0] if shape else -1 for shape in shapes}
    return firsts.pop() if len(firsts) == 1 and -1 not in firsts else None


def _capture_records(run: list[Captured], room: int) -> tuple[list[_CaptureRecord], int]:
    """A run of requests as records of at most `room` bytes each, and the number of requests left out."""
    inputs, outputs, counts = _stacked(run)
    record = _capture_record(run, inputs, outputs, counts)
    if record.size <= room:
        return [record], 0
    if len(run) > 1:
        step = max(1, len(run) * room // (2 * record.size))
        records: list[_CaptureRecord] = []
        left_out = 0
        for start in range(0, len(run), step):
            part, part_left_out = _capture_records(run[start : start + step], room)
            records += part
            left_out += part_left_out
        return records, left_out
    rows = _common_rows([tensor.array.shape for tensor in inputs + outputs])
    if rows is None or rows < 2:
        return [], 1
    step = max(1, rows * room // (2 * record.size))
    pieces = []
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        cut = [Tensor(t.name, t.datatype, (stop - start, *t.shape[1:]), t.array[start:stop]) for t in inputs + outputs]
        piece = _capture_record(run, cut[: len(inputs)], cut[len(inputs) :], [stop - start], offset=start)
        if piece.size > room:
            return [], 1
        piece.requests = int(stop == rows)
        pieces.append(piece)
    return pieces, 0


def _stacked(run: list[Captured]) -> tuple[list[Tensor], list[Tensor], list[int]]:
    """The tensors of a run's requests stacked along their first dimension, and each one's rows."""
    first = run[0]
    arrays = first.arrays
    # The requests of a run have the same shapes (_capture_runs): the same rows each.
    counts = [arrays[0].shape[0] if arrays and arrays[0].ndim else 0] * len(run)
    if len(run) > 1:
        arrays = tuple([np.concatenate(column) for column in zip(*[row.arrays for row in run], strict=True)])
    tensors = first.tensors(arrays)
    return tensors[: first.inputs_count], tensors[first.inputs_count :], counts


def _capture_record(
    run: list[Captured], inputs: list[Tensor], outputs: list[Tensor], counts: list[int], offset: int | None = None
) -> _CaptureRecord:
    first = run[0]
    body = [np.array([row.time for row in run], dtype="<f8").tobytes()]
    tensors_in = ",".join([_capture_tensor(tensor, body) for tensor in inputs])
    tensors_out = ",".join([_capture_tensor(tensor, body) for tensor in outputs])
    ids = _json_texts([row.id for row in run])
    text = f'{{"model":{_json_name(first.model)},"version":{_json_name(first.version)}'
    if offset is not None:
        text += f',"offset":{offset}'
    body_bytes = sum(len(part) for part in body)
    text += (
        f',"ids":[{ids}],"counts":[{",".join(map(str, counts))}],"bytes":{body_bytes},'
        f'"inputs":[{tensors_in}],"outputs":[{tensors_out}]}}'
    )
    return _CaptureRecord(text, body, len(text) + body_bytes, len(run))


def _json_texts(texts: list[str]) -> str:
    """`texts` as the items of a JSON list: quoted as they are when nothing in them needs escaping
    (ids usually), checked all at once; else by json.dumps, which costs a microsecond or more."""
    joined = '","'.join(texts)
    if joined.isascii() and joined.isprintable() and "\\" not in joined and joined.count('"') == 2 * (len(texts) - 1):
        return f'"{joined}"'
    return json.dumps(texts)[1:-1]


@functools.lru_cache(maxsize=4096)
def _json_name(text: str) -> str:
    """A JSON string for the few names that recur in every request (models, versions, tensors)."""
    return _json_texts([text])


def _capture_tensor(tensor: Tensor, body: list[Any]) -> str:
    """A tensor's header entry; its raw bytes go to `body` (BYTES travel in the header as strings)."""
    shape = ",".join(str(int(size)) for size in tensor.shape)
    head = f'{{"name":{_json_name(tensor.name)},"datatype":"{tensor.datatype}","shape":[{shape}]'
    if tensor.datatype == "BYTES":
        data = [
            element.decode(errors="replace") if isinstance(element, bytes) else str(element)
            for element in tensor.array.reshape(-1)
        ]
        return f'{head},"data":{json.dumps(data)}}}'
    array = tensor.array
    if array.dtype.byteorder == ">":  # the body is little-endian
        array = array.byteswap()
    # The array's own memory as bytes, row-major (copied only when it is not laid out so): the
    # message is the one copy made of it.
    body.append(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    return f"{head}}}"


# ---------------------------------------------------------------- metrics

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """Prometheus metrics of inference requests, by model, version, protocol and outcome. Labels
    name only what is served, so that callers cannot make up series."""

    def __init__(self, store: ModelStore) -> None:
        self.store = store
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mlmesh_runtime_requests",
            "Inference requests answered, by outcome (a gRPC status code name).",
            ["model", "version", "protocol", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "mlmesh_runtime_request_seconds",
            "Time from a request's arrival to its answer.",
            ["model", "version", "protocol"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.capture_rows = Counter(
            "mlmesh_runtime_capture_rows",
            "Captured requests, published to MLMESH_CAPTURE or dropped (queue full, NATS away).",
            ["outcome"],
            registry=self.registry,
        )
        self._series: dict[tuple[str, str, str, str], tuple[Any, Any]] = {}

    @contextmanager
    def observed(self, protocol: str, name: str, version: str) -> Iterator[None]:
        """Count and time the inference request in the block, whatever its outcome."""
        started = time.perf_counter()
        code = "OK"
        try:
            yield
        except MlmeshError as error:
            code = error.code
            raise
        except Exception:
            code = "INTERNAL"
            raise
        finally:
            model, served = ("unknown", "unknown")
            if self.store.serves(name):
                model = name
                served = "newest" if not version else (version if self.store.serves(name, version) else "unknown")
            key = (model, served, protocol, code)
            series = self._series.get(key)
            if series is None:  # labels() takes a lock and builds a key each time: keep the series
                series = self._series[key] = (self.requests.labels(*key), self.latency.labels(*key[:3]))
            series[0].inc()
            series[1].observe(time.perf_counter() - started)

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)

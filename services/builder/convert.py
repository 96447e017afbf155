"""Conversion of pickled scikit-learn, XGBoost and LightGBM models to ONNX, in an isolated worker.

A pickle runs code when it is loaded, so the builder never loads one itself. `convert_model` starts
`python -m services.builder.convert` as a worker in a session and process group of its own, with
CPU-time and memory limits, and kills the whole group when the wall-time limit passes. The worker
loads the model, converts it with skl2onnx (onnxmltools' converters for XGBoost and LightGBM),
optimises and maybe quantises it with onnxruntime, checks that the ONNX model predicts what the
native one does, times both, and writes its answer as JSON beside the model.

The worker's half of this module imports numpy, pandas and the converters inside its functions:
the limits must be in force, and the thread counts fixed, before those libraries load.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.common.convert import ONNX_TO_OIP
from services.common.errors import FailedPrecondition, InvalidArgument, MlmeshError, ResourceExhausted

if TYPE_CHECKING:
    import numpy as np
    import onnx
    import onnxruntime
    import pandas as pd

ONNX_FILE = "model.onnx"
RESULT_FILE = "result.json"
REQUEST_FILE = "request.json"
LOG_FILE = "worker.log"
SCRATCH_DIR = "work"
SAMPLE_SUFFIXES = (".csv", ".parquet", ".pq", ".json")
# Lines the worker writes to its log so that the builder can say what it was doing when it died.
STAGE_PREFIX = "mlmesh-convert stage: "
WORKER_PREFIX = "mlmesh-convert worker: "
LOG_TAIL_CHARS = 2000
LOG_SCAN_BYTES = 1 << 20
# Where `services` lives: the worker runs from there so that it imports this very code.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
# A worker that ignores SIGXCPU gets SIGKILL this much CPU time later.
CPU_HARD_GRACE_SECONDS = 5
PARITY_TOLERANCE = 1e-5
TIMING_ROWS = 1000
# Timing stops at whichever comes first, so that a big model cannot make its timing slow.
ONE_ROW_CALLS, ONE_ROW_BUDGET_SECONDS = 100, 0.5
MANY_ROWS_CALLS, MANY_ROWS_BUDGET_SECONDS = 10, 1.0
GENERATED_SEED = 0
NEURAL_NETWORKS = ("MLPClassifier", "MLPRegressor")
MEMORY_WORDS = ("MemoryError", "std::bad_alloc", "Cannot allocate memory", "out of memory")


@dataclass(frozen=True)
class ConversionLimits:
    cpu_seconds: int = 300
    """RLIMIT_CPU of the worker: SIGXCPU at this many CPU seconds, SIGKILL a few seconds later."""
    memory_mb: int = 4096
    """RLIMIT_DATA of the worker (see `_limit_worker` for why not RLIMIT_AS)."""
    wall_seconds: float = 600
    """The builder kills the worker's whole process group after this."""


@dataclass(frozen=True)
class ConversionOptions:
    optimize: bool = True
    """Save onnxruntime's basic (portable) graph optimisations into the model."""
    quantize: bool = False
    """Dynamic int8 quantisation of the weights; only for neural networks (MLPClassifier, MLPRegressor)."""
    target_opset: int | None = None
    """ONNX opset of the default domain; None: the newest that skl2onnx has been tested with."""
    parity_rows: int = 1000
    """How many sample rows the parity check uses at most."""


@dataclass
class ConversionResult:
    onnx_path: Path
    """The converted (optimised, maybe quantised) model, in the output folder."""
    source_framework: str
    """One of sklearn, xgboost, lightgbm."""
    estimator: str
    """E.g. "Pipeline(ColumnTransformer(StandardScaler, OneHotEncoder), LogisticRegression)"."""
    inputs: list[dict]
    """{"name", "datatype", "shape"} in Open Inference Protocol datatypes, -1 for a dimension of any size."""
    outputs: list[dict]
    rows_checked: int
    labels_equal: bool
    """Labels are equal on every row whose two likeliest classes do not tie (within the tolerance)."""
    max_abs_diff: float
    """Largest |native - onnx| over probabilities (classifiers) or outputs (regressors)."""
    native_one_row_ms: float
    onnx_one_row_ms: float
    native_1000_rows_ms: float
    onnx_1000_rows_ms: float
    speedup_one_row: float
    speedup_1000_rows: float
    optimized: bool
    quantized: bool
    quantization_label_agreement: float | None
    quantization_max_abs_diff: float | None


# ---------------------------------------------------------------- the builder's side


@dataclass
class _WorkerExit:
    returncode: int | None
    """None when something else reaped the worker and its status is lost."""
    cpu_seconds: float
    timed_out: bool
    stage: str
    log_tail: str


def convert_model(
    model_path: Path,
    out_dir: Path,
    *,
    sample_path: Path | None = None,
    signature_inputs: list[dict] | None = None,
    limits: ConversionLimits = ConversionLimits(),
    options: ConversionOptions = ConversionOptions(),
) -> ConversionResult:
    """Convert the pickled model at `model_path` to `out_dir`/model.onnx in an isolated worker.

    Blocks until the worker ends; callers in an event loop run it in a thread. On failure nothing but
    the worker's log stays in `out_dir`.

    Raises:
        InvalidArgument: the file is not a model the converters take, or the worker exited by itself.
        FailedPrecondition: the ONNX model does not predict what the native one does.
        ResourceExhausted: the worker reached its CPU-time, memory or wall-time limit.
    """
    model_path = Path(model_path).resolve()
    if not model_path.is_file():
        raise InvalidArgument(f"the model file {model_path.name} does not exist", field="ref")
    if sample_path is not None:
        sample_path = Path(sample_path).resolve()
        if not sample_path.is_file():
            raise InvalidArgument(f"the sample file {sample_path.name} does not exist", field="sample_dataset")
        if sample_path.suffix.lower() not in SAMPLE_SUFFIXES:
            raise InvalidArgument(
                f"the sample {sample_path.name} is neither CSV, Parquet nor an input_example.json",
                field="sample_dataset",
            )
    if options.parity_rows < 1:
        raise InvalidArgument("parity_rows must be at least 1", field="parity_rows")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_outputs(out_dir)
    scratch = out_dir / SCRATCH_DIR
    scratch.mkdir()
    request = {
        "model_path": str(model_path),
        "sample_path": str(sample_path) if sample_path else None,
        "signature_inputs": signature_inputs or None,
        "options": asdict(options),
        "limits": asdict(limits),
        "scratch_dir": str(scratch),
        "onnx_path": str(out_dir / ONNX_FILE),
        "result_path": str(out_dir / RESULT_FILE),
    }
    (out_dir / REQUEST_FILE).write_text(json.dumps(request))
    succeeded = False
    try:
        worker_exit = _run_worker(out_dir, limits)
        result = _interpret(worker_exit, out_dir, limits)
        succeeded = True
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        (out_dir / REQUEST_FILE).unlink(missing_ok=True)
        if not succeeded:
            (out_dir / ONNX_FILE).unlink(missing_ok=True)
            (out_dir / RESULT_FILE).unlink(missing_ok=True)


def _remove_outputs(out_dir: Path) -> None:
    """Leftovers of an earlier conversion into the same folder must not pass for this one's."""
    for name in (ONNX_FILE, RESULT_FILE, REQUEST_FILE, LOG_FILE):
        (out_dir / name).unlink(missing_ok=True)
    shutil.rmtree(out_dir / SCRATCH_DIR, ignore_errors=True)


def _run_worker(out_dir: Path, limits: ConversionLimits) -> _WorkerExit:
    """Run the worker to its end or to the wall-time limit; its whole process group is gone afterwards."""
    command = [sys.executable, "-m", "services.builder.convert", str(out_dir / REQUEST_FILE)]
    log_path = out_dir / LOG_FILE
    with log_path.open("wb") as log:
        # No preexec_fn: it is unsafe in a threaded parent (the builder converts in threads), so the
        # worker sets its own limits before it reads the model.
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=PACKAGE_ROOT,
            start_new_session=True,
            close_fds=True,
        )
    timed_out = False
    returncode: int | None = None
    cpu_seconds = 0.0
    try:
        timed_out = not _wait_for_exit(process.pid, time.monotonic() + limits.wall_seconds)
    finally:
        # The worker is not reaped yet, so its process group id cannot have been reused: killing the
        # group also ends whatever the model started, even after the worker itself has exited.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        try:
            _, status, usage = os.wait4(process.pid, 0)
            returncode = os.waitstatus_to_exitcode(status)
            cpu_seconds = usage.ru_utime + usage.ru_stime
        except ChildProcessError:
            pass
        process.returncode = returncode if returncode is not None else -1
    stage, tail = _read_log(log_path)
    return _WorkerExit(returncode, cpu_seconds, timed_out, stage, tail)


def _wait_for_exit(pid: int, deadline: float) -> bool:
    """Whether the worker exited before `deadline`; it is left unreaped (a zombie) either way."""
    pause = 0.01
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(pause, max(deadline - time.monotonic(), 0.001)))
        pause = min(pause * 1.5, 0.1)


def _read_log(log_path: Path) -> tuple[str, str]:
    """The worker's last announced stage and the tail of its log without the announcements."""
    try:
        with log_path.open("rb") as log:
            log.seek(max(log_path.stat().st_size - LOG_SCAN_BYTES, 0))
            text = log.read().decode("utf-8", "replace")
    except OSError:
        return "starting", ""
    stage = "starting"
    kept = []
    for line in text.splitlines():
        if line.startswith(STAGE_PREFIX):
            stage = re.sub(r"\s*\[[\d.]+ s\]$", "", line[len(STAGE_PREFIX) :].strip())
        elif not line.startswith(WORKER_PREFIX):
            kept.append(line)
    tail = "\n".join(kept).strip()
    if len(tail) > LOG_TAIL_CHARS:
        tail = "..." + tail[-LOG_TAIL_CHARS:]
    return stage, tail


def _interpret(worker_exit: _WorkerExit, out_dir: Path, limits: ConversionLimits) -> ConversionResult:
    if worker_exit.timed_out:
        loading = worker_exit.stage in ("starting", "loading the model")
        guess = "the model may hang when loaded" if loading else "the model may be too large to convert in that time"
        raise ResourceExhausted(
            f"the conversion was stopped after {_number(limits.wall_seconds)} s (wall-time limit) while "
            f"{worker_exit.stage}; {guess}. If it is only slow, raise the builder's convert_wall_seconds.",
            reason="WALL_TIME_LIMIT",
        )
    answer = _read_answer(out_dir / RESULT_FILE)
    if answer is not None and isinstance(answer.get("error"), dict):
        raise _error_from_answer(answer["error"])
    if answer is not None and isinstance(answer.get("result"), dict) and worker_exit.returncode == 0:
        if not (out_dir / ONNX_FILE).is_file():
            raise MlmeshError("the conversion worker reported success but wrote no model")
        return _result_from_answer(answer["result"], out_dir / ONNX_FILE)
    raise _exit_error(worker_exit, limits)


def _read_answer(path: Path) -> dict[str, Any] | None:
    try:
        answer = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return answer if isinstance(answer, dict) else None


def _error_from_answer(error: dict[str, Any]) -> MlmeshError:
    kinds: dict[str, type[MlmeshError]] = {
        kind.code: kind for kind in (InvalidArgument, FailedPrecondition, ResourceExhausted)
    }
    kind = kinds.get(str(error.get("code")), MlmeshError)
    field = error.get("field")
    reason = error.get("reason")
    return kind(
        str(error.get("message") or "the conversion failed"),
        field=str(field) if field else None,
        reason=str(reason) if reason else None,
    )


def _result_from_answer(answer: dict[str, Any], onnx_path: Path) -> ConversionResult:
    values: dict[str, Any] = {"onnx_path": onnx_path}
    try:
        for field in fields(ConversionResult):
            if field.name == "onnx_path":
                continue
            value = answer[field.name]
            if field.name in ("inputs", "outputs"):
                value = [_tensor_spec(spec) for spec in value]
            elif field.name in ("source_framework", "estimator"):
                value = str(value)
            elif field.name == "rows_checked":
                value = int(value)
            elif field.name in ("labels_equal", "optimized", "quantized"):
                value = bool(value)
            elif value is not None or not field.name.startswith("quantization_"):
                value = float(value)
            values[field.name] = value
    except (KeyError, TypeError, ValueError) as error:
        raise MlmeshError(f"the conversion worker wrote a malformed result ({error!r})") from error
    return ConversionResult(**values)


def _tensor_spec(spec: dict[str, Any]) -> dict[str, Any]:
    return {"name": str(spec["name"]), "datatype": str(spec["datatype"]), "shape": [int(d) for d in spec["shape"]]}


def _exit_error(worker_exit: _WorkerExit, limits: ConversionLimits) -> MlmeshError:
    """The error for a worker that ended without an answer."""
    code, stage = worker_exit.returncode, worker_exit.stage
    output = f" Its last output:\n{worker_exit.log_tail}" if worker_exit.log_tail else " It wrote nothing."
    memory_words = any(word in worker_exit.log_tail for word in MEMORY_WORDS)
    if code is None:
        return MlmeshError(f"the conversion worker ended while {stage} and its exit status was lost.{output}")
    if code < 0:
        number = -code
        if number == signal.SIGXCPU or (number == signal.SIGKILL and worker_exit.cpu_seconds >= limits.cpu_seconds):
            return _cpu_limit_error(limits, stage)
        if number == signal.SIGKILL or memory_words:
            return _memory_limit_error(limits, stage, killed=number == signal.SIGKILL)
        return InvalidArgument(
            f"the conversion worker died of {signal.Signals(number).name} while {stage}; the model cannot be "
            f"converted here.{output}",
            field="ref",
            reason="WORKER_CRASHED",
        )
    if memory_words:
        return _memory_limit_error(limits, stage, killed=False)
    return InvalidArgument(
        f"the conversion worker exited with code {code} while {stage}; a model that ends the process loading "
        f"it cannot be converted.{output}",
        field="ref",
        reason="WORKER_EXITED",
    )


def _cpu_limit_error(limits: ConversionLimits, stage: str) -> ResourceExhausted:
    return ResourceExhausted(
        f"the conversion was stopped after {limits.cpu_seconds} s of CPU time (CPU-time limit) while {stage}; "
        "the model may loop when loaded. If it is only slow to convert, raise the builder's convert_cpu_seconds.",
        reason="CPU_TIME_LIMIT",
    )


def _memory_limit_error(limits: ConversionLimits, stage: str, *, killed: bool) -> ResourceExhausted:
    how = "was killed" if killed else "ran out of memory"
    return ResourceExhausted(
        f"the conversion worker {how} while {stage}: it needs more than its memory limit of {limits.memory_mb} MB. "
        "If the model really is that large, raise the builder's convert_memory_mb.",
        reason="MEMORY_LIMIT",
    )


def _number(value: float) -> str:
    return f"{value:g}"


# ---------------------------------------------------------------- the worker


_stage = "starting"
_started = time.monotonic()


def _announce(stage: str) -> None:
    """Log the stage, with the seconds since the worker started, for the builder and for people."""
    global _stage
    _stage = stage
    print(f"{STAGE_PREFIX}{stage} [{time.monotonic() - _started:.2f} s]", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    """The worker: `python -m services.builder.convert <request.json>`."""
    arguments = sys.argv[1:] if argv is None else argv
    if len(arguments) != 1:
        print("usage: python -m services.builder.convert <request.json>", file=sys.stderr)
        sys.exit(2)
    request = json.loads(Path(arguments[0]).read_text())
    limits = ConversionLimits(**request["limits"])
    _limit_worker(limits)
    # Converters and models that write files write them into the scratch folder, which goes away.
    os.chdir(request["scratch_dir"])
    print(f"{WORKER_PREFIX}pid {os.getpid()}, process group {os.getpgrp()}", file=sys.stderr, flush=True)
    answer: dict[str, Any]
    try:
        answer = {"result": _work(request)}
    except MlmeshError as error:
        answer = {"error": _error_answer(error)}
    except MemoryError:
        answer = {"error": _error_answer(_memory_limit_error(limits, _stage, killed=False))}
    except Exception as error:
        import traceback

        traceback.print_exc()
        answer = {"error": _error_answer(MlmeshError(f"the conversion failed while {_stage}: {_short(error)}"))}
    _write_json(Path(request["result_path"]), answer)
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's shutdown: a model's finalizers and library threads must not hold up or
    # change an answer that is already written.
    os._exit(0)


def _limit_worker(limits: ConversionLimits) -> None:
    """Fix thread counts and set the resource limits before any model or numeric library loads.

    Memory is limited with RLIMIT_DATA, not RLIMIT_AS. RLIMIT_AS counts address space that is only
    reserved: shared libraries' code, glibc's 64 MB malloc arena per thread and the PROT_NONE regions
    that numpy, onnxruntime, XGBoost and LightGBM reserve, about 0.8-1.2 GB here before any model,
    and more with every core, so a limit that suits one machine fails imports on another.
    RLIMIT_DATA (enforced for mmap since Linux 4.7) counts private writable memory (the heap, anonymous
    mappings, thread stacks), which is what a model and its conversion actually use: about 350 MB for
    the libraries.
    """
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        # One thread: timings compare one onnxruntime thread with one native thread, and BLAS buffers
        # per core would otherwise eat into the memory limit.
        os.environ[variable] = "1"
    _lower_limit(resource.RLIMIT_CORE, 0, 0)
    _lower_limit(resource.RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + CPU_HARD_GRACE_SECONDS)
    memory = limits.memory_mb * 1024 * 1024
    _lower_limit(resource.RLIMIT_DATA, memory, memory)


def _lower_limit(which: int, soft: int, hard: int) -> None:
    """Set a limit, never above the hard limit the worker inherited."""
    _, inherited_hard = resource.getrlimit(which)
    if inherited_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, inherited_hard), min(hard, inherited_hard)
    resource.setrlimit(which, (soft, hard))


def _error_answer(error: MlmeshError) -> dict[str, Any]:
    return {"code": error.code, "message": error.message, "field": error.field, "reason": error.reason}


def _write_json(path: Path, value: Any) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value))
    os.replace(partial, path)


def _first_line(error: BaseException, limit: int = 400) -> str:
    lines = str(error).strip().splitlines()
    text = lines[0].strip() if lines else ""
    return text if len(text) <= limit else text[:limit] + "..."


def _short(error: BaseException) -> str:
    """The error's type and the first line of its message."""
    text = _first_line(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _work(request: dict[str, Any]) -> dict[str, Any]:
    options = ConversionOptions(**request["options"])
    scratch = Path(request["scratch_dir"])
    _announce("loading the model")
    model = _load_model(Path(request["model_path"]))
    _announce("inspecting the model")
    _register_converters()
    final = _final_estimator(model)
    kind = _kind(model)
    estimator = _describe(model)
    if options.quantize and type(final).__name__ not in NEURAL_NETWORKS:
        raise InvalidArgument(
            f"quantisation is only for neural networks (scikit-learn's {' and '.join(NEURAL_NETWORKS)}); "
            f"{estimator} is not one. Convert it without quantize: int8 weights would change its results "
            "without making it faster.",
            field="quantize",
            reason="NOT_A_NEURAL_NETWORK",
        )
    _check_converters_exist(model)
    _single_threaded(model)
    _announce("reading the sample")
    signature_inputs = request.get("signature_inputs") or []
    frame = _sample_frame(request.get("sample_path"), model, signature_inputs, options.parity_rows)
    plan = _input_plan(model, frame, signature_inputs)
    _announce("converting")
    raw_path, plan = _convert(model, plan, options.target_opset, scratch)
    reference_path = raw_path
    if options.optimize:
        _announce("optimising")
        reference_path = scratch / "optimized.onnx"
        _optimise(raw_path, reference_path)
    _announce("checking parity")
    prepared = plan.prepare(frame)
    parity = _check_parity(model, kind, plan, prepared, reference_path)
    final_path = reference_path
    quantization: dict[str, float | None] = {"label_agreement": None, "max_abs_diff": None}
    if options.quantize:
        _announce("quantising")
        final_path = scratch / "quantized.onnx"
        _quantise(reference_path, final_path)
        quantization = _compare_quantised(model, kind, plan, prepared, reference_path, final_path)
    _announce("timing")
    timings = _time(model, kind, plan, prepared, final_path)
    _announce("writing the result")
    inputs, outputs = _tensor_specs(final_path)
    os.replace(final_path, request["onnx_path"])
    return {
        "source_framework": _framework(model),
        "estimator": estimator,
        "inputs": inputs,
        "outputs": outputs,
        "rows_checked": parity["rows"],
        "labels_equal": parity["labels_equal"],
        "max_abs_diff": parity["max_abs_diff"],
        **timings,
        "optimized": options.optimize,
        "quantized": options.quantize,
        "quantization_label_agreement": quantization["label_agreement"],
        "quantization_max_abs_diff": quantization["max_abs_diff"],
    }


# ------------------------------------------------ loading and inspecting


def _load_model(path: Path) -> Any:
    import joblib  # reads plain pickles as well as joblib's files

    try:
        model = joblib.load(path)
    except MemoryError:
        raise
    except ModuleNotFoundError as error:
        raise InvalidArgument(
            f"the model needs the Python module {error.name!r}, which the builder does not have; conversion "
            "takes scikit-learn, XGBoost and LightGBM models",
            field="ref",
            reason="UNKNOWN_FRAMEWORK",
        ) from error
    except Exception as error:
        raise InvalidArgument(
            f"the model file is not a loadable pickle or joblib file ({_short(error)}). Register the file that "
            "pickle.dump or joblib.dump wrote.",
            field="ref",
            reason="NOT_A_PICKLE",
        ) from error
    if not any(hasattr(model, method) for method in ("predict", "transform")):
        raise InvalidArgument(
            f"the model file holds a {_qualified_name(type(model))}, not a fitted model with predict or transform",
            field="ref",
            reason="NOT_A_MODEL",
        )
    return model


def _components(model: Any) -> list[Any]:
    """The model and every estimator inside its pipelines, column transformers and feature unions."""
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import FeatureUnion, Pipeline

    found = [model]
    if isinstance(model, Pipeline):
        children = [step for _, step in model.steps]
    elif isinstance(model, ColumnTransformer):
        children = [transformer for _, transformer, _ in getattr(model, "transformers_", model.transformers)]
    elif isinstance(model, FeatureUnion):
        children = [transformer for _, transformer in model.transformer_list]
    else:
        children = []
    for child in children:
        if not isinstance(child, str) and child is not None:
            found.extend(_components(child))
    return found


def _final_estimator(model: Any) -> Any:
    from sklearn.pipeline import Pipeline

    while isinstance(model, Pipeline):
        model = model.steps[-1][1]
    return model


def _entrance(model: Any) -> Any:
    """The part of the model that sees its input columns."""
    from sklearn.pipeline import Pipeline

    while isinstance(model, Pipeline):
        steps = [step for _, step in model.steps if step not in (None, "passthrough")]
        if not steps:
            break
        model = steps[0]
    return model


def _kind(model: Any) -> str:
    """The kind of outputs: "classifier" (labels, maybe probabilities), "predictor" (numbers), "transformer"."""
    from sklearn.base import is_classifier

    if is_classifier(model) and hasattr(model, "classes_"):
        return "classifier"
    if hasattr(model, "predict"):
        return "predictor"
    return "transformer"


def _describe(model: Any) -> str:
    """E.g. "Pipeline(ColumnTransformer(StandardScaler, OneHotEncoder), LogisticRegression)"."""
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import FeatureUnion, Pipeline

    if isinstance(model, Pipeline):
        parts = [step for _, step in model.steps]
    elif isinstance(model, ColumnTransformer):
        # As the user wrote it: the fitted transformers_ show a passthrough remainder as a FunctionTransformer.
        parts = [transformer for _, transformer, _ in model.transformers] + [model.remainder]
    elif isinstance(model, FeatureUnion):
        parts = [transformer for _, transformer in model.transformer_list]
    else:
        return type(model).__name__
    inner = ", ".join(_describe(part) for part in parts if not isinstance(part, str) and part is not None)
    return f"{type(model).__name__}({inner})"


def _framework(model: Any) -> str:
    modules = {type(component).__module__.split(".")[0] for component in _components(model)}
    for framework in ("xgboost", "lightgbm"):
        if framework in modules:
            return framework
    return "sklearn"


def _qualified_name(cls: type) -> str:
    """The shortest public import path of a class: sklearn.ensemble.RandomTreesEmbedding, not ..._forest."""
    parts = cls.__module__.split(".")
    for end in range(1, len(parts) + 1):
        if parts[end - 1].startswith("_"):
            break
        module = sys.modules.get(".".join(parts[:end]))
        if module is not None and getattr(module, cls.__name__, None) is cls:
            return f"{'.'.join(parts[:end])}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _single_threaded(model: Any) -> None:
    """n_jobs=1 everywhere, so that native timings use one thread as onnxruntime's do."""
    try:
        thread_settings = {name: 1 for name in model.get_params(deep=True) if name.split("__")[-1] == "n_jobs"}
        if thread_settings:
            model.set_params(**thread_settings)
    except Exception as error:  # an estimator whose parameters cannot be set still converts
        print(f"could not set n_jobs=1: {_short(error)}", file=sys.stderr)


# ------------------------------------------------ converters


def _register_converters() -> None:
    """onnxmltools' XGBoost and LightGBM converters under skl2onnx, and a fix for HistGradientBoosting."""
    from skl2onnx import update_registered_converter
    from skl2onnx._supported_operators import sklearn_operator_name_map
    from skl2onnx.common._registration import get_converter, register_converter
    from skl2onnx.common.shape_calculator import (
        calculate_linear_classifier_output_shapes,
        calculate_linear_regressor_output_shapes,
    )
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    # The linear classifier shape calculator with these options installs skl2onnx's classifier parser,
    # which is what honours zipmap=False.
    classifier_options = {"nocl": [True, False], "zipmap": [True, False, "columns"]}
    # The model's pickle imported its framework if it uses one; importing it otherwise costs time and memory.
    if "xgboost" in sys.modules:
        from onnxmltools.convert.xgboost.operator_converters.XGBoost import convert_xgboost
        from xgboost import XGBClassifier, XGBRegressor

        update_registered_converter(
            XGBClassifier,
            "XGBoostXGBClassifier",
            calculate_linear_classifier_output_shapes,
            convert_xgboost,
            options=classifier_options,
        )
        update_registered_converter(
            XGBRegressor, "XGBoostXGBRegressor", calculate_linear_regressor_output_shapes, convert_xgboost
        )
    if "lightgbm" in sys.modules:
        from lightgbm import LGBMClassifier, LGBMRegressor
        from onnxmltools.convert.lightgbm.operator_converters.LightGbm import convert_lightgbm

        update_registered_converter(
            LGBMClassifier,
            "LightGbmLGBMClassifier",
            calculate_linear_classifier_output_shapes,
            convert_lightgbm,
            options=classifier_options,
        )
        update_registered_converter(
            LGBMRegressor,
            "LightGbmLGBMRegressor",
            calculate_linear_regressor_output_shapes,
            convert_lightgbm,
            options={"split": None},
        )
    # skl2onnx's HistGradientBoosting converters give leaves a Python bool among integer flags, which
    # onnx refuses ("Expected an int, got a boolean").
    for estimator in (HistGradientBoostingClassifier, HistGradientBoostingRegressor):
        alias = sklearn_operator_name_map[estimator]
        original = get_converter(alias)
        register_converter(alias, _with_integer_flags(original), overwrite=True, options=original.get_allowed_options())


def _with_integer_flags(original: Any) -> Any:
    def converter(scope: Any, operator: Any, container: Any) -> None:
        add_node = container.add_node

        def add_node_with_integer_flags(*args: Any, **attributes: Any) -> Any:
            for name, value in attributes.items():
                if isinstance(value, list) and any(isinstance(item, bool) for item in value):
                    attributes[name] = [int(item) for item in value]
            return add_node(*args, **attributes)

        container.add_node = add_node_with_integer_flags
        try:
            original(scope, operator, container)
        finally:
            del container.add_node

    return converter


def _check_converters_exist(model: Any) -> None:
    from skl2onnx._supported_operators import sklearn_operator_name_map

    for component in _components(model):
        if type(component) not in sklearn_operator_name_map:
            where = "" if component is model else f" (in {_describe(model)})"
            raise InvalidArgument(
                f"skl2onnx cannot convert {_qualified_name(type(component))}{where}: no ONNX converter exists for "
                "it. Retrain with an estimator skl2onnx supports (https://onnx.ai/sklearn-onnx/supported.html), "
                "or convert the model yourself and register the ONNX file.",
                field="ref",
                reason="UNSUPPORTED_ESTIMATOR",
            )


def _target_opset(requested: int | None) -> dict[str, int]:
    import onnx
    from skl2onnx import get_latest_tested_opset_version

    newest = onnx.defs.onnx_opset_version()
    if requested is not None and not 9 <= requested <= newest:
        raise InvalidArgument(
            f"target_opset {requested} is not one the installed onnx supports (9 to {newest})",
            field="target_opset",
        )
    main_opset = requested or min(get_latest_tested_opset_version(), newest)
    # ai.onnx.ml 3 is the newest version onnxmltools' tree converters write, and what onnx paired with
    # opset 15 and later; older opsets came with older ai.onnx.ml versions.
    ml_opset = 3 if main_opset >= 15 else 2 if main_opset >= 11 else 1
    return {"": main_opset, "ai.onnx.ml": ml_opset}


def _convert(model: Any, plan: _InputPlan, requested_opset: int | None, scratch: Path) -> tuple[Path, _InputPlan]:
    """The converted model's file, and the input plan it was converted with."""
    opset = _target_opset(requested_opset)
    try:
        return _convert_with(model, plan, opset, scratch), plan
    except InvalidArgument as error:
        if "int" not in plan.kinds:
            raise
        # Some converters take integer columns only as floats.
        print(f"converting again with integer columns as FP32: {error.message}", file=sys.stderr)
    plan = plan.with_integers_as_floats()
    return _convert_with(model, plan, opset, scratch), plan


def _convert_with(model: Any, plan: _InputPlan, opset: dict[str, int], scratch: Path) -> Path:
    import copy

    import onnx
    from skl2onnx import convert_sklearn

    converted = copy.deepcopy(model)
    _floor_hist_gradient_boosting_thresholds(converted)
    final = _final_estimator(converted)
    options = {id(final): {"zipmap": False}} if _kind(converted) == "classifier" else None
    try:
        onnx_model = convert_sklearn(converted, initial_types=plan.initial_types(), options=options, target_opset=opset)
    except MemoryError:
        raise
    except Exception as error:
        raise InvalidArgument(
            f"skl2onnx cannot convert {_culprit(error, model)}: {_first_line(error) or type(error).__name__}",
            field="ref",
            reason="UNSUPPORTED_ESTIMATOR",
        ) from error
    path = scratch / "converted.onnx"
    onnx.save(onnx_model, str(path))
    try:
        _session(path)
    except Exception as error:
        raise InvalidArgument(
            f"onnxruntime cannot run the ONNX model converted from {_describe(model)} ({_short(error)}); try "
            "another target_opset",
            field="target_opset",
            reason="UNRUNNABLE_MODEL",
        ) from error
    return path


def _culprit(error: Exception, model: Any) -> str:
    """The estimator a converter's error is about: named in its message, else the model itself."""
    match = re.search(r"<class '([\w.]+)'>", str(error))
    if match:
        module_name, _, class_name = match.group(1).rpartition(".")
        cls = getattr(sys.modules.get(module_name), class_name, None)
        return _qualified_name(cls) if isinstance(cls, type) else match.group(1)
    components = _components(model)
    return _qualified_name(type(model)) if len(components) == 1 else _describe(model)


def _floor_hist_gradient_boosting_thresholds(model: Any) -> None:
    """Round HistGradientBoosting thresholds down to float32, in the copy that is converted.

    scikit-learn compares float64 inputs with float64 thresholds; ONNX compares float32 inputs with
    float32 thresholds, and skl2onnx rounds these to the nearest float32, which sends an input between
    the two values down the other branch. For float32 inputs x, x <= t exactly when x <= the largest
    float32 not above t; the other tree converters make this adjustment themselves.
    """
    import numpy as np
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    for component in _components(model):
        if not isinstance(component, HistGradientBoostingClassifier | HistGradientBoostingRegressor):
            continue
        for predictors in component._predictors:
            for predictor in predictors:
                nodes = predictor.nodes
                thresholds = nodes["num_threshold"]
                rounded = thresholds.astype(np.float32)
                above = rounded.astype(np.float64) > thresholds
                rounded[above] = np.nextafter(rounded[above], np.float32(-np.inf))
                nodes["num_threshold"] = np.where(nodes["is_leaf"] == 0, rounded.astype(np.float64), thresholds)


def _optimise(source: Path, target: Path) -> None:
    import onnxruntime

    # The basic level only folds constants and removes redundant nodes: the saved model stays plain ONNX
    # that any execution provider runs, where the extended levels write onnxruntime's own fused operators.
    session_options = onnxruntime.SessionOptions()
    session_options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session_options.optimized_model_filepath = str(target)
    onnxruntime.InferenceSession(str(source), session_options, providers=["CPUExecutionProvider"])
    _keep_used_opsets(target)


def _keep_used_opsets(path: Path) -> None:
    """Drop the opset imports no node uses: onnxruntime declares all of its own domains (com.microsoft,
    ...) in the models it saves, and skl2onnx may declare the default domain twice."""
    import onnx

    model = onnx.load(str(path))
    used = {node.domain for node in model.graph.node} | {""}
    kept: dict[str, int] = {}
    for opset in model.opset_import:
        if opset.domain in used:
            kept[opset.domain] = max(kept.get(opset.domain, 0), opset.version)
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(domain, version) for domain, version in kept.items())
    onnx.save(model, str(path))


def _quantise(source: Path, target: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # skl2onnx graphs start with ai.onnx.ml operators (Scaler, ...) whose outputs shape inference cannot
    # type; everything in them is float.
    quantize_dynamic(
        str(source),
        str(target),
        weight_type=QuantType.QInt8,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )


def _session(path: Path) -> onnxruntime.InferenceSession:
    import onnxruntime

    session_options = onnxruntime.SessionOptions()
    session_options.intra_op_num_threads = 1
    session_options.inter_op_num_threads = 1
    session_options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    session_options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), session_options, providers=["CPUExecutionProvider"])


def _tensor_specs(path: Path) -> tuple[list[dict], list[dict]]:
    import onnx

    graph = onnx.load(str(path)).graph
    initializers = {initializer.name for initializer in graph.initializer}

    def spec(value: onnx.ValueInfoProto) -> dict[str, Any]:
        tensor = value.type.tensor_type
        shape = [dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else -1 for dim in tensor.shape.dim]
        return {"name": value.name, "datatype": ONNX_TO_OIP.get(tensor.elem_type, "BYTES"), "shape": shape}

    inputs = [spec(value) for value in graph.input if value.name not in initializers]
    return inputs, [spec(value) for value in graph.output]


# ------------------------------------------------ sample rows


def _sample_frame(sample_path: str | None, model: Any, signature_inputs: list[dict], rows: int) -> pd.DataFrame:
    """The sample rows as a frame of the model's features, in the model's order."""
    names, count = _feature_layout(model, signature_inputs)
    if sample_path is None:
        return _generated_frame(model, names, count, signature_inputs, rows)
    frame = _read_sample(Path(sample_path), rows, headerless=names is None)
    if frame.empty:
        raise InvalidArgument("the sample has no rows", field="sample_dataset")
    return _select_features(frame, names, count, signature_inputs)


def _feature_layout(model: Any, signature_inputs: list[dict]) -> tuple[list[str] | None, int]:
    """The names of the model's features (None when it was fitted on an array) and how many there are."""
    names = getattr(model, "feature_names_in_", None)
    if names is not None:
        return [str(name) for name in names], len(names)
    count = getattr(model, "n_features_in_", None)
    if count is not None:
        return None, int(count)
    if len(signature_inputs) == 1 and len(signature_inputs[0].get("shape") or []) == 2:
        width = int(signature_inputs[0]["shape"][1])
        if width > 0:
            return None, width
    if len(signature_inputs) > 1:
        return None, len(signature_inputs)
    raise InvalidArgument(
        "cannot tell how many features the model takes; give a sample (a sample dataset or an input example)",
        field="sample_dataset",
    )


def _read_sample(path: Path, rows: int, *, headerless: bool) -> pd.DataFrame:
    import pandas as pd

    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            frame = pd.read_csv(path, nrows=rows)
            # A model fitted on an array may come with a CSV without a header, whose first row is numbers;
            # pandas writes an array's frame with the header 0, 1, 2, ...
            header = [str(column) for column in frame.columns]
            numbered = header == [str(position) for position in range(len(header))]
            if headerless and header and not numbered and all(_is_number(column) for column in header):
                frame = pd.read_csv(path, nrows=rows, header=None)
        elif suffix in (".parquet", ".pq"):
            import pyarrow.parquet

            batches = pyarrow.parquet.ParquetFile(path).iter_batches(batch_size=rows)
            batch = next(batches, None)
            frame = batch.to_pandas() if batch is not None else pd.DataFrame()
        else:
            frame = _frame_from_example(json.loads(path.read_text()))
    except (InvalidArgument, MemoryError):
        raise
    except Exception as error:
        raise InvalidArgument(f"the sample cannot be read: {_short(error)}", field="sample_dataset") from error
    return frame.head(rows).reset_index(drop=True)


def _is_number(text: Any) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def _frame_from_example(example: Any) -> pd.DataFrame:
    """An MLflow input example: split ({"columns", "data"}), records, or {"inputs"/"instances": ...}."""
    import pandas as pd

    if isinstance(example, dict):
        for key in ("dataframe_split", "dataframe_records", "inputs", "instances"):
            if key in example:
                return _frame_from_example(example[key])
        if "data" in example:
            return pd.DataFrame(example["data"], columns=example.get("columns"))
        if example and all(isinstance(values, list) for values in example.values()):
            return pd.DataFrame(example)
    if isinstance(example, list) and example:
        if all(isinstance(row, dict) for row in example):
            return pd.DataFrame.from_records(example)
        if all(isinstance(row, list) for row in example):
            return pd.DataFrame(example)
    raise InvalidArgument(
        'the input example is not one the builder reads: give {"columns": [...], "data": [[...]]}, '
        '{"dataframe_split": ...}, a list of records, or {"inputs": [[...]]}',
        field="sample_dataset",
    )


def _select_features(
    frame: pd.DataFrame, names: list[str] | None, count: int, signature_inputs: list[dict]
) -> pd.DataFrame:
    columns = [str(column) for column in frame.columns]
    frame = frame.set_axis(columns, axis=1)
    signature_names = [str(spec.get("name")) for spec in signature_inputs]
    for wanted in (names, signature_names if len(signature_names) == count else None):
        if wanted and all(name in columns for name in wanted):
            return frame[wanted]
    if len(columns) == count:
        # Positional: e.g. LightGBM names the columns of an array Column_0, ... and a sample has real names.
        return frame.set_axis(names or columns, axis=1)
    missing = [name for name in names or [] if name not in columns]
    detail = f"it lacks {', '.join(missing[:10])}" if missing else f"it has {len(columns)} columns"
    raise InvalidArgument(
        f"the sample does not fit the model, which takes {count} features: {detail}", field="sample_dataset"
    )


@dataclass
class _FeatureHint:
    """What the fitted model tells about one feature's values."""

    categories: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    mean: float | None = None
    scale: float | None = None


def _generated_frame(
    model: Any, names: list[str] | None, count: int, signature_inputs: list[dict], rows: int
) -> pd.DataFrame:
    """Seeded rows drawn from what the model learnt: categories of encoders, scalers' statistics, tree thresholds."""
    import numpy as np
    import pandas as pd

    random = np.random.default_rng(GENERATED_SEED)
    hints: dict[int, _FeatureHint] = {}
    try:
        _collect_hints(_entrance(model), list(range(count)), names, hints)
    except Exception as error:  # hints only make the rows more realistic
        print(f"could not read feature hints from the model: {_short(error)}", file=sys.stderr)
    columns = names or [f"feature_{index}" for index in range(count)]
    datatypes = {str(spec.get("name")): str(spec.get("datatype", "")) for spec in signature_inputs}
    data: dict[str, Any] = {}
    for index, column in enumerate(columns):
        hint = hints.get(index, _FeatureHint())
        if hint.categories:
            values = np.empty(len(hint.categories), dtype=object)
            values[:] = hint.categories
            drawn = random.choice(values, rows)
            data[column] = pd.Series(drawn).infer_objects() if not isinstance(hint.categories[0], str) else drawn
        elif hint.low is not None and hint.high is not None:
            margin = (hint.high - hint.low) * 0.1 or 1.0
            data[column] = random.uniform(hint.low - margin, hint.high + margin, rows)
        elif hint.mean is not None:
            data[column] = random.normal(hint.mean, hint.scale or 1.0, rows)
        elif datatypes.get(column) == "BYTES":
            data[column] = random.choice(np.array(["a", "b", "c"], dtype=object), rows)
        elif datatypes.get(column, "").startswith(("INT", "UINT")):
            data[column] = random.integers(0, 10, rows)
        else:
            data[column] = random.normal(0.0, 1.0, rows)
    return pd.DataFrame(data, columns=columns)


def _collect_hints(component: Any, indices: list[int], names: list[str] | None, hints: dict[int, _FeatureHint]) -> None:
    """Hints for the features `indices` (positions in the model's input) that `component` sees."""
    import numpy as np
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import Pipeline

    if isinstance(component, ColumnTransformer):
        for _, transformer, columns in component.transformers_:
            if isinstance(transformer, str):
                continue
            selected = _column_positions(columns, indices, names)
            if selected:
                _collect_hints(transformer, selected, names, hints)
        return
    if isinstance(component, Pipeline):
        _collect_hints(_entrance(component), indices, names, hints)
        return
    categories = getattr(component, "categories_", None)
    if isinstance(categories, list) and len(categories) == len(indices):
        for index, values in zip(indices, categories, strict=True):
            known = [value.item() if hasattr(value, "item") else value for value in values if not _is_missing(value)]
            if known:
                hints[index] = _FeatureHint(categories=known)
        return
    low, high = getattr(component, "data_min_", None), getattr(component, "data_max_", None)
    if low is not None and high is not None and len(low) == len(indices):
        for index, lowest, highest in zip(indices, low, high, strict=True):
            hints[index] = _FeatureHint(low=float(lowest), high=float(highest))
        return
    for mean_name, scale_name in (("mean_", "scale_"), ("center_", "scale_")):
        mean = getattr(component, mean_name, None)
        if mean is not None and np.ndim(mean) == 1 and len(mean) == len(indices):
            scale = getattr(component, scale_name, None)
            for position, index in enumerate(indices):
                spread = float(scale[position]) if scale is not None else 1.0
                hints[index] = _FeatureHint(mean=float(mean[position]), scale=spread)
            return
    for position, thresholds in _tree_thresholds(component, len(indices)).items():
        if thresholds and position < len(indices):
            hints[indices[position]] = _FeatureHint(low=min(thresholds), high=max(thresholds))


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def _column_positions(columns: Any, indices: list[int], names: list[str] | None) -> list[int]:
    """A column transformer's column selection as positions in the model's input."""
    import numpy as np

    if isinstance(columns, str | int):
        columns = [columns]
    if isinstance(columns, slice):
        return [indices[position] for position in range(len(indices))[columns]]
    selection = list(np.asarray(columns).ravel()) if not isinstance(columns, list) else columns
    if selection and all(isinstance(item, bool | np.bool_) for item in selection):
        return [indices[position] for position, chosen in enumerate(selection) if chosen]
    positions = []
    for item in selection:
        if isinstance(item, str) and names is not None and item in names:
            positions.append(indices[names.index(item)])
        elif isinstance(item, int | np.integer) and 0 <= int(item) < len(indices):
            positions.append(indices[int(item)])
    return positions


def _tree_thresholds(component: Any, count: int) -> dict[int, list[float]]:
    """Split thresholds per input position of a tree ensemble (scikit-learn, XGBoost or LightGBM)."""
    import numpy as np

    thresholds: dict[int, list[float]] = {}

    def add(position: int, value: float) -> None:
        if 0 <= position < count and np.isfinite(value):
            thresholds.setdefault(position, []).append(float(value))

    trees = [component] if hasattr(component, "tree_") else []
    if hasattr(component, "estimators_") and not trees:
        trees = [tree for tree in np.ravel(np.asarray(component.estimators_, dtype=object)) if hasattr(tree, "tree_")]
    for tree in trees:
        for feature, threshold in zip(tree.tree_.feature, tree.tree_.threshold, strict=True):
            if feature >= 0:
                add(int(feature), threshold)
    for predictors in getattr(component, "_predictors", None) or []:
        for predictor in predictors:
            branches = predictor.nodes[predictor.nodes["is_leaf"] == 0]
            for feature, threshold in zip(branches["feature_idx"], branches["num_threshold"], strict=True):
                add(int(feature), threshold)
    module = type(component).__module__.split(".")[0]
    if module == "xgboost":
        booster = component.get_booster()
        table = booster.trees_to_dataframe()
        feature_names = list(booster.feature_names or [])
        for feature, split in zip(table["Feature"], table["Split"], strict=True):
            if feature in feature_names:
                add(feature_names.index(feature), split)
            elif isinstance(feature, str) and re.fullmatch(r"f\d+", feature):
                add(int(feature[1:]), split)
    elif module == "lightgbm":
        booster = component.booster_
        table = booster.trees_to_dataframe()
        feature_names = booster.feature_name()
        for feature, split in zip(table["split_feature"], table["threshold"], strict=True):
            if feature in feature_names and split is not None:
                add(feature_names.index(feature), split)
    return thresholds


# ------------------------------------------------ inputs


@dataclass
class _InputPlan:
    """How sample rows become the ONNX model's inputs and the native model's input."""

    per_column: bool
    """One ONNX input per column (a column transformer at the entrance), else one [-1, n] tensor."""
    columns: list[str]
    kinds: list[str]
    """Per column: "float", "int" or "string"."""
    tensor_name: str
    frame_input: bool
    """The native model takes a DataFrame with these column names (it was fitted on one)."""

    def initial_types(self) -> list[tuple[str, Any]]:
        from skl2onnx.common.data_types import FloatTensorType, Int64TensorType, StringTensorType

        types = {"float": FloatTensorType, "int": Int64TensorType, "string": StringTensorType}
        if self.per_column:
            return [(column, types[kind]([None, 1])) for column, kind in zip(self.columns, self.kinds, strict=True)]
        return [(self.tensor_name, types[self.kinds[0]]([None, len(self.columns)]))]

    def with_integers_as_floats(self) -> _InputPlan:
        kinds = ["float" if kind == "int" else kind for kind in self.kinds]
        return _InputPlan(self.per_column, self.columns, kinds, self.tensor_name, self.frame_input)

    def prepare(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The sample with every column in its input's type: floats rounded to float32, as ONNX sees them."""
        import numpy as np
        import pandas as pd

        data = {}
        for column, kind in zip(self.columns, self.kinds, strict=True):
            values = frame[column]
            if kind == "string":
                strings = np.empty(len(values), dtype=object)
                strings[:] = [str(value) for value in values]
                data[column] = strings
            elif kind == "int":
                data[column] = values.to_numpy(np.int64)
            else:
                data[column] = pd.to_numeric(values, errors="coerce").to_numpy(np.float32)
        return pd.DataFrame(data, columns=self.columns)

    def feeds(self, prepared: pd.DataFrame) -> dict[str, np.ndarray]:
        if self.per_column:
            return {column: prepared[[column]].to_numpy() for column in self.columns}
        dtype = object if self.kinds[0] == "string" else "float32"
        return {self.tensor_name: prepared.to_numpy(dtype)}

    def native(self, prepared: pd.DataFrame) -> Any:
        if self.per_column or self.frame_input:
            return prepared
        return prepared.to_numpy(object if self.kinds[0] == "string" else "float32")


def _input_plan(model: Any, frame: pd.DataFrame, signature_inputs: list[dict]) -> _InputPlan:
    from sklearn.compose import ColumnTransformer

    columns = [str(column) for column in frame.columns]
    kinds = [_column_kind(frame[column]) for column in columns]
    fitted_on_frame = getattr(model, "feature_names_in_", None) is not None
    per_column = fitted_on_frame and isinstance(_entrance(model), ColumnTransformer)
    if not per_column:
        if all(kind == "string" for kind in kinds):
            kinds = ["string"] * len(kinds)
        elif any(kind == "string" for kind in kinds):
            # Strings and numbers cannot share one tensor; skl2onnx takes them as one input per column.
            per_column = True
        else:
            kinds = ["float"] * len(kinds)
    tensor_name = str(signature_inputs[0].get("name") or "input") if len(signature_inputs) == 1 else "input"
    return _InputPlan(per_column, columns, kinds, tensor_name, fitted_on_frame)


def _column_kind(values: pd.Series) -> str:
    import pandas as pd

    if pd.api.types.is_bool_dtype(values):
        return "float"
    if pd.api.types.is_integer_dtype(values):
        # A nullable integer column with gaps becomes floats, where NaN can stand for the gaps.
        return "float" if values.isna().any() else "int"
    if pd.api.types.is_float_dtype(values):
        return "float"
    try:
        numbers = pd.to_numeric(values, errors="coerce")
    except (TypeError, ValueError):  # categoricals and other objects that are not numbers
        return "string"
    if numbers.notna().sum() == values.notna().sum() and values.notna().any():
        return "float"
    return "string"


# ------------------------------------------------ parity, quantisation, timing


def _native_outputs(model: Any, kind: str, native_input: Any) -> tuple[Any, Any]:
    """(labels or None, values or None): labels and probabilities, predictions, or transformed rows."""
    if kind == "classifier":
        probabilities = model.predict_proba(native_input) if hasattr(model, "predict_proba") else None
        return model.predict(native_input), probabilities
    if kind == "predictor":
        return None, model.predict(native_input)
    values = model.transform(native_input)
    return None, values.toarray() if hasattr(values, "toarray") else values


def _onnx_outputs(kind: str, outputs: list[Any]) -> tuple[Any, Any]:
    if kind == "classifier":
        return outputs[0], outputs[1] if len(outputs) > 1 else None
    return None, outputs[0]


def _differing_labels(native: Any, converted: Any) -> np.ndarray:
    """Per row, whether the two labels differ."""
    import numpy as np

    native, converted = np.asarray(native).ravel(), np.asarray(converted).ravel()
    if native.shape != converted.shape:
        return np.ones(max(len(native), len(converted)), dtype=bool)
    if native.dtype.kind in "biuf" and converted.dtype.kind in "biuf":
        return native.astype(np.float64) != converted.astype(np.float64)
    return native.astype(str) != converted.astype(str)


def _ties(probabilities: Any) -> np.ndarray:
    """Per row, whether its two likeliest classes are within the tolerance of each other.

    Such a row's label is a coin toss that float32 rounding may turn either way, in ONNX or natively
    (a forest of 20 trees splitting 10 to 10), while the probabilities agree.
    """
    import numpy as np

    values = np.asarray(probabilities, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] < 2:
        return np.zeros(len(values), dtype=bool)
    top_two = np.sort(values, axis=1)[:, -2:]
    return (top_two[:, 1] - top_two[:, 0]) <= 2 * PARITY_TOLERANCE


def _differences(native: Any, converted: Any) -> tuple[np.ndarray, np.ndarray]:
    """|native - converted| and the native values, as float64 matrices (NaN in both counts as equal)."""
    import numpy as np

    rows = len(native)
    expected = np.asarray(native, dtype=np.float64).reshape(rows, -1)
    actual = np.asarray(converted, dtype=np.float64).reshape(rows, -1)
    if expected.shape != actual.shape:
        raise FailedPrecondition(
            f"the ONNX model's output has shape {list(actual.shape)} where the native model's has "
            f"{list(expected.shape)}; the converter does not reproduce this model",
            reason="PARITY",
        )
    with np.errstate(invalid="ignore"):
        difference = np.abs(expected - actual)
    both_missing = np.isnan(expected) & np.isnan(actual)
    difference = np.where(both_missing, 0.0, np.where(np.isnan(difference), np.inf, difference))
    return difference, expected


def _check_parity(model: Any, kind: str, plan: _InputPlan, prepared: pd.DataFrame, onnx_path: Path) -> dict[str, Any]:
    import numpy as np

    native_labels, native_values = _native_outputs(model, kind, plan.native(prepared))
    onnx_labels, onnx_values = _onnx_outputs(kind, _session(onnx_path).run(None, plan.feeds(prepared)))
    differing = 0
    if native_labels is not None:
        differs = _differing_labels(native_labels, onnx_labels)
        if native_values is not None and len(differs) == len(native_values):
            differs &= ~_ties(native_values)
        differing = int(differs.sum())
    max_abs_diff, within = 0.0, True
    if native_values is not None and onnx_values is not None:
        difference, expected = _differences(native_values, onnx_values)
        max_abs_diff = float(difference.max()) if difference.size else 0.0
        # Probabilities lie in [0, 1]; predictions can be large, where float32 alone is off by more than
        # 1e-5, so their tolerance grows with their size.
        allowed = PARITY_TOLERANCE if kind == "classifier" else PARITY_TOLERANCE * np.maximum(1.0, np.abs(expected))
        within = bool(np.all(difference <= allowed))
    rows = len(prepared)
    if differing or not within:
        if kind == "classifier":
            found = f"{differing} of {rows} labels differ and probabilities differ by up to {max_abs_diff:.3g}"
        else:
            found = f"outputs differ by up to {max_abs_diff:.3g} on {rows} rows"
        raise FailedPrecondition(
            f"the ONNX model does not predict what the native model does on the sample: {found} (allowed: "
            f"{PARITY_TOLERANCE:g}). ONNX computes in float32, which can move a value lying close to a split "
            "threshold to its other side, most often behind a scaler (trees need none). The model was not "
            "converted; serve it natively, or retrain it without the scaler.",
            reason="PARITY",
        )
    return {"rows": rows, "labels_equal": differing == 0, "max_abs_diff": max_abs_diff}


def _compare_quantised(
    model: Any, kind: str, plan: _InputPlan, prepared: pd.DataFrame, reference_path: Path, quantised_path: Path
) -> dict[str, float | None]:
    """Share of labels quantisation leaves as they are, and its largest change of probabilities or outputs."""
    import numpy as np

    feeds = plan.feeds(prepared)
    reference_labels, _ = _onnx_outputs(kind, _session(reference_path).run(None, feeds))
    labels, values = _onnx_outputs(kind, _session(quantised_path).run(None, feeds))
    _, native_values = _native_outputs(model, kind, plan.native(prepared))
    agreement = None
    if reference_labels is not None and labels is not None:
        agreement = 1.0 - float(_differing_labels(reference_labels, labels).mean())
    max_abs_diff = None
    if native_values is not None and values is not None:
        difference, _ = _differences(native_values, values)
        max_abs_diff = float(np.max(difference)) if difference.size else 0.0
    return {"label_agreement": agreement, "max_abs_diff": max_abs_diff}


def _time(model: Any, kind: str, plan: _InputPlan, prepared: pd.DataFrame, onnx_path: Path) -> dict[str, float]:
    """Median milliseconds of one-row and 1,000-row calls, native and onnxruntime, one thread each."""
    import numpy as np

    session = _session(onnx_path)
    native_call = model.predict_proba if kind == "classifier" and hasattr(model, "predict_proba") else None
    if native_call is None:
        native_call = model.predict if kind != "transformer" else model.transform
    one_row = prepared.iloc[:1].reset_index(drop=True)
    many_rows = prepared.iloc[np.arange(TIMING_ROWS) % len(prepared)].reset_index(drop=True)
    timings = {}
    for label, rows, calls, budget in (
        ("one_row", one_row, ONE_ROW_CALLS, ONE_ROW_BUDGET_SECONDS),
        ("1000_rows", many_rows, MANY_ROWS_CALLS, MANY_ROWS_BUDGET_SECONDS),
    ):
        native_input, feeds = plan.native(rows), plan.feeds(rows)
        timings[f"native_{label}_ms"] = _median_ms(lambda x=native_input: native_call(x), calls, budget)
        timings[f"onnx_{label}_ms"] = _median_ms(lambda f=feeds: session.run(None, f), calls, budget)
    for label in ("one_row", "1000_rows"):
        native, converted = timings[f"native_{label}_ms"], timings[f"onnx_{label}_ms"]
        timings[f"speedup_{label}"] = round(native / converted, 3) if converted > 0 else 0.0
    return timings


def _median_ms(call: Any, calls: int, budget_seconds: float) -> float:
    import statistics

    call()  # the first call pays for lazy initialisation
    durations = []
    stop = time.perf_counter() + budget_seconds
    while len(durations) < calls:
        started = time.perf_counter()
        call()
        durations.append(time.perf_counter() - started)
        if time.perf_counter() >= stop:
            break
    return round(statistics.median(durations) * 1000, 4)


if __name__ == "__main__":
    main()

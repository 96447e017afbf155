"""What a run does outside the database: prepare the registered environment it trains in, run
the training command, read what it wrote, find the training code's git commit, and score a model
on a holdout dataset."""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.common.convert import read_table_file
from services.common.locks import file_lock

METRICS = {"accuracy": True, "f1": True, "auc": True, "rmse": False}
"""Each metric, and whether higher is better."""


@dataclass
class Trained:
    exit_code: int | None
    """None when it ran past its timeout and was killed."""
    log_tail: list[str]
    seconds: float


def run_command(
    command: list[str],
    working_dir: Path,
    environment: dict[str, str],
    timeout: float,
    log_lines: int,
    python_environment: Path | None = None,
) -> Trained:
    """Run `command` (no shell) with `environment` added to this process's, keeping the last
    `log_lines` lines it prints (stdout and stderr together); killed after `timeout` seconds.
    With `python_environment` (a virtual environment), the command runs in it: its bin folder
    comes first on PATH, so `python` and the environment's scripts are its own."""
    started = time.monotonic()
    tail: collections.deque[str] = collections.deque(maxlen=log_lines)
    variables = {**os.environ, **environment}
    if python_environment is not None:
        for inherited in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE"):
            variables.pop(inherited, None)
        variables["VIRTUAL_ENV"] = str(python_environment)
        variables["PATH"] = os.pathsep.join([str(python_environment / "bin"), variables.get("PATH", os.defpath)])
        variables["PYTHONNOUSERSITE"] = "1"
    process = subprocess.Popen(
        command,
        cwd=working_dir,
        env=variables,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    assert process.stdout is not None

    def read() -> None:
        for line in process.stdout:  # type: ignore[union-attr]
            tail.append(line.decode(errors="replace").rstrip()[:1000])

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code: int | None = process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        code = None
    reader.join(5)
    return Trained(code, list(tail), time.monotonic() - started)


@dataclass(frozen=True)
class LockedEnvironment:
    """A registered environment as training needs it."""

    ref: str
    """`name:version`."""
    python_version: str
    """`3.11`, say."""
    lock_text: str
    """requirements.txt lines `name==version --hash=sha256:...`: every package, pinned to one file."""


class EnvironmentFailed(Exception):
    """The environment could not be made here; the message says why and what to do."""


READY = ".mlmesh-ready"
"""Written into a prepared environment last: a folder without it was left half made."""


def prepare_environment(
    locked: LockedEnvironment, cache: Path, pip_arguments: list[str], timeout: float, log_lines: int
) -> tuple[Path, list[str]]:
    """A virtual environment with exactly the packages of `locked`, made under `cache` once and
    reused by later runs; (its folder, what making it printed, empty when it was reused).

    The environment's Python must be on this machine: this process's own, or `pythonX.Y` on
    PATH. pip installs the lock with --require-hashes and --no-deps, so nothing outside the lock
    comes in and every file is the one the lock names.

    Raises:
        EnvironmentFailed: no such Python here, or venv or pip failed (their last lines say why).
    """
    key = hashlib.sha256(f"{locked.python_version}\n{locked.lock_text}".encode()).hexdigest()[:16]
    folder = cache / f"{locked.ref.replace(':', '-')}-{key}"
    cache.mkdir(parents=True, exist_ok=True)
    with file_lock(cache / f"{folder.name}.lock"):  # runs sharing an environment make it once
        if (folder / READY).is_file():
            return folder, []
        shutil.rmtree(folder, ignore_errors=True)  # what an interrupted run left
        python = _interpreter(locked)
        lock_file = cache / f"{folder.name}.txt"
        lock_file.write_text(locked.lock_text)
        pip = [str(folder / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--require-hashes"]
        pip += ["--progress-bar", "off", "--disable-pip-version-check", "--no-input", *pip_arguments]
        # pip runs as the training will: inside the environment, nothing of this process's PYTHONPATH.
        steps = [
            ("venv", [python, "-m", "venv", str(folder)], None),
            ("pip", [*pip, "--requirement", str(lock_file)], folder),
        ]
        printed: list[str] = []
        for name, command, inside in steps:
            done = run_command(command, cache, {}, timeout, log_lines, inside)
            printed += done.log_tail
            if done.exit_code != 0:
                shutil.rmtree(folder, ignore_errors=True)
                why = f"ran past its {timeout:g} s" if done.exit_code is None else f"exited with {done.exit_code}"
                last = "\n".join(done.log_tail[-10:]) or "(it printed nothing)"
                raise EnvironmentFailed(f"making environment {locked.ref}: {name} {why}:\n{last}")
        (folder / READY).write_text(locked.lock_text)
        return folder, printed


def _interpreter(locked: LockedEnvironment) -> str:
    """The Python the environment is for, on this machine."""
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    if locked.python_version == running:
        return sys.executable
    found = shutil.which(f"python{locked.python_version}")
    if found is None:
        raise EnvironmentFailed(
            f"environment {locked.ref} is for Python {locked.python_version}, and this machine has no "
            f"python{locked.python_version} on PATH (the automation service runs Python {running}); install it, "
            f"or register an environment for Python {running}"
        )
    return found


def read_metrics(output_dir: Path) -> dict[str, float]:
    """metrics.json of the output folder: the numbers in it (nothing when absent or malformed)."""
    try:
        values = json.loads((output_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(values, dict):
        return {}
    return {
        str(key)[:100]: float(value)
        for key, value in list(values.items())[:100]
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    }


def git_lineage(directory: Path) -> dict[str, str]:
    """repo, branch and commit of the git checkout holding `directory` (empty when it is none)."""

    def git(*arguments: str) -> str:
        try:
            done = subprocess.run(["git", "-C", str(directory), *arguments], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    return {
        "commit": commit,
        "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
        "repo": git("config", "--get", "remote.origin.url") or str(directory),
    }


class EvaluationError(Exception):
    """The holdout data and the model do not fit together; the message says how."""


def holdout(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(features [n, F] float32, labels, feature names) of a holdout CSV/Parquet file."""
    table = read_table_file(path)
    if label_column not in table.column_names:
        raise EvaluationError(f"the holdout dataset has no column {label_column!r} (it has {table.column_names[:20]})")
    names = [name for name in table.column_names if name != label_column]
    if not names or table.num_rows == 0:
        raise EvaluationError("the holdout dataset has no feature columns or no rows")
    try:
        features = np.column_stack([table.column(name).to_numpy().astype(np.float32) for name in names])
    except (ValueError, TypeError) as error:
        raise EvaluationError(f"the holdout features must be numbers: {error}") from None
    labels = table.column(label_column).to_numpy()
    return features, labels, names


def score(model_path: Path, features: np.ndarray, labels: np.ndarray, metric: str) -> float:
    """The model's `metric` on the holdout data (onnxruntime, one input of [n, F] floats)."""
    import onnxruntime
    from sklearn import metrics as sklearn_metrics

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    try:
        session = onnxruntime.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        (model_input,) = session.get_inputs()
        outputs = session.run(None, {model_input.name: features})
    except ValueError:
        raise EvaluationError("the model must take exactly one input, the holdout's feature columns") from None
    except Exception as error:  # onnxruntime raises its own types for shape and type mismatches
        raise EvaluationError(f"the model cannot score the holdout data: {error}") from None
    predicted = np.asarray(outputs[0]).reshape(len(features), -1)[:, 0]
    if metric == "rmse":
        return float(np.sqrt(np.mean((predicted.astype(np.float64) - labels.astype(np.float64)) ** 2)))
    if metric == "accuracy":
        return float(sklearn_metrics.accuracy_score(labels, predicted))
    if metric == "f1":
        average = "binary" if len(np.unique(labels)) <= 2 else "macro"
        return float(sklearn_metrics.f1_score(labels, predicted, average=average))
    if len(outputs) < 2:
        raise EvaluationError("auc needs the model's class probabilities as its second output")
    probabilities = np.asarray(outputs[1])
    if probabilities.ndim != 2 or probabilities.shape[1] != 2:
        raise EvaluationError("auc is for binary classifiers: probabilities of two classes")
    return float(sklearn_metrics.roc_auc_score(labels, probabilities[:, 1]))

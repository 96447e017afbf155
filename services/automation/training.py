"""What a run does outside the database: run the training command, read what it wrote, find
the training code's git commit, and score a model on a holdout dataset."""

from __future__ import annotations

import collections
import json
import math
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.common.convert import read_table_file

METRICS = {"accuracy": True, "f1": True, "auc": True, "rmse": False}
"""Each metric, and whether higher is better."""


@dataclass
class Trained:
    exit_code: int | None
    """None when it ran past its timeout and was killed."""
    log_tail: list[str]
    seconds: float


def run_command(
    command: list[str], working_dir: Path, environment: dict[str, str], timeout: float, log_lines: int
) -> Trained:
    """Run `command` (no shell) with `environment` added to this process's, keeping the last
    `log_lines` lines it prints (stdout and stderr together); killed after `timeout` seconds."""
    started = time.monotonic()
    tail: collections.deque[str] = collections.deque(maxlen=log_lines)
    process = subprocess.Popen(
        command,
        cwd=working_dir,
        env={**os.environ, **environment},
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

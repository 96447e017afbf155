"""Builder benchmark: conversion time and native vs onnxruntime latency per model type, and model
image builds, cold and cached, with the image's size over its base.

Prints one JSON document to stdout; progress goes to stderr. Run from the repository root:

    .venv/bin/python bench/builder.py              # conversions and images (a few minutes)
    .venv/bin/python bench/builder.py --no-images  # conversions only (no Docker engine needed)

Each model is trained on seeded data, pickled with joblib and converted by the builder's own
conversion worker (services.builder.convert), which also times the native model against
onnxruntime on one row and on 1,000 rows: the two are measured in the same worker, so the
speedup is a ratio of the same run. Images are built by services.builder.images on the local
Docker engine, on `mlmesh-base:py3.11` (deploy/build-base-image.sh makes it); "cold" starts with
an empty work folder (wheels downloaded again, layers not cached for this model), "cached" asks
for the same image again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import GradientBoostingClassifier, HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.builder.convert import convert_model  # noqa: E402
from services.builder.images import ImageBuilder, ImageSpec, ModelPayload  # noqa: E402

BASE_IMAGE = "mlmesh-base:py3.11"
TARGETS = {
    "cached_build_seconds": ("<=", 2.0),
    "image_over_base_mb": ("<=", 400.0),
}


def log(message: str) -> None:
    print(f"{datetime.now():%H:%M:%S} {message}", file=sys.stderr, flush=True)


def models() -> dict[str, tuple[Any, pd.DataFrame | np.ndarray]]:
    """Each model type, fitted on the breast cancer data (the pipeline on a frame with a city column)."""
    from lightgbm import LGBMClassifier
    from xgboost import XGBClassifier

    features, labels = load_breast_cancer(return_X_y=True)
    frame = pd.DataFrame(features[:, :8], columns=[f"f{n}" for n in range(8)])
    frame["city"] = np.random.default_rng(0).choice(["lyon", "paris", "nice"], len(frame))
    pipeline = Pipeline(
        [
            (
                "prepare",
                ColumnTransformer(
                    [("scale", StandardScaler(), list(frame.columns[:8])), ("city", OneHotEncoder(), ["city"])]
                ),
            ),
            ("classify", LogisticRegression(max_iter=5000)),
        ]
    )
    return {
        "logistic_regression": (LogisticRegression(max_iter=5000).fit(features, labels), features),
        "random_forest_100_depth_8": (
            RandomForestClassifier(n_estimators=100, max_depth=8, random_state=0).fit(features, labels),
            features,
        ),
        "gradient_boosting": (GradientBoostingClassifier(random_state=0).fit(features, labels), features),
        "hist_gradient_boosting": (HistGradientBoostingClassifier(random_state=0).fit(features, labels), features),
        "pipeline_scaler_onehot_logistic": (pipeline.fit(frame, labels), frame),
        "xgboost": (XGBClassifier(n_estimators=100, max_depth=6, n_jobs=1).fit(features, labels), features),
        "lightgbm": (LGBMClassifier(n_estimators=100, n_jobs=1, verbose=-1).fit(features, labels), features),
    }


def conversions(work: Path) -> tuple[dict[str, Any], Path, dict]:
    """Convert every model type; returns the figures, and the forest's ONNX file and signature."""
    results: dict[str, Any] = {}
    forest: tuple[Path, dict] | None = None
    for name, (model, sample) in models().items():
        folder = work / name
        folder.mkdir(parents=True)
        joblib.dump(model, folder / "model.joblib")
        # The pipeline needs its frame's columns; the others are checked on rows generated from the model.
        sample_path = None
        if isinstance(sample, pd.DataFrame):
            sample_path = folder / "sample.parquet"
            sample.to_parquet(sample_path)
        log(f"converting {name}")
        started = time.perf_counter()
        result = convert_model(folder / "model.joblib", folder / "out", sample_path=sample_path)
        seconds = time.perf_counter() - started
        results[name] = {
            "conversion_seconds": round(seconds, 2),
            "estimator": result.estimator,
            "labels_equal": result.labels_equal,
            "max_abs_diff": result.max_abs_diff,
            "native_one_row_us": round(result.native_one_row_ms * 1000, 1),
            "onnx_one_row_us": round(result.onnx_one_row_ms * 1000, 1),
            "speedup_one_row": round(result.speedup_one_row, 1),
            "native_1000_rows_ms": round(result.native_1000_rows_ms, 3),
            "onnx_1000_rows_ms": round(result.onnx_1000_rows_ms, 3),
            "speedup_1000_rows": round(result.speedup_1000_rows, 1),
        }
        if name.startswith("random_forest"):
            forest = (result.onnx_path, {"inputs": result.inputs, "outputs": result.outputs})
    assert forest is not None
    return results, *forest


def images(work: Path, onnx_path: Path, signature: dict) -> dict[str, Any]:
    """A cold build, then the same image asked for again; the size over the base."""
    import docker

    engine = docker.APIClient(version="auto")
    if subprocess.run(["bash", str(ROOT / "deploy" / "build-base-image.sh")], capture_output=True).returncode:
        raise SystemExit(f"bench/builder.py needs {BASE_IMAGE}: run deploy/build-base-image.sh and see why it fails")
    sha256 = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    # A name of its own each run, so that the cold build is cold for the model's layers too.
    name = f"bench-forest-{int(time.time())}"
    spec = ImageSpec(
        models=(ModelPayload(name, 1, sha256, onnx_path, signature),),
        environment="",
        lock_text="",
        python_version="3.11",
        base_image=BASE_IMAGE,
        runtime_settings={},
    )
    builder = ImageBuilder(work / "images")
    lines: list[str] = []
    log("building the image cold")
    started = time.perf_counter()
    built = builder.build(spec, lines.append)
    cold = time.perf_counter() - started
    log("asking for the same image again")
    started = time.perf_counter()
    again = builder.build(spec, lines.append)
    cached = time.perf_counter() - started
    base_size = engine.inspect_image(BASE_IMAGE)["Size"]
    result = {
        "cold_build_seconds": round(cold, 1),
        "cached_build_seconds": round(cached, 2),
        "cached_reused": again.reused,
        "image_mb": round(built.size_bytes / 1e6, 1),
        "base_mb": round(base_size / 1e6, 1),
        "image_over_base_mb": round((built.size_bytes - base_size) / 1e6, 1),
        "note": "cold = wheels downloaded into an empty work folder and the model's layers built; the "
        "install layer of the runtime's dependencies may still come from the engine's cache of an earlier run",
    }
    engine.remove_image(built.tag, force=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-images", action="store_true", help="skip the image builds (no Docker engine needed)")
    arguments = parser.parse_args()
    report: dict[str, Any] = {
        "benchmark": "builder",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count()},
    }
    with tempfile.TemporaryDirectory(prefix="mlmesh-bench-builder-") as scratch:
        work = Path(scratch)
        report["conversions"], onnx_path, signature = conversions(work)
        if not arguments.no_images:
            report["images"] = images(work, onnx_path, signature)
    verdicts = {}
    for key, (operator, limit) in TARGETS.items():
        value = report.get("images", {}).get(key)
        if value is not None:
            verdicts[key] = {"value": value, "target": f"{operator} {limit}", "pass": value <= limit}
    report["targets"] = verdicts
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

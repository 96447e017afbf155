"""Benchmark of services.drift.statistics.check on 1,000,000 rows x 20 numeric float64 features (3 of them shifted).

Prints one JSON object. Timings are wall-clock seconds of single-threaded numpy work (time.perf_counter).
Memory (MB = 10^6 bytes): peak_extra_mb is the peak of the bytes traced by tracemalloc (numpy reports its array
buffers to it) during one ``check``, above what was allocated before it started, measured in a separate run from the
timed ones.
The exact baseline runs scipy.stats.wasserstein_distance and scipy.stats.ks_2samp on the full baseline and window
of each feature. ``--evidently`` also times Evidently's DataDriftPreset when that package is importable.

Run from the repository root:

    .venv/bin/python bench/drift.py [--rows N] [--features F] [--repeats R] [--evidently] [--skip-exact]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from services.drift import statistics as ds

SHIFTED = ("f00", "f07", "f14")


def make_data(rows: int, features: int, seed: int = 7) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Baseline and window columns: normal, lognormal and uniform in turn; f00 mean +0.5 std, f07 scale x1.5, f14
    range widened by half on each side (shifted only when those features exist)."""
    rng = np.random.default_rng(seed)
    baseline: dict[str, np.ndarray] = {}
    window: dict[str, np.ndarray] = {}
    for index in range(features):
        name = f"f{index:02d}"
        draw = _distribution(index)
        baseline[name] = draw(rng, rows, 0.0, 1.0)
        if name == "f00":
            window[name] = draw(rng, rows, 0.5, 1.0)
        elif name == "f07":
            window[name] = draw(rng, rows, 0.0, 1.5)
        elif name == "f14":
            window[name] = draw(rng, rows, 0.0, 2.0)
        else:
            window[name] = draw(rng, rows, 0.0, 1.0)
    return baseline, window


def _distribution(index: int) -> Callable[[np.random.Generator, int, float, float], np.ndarray]:
    kind = index % 3
    if kind == 0:
        return lambda rng, size, shift, scale: rng.normal(10.0 + shift, scale, size)
    if kind == 1:
        return lambda rng, size, shift, scale: rng.lognormal(shift, 0.5 * scale, size)
    return lambda rng, size, shift, scale: rng.uniform(-scale + shift, scale + shift, size)


def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = function()
    return time.perf_counter() - start, value


def peak_extra_bytes(function: Callable[[], Any]) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        function()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - before


def exact_scipy(baseline: dict[str, np.ndarray], window: dict[str, np.ndarray]) -> float:
    start = time.perf_counter()
    for name, values in baseline.items():
        stats.wasserstein_distance(values, window[name])
        stats.ks_2samp(values, window[name])
    return time.perf_counter() - start


def evidently_seconds(baseline: dict[str, np.ndarray], window: dict[str, np.ndarray]) -> dict[str, Any]:
    """Evidently's DataDriftPreset on the same data, through its current API (0.7+) or the older one (0.4-0.6)."""
    try:
        import pandas as pd
    except ImportError as error:
        return {"evidently_note": f"evidently not run: {error}"}
    try:
        from evidently import Report
        from evidently.presets import DataDriftPreset
    except ImportError:
        try:
            from evidently.metric_preset import DataDriftPreset
            from evidently.report import Report
        except ImportError as error:
            return {"evidently_note": f"evidently not installed, not run: {error}"}
    reference, current = pd.DataFrame(baseline), pd.DataFrame(window)
    report = Report([DataDriftPreset()])
    seconds, _ = timed(lambda: report.run(reference_data=reference, current_data=current))
    return {"evidently_seconds": round(seconds, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--evidently", action="store_true", help="also time Evidently's DataDriftPreset")
    parser.add_argument("--skip-exact", action="store_true", help="skip the exact scipy baseline")
    args = parser.parse_args()

    baseline, window = make_data(args.rows, args.features)
    summary_seconds, summaries = timed(lambda: {name: ds.summarize(values) for name, values in baseline.items()})
    check_times = []
    result = None
    for _ in range(args.repeats):
        seconds, result = timed(lambda: ds.check(summaries, window))
        check_times.append(seconds)
    assert result is not None
    peak_mb = peak_extra_bytes(lambda: ds.check(summaries, window)) / 1e6
    window_mb = sum(values.nbytes for values in window.values()) / 1e6
    best = min(check_times)
    output: dict[str, Any] = {
        "rows": args.rows,
        "features": args.features,
        "summary_seconds": round(summary_seconds, 4),
        "check_seconds_best": round(best, 4),
        "check_seconds_median": round(statistics.median(check_times), 4),
        "peak_extra_mb": round(peak_mb, 2),
        "memory_method": "tracemalloc peak during one check, above the traced bytes before it",
        "window_mb": round(window_mb, 2),
        "memory_ratio": round(peak_mb / window_mb, 4),
        "summary_json_kb_per_feature": round(
            statistics.mean(len(json.dumps(summary.to_dict())) for summary in summaries.values()) / 1e3, 1
        ),
        "drifted_features": list(result.drifted_features),
        "expected_drifted": [name for name in SHIFTED if name in baseline],
    }
    if not args.skip_exact:
        exact = exact_scipy(baseline, window)
        output["scipy_exact_seconds"] = round(exact, 4)
        output["speedup_vs_exact"] = round(exact / best, 1)
    if args.evidently:
        output.update(evidently_seconds(baseline, window))
        if "evidently_seconds" in output:
            # Evidently summarises the reference on every run; a monitor does it once, so both are shown.
            output["speedup_vs_evidently"] = round(output["evidently_seconds"] / best, 1)
            output["speedup_vs_evidently_with_summary"] = round(
                output["evidently_seconds"] / (best + output["summary_seconds"]), 1
            )
    print(json.dumps(output))


if __name__ == "__main__":
    main()

"""Conversions to ONNX in real worker processes: parity with the native models, samples from files or
generated from the model, quantisation, refusals, and hostile pickles stopped by the worker's limits."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pandas as pd
import pytest
from lightgbm import LGBMClassifier, LGBMRegressor
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import (
    GradientBoostingClassifier,
    HistGradientBoostingClassifier,
    RandomForestClassifier,
    RandomForestRegressor,
    RandomTreesEmbedding,
)
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import NearestCentroid
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from xgboost import XGBClassifier, XGBRegressor

from services.builder.convert import (
    LOG_FILE,
    ConversionLimits,
    ConversionOptions,
    ConversionResult,
    convert_model,
)
from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from tests.builder.sample_models import (
    ExitsWhenLoaded,
    GrowsWhenLoaded,
    SleepsWhenLoaded,
    SpinsWhenLoaded,
    breast_cancer,
    customers,
    diabetes,
    save_csv,
    save_input_example,
    save_model,
    save_parquet,
    save_pickle,
)

__all__ = ["breast_cancer", "customers", "diabetes"]  # fixtures, used by name

TOLERANCE = 1e-5
# 500 rows keep each conversion's parity check and timing short.
OPTIONS = ConversionOptions(parity_rows=500)


@dataclass
class Case:
    """A model, how to convert it, and rows to check the converted model on."""

    model: Any
    rows: Any
    """What the native model takes: an array or a DataFrame."""
    sample: Callable[[Path], Path] | None = None
    signature_inputs: list[dict] | None = None
    options: ConversionOptions = OPTIONS
    out_dir: Path | None = None
    result: ConversionResult | None = None
    error: Exception | None = None

    def converted(self) -> ConversionResult:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def customer_pipeline(frame: pd.DataFrame, labels: np.ndarray) -> Pipeline:
    columns = ColumnTransformer(
        [
            ("numbers", StandardScaler(), ["age", "income", "rooms"]),
            ("city", OneHotEncoder(handle_unknown="ignore"), ["city"]),
        ]
    )
    return Pipeline([("columns", columns), ("classifier", LogisticRegression())]).fit(frame, labels)


@pytest.fixture(scope="module")
def conversions(breast_cancer, diabetes, customers, tmp_path_factory) -> dict[str, Case]:
    """Every conversion of real models in this module, two at a time (a worker uses one core)."""
    frame, labels = breast_cancer
    arrays = frame.to_numpy()
    regression_features, targets = diabetes
    customer_frame, customer_labels = customers
    pipeline = customer_pipeline(customer_frame, customer_labels)
    with_target = frame.assign(target=labels)
    cases = {
        "logistic_regression": Case(LogisticRegression(max_iter=5000).fit(arrays, labels), arrays),
        "random_forest": Case(
            RandomForestClassifier(n_estimators=20, max_depth=6, random_state=0).fit(frame, labels),
            frame,
            sample=lambda folder: save_csv(with_target.iloc[:150], folder / "sample.csv"),
        ),
        "logistic_regression_again": Case(LogisticRegression(max_iter=5000).fit(arrays, labels), arrays),
        "gradient_boosting": Case(
            GradientBoostingClassifier(n_estimators=20, random_state=0).fit(arrays, labels),
            arrays,
            signature_inputs=[{"name": "features", "datatype": "FP32", "shape": [-1, 30]}],
            options=ConversionOptions(optimize=False, target_opset=15, parity_rows=500),
        ),
        "hist_gradient_boosting": Case(
            HistGradientBoostingClassifier(max_iter=20, random_state=0).fit(arrays, labels),
            arrays,
            sample=lambda folder: save_parquet(frame.iloc[100:400], folder / "sample.parquet"),
        ),
        "column_pipeline": Case(
            pipeline,
            customer_frame,
            sample=lambda folder: save_input_example(customer_frame.iloc[:20], folder / "input_example.json"),
        ),
        "column_pipeline_generated": Case(pipeline, customer_frame),
        "imputed_pipeline": Case(
            make_pipeline(
                ColumnTransformer(
                    [
                        ("rooms", SimpleImputer(), ["rooms"]),
                        ("numbers", StandardScaler(), ["age", "income"]),
                        ("city", OneHotEncoder(), ["city"]),
                    ]
                ),
                LogisticRegression(),
            ).fit(customer_frame, customer_labels),
            customer_frame,
            sample=lambda folder: save_csv(customer_frame.iloc[:100], folder / "sample.csv"),
        ),
        "xgboost": Case(XGBClassifier(n_estimators=20, max_depth=3, random_state=0).fit(arrays, labels), arrays),
        "lightgbm": Case(
            LGBMClassifier(n_estimators=20, random_state=0, verbose=-1).fit(frame, labels),
            frame,
            sample=lambda folder: save_input_example(frame.iloc[:40], folder / "input_example.json", wrapped=True),
        ),
        "random_forest_regressor": Case(
            RandomForestRegressor(n_estimators=20, max_depth=8, random_state=0).fit(regression_features, targets),
            regression_features,
        ),
        "lightgbm_regressor": Case(
            LGBMRegressor(n_estimators=20, random_state=0, verbose=-1).fit(regression_features, targets),
            regression_features,
        ),
        "xgboost_pipeline": Case(
            make_pipeline(
                ColumnTransformer([("city", OneHotEncoder(), ["city"])], remainder="passthrough"),
                XGBClassifier(n_estimators=20, max_depth=3, random_state=0),
            ).fit(customer_frame, customer_labels),
            customer_frame,
            sample=lambda folder: save_csv(customer_frame, folder / "sample.csv"),
        ),
        "scaled_trees": Case(
            make_pipeline(StandardScaler(), XGBRegressor(n_estimators=20, max_depth=3)).fit(
                regression_features, targets
            ),
            regression_features,
            sample=lambda folder: save_csv(pd.DataFrame(regression_features), folder / "sample.csv"),
        ),
        "quantised_network": Case(
            make_pipeline(StandardScaler(), MLPClassifier((32,), max_iter=400, random_state=0)).fit(arrays, labels),
            arrays,
            options=ConversionOptions(quantize=True, parity_rows=500),
        ),
        "quantised_forest": Case(
            RandomForestClassifier(n_estimators=5, random_state=0).fit(arrays, labels),
            arrays,
            options=ConversionOptions(quantize=True),
        ),
        "unsupported_in_pipeline": Case(make_pipeline(StandardScaler(), NearestCentroid()).fit(arrays, labels), arrays),
        "sparse_embedding": Case(RandomTreesEmbedding(n_estimators=5, random_state=0).fit(arrays), arrays),
    }

    # Files are written here, one at a time: pandas and pickling are not safe in threads over shared objects.
    requests = {}
    for name, case in cases.items():
        folder = tmp_path_factory.mktemp(name)
        case.out_dir = folder / "out"
        requests[name] = (save_model(case.model, folder / "model.joblib"), case.sample(folder) if case.sample else None)

    def convert(name: str) -> None:
        case = cases[name]
        model_path, sample_path = requests[name]
        try:
            case.result = convert_model(
                model_path,
                case.out_dir,
                sample_path=sample_path,
                signature_inputs=case.signature_inputs,
                options=case.options,
            )
        except Exception as error:  # each test reports its own conversion's failure
            case.error = error

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(convert, cases))
    return cases


def onnx_feeds(session: onnxruntime.InferenceSession, rows: Any) -> dict[str, np.ndarray]:
    """The ONNX inputs for `rows`: one float32 tensor, or a [-1, 1] tensor per column."""
    inputs = session.get_inputs()
    if len(inputs) == 1:
        return {inputs[0].name: np.asarray(rows, dtype=np.float32)}
    dtypes = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(string)": object}
    return {spec.name: rows[[spec.name]].to_numpy(dtypes[spec.type]) for spec in inputs}


def float32_rows(rows: Any) -> Any:
    """The rows as ONNX sees them: floats rounded to float32, other columns as they are."""
    if isinstance(rows, pd.DataFrame):
        return rows.apply(lambda column: column.astype(np.float32) if column.dtype.kind == "f" else column)
    return np.asarray(rows, dtype=np.float32)


def worker_process_group(out_dir: Path) -> int | None:
    match = re.search(r"process group (\d+)", (out_dir / LOG_FILE).read_text())
    return int(match.group(1)) if match else None


def live_processes_in_group(group: int) -> list[int]:
    """Processes of `group` that are not zombies (which an init that does not reap may leave)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == group and fields[0] not in ("Z", "X"):
            members.append(int(stat.parent.name))
    return members


def assert_nothing_left_but_the_log(out_dir: Path) -> None:
    assert sorted(path.name for path in out_dir.iterdir()) == [LOG_FILE]


PARITY_CASES = [
    "logistic_regression",
    "random_forest",
    "gradient_boosting",
    "hist_gradient_boosting",
    "column_pipeline",
    "column_pipeline_generated",
    "imputed_pipeline",
    "xgboost",
    "lightgbm",
    "random_forest_regressor",
    "lightgbm_regressor",
    "xgboost_pipeline",
]


@pytest.mark.parametrize("name", PARITY_CASES)
def test_the_onnx_model_predicts_what_the_native_model_does(conversions, name):
    case = conversions[name]
    result = case.converted()
    assert result.labels_equal and 0 <= result.max_abs_diff <= TOLERANCE
    assert result.onnx_path.name == "model.onnx" and result.onnx_path.is_file()
    assert result.optimized == case.options.optimize
    assert not result.quantized and result.quantization_label_agreement is None
    opsets = {opset.domain: opset.version for opset in onnx.load(str(result.onnx_path)).opset_import}
    # skl2onnx writes the lowest opset the model needs, up to the target.
    assert set(opsets) <= {"", "ai.onnx.ml"} and opsets[""] <= (case.options.target_opset or opsets[""])
    for timing in ("native_one_row_ms", "onnx_one_row_ms", "native_1000_rows_ms", "onnx_1000_rows_ms"):
        assert getattr(result, timing) > 0, timing
    assert result.speedup_one_row > 0 and result.speedup_1000_rows > 0
    session = onnxruntime.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    rows = float32_rows(case.rows[:200])
    outputs = session.run(None, onnx_feeds(session, rows))
    if hasattr(case.model, "predict_proba"):
        assert np.array_equal(outputs[0], case.model.predict(rows))
        assert np.abs(outputs[1] - case.model.predict_proba(rows)).max() <= TOLERANCE
        assert [output["name"] for output in result.outputs] == ["label", "probabilities"]
        assert result.outputs[1] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}
    else:
        assert np.abs(outputs[0].ravel() - case.model.predict(rows)).max() <= TOLERANCE
        assert result.outputs == [{"name": "variable", "datatype": "FP32", "shape": [-1, 1]}]


def test_the_result_names_the_framework_and_the_estimator(conversions):
    described = {
        name: (conversions[name].converted().source_framework, conversions[name].converted().estimator)
        for name in PARITY_CASES
    }
    assert described["random_forest"] == ("sklearn", "RandomForestClassifier")
    assert described["column_pipeline"] == (
        "sklearn",
        "Pipeline(ColumnTransformer(StandardScaler, OneHotEncoder), LogisticRegression)",
    )
    assert described["xgboost"] == ("xgboost", "XGBClassifier")
    assert described["lightgbm"] == ("lightgbm", "LGBMClassifier")
    assert described["xgboost_pipeline"] == ("xgboost", "Pipeline(ColumnTransformer(OneHotEncoder), XGBClassifier)")


def test_an_array_model_takes_one_fp32_tensor_named_after_the_signature(conversions):
    assert conversions["logistic_regression"].converted().inputs == [
        {"name": "input", "datatype": "FP32", "shape": [-1, 30]}
    ]
    assert conversions["gradient_boosting"].converted().inputs == [
        {"name": "features", "datatype": "FP32", "shape": [-1, 30]}
    ]


def test_a_column_pipeline_takes_one_input_per_column_typed_by_the_sample(conversions):
    assert conversions["column_pipeline"].converted().inputs == [
        {"name": "age", "datatype": "FP32", "shape": [-1, 1]},
        {"name": "income", "datatype": "FP32", "shape": [-1, 1]},
        {"name": "rooms", "datatype": "INT64", "shape": [-1, 1]},
        {"name": "city", "datatype": "BYTES", "shape": [-1, 1]},
    ]
    # skl2onnx's SimpleImputer takes integers only as floats.
    imputed = conversions["imputed_pipeline"].converted().inputs
    assert imputed[0] == {"name": "age", "datatype": "FP32", "shape": [-1, 1]}
    assert imputed[2] == {"name": "rooms", "datatype": "FP32", "shape": [-1, 1]}
    generated = conversions["column_pipeline_generated"].converted().inputs
    assert [(spec["name"], spec["datatype"]) for spec in generated] == [
        ("age", "FP32"),
        ("income", "FP32"),
        ("rooms", "FP32"),
        ("city", "BYTES"),
    ]


def test_sample_rows_come_from_csv_parquet_and_input_examples(conversions):
    assert conversions["random_forest"].converted().rows_checked == 150
    assert conversions["hist_gradient_boosting"].converted().rows_checked == 300
    assert conversions["column_pipeline"].converted().rows_checked == 20
    assert conversions["lightgbm"].converted().rows_checked == 40


def test_without_a_sample_rows_are_generated_from_the_fitted_model(conversions):
    for name in ("logistic_regression", "column_pipeline_generated", "xgboost", "random_forest_regressor"):
        assert conversions[name].converted().rows_checked == 500, name
    # Seeded: the same model meets the same rows.
    first, again = conversions["logistic_regression"].converted(), conversions["logistic_regression_again"].converted()
    assert first.max_abs_diff == again.max_abs_diff


def test_a_quantised_neural_network_reports_how_far_quantisation_moved_it(conversions):
    result = conversions["quantised_network"].converted()
    assert result.quantized and result.labels_equal and result.max_abs_diff <= TOLERANCE
    assert result.quantization_label_agreement is not None and 0.9 <= result.quantization_label_agreement <= 1
    assert result.quantization_max_abs_diff is not None and 0 < result.quantization_max_abs_diff < 0.5
    operators = {node.op_type for node in onnx.load(str(result.onnx_path)).graph.node}
    assert "MatMulInteger" in operators or "DynamicQuantizeLinear" in operators


def test_quantising_anything_but_a_neural_network_is_refused(conversions):
    error = conversions["quantised_forest"].error
    assert isinstance(error, InvalidArgument) and "neural network" in error.message
    assert "RandomForestClassifier" in error.message
    assert_nothing_left_but_the_log(conversions["quantised_forest"].out_dir)


def test_a_model_whose_onnx_predicts_otherwise_on_the_sample_fails_parity(conversions):
    # Scaling in float32 moves a few of these rows across a tree's split threshold.
    error = conversions["scaled_trees"].error
    assert isinstance(error, FailedPrecondition), error
    assert re.search(r"outputs differ by up to 0\.\d+ on 442 rows \(allowed: 1e-05\)", error.message), error.message
    assert_nothing_left_but_the_log(conversions["scaled_trees"].out_dir)


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("unsupported_in_pipeline", "skl2onnx cannot convert sklearn.neighbors.NearestCentroid"),
        ("sparse_embedding", "skl2onnx cannot convert sklearn.ensemble.RandomTreesEmbedding: "),
    ],
)
def test_an_estimator_without_a_converter_is_refused_by_name(conversions, name, words):
    error = conversions[name].error
    assert isinstance(error, InvalidArgument) and words in error.message, error


# ---------------------------------------------------------------- hostile pickles


def test_a_model_that_hangs_when_loaded_is_stopped_at_the_wall_time_limit_with_its_process_group(tmp_path):
    model_path = save_pickle(SleepsWhenLoaded(), tmp_path / "model.pkl")
    out_dir = tmp_path / "out"
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=1) as pool:
        conversion = pool.submit(convert_model, model_path, out_dir, limits=ConversionLimits(wall_seconds=5))
        # While it hangs: the worker, its shell and the two sleeps share the worker's process group.
        members: list[int] = []
        while len(members) < 4 and not conversion.done():
            time.sleep(0.1)
            group = worker_process_group(out_dir) if (out_dir / LOG_FILE).is_file() else None
            members = live_processes_in_group(group) if group else []
        assert len(members) == 4
        with pytest.raises(ResourceExhausted) as failure:
            conversion.result()
    assert time.monotonic() - started < 15
    assert "after 5 s (wall-time limit)" in failure.value.message and "loading the model" in failure.value.message
    deadline = time.monotonic() + 5
    while live_processes_in_group(group) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live_processes_in_group(group) == []
    assert_nothing_left_but_the_log(out_dir)


def test_a_model_that_exits_when_loaded_is_refused_with_its_exit_code(tmp_path):
    model_path = save_pickle(ExitsWhenLoaded(), tmp_path / "model.pkl")
    with pytest.raises(InvalidArgument) as failure:
        convert_model(model_path, tmp_path / "out")
    assert "exited with code 3 while loading the model" in failure.value.message
    assert_nothing_left_but_the_log(tmp_path / "out")


def test_a_model_that_allocates_without_bound_is_stopped_at_the_memory_limit(tmp_path):
    model_path = save_pickle(GrowsWhenLoaded(), tmp_path / "model.pkl")
    with pytest.raises(ResourceExhausted) as failure:
        convert_model(model_path, tmp_path / "out", limits=ConversionLimits(memory_mb=512, wall_seconds=60))
    assert "memory limit of 512 MB" in failure.value.message and "loading the model" in failure.value.message
    assert_nothing_left_but_the_log(tmp_path / "out")


def test_a_model_that_spins_when_loaded_is_stopped_at_the_cpu_time_limit(tmp_path):
    model_path = save_pickle(SpinsWhenLoaded(), tmp_path / "model.pkl")
    started = time.monotonic()
    with pytest.raises(ResourceExhausted) as failure:
        convert_model(model_path, tmp_path / "out", limits=ConversionLimits(cpu_seconds=2, wall_seconds=60))
    assert time.monotonic() - started < 20
    assert "2 s of CPU time (CPU-time limit)" in failure.value.message
    assert_nothing_left_but_the_log(tmp_path / "out")


def test_a_file_of_random_bytes_is_not_a_model(tmp_path):
    model_path = tmp_path / "model.pkl"
    model_path.write_bytes(np.random.default_rng(7).bytes(4096))
    with pytest.raises(InvalidArgument) as failure:
        convert_model(model_path, tmp_path / "out")
    assert "not a loadable pickle or joblib file" in failure.value.message
    assert_nothing_left_but_the_log(tmp_path / "out")

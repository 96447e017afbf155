"""The runtime as its own process serving the model versions of a folder (MLMESH_RUNTIME_MODEL_DIR), as
it does inside a model image: no registry, each version checked against its model.json."""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from tests.conftest import ROOT
from tests.registry.test_models import tiny_onnx
from tests.runtime.conftest import RuntimeProcess, runtime_environment, spawn_runtime

ADDER_SIGNATURE = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
}


def doubler_onnx() -> bytes:
    """y = 2 * x over [batch, 2] doubles."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])],
        "double",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["batch", 2])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def add_version(
    model_dir: Path, name: str, version: int, content: bytes, signature: dict, sha256: str | None = None
) -> Path:
    """`<name>/<version>/` with model.onnx and model.json, as an image holds them."""
    folder = model_dir / name / str(version)
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(content)
    about = {
        "name": name,
        "version": version,
        "sha256": sha256 or hashlib.sha256(content).hexdigest(),
        "signature": signature,
    }
    (folder / "model.json").write_text(json.dumps(about))
    return folder


def folder_environment(home: Path, model_dir: Path, **settings: str) -> dict[str, str]:
    return runtime_environment(home, None, settings.pop("models", ""), model_dir=str(model_dir), **settings)


def spawn_folder_runtime(
    home: Path, model_dir: Path, **settings: str
) -> contextlib.AbstractContextManager[RuntimeProcess]:
    return spawn_runtime(home, None, "", model_dir=str(model_dir), **settings)


def refused_start(home: Path, model_dir: Path, **settings: str) -> str:
    """Runs the runtime expecting it to stop before serving; its output."""
    environment = folder_environment(home, model_dir, port="0", http_port="0", **settings)
    command = [sys.executable, "-m", "services.runtime"]
    run = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0, f"the runtime started:\n{run.stdout}\n{run.stderr}"
    return run.stderr


@pytest.fixture(scope="module")
def folder_runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeProcess]:
    """A runtime serving adder versions 1 and 2 and doubler version 3 from a folder."""
    home = tmp_path_factory.mktemp("runtime-home")
    model_dir = home / "models"
    add_version(model_dir, "adder", 1, tiny_onnx(), ADDER_SIGNATURE)
    add_version(model_dir, "adder", 2, tiny_onnx(), ADDER_SIGNATURE)
    doubler_signature = {
        "inputs": [{"name": "x", "datatype": "FP64", "shape": [-1, 2]}],
        "outputs": [{"name": "y", "datatype": "FP64", "shape": [-1, 2]}],
    }
    add_version(model_dir, "doubler", 3, doubler_onnx(), doubler_signature)
    with spawn_folder_runtime(home, model_dir, max_batch_rows="16") as running:
        yield running


def test_every_version_in_the_folder_is_served_under_its_name_over_grpc(folder_runtime: RuntimeProcess) -> None:
    client = triton_grpc.InferenceServerClient(url=folder_runtime.grpc)
    assert client.is_server_ready() and client.is_model_ready("adder", "1") and client.is_model_ready("doubler")
    adder = client.get_model_metadata("adder")
    assert (adder.name, list(adder.versions), adder.platform) == ("adder", ["1", "2"], "onnx_onnxv1")
    assert [(t.name, t.datatype, list(t.shape)) for t in adder.inputs] == [("x", "FP32", [-1, 3])]
    assert [(t.name, t.datatype, list(t.shape)) for t in adder.outputs] == [("y", "FP32", [-1, 3])]

    values = np.random.default_rng(5).normal(size=(4, 3)).astype(np.float32)
    tensor = triton_grpc.InferInput("x", [4, 3], "FP32")
    tensor.set_data_from_numpy(values)
    result = client.infer("adder", [tensor], model_version="1")
    np.testing.assert_allclose(result.as_numpy("y"), values + 1, rtol=1e-6)
    assert result.get_response().model_version == "1"


def test_the_rest_api_serves_the_same_models(folder_runtime: RuntimeProcess) -> None:
    client = triton_http.InferenceServerClient(url=folder_runtime.http)
    metadata = client.get_model_metadata("doubler")
    assert (metadata["name"], metadata["versions"]) == ("doubler", ["3"])
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP64", "shape": [-1, 2]}]
    values = np.arange(6, dtype=np.float64).reshape(3, 2)
    tensor = triton_http.InferInput("x", [3, 2], "FP64")
    tensor.set_data_from_numpy(values, binary_data=False)
    result = client.infer("doubler", [tensor])
    np.testing.assert_array_equal(result.as_numpy("y"), values * 2)
    # The newest version answers when none is asked for.
    assert result.get_response()["model_version"] == "3"


def test_one_version_can_be_served_under_another_name(tmp_path: Path) -> None:
    model_dir = tmp_path / "models"
    add_version(model_dir, "adder", 7, tiny_onnx(), ADDER_SIGNATURE)
    with spawn_folder_runtime(tmp_path, model_dir, served_name="fraud-api") as running:
        client = triton_grpc.InferenceServerClient(url=running.grpc)
        assert client.is_model_ready("fraud-api", "7")
        with pytest.raises(InferenceServerException, match="not served"):
            client.is_model_ready("adder")


def test_a_file_that_does_not_match_its_sha256_stops_the_runtime(tmp_path: Path) -> None:
    model_dir = tmp_path / "models"
    add_version(model_dir, "adder", 1, tiny_onnx(), ADDER_SIGNATURE, sha256="0" * 64)
    output = refused_start(tmp_path, model_dir)
    assert "model.onnx of adder/1" in output and f"model.json says {'0' * 64}" in output, output


def test_a_version_without_its_onnx_file_or_model_json_stops_the_runtime(tmp_path: Path) -> None:
    model_dir = tmp_path / "models"
    (add_version(model_dir, "adder", 1, tiny_onnx(), ADDER_SIGNATURE) / "model.onnx").unlink()
    assert "model version adder/1" in (output := refused_start(tmp_path, model_dir)) and "no model.onnx" in output

    (model_dir / "adder" / "1" / "model.onnx").write_bytes(tiny_onnx())
    (model_dir / "adder" / "1" / "model.json").write_text('{"name": "adder"')
    output = refused_start(tmp_path, model_dir)
    assert "model.json of adder/1" in output and "is not valid" in output, output


def test_an_empty_or_missing_folder_stops_the_runtime(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert "holds no model version" in refused_start(tmp_path, tmp_path / "empty")
    assert "is not a folder" in refused_start(tmp_path, tmp_path / "absent")


def test_registry_refs_are_refused_beside_a_model_folder(tmp_path: Path) -> None:
    model_dir = tmp_path / "models"
    add_version(model_dir, "adder", 1, tiny_onnx(), ADDER_SIGNATURE)
    output = refused_start(tmp_path, model_dir, models="adder:1")
    assert "MLMESH_RUNTIME_MODELS must be empty when MLMESH_RUNTIME_MODEL_DIR is set" in output, output


def test_a_served_name_needs_a_folder_of_exactly_one_version(tmp_path: Path) -> None:
    model_dir = tmp_path / "models"
    add_version(model_dir, "adder", 1, tiny_onnx(), ADDER_SIGNATURE)
    add_version(model_dir, "adder", 2, tiny_onnx(), ADDER_SIGNATURE)
    assert "renames one model" in refused_start(tmp_path, model_dir, served_name="fraud-api")

"""The builder's gRPC API against a real builder process, registry and nats-server: conversions
registered as new versions, and every method's answer to malformed and hostile input."""

from __future__ import annotations

import pickle
from pathlib import Path

import grpc
import joblib
import numpy as np
import onnxruntime
import pytest
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression

from services._proto.mlmesh.v1 import builder_pb2, builder_pb2_grpc
from services.client import MeshError, RegistryClient
from services.launcher import health_status
from tests.builder.conftest import SERVICE, BuilderProcess
from tests.builder.wheels import make_wheel
from tests.conftest import stream_events
from tests.registry.test_models import tiny_onnx


def register_pickle(builder: BuilderProcess, folder: Path, name: str, model: object, framework: str = "sklearn") -> str:
    """`model` pickled with joblib and registered as the next version of `name`; its ref."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.joblib"
    joblib.dump(model, path)
    with RegistryClient(builder.registry.address) as registry:
        version = registry.register_model(name, [path], framework=framework)
    return f"{name}:{version.version}"


class ExitsWhenLoaded:
    """Unpickling this ends the process that loads it."""

    def __reduce__(self):
        import os

        return (os._exit, (3,))


@pytest.fixture(scope="module")
def breast_cancer() -> tuple[np.ndarray, np.ndarray]:
    return load_breast_cancer(return_X_y=True)


def test_a_forest_converts_registers_an_onnx_version_and_announces_it(builder_process, breast_cancer, tmp_path):
    features, labels = breast_cancer
    forest = RandomForestClassifier(n_estimators=20, max_depth=6, random_state=0).fit(features, labels)
    ref = register_pickle(builder_process, tmp_path, "forest", forest)
    with builder_process.client() as client:
        conversion = client.convert(ref)
    assert conversion.source_framework == "sklearn" and "RandomForestClassifier" in conversion.estimator
    assert conversion.parity.labels_equal and conversion.parity.max_abs_diff <= 1e-5
    assert conversion.parity.rows_checked > 0 and conversion.speed.speedup_one_row > 0
    with RegistryClient(builder_process.registry.address) as registry:
        onnx_version = registry.get(f"forest:{conversion.version}")
        registry.download(f"forest:{conversion.version}", tmp_path / "onnx")
    assert onnx_version.framework == "onnx" and onnx_version.lineage.parent_version == int(ref.split(":")[1])
    assert [spec.name for spec in onnx_version.signature.inputs] and onnx_version.signature.outputs
    (onnx_file,) = (tmp_path / "onnx").rglob("*.onnx")
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    rows = features[:50].astype(np.float32)
    onnx_labels = session.run(None, {session.get_inputs()[0].name: rows})[0]
    assert np.array_equal(onnx_labels, forest.predict(rows))
    converted = [
        event
        for event in stream_events(builder_process.registry.nats_url, "mlmesh.events.model.converted")
        if event.data["conversion_id"] == conversion.id
    ]
    assert len(converted) == 1 and converted[0].data["version"] == conversion.version
    assert converted[0].subject == f"models/forest/versions/{conversion.version}"
    with builder_process.client() as client:
        assert conversion.id in [listed.id for listed in client.list_conversions("forest")]


def test_a_model_that_kills_its_loader_fails_its_conversion_and_the_builder_keeps_serving(builder_process, tmp_path):
    folder = tmp_path / "hostile"
    folder.mkdir()
    (folder / "model.pkl").write_bytes(pickle.dumps(ExitsWhenLoaded()))
    with RegistryClient(builder_process.registry.address) as registry:
        version = registry.register_model("hostile", [folder / "model.pkl"], framework="sklearn")
    with builder_process.client() as client, pytest.raises(MeshError) as failure:
        client.convert(f"hostile:{version.version}")
    assert failure.value.code == "INVALID_ARGUMENT" and "3" in failure.value.message
    assert health_status(builder_process.address, SERVICE, timeout=5) == "SERVING"
    with RegistryClient(builder_process.registry.address) as registry:
        assert registry.get("hostile").version == version.version, "a failed conversion registered a version"


def test_conversion_refuses_what_it_cannot_convert_with_clear_errors(builder_process, breast_cancer, tmp_path):
    features, labels = breast_cancer
    logistic = LogisticRegression(max_iter=2000).fit(features, labels)
    pickled = register_pickle(builder_process, tmp_path / "a", "plain", logistic)
    (tmp_path / "m.onnx").write_bytes(tiny_onnx())
    with RegistryClient(builder_process.registry.address) as registry:
        onnx_ref = f"adder:{registry.register_model('adder', [tmp_path / 'm.onnx'], framework='onnx').version}"
        no_pickle = registry.register_model("nopickle", [tmp_path / "m.onnx"], framework="sklearn")
    cases = {
        "unknown model": ("nosuchmodel:1", {}, "NOT_FOUND", "nosuchmodel"),
        "path traversal": ("../../etc/passwd", {}, "INVALID_ARGUMENT", ""),
        "already onnx": (onnx_ref, {}, "FAILED_PRECONDITION", "already ONNX"),
        "no pickle among the files": (f"nopickle:{no_pickle.version}", {}, "FAILED_PRECONDITION", "no pickled model"),
        "unknown sample dataset": (pickled, {"sample_dataset": "nosuchdata:1"}, "NOT_FOUND", "nosuchdata"),
        "hostile sample dataset name": (pickled, {"sample_dataset": "../x:1"}, "INVALID_ARGUMENT", "sample_dataset"),
        "too many parity rows": (pickled, {"parity_rows": 10**7}, "INVALID_ARGUMENT", "parity_rows"),
        "quantising a linear model": (pickled, {"quantize": True}, "INVALID_ARGUMENT", "neural network"),
    }
    with builder_process.client() as client:
        for case, (ref, options, code, words) in cases.items():
            with pytest.raises(MeshError) as failure:
                client.convert(ref, **options)
            assert failure.value.code == code, f"{case}: {failure.value}"
            assert words.lower() in failure.value.message.lower(), f"{case}: {failure.value.message}"
    assert health_status(builder_process.address, SERVICE, timeout=5) == "SERVING"


def test_image_requests_that_cannot_be_built_are_refused_before_any_work(builder_process, tmp_path):
    (tmp_path / "m.onnx").write_bytes(tiny_onnx())
    with RegistryClient(builder_process.registry.address) as registry:
        ref = f"served:{registry.register_model('served', [tmp_path / 'm.onnx'], framework='onnx').version}"
    cases = {
        "no models": ({"refs": []}, "INVALID_ARGUMENT", "at least one"),
        "too many models": ({"refs": [ref] * 17}, "INVALID_ARGUMENT", "at most"),
        "the same model twice": ({"refs": [ref, ref]}, "INVALID_ARGUMENT", "once"),
        "unknown model": ({"refs": ["nosuch:1"]}, "NOT_FOUND", "nosuch"),
        "unknown environment": ({"refs": [ref], "environment": "nosuchenv:1"}, "NOT_FOUND", "nosuchenv"),
        "hostile base image": ({"refs": [ref], "base_image": "x; rm -rf /"}, "INVALID_ARGUMENT", "base_image"),
        "image-owned setting": ({"refs": [ref], "runtime_settings": {"port": "1"}}, "INVALID_ARGUMENT", "port"),
        "unknown setting": ({"refs": [ref], "runtime_settings": {"bogus": "1"}}, "INVALID_ARGUMENT", "bogus"),
        "push without a registry": ({"refs": [ref], "push": True}, "FAILED_PRECONDITION", "PUSH_REGISTRY"),
    }
    with grpc.insecure_channel(builder_process.address) as channel:
        stub = builder_pb2_grpc.BuilderServiceStub(channel)
        for case, (fields, code, words) in cases.items():
            with pytest.raises(grpc.RpcError) as failure:
                list(stub.BuildImage(builder_pb2.BuildImageRequest(**fields), timeout=60))
            assert failure.value.code().name == code, f"{case}: {failure.value.details()}"
            assert words.lower() in failure.value.details().lower(), f"{case}: {failure.value.details()}"
        for image, code in (("", "INVALID_ARGUMENT"), ("never-built:1", "NOT_FOUND"), ("../../x", "INVALID_ARGUMENT")):
            with pytest.raises(grpc.RpcError) as failure:
                list(stub.ExportImage(builder_pb2.ExportImageRequest(image=image), timeout=30))
            assert failure.value.code().name == code, f"export {image!r}: {failure.value.details()}"
        listed = stub.ListImages(builder_pb2.ListImagesRequest(name="served"), timeout=10)
        assert list(listed.images) == []
        for request in (
            builder_pb2.ListImagesRequest(page_token="garbage"),
            builder_pb2.ListImagesRequest(page_size=-1),
        ):
            with pytest.raises(grpc.RpcError) as failure:
                stub.ListImages(request, timeout=10)
            assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert health_status(builder_process.address, SERVICE, timeout=5) == "SERVING"


def test_environments_register_once_per_spec_count_up_and_announce_themselves(builder_process):
    make_wheel(builder_process.wheels, "tool", "1.0", ("helper>=1",))
    make_wheel(builder_process.wheels, "helper", "1.2")
    with builder_process.client() as client:
        first, created = client.register_environment("env-a", "tool\n# pinned below\nhelper>=1\n")
        again, created_again = client.register_environment("env-a", "HELPER >= 1\ntool  # same spec\n")
        second, _ = client.register_environment("env-a", "tool\n", base_image="python:3.11-slim")
        assert (first.version, created, again.version, created_again, second.version) == (1, True, 1, False, 2)
        assert [(p.name, p.version) for p in first.lock] == [("helper", "1.2"), ("tool", "1.0")]
        assert "helper==1.2 --hash=sha256:" in first.lock_text
        assert client.get_environment("env-a").version == 2
        assert client.get_environment("env-a:1").spec_digest == first.spec_digest
        assert [e.version for e in client.list_environments("env-")] == [1, 2]
    registered = [
        event.data
        for event in stream_events(builder_process.registry.nats_url, "mlmesh.events.environment.registered")
        if event.data["name"] == "env-a"
    ]
    assert [(data["version"], data["packages"]) for data in registered] == [(1, 2), (2, 2)]


def test_environment_requests_that_are_wrong_are_refused_and_nothing_is_written(builder_process):
    cases = {
        "unresolvable": ({"name": "env-b", "requirements": "nosuchpackage==1.0"}, "INVALID_ARGUMENT", "nosuchpackage"),
        "hostile name": ({"name": "../../etc", "requirements": ""}, "INVALID_ARGUMENT", "name"),
        "an option line": ({"name": "env-b", "requirements": "-r /etc/passwd"}, "INVALID_ARGUMENT", "line 1"),
        "huge": ({"name": "env-b", "requirements": "x\n" * 40_000}, "INVALID_ARGUMENT", "bytes"),
        "bad python": ({"name": "env-b", "requirements": "", "python_version": "two"}, "INVALID_ARGUMENT", "python"),
        "bad base image": (
            {"name": "env-b", "requirements": "", "base_image": "A B"},
            "INVALID_ARGUMENT",
            "base_image",
        ),
    }
    with grpc.insecure_channel(builder_process.address) as channel:
        stub = builder_pb2_grpc.BuilderServiceStub(channel)
        for case, (fields, code, words) in cases.items():
            with pytest.raises(grpc.RpcError) as failure:
                stub.RegisterEnvironment(builder_pb2.RegisterEnvironmentRequest(**fields), timeout=120)
            assert failure.value.code().name == code, f"{case}: {failure.value.details()}"
            assert words.lower() in failure.value.details().lower(), f"{case}: {failure.value.details()}"
        for ref, code in (("nosuch", "NOT_FOUND"), ("env-b:x", "INVALID_ARGUMENT"), ("", "INVALID_ARGUMENT")):
            with pytest.raises(grpc.RpcError) as failure:
                stub.GetEnvironment(builder_pb2.GetEnvironmentRequest(ref=ref), timeout=10)
            assert failure.value.code().name == code, ref
        listed = stub.ListEnvironments(builder_pb2.ListEnvironmentsRequest(name_prefix="env-b"), timeout=10)
        assert list(listed.environments) == []
    assert health_status(builder_process.address, SERVICE, timeout=5) == "SERVING"

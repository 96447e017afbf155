"""Model images built for real on the local Docker engine from the locally built base image, run as
containers and called with Triton's client; reuse, failures, export and push to a real registry."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import docker
import docker.errors
import numpy as np
import onnxruntime
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http

from services.builder.images import BuildFailed, BuiltImage, ImageBuilder, ImageSpec, ModelPayload
from services.common import natsserver
from services.common.errors import DataLoss, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from tests.builder.docker_parts import (
    LocalRegistry,
    SklearnModel,
    base_image,
    docker_engine,
    iris_classifier,
    local_registry,
    running,
)

__all__ = ["base_image", "docker_engine", "local_registry"]  # fixtures, used by name

NO_ENGINE = "unix:///nonexistent/docker.sock"
# A cold build (wheels downloaded, every instruction run) takes about 3 minutes on the vfs storage
# driver; building the base image with debootstrap, the first time only, about 2 more.
SLOW_TIMEOUT_SECONDS = 1200
MISSING_PACKAGE_LOCK = f"mlmesh-test-no-such-package-7f3a==1.0.0 --hash=sha256:{'0' * 64}\n"


# ---------------------------------------------------------------------- without an engine


@pytest.fixture
def model(tmp_path: Path) -> SklearnModel:
    return iris_classifier(tmp_path / "models")


def spec_of(*models: ModelPayload, **changes: object) -> ImageSpec:
    spec = ImageSpec(
        models=models,
        environment="iris-env:1",
        lock_text="",
        python_version="3.11",
        base_image="mlmesh-base:py3.11",
        runtime_settings={"max_batch_rows": "8"},
    )
    return replace(spec, **changes)


def test_the_key_changes_with_everything_that_goes_into_the_image(model: SklearnModel, tmp_path: Path) -> None:
    builder = ImageBuilder(tmp_path / "work", docker_url=NO_ENGINE)
    spec = spec_of(model.payload)
    key = builder.image_key(spec)
    assert re.fullmatch(r"[0-9a-f]{64}", key) and builder.image_key(spec_of(model.payload)) == key
    # The tag names the image; it is not part of what is in it. Settings count by what the runtime reads.
    assert builder.image_key(replace(spec, tag="other:1")) == key
    assert builder.image_key(replace(spec, runtime_settings={"MLMESH_RUNTIME_MAX_BATCH_ROWS": "8"})) == key
    changed = [
        replace(spec, models=(replace(model.payload, sha256="1" * 64),)),
        replace(spec, models=(replace(model.payload, version=2),)),
        replace(spec, models=(replace(model.payload, name="iris2"),)),
        replace(spec, lock_text=f"numpy==2.4.6 --hash=sha256:{'a' * 64}"),
        replace(spec, python_version="3.12"),
        replace(spec, base_image="python:3.11-slim"),
        replace(spec, runtime_settings={"max_batch_rows": "16"}),
    ]
    keys = {builder.image_key(other) for other in changed}
    assert len(keys) == len(changed) and key not in keys
    assert re.fullmatch(r"[0-9a-f]{64}", builder.runtime_digest())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"models": ()}, "at least one model"),
        ({"name": "../../etc"}, "model name '../../etc' must match"),
        ({"name": "a/b"}, "must match"),
        ({"version": 0}, "version must be a positive integer"),
        ({"sha256": "abc"}, "sha256 must be 64 hex digits"),
        ({"signature": {"inputs": "x"}}, "signature must be"),
        ({"signature": {"inputs": [{"name": "X", "datatype": "FLOAT", "shape": [-1, 4]}]}}, "datatype"),
        ({"onnx_path": Path("/nonexistent/model.onnx")}, "no file at /nonexistent/model.onnx"),
        ({"python_version": "3.10"}, "must be 3.X with X >= 11"),
        ({"python_version": "3.11; rm -rf /"}, "must be 3.X"),
        ({"base_image": "mlmesh-base:py3.11\nRUN id"}, "not an image reference"),
        ({"tag": "Upper/Case:1"}, "not an image reference"),
        ({"environment": "env\nLABEL x=y"}, "printable"),
        ({"runtime_settings": {"nope": "1"}}, "runtime setting 'nope' is not one of"),
        ({"runtime_settings": {"port": "9000"}}, "is set by the image itself"),
        ({"runtime_settings": {"MLMESH_RUNTIME_HTTP_PORT": "9000"}}, "is set by the image itself"),
        ({"runtime_settings": {"MLMESH_HOME": "/tmp"}}, "is set by the image itself"),
        ({"runtime_settings": {"model_dir": "/tmp"}}, "is set by the image itself"),
        ({"runtime_settings": {"max_batch_rows": "-1"}}, "greater than or equal to 0"),
        ({"runtime_settings": {"endpoint": "a\nRUN id"}}, "printable"),
        ({"lock_text": "-r /etc/passwd"}, "names no package"),
        ({"lock_text": "--index-url http://127.0.0.1:1/simple\nnumpy==2.4.6"}, "names no package"),
        ({"lock_text": "numpy==2.4.6 --extra-index-url http://127.0.0.1:1/simple"}, "is not allowed"),
        ({"lock_text": "evil @ file:///etc/passwd"}, "not by URL or path"),
        ({"lock_text": "./local-package"}, "is not a requirement"),
    ],
)
def test_malformed_and_hostile_specs_are_refused_before_anything_is_built(
    model: SklearnModel, tmp_path: Path, changes: dict, message: str
) -> None:
    payload_fields = {"name", "version", "sha256", "signature", "onnx_path"}
    payload = replace(model.payload, **{k: v for k, v in changes.items() if k in payload_fields})
    spec = replace(spec_of(payload), **{k: v for k, v in changes.items() if k not in payload_fields})
    # No engine answers here: what is refused is refused before the engine is asked anything.
    builder = ImageBuilder(tmp_path / "work", docker_url=NO_ENGINE)
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        builder.build(spec, lambda line: None)
    assert not (tmp_path / "work" / "contexts").exists()


def test_a_served_name_needs_an_image_of_one_model(model: SklearnModel, tmp_path: Path) -> None:
    two = (model.payload, replace(model.payload, version=2))
    spec = spec_of(*two, runtime_settings={"served_name": "api"})
    with pytest.raises(InvalidArgument, match="served_name renames one model, but the image serves 2"):
        ImageBuilder(tmp_path, docker_url=NO_ENGINE).build(spec, lambda line: None)


def test_an_oversized_lock_is_refused(model: SklearnModel, tmp_path: Path) -> None:
    lock = f"numpy==2.4.6 --hash=sha256:{'a' * 64}\n" * 20_000
    with pytest.raises(ResourceExhausted, match="larger than"):
        ImageBuilder(tmp_path, docker_url=NO_ENGINE).build(spec_of(model.payload, lock_text=lock), print)


def test_without_an_engine_every_call_says_where_it_looked_and_what_to_do(model: SklearnModel, tmp_path: Path) -> None:
    builder = ImageBuilder(tmp_path / "work", docker_url=NO_ENGINE)
    expected = re.escape(f"no Docker engine answers at {NO_ENGINE}: start dockerd or set DOCKER_HOST")
    with pytest.raises(Unavailable, match=expected):
        builder.build(spec_of(model.payload), lambda line: None)
    with pytest.raises(Unavailable, match=expected):
        builder.find("0" * 64)
    with pytest.raises(Unavailable, match=expected):
        builder.export("mlmesh-model-iris:1", tmp_path / "image.tar")
    with pytest.raises(Unavailable, match=expected):
        builder.push("mlmesh-model-iris:1", "127.0.0.1:5000/iris", lambda line: None)
    assert not (tmp_path / "image.tar").exists()
    assert not (tmp_path / "work" / "contexts").exists() or not any((tmp_path / "work" / "contexts").iterdir())


# ---------------------------------------------------------------------- with the engine


@dataclass
class Build:
    """A finished build, what it logged and how long it took."""

    image: BuiltImage
    log: list[str]
    seconds: float


def build_logged(builder: ImageBuilder, spec: ImageSpec) -> Build:
    log: list[str] = []
    started = time.monotonic()
    try:
        image = builder.build(spec, log.append)
    finally:
        seconds = time.monotonic() - started
        print(f"build of {spec.models[0].name} took {seconds:.0f} s; last lines:\n" + "\n".join(log[-8:]))
    return Build(image, log, seconds)


class ImageJanitor:
    """Removes the images the tests made: tagged ones by tag, and the untagged intermediate ones their
    build logs name (an image that others still use, like the base image, is left alone)."""

    def __init__(self, client: docker.APIClient) -> None:
        self.client = client
        self.tags: list[str] = []
        self.logged_ids: list[str] = []

    def note(self, log: list[str], *tags: str) -> None:
        self.tags += tags
        self.logged_ids += [match.group(1) for line in log if (match := re.fullmatch(r" ---> ([0-9a-f]{12})", line))]

    def clean(self) -> None:
        for tag in self.tags:
            with contextlib.suppress(docker.errors.APIError):
                self.client.remove_image(tag, force=True)
        for image_id in reversed(self.logged_ids):
            with contextlib.suppress(docker.errors.APIError):
                if not self.client.inspect_image(image_id).get("RepoTags"):
                    self.client.remove_image(image_id)


@pytest.fixture(scope="module")
def janitor(docker_engine: docker.APIClient) -> Iterator[ImageJanitor]:
    janitor = ImageJanitor(docker_engine)
    yield janitor
    janitor.clean()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("builder")


@pytest.fixture(scope="module")
def builder(workspace: Path, docker_engine: docker.APIClient) -> ImageBuilder:
    return ImageBuilder(workspace / "work")


@pytest.fixture(scope="module")
def iris(workspace: Path) -> SklearnModel:
    return iris_classifier(workspace / "models")


@pytest.fixture(scope="module")
def flowers(workspace: Path) -> SklearnModel:
    return iris_classifier(workspace / "flowers", name="flowers", version=4, seed=11)


def locked_line(requirement: str, folder: Path) -> str:
    """`requirement --hash=sha256:...` with the hash of the wheel pip downloads for it."""
    folder.mkdir(parents=True, exist_ok=True)
    download = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    subprocess.run([*download, "--dest", str(folder), requirement], check=True, capture_output=True, timeout=300)
    (wheel,) = folder.glob("*.whl")
    return f"{requirement} --hash=sha256:{hashlib.sha256(wheel.read_bytes()).hexdigest()}"


@pytest.fixture(scope="module")
def image_spec(base_image: str, iris: SklearnModel, flowers: SklearnModel, workspace: Path) -> ImageSpec:
    """Two models and a lock. idna is also one of the runtime's own dependencies (through aiohttp):
    the lock's version must win."""
    lock = locked_line("idna==3.7", workspace / "lock-wheels")
    return spec_of(iris.payload, flowers.payload, base_image=base_image, lock_text=lock)


@pytest.fixture(scope="module")
def iris_image(builder: ImageBuilder, image_spec: ImageSpec, janitor: ImageJanitor) -> Build:
    """The image of iris and flowers, built cold (or reusing an image of the same key)."""
    build = build_logged(builder, image_spec)
    janitor.note(build.log, build.image.tag)
    return build


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT_SECONDS)
def test_the_image_serves_the_model_like_the_native_model_over_grpc_and_rest(
    iris_image: Build, iris: SklearnModel, docker_engine: docker.APIClient
) -> None:
    features = iris.features[::7]
    expected_labels = iris.estimator.predict(features)
    session = onnxruntime.InferenceSession(str(iris.payload.onnx_path), providers=["CPUExecutionProvider"])
    expected_labels_onnx, expected_probabilities = session.run(["label", "probabilities"], {"X": features})
    np.testing.assert_array_equal(expected_labels_onnx, expected_labels)

    with running(docker_engine, iris_image.image.tag, health_interval_seconds=1) as container:
        grpc_client = triton_grpc.InferenceServerClient(url=container.grpc)
        assert grpc_client.is_server_ready() and grpc_client.is_model_ready("iris", "1")
        metadata = grpc_client.get_model_metadata("iris")
        assert (metadata.name, list(metadata.versions), metadata.platform) == ("iris", ["1"], "onnx_onnxv1")
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("X", "FP32", [-1, 4])]
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
            ("label", "INT64", [-1]),
            ("probabilities", "FP32", [-1, 3]),
        ]
        tensor = triton_grpc.InferInput("X", list(features.shape), "FP32")
        tensor.set_data_from_numpy(features)
        answer = grpc_client.infer("iris", [tensor])
        np.testing.assert_array_equal(answer.as_numpy("label"), expected_labels)
        np.testing.assert_allclose(answer.as_numpy("probabilities"), expected_probabilities, rtol=1e-6)

        assert grpc_client.is_model_ready("flowers", "4")
        http_client = triton_http.InferenceServerClient(url=container.http)
        assert http_client.get_model_metadata("iris")["inputs"] == [{"name": "X", "datatype": "FP32", "shape": [-1, 4]}]
        tensor = triton_http.InferInput("X", list(features.shape), "FP32")
        tensor.set_data_from_numpy(features, binary_data=False)
        answer = http_client.infer("iris", [tensor])
        np.testing.assert_array_equal(answer.as_numpy("label"), expected_labels)
        np.testing.assert_allclose(answer.as_numpy("probabilities"), expected_probabilities, rtol=1e-6)

        # The runtime runs unprivileged, and Docker's own view of the HEALTHCHECK turns healthy.
        identity = docker_engine.exec_start(docker_engine.exec_create(container.container_id, ["id", "-u"]))
        assert identity.decode().strip() == "10001"
        deadline = time.monotonic() + 60
        while (health := docker_engine.inspect_container(container.container_id)["State"]["Health"])["Status"] != (
            "healthy"
        ):
            assert time.monotonic() < deadline, f"health after 60 s: {health}"
            time.sleep(1)


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT_SECONDS)
def test_the_image_carries_its_labels_user_ports_and_settings(
    iris_image: Build, iris: SklearnModel, flowers: SklearnModel, base_image: str, docker_engine: docker.APIClient
) -> None:
    built = iris_image.image
    inspected = docker_engine.inspect_image(built.tag)
    assert inspected["Id"] == built.image_id and inspected["Size"] == built.size_bytes
    assert re.fullmatch(rf"mlmesh-model-iris:1-{built.key[:12]}", built.tag)
    labels = inspected["Config"]["Labels"]
    # Several models: comma-separated, in the order given.
    assert labels["io.mlmesh.model.name"] == "iris,flowers"
    assert labels["io.mlmesh.model.version"] == "1,4"
    assert labels["io.mlmesh.model.sha256"] == f"{iris.payload.sha256},{flowers.payload.sha256}"
    assert iris.payload.sha256 != flowers.payload.sha256
    assert labels["io.mlmesh.build.key"] == built.key
    assert labels["io.mlmesh.environment"] == "iris-env:1"
    assert labels["org.opencontainers.image.version"] == "1,4"
    assert "iris:1, flowers:4" in labels["org.opencontainers.image.title"]
    assert "iris:1, flowers:4" in labels["org.opencontainers.image.description"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", labels["org.opencontainers.image.created"])
    assert labels["org.opencontainers.image.base.name"] == base_image
    assert inspected["Config"]["User"] == "10001:10001"
    assert set(inspected["Config"]["ExposedPorts"]) == {"8000/tcp", "8001/tcp"}
    assert "/v2/health/ready" in " ".join(inspected["Config"]["Healthcheck"]["Test"])
    environment = dict(entry.split("=", 1) for entry in inspected["Config"]["Env"])
    assert environment["MLMESH_RUNTIME_MODEL_DIR"] == "/models"
    assert environment["MLMESH_RUNTIME_HOST"] == "0.0.0.0"
    assert environment["MLMESH_RUNTIME_MAX_BATCH_ROWS"] == "8"
    assert inspected["Config"]["Cmd"] == ["python3", "-m", "services.runtime"]
    over_base = built.size_bytes - docker_engine.inspect_image(base_image)["Size"]
    print(f"image {built.tag}: {built.size_bytes / 1e6:.0f} MB, {over_base / 1e6:.0f} MB over the base image")
    assert over_base <= 400e6


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT_SECONDS)
def test_the_same_spec_again_reuses_the_image_without_building(
    iris_image: Build,
    image_spec: ImageSpec,
    builder: ImageBuilder,
    janitor: ImageJanitor,
    docker_engine: docker.APIClient,
) -> None:
    again = build_logged(builder, replace(image_spec))
    assert again.image.reused and again.image.image_id == iris_image.image.image_id
    assert (again.image.tag, again.image.key) == (iris_image.image.tag, iris_image.image.key)
    assert again.image.context_digest == iris_image.image.context_digest
    assert again.seconds < 15, f"a reused image took {again.seconds:.0f} s"
    assert builder.find(iris_image.image.key) == again.image
    assert builder.find("0" * 64) is None

    # Another tag for the same contents: the same image, tagged once more.
    janitor.note([], "mlmesh-test/iris:again")
    tagged = builder.build(replace(image_spec, tag="mlmesh-test/iris:again"), print)
    assert tagged.reused and tagged.image_id == iris_image.image.image_id and tagged.tag == "mlmesh-test/iris:again"
    assert "mlmesh-test/iris:again" in docker_engine.inspect_image(tagged.image_id)["RepoTags"]


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT_SECONDS)
def test_the_lock_installs_with_its_hashes_and_its_versions_win_over_the_runtimes(iris_image: Build) -> None:
    installed = " ".join(line for line in iris_image.log if line.startswith("Successfully installed"))
    assert "idna-3.7" in installed.split() and "aiohttp-" in installed, installed
    assert not re.search(r"idna-(?!3\.7\b)", installed), installed
    assert any("--require-hashes --requirement /tmp/wheelhouse/lock.txt" in line for line in iris_image.log)


def test_a_model_file_that_does_not_match_its_sha256_fails_before_any_download(
    builder: ImageBuilder, base_image: str, iris: SklearnModel, workspace: Path
) -> None:
    damaged = replace(iris.payload, sha256=hashlib.sha256(b"something else").hexdigest())
    log: list[str] = []
    with pytest.raises(DataLoss, match="has sha256"):
        builder.build(spec_of(damaged, base_image=base_image), log.append)
    assert not any("downloading" in line for line in log)
    assert not any((workspace / "work" / "contexts").iterdir())


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT_SECONDS)
def test_a_lock_naming_a_package_that_does_not_exist_fails_with_pips_reason_and_tags_nothing(
    builder: ImageBuilder, base_image: str, iris: SklearnModel, workspace: Path, docker_engine: docker.APIClient
) -> None:
    spec = spec_of(iris.payload, base_image=base_image, lock_text=MISSING_PACKAGE_LOCK)
    with pytest.raises(BuildFailed) as failure:
        builder.build(spec, lambda line: None)
    assert failure.value.code == "FAILED_PRECONDITION"
    assert "pip could not download the wheels of the environment lock" in failure.value.message
    assert "mlmesh-test-no-such-package-7f3a" in failure.value.message
    assert "No matching distribution found" in failure.value.message
    key = builder.image_key(spec)
    assert builder.find(key) is None
    assert not docker_engine.images(name=f"mlmesh-model-iris:1-{key[:12]}")
    assert not any((workspace / "work" / "contexts").iterdir())
    assert not list((workspace / "work" / "wheels").glob("partial-*"))


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT_SECONDS)
def test_a_failing_build_step_fails_with_its_output_and_tags_nothing(
    builder: ImageBuilder,
    base_image: str,
    iris: SklearnModel,
    workspace: Path,
    docker_engine: docker.APIClient,
    janitor: ImageJanitor,
) -> None:
    # Wheels for Python 3.12 do not install into the base image's Python 3.11: pip fails inside the build.
    spec = spec_of(iris.payload, base_image=base_image, python_version="3.12", tag="mlmesh-test/wrong-python:1")
    log: list[str] = []
    try:
        with pytest.raises(BuildFailed) as failure:
            builder.build(spec, log.append)
    finally:
        janitor.note(log)
    message = failure.value.message
    assert "docker build failed at Step 3/" in message and "pip install" in message, message
    assert "ERROR:" in message and "Python 3.12" in message, message
    assert not docker_engine.images(name="mlmesh-test/wrong-python")
    assert builder.find(builder.image_key(spec)) is None
    assert not any((workspace / "work" / "contexts").iterdir())


def test_a_base_image_that_is_not_there_is_named(builder: ImageBuilder, iris: SklearnModel) -> None:
    spec = spec_of(iris.payload, base_image="mlmesh-test-no-such-base:1")
    with pytest.raises(BuildFailed, match="base image mlmesh-test-no-such-base:1 is not on this Docker engine"):
        builder.build(spec, lambda line: None)


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT_SECONDS)
def test_export_writes_a_docker_save_archive_and_nothing_half_written(
    iris_image: Build, builder: ImageBuilder, tmp_path: Path
) -> None:
    target = tmp_path / "exports" / "iris.tar"
    progress: list[int] = []
    written = builder.export(iris_image.image.tag, target, progress.append)
    assert written == target.stat().st_size == progress[-1] and progress == sorted(progress)
    with tarfile.open(target) as archive:
        manifest = json.load(archive.extractfile("manifest.json"))  # type: ignore[arg-type]
        names = set(archive.getnames())
    assert manifest[0]["RepoTags"] == [iris_image.image.tag]
    assert all(layer in names for layer in manifest[0]["Layers"])
    assert manifest[0]["Config"].removesuffix(".json") in iris_image.image.image_id
    assert [path.name for path in target.parent.iterdir()] == ["iris.tar"]
    target.unlink()

    def interrupted(count: int) -> None:
        raise RuntimeError("the reader went away")

    with pytest.raises(RuntimeError, match="went away"):
        builder.export(iris_image.image.tag, target, interrupted)
    assert not list(target.parent.iterdir())
    with pytest.raises(NotFound, match="is not on this Docker engine"):
        builder.export("mlmesh-test/no-such-image:1", target)
    assert not list(target.parent.iterdir())


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT_SECONDS)
def test_push_sends_the_image_to_a_registry_and_returns_its_digest(
    iris_image: Build, builder: ImageBuilder, local_registry: LocalRegistry, docker_engine: docker.APIClient
) -> None:
    repository = f"{local_registry.address}/mlmesh/iris"
    log: list[str] = []
    pushed = builder.push(iris_image.image.tag, repository, log.append)
    tag_part = iris_image.image.tag.split(":")[-1]
    match = re.fullmatch(rf"{re.escape(repository)}:{re.escape(tag_part)}@(sha256:[0-9a-f]{{64}})", pushed)
    assert match, pushed
    with urllib.request.urlopen(f"http://{local_registry.address}/v2/mlmesh/iris/tags/list", timeout=10) as answer:
        assert json.load(answer)["tags"] == [tag_part]
    request = urllib.request.Request(
        f"http://{local_registry.address}/v2/mlmesh/iris/manifests/{tag_part}",
        method="HEAD",
        headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.headers["Docker-Content-Digest"] == match.group(1)
    assert any("Pushed" in line for line in log)
    # The extra local tag was only for the push.
    assert f"{repository}:{tag_part}" not in docker_engine.inspect_image(iris_image.image.image_id)["RepoTags"]


@pytest.mark.slow
@pytest.mark.timeout(SLOW_TIMEOUT_SECONDS)
def test_push_to_a_registry_that_does_not_answer_is_unavailable(
    iris_image: Build, builder: ImageBuilder, docker_engine: docker.APIClient
) -> None:
    repository = f"127.0.0.1:{natsserver.free_port()}/mlmesh/iris"
    with pytest.raises(Unavailable, match="its registry does not answer"):
        builder.push(iris_image.image.tag, repository, lambda line: None)
    assert not any(
        tag.startswith(repository) for tag in docker_engine.inspect_image(iris_image.image.image_id)["RepoTags"]
    )
    with pytest.raises(InvalidArgument, match="is not a Docker repository"):
        builder.push(iris_image.image.tag, "127.0.0.1:5000/UPPER", lambda line: None)
    with pytest.raises(NotFound):
        builder.push("mlmesh-test/no-such-image:1", repository, lambda line: None)

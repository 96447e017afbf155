"""The whole builder path on a real Docker engine: a pickled scikit-learn model converted through the
builder's API, built into an image, run, and asked with tritonclient; a rebuild reused; a failing
build announced as image.failed."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import RandomForestClassifier
from typer.testing import CliRunner

from services.cli import app
from services.client import MeshError, RegistryClient
from tests.builder.conftest import start_builder
from tests.builder.docker_parts import (
    base_image,
    docker_engine,
    image_builder,
    local_registry,
    registry_tags,
    remove_image,
    running,
)
from tests.builder.test_servicer import register_pickle
from tests.builder.wheels import make_wheel
from tests.conftest import stop_process, stream_events
from tests.registry.test_models import tiny_onnx

__all__ = ["base_image", "docker_engine", "image_builder", "local_registry"]  # fixtures, used by name
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
runner = CliRunner()


def test_a_converted_model_becomes_an_image_that_answers_as_the_original(image_builder, docker_engine, tmp_path):
    features, labels = load_breast_cancer(return_X_y=True)
    forest = RandomForestClassifier(n_estimators=15, max_depth=5, random_state=1).fit(features, labels)
    source = register_pickle(image_builder, tmp_path, "cancer", forest)
    with image_builder.client() as client:
        conversion = client.convert(source)
        ref = f"cancer:{conversion.version}"
        lines: list[str] = []
        image = client.build_image([ref], on_log=lines.append)
        try:
            assert image.tag and image.image_id and not image.reused and lines
            again = client.build_image([ref])
            assert (again.reused, again.image_id) == (True, image.image_id)
            with RegistryClient(image_builder.registry.address) as registry:
                assert registry.get(ref).tags["mlmesh.image"] == image.tag
            shown = runner.invoke(
                app, ["build", "image", ref, "--json"], env={"MLMESH_BUILDER_ADDRESS": image_builder.address}
            )
            assert shown.exit_code == 0, shown.output
            assert (json.loads(shown.stdout)["image"], json.loads(shown.stdout)["image_id"]) == (
                image.tag,
                image.image_id,
            )
            size = client.export_image(ref, tmp_path / "image.tar")
            with tarfile.open(tmp_path / "image.tar") as archive:
                manifest = json.load(archive.extractfile("manifest.json"))
            assert size == (tmp_path / "image.tar").stat().st_size and manifest[0]["RepoTags"] == [image.tag]
            with running(docker_engine, image.tag) as container:
                rows = features[:25].astype(np.float32)
                triton = triton_grpc.InferenceServerClient(container.grpc)
                metadata = triton.get_model_metadata("cancer")
                assert metadata.versions == [str(conversion.version)]
                request = triton_grpc.InferInput(metadata.inputs[0].name, list(rows.shape), "FP32")
                request.set_data_from_numpy(rows)
                answer = triton.infer("cancer", [request])
                assert np.array_equal(answer.as_numpy(metadata.outputs[0].name), forest.predict(rows))
            built = [
                event.data
                for event in stream_events(image_builder.registry.nats_url, "mlmesh.events.image.built")
                if event.data["tag"] == image.tag
            ]
            assert [data["reused"] for data in built] == [False, True, True]
            assert client.list_images("cancer")[0].tag == image.tag
        finally:
            remove_image(docker_engine, image.tag)


def test_a_build_that_fails_says_why_and_announces_image_failed(image_builder, tmp_path):
    (tmp_path / "m.onnx").write_bytes(tiny_onnx())
    with RegistryClient(image_builder.registry.address) as registry:
        ref = f"broken:{registry.register_model('broken', [tmp_path / 'm.onnx'], framework='onnx').version}"
    with image_builder.client() as client, pytest.raises(MeshError) as failure:
        client.build_image([ref], base_image="mlmesh-no-such-base:1")
    assert "mlmesh-no-such-base" in failure.value.message
    failed = [
        event.data
        for event in stream_events(image_builder.registry.nats_url, "mlmesh.events.image.failed")
        if event.data["models"] == [ref]
    ]
    assert len(failed) == 1 and "mlmesh-no-such-base" in failed[0]["reason"]


def test_a_requirement_that_cannot_be_downloaded_fails_the_build_naming_it(image_builder, tmp_path):
    """An environment whose package is gone from the index since it was locked (yanked, deleted)."""
    wheel = make_wheel(image_builder.wheels, "mlmesh-vanishing", "1.0")
    with image_builder.client() as client:
        environment, _ = client.register_environment("vanishing", "mlmesh-vanishing==1.0\n")
    wheel.unlink()
    (tmp_path / "m.onnx").write_bytes(tiny_onnx())
    with RegistryClient(image_builder.registry.address) as registry:
        ref = f"orphan:{registry.register_model('orphan', [tmp_path / 'm.onnx'], framework='onnx').version}"
    with image_builder.client() as client, pytest.raises(MeshError) as failure:
        client.build_image([ref], environment=f"vanishing:{environment.version}")
    assert failure.value.code == "FAILED_PRECONDITION"
    assert "mlmesh-vanishing" in failure.value.message and "environment lock" in failure.value.message
    failed = [
        event.data
        for event in stream_events(image_builder.registry.nats_url, "mlmesh.events.image.failed")
        if event.data["models"] == [ref]
    ]
    assert len(failed) == 1 and "mlmesh-vanishing" in failed[0]["reason"]
    assert failed[0]["environment"] == f"vanishing:{environment.version}"


def test_build_image_with_push_sends_it_to_the_configured_registry(
    registry_process,
    base_image,
    local_registry,
    docker_engine,
    tmp_path,
):
    pushing = start_builder(
        tmp_path / "pushing",
        registry_process,
        base_image=base_image,
        no_index="false",
        push_registry=local_registry.address,
    )
    try:
        (tmp_path / "m.onnx").write_bytes(tiny_onnx())
        with RegistryClient(registry_process.address) as registry:
            ref = f"shipped:{registry.register_model('shipped', [tmp_path / 'm.onnx'], framework='onnx').version}"
        result = runner.invoke(app, ["build", "image", ref, "--push", "--address", pushing.address, "--json"])
        assert result.exit_code == 0, result.output
        image = json.loads(result.output)
        repository, tag_part = image["image"].split(":")[0].rsplit("/", 1)[-1], image["image"].split(":")[-1]
        assert image["pushed"].startswith(f"{local_registry.address}/{repository}:{tag_part}@sha256:")
        assert registry_tags(local_registry.address, repository) == [tag_part]
        built = [
            event.data
            for event in stream_events(registry_process.nats_url, "mlmesh.events.image.built")
            if event.data["models"] == [ref]
        ]
        assert built[-1]["pushed"] == image["pushed"]
    finally:
        stop_process(pushing.process)

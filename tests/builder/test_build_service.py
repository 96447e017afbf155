"""The whole builder path on a real Docker engine: a pickled scikit-learn model converted through the
builder's API, built into an image, run, and asked with tritonclient; a rebuild reused; a failing
build announced as image.failed."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import RandomForestClassifier
from typer.testing import CliRunner

from services.cli import app
from services.client import MeshError, RegistryClient
from tests.builder.conftest import BuilderProcess, start_builder
from tests.builder.docker_parts import base_image, docker_engine, remove_image, running  # noqa: F401 (fixtures)
from tests.builder.test_servicer import register_pickle
from tests.conftest import RegistryProcess, stop_process, stream_events
from tests.registry.test_models import tiny_onnx

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
runner = CliRunner()


@pytest.fixture(scope="module")
def image_builder(
    registry_process: RegistryProcess,
    tmp_path_factory: pytest.TempPathFactory,
    base_image: str,  # noqa: F811
) -> Iterator[BuilderProcess]:
    """A builder that downloads the runtime's wheels from the package index, on the local base image."""
    builder = start_builder(
        tmp_path_factory.mktemp("image-builder"), registry_process, base_image=base_image, no_index="false"
    )
    try:
        yield builder
    finally:
        stop_process(builder.process)


def test_a_converted_model_becomes_an_image_that_answers_as_the_original(image_builder, docker_engine, tmp_path):  # noqa: F811
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

"""Entry point of the runtime: download the model versions it serves, then serve them over the Open
Inference Protocol, gRPC and REST, in one process."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from aiohttp import web
from nats.js import JetStreamContext

from services._proto.inference import open_inference_pb2, open_inference_pb2_grpc
from services.client import RegistryClient
from services.common import bus
from services.common.server import ServiceRuntime, run_service, service_runtime
from services.runtime import domain, rest
from services.runtime.servicer import InferenceServicer
from services.runtime.settings import RuntimeSettings

SERVICE_NAME = open_inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
log = logging.getLogger(__name__)
INLINE_CAPTURE_BYTES = 256 * 1024
"""Tensor bytes of a capture batch laid out on the event loop (about a millisecond); more go to a thread."""
PUBLISH_TIMEOUT_SECONDS = 5.0
"""How long a capture message may wait for JetStream to store it before its requests count as dropped."""


# (registered name, version, ONNX file, signature, where it came from)
FoundModel = tuple[str, str, Path, domain.Signature, str]


def load_models(settings: RuntimeSettings) -> domain.ModelStore:
    """The model versions to serve, each in an onnxruntime session: with MLMESH_RUNTIME_MODEL_DIR the
    versions in that folder, else each ref's version from the registry."""
    if settings.model_dir is not None:
        if settings.model_refs():
            raise SystemExit(
                "MLMESH_RUNTIME_MODELS must be empty when MLMESH_RUNTIME_MODEL_DIR is set: the runtime serves "
                f"either the versions in {settings.model_dir} or registry refs, not both"
            )
        found = folder_models(settings.model_dir)
    else:
        if settings.served_name and len(settings.model_refs()) != 1:
            raise SystemExit("MLMESH_RUNTIME_SERVED_NAME renames one model: give exactly one in MLMESH_RUNTIME_MODELS")
        found = registry_models(settings)
    if settings.served_name and len(found) != 1:
        raise SystemExit(f"MLMESH_RUNTIME_SERVED_NAME renames one model, but {settings.model_dir} holds {len(found)}")
    threads = (settings.intra_op_threads, settings.inter_op_threads)
    store = domain.ModelStore()
    for registered_name, version, target, signature, origin in found:
        name = settings.served_name or registered_name
        model = domain.load_model(name, version, target, signature, threads)
        if settings.max_batch_rows and domain.Batcher.suits(model):
            model.batcher = domain.Batcher(model, settings.max_batch_rows, settings.max_batch_wait_ms / 1000)
        store.add(model)
        log.info("serving %s:%s (%s) as %s", registered_name, version, origin, name)
    return store


def registry_models(settings: RuntimeSettings) -> list[FoundModel]:
    """Each ref's version from the registry: its main .onnx file, downloaded once into the cache (by
    sha256, checked on download)."""
    cache = settings.resolved_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    found = []
    with RegistryClient(settings.registry_address, actor="runtime") as client:
        for ref in settings.model_refs():
            try:
                version, target = client.fetch_onnx(ref, cache)
            except ValueError as error:
                raise SystemExit(f"{error}; the runtime serves ONNX") from None
            signature = domain.Signature(
                inputs=[domain.TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in version.signature.inputs],
                outputs=[domain.TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in version.signature.outputs],
            )
            found.append((version.name, str(version.version), target, signature, ref))
    return found


def folder_models(root: Path) -> list[FoundModel]:
    """The versions in `root/<name>/<version>/`, each a model.onnx checked against its model.json
    (name, version, sha256, signature): how a model image carries its models."""

    def tensor_specs(described: list[dict]) -> list[domain.TensorSpec]:
        return [domain.TensorSpec(str(t["name"]), str(t["datatype"]), tuple(map(int, t["shape"]))) for t in described]

    if not root.is_dir():
        raise SystemExit(f"MLMESH_RUNTIME_MODEL_DIR {root} is not a folder")
    folders = sorted(
        (folder for folder in root.glob("*/*") if folder.is_dir()),
        key=lambda folder: (folder.parent.name, int(folder.name) if folder.name.isdigit() else -1, folder.name),
    )
    found = []
    for folder in folders:
        where = f"{folder.parent.name}/{folder.name} in MLMESH_RUNTIME_MODEL_DIR {root}"
        missing = [file for file in ("model.onnx", "model.json") if not (folder / file).is_file()]
        if missing:
            raise SystemExit(f"model version {where} has no {' and no '.join(missing)}")
        try:
            about = json.loads((folder / "model.json").read_text())
            name, version, sha256 = str(about["name"]), str(about["version"]), str(about["sha256"])
            signature = domain.Signature(
                inputs=tensor_specs(about["signature"]["inputs"]),
                outputs=tensor_specs(about["signature"]["outputs"]),
            )
        except (ValueError, KeyError, TypeError) as error:
            raise SystemExit(
                f"model.json of {where} is not valid: {error!r}; it needs name, version, sha256 and "
                'signature {"inputs": [{"name", "datatype", "shape"}], "outputs": [...]}'
            ) from None
        if (name, version) != (folder.parent.name, folder.name):
            raise SystemExit(f"model.json of {where} says {name}:{version}; the folder must be {name}/{version}")
        digest = hashlib.sha256()
        with (folder / "model.onnx").open("rb") as onnx_file:
            while chunk := onnx_file.read(1024 * 1024):
                digest.update(chunk)
        if digest.hexdigest() != sha256.lower():
            raise SystemExit(
                f"model.onnx of {where} has sha256 {digest.hexdigest()}, but model.json says {sha256}: "
                "the file is damaged or not the version it claims to be"
            )
        found.append((name, version, folder / "model.onnx", signature, str(folder)))
    if not found:
        raise SystemExit(f"MLMESH_RUNTIME_MODEL_DIR {root} holds no model version (<name>/<version>/model.onnx)")
    return found


def build(settings: RuntimeSettings) -> ServiceRuntime:
    store = load_models(settings)
    metrics = domain.Metrics(store)
    capture = None
    background = []
    if settings.capture:
        if not settings.nats_url:
            raise SystemExit("MLMESH_RUNTIME_CAPTURE needs MLMESH_NATS_URL: captured requests go to NATS JetStream")
        capture = domain.CaptureQueue(
            settings.capture_queue_rows, settings.capture_batch_rows, metrics, settings.capture_queue_bytes
        )
        background.append(functools.partial(publish_captures, settings, capture))
    app = rest.build_app(store, metrics, settings.max_elements, settings.max_message_bytes, capture)

    async def serve_http() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, settings.host, settings.http_port, reuse_port=settings.workers > 1).start()
            log.info("runtime REST API on http://%s:%s/v2", settings.host, settings.http_port)
            await asyncio.Event().wait()  # until cancelled
        finally:
            await runner.cleanup()

    servicer = InferenceServicer(store, metrics, settings.max_elements, capture)
    registration = (open_inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server, servicer, SERVICE_NAME)
    return service_runtime("runtime", settings, [registration], background=[serve_http, *background])


async def publish_captures(settings: RuntimeSettings, capture: domain.CaptureQueue) -> None:
    """Send captured requests in batches to `mlmesh.capture.<endpoint>.<deployment>`. Until NATS
    first answers they wait in the queue (what does not fit is dropped and counted); a batch that
    NATS does not take later is dropped and counted too. Requests never wait for any of it."""
    assert settings.nats_url
    subject = f"{bus.CAPTURE_SUBJECT_PREFIX}{settings.endpoint}.{settings.deployment}"
    connection = await bus.connect_with_retry(settings.nats_url, name=f"runtime-capture-{settings.deployment}")
    try:
        jetstream = connection.jetstream(timeout=PUBLISH_TIMEOUT_SECONDS)
        config = bus.capture_stream_config(settings.capture_max_age_seconds, settings.capture_max_bytes)
        await bus.ensure_stream(jetstream, config)
        # Headers and the subject share the server's payload limit with the rows.
        limit = connection.max_payload - 4096
        send = functools.partial(send_capture, jetstream, subject)
        while True:
            batch = await capture.next_batch(settings.capture_flush_seconds)
            # Small tensors (single rows above all) are laid out in well under a millisecond: on the
            # loop, which spares a thread hop and the GIL's hand-over per batch; large ones (stacking
            # copies them) off the loop that serves requests. Either way each message is framed (its
            # tensor bytes copied) on the loop as it is sent, one at a time.
            if sum([row.bytes for row in batch]) <= INLINE_CAPTURE_BYTES:
                messages = domain.capture_messages(batch, limit)
            else:
                messages = await asyncio.to_thread(domain.capture_messages, batch, limit)
            if messages.too_large:
                capture.lost(messages.too_large)
                log.warning("capture: %d requests dropped, too large for a NATS message", messages.too_large)
            outcomes = await bus.publish_batch(messages.messages, send, PUBLISH_TIMEOUT_SECONDS)
            for message, outcome in zip(messages.messages, outcomes, strict=True):
                if outcome is None:
                    capture.sent(message.requests)
                else:
                    capture.lost(message.requests)
                    log.warning("capture: %d requests dropped, NATS did not take them: %s", message.requests, outcome)
    finally:
        await connection.close()


async def send_capture(
    jetstream: JetStreamContext, subject: str, message: domain.CaptureMessage
) -> asyncio.Future[Any]:
    """Frame a capture message and publish it; its ack is the future returned. Then let the
    connection write it before the next is framed, so that one message at a time is held whole
    (nats-py would join all that is pending into one buffer, a batch's worth)."""
    ack = await jetstream.publish_async(subject, message.payload())
    await asyncio.sleep(0)
    return ack


def build_server(settings: RuntimeSettings) -> object:
    """An unstarted grpc.aio server of the runtime (its models already loaded)."""
    return build(settings).server


async def main(settings: RuntimeSettings | None = None) -> None:
    """Serve the configured models until SIGTERM."""
    settings = settings or RuntimeSettings()
    await run_service(settings, build)

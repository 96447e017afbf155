"""Docker images that serve ONNX model versions with mlmesh's runtime.

An image holds the models under `/models/<name>/<version>/` and a virtualenv with the runtime
(`python -m services.runtime`, MLMESH_RUNTIME_MODEL_DIR=/models), the environment's locked packages
and mlmesh's own code. Nothing inside the build reaches a package index: the wheels are downloaded
on the host (`pip download --only-binary=:all:` for the image's Python and glibc) into the build
context, and the Dockerfile installs them with `pip install --no-index`.

Every image carries the label `io.mlmesh.build.key`, a sha256 over everything that goes into it;
a build whose key an image already has reuses that image.

Errors, by their gRPC code:
- INVALID_ARGUMENT: the spec itself is wrong (a model name or version, a lock line that is not
  `name==version --hash=...`, an unknown runtime setting, a malformed tag);
- DATA_LOSS: a model file does not match the sha256 it is given with;
- FAILED_PRECONDITION (`BuildFailed`): a well-formed spec that cannot be built as it is (no wheel
  for a lock line, a failing build step, a base image that is not there);
- UNAVAILABLE: the Docker engine, the package index or an image registry does not answer;
- NOT_FOUND: export or push of an image the engine does not have.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Annotated, Any

import docker
import docker.errors
import requests.exceptions
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from pydantic import AliasChoices, TypeAdapter, ValidationError

import services
from services.builder.environments import manylinux_architecture, target_options
from services.common import docker_engine
from services.common.docker_engine import is_reference, split_tag
from services.common.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from services.common.locks import file_lock
from services.common.names import REGISTERED_NAME
from services.runtime.settings import RuntimeSettings

# What `python -m services.runtime` imports, found by importing it in a virtualenv that has only
# these: the runtime itself (onnxruntime, numpy, aiohttp, prometheus-client, OIP over gRPC) and
# what services.common brings in at import time (the server builder imports the outbox and the
# bus, hence sqlmodel and faststream). Everything else mlmesh depends on stays out of the image.
RUNTIME_PACKAGES = (
    "aiohttp",
    "faststream",
    "grpcio",
    "grpcio-health-checking",
    "grpcio-reflection",
    "grpcio-status",
    "nats-py",
    "numpy",
    "onnxruntime",
    "opentelemetry-api",
    "opentelemetry-sdk",
    "prometheus-client",
    "protobuf",
    "pydantic",
    "pydantic-settings",
    "sqlmodel",
)

PYTHON_VERSION = re.compile(r"3\.(1[1-9]|[2-9][0-9])")
HASH_OPTION = re.compile(r"--hash[= ](sha256|sha384|sha512):[0-9a-fA-F]+")
MAX_LOCK_BYTES = 1024 * 1024
TENSOR_DATATYPES = {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"}
TENSOR_DATATYPES |= {"FP16", "FP32", "FP64", "BF16", "BYTES"}

# Set by the image itself: the runtime serves /models on all interfaces, on the ports it exposes.
IMAGE_RUNTIME_SETTINGS = {"model_dir", "models", "host", "port", "http_port", "registry_address", "cache_dir", "home"}

BUILD_KEY_LABEL = "io.mlmesh.build.key"
CONTEXT_DIGEST_LABEL = "io.mlmesh.build.context-digest"
USER_ID = 10001
GRPC_PORT = 8001
HTTP_PORT = 8000
# A cold build on the vfs storage driver copies the whole image for every instruction: minutes.
BUILD_TIMEOUT_SECONDS = 3600
PIP_TIMEOUT_SECONDS = 1800
# pip's complaint about configured local indexes that do not exist on this machine: only noise.
PIP_NOISE = "is ignored: it is neither a file nor a directory"
# What pip says inside the build when the wheels do not fit the base image's Python.
PYTHON_MISMATCH = ("No matching distribution found", "is not a supported wheel on this platform")
PIP_UNREACHABLE = ("Failed to establish a new connection", "NewConnectionError", "ProxyError", "Read timed out")


class BuildFailed(FailedPrecondition):
    """A well-formed spec that cannot be built as it is: pip found no wheel for a lock line (for the
    image's Python and platform), a step of `docker build` failed, or the base image is not on the
    engine and cannot be pulled. FAILED_PRECONDITION, because the same request fails the same way
    until the environment or base image changes. The message carries the failing step's output."""

    reason = "BUILD_FAILED"


@dataclass(frozen=True)
class ModelPayload:
    """One model version that goes into an image."""

    name: str
    version: int
    sha256: str
    """Of the ONNX file; checked when the file is copied into the build context."""
    onnx_path: Path
    signature: dict
    """{"inputs": [...], "outputs": [...]}, each tensor {"name", "datatype", "shape"} (-1: any size)."""


@dataclass(frozen=True)
class ImageSpec:
    """What an image is built from."""

    models: tuple[ModelPayload, ...]
    environment: str
    """"name:version" of the environment, for the labels; empty when the image has none."""
    lock_text: str
    """requirements.txt text, every line `pkg==version --hash=sha256:...` (may be empty)."""
    python_version: str
    """"3.11": the Python of the base image, which the wheels are downloaded for."""
    base_image: str
    """e.g. "python:3.11-slim" or "mlmesh-base:py3.11"; needs CPython with venv on glibc."""
    runtime_settings: dict[str, str]
    """More runtime settings for the container, by RuntimeSettings field name (max_batch_rows="16") or by
    variable (MLMESH_RUNTIME_MAX_BATCH_ROWS="16")."""
    tag: str | None = None
    """Default: mlmesh-model-<first model's name>:<version>-<key[:12]>."""


@dataclass(frozen=True)
class BuiltImage:
    tag: str
    image_id: str
    size_bytes: int
    key: str
    reused: bool
    """True when an image with the same key already existed."""
    context_digest: str
    """sha256 over the files that went into the image (wheels, mlmesh's code, models)."""


class ImageBuilder:
    """Builds, finds, exports and pushes model images on one Docker engine.

    `work_dir` keeps the caches (wheels by what was asked for, mlmesh's wheel by its sources) and
    the build contexts while they exist. `pip_arguments` go to every pip call (index options).
    """

    def __init__(
        self,
        work_dir: Path,
        *,
        docker_url: str | None = None,
        pip_arguments: Sequence[str] = (),
        python: str = sys.executable,
    ) -> None:
        self.work_dir = Path(work_dir)
        self.docker_url = docker_url
        self.pip_arguments = list(pip_arguments)
        self.python = python

    # ------------------------------------------------------------------ keys

    def runtime_digest(self) -> str:
        """sha256 over the mlmesh code and runtime requirements that go into the image."""
        digest = hashlib.sha256()
        root = source_root()
        if root is not None:
            digest.update(b"pyproject.toml\0" + (root / "pyproject.toml").read_bytes() + b"\0")
        for path in package_files():
            relative = path.relative_to(package_dir().parent).as_posix()
            digest.update(relative.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
        digest.update("\n".join(runtime_requirements()).encode())
        return digest.hexdigest()

    def image_key(self, spec: ImageSpec) -> str:
        """sha256 over model sha256s + names/versions + lock + python + base image + runtime settings
        + runtime_digest(). The base image counts by its image id when the engine has it, so a
        rebuilt base image makes new images."""
        base_id = None
        with contextlib.suppress(Unavailable), self._engine() as engine:
            base_id = _image_id(engine, spec.base_image)
        return self._key(spec, base_id)

    def _key(self, spec: ImageSpec, base_id: str | None) -> str:
        described = {
            "models": [[model.name, model.version, model.sha256.lower()] for model in spec.models],
            "lock": spec.lock_text.strip(),
            "python": spec.python_version,
            "base_image": [spec.base_image, base_id],
            "runtime_settings": sorted(runtime_environment(spec.runtime_settings).items()),
            "runtime": self.runtime_digest(),
        }
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()

    # ------------------------------------------------------------------ find and build

    def find(self, key: str) -> BuiltImage | None:
        """An existing image with label io.mlmesh.build.key=key (reused, no rebuild)."""
        with self._engine() as engine:
            return _find(engine, key)

    def build(self, spec: ImageSpec, on_log: Callable[[str], None]) -> BuiltImage:
        """Reuse when the key exists; else make the context and build; every build-log line and step
        ("downloading wheels", ...) goes to on_log as it happens."""
        lines = validate(spec)
        environment = runtime_environment(spec.runtime_settings)
        with self._engine() as engine:
            base_id = _ensure_base_image(engine, spec.base_image, on_log)
            key = self._key(spec, base_id)
            tag = spec.tag or default_tag(spec, key)
            # Two builds of one key wait for each other; the second then reuses the first's image.
            with file_lock(self.work_dir / "locks" / f"{key}.lock"):
                existing = _find(engine, key)
                if existing is not None:
                    on_log(f"reusing image {existing.image_id[:19]} (build key {key[:12]})")
                    if tag not in _tags_of(engine, existing.image_id):
                        repository, tag_part = split_tag(tag)
                        engine.tag(existing.image_id, repository, tag_part)
                    return BuiltImage(tag, existing.image_id, existing.size_bytes, key, True, existing.context_digest)
                started = time.monotonic()
                context = self.work_dir / "contexts" / uuid.uuid4().hex
                context.mkdir(parents=True)
                try:
                    engine_architecture = engine.info().get("Architecture") or platform.machine()
                    context_digest = self._fill_context(context, spec, lines, engine_architecture, on_log)
                    labels = _labels(spec, key, context_digest)
                    recipe = dockerfile(
                        spec, environment, labels, has_lock=bool(lines), mlmesh_wheel=_has_wheel(context)
                    )
                    (context / "Dockerfile").write_text(recipe)
                    on_log(f"building {tag} from {spec.base_image}")
                    try:
                        image_id = _docker_build(engine, context, tag, on_log)
                    except BuildFailed as error:
                        if not any(sign in error.message for sign in PYTHON_MISMATCH):
                            raise
                        hint = f"(the wheels are for Python {spec.python_version}: does {spec.base_image} have it?)"
                        raise BuildFailed(f"{error.message}\n{hint}", metadata=error.metadata) from None
                finally:
                    shutil.rmtree(context, ignore_errors=True)
                size = int(engine.inspect_image(image_id)["Size"])
                on_log(f"built {tag} ({image_id[:19]}, {size / 1e6:.0f} MB) in {time.monotonic() - started:.0f} s")
                return BuiltImage(tag, image_id, size, key, False, context_digest)

    def _fill_context(
        self, context: Path, spec: ImageSpec, lock_lines: list[str], architecture: str, on_log: Callable[[str], None]
    ) -> str:
        """The build context without its Dockerfile; returns the sha256 over its files."""
        files: list[tuple[str, str]] = []  # (path in the context, sha256)
        # Models first: a file that does not match its sha256 fails the build before any download.
        for model in spec.models:
            on_log(f"adding model {model.name}:{model.version}")
            folder = context / "models" / model.name / str(model.version)
            folder.mkdir(parents=True)
            _copy_checked(model, folder / "model.onnx")
            about = {"name": model.name, "version": model.version, "sha256": model.sha256.lower()}
            (folder / "model.json").write_text(json.dumps({**about, "signature": model.signature}, indent=2))
            files.append((f"models/{model.name}/{model.version}/model.onnx", model.sha256.lower()))
            files.append((f"models/{model.name}/{model.version}/model.json", _sha256_of(folder / "model.json")))
        # Readable by the runtime's unprivileged user whatever this process's umask is.
        (context / "models").chmod(0o755)
        for path in (context / "models").rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        wheels = self._wheelhouse(lock_lines, spec.python_version, architecture, on_log)
        (context / "wheelhouse").mkdir()
        for name, sha256 in _manifest(wheels):
            _link_or_copy(wheels / name, context / "wheelhouse" / name)
            files.append((f"wheelhouse/{name}", sha256))
        on_log("adding mlmesh's code")
        mlmesh = context / "mlmesh"
        shutil.copytree(self._mlmesh_code(on_log), mlmesh, copy_function=_link_or_copy)
        for path in sorted(mlmesh.rglob("*")):
            if path.is_file():
                files.append((path.relative_to(context).as_posix(), _sha256_of(path)))
        listing = "".join(f"{sha256}  {path}\n" for path, sha256 in sorted(files))
        return hashlib.sha256(listing.encode()).hexdigest()

    def _wheelhouse(
        self, lock_lines: list[str], python_version: str, architecture: str, on_log: Callable[[str], None]
    ) -> Path:
        """A folder of wheels for the lock and the runtime, with lock.txt, runtime.txt and
        constraints.txt; downloaded once for each distinct ask and kept under work_dir."""
        lock = "".join(line + "\n" for line in lock_lines)
        locked = {canonicalize_name(Requirement(_requirement_part(line)).name) for line in lock_lines}
        runtime = "".join(line + "\n" for line in runtime_requirements(locked))
        constraints = "".join(line + "\n" for line in _constraints(lock_lines))
        platform_options = target_options(python_version, manylinux_architecture(architecture))
        asked = json.dumps([lock, runtime, constraints, platform_options, self.pip_arguments]).encode()
        target = self.work_dir / "wheels" / hashlib.sha256(asked).hexdigest()
        if (target / "SHA256SUMS").exists():
            on_log(f"wheels for Python {python_version} ({architecture}) already downloaded")
            return target
        partial = Path(tempfile.mkdtemp(dir=_made(self.work_dir / "wheels"), prefix="partial-"))
        try:
            (partial / "lock.txt").write_text(lock)
            (partial / "runtime.txt").write_text(runtime)
            (partial / "constraints.txt").write_text(constraints)
            download = [self.python, "-m", "pip", "download", "--dest", str(partial)]
            download += [*platform_options, "--progress-bar", "off", *self.pip_arguments]
            if lock_lines:
                on_log(f"downloading wheels of the environment lock for Python {python_version} ({architecture})")
                self._pip(
                    [*download, "--require-hashes", "--requirement", str(partial / "lock.txt")],
                    "pip could not download the wheels of the environment lock",
                    on_log,
                )
            on_log(f"downloading wheels of the runtime for Python {python_version} ({architecture})")
            self._pip(
                [*download, "-r", str(partial / "runtime.txt"), "-c", str(partial / "constraints.txt")],
                "pip could not download the wheels of the runtime (with the lock's versions)",
                on_log,
            )
            sums = "".join(f"{_sha256_of(path)}  {path.name}\n" for path in sorted(partial.glob("*.whl")))
            (partial / "SHA256SUMS").write_text(sums)
            try:
                partial.rename(target)
            except OSError:
                # Another build downloaded the same wheels meanwhile: theirs serve as well.
                if not (target / "SHA256SUMS").exists():
                    raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return target

    def _mlmesh_code(self, on_log: Callable[[str], None]) -> Path:
        """A folder with mlmesh's wheel (built from the source tree) or, for an installed mlmesh
        without its sources, a copy of the `services` package; kept by runtime_digest()."""
        target = self.work_dir / "mlmesh" / self.runtime_digest()
        if target.exists():
            return target
        partial = Path(tempfile.mkdtemp(dir=_made(self.work_dir / "mlmesh"), prefix="partial-"))
        try:
            root = source_root()
            if root is not None:
                on_log("building mlmesh's wheel")
                with tempfile.TemporaryDirectory(dir=self.work_dir, prefix="source-") as scratch:
                    # Built from a copy: the build writes build/ and *.egg-info, which do not belong
                    # in a source tree that others may be working in.
                    source = Path(scratch)
                    for name in ("pyproject.toml", "README.md", "LICENSE"):
                        if (root / name).exists():
                            shutil.copy2(root / name, source / name)
                    _copy_package(source / "services")
                    wheel = [self.python, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(partial)]
                    self._pip(
                        [*wheel, *self.pip_arguments, str(source)],
                        "pip could not build mlmesh's wheel",
                        on_log,
                        environment={"SOURCE_DATE_EPOCH": "315532800"},
                    )
            else:
                _copy_package(partial / "services")
            try:
                partial.rename(target)
            except OSError:
                if not target.exists():
                    raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return target

    def _pip(
        self,
        command: list[str],
        failure: str,
        on_log: Callable[[str], None],
        environment: dict[str, str] | None = None,
    ) -> None:
        """Runs pip, each output line to on_log; its ERROR lines become the failure's message."""
        output: deque[str] = deque(maxlen=40)
        errors: list[str] = []
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **environment} if environment else None,
        )
        watchdog = threading.Timer(PIP_TIMEOUT_SECONDS, process.kill)
        watchdog.start()
        try:
            assert process.stdout is not None
            for raw_line in process.stdout:
                line = raw_line.rstrip()
                if not line or PIP_NOISE in line:
                    continue
                output.append(line)
                if line.startswith("ERROR:") or errors:
                    errors.append(line)
                on_log(line)
            returncode = process.wait()
        finally:
            watchdog.cancel()
            if process.poll() is None:
                process.kill()
                process.wait()
        if returncode == 0:
            return
        reason = "\n".join(errors[:20] or list(output)[-20:]) or f"pip exited with {returncode}"
        if returncode < 0:
            reason = f"pip was stopped after {PIP_TIMEOUT_SECONDS} s\n{reason}"
        if any(marker in "\n".join(output) for marker in PIP_UNREACHABLE):
            raise Unavailable(f"{failure}: the package index does not answer:\n{reason}")
        raise BuildFailed(f"{failure}:\n{reason}", metadata={"step": "wheels"})

    # ------------------------------------------------------------------ export and push

    def export(self, image: str, path: Path, on_progress: Callable[[int], None] | None = None) -> int:
        """`docker save` archive (bytes written), written to a temp file then renamed."""
        path = Path(path)
        with self._engine() as engine:
            try:
                engine.inspect_image(image)
            except docker.errors.ImageNotFound:
                raise NotFound(f"image {image!r} is not on this Docker engine", reason="IMAGE_NOT_FOUND") from None
            descriptor, partial_name = tempfile.mkstemp(dir=_made(path.parent), prefix=f".{path.name}.", suffix=".part")
            partial = Path(partial_name)
            written = 0
            try:
                with os.fdopen(descriptor, "wb") as archive:
                    for chunk in engine.get_image(image):
                        archive.write(chunk)
                        written += len(chunk)
                        if on_progress is not None:
                            on_progress(written)
                    archive.flush()
                    os.fsync(archive.fileno())
                partial.replace(path)
            except (requests.exceptions.RequestException, docker.errors.APIError) as error:
                raise Unavailable(f"the Docker engine stopped sending {image}: {error}") from None
            finally:
                partial.unlink(missing_ok=True)
        return written

    def push(self, tag: str, repository: str, on_log: Callable[[str], None]) -> str:
        """Tag as repository:tag-part and push; returns the pushed reference (with digest when the
        registry gives one). The extra local tag is removed again afterwards."""
        if not docker_engine.REPOSITORY.fullmatch(repository or ""):
            raise InvalidArgument(
                f"repository {repository[:200]!r} is not a Docker repository ([host[:port]/]path, lowercase)",
                field="repository",
            )
        _, tag_part = split_tag(tag)
        reference = f"{repository}:{tag_part}"
        with self._engine() as engine:
            try:
                engine.inspect_image(tag)
            except docker.errors.ImageNotFound:
                raise NotFound(f"image {tag!r} is not on this Docker engine", reason="IMAGE_NOT_FOUND") from None
            tagged_before = reference in _tags_of(engine, tag)
            engine.tag(tag, repository, tag_part)
            digest = ""
            try:
                on_log(f"pushing {reference}")
                for line in engine.push(repository, tag=tag_part, stream=True, decode=True):
                    if "error" in line or "errorDetail" in line:
                        message = line.get("error") or line["errorDetail"].get("message", "")
                        _push_failed(reference, message)
                    digest = (line.get("aux") or {}).get("Digest", digest)
                    status = line.get("status")
                    # Progress bars repeat many times a second; the layer states and the result suffice.
                    if status and not line.get("progressDetail"):
                        on_log(" ".join(part for part in (line.get("id"), status) if part))
            except (requests.exceptions.RequestException, docker.errors.APIError) as error:
                _push_failed(reference, str(error))
            finally:
                if not tagged_before:
                    with contextlib.suppress(docker.errors.APIError):
                        engine.remove_image(reference, noprune=True)
        pushed = f"{reference}@{digest}" if digest else reference
        on_log(f"pushed {pushed}")
        return pushed

    # ------------------------------------------------------------------ engine

    def _engine(self) -> contextlib.AbstractContextManager[docker.APIClient]:
        """A client of the Docker engine; builds and archives stream for minutes."""
        return docker_engine.engine(self.docker_url, timeout=BUILD_TIMEOUT_SECONDS)


# ---------------------------------------------------------------------- validation


def validate(spec: ImageSpec) -> list[str]:
    """The spec's lock as logical lines (continuations joined, comments gone); InvalidArgument
    naming the first thing that is wrong."""
    if not spec.models:
        raise InvalidArgument("an image needs at least one model version", field="models")
    seen = set()
    for index, model in enumerate(spec.models):
        where = f"models[{index}]"
        if not REGISTERED_NAME.fullmatch(model.name or ""):
            raise InvalidArgument(
                f"{where}: model name {model.name[:200]!r} must match {REGISTERED_NAME.pattern}", field=f"{where}.name"
            )
        if isinstance(model.version, bool) or not isinstance(model.version, int) or model.version < 1:
            raise InvalidArgument(f"{where}: version must be a positive integer", field=f"{where}.version")
        if (model.name, model.version) in seen:
            raise InvalidArgument(f"{where}: {model.name}:{model.version} is given twice", field="models")
        seen.add((model.name, model.version))
        if not re.fullmatch(r"[0-9a-fA-F]{64}", model.sha256 or ""):
            raise InvalidArgument(f"{where}: sha256 must be 64 hex digits", field=f"{where}.sha256")
        _validate_signature(model.signature, where)
        if not Path(model.onnx_path).is_file():
            raise InvalidArgument(f"{where}: no file at {model.onnx_path}", field=f"{where}.onnx_path")
    if not PYTHON_VERSION.fullmatch(spec.python_version or ""):
        raise InvalidArgument(
            f"python_version {spec.python_version[:40]!r} must be 3.X with X >= 11 (mlmesh's runtime needs 3.11+)",
            field="python_version",
        )
    if not is_reference(spec.base_image):
        raise InvalidArgument(f"base image {spec.base_image[:200]!r} is not an image reference", field="base_image")
    if spec.tag is not None and not is_reference(spec.tag):
        raise InvalidArgument(
            f"tag {spec.tag[:200]!r} is not an image reference ([host[:port]/]path[:tag], lowercase path)",
            field="tag",
        )
    # Empty: no environment, the runtime's own dependencies only.
    if len(spec.environment) > 300 or not spec.environment.isprintable():
        raise InvalidArgument(
            "environment must be a printable name:version of at most 300 characters", field="environment"
        )
    if spec.runtime_settings.get("served_name") and len(spec.models) != 1:
        raise InvalidArgument(
            f"runtime setting served_name renames one model, but the image serves {len(spec.models)}",
            field="runtime_settings",
        )
    return lock_lines(spec.lock_text)


def _validate_signature(signature: Any, where: str) -> None:
    field = f"{where}.signature"
    if not isinstance(signature, dict) or not isinstance(signature.get("inputs"), list):
        raise InvalidArgument(f'{where}: signature must be {{"inputs": [...], "outputs": [...]}}', field=field)
    for side in ("inputs", "outputs"):
        tensors = signature.get(side, [])
        if not isinstance(tensors, list):
            raise InvalidArgument(f"{where}: signature {side} must be a list", field=field)
        for tensor in tensors:
            valid = (
                isinstance(tensor, dict)
                and isinstance(tensor.get("name"), str)
                and 0 < len(tensor["name"]) <= 200
                and tensor.get("datatype") in TENSOR_DATATYPES
                and isinstance(tensor.get("shape"), list)
                and all(isinstance(size, int) and not isinstance(size, bool) and size >= -1 for size in tensor["shape"])
            )
            if not valid:
                raise InvalidArgument(
                    f"{where}: signature {side} need name, datatype (one of {', '.join(sorted(TENSOR_DATATYPES))}) "
                    f"and shape (integers, -1: any size); got {str(tensor)[:200]}",
                    field=field,
                )


def lock_lines(lock_text: str) -> list[str]:
    """The requirement lines of a lock, each `name[extras]==version[; marker] --hash=...`; anything
    else (-r, -e, --index-url, URLs, paths) is refused: a lock names packages, never where to get them."""
    if len(lock_text.encode()) > MAX_LOCK_BYTES:
        raise ResourceExhausted(f"the environment lock is larger than {MAX_LOCK_BYTES} bytes")
    lines: list[str] = []
    pending = ""
    for number, raw in enumerate(lock_text.splitlines(), start=1):
        line = pending + raw
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if not line:
            continue
        requirement = _requirement_part(line)
        options = line[len(requirement) :].strip()
        if not requirement:
            raise InvalidArgument(
                f"lock line {number}: {line[:100]!r} names no package; each line is `name==version "
                "--hash=sha256:...` (no -r, -e, --index-url or other options)",
                field="lock_text",
            )
        try:
            parsed = Requirement(requirement)
        except InvalidRequirement as error:
            raise InvalidArgument(
                f"lock line {number}: {requirement[:200]!r} is not a requirement: {error}", field="lock_text"
            ) from None
        if parsed.url:
            raise InvalidArgument(
                f"lock line {number}: a lock names packages by version, not by URL or path", field="lock_text"
            )
        for option in re.split(r"\s+(?=--)", options) if options else ():
            if not HASH_OPTION.fullmatch(option.strip()):
                raise InvalidArgument(
                    f"lock line {number}: {option[:100]!r} is not allowed; each line is `name==version "
                    "--hash=sha256:...` (no -r, -e, --index-url or other options)",
                    field="lock_text",
                )
        lines.append(f"{requirement} {options}".strip())
    return lines


def _requirement_part(line: str) -> str:
    """The requirement of a lock line, before its first option."""
    match = re.search(r"(^|\s)-", line)
    return line[: match.start()].strip() if match else line.strip()


def _constraints(lock_lines: list[str]) -> list[str]:
    """The lock's pins without hashes or extras: pip constraints that keep the runtime's packages at
    the lock's versions."""
    constraints = []
    for line in lock_lines:
        requirement = Requirement(_requirement_part(line))
        marker = f"; {requirement.marker}" if requirement.marker else ""
        constraints.append(f"{requirement.name}{requirement.specifier}{marker}")
    return constraints


def default_tag(spec: ImageSpec, key: str) -> str:
    first = spec.models[0]
    name = re.sub(r"[^a-z0-9]+", "-", first.name.lower()).strip("-") or "model"
    return f"mlmesh-model-{name}:{first.version}-{key[:12]}"


def runtime_environment(settings: dict[str, str]) -> dict[str, str]:
    """The container's environment for runtime settings named by RuntimeSettings field (max_batch_rows)
    or by their variable (MLMESH_RUNTIME_MAX_BATCH_ROWS); InvalidArgument for names the runtime does
    not have, that the image sets itself, or values it would refuse."""
    fields = RuntimeSettings.model_fields
    variables = {_variable_of(key): key for key in fields}
    environment = {}
    for given, value in settings.items():
        key = variables.get(given, given)
        field = fields.get(key)
        if field is None:
            raise InvalidArgument(
                f"runtime setting {given[:100]!r} is not one of {', '.join(sorted(fields))}", field="runtime_settings"
            )
        if key in IMAGE_RUNTIME_SETTINGS:
            raise InvalidArgument(f"runtime setting {key!r} is set by the image itself", field="runtime_settings")
        if not isinstance(value, str) or not value.isprintable() or len(value) > 4096:
            raise InvalidArgument(
                f"runtime setting {key!r}: the value must be printable text", field="runtime_settings"
            )
        annotation = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
        try:
            TypeAdapter(annotation).validate_python(value)
        except ValidationError as error:
            message = error.errors()[0]["msg"]
            raise InvalidArgument(
                f"runtime setting {key}={value[:100]!r}: {message}", field="runtime_settings"
            ) from None
        environment[_variable_of(key)] = value
    return dict(sorted(environment.items()))


def _variable_of(key: str) -> str:
    """The environment variable the runtime reads a setting from."""
    alias = RuntimeSettings.model_fields[key].validation_alias
    if isinstance(alias, AliasChoices):
        # Settings shared by the mesh (log_level, nats_url) have a name of their own.
        return next(str(choice) for choice in alias.choices if str(choice).isupper())
    return f"MLMESH_RUNTIME_{key.upper()}"


# ---------------------------------------------------------------------- what goes into the image


def package_dir() -> Path:
    return Path(services.__file__).resolve().parent


def source_root() -> Path | None:
    """The source tree mlmesh runs from (with its pyproject.toml), or None for an installed mlmesh."""
    root = package_dir().parent
    return root if (root / "pyproject.toml").is_file() else None


def package_files() -> list[Path]:
    return sorted(
        path
        for path in package_dir().rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    )


def _copy_package(target: Path) -> None:
    shutil.copytree(package_dir(), target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def runtime_requirements(locked: Collection[str] = ()) -> list[str]:
    """The runtime's packages, each at the version installed here (what mlmesh is tested with); a
    package the lock pins takes mlmesh's own range instead, so the lock's version can win."""
    ranges = {}
    with contextlib.suppress(package_metadata.PackageNotFoundError):
        for text in package_metadata.requires("mlmesh") or ():
            requirement = Requirement(text)
            if not requirement.marker:
                ranges[canonicalize_name(requirement.name)] = str(requirement.specifier)
    lines = []
    for name in RUNTIME_PACKAGES:
        if canonicalize_name(name) in locked:
            lines.append(f"{name}{ranges.get(canonicalize_name(name), '')}")
            continue
        try:
            lines.append(f"{name}=={package_metadata.version(name)}")
        except package_metadata.PackageNotFoundError:
            lines.append(f"{name}{ranges.get(canonicalize_name(name), '')}")
    return lines


def _has_wheel(context: Path) -> bool:
    return any((context / "mlmesh").glob("*.whl"))


def _labels(spec: ImageSpec, key: str, context_digest: str) -> dict[str, str]:
    names = ",".join(model.name for model in spec.models)
    versions = ",".join(str(model.version) for model in spec.models)
    served = ", ".join(f"{model.name}:{model.version}" for model in spec.models)
    labels = {
        "org.opencontainers.image.title": f"mlmesh model {served}",
        "org.opencontainers.image.description": (
            f"Serves {served} with mlmesh's runtime over the Open Inference Protocol "
            f"(gRPC {GRPC_PORT}, REST {HTTP_PORT})"
        ),
        "org.opencontainers.image.created": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "org.opencontainers.image.version": versions,
        "org.opencontainers.image.base.name": spec.base_image,
        "io.mlmesh.model.name": names,
        "io.mlmesh.model.version": versions,
        "io.mlmesh.model.sha256": ",".join(model.sha256.lower() for model in spec.models),
        "io.mlmesh.environment": spec.environment,
        "io.mlmesh.runtime.version": _mlmesh_version(),
        BUILD_KEY_LABEL: key,
        CONTEXT_DIGEST_LABEL: context_digest,
    }
    source, revision = _source_and_revision()
    if source:
        labels["org.opencontainers.image.source"] = source
    if revision:
        labels["org.opencontainers.image.revision"] = revision
    return labels


def _mlmesh_version() -> str:
    try:
        return package_metadata.version("mlmesh")
    except package_metadata.PackageNotFoundError:
        return "0+unknown"


def _source_and_revision() -> tuple[str, str]:
    """mlmesh's source URL (from its package metadata) and the git commit of its source tree, each
    when there is one."""
    source = ""
    with contextlib.suppress(package_metadata.PackageNotFoundError):
        about = package_metadata.metadata("mlmesh")
        for entry in about.get_all("Project-URL") or []:
            label, _, url = entry.partition(",")
            if label.strip().lower() in ("source", "repository", "homepage"):
                source = url.strip()
                break
        source = source or about.get("Home-page") or ""
    revision = ""
    root = source_root()
    if root is not None and (root / ".git").exists() and shutil.which("git"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            answer = subprocess.run(
                ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
            )
            if answer.returncode == 0:
                revision = answer.stdout.strip()
    return source, revision


def dockerfile(
    spec: ImageSpec, environment: dict[str, str], labels: dict[str, str], *, has_lock: bool, mlmesh_wheel: bool
) -> str:
    """The Dockerfile of a model image.

    The legacy builder (the only one the engine's API offers without BuildKit) copies the whole
    image for every instruction on storage drivers such as vfs, and so does each label passed to
    the build call (one instruction each): the instructions that do not depend on the models come
    first so that they are cached, the labels go in one instruction, and the virtualenv, by far
    the largest part, is copied in last.
    """
    site_packages = f"/opt/mlmesh/lib/python{spec.python_version}/site-packages"
    pip = "/opt/mlmesh/bin/pip install --no-index --no-cache-dir --progress-bar off"
    lock_install = (
        f" \\\n && {pip} --find-links /tmp/wheelhouse --require-hashes --requirement /tmp/wheelhouse/lock.txt"
        if has_lock
        else ""
    )
    if mlmesh_wheel:
        mlmesh_install = f"{pip} --no-deps /tmp/mlmesh/*.whl"
    else:
        mlmesh_install = f"cp -r /tmp/mlmesh/services {site_packages}/"
    base_environment = {
        "PATH": "/opt/mlmesh/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "MLMESH_HOME": "/data",
        "MLMESH_RUNTIME_MODEL_DIR": "/models",
        "MLMESH_RUNTIME_HOST": "0.0.0.0",
        "MLMESH_RUNTIME_PORT": str(GRPC_PORT),
        "MLMESH_RUNTIME_HTTP_PORT": str(HTTP_PORT),
    }
    health = (
        "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + "
        f"os.environ.get('MLMESH_RUNTIME_HTTP_PORT', '{HTTP_PORT}') + '/v2/health/ready', timeout=4)"
    )
    lines = [
        "# Generated by mlmesh's builder (services/builder/images.py).",
        f"FROM {spec.base_image} AS install",
        "# The environment's lock and the runtime's packages, from wheels downloaded on the host.",
        "COPY wheelhouse/ /tmp/wheelhouse/",
        "RUN python3 -m venv /opt/mlmesh" + lock_install + " \\",
        f" && {pip} --find-links /tmp/wheelhouse"
        " --requirement /tmp/wheelhouse/runtime.txt --constraint /tmp/wheelhouse/constraints.txt",
        "COPY mlmesh/ /tmp/mlmesh/",
        f"RUN {mlmesh_install} \\",
        " && /opt/mlmesh/bin/python -c 'import services.runtime.main' \\",
        " && /opt/mlmesh/bin/pip uninstall --quiet --yes pip setuptools",
        "",
        f"FROM {spec.base_image}",
        f"RUN groupadd --gid {USER_ID} mlmesh \\",
        f" && useradd --uid {USER_ID} --gid {USER_ID} --home-dir /data --no-create-home"
        " --shell /usr/sbin/nologin mlmesh \\",
        " && mkdir -p /data /models && chown mlmesh:mlmesh /data",
        "ENV " + _pairs(base_environment),
        f"EXPOSE {HTTP_PORT} {GRPC_PORT}",
        "HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 CMD "
        + json.dumps(["python3", "-c", health]),
        "WORKDIR /data",
        f"USER {USER_ID}:{USER_ID}",
        'CMD ["python3", "-m", "services.runtime"]',
    ]
    if environment:
        lines.append("ENV " + _pairs(environment))
    lines += [
        "LABEL " + _pairs(labels),
        "COPY models/ /models/",
        "COPY --from=install /opt/mlmesh /opt/mlmesh",
    ]
    return "\n".join(lines) + "\n"


def _pairs(values: dict[str, str]) -> str:
    """key="value" pairs for ENV and LABEL, one per line; both expand $variables, hence the escapes."""

    def quoted(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'

    return " \\\n    ".join(f"{key}={quoted(value)}" for key, value in values.items())


# ---------------------------------------------------------------------- files


def _made(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest(wheels: Path) -> list[tuple[str, str]]:
    """(file name, sha256) of a cached wheelhouse: its wheels and requirement files."""
    entries = []
    for line in (wheels / "SHA256SUMS").read_text().splitlines():
        sha256, _, name = line.partition("  ")
        entries.append((name, sha256))
    for name in ("lock.txt", "runtime.txt", "constraints.txt"):
        entries.append((name, _sha256_of(wheels / name)))
    return entries


def _link_or_copy(source: Path | str, target: Path | str) -> None:
    """A hard link where the file system allows it (cached wheels are large), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _copy_checked(model: ModelPayload, target: Path) -> None:
    """Copies the model's ONNX file, checking it against its sha256 on the way."""
    digest = hashlib.sha256()
    try:
        with Path(model.onnx_path).open("rb") as source, target.open("wb") as copy:
            while chunk := source.read(1024 * 1024):
                digest.update(chunk)
                copy.write(chunk)
    except FileNotFoundError:
        raise InvalidArgument(f"model {model.name}:{model.version}: no file at {model.onnx_path}") from None
    if digest.hexdigest() != model.sha256.lower():
        raise DataLoss(
            f"model {model.name}:{model.version}: {model.onnx_path} has sha256 {digest.hexdigest()}, "
            f"not {model.sha256.lower()}"
        )


# ---------------------------------------------------------------------- the engine


def _image_id(engine: docker.APIClient, reference: str) -> str | None:
    try:
        return str(engine.inspect_image(reference)["Id"])
    except docker.errors.ImageNotFound:
        return None


def _ensure_base_image(engine: docker.APIClient, base_image: str, on_log: Callable[[str], None]) -> str:
    """The base image's id, pulling it when the engine does not have it."""
    image_id = _image_id(engine, base_image)
    if image_id:
        return image_id
    on_log(f"pulling base image {base_image}")
    repository, tag = split_tag(base_image)
    try:
        for line in engine.pull(repository, tag=tag, stream=True, decode=True):
            if "error" in line:
                raise docker.errors.APIError(line["error"])
    except (docker.errors.APIError, requests.exceptions.RequestException) as error:
        raise BuildFailed(
            f"base image {base_image} is not on this Docker engine and cannot be pulled: {error}",
            metadata={"step": "base image"},
        ) from None
    image_id = _image_id(engine, base_image)
    if not image_id:
        raise BuildFailed(f"base image {base_image} could not be pulled", metadata={"step": "base image"})
    return image_id


def _tags_of(engine: docker.APIClient, image_id: str) -> list[str]:
    return [tag for tag in engine.inspect_image(image_id).get("RepoTags") or [] if tag != "<none>:<none>"]


def _find(engine: docker.APIClient, key: str) -> BuiltImage | None:
    # Only tagged images: a failed build can leave its last step's image behind, untagged.
    candidates = [
        image
        for image in engine.images(filters={"label": f"{BUILD_KEY_LABEL}={key}"})
        if any(tag != "<none>:<none>" for tag in image.get("RepoTags") or [])
    ]
    if not candidates:
        return None
    image = max(candidates, key=lambda candidate: candidate.get("Created", 0))
    tags = [tag for tag in image["RepoTags"] if tag != "<none>:<none>"]
    tag = next((tag for tag in tags if tag.startswith("mlmesh-model-")), tags[0])
    labels = image.get("Labels") or {}
    return BuiltImage(tag, image["Id"], int(image["Size"]), key, True, labels.get(CONTEXT_DIGEST_LABEL, ""))


def _docker_build(engine: docker.APIClient, context: Path, tag: str, on_log: Callable[[str], None]) -> str:
    """Runs `docker build` of the context, each output line to on_log; the image id. A failing step
    raises BuildFailed with that step's output."""
    step = "docker build"
    step_output: deque[str] = deque(maxlen=60)
    image_id = ""
    pending = ""
    try:
        stream = engine.build(
            path=str(context),
            tag=tag,
            rm=True,
            forcerm=True,
            decode=True,
            pull=False,
            timeout=BUILD_TIMEOUT_SECONDS,
            use_config_proxy=False,
        )
    except docker.errors.APIError as error:
        raise BuildFailed(f"docker build was refused: {error}", metadata={"step": step}) from None
    for item in stream:
        if "error" in item or "errorDetail" in item:
            message = item.get("error") or (item.get("errorDetail") or {}).get("message", "")
            output = "\n".join(line for line in step_output if line.strip())
            raise BuildFailed(
                f"docker build failed at {step}: {message.strip()}\n{output[-4000:]}",
                metadata={"step": step[:200]},
            )
        if "aux" in item:
            image_id = item["aux"].get("ID", image_id)
        text = item.get("stream") or item.get("status") or ""
        if not text:
            continue
        pending += text
        *complete, pending = pending.split("\n")
        for line in complete:
            line = line.rstrip()
            if line.startswith("Step "):
                step = line
                step_output.clear()
            step_output.append(line)
            if line:
                on_log(line)
    if pending.strip():
        on_log(pending.rstrip())
    if not image_id:
        image_id = str(engine.inspect_image(tag)["Id"])
    return image_id


def _push_failed(reference: str, message: str) -> None:
    unreachable = ("connection refused", "no such host", "i/o timeout", "dial tcp", "connection reset", "timeout")
    if any(marker in message.lower() for marker in unreachable):
        raise Unavailable(f"cannot push {reference}: its registry does not answer ({message.strip()})")
    raise FailedPrecondition(f"the registry refused {reference}: {message.strip()}", reason="PUSH_FAILED")

"""The builder's behaviour: environments, conversions to ONNX, model images. The slow parts live in
their own modules (environments: pip's resolver; convert: the isolated conversion worker; images:
the Docker build); this module orders them, records what they produced and emits the events."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import col, func, select

from services._proto.mlmesh.v1 import common_pb2
from services.builder import environments
from services.builder.convert import ConversionLimits, ConversionOptions, ConversionResult, convert_model
from services.builder.images import (
    BuiltImage,
    ImageBuilder,
    ImageSpec,
    ModelPayload,
    runtime_environment,
)
from services.builder.models import ConversionRow, EnvironmentRow, ImageRow
from services.common import events, paging
from services.common.db import Database
from services.common.docker_engine import is_reference, split_tag
from services.common.errors import FailedPrecondition, InvalidArgument, MlmeshError, NotFound
from services.common.names import REGISTERED_NAME
from services.common.outbox import Outbox

SERVICE = "builder"
CONVERTIBLE = ("sklearn", "xgboost", "lightgbm")
MODEL_SUFFIXES = (".pkl", ".pickle", ".joblib")
EXAMPLE_NAMES = ("input_example.json", "input_example.csv", "input_example.parquet")
MAX_IMAGE_MODELS = 16
EVENT_REQUIREMENTS = 100
EVENT_REASON_CHARS = 4000


@dataclass
class EnvironmentSpec:
    name: str
    python_version: str
    requirements: str
    base_image: str = ""
    description: str = ""


def check_name(value: str, what: str) -> str:
    if not REGISTERED_NAME.fullmatch(value or ""):
        raise InvalidArgument(
            f"{what} {value[:64]!r} is not valid: 1-128 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit",
            field=what,
        )
    return value


def check_base_image(value: str) -> str:
    if value and not is_reference(value):
        raise InvalidArgument(
            f"base_image {value[:80]!r} is not an image reference such as python:3.11-slim", field="base_image"
        )
    return value


def split_ref(ref: str, what: str = "ref") -> tuple[str, int | None]:
    """`name:version` -> (name, version); `name` -> (name, None)."""
    name, _, version = ref.partition(":")
    check_name(name, what)
    if not version:
        return name, None
    if not version.isdigit() or not 0 < int(version) < 2**62:
        raise InvalidArgument(f"{what} {ref[:80]!r}: the version must be a positive number", field=what)
    return name, int(version)


class Builder:
    """Environments, conversions and images, recorded in the builder's database."""

    def __init__(
        self,
        database: Database,
        outbox: Outbox,
        registry: Any,
        images: ImageBuilder,
        work_dir: Path,
        *,
        index: environments.PackageIndex,
        resolve_timeout_seconds: float,
        limits: ConversionLimits,
        default_base_image: str,
        push_registry: str = "",
    ) -> None:
        self.database = database
        self.outbox = outbox
        self.registry = registry
        self.images = images
        self.work_dir = work_dir
        self.index = index
        self.resolve_timeout_seconds = resolve_timeout_seconds
        self.limits = limits
        self.default_base_image = default_base_image
        self.push_registry = push_registry

    # ------------------------------------------------------------ environments

    def register_environment(self, spec: EnvironmentSpec, actor: str = "") -> tuple[EnvironmentRow, bool]:
        """A new version of the environment with its lock, or the version an identical spec got."""
        check_name(spec.name, "name")
        python_version = spec.python_version or "3.11"
        base_image = check_base_image(spec.base_image)
        requirements = environments.normalize_requirements(spec.requirements)
        digest = environments.spec_digest(python_version, requirements, base_image)
        existing = self._environment_by_digest(spec.name, digest)
        if existing:
            return existing, False
        # pip runs outside any transaction: it can take minutes.
        lock = environments.resolve_lock(
            requirements, python_version, self.index, timeout_seconds=self.resolve_timeout_seconds
        )
        row = EnvironmentRow(
            name=spec.name,
            version=0,
            python_version=python_version,
            requirements=json.dumps(requirements),
            base_image=base_image,
            description=spec.description,
            lock=json.dumps([package.__dict__ for package in lock.packages]),
            lock_text=lock.requirements_text(),
            spec_digest=digest,
            created_by=actor,
            created_at=time.time(),
        )
        for _ in range(5):
            try:
                with self.database.transaction() as session:
                    latest = session.exec(
                        select(func.max(EnvironmentRow.version)).where(EnvironmentRow.name == spec.name)
                    ).one()
                    row.version = (latest or 0) + 1
                    session.add(row)
                    session.flush()
                    payload = events.EnvironmentRegistered(
                        name=row.name,
                        version=row.version,
                        python_version=python_version,
                        base_image=base_image,
                        requirements=requirements[:EVENT_REQUIREMENTS],
                        packages=len(lock.packages),
                        spec_digest=digest,
                    )
                    self.outbox.add(session, events.make_event(SERVICE, payload, environment_subject(row)))
                return row, True
            except IntegrityError:
                # Another caller registered the same spec, or took this version number, meanwhile.
                existing = self._environment_by_digest(spec.name, digest)
                if existing:
                    return existing, False
                row = EnvironmentRow.model_validate(row.model_dump(exclude={"id"}))
        raise FailedPrecondition(f"environment {spec.name}: too many concurrent registrations; try again")

    def get_environment(self, ref: str) -> EnvironmentRow:
        name, version = split_ref(ref)
        with self.database.session() as session:
            query = select(EnvironmentRow).where(EnvironmentRow.name == name)
            if version is None:
                query = query.order_by(col(EnvironmentRow.version).desc())
            else:
                query = query.where(EnvironmentRow.version == version)
            row = session.exec(query.limit(1)).first()
        if row is None:
            raise NotFound(f"environment {ref} does not exist; `mlmesh env list` shows what does", field="ref")
        return row

    def list_environments(self, name_prefix: str, page_size: int, page_token: str) -> tuple[list[EnvironmentRow], str]:
        query = select(EnvironmentRow).order_by(col(EnvironmentRow.name), col(EnvironmentRow.version))
        if name_prefix:
            query = query.where(col(EnvironmentRow.name).startswith(name_prefix, autoescape=True))
        return self._page(query, page_size, page_token)

    def _environment_by_digest(self, name: str, digest: str) -> EnvironmentRow | None:
        with self.database.session() as session:
            query = select(EnvironmentRow).where(EnvironmentRow.name == name, EnvironmentRow.spec_digest == digest)
            return session.exec(query).first()

    # ------------------------------------------------------------ conversions

    def convert(self, ref: str, sample_dataset: str, options: ConversionOptions) -> ConversionRow:
        """Convert a version to ONNX in an isolated worker, check parity, register the result as the
        model's next version, and record the conversion."""
        started = time.monotonic()
        source = self.registry.get(ref)
        if source.framework not in CONVERTIBLE:
            what = "already ONNX" if source.framework == "onnx" else f"framework {source.framework or 'unset'}"
            raise FailedPrecondition(
                f"{source.name}:{source.version} is {what}; conversion takes {', '.join(CONVERTIBLE)} models",
                field="ref",
            )
        if sample_dataset:
            split_ref(sample_dataset, "sample_dataset")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.work_dir, prefix="convert-") as scratch:
            folder = Path(scratch)
            source_ref = f"{source.name}:{source.version}"
            self.registry.download(source_ref, folder / "source")
            model_path = model_file(folder / "source", [file.path for file in source.files], source_ref)
            if sample_dataset:
                sample_path = self.registry.download_dataset(sample_dataset, folder / "sample")
            else:
                sample_path = example_file(folder / "source", [file.path for file in source.files])
            signature_inputs = [
                {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}
                for spec in source.signature.inputs
            ]
            result = convert_model(
                model_path,
                folder / "out",
                sample_path=sample_path,
                signature_inputs=signature_inputs or None,
                limits=self.limits,
                options=options,
            )
            registered = self.registry.register_model(
                source.name,
                [result.onnx_path],
                framework="onnx",
                description=f"{result.estimator} converted to ONNX from version {source.version}",
                tags=dict(source.tags) | {"mlmesh.converted_from": str(source.version)},
                signature=signature_proto(result),
                lineage=lineage_of(source),
            )
        return self._record_conversion(source, registered.version, result, time.monotonic() - started)

    def _record_conversion(self, source: Any, version: int, result: ConversionResult, seconds: float) -> ConversionRow:
        # The worker's figures under the same names; what the row adds is who, when and how long.
        measured = {
            key: value for key, value in dataclasses.asdict(result).items() if key in ConversionRow.model_fields
        }
        measured["quantization_label_agreement"] = result.quantization_label_agreement or 0
        measured["quantization_max_abs_diff"] = result.quantization_max_abs_diff or 0
        row = ConversionRow(
            **measured,
            id=str(uuid.uuid4()),
            source_name=source.name,
            source_version=source.version,
            version=version,
            seconds=round(seconds, 3),
            created_at=time.time(),
        )
        copied = set(events.ModelConverted.model_fields) - {"conversion_id", "name"}
        payload = events.ModelConverted(conversion_id=row.id, name=row.source_name, **row.model_dump(include=copied))
        with self.database.transaction() as session:
            session.add(row)
            self.outbox.add(session, events.make_event(SERVICE, payload, f"models/{source.name}/versions/{version}"))
        return row

    def list_conversions(self, name: str, page_size: int, page_token: str) -> tuple[list[ConversionRow], str]:
        query = select(ConversionRow).order_by(col(ConversionRow.created_at).desc(), col(ConversionRow.id))
        if name:
            query = query.where(ConversionRow.source_name == name)
        return self._page(query, page_size, page_token)

    # ------------------------------------------------------------ images

    def build_image(
        self,
        refs: Sequence[str],
        environment_ref: str,
        base_image: str,
        runtime_settings: dict[str, str],
        tag: str,
        push: bool,
        on_log: Callable[[str], None],
    ) -> tuple[ImageRow, bool]:
        """Build (or reuse) an image serving the versions; record it on each version. The bool is
        True when an existing image was reused. A failure emits `image.failed` and is raised."""
        if not refs:
            raise InvalidArgument("name at least one model version to serve", field="refs")
        if len(refs) > MAX_IMAGE_MODELS:
            raise InvalidArgument(f"an image serves at most {MAX_IMAGE_MODELS} models", field="refs")
        check_base_image(base_image)
        if tag:
            check_base_image(tag)
        # The image builder's own check, before any model is fetched.
        runtime_environment(runtime_settings)
        if push and not self.push_registry:
            raise FailedPrecondition(
                "pushing needs a registry: set MLMESH_BUILDER_PUSH_REGISTRY (e.g. registry.example.com/ml)",
                field="push",
            )
        environment = self.get_environment(environment_ref) if environment_ref else None
        base = base_image or (environment.base_image if environment else "") or self.default_base_image
        versions = [self.registry.get(ref) for ref in refs]
        models = [f"{version.name}:{version.version}" for version in versions]
        if len(set(models)) != len(models) or len({version.name for version in versions}) != len(versions):
            raise InvalidArgument("each model may appear once in an image: they are served by name", field="refs")
        environment_name = f"{environment.name}:{environment.version}" if environment else ""
        started = time.monotonic()
        try:
            payloads = []
            for version in versions:
                on_log(f"fetching {version.name}:{version.version}")
                fetched, path = self.registry.fetch_onnx(f"{version.name}:{version.version}", self.work_dir / "models")
                payloads.append(model_payload(fetched, path))
            spec = ImageSpec(
                models=tuple(payloads),
                environment=environment_name,
                lock_text=environment.lock_text if environment else "",
                python_version=environment.python_version if environment else "3.11",
                base_image=base,
                runtime_settings=runtime_settings,
                tag=tag or None,
            )
            built = self.images.build(spec, on_log)
            pushed = ""
            if push:
                # registry.example.com/ml + mlmesh-model-fraud:3-abc -> registry.example.com/ml/mlmesh-model-fraud
                repository = f"{self.push_registry.rstrip('/')}/{split_tag(built.tag)[0].rsplit('/', 1)[-1]}"
                pushed = self.images.push(built.tag, repository, on_log)
        except MlmeshError as error:
            self._image_failed(models, environment_name, base, error.message)
            raise
        except Exception as error:
            self._image_failed(models, environment_name, base, f"{type(error).__name__}: {error}")
            raise
        row = self._record_image(built, models, environment_name, base, pushed, time.monotonic() - started)
        for model in models:
            self.registry.update(model, set_tags={"mlmesh.image": row.tag, "mlmesh.image_id": row.image_id})
        return row, built.reused

    def _record_image(
        self, built: BuiltImage, models: list[str], environment: str, base: str, pushed: str, seconds: float
    ) -> ImageRow:
        payload = events.ImageBuilt(
            models=models,
            environment=environment,
            base_image=base,
            tag=built.tag,
            image_id=built.image_id,
            size_bytes=built.size_bytes,
            key=built.key,
            reused=built.reused,
            pushed=pushed,
        )
        with self.database.transaction() as session:
            row = session.get(ImageRow, built.key)
            if row is None:
                row = ImageRow(
                    key=built.key,
                    tag=built.tag,
                    image_id=built.image_id,
                    size_bytes=built.size_bytes,
                    models=json.dumps(models),
                    environment=environment,
                    base_image=base,
                    seconds=round(seconds, 3),
                    created_at=time.time(),
                )
            row.tag, row.image_id, row.size_bytes = built.tag, built.image_id, built.size_bytes
            row.pushed = pushed or row.pushed
            session.add(row)
            self.outbox.add(session, events.make_event(SERVICE, payload, f"images/{built.key[:12]}"))
        return row

    def _image_failed(self, models: list[str], environment: str, base: str, reason: str) -> None:
        payload = events.ImageFailed(
            models=models, environment=environment, base_image=base, reason=reason[-EVENT_REASON_CHARS:]
        )
        with self.database.transaction() as session:
            self.outbox.add(
                session, events.make_event(SERVICE, payload, f"models/{models[0].replace(':', '/versions/')}")
            )

    def list_images(self, name: str, page_size: int, page_token: str) -> tuple[list[ImageRow], str]:
        query = select(ImageRow).order_by(col(ImageRow.created_at).desc(), col(ImageRow.key))
        if name:
            check_name(name, "name")
            query = query.where(col(ImageRow.models).contains(f'"{name}:', autoescape=True))
        return self._page(query, page_size, page_token)

    def export_image(self, image: str, on_progress: Callable[[int], None] | None = None) -> Path:
        """A `docker save` archive of an image (a tag of a built image, or a model ref whose latest
        image is meant), in a temporary file the caller removes."""
        row = self._image_for(image)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        target = Path(tempfile.mkdtemp(dir=self.work_dir, prefix="export-")) / "image.tar"
        try:
            self.images.export(row.tag, target, on_progress)
        except BaseException:
            shutil.rmtree(target.parent, ignore_errors=True)
            raise
        return target

    def _image_for(self, image: str) -> ImageRow:
        if not image:
            raise InvalidArgument("name an image tag or a model version", field="image")
        with self.database.session() as session:
            row = session.exec(select(ImageRow).where(ImageRow.tag == image)).first()
            if row is None and not is_reference(image):
                check_name(image.partition(":")[0], "image")
            if row is None:
                version = self.registry.get(image)
                wanted = f'"{version.name}:{version.version}"'
                query = select(ImageRow).where(col(ImageRow.models).contains(wanted, autoescape=True))
                row = session.exec(query.order_by(col(ImageRow.created_at).desc())).first()
        if row is None:
            raise NotFound(f"no image was built for {image}; `mlmesh build image` builds one", field="image")
        return row

    # ------------------------------------------------------------ helpers

    def _page(self, query: Any, page_size: int, page_token: str) -> tuple[list[Any], str]:
        size = paging.page_size(page_size)
        offset = paging.decode(page_token)
        with self.database.session() as session:
            rows = list(session.exec(query.offset(offset).limit(size + 1)).all())
        return rows[:size], paging.next_token(offset, size, len(rows))


def environment_subject(row: EnvironmentRow) -> str:
    return f"environments/{row.name}/versions/{row.version}"


def model_file(folder: Path, paths: list[str], ref: str) -> Path:
    """The version's pickled model: its one .pkl/.pickle/.joblib file (MLflow's model.pkl included)."""
    found = sorted((path for path in paths if path.endswith(MODEL_SUFFIXES)), key=lambda path: (len(path), path))
    if not found:
        raise FailedPrecondition(
            f"{ref} has no pickled model ({', '.join(MODEL_SUFFIXES)}) among its files: {', '.join(paths[:10])}",
            field="ref",
        )
    return folder / found[0]


def example_file(folder: Path, paths: list[str]) -> Path | None:
    for path in sorted(paths, key=len):
        if path.rsplit("/", 1)[-1] in EXAMPLE_NAMES:
            return folder / path
    return None


def signature_proto(result: ConversionResult) -> Any:
    def specs(tensors: list[dict]) -> list[Any]:
        return [common_pb2.TensorSpec(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in tensors]

    return common_pb2.Signature(inputs=specs(result.inputs), outputs=specs(result.outputs))


def lineage_of(source: Any) -> Any:
    """The converted version's lineage: the source's, with the source as parent."""
    lineage = type(source.lineage)()
    lineage.CopyFrom(source.lineage)
    lineage.parent_version = source.version
    return lineage


def model_payload(version: Any, path: Path) -> ModelPayload:
    onnx_file = min((file for file in version.files if file.path.endswith(".onnx")), key=lambda file: len(file.path))
    signature = {
        side: [
            {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}
            for spec in getattr(version.signature, side)
        ]
        for side in ("inputs", "outputs")
    }
    return ModelPayload(
        name=version.name, version=version.version, sha256=onnx_file.sha256, onnx_path=path, signature=signature
    )

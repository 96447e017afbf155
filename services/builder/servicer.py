"""gRPC servicer of mlmesh.v1.BuilderService: proto in, domain call, proto out. Nothing else."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from services._proto.mlmesh.v1 import builder_pb2, builder_pb2_grpc
from services.builder import domain
from services.builder.convert import ConversionOptions
from services.builder.models import ConversionRow, EnvironmentRow, ImageRow
from services.common.convert import timestamp
from services.common.errors import InvalidArgument
from services.common.server import Finished, actor_of, reports_of

EXPORT_CHUNK_BYTES = 1024 * 1024
MAX_PARITY_ROWS = 100_000


def environment_to_proto(row: EnvironmentRow) -> builder_pb2.Environment:
    return builder_pb2.Environment(
        name=row.name,
        version=row.version,
        python_version=row.python_version,
        requirements=json.loads(row.requirements),
        base_image=row.base_image,
        description=row.description,
        lock=[builder_pb2.LockedPackage(**package) for package in json.loads(row.lock)],
        lock_text=row.lock_text,
        spec_digest=row.spec_digest,
        created_by=row.created_by,
        created_at=timestamp(row.created_at),
    )


def conversion_to_proto(row: ConversionRow) -> builder_pb2.Conversion:
    return builder_pb2.Conversion(
        id=row.id,
        source_name=row.source_name,
        source_version=row.source_version,
        source_framework=row.source_framework,
        estimator=row.estimator,
        version=row.version,
        parity=builder_pb2.Parity(
            rows_checked=row.rows_checked, labels_equal=row.labels_equal, max_abs_diff=row.max_abs_diff
        ),
        speed=builder_pb2.Speed(
            native_one_row_ms=row.native_one_row_ms,
            onnx_one_row_ms=row.onnx_one_row_ms,
            native_1000_rows_ms=row.native_1000_rows_ms,
            onnx_1000_rows_ms=row.onnx_1000_rows_ms,
            speedup_one_row=row.speedup_one_row,
            speedup_1000_rows=row.speedup_1000_rows,
        ),
        optimized=row.optimized,
        quantized=row.quantized,
        quantization_label_agreement=row.quantization_label_agreement,
        quantization_max_abs_diff=row.quantization_max_abs_diff,
        seconds=row.seconds,
        created_at=timestamp(row.created_at),
    )


def image_to_proto(row: ImageRow, reused: bool = False) -> builder_pb2.Image:
    return builder_pb2.Image(
        tag=row.tag,
        image_id=row.image_id,
        size_bytes=row.size_bytes,
        models=json.loads(row.models),
        environment=row.environment,
        base_image=row.base_image,
        key=row.key,
        reused=reused,
        pushed=row.pushed,
        seconds=row.seconds,
        created_at=timestamp(row.created_at),
    )


def options_from_proto(options: builder_pb2.ConvertOptions) -> ConversionOptions:
    if not 0 <= options.parity_rows <= MAX_PARITY_ROWS:
        raise InvalidArgument(f"parity_rows must be between 0 and {MAX_PARITY_ROWS}", field="parity_rows")
    if options.target_opset < 0:
        raise InvalidArgument("target_opset must not be negative", field="target_opset")
    return ConversionOptions(
        optimize=not options.skip_optimization,
        quantize=options.quantize,
        target_opset=options.target_opset or None,
        parity_rows=options.parity_rows or 1000,
    )


class BuilderServicer(builder_pb2_grpc.BuilderServiceServicer):
    def __init__(self, builder: domain.Builder) -> None:
        self.builder = builder
        self._run = builder.database.run

    async def RegisterEnvironment(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        spec = domain.EnvironmentSpec(
            name=request.name,
            python_version=request.python_version,
            requirements=request.requirements,
            base_image=request.base_image,
            description=request.description,
        )
        # pip runs for seconds to minutes: on a thread of its own, not the database's few.
        row, created = await asyncio.to_thread(self.builder.register_environment, spec, actor_of(context))
        return builder_pb2.RegisterEnvironmentResponse(environment=environment_to_proto(row), created=created)

    async def GetEnvironment(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        row = await self._run(self.builder.get_environment, request.ref)
        return builder_pb2.GetEnvironmentResponse(environment=environment_to_proto(row))

    async def ListEnvironments(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        rows, token = await self._run(
            self.builder.list_environments, request.name_prefix, request.page_size, request.page_token
        )
        return builder_pb2.ListEnvironmentsResponse(
            environments=[environment_to_proto(row) for row in rows], next_page_token=token
        )

    async def ConvertModel(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        options = options_from_proto(request.options)
        row = await asyncio.to_thread(self.builder.convert, request.ref, request.sample_dataset, options)
        return builder_pb2.ConvertModelResponse(conversion=conversion_to_proto(row))

    async def ListConversions(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        rows, token = await self._run(
            self.builder.list_conversions, request.name, request.page_size, request.page_token
        )
        return builder_pb2.ListConversionsResponse(
            conversions=[conversion_to_proto(row) for row in rows], next_page_token=token
        )

    async def BuildImage(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        def build(on_log: Callable[[str], None]) -> tuple[Any, bool]:
            return self.builder.build_image(
                list(request.refs),
                request.environment,
                request.base_image,
                dict(request.runtime_settings),
                request.tag,
                request.push,
                on_log,
            )

        # A failed build is already an image.failed event, and a caller that goes away does not stop it.
        async for item in reports_of(build):
            if isinstance(item, Finished):
                row, reused = item.result
                yield builder_pb2.BuildImageResponse(image=image_to_proto(row, reused))
            else:
                yield builder_pb2.BuildImageResponse(log=item)

    async def ListImages(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        rows, token = await self._run(self.builder.list_images, request.name, request.page_size, request.page_token)
        return builder_pb2.ListImagesResponse(images=[image_to_proto(row) for row in rows], next_page_token=token)

    async def ExportImage(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        archive = await asyncio.to_thread(self.builder.export_image, request.image)
        try:
            size = archive.stat().st_size
            with archive.open("rb") as file:
                first = True
                while chunk := await asyncio.to_thread(file.read, EXPORT_CHUNK_BYTES):
                    yield builder_pb2.ExportImageResponse(size=size if first else 0, data=chunk)
                    first = False
        finally:
            shutil.rmtree(archive.parent, ignore_errors=True)

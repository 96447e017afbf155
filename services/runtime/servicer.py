"""gRPC servicer of inference.GRPCInferenceService: OIP messages in, domain tensors, OIP messages out."""

from __future__ import annotations

from typing import Any

import grpc

from services._proto.inference import open_inference_pb2 as oip
from services._proto.inference import open_inference_pb2_grpc as oip_grpc
from services.common.errors import InvalidArgument
from services.runtime import domain

# Which InferTensorContents field carries each datatype (FP16 and BF16 travel only raw).
CONTENTS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def tensors_from_request(request: Any, max_elements: int) -> list[domain.Tensor]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents holds {len(raw)} entries for {len(request.inputs)} inputs; give one per input",
            field="raw_input_contents",
        )
    tensors = []
    for number, tensor in enumerate(request.inputs):
        if raw:
            if tensor.HasField("contents"):
                raise InvalidArgument(
                    f"input {tensor.name!r} sets contents although the request uses raw_input_contents",
                    field="inputs.contents",
                )
            tensors.append(
                domain.tensor_from_raw(tensor.name, tensor.datatype, tensor.shape, raw[number], max_elements)
            )
        else:
            values = getattr(tensor.contents, CONTENTS[tensor.datatype]) if tensor.datatype in CONTENTS else []
            tensors.append(domain.tensor_from_values(tensor.name, tensor.datatype, tensor.shape, values, max_elements))
    return tensors


def response_for(model: domain.LoadedModel, request_id: str, outputs: list[domain.Tensor], raw: bool) -> Any:
    """The answer; raw when the request was raw or an output has no typed field (FP16)."""
    raw = raw or any(output.datatype not in CONTENTS for output in outputs)
    response = oip.ModelInferResponse(model_name=model.name, model_version=model.version, id=request_id)
    for output in outputs:
        entry = response.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
        if raw:
            response.raw_output_contents.append(domain.raw_bytes(output))
        else:
            getattr(entry.contents, CONTENTS[output.datatype]).extend(output.array.reshape(-1).tolist())
    return response


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        store: domain.ModelStore,
        metrics: domain.Metrics,
        max_elements: int,
        capture: domain.CaptureQueue | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.max_elements = max_elements
        self.capture = capture

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return oip.ServerReadyResponse(ready=bool(self.store.names()))

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.store.get(request.name, request.version)  # NOT_FOUND when not served
        return oip.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return oip.ServerMetadataResponse(name="mlmesh-runtime", version=domain.server_version(), extensions=[])

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        model = self.store.get(request.name, request.version)

        def specs(tensors: list[domain.TensorSpec]) -> list[Any]:
            return [
                oip.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=spec.shape)
                for spec in tensors
            ]

        return oip.ModelMetadataResponse(
            name=model.name,
            versions=self.store.versions(model.name),
            platform=domain.PLATFORM,
            inputs=specs(model.signature.inputs),
            outputs=specs(model.signature.outputs),
        )

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        with self.metrics.observed("grpc", request.model_name, request.model_version):
            model = self.store.get(request.model_name, request.model_version)
            inputs = model.check(tensors_from_request(request, self.max_elements))
            requested = [output.name for output in request.outputs]
            outputs = await domain.run(model, inputs, requested)
            if self.capture:
                self.capture.offer(model, request.id, inputs.values(), outputs)
            return response_for(model, request.id, outputs, raw=bool(request.raw_input_contents))

"""The floor of bench/serving.py: the least a gRPC inference server can do for one ONNX model.

A bare grpc.aio server with only inference.GRPCInferenceService/ModelInfer: it decodes the request
(typed or raw contents into numpy), runs the onnxruntime session and encodes the answer the way the
runtime does (raw when the request was raw). No validation, metrics, health, reflection, tracing
or interceptors. Run from the repository root:

    .venv/bin/python bench/floor.py model.onnx 8101              # inference in a worker thread
    .venv/bin/python bench/floor.py model.onnx 8101 --inline     # inference on the event loop

By default inference runs in a worker thread (asyncio.to_thread), as the runtime runs it, so the
difference to the runtime is what the runtime adds around the call; `--inline` runs it on the
event loop instead, which saves the thread hop but blocks the loop for the whole call.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

import grpc
import numpy as np
import onnxruntime

from services._proto.inference import open_inference_pb2 as oip
from services._proto.inference import open_inference_pb2_grpc as oip_grpc
from services.common.memory import reuse_large_blocks

# The datatypes this floor handles: OIP name -> (numpy dtype, field of InferTensorContents).
TYPES: dict[str, tuple[np.dtype[Any], str]] = {
    "BOOL": (np.dtype("?"), "bool_contents"),
    "INT32": (np.dtype("<i4"), "int_contents"),
    "INT64": (np.dtype("<i8"), "int64_contents"),
    "FP32": (np.dtype("<f4"), "fp32_contents"),
    "FP64": (np.dtype("<f8"), "fp64_contents"),
}
DATATYPE_OF = {dtype: datatype for datatype, (dtype, _) in TYPES.items()}


class FloorServicer(oip_grpc.GRPCInferenceServiceServicer):
    def __init__(self, session: Any, version: str, inline: bool) -> None:
        self.session = session
        self.version = version
        self.inline = inline
        self.outputs = [output.name for output in session.get_outputs()]

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        raw = request.raw_input_contents
        feeds = {}
        for number, tensor in enumerate(request.inputs):
            dtype, field = TYPES[tensor.datatype]
            if raw:
                array = np.frombuffer(raw[number], dtype=dtype)
            else:
                array = np.asarray(getattr(tensor.contents, field), dtype=dtype)
            feeds[tensor.name] = array.reshape(tuple(tensor.shape))
        names = [output.name for output in request.outputs] or self.outputs
        if self.inline:
            results = self.session.run(names, feeds)
        else:
            results = await asyncio.to_thread(self.session.run, names, feeds)
        response = oip.ModelInferResponse(model_name=request.model_name, model_version=self.version, id=request.id)
        for name, result in zip(names, results, strict=True):
            datatype = DATATYPE_OF[result.dtype]
            entry = response.outputs.add(name=name, datatype=datatype, shape=result.shape)
            if raw:
                response.raw_output_contents.append(result.tobytes())
            else:
                getattr(entry.contents, TYPES[datatype][1]).extend(result.reshape(-1).tolist())
        return response


async def serve(model: str, port: int, version: str, inline: bool, max_message_bytes: int) -> None:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1  # the runtime's defaults (MLMESH_RUNTIME_INTRA_OP_THREADS, _INTER_OP_)
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
    )
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(FloorServicer(session, version, inline), server)
    await serve_until_stopped(server, port, f"floor serving {model} ({'inline' if inline else 'worker thread'})")


async def serve_until_stopped(server: grpc.aio.Server, port: int, what: str) -> None:
    """Listen on 127.0.0.1:`port` and serve until SIGTERM or SIGINT. Large blocks of memory are
    reused as in every mlmesh process (services.common.memory), so that a
    comparison with the runtime or the router measures what the server does, not the allocator."""
    reuse_large_blocks()
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise SystemExit(f"cannot listen on 127.0.0.1:{port}")
    await server.start()
    print(f"{what} on 127.0.0.1:{port}", file=sys.stderr)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(number, stop.set)
    await stop.wait()
    await server.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="path of the .onnx file")
    parser.add_argument("port", type=int, help="gRPC port on 127.0.0.1")
    parser.add_argument("--version", default="1", help="model_version the answers carry")
    parser.add_argument("--inline", action="store_true", help="run inference on the event loop, not in a thread")
    parser.add_argument(
        "--max-message-bytes", type=int, default=8 * 1024 * 1024, help="largest message (the runtime's default)"
    )
    arguments = parser.parse_args()
    asyncio.run(
        serve(arguments.model, arguments.port, arguments.version, arguments.inline, arguments.max_message_bytes)
    )


if __name__ == "__main__":
    main()

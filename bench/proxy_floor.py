"""The router's floor in bench/serving.py: the least a grpc.aio proxy can do for ModelInfer.

A bare grpc.aio server that passes each ModelInfer request's bytes, undecoded, to one upstream
server over one grpc.aio channel and gives back the answer's bytes. No routing, metadata, metrics,
retries, health, reflection or interceptors: what the endpoint router adds is the difference to
it. Run from the repository root:

    .venv/bin/python bench/proxy_floor.py 8102 127.0.0.1:8101
"""

from __future__ import annotations

import argparse
import asyncio

import grpc
from floor import serve_until_stopped  # bench/ is the script's folder, first on sys.path

SERVICE = "inference.GRPCInferenceService"


async def serve(port: int, upstream: str, max_message_bytes: int) -> None:
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    channel = grpc.aio.insecure_channel(upstream, options=options)
    infer = channel.unary_unary(f"/{SERVICE}/ModelInfer")

    async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await infer(request, timeout=context.time_remaining())

    server = grpc.aio.server(options=options)
    handler = grpc.unary_unary_rpc_method_handler(forward)  # no (de)serializers: bytes in, bytes out
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"ModelInfer": handler}),))
    await serve_until_stopped(server, port, f"proxy floor forwarding to {upstream}")
    await channel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int, help="gRPC port on 127.0.0.1")
    parser.add_argument("upstream", help="host:port of the server that answers")
    parser.add_argument(
        "--max-message-bytes", type=int, default=8 * 1024 * 1024, help="largest message (the runtime's default)"
    )
    arguments = parser.parse_args()
    asyncio.run(serve(arguments.port, arguments.upstream, arguments.max_message_bytes))


if __name__ == "__main__":
    main()

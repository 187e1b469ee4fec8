"""G_const, the gRPC ceiling: a constant answer to ``inference.GRPCInferenceService/ModelInfer`` from grpcio's asyncio
server on uvloop, with the service's gRPC channel arguments (``service.grpc_server.server_options``) and no model,
so it shows what one core does with the gRPC stack alone (the gRPC analogue of H_raw).

    python -m loadtest.baselines.constant_grpc --port 9000 --grpc-port 9001 [--model-dir models/banking77]

The handler takes the request's bytes (never parsed, as the service's handler gets them) and answers fixed bytes: a
``ModelInferResponse`` shaped like the service's (``PROBABILITIES`` FP32 ``[1, num_classes]`` and ``LABEL``, in
``raw_output_contents``). ``GET /readyz`` on ``--port`` answers 200 once gRPC is serving (the harness's readiness).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import numpy as np

import contract
from service.grpc_messages import SERVICE, ModelInferResponse
from service.grpc_server import server_options
from service.settings import Settings
from service.v2_tensors import pack_bytes

from .common import parser


def answer(labels: list[str]) -> bytes:
    response = ModelInferResponse(model_name="constant", model_version="0")
    response.outputs.add(name="PROBABILITIES", datatype="FP32", shape=[1, len(labels)])
    response.outputs.add(name="LABEL", datatype="BYTES", shape=[1])
    response.raw_output_contents.append(np.full(len(labels), 1 / len(labels), np.float32).tobytes())
    response.raw_output_contents.append(pack_bytes([labels[0]]))
    return response.SerializeToString()


async def serve(host: str, port: int, grpc_port: int, labels: list[str]) -> None:
    body = answer(labels)

    async def infer(request: bytes, context) -> bytes:
        return body

    server = grpc.aio.server(options=server_options(Settings(grpc_port=grpc_port)))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        SERVICE, {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)}),))
    if not server.add_insecure_port(f"{host}:{grpc_port}"):
        raise SystemExit(f"error: cannot listen on {host}:{grpc_port}")
    await server.start()

    async def ready(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    http = await asyncio.start_server(ready, host, port)
    async with http:
        await server.wait_for_termination()


def main() -> None:
    args_parser = parser(__doc__.splitlines()[0])
    args_parser.add_argument("--grpc-port", type=int, required=True)
    args_parser.add_argument("--model-dir", type=Path, help="answer with this model's labels")
    args = args_parser.parse_args()
    labels = ["constant"]
    if args.model_dir:
        try:
            labels = json.loads((contract.version_folder(args.model_dir) / "labels.json").read_text(encoding="utf-8"))
        except (OSError, ValueError, contract.ArtifactError) as error:
            raise SystemExit(f"error: cannot read labels: {error}") from None
    import uvloop

    uvloop.run(serve(args.host, args.port, args.grpc_port, labels))


if __name__ == "__main__":
    main()

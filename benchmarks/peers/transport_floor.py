"""Peer: the transports alone — what a request costs the server before any of its work is done.

One process, as a vitserve front-end is one: uvicorn (httptools, uvloop: what BentoML runs) with a bare ASGI app that
reads the body and answers a fixed JSON result, and on the same event loop a ``grpc.aio`` server registered exactly
as the service registers its own (``service.grpc_api.add_servicer``, with ``parse_request``) whose ModelInfer answers
a fixed response (or, with ``--grpc-transport native``, the C++ front handing its calls to that servicer). No decode, no engine, no admission, no metrics: loaded by ``vitserve bench front-door --floor``
with the same clients as the service, the server CPU per call is the floor each protocol's transport puts under any
Python service on these cores, to set beside the work's own CPU.

    python -m benchmarks.peers.transport_floor --port 3400 --grpc-port 3401 [--grpc-transport native]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

FIXED_JSON = json.dumps({"predictions": [[{"label": f"class {i}", "score": 0.1} for i in range(5)]]}).encode()


def grpc_server(port: int, transport: str = "python"):
    import grpc

    from service import grpc_native

    from service.grpc_api import add_servicer, parse_request
    from service.protos import grpc_service_pb2 as pb
    from service.protos import grpc_service_pb2_grpc as pb_grpc

    response = pb.ModelInferResponse(model_name="floor", model_version="1")
    response.outputs.add(name="probabilities", datatype="FP32", shape=[1, 5])
    response.raw_output_contents.append(np.full(5, 0.2, np.float32).tobytes())

    class FixedAnswer(pb_grpc.GRPCInferenceServiceServicer):
        async def ModelInfer(self, request, context):
            parse_request(request)  # the service's own parsing of the message's tensors
            context.time_remaining()
            return response

    if transport == "native":  # the C++ front, registered as the service registers it
        server = grpc_native.NativeServer(grpc_native.find_binary(), max_receive_bytes=32 * 1024 * 1024)
    else:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 32 * 1024 * 1024)])
    add_servicer(FixedAnswer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    return server


def asgi_app(grpc_port: int, grpc_transport: str = "python"):
    state = {}

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    state["grpc"] = grpc_server(grpc_port, grpc_transport)
                    await state["grpc"].start()  # on uvicorn's loop, as the service's gRPC runs on its worker's loop
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await state["grpc"].stop(0)
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        body = FIXED_JSON if scope["path"] != "/health" else b"{}"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return app


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--grpc-transport", choices=("python", "native"), default="python",
                   help="grpc.aio in this process, or the C++ front (vitserve-grpc-front) answering through it")
    args = p.parse_args()
    uvicorn.run(asgi_app(args.grpc_port, args.grpc_transport), host="127.0.0.1", port=args.port, loop="uvloop", http="httptools",
                lifespan="on", log_level="warning", access_log=False)


if __name__ == "__main__":
    main()

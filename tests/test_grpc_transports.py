"""The two ways gRPC is terminated (``VITSERVE_GRPC_TRANSPORT``): the C++ front (``vitserve-grpc-front``, what the
rest of tests/test_grpc.py runs against once it is built) and grpc.aio in the worker. Real servers, real clients:
the same calls must get the same answers, codes and details from both, and the front must live and die with the
worker that started it."""

from __future__ import annotations

import os
import signal
import struct
import time

import grpc
import httpx
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service.grpc_native import BINARY_NAME, find_binary
from service.protos import grpc_service_pb2 as pb
from service.protos import grpc_service_pb2_grpc as pb_grpc
from tests.server import running_server

pytestmark = pytest.mark.skipif(find_binary() is None, reason=f"{BINARY_NAME} is not built (make native needs libgrpc++-dev)")


def _request(model: str, images: list[bytes], **kw) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, id=kw.get("id", "t"))
    req.inputs.add(name="image", datatype=kw.get("datatype", "BYTES"), shape=[len(images)])
    req.raw_input_contents.append(b"".join(struct.pack("<I", len(x)) + x for x in images))
    return req


def _outcome(call, request, **kw):
    """(code, details, response bytes, trailing metadata that carries advice) of one call."""
    try:
        response, _ = call.with_call(request, **kw)
        if isinstance(response, pb.ModelInferResponse):  # timings and batch ids differ from call to call
            for key in [k for k in response.parameters if k.endswith("_ms") or k == "vitserve_batch_ids"]:
                del response.parameters[key]
        return "OK", "", response.SerializeToString(deterministic=True), ()
    except grpc.RpcError as e:
        trailers = tuple((k, v) for k, v in (e.trailing_metadata() or ()) if k in ("retry-after", "grpc-retry-pushback-ms"))
        return e.code().name, e.details(), b"", trailers


def _answers(address: str, model: str, photos: list[bytes]) -> dict[str, tuple]:
    channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1)])
    stub, health = pb_grpc.GRPCInferenceServiceStub(channel), health_pb2_grpc.HealthStub(channel)
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    out = {
        "infer one": _outcome(stub.ModelInfer, _request(model, photos[:1]), timeout=30),
        "infer three": _outcome(stub.ModelInfer, _request(model, photos[:3], id="three"), timeout=30),
        "unknown model": _outcome(stub.ModelInfer, _request("no-such-model", photos[:1]), timeout=30),
        "wrong datatype": _outcome(stub.ModelInfer, _request(model, photos[:1], datatype="FP32"), timeout=30),
        "not an image": _outcome(stub.ModelInfer, _request(model, [b"not an image"]), timeout=30),
        "metadata": _outcome(stub.ModelMetadata, pb.ModelMetadataRequest(name=model), timeout=30),
        "server ready": _outcome(stub.ServerReady, pb.ServerReadyRequest(), timeout=30),
        "unimplemented": _outcome(stub.RepositoryIndex, pb.RepositoryIndexRequest(), timeout=30),
        "health": _outcome(health.Check, health_pb2.HealthCheckRequest(service=""), timeout=30),
        "health unknown": _outcome(health.Check, health_pb2.HealthCheckRequest(service="nope"), timeout=30),
    }
    undecodable = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    try:
        undecodable(b"\xff\xff\xff", timeout=30)
        out["undecodable"] = ("OK",)
    except grpc.RpcError as e:
        out["undecodable"] = (e.code().name, e.details())
    listing = list(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30))
    out["reflection"] = tuple(sorted(s.name for s in listing[0].list_services_response.service))
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
    out["health watch"] = next(watch).status
    watch.cancel()
    channel.close()
    return out


def test_native_and_grpc_aio_give_the_same_answers(tiny_artifact, tmp_path, photo_bytes):
    from service.artifact import read_manifest

    model = read_manifest(tiny_artifact).model.name
    photos = [p[1] for p in photo_bytes[:3]]
    seen = {}
    for transport in ("native", "python"):
        (tmp_path / transport).mkdir()
        with running_server(tiny_artifact, tmp_path / transport, grpc_transport=transport) as s:
            info = httpx.get(f"{s.url}/info", timeout=10).json()
            assert info["protocols"]["grpc"]["transport"] == transport
            seen[transport] = _answers(s.grpc_address, model, photos)
    native, python = seen["native"], seen["python"]
    assert native["infer one"][0] == "OK" and native["infer three"][0] == "OK" and native["reflection"], native
    assert native["unknown model"][0] == "NOT_FOUND" and native["undecodable"][0] == "INVALID_ARGUMENT", native
    assert native["unimplemented"][0] == "UNIMPLEMENTED" and native["health unknown"][0] == "NOT_FOUND", native
    for key in python:
        assert native[key] == python[key], (key, native[key], python[key])


def _fronts(server_pid: int) -> dict[int, int]:
    """front pid → its worker's pid, for the fronts of this server's process tree."""
    tree = psutil.Process(server_pid).children(recursive=True)
    return {p.pid: p.ppid() for p in tree if p.name() == BINARY_NAME and p.status() != psutil.STATUS_ZOMBIE}


def _wait_until_served(stub, request, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if stub.ModelInfer(request, timeout=5).outputs:
                return
        except grpc.RpcError:
            time.sleep(0.2)
    pytest.fail(f"gRPC was not served again within {within_s} s")


def test_the_front_dies_with_its_worker_and_a_new_worker_serves_again(tiny_artifact, tmp_path, photo_bytes):
    from service.artifact import read_manifest

    model = read_manifest(tiny_artifact).model.name
    with running_server(tiny_artifact, tmp_path, grpc_transport="native") as s:
        ours = _fronts(s.proc.pid)
        assert len(ours) == 1, ours
        (front, worker), = ours.items()
        stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(s.grpc_address))
        assert stub.ModelInfer(_request(model, [photo_bytes[0][1]]), timeout=30).outputs
        os.kill(worker, signal.SIGKILL)  # the worker gone, nothing could answer the front's calls
        deadline = time.monotonic() + 10
        while front in _fronts(s.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert front not in _fronts(s.proc.pid), "the front outlived its worker"
        # BentoML's arbiter starts a new worker, which starts its own front on the same port
        _wait_until_served(stub, _request(model, [photo_bytes[0][1]]), within_s=60)
        new = _fronts(s.proc.pid)
        assert front not in new and len(new) == 1, new


def test_a_front_that_dies_is_replaced_by_its_worker(tiny_artifact, tmp_path, photo_bytes):
    from service.artifact import read_manifest

    model = read_manifest(tiny_artifact).model.name
    with running_server(tiny_artifact, tmp_path, grpc_transport="native") as s:
        (front, worker), = _fronts(s.proc.pid).items()
        os.kill(front, signal.SIGKILL)  # a crash or an OOM kill of the front alone
        stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(s.grpc_address))
        _wait_until_served(stub, _request(model, [photo_bytes[0][1]]), within_s=30)
        (new_front, new_worker), = _fronts(s.proc.pid).items()
        assert new_front != front and new_worker == worker  # the same worker started another front
        assert httpx.get(f"{s.url}/readyz", timeout=10).status_code == 200


def test_cancelled_and_expired_calls_leave_the_front_and_the_door_clean(tiny_artifact, tmp_path, photo_bytes):
    """Calls cancelled by their client and calls whose deadline passes mid-flight, mixed with normal ones for a few
    seconds: every normal call answered, the same front still serving, nothing left in flight afterwards."""
    import asyncio

    from service.artifact import read_manifest

    body = _request(read_manifest(tiny_artifact).model.name, [photo_bytes[0][1]]).SerializeToString()
    with running_server(tiny_artifact, tmp_path, grpc_transport="native") as s:
        fronts = _fronts(s.proc.pid)

        async def hammer() -> dict[str, int]:
            seen: dict[str, int] = {}
            async with grpc.aio.insecure_channel(s.grpc_address) as channel:
                call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")

                async def one(i: int) -> None:
                    try:
                        if i % 3 == 0:
                            await call(body, timeout=0.003)
                        elif i % 3 == 1:
                            pending = call(body, timeout=30)
                            await asyncio.sleep(0.001 * (i % 5))
                            pending.cancel()
                            await pending
                        else:
                            await call(body, timeout=30)
                        outcome = "OK" if i % 3 == 2 else "answered anyway"
                    except asyncio.CancelledError:
                        outcome = "cancelled"
                    except grpc.aio.AioRpcError as e:
                        outcome = e.code().name if i % 3 != 2 else f"normal call failed: {e.code().name}"
                    seen[outcome] = seen.get(outcome, 0) + 1

                until = time.monotonic() + 5
                while time.monotonic() < until:
                    await asyncio.gather(*(one(i) for i in range(24)))
            return seen

        seen = asyncio.run(hammer())
        assert seen.get("OK", 0) > 0 and seen.get("cancelled", 0) > 0 and seen.get("DEADLINE_EXCEEDED", 0) > 0, seen
        assert not [k for k in seen if k.startswith("normal call failed")], seen
        assert _fronts(s.proc.pid) == fronts
        time.sleep(0.5)
        metrics = s.metrics()
        assert "vitserve_requests_in_flight 0.0" in metrics
        assert not [line for line in metrics.splitlines() if line.startswith("vitserve_work_in_flight_images") and not line.endswith(" 0.0")]
        stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(s.grpc_address))
        assert stub.ModelInfer(pb.ModelInferRequest.FromString(body), timeout=30).outputs

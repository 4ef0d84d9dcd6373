"""Several front-end processes, one engine process (VITSERVE_WORKERS=2, service/engine_process.py), on a real
`vitserve serve`: requests that reach different front-ends share the one batcher's batches, over HTTP and gRPC, with
the same answers as one process gives, API keys checked by every front-end, the metrics of every process merged, and
a refusal at startup still stops the whole server. (SIGTERM's drain: tests/test_service.py, with 1 and 2 workers.)"""

from __future__ import annotations

import http.client
import json
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import pytest

from service.artifact import read_manifest
from service.protos import grpc_service_pb2 as pb
from service.protos import grpc_service_pb2_grpc as pb_grpc
from tests.server import metric_value, running_server

pytestmark = pytest.mark.timeout(300)


KEY = "front-end-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def connection_per_process(url: str, image: bytes, want: int = 2, tries: int = 200) -> dict[str, http.client.HTTPConnection]:
    """Kept-alive connections, one answered by each of ``want`` front-end processes (the kernel picks the process that
    accepts a connection; its X-Vitserve-Process header says which did)."""
    host, port = url.removeprefix("http://").split(":")
    found: dict[str, http.client.HTTPConnection] = {}
    for _ in range(tries):
        c = http.client.HTTPConnection(host, int(port), timeout=30)
        c.request("POST", "/classify", body=image, headers={"Content-Type": "image/jpeg", **AUTH})
        r = c.getresponse()
        r.read()
        assert r.status == 200
        pid = r.getheader("X-Vitserve-Process")
        if pid in found:
            c.close()
        else:
            found[pid] = c
        if len(found) == want:
            return found
    raise AssertionError(f"only {len(found)} front-end processes answered in {tries} connections")


def test_two_front_ends_share_the_engine_process_batches(tiny_artifact, tmp_path, photo_bytes):
    jpegs = [d for _, d in photo_bytes if d[:3] == b"\xff\xd8\xff"]
    # A long batching window, so that requests sent at once through both front-ends meet in one batch.
    with running_server(tiny_artifact, tmp_path, workers=2, max_wait_ms=300, max_batch_size=8, api_keys=KEY) as s:
        connections = connection_per_process(s.url, jpegs[0])
        info = httpx.get(f"{s.url}/info", headers=AUTH, timeout=10).json()
        engine_pid = info["engine"]["process"]
        assert engine_pid not in connections  # the engine runs in a process of its own

        def classify(args) -> tuple[str, str, dict]:
            c, image = args
            c.request("POST", "/classify", body=image, headers={"Content-Type": "image/jpeg", **AUTH})
            r = c.getresponse()
            body = json.loads(r.read())
            assert r.status == 200, body
            return r.getheader("X-Vitserve-Process"), r.getheader("X-Vitserve-Batch-Id"), body["predictions"][0]

        with ThreadPoolExecutor(2) as pool:
            (pid_a, batch_a, top_a), (pid_b, batch_b, top_b) = pool.map(classify, zip(connections.values(), jpegs[1:3]))
        assert pid_a != pid_b and batch_a == batch_b, (pid_a, batch_a, pid_b, batch_b)
        # The same answers as the service gives through one process (tests/test_service.py checks those against
        # the engine run directly): compare with /classify on a one-process server below.
        ours = [top_a, top_b]
        before = s.metrics()
        assert metric_value(before, "vitserve_batch_size_count") >= 1  # the engine process's metrics are merged
        assert metric_value(before, "vitserve_requests_total", protocol="json", status="200") >= 4

        # gRPC reaches a front-end too (they all listen on the port, SO_REUSEPORT), and the same engine.
        model = read_manifest(tiny_artifact).model.name
        req = pb.ModelInferRequest(model_name=model)
        req.inputs.add(name="image", datatype="BYTES", shape=[1])
        req.raw_input_contents.append(struct.pack("<I", len(jpegs[1])) + jpegs[1])
        stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(s.grpc_address))
        with pytest.raises(grpc.RpcError) as refused:  # every front-end checks the key
            stub.ModelInfer(req, timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        for _ in range(4):  # new connections, whichever front-end takes them
            r = httpx.post(f"{s.url}/classify", content=jpegs[1], headers={"content-type": "image/jpeg"}, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["type"] == "unauthenticated"
        response = stub.ModelInfer(req, timeout=30, metadata=[("authorization", f"Bearer {KEY}")])
        probs = np.frombuffer(response.raw_output_contents[0], "<f4")
        assert int(np.argmax(probs)) == top_a["top1"]["index"]

    with running_server(tiny_artifact, tmp_path / "one", workers=1) as one:
        for image, theirs in zip(jpegs[1:3], ours):
            r = httpx.post(f"{one.url}/classify", content=image, headers={"content-type": "image/jpeg"}, timeout=30)
            mine = r.json()["predictions"][0]
            assert mine["top1"]["index"] == theirs["top1"]["index"]
            assert [p["index"] for p in mine["top5"]] == [p["index"] for p in theirs["top5"]]
            np.testing.assert_allclose([p["score"] for p in mine["top5"]], [p["score"] for p in theirs["top5"]], atol=1e-5)


def test_an_engine_refused_at_startup_stops_every_process(tiny_artifact, tmp_path):
    """The startup check runs in the engine process: when no engine passes it, `vitserve serve` exits 2 with the
    reason, as with one process, and leaves no worker waiting for an engine that will never come."""
    from safetensors.numpy import load_file, save_file

    from tests.test_startup_check import _rehash, serve_refusal

    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    golden = load_file(art / "golden.safetensors")
    golden["reference_logits"] = golden["reference_logits"][:, ::-1].copy()  # no engine agrees with these
    save_file(golden, str(art / "golden.safetensors"))
    _rehash(art, "golden.safetensors")
    proc = serve_refusal(art, tmp_path, "--workers", "2", "--grpc-port", "0")
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no engine may serve" in proc.stderr.strip().splitlines()[-1]

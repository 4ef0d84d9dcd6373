"""gRPC and the KServe v2 / Open Inference Protocol over HTTP and gRPC, against a real `vitserve serve`: NVIDIA's
tritonclient unmodified (from its own environment), hand-built requests for what it never sends, hostile inputs,
mixed-protocol batching, health, reflection, metrics per protocol, SIGTERM and API keys."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import signal
import struct
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from service.artifact import read_manifest
from service.preprocess import Preprocessor
from service.protos import grpc_service_pb2 as pb
from service.protos import grpc_service_pb2_grpc as pb_grpc
from tests.server import ROOT, metric_value, running_server

pytestmark = pytest.mark.timeout(300)
CLIENT_PYTHON = Path(os.environ.get("VITSERVE_CLIENT_PYTHON", ROOT / ".venv-clients" / "bin" / "python"))
needs_tritonclient = pytest.mark.skipif(not CLIENT_PYTHON.exists(), reason=f"tritonclient's environment {CLIENT_PYTHON} is missing: make clients")
MAX_BODY = 2_000_000
MAX_IMAGES = 8


@pytest.fixture(scope="module")
def server(tiny_artifact, tmp_path_factory):
    with running_server(tiny_artifact, tmp_path_factory.mktemp("srv"), max_wait_ms=30, max_body_bytes=MAX_BODY,
                        max_images_per_request=MAX_IMAGES) as s:
        yield s


@pytest.fixture(scope="module")
def model_name(tiny_artifact) -> str:
    return read_manifest(tiny_artifact).model.name


def stub(address: str) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1)]))


def image_request(model: str, images: list[bytes], *, raw: bool = True, classification: int | None = None, name: str = "image",
                  datatype: str = "BYTES", shape: list[int] | None = None) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, id="t")
    t = req.inputs.add(name=name, datatype=datatype, shape=shape if shape is not None else [len(images)])
    if raw:
        req.raw_input_contents.append(b"".join(struct.pack("<I", len(x)) + x for x in images))
    else:
        t.contents.bytes_contents.extend(images)
    if classification:
        req.outputs.add(name="probabilities").parameters["classification"].int64_param = classification
    return req


def probabilities(response: pb.ModelInferResponse) -> np.ndarray:
    (out,) = response.outputs
    return np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(list(out.shape))


def classify(url: str, images: list[tuple[str, bytes]], **params) -> httpx.Response:
    return httpx.post(f"{url}/classify", files=[("images", x) for x in images], params=params, timeout=60)


def grpc_code(call, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call(request, timeout=30)
    return e.value.code(), e.value.details()


# ---- the clients teams already own --------------------------------------------------------------------------------------
@needs_tritonclient
def test_tritonclient_grpc_and_http_work_unmodified_and_agree_with_classify(server, model_name, photo_bytes, tmp_path):
    photos = photo_bytes[:4]
    files = []
    for i, (name, data) in enumerate(photos):
        files.append(tmp_path / f"{i}-{name}")
        files[-1].write_bytes(data)
    proc = subprocess.run([str(CLIENT_PYTHON), str(ROOT / "tests" / "clients" / "triton_roundtrip.py"), "--grpc", server.grpc_address,
                           "--http", server.url.removeprefix("http://"), "--model", model_name, *map(str, files)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    ours = classify(server.url, photos).json()["predictions"]
    for protocol in ("grpc", "v2-http"):
        r = result[protocol]
        assert "error" not in r, r
        assert r["live"] and r["ready"] and r["model_ready"] and r["max_batch_size"] == MAX_IMAGES
        assert r["metadata"]["name"] == model_name and r["metadata"]["versions"] == ["1"]
        assert [t["name"] for t in r["metadata"]["inputs"]] == ["image", "pixel_values"]
        assert r["metadata"]["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
        for got, want, probs in zip(r["top"], ours, r["probabilities"]):
            assert [p["index"] for p in got] == [p["index"] for p in want["top5"]]  # the same top-5, in order
            assert [p["label"] for p in got] == [p["label"] for p in want["top5"]]
            np.testing.assert_allclose([p["score"] for p in got], [p["score"] for p in want["top5"]], atol=1e-6)
            assert abs(sum(probs) - 1) < 1e-5 and int(np.argmax(probs)) == want["top1"]["index"]


def test_raw_and_typed_contents_and_preprocessed_pixels_give_the_same_probabilities(server, model_name, photo_bytes, tiny_artifact):
    images = [b for _, b in photo_bytes[:3]]
    s = stub(server.grpc_address)
    raw = probabilities(s.ModelInfer(image_request(model_name, images), timeout=30))
    typed = probabilities(s.ModelInfer(image_request(model_name, images, raw=False), timeout=30))
    np.testing.assert_array_equal(raw, typed)
    pre = Preprocessor(read_manifest(tiny_artifact).preprocessing)
    pixels = np.stack([pre.from_bytes(b, max_pixels=10**8) for b in images])  # the client preprocesses itself
    req = pb.ModelInferRequest(model_name=model_name)
    req.inputs.add(name="pixel_values", datatype="FP32", shape=list(pixels.shape))
    req.raw_input_contents.append(pixels.astype("<f4").tobytes())
    np.testing.assert_allclose(probabilities(s.ModelInfer(req, timeout=30)), raw, atol=1e-6)
    fp32 = pb.ModelInferRequest(model_name=model_name)
    fp32.inputs.add(name="pixel_values", datatype="FP32", shape=list(pixels.shape)).contents.fp32_contents.extend(pixels.reshape(-1).tolist())
    np.testing.assert_allclose(probabilities(s.ModelInfer(fp32, timeout=30)), raw, atol=1e-6)


def test_v2_http_json_binary_and_raw_requests(server, model_name, photo_bytes):
    images = [b for _, b in photo_bytes[:2]]
    url = f"{server.url}/v2/models/{model_name}/versions/1/infer"
    body = {"id": "42", "inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": [base64.b64encode(b).decode() for b in images]}],
            "outputs": [{"name": "probabilities"}, {"name": "probabilities", "parameters": {"classification": 3}}]}
    r = httpx.post(url, json=body, timeout=30)
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["id"] == "42" and j["model_name"] == model_name and j["parameters"]["vitserve_batch_ids"]
    probs = np.array(j["outputs"][0]["data"], dtype=np.float32).reshape(j["outputs"][0]["shape"])
    classes = j["outputs"][1]
    assert classes["datatype"] == "BYTES" and classes["shape"] == [2, 3]
    first = classes["data"][0].split(":")
    assert int(first[1]) == int(probs[0].argmax()) and float(first[0]) == pytest.approx(float(probs[0].max()), abs=1e-6)
    # The binary tensor extension: the same request with the image bytes after the JSON, the output binary too.
    header = json.dumps({"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": sum(4 + len(b) for b in images)}}],
                         "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()
    payload = header + b"".join(struct.pack("<I", len(b)) + b for b in images)
    rb = httpx.post(url, content=payload, headers={"Inference-Header-Content-Length": str(len(header)),
                                                   "Content-Type": "application/octet-stream"}, timeout=30)
    assert rb.status_code == 200, rb.text
    n = int(rb.headers["inference-header-content-length"])
    head = json.loads(rb.content[:n])
    assert head["outputs"][0]["parameters"]["binary_data_size"] == 2 * 10 * 4
    np.testing.assert_array_equal(np.frombuffer(rb.content[n:], dtype="<f4").reshape(2, 10), probs)
    # A raw binary request (header length 0): the whole body is one image.
    raw = httpx.post(url, content=images[0], headers={"Inference-Header-Content-Length": "0"}, timeout=30)
    assert raw.status_code == 200
    m = int(raw.headers["inference-header-content-length"])
    np.testing.assert_array_equal(np.frombuffer(raw.content[m:], dtype="<f4"), probs[0])


def test_v2_http_metadata_health_and_errors(server, model_name):
    assert httpx.get(f"{server.url}/v2", timeout=10).json()["extensions"] == ["binary_tensor_data", "classification", "model_configuration"]
    assert httpx.get(f"{server.url}/v2/health/live", timeout=10).status_code == 200
    assert httpx.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200
    assert httpx.get(f"{server.url}/v2/models/{model_name}/versions/1/ready", timeout=10).status_code == 200
    meta = httpx.get(f"{server.url}/v2/models/{model_name}", timeout=10).json()
    assert json.loads(meta["parameters"]["labels"]) == [f"class_{i}" for i in range(10)] and "temperature" in meta["parameters"]["probabilities"]
    missing = httpx.get(f"{server.url}/v2/models/nope", timeout=10)
    assert missing.status_code == 404 and "is not served here" in missing.json()["error"]
    wrong_version = httpx.post(f"{server.url}/v2/models/{model_name}/versions/7/infer", json={}, timeout=10)
    assert wrong_version.status_code == 404 and set(wrong_version.json()) == {"error"}
    bad = httpx.post(f"{server.url}/v2/models/{model_name}/infer", content=b"{nope", timeout=10)
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]
    shape = httpx.post(f"{server.url}/v2/models/{model_name}/infer", timeout=10,
                       json={"inputs": [{"name": "pixel_values", "shape": [1, 3, 5, 5], "datatype": "FP32", "data": [0.0] * 75}]})
    assert shape.status_code == 422 and "must have shape [N, 3, 32, 32]" in shape.json()["error"]


# ---- the same batcher -------------------------------------------------------------------------------------------------------
def test_http_and_grpc_clients_share_batches(tiny_artifact, tmp_path, model_name, photo_bytes):
    # A batch that waits up to 5 s for 16 images (the artifact's largest batch) and closes when full: the 8 gRPC and
    # 8 HTTP requests below are one batch whatever order the scheduler delivers them in, unless they are sent over
    # more than 5 s. (With the shared server's 30 ms wait, one protocol's whole burst could fill a batch alone.)
    async def burst(server):
        channel = grpc.aio.insecure_channel(server.grpc_address)
        s = pb_grpc.GRPCInferenceServiceStub(channel)
        async with httpx.AsyncClient() as client:
            grpc_calls = [s.ModelInfer(image_request(model_name, [photo_bytes[i][1]]), timeout=60) for i in range(8)]
            http_calls = [client.post(f"{server.url}/classify", files=[("images", photo_bytes[i])], timeout=60) for i in range(8)]
            results = await asyncio.gather(*grpc_calls, *http_calls)
        await channel.close()
        return results[:8], results[8:]

    with running_server(tiny_artifact, tmp_path, max_wait_ms=5000, max_batch_size=16) as server:
        g, h = asyncio.run(burst(server))
    grpc_batches = {int(b) for r in g for b in r.parameters["vitserve_batch_ids"].string_param.split(",")}
    http_batches = {int(b) for r in h for b in r.headers["x-vitserve-batch-id"].split(",")}
    assert all(r.status_code == 200 for r in h)
    shared = grpc_batches & http_batches
    assert shared, (grpc_batches, http_batches)
    assert max(int(r.headers["x-vitserve-batch-size"]) for r in h) > 1


# ---- hostile gRPC --------------------------------------------------------------------------------------------------------
def tiny_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (2, 2), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def test_hostile_grpc_requests_get_their_codes_and_the_server_lives_on(server, model_name, photo_bytes):
    s = stub(server.grpc_address)
    before = server.metrics()
    good = image_request(model_name, [photo_bytes[0][1]])
    bad_prefix = pb.ModelInferRequest(model_name=model_name)
    bad_prefix.inputs.add(name="image", datatype="BYTES", shape=[1])
    bad_prefix.raw_input_contents.append(b"\xff\xff\x00\x00abc")
    cases = {
        "garbage bytes": (image_request(model_name, [b"\x00garbage, not an image"]), "INVALID_ARGUMENT", "not a recognised image format"),
        "empty tensor": (image_request(model_name, []), "INVALID_ARGUMENT", "has no elements"),
        "wrong dtype": (image_request(model_name, [photo_bytes[0][1]], datatype="FP32"), "INVALID_ARGUMENT", "must be BYTES, got FP32"),
        "wrong shape": (image_request(model_name, [photo_bytes[0][1]], shape=[3]), "INVALID_ARGUMENT", "has shape [3] but 1 elements"),
        "unknown input": (image_request(model_name, [photo_bytes[0][1]], name="input0"), "INVALID_ARGUMENT", "unknown input 'input0'"),
        "1000 images": (image_request(model_name, [tiny_png()] * 1000), "INVALID_ARGUMENT", f"1000 images in one request; the limit is {MAX_IMAGES}"),
        "over the size limit": (image_request(model_name, [os.urandom(MAX_BODY + 100)]), "RESOURCE_EXHAUSTED", ""),
        "truncated BYTES": (bad_prefix, "INVALID_ARGUMENT", "claims 65535 bytes"),
        "unknown model": (image_request("nope", [photo_bytes[0][1]]), "NOT_FOUND", "is not served here"),
        "classification out of range": (image_request(model_name, [photo_bytes[0][1]], classification=11), "INVALID_ARGUMENT", "between 1 and 10"),
    }
    with ThreadPoolExecutor(4) as pool:
        alongside = pool.submit(s.ModelInfer, good, timeout=60)  # a good request in flight meanwhile
        for name, (request, code, message) in cases.items():
            got, details = grpc_code(s.ModelInfer, request)
            assert got.name == code and message in details, (name, got, details)
        assert alongside.result().outputs[0].name == "probabilities"
    # Bytes that are not a ModelInferRequest at all: INVALID_ARGUMENT from the error table (gRPC's own deserializer
    # would answer UNKNOWN with a Python exception's text), for every unary method.
    channel = grpc.insecure_channel(server.grpc_address)
    for method in ("ModelInfer", "ModelMetadata"):
        raw = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
        got, details = grpc_code(raw, b"\xff\xff\xff not protobuf")
        assert got.name == "INVALID_ARGUMENT" and "is not a valid inference." in details, (method, got, details)
    channel.close()
    assert s.ServerLive(pb.ServerLiveRequest(), timeout=10).live
    assert probabilities(s.ModelInfer(good, timeout=30)).shape == (1, 10)
    # The same mistakes over KServe v2 HTTP give the same messages (one error table, one protocol core).
    for name, (field, value, message) in {"unknown input": ("name", "input0", "unknown input 'input0'"),
                                          "wrong dtype": ("datatype", "FP32", "must be BYTES, got FP32")}.items():
        spec = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(photo_bytes[0][1]).decode()], field: value}
        r = httpx.post(f"{server.url}/v2/models/{model_name}/infer", json={"inputs": [spec]}, timeout=30)
        assert r.status_code == 422 and message in r.json()["error"], (name, r.text)
    after = server.metrics()
    delta = lambda reason: metric_value(after, "vitserve_rejections_total", protocol="grpc", reason=reason) - metric_value(before, "vitserve_rejections_total", protocol="grpc", reason=reason)  # noqa: E731
    assert delta("unsupported_image") == 1 and delta("too_many_images") == 1 and delta("not_found") == 1
    assert delta("malformed_request") == 1  # the undecodable ModelInfer (ModelMetadata is not a counted RPC)
    assert delta("empty_request") == 1 and delta("invalid_parameter") == 5


def test_health_and_reflection(server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    channel = grpc.insecure_channel(server.grpc_address)
    h = health_pb2_grpc.HealthStub(channel)
    for service in ("", "inference.GRPCInferenceService"):
        assert h.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services


def test_metrics_count_every_protocol_exactly(server, model_name, photo_bytes):
    before = server.metrics()
    s = stub(server.grpc_address)
    for i in range(3):
        s.ModelInfer(image_request(model_name, [photo_bytes[i][1]]), timeout=30)
    grpc_code(s.ModelInfer, image_request(model_name, [b"junk"]))
    for i in range(2):
        assert classify(server.url, [photo_bytes[i]]).status_code == 200
    body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(photo_bytes[0][1]).decode()]}]}
    for _ in range(4):
        assert httpx.post(f"{server.url}/v2/models/{model_name}/infer", json=body, timeout=30).status_code == 200
    after = server.metrics()
    d = lambda protocol, status: metric_value(after, "vitserve_requests_total", protocol=protocol, status=status) - metric_value(before, "vitserve_requests_total", protocol=protocol, status=status)  # noqa: E731
    assert (d("grpc", "200"), d("grpc", "415"), d("json", "200"), d("v2-http", "200")) == (3, 1, 2, 4)
    images = lambda p: metric_value(after, "vitserve_images_total", protocol=p) - metric_value(before, "vitserve_images_total", protocol=p)  # noqa: E731
    assert (images("grpc"), images("json"), images("v2-http")) == (3, 2, 4)


def test_bench_load_drives_grpc(server, tmp_path, monkeypatch):
    from benchmarks.cli import main
    from benchmarks.harness import results as common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    before = server.metrics()
    assert main(["load", "--url", server.url, "--protocol", "grpc", "--grpc", server.grpc_address, "--concurrency", "2",
                 "--warmup", "0.3", "--duration", "1", "--name", "grpc-load"]) == 0
    payload = json.loads(next(tmp_path.glob("grpc-load_*.json")).read_text())
    (run,) = payload["closed_loop"]
    assert payload["protocol"] == "grpc" and run["protocol"] == "grpc" and run["errors"] == {} and run["throughput_images_per_s"] > 0
    served = metric_value(server.metrics(), "vitserve_requests_total", protocol="grpc", status="200") - metric_value(before, "vitserve_requests_total", protocol="grpc", status="200")
    assert served >= run["requests"] > 0  # the server counted at least every request the window measured
    assert run["server_stages"]["available"]


# ---- drain -----------------------------------------------------------------------------------------------------------------
def test_sigterm_under_mixed_load_drops_nothing_and_counts_match(tiny_artifact, tmp_path, model_name, photo_bytes):
    with running_server(tiny_artifact, tmp_path, max_batch_size=2, grace_period_s=20, drain_quiet_s=3) as s:
        seen: list[tuple[str, str]] = []  # (protocol, status) as the clients saw them
        health_during_drain: list[int] = []

        async def grpc_client(st, i: int):
            await asyncio.sleep(i * 0.02)
            try:
                await st.ModelInfer(image_request(model_name, [photo_bytes[i % 6][1]]), timeout=60)
                seen.append(("grpc", "200"))
            except grpc.aio.AioRpcError as e:
                seen.append(("grpc", {"UNAVAILABLE": "503"}.get(e.code().name, e.code().name)))

        async def http_client(c: httpx.AsyncClient, i: int):
            await asyncio.sleep(i * 0.02)
            try:
                r = await c.post(f"{s.url}/classify", files=[("images", photo_bytes[i % 6])])
                seen.append(("json", str(r.status_code)))
            except httpx.HTTPError as e:
                seen.append(("json", f"dropped: {type(e).__name__}"))

        async def run():
            before = await asyncio.to_thread(s.metrics)
            channel = grpc.aio.insecure_channel(s.grpc_address)
            st = pb_grpc.GRPCInferenceServiceStub(channel)
            hs = health_pb2_grpc.HealthStub(channel)
            async with httpx.AsyncClient(timeout=60) as c:
                tasks = [asyncio.create_task(grpc_client(st, i)) for i in range(40)] + [asyncio.create_task(http_client(c, i)) for i in range(40)]
                await asyncio.sleep(0.3)
                os.killpg(s.proc.pid, signal.SIGTERM)
                await asyncio.gather(*tasks)
                health_during_drain.append((await hs.Check(health_pb2.HealthCheckRequest(), timeout=5)).status)
                after = await asyncio.to_thread(s.metrics)  # inside the drain's quiet window: the server still answers
            await channel.close()
            return before, after

        before, after = asyncio.run(run())
        s.proc.wait(40)
        assert not [x for x in seen if x[1].startswith("dropped")], seen
        assert {st for _, st in seen} <= {"200", "503"} and ("grpc", "200") in seen and ("json", "200") in seen, seen
        assert health_during_drain == [health_pb2.HealthCheckResponse.NOT_SERVING]
        for protocol in ("grpc", "json"):
            for status in ("200", "503"):
                counted = metric_value(after, "vitserve_requests_total", protocol=protocol, status=status) - metric_value(before, "vitserve_requests_total", protocol=protocol, status=status)
                assert counted == seen.count((protocol, status)), (protocol, status, counted, seen.count((protocol, status)))


# ---- who may call -------------------------------------------------------------------------------------------------------------
def test_api_keys_on_every_protocol(tiny_artifact, tmp_path, model_name, photo_bytes):
    keys = tmp_path / "keys"
    keys.write_text("# one key per line\nfirst-key\nsecond-key\n")
    with running_server(tiny_artifact, tmp_path, api_keys=f"@{keys}") as s:
        image = photo_bytes[0]
        v2_body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(image[1]).decode()]}]}
        for header, status in ((None, 401), ("Bearer wrong", 401), ("Basic second-key", 401), ("Bearer second-key", 200)):
            h = {"authorization": header} if header else {}
            r = httpx.post(f"{s.url}/classify", files=[("images", image)], headers=h, timeout=30)
            assert r.status_code == status, (header, r.text)
            v = httpx.post(f"{s.url}/v2/models/{model_name}/infer", json=v2_body, headers=h, timeout=30)
            assert v.status_code == status, (header, v.text)
            if status == 401:
                assert r.json()["error"]["type"] == "unauthenticated" and r.headers["www-authenticate"] == "Bearer"
                assert set(v.json()) == {"error"}
            md = (("authorization", header),) if header else ()
            call = stub(s.grpc_address).ModelInfer
            if status == 401:
                code, _ = grpc_code(lambda req, timeout: call(req, timeout=timeout, metadata=md), image_request(model_name, [image[1]]))
                assert code == grpc.StatusCode.UNAUTHENTICATED
            else:
                assert probabilities(call(image_request(model_name, [image[1]]), timeout=30, metadata=md)).shape == (1, 10)
        for probe in ("/livez", "/readyz", "/v2/health/live", "/v2/health/ready"):  # probes stay open
            assert httpx.get(f"{s.url}{probe}", timeout=10).status_code == 200, probe
        assert health_pb2_grpc.HealthStub(grpc.insecure_channel(s.grpc_address)).Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
        assert httpx.get(f"{s.url}/metrics", timeout=10).status_code == 401  # closed by default once keys are set
        text = httpx.get(f"{s.url}/metrics", headers={"authorization": "Bearer first-key"}, timeout=10).text
        for protocol in ("json", "v2-http", "grpc"):
            assert metric_value(text, "vitserve_rejections_total", protocol=protocol, reason="unauthenticated") == 3
        if CLIENT_PYTHON.exists():
            image_file = tmp_path / "image.jpg"
            image_file.write_bytes(image[1])
            cmd = [str(CLIENT_PYTHON), str(ROOT / "tests" / "clients" / "triton_roundtrip.py"), "--grpc", s.grpc_address,
                   "--http", s.url.removeprefix("http://"), "--model", model_name, str(image_file)]
            with_key = json.loads(subprocess.run([*cmd, "--key", "first-key"], capture_output=True, text=True, timeout=120).stdout)
            assert "top" in with_key["grpc"] and "top" in with_key["v2-http"], with_key
            without = json.loads(subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout)
            assert "error" in without["grpc"] and "error" in without["v2-http"], without


@pytest.mark.skipif(not __import__("shutil").which("openssl"), reason="needs openssl to make a test certificate")
def test_grpc_over_tls(tiny_artifact, tmp_path, model_name, photo_bytes):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    with running_server(tiny_artifact, tmp_path, "--grpc-tls-cert", str(cert), "--grpc-tls-key", str(key)) as s:
        secure = grpc.secure_channel(s.grpc_address, grpc.ssl_channel_credentials(root_certificates=cert.read_bytes()))
        response = pb_grpc.GRPCInferenceServiceStub(secure).ModelInfer(image_request(model_name, [photo_bytes[0][1]]), timeout=30)
        assert probabilities(response).shape == (1, 10)
        code, _ = grpc_code(stub(s.grpc_address).ServerReady, pb.ServerReadyRequest())  # plaintext is not served
        assert code == grpc.StatusCode.UNAVAILABLE
        assert httpx.get(f"{s.url}/info", timeout=10).json()["protocols"]["grpc"]["tls"] is True


# ---- the stubs ---------------------------------------------------------------------------------------------------------------
def test_committed_stubs_are_what_the_protos_generate(tmp_path):
    from grpc_tools import protoc

    protos = ["service/protos/model_config.proto", "service/protos/grpc_service.proto"]
    for p in protos:
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / p).write_bytes((ROOT / p).read_bytes())
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert protoc.main(["protoc", "-I.", "--python_out=.", "--grpc_python_out=.", *protos]) == 0
    finally:
        os.chdir(cwd)
    for generated in ("grpc_service_pb2.py", "grpc_service_pb2_grpc.py", "model_config_pb2.py"):
        fresh = (tmp_path / "service/protos" / generated).read_text()
        committed = (ROOT / "service/protos" / generated).read_text()
        assert without_generator_version(fresh) == without_generator_version(committed), generated


# Each grpcio-tools patch release stamps its own version (and its bundled protobuf's) into the stubs as the minimum
# runtime they need; the code is the same. Comparing the stamps too would fail CI on every upstream patch release, so
# the content is compared without them, and the committed stamps must be ones the installed runtime satisfies.
_GENERATOR_STAMPS = [
    (re.compile(r"GRPC_GENERATED_VERSION = '[^']*'"), "GRPC_GENERATED_VERSION = <stamp>"),
    (re.compile(r"# Protobuf Python Version: \S+"), "# Protobuf Python Version: <stamp>"),
    (re.compile(r"(ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,)\s*\d+,\s*\d+,\s*\d+,"), r"\1 <stamp>,"),
]


def without_generator_version(source: str) -> str:
    for pattern, replacement in _GENERATOR_STAMPS:
        source = pattern.sub(replacement, source)
    return source


def test_committed_stub_stamps_are_satisfied_by_the_installed_runtime():
    import google.protobuf

    stub = (ROOT / "service/protos/grpc_service_pb2_grpc.py").read_text()
    wanted_grpc = re.search(r"GRPC_GENERATED_VERSION = '([^']*)'", stub).group(1)
    wanted_protobuf = re.search(r"# Protobuf Python Version: (\S+)", (ROOT / "service/protos/grpc_service_pb2.py").read_text()).group(1)

    def version(text):
        return tuple(int(part) for part in re.findall(r"\d+", text)[:3])

    assert version(grpc.__version__) >= version(wanted_grpc), (grpc.__version__, wanted_grpc)
    assert version(google.protobuf.__version__) >= version(wanted_protobuf), (google.protobuf.__version__, wanted_protobuf)


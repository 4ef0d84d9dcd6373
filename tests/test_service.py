"""The service, end to end, against a real `bentoml serve` on loopback: no mocks of the server."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from service.artifact import load_artifact
from service.engines import load_engine
from service.preprocess import Preprocessor
from service.topk import predictions
from tests.server import ROOT, metric_value, running_server

pytestmark = pytest.mark.timeout(300)

MAX_BODY = 3_000_000
MAX_IMAGES = 8


@pytest.fixture(scope="module")
def server(tiny_artifact, tmp_path_factory):
    with running_server(
        tiny_artifact, tmp_path_factory.mktemp("srv"),
        max_wait_ms=25, max_body_bytes=MAX_BODY, max_images_per_request=MAX_IMAGES, max_image_pixels=4_000_000,
    ) as s:
        yield s


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def post_images(url: str, images: list[tuple[str, bytes]], **params) -> httpx.Response:
    files = [("images", (name, data, "application/octet-stream")) for name, data in images]
    return httpx.post(f"{url}/classify", files=files, params=params, timeout=60)


async def apost(client: httpx.AsyncClient, url: str, images: list[tuple[str, bytes]]) -> httpx.Response:
    files = [("images", (name, data, "application/octet-stream")) for name, data in images]
    return await client.post(f"{url}/classify", files=files, timeout=60)


def direct_predictions(artifact, images: list[bytes]) -> list[dict]:
    """The same artifact through the engine directly, no server: what the service must answer (in its JSON shape)."""
    art = load_artifact(artifact)
    engine = load_engine(art, "auto")
    pre = Preprocessor(art.manifest.preprocessing)
    x = np.stack([pre.from_bytes(b, max_pixels=10**8) for b in images])
    top = predictions(engine.run(x), art.manifest.labels, temperature=art.manifest.temperature, k=5)
    return [{"top5": [{"label": p.label, "index": p.index, "score": p.score} for p in row]} for row in top]


def assert_same_prediction(got: dict, want: dict) -> None:
    assert [p["index"] for p in got["top5"]] == [p["index"] for p in want["top5"]]
    assert [p["label"] for p in got["top5"]] == [p["label"] for p in want["top5"]]
    np.testing.assert_allclose([p["score"] for p in got["top5"]], [p["score"] for p in want["top5"]], rtol=1e-4, atol=1e-6)


def test_top5_matches_the_engine_run_directly(server, tiny_artifact, photo_bytes):
    photos = photo_bytes[:4]
    r = post_images(server.url, photos)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] and body["version"] == "1"
    assert len(body["predictions"]) == 4
    for got, want in zip(body["predictions"], direct_predictions(tiny_artifact, [b for _, b in photos])):
        assert got["top1"] == got["top5"][0]
        assert len(got["top5"]) == 5
        assert_same_prediction(got, want)
    for h in ("x-vitserve-decode-ms", "x-vitserve-queue-ms", "x-vitserve-inference-ms", "x-vitserve-total-ms"):
        assert float(r.headers[h]) >= 0


def test_same_answer_alone_and_inside_a_batch(server, photo_bytes):
    target = photo_bytes[5]
    alone = post_images(server.url, [target]).json()["predictions"][0]
    together = post_images(server.url, [photo_bytes[6], target, photo_bytes[7]]).json()["predictions"][1]
    assert_same_prediction(together, alone)

    async def crowd():
        async with httpx.AsyncClient() as c:
            return await asyncio.gather(*(apost(c, server.url, [photo_bytes[i % 8]]) for i in range(12)), apost(c, server.url, [target]))

    *_, last = asyncio.run(crowd())
    assert_same_prediction(last.json()["predictions"][0], alone)


def test_top_k_parameter(server, photo_bytes):
    r = post_images(server.url, photo_bytes[:1], top_k=3)
    assert r.status_code == 200 and len(r.json()["predictions"][0]["top5"]) == 3


def test_one_image_as_the_whole_body(server, photo_bytes):
    """The cheapest way in: the image file is the body, its type the Content-Type; same answer as multipart."""
    _, data = photo_bytes[1]
    raw = httpx.post(f"{server.url}/classify", params={"top_k": 3}, content=data, headers={"content-type": "image/jpeg"}, timeout=30)
    assert raw.status_code == 200, raw.text
    assert raw.json()["predictions"] == post_images(server.url, photo_bytes[1:2], top_k=3).json()["predictions"]
    r = httpx.post(f"{server.url}/classify", content=b"hello", headers={"content-type": "text/plain"}, timeout=10)
    assert r.status_code == 415 and r.json()["error"]["type"] == "unsupported_image" and "Content-Type" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/classify", content=b"not an image", headers={"content-type": "image/png"}, timeout=10)
    assert r.status_code == 415 and r.json()["error"]["index"] == 0


def test_base64_json_variant(server, photo_bytes, tiny_artifact):
    data = photo_bytes[2][1]
    r = httpx.post(f"{server.url}/classify/base64", json={"images": [base64.b64encode(data).decode()]}, timeout=30)
    assert r.status_code == 200, r.text
    assert_same_prediction(r.json()["predictions"][0], direct_predictions(tiny_artifact, [data])[0])


def test_concurrent_clients_are_batched_and_counted(server, photo_bytes):
    before = server.metrics()
    n = 24

    async def burst():
        async with httpx.AsyncClient() as c:
            return await asyncio.gather(*(apost(c, server.url, [photo_bytes[i % 10]]) for i in range(n)))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * n
    assert max(int(r.headers["x-vitserve-batch-size"]) for r in responses) > 1
    after = server.metrics()
    delta = lambda name, **kw: metric_value(after, name, **kw) - metric_value(before, name, **kw)  # noqa: E731
    assert delta("vitserve_requests_total", protocol="json", status="200") == n
    assert delta("vitserve_images_total", protocol="json") == n
    assert delta("vitserve_request_duration_seconds_count", protocol="json", status="200") == n
    batches = delta("vitserve_batch_size_count")
    assert 1 <= batches < n, "concurrent single-image requests should share batches"
    assert delta("vitserve_batch_size_sum") == n
    for stage in ("vitserve_decode_duration_seconds_count", "vitserve_queue_wait_duration_seconds_count"):
        assert delta(stage) == n
    assert delta("vitserve_batch_inference_duration_seconds_count") == batches
    assert metric_value(after, "vitserve_engine_info") == 1


def test_chunked_body_over_the_limit_is_refused(server):
    def chunks():  # well-formed multipart, streamed without a Content-Length
        yield b'--zzz\r\nContent-Disposition: form-data; name="images"; filename="a.bin"\r\n\r\n'
        for _ in range(MAX_BODY // 65536 + 2):
            yield b"x" * 65536
        yield b"\r\n--zzz--\r\n"

    r = httpx.post(f"{server.url}/classify", content=chunks(), headers={"content-type": "multipart/form-data; boundary=zzz"}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"


def test_bad_image_in_concurrent_traffic_fails_alone(server, photo_bytes):
    async def mixed():
        async with httpx.AsyncClient() as c:
            reqs = [apost(c, server.url, [photo_bytes[i % 10]]) if i % 4 else apost(c, server.url, [("bad.jpg", b"GIF89a-garbage")]) for i in range(20)]
            return await asyncio.gather(*reqs)

    responses = asyncio.run(mixed())
    for i, r in enumerate(responses):
        assert r.status_code == (415 if i % 4 == 0 else 200), (i, r.text)


def test_openapi_describes_the_api(server):
    spec = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    assert {"/classify", "/classify/base64", "/info"} <= set(spec["paths"])
    responses = spec["paths"]["/classify"]["post"]["responses"]
    assert {"200", "413", "415", "422", "429", "503", "504"} <= set(responses)
    assert "multipart/form-data" in spec["paths"]["/classify"]["post"]["requestBody"]["content"]


def test_info_and_probes(server, tiny_artifact):
    info = httpx.get(f"{server.url}/info", timeout=10).json()
    manifest = load_artifact(tiny_artifact).manifest
    assert info["labels"] == manifest.labels
    assert info["engine"]["engine"].startswith("onnxruntime-cpu")
    # Batches are capped at the CPU engine's fastest batch on this CPU: export timed it here, so its curve is used.
    cpu = next(e for e in manifest.engines if e.file == info["engine"]["file"])
    assert info["limits"]["max_batch_size"] == cpu.speed.best_batch
    assert info["limits"]["max_batch_size_reason"].startswith("the engine's fastest batch (export's speed curve, timed on this CPU")
    budget = info["cpu_budget"]
    assert budget["gate"] and budget["engine_threads"] == budget["decode_threads"] == budget["cores"] >= 1
    assert httpx.get(f"{server.url}/livez", timeout=10).status_code == 200
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200


def test_full_queue_answers_429_with_retry_after(tiny_artifact, tmp_path, photo_bytes):
    # One image per batch, room for 8 queued, small images (cheap to decode) on the PyTorch engine (slower
    # per call than ONNX Runtime): the engine is the bottleneck and concurrent 8-image requests cannot all fit.
    small = [(f"{i}.png", png(Image.new("RGB", (48, 48), (i * 20, 100, 50)))) for i in range(8)]
    with running_server(tiny_artifact, tmp_path, engine="pytorch-cpu", max_batch_size=1, queue_capacity=8, max_wait_ms=0) as s:
        assert httpx.get(f"{s.url}/info").json()["engine"]["engine"] == "pytorch-cpu-fp32"

        async def flood():
            async with httpx.AsyncClient() as c:
                return await asyncio.gather(*(apost(c, s.url, small) for _ in range(16)))

        responses = asyncio.run(flood())
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) <= {200, 429}, statuses
        assert 429 in statuses and 200 in statuses, statuses
        rejected = next(r for r in responses if r.status_code == 429)
        assert rejected.json()["error"]["type"] == "overloaded" and int(rejected.headers["retry-after"]) >= 1
        assert metric_value(s.metrics(), "vitserve_rejections_total", reason="overloaded") == statuses.count(429)


def test_deadline_expired_in_queue_is_504_and_not_computed(tiny_artifact, tmp_path, photo_bytes):
    with running_server(tiny_artifact, tmp_path, request_timeout_s=0.001, max_wait_ms=50) as s:
        r = post_images(s.url, photo_bytes[:1])
        assert r.status_code == 504 and r.json()["error"]["type"] == "deadline_exceeded"
        m = s.metrics()
        assert metric_value(m, "vitserve_batch_inference_duration_seconds_count") == 0  # never computed
        assert metric_value(m, "vitserve_requests_total", status="504") == 1


@pytest.mark.parametrize("workers", [1, 2])  # 2: two front-end processes drain through the one engine process
def test_sigterm_under_load_answers_every_accepted_request(tiny_artifact, tmp_path, photo_bytes, workers):
    with running_server(tiny_artifact, tmp_path, max_batch_size=2, max_wait_ms=5, grace_period_s=20, workers=workers) as s:
        results: list = []

        async def client(c: httpx.AsyncClient, i: int):
            await asyncio.sleep(i * 0.01)
            try:
                r = await apost(c, s.url, photo_bytes[: 1 + i % 6])
                results.append(("answered", r.status_code, r.json()))
            except httpx.ConnectError:
                results.append(("refused", None, None))  # never accepted: the socket was already closed
            except httpx.HTTPError as e:
                results.append(("dropped", type(e).__name__, None))

        async def load_then_sigterm():
            async with httpx.AsyncClient(timeout=60) as c:
                tasks = [asyncio.create_task(client(c, i)) for i in range(60)]
                await asyncio.sleep(0.25)
                t_sig = time.monotonic()
                os.killpg(s.proc.pid, signal.SIGTERM)
                await asyncio.gather(*tasks)
                return t_sig

        t_sig = asyncio.run(load_then_sigterm())
        s.proc.wait(30)
        exited_after = time.monotonic() - t_sig
        kinds = [r[0] for r in results]
        assert "dropped" not in kinds, results
        statuses = [r[1] for r in results if r[0] == "answered"]
        # Accepted before the signal → answered (200); arrived during the drain → a clean 503.
        assert statuses.count(200) > 0 and statuses.count(503) > 0 and set(statuses) <= {200, 503}, statuses
        for kind, status, body in results:
            if status == 503:
                assert body["error"]["type"] == "shutting_down"
        assert s.proc.returncode is not None and exited_after < 20 + 10
        assert "SIGTERM: draining" in s.output()


def test_tampered_artifact_refuses_to_start(tiny_artifact, tmp_path):
    bad = tmp_path / "tampered"
    shutil.copytree(tiny_artifact, bad)
    onnx_file = next(bad.glob("model.*.onnx"))
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    # Through `vitserve serve`: refused before the server starts.
    proc = subprocess.run([sys.executable, str(ROOT / "vitserve.py"), "serve", "--artifact", str(bad), "--port", "1"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert "checksum mismatch" in proc.stderr and onnx_file.name in proc.stderr
    # Through plain `bentoml serve`: the deployment hook stops it with the same message; it does not loop.
    env = {**os.environ, "VITSERVE_ARTIFACT": str(bad), "BENTOML_HOME": str(tmp_path / "bh"), "BENTOML_DO_NOT_TRACK": "True"}
    proc = subprocess.run([sys.executable, "-m", "bentoml", "serve", "service.app:VitServe", "--port", "0", "--host", "127.0.0.1"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode != 0
    assert "checksum mismatch" in proc.stdout + proc.stderr

"""The in-process tier: our HTTP service (service.standalone: the app BentoML mounts, behind the same guard, on one
Classifier with the tiny artifact's real engine) driven by httpx through ASGI, no server process. Error and format
checks run here in seconds; what needs a real `bentoml serve` (batching across connections, signals, workers, the
socket-level limits) stays in test_service.py and the other server tests."""

from __future__ import annotations

import io
import json
import os
import struct

import httpx
import pytest
from asgi_lifespan import LifespanManager
from PIL import Image

from tests.server import metric_value

pytestmark = pytest.mark.anyio

MAX_BODY = 3_000_000
MAX_IMAGES = 8


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
async def client(anyio_backend, tiny_artifact):
    from service.settings import Settings
    from service.standalone import app

    settings = Settings(artifact=tiny_artifact, grpc_port=0, decode_threads=2, max_latency_ms=10_000, max_wait_ms=25,
                        max_body_bytes=MAX_BODY, max_images_per_request=MAX_IMAGES, max_image_pixels=4_000_000)
    service = app(settings)
    async with LifespanManager(service) as manager:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://vitserve") as c:
            c.guarded_app = service  # the guard (BodyLimit, no API keys here) → the inference routes → the Classifier
            yield c


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


async def post_images(client: httpx.AsyncClient, images: list[tuple[str, bytes]], **params) -> httpx.Response:
    files = [("images", (name, data, "application/octet-stream")) for name, data in images]
    return await client.post("/classify", files=files, params=params)


async def test_a_good_request_and_the_page_are_served(client, photo_bytes):
    r = await post_images(client, photo_bytes[:2])
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2, r.text
    page = await client.get("/")
    assert page.status_code == 200 and "default-src 'none'" in page.headers["content-security-policy"]
    info = (await client.get("/info")).json()
    assert info["gate"] and all(g["passed"] for g in info["gate"]) and info["evaluation"] is None


@pytest.mark.parametrize(
    "case, status, error_type, index",
    [
        ("text", 415, "unsupported_image", 1),
        ("truncated", 422, "invalid_image", 1),
        ("huge", 422, "image_too_large", 1),
        ("empty_part", 415, "unsupported_image", 1),
    ],
)
async def test_bad_images_name_their_index(client, photo_bytes, case, status, error_type, index):
    good = photo_bytes[0]
    jpeg = io.BytesIO()
    Image.new("RGB", (300, 300), (10, 200, 30)).save(jpeg, format="JPEG")
    bad = {
        "text": b"this is not an image",
        "truncated": jpeg.getvalue()[:400],
        "huge": png(Image.new("1", (3000, 2000))),
        "empty_part": b"",
    }[case]
    before = (await client.get("/metrics")).text
    r = await post_images(client, [good, ("bad", bad)])
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == error_type and err["index"] == index and err["message"]
    after = (await client.get("/metrics")).text
    assert metric_value(after, "vitserve_rejections_total", reason=error_type) - metric_value(before, "vitserve_rejections_total", reason=error_type) == 1


async def test_request_level_errors(client, photo_bytes):
    img = ("small.png", png(Image.new("RGB", (40, 30), (200, 20, 20))))
    r = await client.post("/classify")
    assert r.status_code == 400 and r.json()["error"]["type"] == "empty_request"
    r = await post_images(client, [img] * (MAX_IMAGES + 1))
    assert r.status_code == 413 and r.json()["error"]["type"] == "too_many_images"
    r = await post_images(client, [("big", os.urandom(MAX_BODY + 10))])
    assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"
    r = await post_images(client, [img], top_k=0)
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_parameter"
    r = await post_images(client, [img], top_k=11)
    assert r.status_code == 422 and "top_k" in r.json()["error"]["message"]
    r = await post_images(client, [img], top_k="five")
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_parameter"
    r = await client.post("/classify/base64", json={"images": ["%%%not-base64"]})
    assert r.status_code == 415 and r.json()["error"]["index"] == 0
    r = await client.post("/classify/base64", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_parameter"


async def test_malformed_multipart_and_unknown_routes_use_the_error_format(client):
    r = await client.post("/classify", content=b"garbage", headers={"content-type": "multipart/form-data; boundary=zzz"})
    assert r.status_code == 400 and r.json()["error"]["type"] in ("malformed_request", "empty_request")
    r = await client.get("/classify")
    assert r.status_code == 405 and r.json()["error"]["type"] == "method_not_allowed"
    for path in ("/no-such-route", "/docs"):  # /docs too: Swagger UI needs a CDN, so it is not served
        r = await client.get(path)
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found", (path, r.text)




async def test_the_decode_histogram_times_the_decode_and_the_response_header_its_wait_too(client, photo_bytes):
    """A one-image request is decoded straight into the batcher's queue (service/batcher.py ``offer``): the decode
    histogram still observes the decode alone, and X-Vitserve-Decode-Ms the time until it was decoded, the wait for a
    busy decode thread included."""
    import time

    classifier = client.guarded_app.app.get_classifier()
    threads = len(classifier._decode_pool._threads)  # noqa: SLF001
    for _ in range(threads):  # every decode thread busy for 0.4 s
        classifier._decode_pool.post(time.sleep, 0.4)  # noqa: SLF001
    before = (await client.get("/metrics")).text
    r = await client.post("/classify", content=photo_bytes[0][1], headers={"content-type": "image/png"})
    after = (await client.get("/metrics")).text
    assert r.status_code == 200, r.text
    decoded = metric_value(after, "vitserve_decode_duration_seconds_sum") - metric_value(before, "vitserve_decode_duration_seconds_sum")
    assert metric_value(after, "vitserve_decode_duration_seconds_count") - metric_value(before, "vitserve_decode_duration_seconds_count") == 1
    assert float(r.headers["x-vitserve-decode-ms"]) >= 300 > decoded * 1000, (r.headers["x-vitserve-decode-ms"], decoded)


async def test_v2_classification_strings_are_the_json_apis_top_k(client, photo_bytes):
    """KServe v2's classification extension ("score:index:label", best first) answers the ranking our JSON API gives
    for the same image, one output per k asked for, each its first k of the largest."""
    image = photo_bytes[0][1]
    ours = (await post_images(client, [photo_bytes[0]], top_k=5)).json()["predictions"][0]["top5"]
    name = (await client.get("/info")).json()["model"]["name"]
    head = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                   "parameters": {"binary_data_size": 4 + len(image)}}],
                       "outputs": [{"name": "probabilities", "parameters": {"classification": 5}},
                                   {"name": "probabilities", "parameters": {"classification": 2}}]}).encode()
    r = await client.post(f"/v2/models/{name}/infer", content=head + struct.pack("<I", len(image)) + image,
                          headers={"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    five, two = r.json()["outputs"]
    expected = [f"{p['score']:f}:{p['index']}:{p['label']}" for p in ours]
    assert (five["shape"], five["data"]) == ([1, 5], expected)
    assert (two["shape"], two["data"]) == ([1, 2], expected[:2])



def test_multipart_parts_are_found_whatever_their_headers_length():
    """Short Content-Type and part headers are parsed once and kept (clients repeat them); long ones, which come from
    the body, are parsed each time and never kept. Both find the same parts."""
    from service.http_inference import _parsed_options, multipart_images

    def body(disposition: bytes) -> bytes:
        return (b"--b1\r\nContent-Disposition: " + disposition + b"\r\nContent-Type: image/jpeg\r\n\r\nJPEGDATA\r\n"
                b"--b1\r\nContent-Disposition: form-data; name=\"top_k\"\r\n\r\n3\r\n--b1--\r\n")

    short = b'form-data; name="images"; filename="a.jpg"'
    long = b'form-data; name="images"; filename="' + b"x" * 600 + b'.jpg"'
    hits = _parsed_options.cache_info().hits
    for _ in range(2):  # the second time from the cache
        assert multipart_images(body(short), b"multipart/form-data; boundary=b1") == ([b"JPEGDATA"], "3")
    assert _parsed_options.cache_info().hits >= hits + 3  # the boundary, both parts' headers
    kept = _parsed_options.cache_info().currsize
    assert multipart_images(body(long), b"multipart/form-data; boundary=b1") == ([b"JPEGDATA"], "3")
    assert _parsed_options.cache_info().currsize == kept  # the long header was parsed, not kept

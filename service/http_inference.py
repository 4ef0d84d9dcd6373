"""The HTTP inference routes as plain ASGI, in front of BentoML's middleware stack: admission, body, parse, classify,
render, in one place per request.

    POST /classify                 multipart parts named ``images`` (+ optional ``top_k`` field), or one image as the
                                   whole body (``Content-Type: image/jpeg``, ``image/png``, ``image/webp``, ...)
    POST /classify/base64          JSON ``{"images": [base64, ...], "top_k": k}``
    POST /v2/models/{name}[/versions/{v}]/infer     KServe v2 JSON, and Triton's binary tensor extension

Why not FastAPI routes behind BentoML: profiled at saturation on the demo model (docs/serving.md "The front door"), BentoML's
middlewares and FastAPI's routing, dependency solving and form parsing (each upload spooled to a temporary file, each
read a thread hop) took about a third of the event loop's time per request, more than the image's decode. Here a
request is read once, multipart is parsed by python-multipart's parser on the buffered body (~25 µs for a 60 KB
JPEG), and answered with two ASGI messages. What BentoML's stack gave these routes is kept: the body limit (in front,
service/http_guard.py), errors in our shape, and the request metrics (``vitserve_*``; BentoML's own request counters
no longer see them). The OpenAPI document still describes them (service/http_api.py).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import os
import re
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

import orjson
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.types import ASGIApp, Receive, Scope, Send

from service import kserve_v2, metrics
from service.errors import (EmptyRequest, InvalidParameter, MalformedRequest, MethodNotAllowed, RequestTimeout, ServiceError,
                            UnsupportedImage)
from service.request_scope import RequestScope
from service.http_errors import JSON_API, V2_HTTP, error_parts
from service.http_guard import client_timeout_s
from service.http_refusal import raw_response
from service.v2_http_api import parse_request, render_response

if TYPE_CHECKING:
    from service.classifier import Classification, Classifier

IMAGE_FIELD, TOP_K_FIELD = b"images", b"top_k"
_INTEGER = re.compile(r"-?[0-9]+")
PROCESS = str(os.getpid())
V2_HEADER_LENGTH = b"inference-header-content-length"


class ClientDisconnected(ConnectionError):
    """The client went away before its body was read (counted as 499, answered to no one)."""


# ---- the wire -----------------------------------------------------------------------------------------------------------
async def read_body(receive: Receive, grace_s: float, min_rate: float) -> bytes:
    """The whole body (the body limit in front, service/http_guard.py, refuses one too large while it streams), within
    ``grace_s`` plus a second per ``min_rate`` bytes received (Apache mod_reqtimeout's ``body=grace,MinRate=rate``): a
    slow client gets ``RequestTimeout`` (408) instead of holding a connection and the door's capacity forever. One
    loop timer, moved as bytes arrive: a body that came with its headers costs no more than before."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    chunks, received = [], 0
    try:
        async with asyncio.timeout_at(start + grace_s) as deadline:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnected("client disconnected while sending its body")
                chunk = message.get("body", b"")
                chunks.append(chunk)
                if not message.get("more_body"):
                    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
                received += len(chunk)
                deadline.reschedule(start + grace_s + received / min_rate)
    except TimeoutError:
        metrics.labelled(metrics.SLOW_CLIENTS, "body").inc()
        raise RequestTimeout(
            f"the request body arrived too slowly: {received} bytes in {loop.time() - start:.1f} s (after {grace_s:g} s a "
            f"body must keep up {min_rate:g} bytes/s)"
        ) from None


async def drain_body(receive: Receive) -> None:
    """Read and drop what the client is still sending: closing a socket with unread bytes in it resets the connection
    and the client may never see our answer."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect" or not message.get("more_body"):
            return


async def send_response(send: Send, status: int, body: bytes, content_type: bytes = b"application/json",
                        headers: dict[str, str] | None = None) -> None:
    raw = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if headers:
        raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def error_answer(exc: BaseException, protocol: str) -> tuple[int, bytes, dict[str, str]]:
    """Status, body and headers of an error, from the one table, as service/http_errors.py renders it."""
    status, body, headers = error_parts(exc, protocol)
    return status, orjson.dumps(body), headers


# ---- request bodies → images ------------------------------------------------------------------------------------------------
# A client sends the same Content-Type (its boundary) and the same part headers request after request, and
# python-multipart's parse_options_header costs 6-11 µs a call on the slow EPYC here, two per request: short values are
# parsed once (the dicts are only read). Long ones are not kept: a part's headers come from the body.
_parsed_options = functools.lru_cache(maxsize=256)(parse_options_header)


def _options(value: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    return _parsed_options(value) if len(value) <= 256 else parse_options_header(value)


def multipart_images(body: bytes, content_type: bytes) -> tuple[list[bytes], str | None]:
    """The ``images`` parts (in order) and the ``top_k`` field of a multipart/form-data body."""
    _, options = _options(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise MalformedRequest("multipart/form-data without a boundary")
    parts: list[tuple[bytes, list[bytes]]] = []  # (field name, data chunks)
    header: list[bytes] = [b"", b""]
    headers: dict[bytes, bytes] = {}

    def on_part_begin() -> None:
        headers.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def on_header_end() -> None:
        headers[header[0].lower()] = header[1]
        header[0] = header[1] = b""

    def on_headers_finished() -> None:
        _, disposition = _options(headers.get(b"content-disposition", b""))
        parts.append((disposition.get(b"name", b""), []))

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1][1].append(data[start:end])

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
    })  # fmt: skip
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as e:
        raise MalformedRequest(f"malformed multipart body: {e}") from None
    images = [b"".join(chunks) for name, chunks in parts if name == IMAGE_FIELD]
    top_k = next((b"".join(chunks).decode("latin-1") for name, chunks in parts if name == TOP_K_FIELD), None)
    if not images:
        raise EmptyRequest("no images in the request (multipart field 'images', or one image as the whole body)")
    return images, top_k


def base64_images(body: bytes) -> tuple[list[bytes], object]:
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError as e:  # invalid UTF-8 included
        raise InvalidParameter(f"request body is not valid JSON: {e}") from None
    if not isinstance(request, dict) or not isinstance(request.get("images"), list):
        raise InvalidParameter("images: the body must be a JSON object with 'images', a list of base64 strings")
    images = []
    for i, s in enumerate(request["images"]):
        try:
            if not isinstance(s, str):
                raise TypeError
            images.append(base64.b64decode(s, validate=True))
        except (binascii.Error, TypeError, ValueError):
            raise UnsupportedImage(f"image {i} is not valid base64", index=i) from None
    return images, request.get("top_k")


def parse_top_k(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    # ASCII digits only: str.isdigit() also accepts "³", which int() then rejects (found by `vitserve bench fuzz`).
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        return int(value)
    raise InvalidParameter(f"top_k: must be an integer, got {value!r}")


def query_top_k(scope: Scope) -> str | None:
    qs = scope.get("query_string")
    return dict(parse_qsl(qs.decode("latin-1"))).get("top_k") if qs else None


# ---- responses -------------------------------------------------------------------------------------------------------------------
def classify_body(clf: Classifier, result: Classification) -> bytes:
    m = clf.manifest.model
    predictions = [{"top1": _prediction(top[0]), "top5": [_prediction(p) for p in top]} for top in result.top]
    return orjson.dumps({"model": m.name, "version": m.version, "predictions": predictions})


def _prediction(p) -> dict:
    return {"label": p.label, "index": p.index, "score": p.score}


def timing_headers(result: Classification, total_s: float) -> dict[str, str]:
    h = {f"X-Vitserve-{k.capitalize()}-Ms": f"{v:.2f}" for k, v in result.timings_ms.items()}
    h["X-Vitserve-Total-Ms"] = f"{total_s * 1000:.2f}"
    h["X-Vitserve-Batch-Size"] = str(result.batch_size)
    h["X-Vitserve-Batch-Id"] = ",".join(map(str, result.batch_ids))  # which engine batch served each image
    h["X-Vitserve-Process"] = PROCESS  # which front-end process answered (several with VITSERVE_WORKERS > 1)
    return h


def v2_infer_path(path: str) -> tuple[str, str] | None:
    """(model name, version) of ``/v2/models/{name}[/versions/{v}]/infer``, else None."""
    if not (path.startswith("/v2/models/") and path.endswith("/infer")):
        return None
    parts = path[len("/v2/models/") : -len("/infer")].split("/")
    if len(parts) == 1 and parts[0]:
        return parts[0], ""
    if len(parts) == 3 and parts[1] == "versions" and parts[0] and parts[2]:
        return parts[0], parts[2]
    return None


# ---- the routes -----------------------------------------------------------------------------------------------------------------
def early_refusal(get_classifier: Callable[[], Classifier]) -> Callable[[dict], bytes | None]:
    """For service/http_refusal.py: a scope → the whole 429 its route would answer when the door would refuse it now,
    counted as the route's RequestScope counts a refusal; None for anything the route should see (not an inference
    POST, API keys configured, a replica not accepting, a malformed timeout header, or admitted)."""

    def refuse(scope: dict) -> bytes | None:
        path = scope["path"]
        v2_target = v2_infer_path(path) if path.startswith("/v2/") else None
        if scope["method"] != "POST" or (path != "/classify" and path != "/classify/base64" and v2_target is None):
            return None
        try:
            clf = get_classifier()
            if clf.settings.api_keys:  # authentication first: an unauthenticated client must get its 401
                return None
            clf.check_accepting()
            timeout = client_timeout_s(dict(scope["headers"]))
        except ServiceError:
            return None  # the route answers these, with their own body handling
        protocol = JSON_API if v2_target is None else V2_HTTP
        refusal = clf.admission.would_refuse(protocol, client_timeout_s=timeout)
        if refusal is None:
            return None
        metrics.record_outcome(protocol, refusal, 0.0)
        status, body, headers = error_answer(refusal, protocol)
        return raw_response(status, HTTPStatus(status).phrase, body, headers)

    return refuse


class InferenceRoutes:
    """Every HTTP inference request, start to answer; anything else goes on to ``app`` (BentoML's stack)."""

    def __init__(self, app: ASGIApp, get_classifier: Callable[[], Classifier]):
        self.app, self.get_classifier = app, get_classifier
        self._model: kserve_v2.Model | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        v2_target = v2_infer_path(path) if path.startswith("/v2/") else None
        if path != "/classify" and path != "/classify/base64" and v2_target is None:
            if path == "/metrics":
                metrics.TALLY.flush()  # what this process counted so far, before BentoML reads the files
            return await self.app(scope, receive, send)
        protocol = JSON_API if v2_target is None else V2_HTTP
        if scope["method"] != "POST":
            status, body, extra = error_answer(MethodNotAllowed(f"{scope['method']} {path}: this route takes POST"), protocol)
            return await send_response(send, status, body, headers={**extra, "Allow": "POST"})
        clf = self.get_classifier()
        headers = dict(scope["headers"])  # ASGI servers give header names lower-cased
        t0 = time.perf_counter()
        status, body, content_type, extra = 500, b"", b"application/json", None
        raw = None
        try:
            with RequestScope(clf, protocol, lambda: client_timeout_s(headers)) as request:
                raw = await read_body(receive, clf.settings.body_grace_s, clf.settings.body_min_rate)
                if v2_target is None:
                    result = await self._classify(clf, scope, headers, raw, request.ticket)
                    status, body, extra = 200, classify_body(clf, result), timing_headers(result, time.perf_counter() - t0)
                else:
                    status, body, content_type, extra = await self._v2_infer(clf, v2_target, headers, raw, request.ticket)
                request.answered = True
        except ClientDisconnected:
            return  # counted (as 499) by the scope; nobody is listening
        except ServiceError as exc:
            status, body, extra = error_answer(exc, protocol)
            if raw is None and extra.get("Connection") == "close" and not isinstance(exc, RequestTimeout):
                # a draining replica reads the body first: closing on unread bytes resets the connection
                await drain_body(receive)
        await send_response(send, status, body, content_type, extra)

    async def _classify(self, clf: Classifier, scope: Scope, headers: dict[bytes, bytes], raw: bytes, ticket) -> Classification:
        content_type = headers.get(b"content-type", b"")
        form_top_k = None
        if content_type.startswith(b"multipart/form-data"):
            images, form_top_k = multipart_images(raw, content_type)
        elif scope["path"] == "/classify/base64":
            images, form_top_k = base64_images(raw)
        elif content_type.startswith(b"image/") or (content_type == b"application/octet-stream" and raw):
            images = [raw]
        elif not raw:
            raise EmptyRequest("no images in the request (multipart field 'images', or one image as the whole body)")
        else:
            raise UnsupportedImage(
                f"Content-Type {content_type.decode('latin-1')!r}: send multipart/form-data, or one image as the whole "
                "body with its image/* type", index=0,
            )
        query = query_top_k(scope)
        top_k = parse_top_k(query if query is not None else form_top_k)
        return await clf.classify(images, top_k, protocol=JSON_API, ticket=ticket)

    async def _v2_infer(self, clf: Classifier, target: tuple[str, str], headers: dict[bytes, bytes], raw: bytes, ticket):
        if self._model is None or self._model.clf is not clf:
            self._model = kserve_v2.Model(clf)
        model = self._model
        model.check(*target)
        length = headers.get(V2_HEADER_LENGTH)
        inputs, outputs, binary_default, request_id = parse_request(raw, None if length is None else length.decode("latin-1"))
        tensors, result = await kserve_v2.infer(model, inputs, outputs, V2_HTTP, ticket=ticket)
        body, content_type, extra = render_response(model, tensors, outputs, binary_default, request_id, kserve_v2.response_parameters(result))
        return 200, body, content_type, extra

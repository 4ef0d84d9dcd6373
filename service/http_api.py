"""Our JSON API over HTTP: multipart and base64-JSON `POST /classify`, `GET /info`, OpenAPI — rendering only.

All the work happens in :class:`service.classifier.Classifier`; errors are rendered from ``service.errors``' table.
The app also carries the KServe v2 routes (``service.v2_http_api``) and is mounted into the BentoML service at "/",
where BentoML keeps /metrics, /livez and /readyz.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable
from typing import Annotated

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.classifier import Classification, Classifier
from service.errors import (
    STATUS_BY_TYPE,
    EmptyRequest,
    InvalidParameter,
    PayloadTooLarge,
    ServiceError,
    ShuttingDown,
    UnsupportedImage,
    error_body,
    error_headers,
    from_framework,
    http_status,
)
from service.topk import Prediction

PROTOCOL = "http"


class Prediction(BaseModel):
    label: str
    index: int = Field(description="logit index of the label")
    score: float = Field(description="calibrated softmax probability")


class ImageResult(BaseModel):
    top1: Prediction
    top5: list[Prediction] = Field(description="the top_k best predictions (5 unless top_k says otherwise)")


class ClassifyResponse(BaseModel):
    model: str
    version: str
    predictions: list[ImageResult] = Field(description="one entry per image, in request order")


class ErrorDetail(BaseModel):
    type: str
    message: str
    index: int | None = Field(description="the offending image's position in the request, where one is at fault")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Base64Request(BaseModel):
    images: list[str] = Field(description="base64-encoded image files (JPEG, PNG, WebP, …)")
    top_k: int | None = Field(None, description="predictions per image (default 5)")


_ERROR_RESPONSES = {
    status: {"model": ErrorResponse, "description": ", ".join(sorted(e.type for e, s in STATUS_BY_TYPE.items() if s == status))}
    for status in sorted(set(STATUS_BY_TYPE.values()))
}


def error_response(exc: BaseException, body=error_body) -> JSONResponse:
    """The one way an HTTP front-end answers an error: status and headers from the error table."""
    headers = error_headers(exc)
    if isinstance(exc, ShuttingDown):
        headers["Connection"] = "close"  # reconnect (to another replica), don't reuse this one
    return JSONResponse(body(exc), status_code=http_status(exc), headers=headers)


class BodyLimit:
    """Refuse bodies over ``max_bytes`` before reading them (Content-Length) or while streaming (chunked).

    BentoML and uvicorn set no body limit of their own, so without this a client could make us buffer anything.
    """

    def __init__(self, app: ASGIApp, max_bytes: Callable[[], int], protocol_of: Callable[[str], str]):
        self.app = app
        self.max_bytes = max_bytes
        self.protocol_of = protocol_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_bytes()
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            exc = PayloadTooLarge(f"request body is {int(declared)} bytes; the limit is {limit}")
            metrics.record_outcome(self.protocol_of(scope["path"]), exc, 0.0)
            return await error_response(exc)(scope, receive, send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            return message

        await self.app(scope, counted, send)


def render(p: Prediction) -> dict:
    return {"label": p.label, "index": p.index, "score": p.score}


def timing_headers(result: Classification, total_s: float) -> dict[str, str]:
    h = {f"X-Vitserve-{k.capitalize()}-Ms": f"{v:.2f}" for k, v in result.timings_ms.items()}
    h["X-Vitserve-Total-Ms"] = f"{total_s * 1000:.2f}"
    h["X-Vitserve-Batch-Size"] = str(result.batch_size)
    h["X-Vitserve-Batch-Id"] = ",".join(map(str, result.batch_ids))  # which engine batch served each image
    return h


def create_app(get_classifier: Callable[[], Classifier]) -> FastAPI:
    app = FastAPI(
        title="vitserve",
        description="Image classification with a fine-tuned ViT: top-1/top-5 labels and calibrated probabilities.",
        version="1",
        docs_url="/docs",
        redoc_url=None,
    )

    async def respond(images_source, top_k: int | None) -> JSONResponse:
        start = time.perf_counter()
        clf = get_classifier()
        with metrics.accounted(PROTOCOL) as outcome:
            try:
                images = await images_source(clf)
                result = await clf.classify(images, top_k, protocol=PROTOCOL)
            except ServiceError as exc:
                outcome.fail(exc)
                return error_response(exc)
        m = clf.manifest.model
        body = {
            "model": m.name,
            "version": m.version,
            "predictions": [{"top1": render(top[0]), "top5": [render(p) for p in top]} for top in result.top],
        }
        return JSONResponse(body, headers=timing_headers(result, time.perf_counter() - start))

    @app.post(
        "/classify",
        response_model=ClassifyResponse,
        responses=_ERROR_RESPONSES,
        summary="Classify images sent as multipart parts named `images`",
    )
    async def classify_multipart(
        images: Annotated[list[UploadFile], File(description="one or more image files")] = [],  # noqa: B006
        top_k: Annotated[int | None, Query(description="predictions per image (default 5)")] = None,
        top_k_form: Annotated[int | None, Form(alias="top_k", description="top_k as a form field instead")] = None,
    ) -> JSONResponse:
        async def read(clf: Classifier) -> list[bytes]:
            clf.check_request(len(images), top_k if top_k is not None else top_k_form)
            return [await f.read() for f in images]

        return await respond(read, top_k if top_k is not None else top_k_form)

    @app.post(
        "/classify/base64",
        response_model=ClassifyResponse,
        responses=_ERROR_RESPONSES,
        summary="Classify base64-encoded images sent as JSON",
    )
    async def classify_base64(request: Base64Request) -> JSONResponse:
        async def decode(clf: Classifier) -> list[bytes]:
            clf.check_request(len(request.images), request.top_k)
            out = []
            for i, s in enumerate(request.images):
                try:
                    out.append(base64.b64decode(s, validate=True))
                except (binascii.Error, ValueError):
                    raise UnsupportedImage(f"image {i} is not valid base64", index=i) from None
            return out

        return await respond(decode, request.top_k)

    @app.get("/info", summary="The model, its labels, preprocessing, engine and limits")
    async def info() -> dict:
        clf = get_classifier()
        m = clf.manifest
        s = clf.settings
        return {
            "model": m.model.model_dump(),
            "labels": m.labels,
            "temperature": m.temperature,
            "preprocessing": m.preprocessing.model_dump(),
            "engine": clf.engine.describe(),
            # Every engine tried, in order, with its startup-check figures on this machine (skipped ones too).
            "engine_selection": [a.summary() for a in clf.selection.attempts],
            "protocols": {
                "http": {"json": "/classify", "kserve_v2": "/v2"},
                "grpc": {"port": s.grpc_port or None, "service": "inference.GRPCInferenceService", "tls": s.grpc_tls_cert is not None},
                "api_keys": bool(s.api_keys),
            },
            "cpu_budget": clf.threads.describe(),
            "limits": {
                "max_batch_size": clf.max_batch_size,
                "max_batch_size_reason": clf.max_batch_reason,
                "max_images_per_request": s.max_images_per_request,
                "max_body_bytes": s.max_body_bytes,
                "max_image_pixels": s.max_image_pixels,
                "request_timeout_s": s.request_timeout_s,
            },
        }

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        # Raised outside respond(): the body limit tripping while FastAPI reads the form.
        return framework_answer(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def framework_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI turns any exception raised while reading a form into a bare 400; our body limit's
        # PayloadTooLarge travels as its __cause__ and keeps its own status.
        return framework_answer(request, from_framework(exc.status_code, str(exc.detail), exc.__cause__))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        err: ServiceError = InvalidParameter(f"{where or 'request'}: {first.get('msg', 'invalid request')}")
        if first.get("type") == "json_invalid":
            err = InvalidParameter(f"request body is not valid JSON: {first.get('msg', '')}")
        if where.startswith("images") and first.get("type") == "missing":
            err = EmptyRequest("no images in the request (multipart field 'images')")
        return framework_answer(request, err)

    return app


def protocol_of(path: str) -> str:
    """Which protocol an HTTP path belongs to, for the metrics' protocol label."""
    return "v2-http" if path == "/v2" or path.startswith("/v2/") else PROTOCOL


def framework_answer(request: Request, exc: ServiceError) -> JSONResponse:
    """An error the framework raised before a handler ran, counted and rendered in the shape of the path's protocol."""
    from service.errors import v2_error_body

    protocol = protocol_of(request.url.path)
    metrics.record_outcome(protocol, exc, 0.0)
    return error_response(exc, v2_error_body if protocol == "v2-http" else error_body)

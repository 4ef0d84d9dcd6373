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

from service import metrics, topk
from service.classifier import Classification, Classifier
from service.errors import STATUS_BY_TYPE, EmptyRequest, InvalidParameter, ServiceError, UnsupportedImage, from_framework
from service.http_errors import JSON_API, error_response, protocol_of
from service.http_guard import TICKET

PROTOCOL = JSON_API


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


def render(p: topk.Prediction) -> dict:
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
        # Swagger UI and ReDoc load their scripts from a CDN: blank pages on an offline machine or a locked-down
        # cluster. The OpenAPI document itself is served (/openapi.json); point any OpenAPI viewer at it.
        docs_url=None,
        redoc_url=None,
    )

    add_classify_routes(app, get_classifier)

    @app.get("/info", summary="The model, its labels, preprocessing, engine and limits")
    async def info() -> dict:
        return describe(get_classifier())

    add_error_handlers(app)
    return app


def add_classify_routes(app: FastAPI, get_classifier: Callable[[], Classifier]) -> None:
    """`POST /classify` (multipart) and `/classify/base64` (JSON): two ways in, one `respond`."""

    async def respond(request: Request, images_source, top_k: int | None) -> JSONResponse:
        start = time.perf_counter()
        clf = get_classifier()
        ticket = getattr(request.state, TICKET, None)
        with metrics.accounted(PROTOCOL) as outcome:
            try:
                images = await images_source(clf, ticket)
                result = await clf.classify(images, top_k, protocol=PROTOCOL, ticket=ticket)
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
        request: Request,
        images: Annotated[list[UploadFile], File(description="one or more image files")] = [],  # noqa: B006
        top_k: Annotated[int | None, Query(description="predictions per image (default 5)")] = None,
        top_k_form: Annotated[int | None, Form(alias="top_k", description="top_k as a form field instead")] = None,
    ) -> JSONResponse:
        async def read(clf: Classifier, ticket) -> list[bytes]:
            clf.check_request(len(images), top_k if top_k is not None else top_k_form, ticket)
            return [await f.read() for f in images]

        return await respond(request, read, top_k if top_k is not None else top_k_form)

    @app.post(
        "/classify/base64",
        response_model=ClassifyResponse,
        responses=_ERROR_RESPONSES,
        summary="Classify base64-encoded images sent as JSON",
    )
    async def classify_base64(request: Request, body: Base64Request) -> JSONResponse:
        async def decode(clf: Classifier, ticket) -> list[bytes]:
            clf.check_request(len(body.images), body.top_k, ticket)
            out = []
            for i, s in enumerate(body.images):
                try:
                    out.append(base64.b64decode(s, validate=True))
                except (binascii.Error, ValueError):
                    raise UnsupportedImage(f"image {i} is not valid base64", index=i) from None
            return out

        return await respond(request, decode, body.top_k)


def describe(clf: Classifier) -> dict:
    """`GET /info`: the model, its labels, preprocessing, engine and limits."""
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
        "admission": clf.admission.describe(),
        "limits": {
            "max_batch_size": clf.max_batch_size,
            "max_batch_size_reason": clf.max_batch_reason,
            "max_images_per_request": s.max_images_per_request,
            "max_body_bytes": s.max_body_bytes,
            "max_image_pixels": s.max_image_pixels,
            "request_timeout_s": s.request_timeout_s,
        },
    }


def add_error_handlers(app: FastAPI) -> None:
    """Errors the framework raises before or around a handler, rendered from the same error table."""

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


def make_http_app(get_classifier: Callable[[], Classifier]) -> FastAPI:
    """Our JSON API and KServe v2 REST on one app, without BentoML. BentoML mounts it (service/app.py); the GPU check
    serves it under plain uvicorn where BentoML is absent. Either way it runs behind :func:`guard`."""
    from service.v2_http_api import create_router

    app = create_app(get_classifier)
    app.include_router(create_router(get_classifier))  # KServe v2 REST beside our JSON API, same port
    return app


def framework_answer(request: Request, exc: ServiceError) -> JSONResponse:
    """An error the framework raised before a handler ran, counted and rendered in the shape of the path's protocol."""
    protocol = protocol_of(request.url.path)
    metrics.record_outcome(protocol, exc, 0.0)
    return error_response(exc, protocol)

"""Our HTTP app beside the inference routes: `GET /info`, the KServe v2 metadata routes, and the OpenAPI document that
describes every route, the inference ones included.

The inference routes themselves (`POST /classify`, `/classify/base64`, `/v2/models/{name}/infer`) run in front of
BentoML's middleware stack (service/http_inference.py). This app is mounted into the BentoML service at "/", where
BentoML keeps /metrics, /livez and /readyz; errors are rendered from ``service.errors``' table.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import metrics
from service.classifier import Classifier
from service.errors import STATUS_BY_TYPE, InvalidParameter, ServiceError, from_framework
from service.grpc_native import transport as grpc_transport
from service.http_errors import error_response, protocol_of


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

    @app.get("/info", summary="The model, its labels, preprocessing, engine and limits")
    async def info() -> dict:
        return describe(get_classifier())

    add_error_handlers(app)
    app.openapi = lambda: app.openapi_schema or _with_inference_routes(app)
    return app


def _ref(model: type[BaseModel]) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _with_inference_routes(app: FastAPI) -> dict:
    """FastAPI's document for the routes it serves, plus the inference routes, which run outside it
    (service/http_inference.py) and are described here from the same response models."""
    spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for model in (ClassifyResponse, ErrorResponse, Base64Request):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    errors = {
        str(status): {"description": ", ".join(sorted(e.type for e, s in STATUS_BY_TYPE.items() if s == status)),
                      "content": {"application/json": {"schema": _ref(ErrorResponse)}}}
        for status in sorted(set(STATUS_BY_TYPE.values()))
    }
    ok = {"200": {"description": "the top_k best predictions per image, in request order",
                  "content": {"application/json": {"schema": _ref(ClassifyResponse)}}}}
    top_k = {"name": "top_k", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1},
             "description": "predictions per image (default 5)"}
    binary = {"type": "string", "format": "binary"}
    form = {"type": "object", "required": ["images"], "properties": {
        "images": {"type": "array", "items": binary, "description": "one or more image files"},
        "top_k": {"type": "integer", "description": "top_k as a form field instead of the query"}}}
    spec["paths"]["/classify"] = {"post": {
        "summary": "Classify images: multipart parts named `images`, or one image as the whole body",
        "parameters": [top_k],
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form}, "image/*": {"schema": binary}}},
        "responses": {**ok, **errors}}}
    spec["paths"]["/classify/base64"] = {"post": {
        "summary": "Classify base64-encoded images sent as JSON",
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(Base64Request)}}},
        "responses": {**ok, **errors}}}
    spec["paths"]["/v2/models/{model_name}/infer"] = {"post": {
        "summary": "KServe v2 inference: JSON tensors, or Triton's binary tensor extension "
                   "(Inference-Header-Content-Length); inputs 'image' (BYTES [N]) or 'pixel_values' (FP32 [N, 3, H, W])",
        "tags": ["KServe v2 / Open Inference Protocol"],
        "parameters": [{"name": "model_name", "in": "path", "required": True, "schema": {"type": "string"}}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}},
                                                      "application/octet-stream": {"schema": binary}}},
        "responses": {"200": {"description": "output tensors"},
                      **{k: {**v, "content": {"application/json": {"schema": {"type": "object", "properties": {"error": {"type": "string"}}}}}}
                         for k, v in errors.items()}}}}
    app.openapi_schema = spec
    return spec


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
        # Each engine file's export gate against the FP32 model (the manifest's parity record), for the model card.
        "gate": [{"file": e.file, "precision": e.precision, "device": e.device, **gate_figures(e.parity)} for e in m.engines],
        "evaluation": m.evaluation.model_dump() if m.evaluation is not None else None,
        "protocols": {
            "http": {"json": "/classify", "kserve_v2": "/v2"},
            "grpc": {"port": s.grpc_port or None, "service": "inference.GRPCInferenceService", "tls": s.grpc_tls_cert is not None,
                     "transport": grpc_transport(s) if s.grpc_port else None},
            "api_keys": bool(s.api_keys),
        },
        "cpu_budget": clf.threads.describe(),
        "admission": clf.admission.describe(),
        "engine_health": {**clf.engine_health.describe(), "watchdog_s": clf.watchdog_s},
        "limits": {
            "max_batch_size": clf.max_batch_size,
            "max_batch_size_reason": clf.max_batch_reason,
            "max_images_per_request": s.max_images_per_request,
            "max_body_bytes": s.max_body_bytes,
            "max_image_pixels": s.max_image_pixels,
            "request_timeout_s": s.request_timeout_s,
        },
    }


def gate_figures(parity) -> dict:
    if parity is None:
        return {"passed": None}
    return {"passed": parity.passed, "images": parity.images, "top1_agreement": parity.top1_agreement,
            "top1_agreement_ci95_low": parity.top1_agreement_ci95[0] if parity.top1_agreement_ci95 else None,
            "max_abs_logit_diff": parity.max_abs_logit_diff}


def add_error_handlers(app: FastAPI) -> None:
    """Errors the framework raises before or around a handler, rendered from the same error table."""

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        # The body limit (service/http_guard.py) tripping on a route that reads a body.
        return framework_answer(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def framework_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI turns an exception raised while reading a body into a bare 400; our body limit's
        # PayloadTooLarge travels as its __cause__ and keeps its own status.
        return framework_answer(request, from_framework(exc.status_code, str(exc.detail), exc.__cause__))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        err: ServiceError = InvalidParameter(f"{where or 'request'}: {first.get('msg', 'invalid request')}")
        if first.get("type") == "json_invalid":
            err = InvalidParameter(f"request body is not valid JSON: {first.get('msg', '')}")
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

"""KServe v2 / Open Inference Protocol over HTTP, on the HTTP port beside our JSON API — parsing and rendering only.

    GET  /v2                                            server metadata (name, version, extensions)
    GET  /v2/health/live, /v2/health/ready              200, or 400 when not (the spec's 4xx)
    GET  /v2/models/{name}[/versions/{v}]               model metadata: tensors, dtypes, shapes, parameters
    GET  /v2/models/{name}[/versions/{v}]/ready         200 / 400
    GET  /v2/models/{name}[/versions/{v}]/config        Triton's model configuration (tritonclient, perf_analyzer)
    POST /v2/models/{name}[/versions/{v}]/infer         JSON tensors, and Triton's binary tensor data extension (the
                                                        route is service/http_inference.py; parsing and rendering here)

Binary extension: ``Inference-Header-Content-Length`` gives the JSON header's length and the binary tensors follow
it in input order, each input saying how many bytes are its own (``parameters.binary_data_size``); outputs come back
binary when asked (``binary_data`` per output, ``binary_data_output`` per request). ``Inference-Header-Content-Length:
0`` is a raw binary request: the whole body is one image. JSON BYTES elements are base64 strings.
Errors are ``{"error": "<message>"}`` with the status from service.errors' table.
"""

from __future__ import annotations

from collections.abc import Callable

import orjson
from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from service import kserve_v2
from service.classifier import Classifier
from service.errors import InvalidParameter, MalformedRequest, ServiceError
from service.http_errors import V2_HTTP, error_response

PROTOCOL = V2_HTTP


def _field(obj: dict, key: str, kind: type, what: str, default):
    value = obj.get(key)
    value = default if value is None else value
    if not isinstance(value, kind):
        raise InvalidParameter(f"{what}: '{key}' must be a JSON {dict(list='array', dict='object', str='string').get(kind.__name__, kind.__name__)}")
    return value


def parse_request(body: bytes, header_length: str | None) -> tuple[list[kserve_v2.Tensor], list[kserve_v2.RequestedOutput], bool, str | None]:
    """(inputs, requested outputs, outputs binary by default, request id) from a v2 HTTP body."""
    if header_length == "0":  # raw binary request: the body is one image
        return [kserve_v2.Tensor(kserve_v2.IMAGE_INPUT, "BYTES", [1], [body])], [], True, None
    if header_length is not None:
        # ASCII digits only: str.isdigit() is also true of "³86", which int() rejects (found by `vitserve bench fuzz`).
        if not (header_length.isascii() and header_length.isdigit()) or int(header_length) > len(body):
            raise MalformedRequest(f"Inference-Header-Content-Length {header_length!r} does not fit a {len(body)}-byte body")
        head, binary = body[: int(header_length)], memoryview(body)[int(header_length) :]
    else:
        head, binary = body, memoryview(b"")
    try:
        request = orjson.loads(head)
    except orjson.JSONDecodeError as e:  # invalid UTF-8 included
        raise MalformedRequest(f"the inference request is not valid JSON: {e}") from None
    if not isinstance(request, dict):
        raise MalformedRequest("the inference request must be a JSON object")
    inputs, offset = [], 0
    for i, spec in enumerate(_field(request, "inputs", list, "request", [])):
        what = f"input {i}"
        if not isinstance(spec, dict):
            raise InvalidParameter(f"{what} must be an object")
        name, datatype = _field(spec, "name", str, what, ""), _field(spec, "datatype", str, what, "")
        shape = _field(spec, "shape", list, what, [])
        if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise InvalidParameter(f"input '{name}': shape must be a list of integers, got {shape}")
        size = _field(spec, "parameters", dict, what, {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidParameter(f"input '{name}': binary_data_size {size} does not fit the {len(binary) - offset} binary bytes left")
            inputs.append(kserve_v2.tensor_from_raw(name, datatype, shape, bytes(binary[offset : offset + size])))
            offset += size
        else:
            inputs.append(kserve_v2.tensor_from_values(name, datatype, shape, _flatten(_field(spec, "data", list, f"input '{name}'", []))))
    if offset != len(binary):
        raise InvalidParameter(f"{len(binary) - offset} binary bytes after the inputs that no input claims")
    outputs = []
    for spec in _field(request, "outputs", list, "request", []):
        params = (spec.get("parameters") or {}) if isinstance(spec, dict) else {}
        k = params.get("classification")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool)):
            raise InvalidParameter(f"classification must be an integer, got {k!r}")
        outputs.append(kserve_v2.RequestedOutput(str(spec.get("name", "")) if isinstance(spec, dict) else "", k, params.get("binary_data")))
    binary_default = bool(_field(request, "parameters", dict, "request", {}).get("binary_data_output", False))
    return inputs, outputs, binary_default, request.get("id")


def _flatten(values: list) -> list:
    """JSON tensor data may be nested row-major lists; the protocol allows either form."""
    out: list = []
    stack = [iter(values)]
    while stack:
        for v in stack[-1]:
            if isinstance(v, list):
                stack.append(iter(v))
                break
            out.append(v)
        else:
            stack.pop()
    return out


def render_response(model: kserve_v2.Model, tensors: list[kserve_v2.Tensor], wanted: list[kserve_v2.RequestedOutput], binary_default: bool,
                    request_id, parameters: dict) -> tuple[bytes, bytes, dict[str, str] | None]:
    """(body, content type, extra headers) of an inference response: JSON, or JSON + binary tensors."""
    binary_of = {o.name: o.binary for o in wanted}
    outputs, chunks = [], []
    for t in tensors:
        entry = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        binary = binary_of.get(t.name)
        if binary if binary is not None else binary_default:
            chunk = kserve_v2.raw(t)
            entry["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            entry["data"] = [s.decode() for s in t.data] if t.datatype == "BYTES" else t.data.reshape(-1).tolist()
        outputs.append(entry)
    body = {"model_name": model.name, "model_version": model.version, "parameters": parameters, "outputs": outputs}
    if request_id is not None:
        body["id"] = request_id
    head = orjson.dumps(body)
    if not chunks:
        return head, b"application/json", None
    return head + b"".join(chunks), b"application/octet-stream", {"Inference-Header-Content-Length": str(len(head))}


def create_router(get_classifier: Callable[[], Classifier]) -> APIRouter:
    router = APIRouter(tags=["KServe v2 / Open Inference Protocol"])
    models: dict[int, kserve_v2.Model] = {}

    def model() -> kserve_v2.Model:
        clf = get_classifier()
        return models.setdefault(id(clf), kserve_v2.Model(clf))

    def v2_error(exc: ServiceError) -> JSONResponse:
        return error_response(exc, PROTOCOL)

    @router.get("/v2", summary="Server metadata")
    async def server_metadata() -> dict:
        from service import __version__

        return {"name": "vitserve", "version": __version__, "extensions": list(kserve_v2.EXTENSIONS)}

    @router.get("/v2/health/live", summary="200 while the process runs")
    async def live() -> Response:
        return Response(status_code=200)

    @router.get("/v2/health/ready", summary="200 once warmed up, 400 while loading or draining")
    async def ready() -> Response:
        return Response(status_code=200 if get_classifier().ready else 400)

    def answer(model_name: str, model_version: str, respond: Callable[[kserve_v2.Model], Response]) -> Response:
        m = model()
        try:
            m.check(model_name, model_version)
        except ServiceError as exc:
            return v2_error(exc)
        return respond(m)

    async def model_metadata(model_name: str, model_version: str = "") -> Response:
        return answer(model_name, model_version, lambda m: JSONResponse({**m.metadata(), "parameters": m.parameters}))

    async def model_ready(model_name: str, model_version: str = "") -> Response:
        return answer(model_name, model_version, lambda m: Response(status_code=200 if m.clf.ready else 400))

    async def model_config(model_name: str, model_version: str = "") -> Response:
        return answer(model_name, model_version, lambda m: JSONResponse(m.config()))

    for prefix in ("/v2/models/{model_name}", "/v2/models/{model_name}/versions/{model_version}"):
        router.add_api_route(prefix, model_metadata, methods=["GET"], summary="Model metadata")
        router.add_api_route(f"{prefix}/ready", model_ready, methods=["GET"], summary="Model readiness")
        router.add_api_route(f"{prefix}/config", model_config, methods=["GET"], summary="Model configuration (Triton)")
    return router


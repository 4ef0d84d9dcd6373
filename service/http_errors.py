"""The one way an HTTP front-end answers an error: status and headers from ``service.errors``' table, the body in
the shape of the request's protocol (our JSON API's, or KServe v2's ``{"error": "..."}``)."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from service.errors import RequestTimeout, ShuttingDown, error_body, error_headers, http_status, v2_error_body
from service.metrics import JSON_API, V2_HTTP  # the protocol label's values: the routes take them from here


def protocol_of(path: str) -> str:
    """Which protocol an HTTP path belongs to, for the metrics' protocol label."""
    return V2_HTTP if path == "/v2" or path.startswith("/v2/") else JSON_API


def error_parts(exc: BaseException, protocol: str = JSON_API) -> tuple[int, dict, dict[str, str]]:
    """Status, body and headers of an error: status and headers from the error table, the body in the shape of the
    request's protocol (ours or KServe v2's)."""
    body = v2_error_body if protocol == V2_HTTP else error_body
    headers = error_headers(exc)
    if isinstance(exc, ShuttingDown):
        headers["Connection"] = "close"  # reconnect (to another replica), don't reuse this one
    elif isinstance(exc, RequestTimeout):
        headers["Connection"] = "close"  # the rest of a slow body is never read
    return http_status(exc), body(exc), headers


def error_response(exc: BaseException, protocol: str = JSON_API) -> JSONResponse:
    """The one way an HTTP front-end answers an error (as a Starlette response; service/http_inference.py sends the
    same parts as raw ASGI messages)."""
    status, body, headers = error_parts(exc, protocol)
    return JSONResponse(body, status_code=status, headers=headers)

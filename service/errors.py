"""Every error a client can cause or see, and the one table that maps each to its HTTP status and gRPC code.

Stages raise these; every front-end (our JSON API, KServe v2 over HTTP, gRPC) renders them through the functions
below, so the status for a failure is decided here and nowhere else, the same way for every protocol. Anything that
is not a ``ServiceError`` is a bug and becomes 500 / INTERNAL with an opaque message; no client mistake does.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base: ``type`` is the machine-readable name clients switch on; ``index`` names the image at fault."""

    type = "internal"

    def __init__(self, message: str, *, index: int | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.message = message
        self.index = index
        self.retry_after_s = retry_after_s


class EmptyRequest(ServiceError):
    type = "empty_request"


class Unauthenticated(ServiceError):
    """No API key, or not one of the configured ones (checked before any image byte is read)."""

    type = "unauthenticated"


class InvalidParameter(ServiceError):
    type = "invalid_parameter"


class MalformedRequest(ServiceError):
    """The body could not be parsed at all (e.g. broken multipart framing)."""

    type = "malformed_request"


class NotFound(ServiceError):
    type = "not_found"


class MethodNotAllowed(ServiceError):
    type = "method_not_allowed"


class UnsupportedImage(ServiceError):
    """Not an image at all, or a format we do not decode."""

    type = "unsupported_image"


class InvalidImage(ServiceError):
    """Recognised as an image but corrupt or truncated."""

    type = "invalid_image"


class ImageTooLarge(ServiceError):
    """More pixels than the limit: decompression-bomb guard."""

    type = "image_too_large"


class PayloadTooLarge(ServiceError):
    type = "payload_too_large"


class TooManyImages(ServiceError):
    type = "too_many_images"


class Overloaded(ServiceError):
    """Refused before the work starts: admission predicted the request would miss its latency bound or its deadline
    (most 429s, service/admission.py), or the batch queue is full (service/batcher.py). The client should retry after
    ``retry_after_s`` (``drain_seconds``)."""

    type = "overloaded"


def drain_seconds(images_ahead: float, images_per_s: float) -> float:
    """Retry-After of an overload refusal: seconds until ``images_ahead`` drain at the measured rate, at least 1
    (HTTP's unit). One estimate for the door and the queue, so a client hears the same rule from both."""
    return max(1.0, images_ahead / images_per_s)


class RequestTimeout(ServiceError):
    """The client sent its request headers or body too slowly (a header deadline, a minimum body rate): answered 408
    and the connection closed, as nginx's client_header_timeout / client_body_timeout and Apache's mod_reqtimeout do."""

    type = "request_timeout"


class NotReady(ServiceError):
    type = "not_ready"


class ShuttingDown(ServiceError):
    type = "shutting_down"


class DeadlineExceeded(ServiceError):
    type = "deadline_exceeded"


class EngineFailure(ServiceError):
    """The engine call computing this request's batch raised, or did not return within the watchdog's limit."""

    type = "engine_failure"


class EngineStalled(ServiceError):
    """An engine call has outlived the watchdog and has not returned yet: this replica computes nothing until it does."""

    type = "engine_stalled"


# The single error table: HTTP status and gRPC code side by side. Client mistakes are all 4xx / INVALID_ARGUMENT-like;
# 5xx / UNAVAILABLE / INTERNAL mean us or our capacity. (gRPC codes as names: this module never imports grpc.)
ERROR_TABLE: dict[type[ServiceError], tuple[int, str]] = {
    EmptyRequest: (400, "INVALID_ARGUMENT"),
    MalformedRequest: (400, "INVALID_ARGUMENT"),
    Unauthenticated: (401, "UNAUTHENTICATED"),
    NotFound: (404, "NOT_FOUND"),
    MethodNotAllowed: (405, "UNIMPLEMENTED"),
    RequestTimeout: (408, "DEADLINE_EXCEEDED"),
    PayloadTooLarge: (413, "RESOURCE_EXHAUSTED"),  # what gRPC itself answers for a message over its limit
    TooManyImages: (413, "INVALID_ARGUMENT"),
    UnsupportedImage: (415, "INVALID_ARGUMENT"),
    InvalidImage: (422, "INVALID_ARGUMENT"),
    ImageTooLarge: (422, "INVALID_ARGUMENT"),
    InvalidParameter: (422, "INVALID_ARGUMENT"),
    Overloaded: (429, "RESOURCE_EXHAUSTED"),
    EngineFailure: (500, "INTERNAL"),
    NotReady: (503, "UNAVAILABLE"),
    EngineStalled: (503, "UNAVAILABLE"),
    ShuttingDown: (503, "UNAVAILABLE"),
    DeadlineExceeded: (504, "DEADLINE_EXCEEDED"),
}
STATUS_BY_TYPE: dict[type[ServiceError], int] = {cls: http for cls, (http, _) in ERROR_TABLE.items()}


def from_framework(status: int, detail: str, cause: BaseException | None = None) -> ServiceError:
    """An HTTP error raised by the web framework itself (routing, body parsing) → our error type."""
    if isinstance(cause, ServiceError):  # ours, wrapped by the framework while it read the body
        return cause
    return {404: NotFound, 405: MethodNotAllowed}.get(status, MalformedRequest)(detail)


def http_status(exc: BaseException) -> int:
    return ERROR_TABLE.get(type(exc), (500, "INTERNAL"))[0] if isinstance(exc, ServiceError) else 500


def grpc_code(exc: BaseException) -> str:
    """The grpc.StatusCode name for ``exc``."""
    return ERROR_TABLE.get(type(exc), (500, "INTERNAL"))[1] if isinstance(exc, ServiceError) else "INTERNAL"


def error_message(exc: BaseException) -> str:
    return exc.message if isinstance(exc, ServiceError) else "internal error"


def error_body(exc: BaseException) -> dict:
    if not isinstance(exc, ServiceError):
        return {"error": {"type": "internal", "message": "internal error", "index": None}}
    return {"error": {"type": exc.type, "message": exc.message, "index": exc.index}}


def v2_error_body(exc: BaseException) -> dict:
    """KServe v2's error object: ``{"error": "<message>"}``."""
    return {"error": error_message(exc)}


def error_headers(exc: BaseException) -> dict[str, str]:
    if isinstance(exc, ServiceError) and exc.retry_after_s is not None:
        return {"Retry-After": str(max(1, round(exc.retry_after_s)))}
    if isinstance(exc, Unauthenticated):
        return {"WWW-Authenticate": "Bearer"}
    return {}

"""Every error a client can cause or see, and the one table that maps them to HTTP statuses.

Stages raise these; only :func:`http_status` and :func:`error_body` turn them into a response, so the
status for a failure is decided here and nowhere else. Anything that is not a ``ServiceError`` is a bug
and becomes a 500 with an opaque message.
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
    """The batch queue is full; the client should retry after ``retry_after_s``."""

    type = "overloaded"


class NotReady(ServiceError):
    type = "not_ready"


class ShuttingDown(ServiceError):
    type = "shutting_down"


class DeadlineExceeded(ServiceError):
    type = "deadline_exceeded"


class EngineFailure(ServiceError):
    type = "engine_failure"


# The single error → status table. Client mistakes are all 4xx; 5xx means us or our capacity.
STATUS_BY_TYPE: dict[type[ServiceError], int] = {
    EmptyRequest: 400,
    MalformedRequest: 400,
    NotFound: 404,
    MethodNotAllowed: 405,
    PayloadTooLarge: 413,
    TooManyImages: 413,
    UnsupportedImage: 415,
    InvalidImage: 422,
    ImageTooLarge: 422,
    InvalidParameter: 422,
    Overloaded: 429,
    EngineFailure: 500,
    NotReady: 503,
    ShuttingDown: 503,
    DeadlineExceeded: 504,
}


def from_framework(status: int, detail: str, cause: BaseException | None = None) -> ServiceError:
    """An HTTP error raised by the web framework itself (routing, body parsing) → our error type."""
    if isinstance(cause, ServiceError):  # ours, wrapped by the framework while it read the body
        return cause
    return {404: NotFound, 405: MethodNotAllowed}.get(status, MalformedRequest)(detail)


def http_status(exc: BaseException) -> int:
    return STATUS_BY_TYPE.get(type(exc), 500) if isinstance(exc, ServiceError) else 500


def error_body(exc: BaseException) -> dict:
    if not isinstance(exc, ServiceError):
        return {"error": {"type": "internal", "message": "internal error", "index": None}}
    return {"error": {"type": exc.type, "message": exc.message, "index": exc.index}}


def error_headers(exc: BaseException) -> dict[str, str]:
    if isinstance(exc, ServiceError) and exc.retry_after_s is not None:
        return {"Retry-After": str(max(1, round(exc.retry_after_s)))}
    return {}

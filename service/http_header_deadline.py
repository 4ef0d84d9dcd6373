"""A deadline on request headers, below ASGI: uvicorn calls an ASGI app only once a request's headers are complete, so
a client that trickles them (one byte every few seconds, as a slowloris attack or a broken client does) is invisible to
the app and would hold its connection forever. nginx (``client_header_timeout``) and Apache (``mod_reqtimeout``) bound
this; uvicorn has no such setting, so the service's HTTP protocol is uvicorn's own with a timer added: armed when a
connection opens and when a request's first byte arrives, disarmed when its headers are complete; when it fires, the
client gets the error table's 408 (``request_timeout``) and the connection closes.

Installed by replacing ``uvicorn.protocols.http.auto.AutoHTTPProtocol`` before uvicorn resolves ``http="auto"`` (BentoML
builds uvicorn's Config with the default and resolves it after importing the service). ``tests/test_slow_clients.py``
fails if that stops taking effect.
"""

from __future__ import annotations

import logging

import orjson

from service import metrics
from service.errors import RequestTimeout, error_body, http_status

log = logging.getLogger("vitserve.http")


def _response(exc: RequestTimeout) -> bytes:
    body = orjson.dumps(error_body(exc))
    return (f"HTTP/1.1 {http_status(exc)} Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


def protocol_with_header_deadline(base: type, timeout_s: float) -> type:
    """``base`` (uvicorn's HttpToolsProtocol) with the header deadline above."""

    class HeaderDeadlineProtocol(base):
        header_timeout_s = timeout_s

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._header_timer = None
            self._arm_header_timer()  # a connection that never sends a byte is cut off too

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm_header_timer()

        def on_headers_complete(self) -> None:
            self._disarm_header_timer()
            super().on_headers_complete()

        def connection_lost(self, exc) -> None:
            self._disarm_header_timer()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                return  # a request is being answered; the next one's headers have not started
            metrics.labelled(metrics.SLOW_CLIENTS, "headers").inc()
            self.transport.write(_response(RequestTimeout(
                f"the request headers did not arrive within {self.header_timeout_s:g} s (VITSERVE_HEADER_TIMEOUT_S)")))
            self.transport.close()

    HeaderDeadlineProtocol.__qualname__ = HeaderDeadlineProtocol.__name__ = f"HeaderDeadline{base.__name__}"
    return HeaderDeadlineProtocol


def install(timeout_s: float) -> bool:
    """Make uvicorn's ``http="auto"`` protocol vitserve's: the header deadline, and overload refused below ASGI
    (service/http_refusal.py); False (and a warning) where uvicorn runs without httptools, whose protocol this extends."""
    import uvicorn.protocols.http.auto as auto

    from service.http_refusal import protocol_with_early_refusal

    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        log.warning("httptools is not installed: no deadline on request headers (VITSERVE_HEADER_TIMEOUT_S is ignored)")
        return False
    auto.AutoHTTPProtocol = protocol_with_early_refusal(protocol_with_header_deadline(HttpToolsProtocol, timeout_s))
    return True

"""Overload refused below ASGI: when the door would refuse an inference request, uvicorn's protocol answers the 429
itself as soon as the request's headers are parsed, without building the request cycle's task, the middleware stack
and the route. Under overload most requests are refusals, and each one cost the event loop about what any request
costs before its body is used (docs/serving.md, "Overload"); this path skips most of it. The decision, the answer and
the counting are the route's own (``http_inference.early_refusal``: the door's rule, the error table, the metrics);
only where it runs moves. Anything it does not refuse (an admitted request, a draining or not-ready replica, API keys
configured, a malformed timeout header) goes through ASGI as before.

The rest of a refused request's body is read and dropped by uvicorn (its parser ignores body bytes once a response is
complete), so the connection stays open for the client's next request, as after any 429.
"""

from __future__ import annotations

from collections.abc import Callable

# Set by the host once its classifier exists (service/app.py's startup): scope → a whole HTTP/1.1 response, or None.
REFUSE: Callable[[dict], bytes | None] | None = None


def protocol_with_early_refusal(base: type) -> type:
    """``base`` (uvicorn's HttpToolsProtocol, with the header deadline) answering refusals before ASGI."""

    class EarlyRefusalProtocol(base):
        def _start_asgi_task(self, cycle, app) -> None:
            # uvicorn's one place where a parsed request (its scope complete, the body still arriving) becomes a task.
            refuse = REFUSE
            answer = refuse(cycle.scope) if refuse is not None else None
            if answer is None:
                return super()._start_asgi_task(cycle, app)
            # uvicorn's default headers (date, server) as every response of its own carries them
            self.transport.write(answer.replace(b"\r\n", b"\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in self.server_state.default_headers), 1))
            cycle.response_started = cycle.response_complete = True
            if not cycle.keep_alive:
                self.transport.close()
            else:
                cycle.on_response()  # keep-alive timer, resumed reading, the next pipelined request: as uvicorn does

    EarlyRefusalProtocol.__qualname__ = EarlyRefusalProtocol.__name__ = f"EarlyRefusal{base.__name__}"
    return EarlyRefusalProtocol


def raw_response(status: int, reason: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(body)}"]
    head += [f"{k.lower()}: {v}" for k, v in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body

"""Around every request, whatever its protocol: the replica accepts work (not loading, draining or stalled), the door
admits it (service/admission.py), it is counted and timed (service/metrics.py), and its admission is released when
it is answered. Front-ends (service/http_inference.py, service/grpc_api.py) only parse and render inside it; an
error that leaves the scope is counted as what it will be answered as, and the front-end renders it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from service import metrics


class RequestScope:
    """``with RequestScope(clf, protocol) as request:`` check → admit → account → release, for one request.
    ``request.ticket`` is its admission; set ``request.answered`` once it has a result. A plain class rather than a
    generator context manager: it runs for every request and every refusal, on the event loop."""

    __slots__ = ("clf", "protocol", "client_timeout_s", "ticket", "answered", "_t0")

    def __init__(self, clf, protocol: str, client_timeout_s: Callable[[], float | None] | None = None):
        self.clf, self.protocol, self.client_timeout_s = clf, protocol, client_timeout_s
        self.ticket = None
        self.answered = False

    def __enter__(self) -> "RequestScope":
        metrics.TALLY.inc(metrics.IN_FLIGHT)
        self._t0 = time.perf_counter()
        try:
            self.clf.check_accepting()
            # Read here, so a bad timeout header is counted like any other refusal.
            timeout = self.client_timeout_s() if self.client_timeout_s is not None else None
            self.ticket = self.clf.admission.admit(self.protocol, client_timeout_s=timeout)
        except BaseException as e:
            self._account(e)
            raise
        self.clf.in_flight += 1  # what a drain waits for: the whole request, body read included
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.clf.in_flight -= 1
        self.clf.admission.release(self.ticket, answered=self.answered)
        self._account(exc)
        if self.clf.in_flight == 0:
            metrics.TALLY.settle()  # idle: written before anyone could ask /metrics about these answers

    def _account(self, error: BaseException | None) -> None:
        """In-flight gauge, end-to-end latency, the answer by protocol and status (an error as what it is answered as)."""
        metrics.TALLY.inc(metrics.IN_FLIGHT, -1)
        metrics.record_outcome(self.protocol, error, time.perf_counter() - self._t0)

"""Around every request, whatever its protocol: the replica accepts work (not loading, draining or stalled), the door
admits it (service/admission.py), it is counted and timed (service/metrics.py), and its admission is released when
it is answered. Front-ends (service/http_inference.py, service/grpc_api.py) only parse and render inside it; an
error that leaves the scope is counted as what it will be answered as, and the front-end renders it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from service import metrics


class RequestScope:
    """One admitted request: its admission ticket, and whether it was answered with a result."""

    __slots__ = ("ticket", "answered")

    def __init__(self, ticket) -> None:
        self.ticket = ticket
        self.answered = False


@contextlib.contextmanager
def request_scope(clf, protocol: str, client_timeout_s: Callable[[], float | None] = lambda: None) -> Iterator[RequestScope]:
    """check → admit → account → release. ``client_timeout_s`` is read inside, so a bad timeout header is counted
    like any other refusal. ``clf.in_flight`` (what a drain waits for) covers the whole request, body included."""
    with metrics.accounted(protocol):
        clf.check_accepting()
        scope = RequestScope(clf.admission.admit(protocol, client_timeout_s=client_timeout_s()))
        clf.in_flight += 1
        try:
            yield scope
        finally:
            clf.in_flight -= 1
            clf.admission.release(scope.ticket, answered=scope.answered)

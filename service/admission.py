"""The door: one admission decision per request, before its body is read, shared by every front-end.

The work in the building is counted in images, every stage included: bodies being read (a request whose body is not
read yet counts as the mean images per request until it is), images decoding, queued, and in the engine; bodies still
being read count for at most one full batch, so slow uploads cannot hold the door shut. Two rules:

1. **A limit on that work, learned from latency** (AIMD, as TCP and Netflix's concurrency-limits do): a request is
   admitted while ``work + its images <= limit``. Each answer within 3/4 of the latency bound adds ``1/limit`` (one
   image per round of answers) while the limit is what holds requests back; an answer over the bound takes 10 % off,
   at most once per bound's length of time; answers in between change nothing. So the limit settles where answers
   take 3/4 to all of the bound: enough queued to fill batches, not more, and few answers over the bound. No model of the stages is needed:
   it holds whether the engine, decoding or HTTP parsing is the bottleneck.
   **The limit never falls below two full batches** (``2 × max_batch`` images): that much work is what a batching
   server needs in the building to keep its engine at its best batch while the next batch is decoded, so closed-loop
   clients up to twice the maximum batch are always all served. Without the floor the limit learned from a bound of
   3 × unloaded settled at 3-9 images on the demo model (best batch 32): most of a busy client pool was refused,
   and each refusal cost CPU that answers needed.
2. **The client's deadline** (``X-Vitserve-Timeout-Ms``, Envoy's ``x-envoy-expected-rq-timeout-ms``, or the gRPC
   deadline; capped by ``request_timeout_s``): refused at once if the predicted time to answer exceeds it, by
   Little's law from the measured answer rate: ``predicted = unloaded + (work ahead + its images - 1) / throughput``.

What the door cannot see is the wait *before* it: a request whose bytes sit in the event loop's queue behind others.
When the loop itself is the bottleneck (HTTP parsing of a small model's requests), that wait is the latency clients
see. So the door measures the loop's lag (how late a 10 ms timer fires) and counts a request's lag at admission as
part of its time to answer, in the limit's learning and in the predictions.

The latency bound is ``VITSERVE_MAX_LATENCY_MS``, or unset: max(3 × unloaded, unloaded + the time two full batches
take at the measured answer rate), where unloaded is measured on requests answered with nothing ahead of them: what
saturation itself costs (the floor's work, answered at the rate the service has shown), or a small multiple of the
unloaded latency where that is more. Until a rate is measured, the engine's own full-batch time stands in for it.
An empty service always admits, so the measurements never stop.

A refusal is ``Overloaded`` (429 / RESOURCE_EXHAUSTED) at once, with a Retry-After from the measured answer rate.
Nothing of a refused request is read, decoded or queued, so shedding costs a header parse; and nothing admitted is
expired later in the queue (a 504 now means a prediction was wrong).

Hand-written rather than a library: the adaptive-concurrency libraries (Netflix's concurrency-limits, Envoy's filter)
are not Python, and what is needed is small: counters on the event loop's thread, no locks.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

from service import metrics
from service.errors import Overloaded, drain_seconds

BUSY_WINDOW_S = 0.25  # busy time per throughput sample
SAMPLES_KEPT = 16  # throughput = the best of these (~4 s of busy time): what the service has shown it can do
EWMA = 0.2
BACKOFF = 0.9
# 3 × unloaded: on the demo model (2 cores) 8 requests in flight gave 97 % of saturation at a median of 2.6 × the
# unloaded latency; allowing less costs goodput, allowing more only adds waiting.
BOUND_OVER_UNLOADED = 3.0
GROW_BELOW = 0.75  # of the bound: the dead band between growing and backing off keeps most answers under the bound


@dataclass
class Ticket:
    """One admitted request: its share of the work in the building until it is answered."""

    images: float  # an estimate until settle()
    ahead: float  # images already in the building when it came in
    predicted_s: float
    deadline: float  # time.monotonic() by which it must be answered (the server's timeout or the client's, if sooner)
    limited: bool  # the limit was (nearly) what decided: only then does a fast answer raise it
    waited_s: float = 0.0  # the event loop's lag when it came in: its wait before the door
    admitted_at: float = field(default_factory=time.monotonic)
    settled: bool = False
    released: bool = False


class Admission:
    """Counters and estimates live on the event loop's thread: admit/settle/release are called from it only."""

    def __init__(self, *, unloaded_s: float, full_batch_s: float, max_batch: int, request_timeout_s: float,
                 max_latency_s: float | None):
        self.unloaded_s = unloaded_s  # a startup estimate (decode + a batch of one), replaced by measurements
        self.full_batch_s = full_batch_s
        self.request_timeout_s = request_timeout_s
        self.fixed_bound_s = max_latency_s
        self.max_batch = max_batch
        self.floor = 2.0 * max_batch  # what a batching engine needs in the building (see the module's docstring)
        self.work = 0.0  # images in the building, estimates included
        self.reading = 0.0  # of which: requests whose image count is not known yet
        self.requests = 0
        self.images_per_request = 1.0
        self._samples: collections.deque[float] = collections.deque(maxlen=SAMPLES_KEPT)
        self._busy_s = 0.0
        self._done_images = 0.0
        self._last = time.monotonic()
        self._last_backoff = 0.0
        self.loop_lag_s = 0.0  # how late the event loop runs ready callbacks now (watch_loop keeps it current)
        # A generous start (what the engine alone could answer within the bound, at least the floor), so the first
        # bursts queue; answers over the bound bring it down to the floor within a second of sustained overload.
        self.limit = max(self.floor, self.bound_s * max_batch / max(full_batch_s, 1e-6))

    # ---- the estimates --------------------------------------------------------------------------------------------
    @property
    def throughput(self) -> float | None:
        """Images/s the service has shown it answers while busy (None before the first busy window)."""
        return max(self._samples) if self._samples else None

    @property
    def bound_s(self) -> float:
        if self.fixed_bound_s is not None:
            return self.fixed_bound_s
        rate = self.throughput or self.max_batch / max(self.full_batch_s, 1e-6)
        return max(BOUND_OVER_UNLOADED * self.unloaded_s, self.unloaded_s + 2 * self.max_batch / rate)

    def predict(self, images: float) -> float:
        x = self.throughput
        return self.loop_lag_s + self.unloaded_s + ((self.work + max(0.0, images - 1)) / x if x else 0.0)

    def describe(self) -> dict:
        x = self.throughput
        return {
            "rule": "admit while work + images <= limit (AIMD on the latency bound) and the predicted time fits the client's deadline",
            "bound_ms": round(self.bound_s * 1000, 2),
            "bound_from": "VITSERVE_MAX_LATENCY_MS" if self.fixed_bound_s is not None else "max(3 x unloaded, unloaded + two full batches at the measured rate)",
            "limit_images": round(self.limit, 2), "limit_floor_images": self.floor, "work_in_flight_images": round(self.work, 1),
            "unloaded_ms": round(self.unloaded_s * 1000, 2), "full_batch_ms": round(self.full_batch_s * 1000, 2),
            "throughput_images_per_s": None if x is None else round(x, 1), "event_loop_lag_ms": round(self.loop_lag_s * 1000, 2),
        }

    # ---- the door -------------------------------------------------------------------------------------------------
    def admit(self, protocol: str, *, client_timeout_s: float | None = None) -> Ticket:
        """Admit or refuse (raises ``Overloaded``) a request whose body has not been read."""
        now = time.monotonic()
        self._account(now)
        budget = self.request_timeout_s if client_timeout_s is None else min(client_timeout_s, self.request_timeout_s)
        estimate = self.images_per_request
        predicted = self.predict(estimate)
        refusal = self._refusal(estimate, predicted, budget)
        if refusal is not None:
            metrics.TALLY.inc(metrics.labelled(metrics.ADMISSIONS, protocol, "refused"))
            raise refusal
        metrics.TALLY.inc(metrics.labelled(metrics.ADMISSIONS, protocol, "admitted"))
        metrics.TALLY.observe(metrics.ADMISSION_PREDICTED_SECONDS, predicted)
        ticket = Ticket(images=estimate, ahead=self.work, predicted_s=predicted, deadline=now + budget,
                        limited=self.work + 2 * estimate > self.limit, admitted_at=now, waited_s=self.loop_lag_s)
        self.work += estimate
        self.reading += estimate
        self.requests += 1
        return ticket

    def would_refuse(self, protocol: str, *, client_timeout_s: float | None = None) -> Overloaded | None:
        """The refusal ``admit`` would raise now, counted as admit counts it, or None (nothing taken: the request then
        goes through ``admit``). For a refusal below ASGI, before a request is built (service/http_refusal.py)."""
        budget = self.request_timeout_s if client_timeout_s is None else min(client_timeout_s, self.request_timeout_s)
        refusal = self._refusal(self.images_per_request, self.predict(self.images_per_request), budget)
        if refusal is not None:
            metrics.TALLY.inc(metrics.labelled(metrics.ADMISSIONS, protocol, "refused"))
        return refusal

    def _refusal(self, estimate: float, predicted: float, budget: float) -> Overloaded | None:
        if self.work <= 0:
            return None
        # Bodies still being read hold at most one batch of the limit: slow uploads (a phone on a bad network, or a
        # client trickling on purpose until the minimum body rate cuts it off) cannot fill the building.
        held = self.work - max(0.0, self.reading - self.max_batch)
        if held + estimate > self.limit:
            why = f"{self.work:.0f} images in flight, the limit that keeps answers within {self.bound_s * 1000:.0f} ms is {self.limit:.0f}"
        elif predicted > budget:
            why = f"predicted {predicted * 1000:.0f} ms to answer exceeds the request's deadline of {budget * 1000:.0f} ms"
        else:
            return None
        return Overloaded(f"overloaded: {why}; retry later", retry_after_s=self._retry_after_s())

    def settle(self, ticket: Ticket, images: int) -> None:
        """The request's body is read: it has ``images`` images."""
        if ticket.settled or ticket.released:
            return
        self._account(time.monotonic())
        self.work += images - ticket.images
        self.reading -= ticket.images
        ticket.images, ticket.settled = float(images), True
        if images:
            self.images_per_request += EWMA * (images - self.images_per_request)

    def release(self, ticket: Ticket, *, answered: bool) -> None:
        """The request is answered (``answered``: with a result) or abandoned; its work leaves the building."""
        if ticket.released:
            return
        now = time.monotonic()
        self._account(now)
        if not ticket.settled:
            self.reading -= ticket.images
        ticket.released = True
        self.work = max(0.0, self.work - ticket.images)
        self.requests -= 1
        if answered:
            took = now - ticket.admitted_at + ticket.waited_s
            self._learn(now, ticket, took)
            metrics.TALLY.observe(metrics.ADMISSION_PREDICTION_RATIO, took / ticket.predicted_s)

    # ---- learning -------------------------------------------------------------------------------------------------
    def _learn(self, now: float, ticket: Ticket, took: float) -> None:
        if ticket.ahead == 0 and self.requests == 0 and ticket.images <= 1:
            # Alone from admission to answer (nothing ahead, nothing behind it now): what an unloaded request costs.
            self.unloaded_s += EWMA * (took - self.unloaded_s)
        if took > self.bound_s:
            if now - self._last_backoff >= self.bound_s:  # once per round: one slow batch is one signal, not many
                self.limit = max(self.floor, self.limit * BACKOFF)
                self._last_backoff = now
        elif took <= GROW_BELOW * self.bound_s and ticket.limited:
            self.limit += ticket.images / self.limit
        self._done_images += ticket.images
        if self._busy_s >= BUSY_WINDOW_S:
            self._samples.append(self._done_images / self._busy_s)
            self._busy_s = self._done_images = 0.0

    async def watch_loop(self, every_s: float = 0.01, gauges_every: int = 10) -> None:
        """Keep ``loop_lag_s`` current: how late a timer on this loop fires (an EWMA), for as long as the loop runs; and
        publish the door's gauges every ``gauges_every`` ticks. (Sampled rather than written on every admit/release:
        in multiprocess mode each gauge write is a locked mmap write, four per decision, paid by refusals too.)"""
        import asyncio

        loop = asyncio.get_running_loop()
        tick = 0
        while True:
            t = loop.time()
            await asyncio.sleep(every_s)
            self.loop_lag_s += EWMA * (max(0.0, loop.time() - t - every_s) - self.loop_lag_s)
            tick += 1
            if tick % gauges_every == 0:
                self._gauges()

    def _retry_after_s(self) -> float:
        """Until the work ahead has drained below the limit, at the measured answer rate."""
        return drain_seconds(self.work + self.images_per_request - self.limit, self.throughput or 1 / self.unloaded_s)

    def _account(self, now: float) -> None:
        if self.requests > 0:
            self._busy_s += now - self._last
        self._last = now

    def _gauges(self) -> None:
        metrics.EVENT_LOOP_LAG_SECONDS.set(self.loop_lag_s)
        metrics.WORK_IN_FLIGHT.labels(stage="reading").set(max(0.0, self.reading))
        metrics.ADMISSION_THROUGHPUT.set(self.throughput or 0.0)
        metrics.ADMISSION_BOUND_SECONDS.set(self.bound_s)
        metrics.ADMISSION_LIMIT.set(self.limit)

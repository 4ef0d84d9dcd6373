"""The cluster `vitserve bench autoscale` simulates: replicas modelled from measurements, a least-outstanding balancer,
pods that take time to become ready, and the HPA algorithm deciding their number (see benchmarks/autoscale.py)."""

from __future__ import annotations

import heapq
import json
import math
import random
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ---- the HPA algorithm (Kubernetes docs, "Algorithm details") -------------------------------------------------------
def hpa_desired(current: int, metric: float, target: float, *, tolerance: float = 0.1, per_pod_average: bool = False) -> int:
    """One metric's desired replicas. ``per_pod_average`` (AverageValue of a total): ceil(total / target); otherwise
    (Value / utilisation): ceil(current × metric / target). Within ``tolerance`` of the target: no change."""
    if per_pod_average:
        ratio = (metric / current) / target if current else math.inf
    else:
        ratio = metric / target
    if abs(ratio - 1.0) <= tolerance:
        return current
    return max(1, math.ceil(current * ratio))


@dataclass
class Behavior:
    """HPA v2 behavior: the shipped scale-up and scale-down policies and windows."""

    up_percent: float = 100.0
    up_pods: int = 4
    up_period_s: float = 15.0
    down_percent: float = 50.0
    down_period_s: float = 60.0
    down_window_s: float = 300.0
    up_window_s: float = 0.0


class Autoscaler:
    """Desired replicas from per-metric desires, then windows and policies, as the HPA controller does."""

    def __init__(self, minimum: int, maximum: int, behavior: Behavior):
        self.minimum, self.maximum, self.b = minimum, maximum, behavior
        self.recommendations: deque[tuple[float, int]] = deque()
        self.last_up = self.last_down = -math.inf

    def decide(self, now: float, current: int, desires: list[int]) -> int:
        """The controller's stabilisation (as in its stabilizeRecommendationWithBehaviors): scale up only to the
        lowest recommendation of the up window, down only to the highest of the down window, then the policies."""
        raw = min(self.maximum, max(self.minimum, max(desires)))
        self.recommendations.append((now, raw))
        while self.recommendations and self.recommendations[0][0] < now - max(self.b.down_window_s, self.b.up_window_s):
            self.recommendations.popleft()
        up = min(r for t, r in self.recommendations if t >= now - self.b.up_window_s)
        down = max(r for t, r in self.recommendations if t >= now - self.b.down_window_s)
        if up > current:
            cap = max(math.ceil(current * (1 + self.b.up_percent / 100)), current + self.b.up_pods)
            return min(up, cap, self.maximum)
        if down < current:
            floor = math.floor(current * (1 - self.b.down_percent / 100)) if now - self.last_down >= self.b.down_period_s else current
            new = max(down, floor, self.minimum)
            if new < current:
                self.last_down = now
            return new
        return current


# ---- one replica ------------------------------------------------------------------------------------------------------------
@dataclass
class ReplicaModel:
    batch_seconds: dict[int, float]  # engine seconds per batch, measured
    decode_s: float  # CPU seconds to decode one image on one core
    overhead_s: float  # per-image serving overhead (HTTP, parsing, scheduling), fitted to the measured saturation
    max_batch: int
    cores: int = 2
    queue_capacity: int = 256

    def engine_time(self, n: int) -> float:
        """Engine seconds for a batch of n, interpolated per image between measured sizes."""
        if n in self.batch_seconds:
            return self.batch_seconds[n]
        sizes = sorted(self.batch_seconds)
        lo = max([s for s in sizes if s <= n], default=sizes[0])
        hi = min([s for s in sizes if s >= n], default=sizes[-1])
        per_lo, per_hi = self.batch_seconds[lo] / lo, self.batch_seconds[hi] / hi
        return n * (per_lo if lo == hi else per_lo + (n - lo) / (hi - lo) * (per_hi - per_lo))

    def batch_time(self, n: int) -> float:
        """A batch of n from queue to answer: engine + its decode turn (decode and engine take turns on a CPU) +
        the per-image serving overhead."""
        return self.engine_time(n) + math.ceil(n / self.cores) * self.decode_s + n * self.overhead_s

    @property
    def capacity(self) -> float:
        return self.max_batch / self.batch_time(self.max_batch)


def model_from_compare(path: Path, cores: int = 2) -> tuple[ReplicaModel, dict]:
    data = json.loads(Path(path).read_text())
    raw = data["raw_engine"]
    batch_seconds = {r["batch"]: r["seconds_per_batch"] for r in raw["batches"]}
    best = max(raw["batches"], key=lambda r: r["engine_images_per_s"])["batch"]
    decode_s = raw["decode_preprocess"]["mean_ms_per_image"] / 1000
    measured = data["services"]["vitserve"]["saturation"]["images_per_s"]
    m = ReplicaModel(batch_seconds, decode_s, 0.0, best, cores)
    # The overhead that makes one simulated replica saturate at the measured rate (≥ 0).
    m.overhead_s = max(0.0, (best / measured - m.batch_time(best)) / best)
    source = Path(path).resolve()
    return m, {"source": str(source.relative_to(ROOT)) if source.is_relative_to(ROOT) else str(source), "measured_saturation_images_per_s": measured, "simulated_capacity_images_per_s": round(m.capacity, 3),
               "max_batch": best, "decode_ms": round(decode_s * 1000, 3), "overhead_ms_per_image": round(m.overhead_s * 1000, 3)}


@dataclass
class Replica:
    model: ReplicaModel
    ready_at: float
    queue: deque = field(default_factory=deque)  # arrival times of images waiting
    busy_until: float = 0.0
    running: bool = False
    busy_s: float = 0.0  # engine+decode+overhead seconds in the current autoscaler period (the CPU rule)
    engine_s: float = 0.0  # engine seconds in the current period (the engine-busy trigger)
    waits: list = field(default_factory=list)  # queue waits in the current period (for the p90 rule)
    outstanding: int = 0
    removing: bool = False


# ---- the cluster ----------------------------------------------------------------------------------------------------------
def trace_rate(t: float, minutes: float, low: float, peak: float, spike: float, spike_at: float, spike_s: float) -> float:
    """Requests/s at t: a diurnal half-sine from ``low`` to ``peak`` and back, times ``spike`` inside the burst."""
    day = low + (peak - low) * math.sin(math.pi * min(1.0, t / (minutes * 60))) ** 2
    return day * (spike if spike_at <= t < spike_at + spike_s else 1.0)


@dataclass(frozen=True)
class Trace:
    """Offered load: a diurnal half-sine from ``low`` to ``peak`` requests/s and back over ``minutes``, times ``spike``
    for ``spike_s`` seconds from ``spike_at_s``."""

    minutes: float
    low: float
    peak: float
    spike: float
    spike_at_s: float
    spike_s: float

    def rate(self, t: float) -> float:
        return trace_rate(t, self.minutes, self.low, self.peak, self.spike, self.spike_at_s, self.spike_s)

    def arrivals(self, rng: random.Random) -> list[float]:
        """Poisson arrivals with the time-varying rate, by thinning at the highest rate."""
        top, end, t, out = self.peak * self.spike, self.minutes * 60, 0.0, []
        while True:
            t += rng.expovariate(top)
            if t >= end:
                return out
            if rng.random() < self.rate(t) / top:
                out.append(t)


class ClusterSimulation:
    """Events in time order: arrivals go to the ready replica with the fewest outstanding images; a replica runs one
    batch at a time; every ``poll_s`` the autoscaler reads the rule's metrics over the last period and decides."""

    def __init__(self, model: ReplicaModel, rule: str, targets: dict, *, start_s: float, poll_s: float, minimum: int,
                 maximum: int, behavior: Behavior):
        self.model, self.rule, self.targets, self.start_s, self.poll_s = model, rule, targets, start_s, poll_s
        self.replicas = [Replica(model, ready_at=0.0) for _ in range(minimum)]
        self.scaler = Autoscaler(minimum, maximum, behavior)
        self.events: list = []  # (time, seq, kind, payload)
        self.seq = 0
        self.latencies: list[tuple[float, float]] = []  # (completion time, latency)
        self.refused: list[float] = []
        self.replica_seconds = 0.0
        self.series: list[dict] = []

    def push(self, t: float, kind: str, payload=None) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, payload))

    def run(self, arrivals: list[float], end: float) -> None:
        for t in arrivals:
            self.push(t, "arrive")
        self.push(self.poll_s, "scale")
        last_t = 0.0
        handlers = {"arrive": self.arrive, "done": self.done, "scale": self.scale}
        while self.events:
            now, _, kind, payload = heapq.heappop(self.events)
            self.replica_seconds += len(self.replicas) * (now - last_t)
            last_t = now
            handlers[kind](now, payload)
            if kind == "scale" and now + self.poll_s < end:
                self.push(now + self.poll_s, "scale")

    def ready(self, now: float) -> list[Replica]:
        return [r for r in self.replicas if r.ready_at <= now and not r.removing]

    def start_batch(self, r: Replica, now: float) -> None:
        batch = [r.queue.popleft() for _ in range(min(len(r.queue), self.model.max_batch))]
        r.waits += [now - a for a in batch]
        dt = self.model.batch_time(len(batch))
        r.running, r.busy_until = True, now + dt
        r.busy_s += dt
        r.engine_s += self.model.engine_time(len(batch))
        self.push(now + dt, "done", (r, batch))

    def arrive(self, now: float, _payload) -> None:
        ready = self.ready(now)
        r = min(ready, key=lambda x: x.outstanding) if ready else None
        if r is None or len(r.queue) >= self.model.queue_capacity:
            self.refused.append(now)
            return
        r.queue.append(now)
        r.outstanding += 1
        if not r.running:
            self.start_batch(r, now)  # engine idle: close at once (max_wait is milliseconds; negligible here)

    def done(self, now: float, payload) -> None:
        r, batch = payload
        r.running = False
        self.latencies += [(now, now - a) for a in batch]
        r.outstanding -= len(batch)
        if r.queue:
            self.start_batch(r, now)
        elif r.removing:
            self.replicas.remove(r)

    def desires(self, ready: list[Replica], current: int) -> list[int]:
        """Each metric's desired replicas under the rule, from the last poll period."""
        t = self.targets
        if self.rule != "queue":
            util = sum(min(1.0, r.busy_s / self.poll_s) for r in ready) / len(ready)
            return [hpa_desired(current, util, t["cpu_utilization"])]
        queued = sum(len(r.queue) for r in ready)
        waits = sorted(w for r in ready for w in r.waits)
        p90 = waits[int(0.9 * (len(waits) - 1))] if waits else 0.0
        engine_busy = sum(r.engine_s for r in ready) / self.poll_s  # engine-seconds per second, all replicas
        return [hpa_desired(current, queued, t["queue_depth"], per_pod_average=True),
                hpa_desired(current, p90, t["queue_wait_p90_s"]),
                hpa_desired(current, engine_busy, t["engine_busy"], per_pod_average=True)]

    def scale(self, now: float, _payload) -> None:
        ready = self.ready(now)
        serving = [r for r in self.replicas if not r.removing]
        current = len(serving)
        if ready:
            new = self.scaler.decide(now, current, self.desires(ready, current))
            if new > current:
                self.replicas += [Replica(self.model, ready_at=now + self.start_s) for _ in range(new - current)]
            for r in sorted(serving, key=lambda x: x.outstanding)[: max(0, current - new)]:
                r.removing = True  # drains: takes no new requests, finishes its queue
                if not r.running and not r.queue:
                    self.replicas.remove(r)
        for r in self.replicas:
            r.busy_s, r.engine_s, r.waits = 0.0, 0.0, []
        self.series.append({"t": round(now, 1), "replicas": len([r for r in self.replicas if not r.removing]),
                            "ready": len(self.ready(now))})


def simulate(model: ReplicaModel, rule: str, targets: dict, *, minutes: float, low: float, peak: float, spike: float,
             spike_at_s: float, spike_s: float, start_s: float, poll_s: float, slo_s: float, minimum: int, maximum: int,
             behavior: Behavior, seed: int = 0, bucket_s: float = 10.0) -> dict:
    trace = Trace(minutes, low, peak, spike, spike_at_s, spike_s)
    sim = ClusterSimulation(model, rule, targets, start_s=start_s, poll_s=poll_s, minimum=minimum, maximum=maximum,
                            behavior=behavior)
    sim.run(trace.arrivals(random.Random(seed)), end=minutes * 60)
    return _summarize(sim.latencies, sim.refused, sim.series, minutes * 60, bucket_s, slo_s, sim.replica_seconds,
                      spike_at_s, low, peak, spike, spike_s, minutes)


def _p99(xs: list[float]) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(math.ceil(0.99 * len(xs))) - 1)]


def _summarize(latencies, refused, series, end, bucket_s, slo_s, replica_seconds, spike_at_s, low, peak, spike, spike_s, minutes) -> dict:
    buckets = int(math.ceil(end / bucket_s))
    lat_by = [[] for _ in range(buckets)]
    for done, lat in latencies:
        lat_by[min(buckets - 1, int(done // bucket_s))].append(lat)
    ref_by = [0] * buckets
    for t in refused:
        ref_by[min(buckets - 1, int(t // bucket_s))] += 1
    rows, over, over_outside = [], 0, 0
    outside_total = 0
    for i in range(buckets):
        t = i * bucket_s
        p99 = _p99(lat_by[i])
        bad = (p99 is not None and p99 > slo_s) or ref_by[i] > 0
        in_spike_start = spike_at_s <= t < spike_at_s + 60
        over += bad
        if not in_spike_start:
            outside_total += 1
            over_outside += bad
        replicas = next((s["replicas"] for s in reversed(series) if s["t"] <= t + bucket_s), series[0]["replicas"] if series else 1)
        rows.append({"t_s": t, "offered_rps": round(trace_rate(t + bucket_s / 2, minutes, low, peak, spike, spike_at_s, spike_s), 2),
                     "p99_s": None if p99 is None else round(p99, 4), "refused": ref_by[i], "replicas": replicas})
    all_lat = [lat for _, lat in latencies]
    return {
        "fraction_of_time_over_slo": round(over / buckets, 4),
        "fraction_over_slo_outside_spike_first_minute": round(over_outside / max(outside_total, 1), 4),
        "replica_hours": round(replica_seconds / 3600, 3),
        "requests": len(latencies) + len(refused), "refused": len(refused),
        "p99_s_overall": None if not all_lat else round(_p99(all_lat), 4), "max_replicas": max((s["replicas"] for s in series), default=0),
        "series": rows,
    }

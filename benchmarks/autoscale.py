"""Autoscaling, judged before a cluster sees it: a discrete-event simulation of N vitserve replicas behind a balancer.

    vitserve bench autoscale                                   # the shipped KEDA thresholds against a CPU rule
    vitserve bench autoscale --curve benchmarks/results/compare_vit-small_cpu2.json --minutes 60 --spike 5 --start-s 30 60

Each replica is modelled from this project's own measurements (the ``raw_engine`` of a ``bench compare`` result):
seconds per engine batch by batch size, decode milliseconds per image, and the service's measured saturation, from
which a per-image serving overhead is fitted so that one simulated replica saturates where the real one did. Inside a
replica the simulation runs vitserve's batcher policy: one batch at a time, a batch closes when full or when the
engine is free, at most ``max batch`` images (the engine's fastest batch), decode and engine taking turns on the CPU
(service/cpu_budget.py), and a bounded queue that refuses (429) beyond its capacity.

Around them: a least-outstanding-requests balancer over *ready* replicas; pods that take ``--start-s`` to become
ready (image pull, load, golden-set check, warm-up); and an autoscaler every ``pollingInterval`` running the HPA
algorithm (KEDA hands its metrics to an HPA): per metric ``desired = ceil(current × metric / target)``, a 10 %
tolerance, the highest desired of the metrics, then the shipped behaviour (scale-up and scale-down policies and
stabilisation windows, read from the ScaledObject). Two rules are compared on the same trace:

- ``queue``: the shipped ScaledObject's triggers (k8s/components/keda/scaledobject.yaml: total images queued, the
  p90 queue wait, and engine busy time per replica), read from that file so the simulation judges exactly what is
  shipped. Simplifications: the metrics are read over the last poll period (Prometheus's ``rate(...[1m])`` smooths
  more), and scrape delay is not modelled;
- ``cpu``: the common default, CPU utilisation at 70 % of the pod's cores.

The trace is a diurnal curve (low → peak → low over the run) with a ``--spike``× burst for ``--spike-minutes``.
Reported: offered load, replicas and p99 per 10 s, the fraction of time p99 is over the SLO (all of it, and outside
the spike's first minute), refused requests, and replica-hours. Results:
benchmarks/results/autoscaling_<model>_<env>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CURVE = ROOT / "benchmarks" / "results" / "compare_vit-small_cpu2.json"
SCALEDOBJECT = ROOT / "k8s" / "components" / "keda" / "scaledobject.yaml"


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


def simulate(model: ReplicaModel, rule: str, targets: dict, *, minutes: float, low: float, peak: float, spike: float,
             spike_at_s: float, spike_s: float, start_s: float, poll_s: float, slo_s: float, minimum: int, maximum: int,
             behavior: Behavior, seed: int = 0, bucket_s: float = 10.0) -> dict:
    rng = random.Random(seed)
    end = minutes * 60
    events: list = []  # (time, seq, kind, payload)
    seq = 0

    def push(t, kind, payload=None):
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, payload))

    replicas = [Replica(model, ready_at=0.0) for _ in range(minimum)]
    scaler = Autoscaler(minimum, maximum, behavior)
    # Poisson arrivals with a time-varying rate, by thinning at the highest rate.
    top = peak * spike
    t = 0.0
    while True:
        t += rng.expovariate(top)
        if t >= end:
            break
        if rng.random() < trace_rate(t, minutes, low, peak, spike, spike_at_s, spike_s) / top:
            push(t, "arrive")
    push(poll_s, "scale")
    latencies: list[tuple[float, float]] = []  # (completion time, latency)
    refused: list[float] = []
    replica_seconds = 0.0
    last_t = 0.0
    series = []

    def start_batch(r: Replica, now: float):
        n = min(len(r.queue), model.max_batch)
        batch = [r.queue.popleft() for _ in range(n)]
        for a in batch:
            r.waits.append(now - a)
        dt = model.batch_time(n)
        r.running, r.busy_until = True, now + dt
        r.busy_s += dt
        r.engine_s += model.engine_time(n)
        push(now + dt, "done", (r, batch))

    while events:
        now, _, kind, payload = heapq.heappop(events)
        replica_seconds += len(replicas) * (now - last_t)
        last_t = now
        if kind == "arrive":
            ready = [r for r in replicas if r.ready_at <= now and not r.removing]
            if not ready:
                refused.append(now)
                continue
            r = min(ready, key=lambda x: x.outstanding)
            if len(r.queue) >= model.queue_capacity:
                refused.append(now)
                continue
            r.queue.append(now)
            r.outstanding += 1
            if not r.running:
                start_batch(r, now)  # engine idle: close at once (max_wait is milliseconds; negligible here)
        elif kind == "done":
            r, batch = payload
            r.running = False
            for a in batch:
                latencies.append((now, now - a))
            r.outstanding -= len(batch)
            if r.queue:
                start_batch(r, now)
            elif r.removing:
                replicas.remove(r)
        elif kind == "scale":
            ready = [r for r in replicas if r.ready_at <= now and not r.removing]
            current = len([r for r in replicas if not r.removing])
            if ready:
                if rule == "queue":
                    queued = sum(len(r.queue) for r in ready)
                    waits = sorted(w for r in ready for w in r.waits)
                    p90 = waits[int(0.9 * (len(waits) - 1))] if waits else 0.0
                    engine_busy = sum(r.engine_s for r in ready) / poll_s  # engine-seconds per second, all replicas
                    desires = [hpa_desired(current, queued, targets["queue_depth"], per_pod_average=True),
                               hpa_desired(current, p90, targets["queue_wait_p90_s"]),
                               hpa_desired(current, engine_busy, targets["engine_busy"], per_pod_average=True)]
                else:
                    util = sum(min(1.0, r.busy_s / poll_s) for r in ready) / len(ready)
                    desires = [hpa_desired(current, util, targets["cpu_utilization"])]
                new = scaler.decide(now, current, desires)
                if new > current:
                    replicas += [Replica(model, ready_at=now + start_s) for _ in range(new - current)]
                elif new < current:
                    for r in sorted((r for r in replicas if not r.removing), key=lambda x: x.outstanding)[: current - new]:
                        r.removing = True  # drains: takes no new requests, finishes its queue
                        if not r.running and not r.queue:
                            replicas.remove(r)
            for r in replicas:
                r.busy_s, r.engine_s, r.waits = 0.0, 0.0, []
            series.append({"t": round(now, 1), "replicas": len([r for r in replicas if not r.removing]),
                           "ready": len([r for r in replicas if r.ready_at <= now and not r.removing])})
            if now + poll_s < end:
                push(now + poll_s, "scale")
    return _summarize(latencies, refused, series, end, bucket_s, slo_s, replica_seconds, spike_at_s, low, peak, spike, spike_s, minutes)


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


def shipped_targets(path: Path = SCALEDOBJECT) -> dict:
    """The thresholds of the shipped KEDA ScaledObject: what the simulation must judge."""
    import yaml

    so = yaml.safe_load(path.read_text())
    t = {tr["name"]: float(tr["metadata"]["threshold"]) for tr in so["spec"]["triggers"]}
    beh = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    up = {p["type"]: p["value"] for p in beh["scaleUp"]["policies"]}
    down = {p["type"]: p for p in beh["scaleDown"]["policies"]}
    behavior = Behavior(up_percent=up["Percent"], up_pods=up["Pods"], up_period_s=beh["scaleUp"]["policies"][0]["periodSeconds"],
                        down_percent=down["Percent"]["value"], down_period_s=down["Percent"]["periodSeconds"],
                        down_window_s=beh["scaleDown"]["stabilizationWindowSeconds"], up_window_s=beh["scaleUp"].get("stabilizationWindowSeconds", 0))
    return {"queue_depth": t["queue-depth"], "queue_wait_p90_s": t["queue-wait-p90"], "engine_busy": t["engine-busy"], "min": so["spec"]["minReplicaCount"],
            "max": so["spec"]["maxReplicaCount"], "poll_s": so["spec"].get("pollingInterval", 30), "behavior": behavior}


def plot(results: dict, out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    for rule, r in results["rules"].items():
        t = [row["t_s"] / 60 for row in r["series"]]
        axes[1].step(t, [row["replicas"] for row in r["series"]], where="post", label=rule)
        axes[2].plot(t, [row["p99_s"] if row["p99_s"] is not None else float("nan") for row in r["series"]], label=rule)
    first = next(iter(results["rules"].values()))
    axes[0].plot([row["t_s"] / 60 for row in first["series"]], [row["offered_rps"] for row in first["series"]], color="black")
    axes[0].set_ylabel("offered req/s")
    axes[1].set_ylabel("replicas")
    axes[2].set_ylabel("p99 latency (s)")
    axes[2].axhline(results["slo_s"], color="red", linestyle="--", label="SLO")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("minutes")
    for ax in axes[1:]:
        ax.legend(loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    from benchmarks.cli import HelpFormatter
    from benchmarks.harness.results import command_line, environment, finish, result_stem

    p = argparse.ArgumentParser(prog="vitserve bench autoscale", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--curve", type=Path, default=DEFAULT_CURVE, help="a `bench compare` result: the replica model")
    p.add_argument("--minutes", type=float, default=60.0, help="simulated time")
    p.add_argument("--low", type=float, default=None, help="night-time requests/s (default: 0.5 replica's capacity)")
    p.add_argument("--peak", type=float, default=None, help="daytime peak requests/s (default: 3 replicas' capacity)")
    p.add_argument("--spike", type=float, default=5.0, help="burst multiplier")
    p.add_argument("--spike-at", type=float, default=0.6, help="burst start, as a fraction of the run")
    p.add_argument("--spike-minutes", type=float, default=4.0)
    # 30 s: `vitserve serve` of the ViT-S artifact was ready 18.5-19.2 s after its process started on 2 cores here,
    # plus ~10 s for scheduling and container start with the image already on the node. 60 s: a node that must
    # pull the image first.
    p.add_argument("--start-s", type=float, nargs="+", default=[30.0, 60.0],
                   help="seconds from scale-up to a ready pod (schedule, pull, load, check, warm-up); one run per value")
    p.add_argument("--slo-ms", type=float, default=1000.0, help="p99 latency objective")
    p.add_argument("--cpu-target", type=float, default=0.7, help="the CPU rule's utilisation target")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    model, model_info = model_from_compare(args.curve)
    shipped = shipped_targets()
    cap = model.capacity
    low, peak = args.low or 0.5 * cap, args.peak or 3 * cap
    common = dict(minutes=args.minutes, low=low, peak=peak, spike=args.spike, spike_at_s=args.spike_at * args.minutes * 60,
                  spike_s=args.spike_minutes * 60, poll_s=shipped["poll_s"], slo_s=args.slo_ms / 1000,
                  minimum=shipped["min"], maximum=shipped["max"], behavior=shipped["behavior"], seed=args.seed)
    targets = {k: shipped[k] for k in ("queue_depth", "queue_wait_p90_s", "engine_busy")} | {"cpu_utilization": args.cpu_target}
    results = {"slo_s": args.slo_ms / 1000, "model": model_info, "trace": {k: v for k, v in common.items() if k != "behavior"},
               "targets": targets, "behavior": shipped["behavior"].__dict__, "rules": {}}
    for start_s in args.start_s:
        for rule in ("queue", "cpu"):
            results["rules"][f"{rule}, pods ready in {start_s:g} s"] = simulate(model, rule, targets, start_s=start_s, **common)
    lines = ["| rule | time over SLO (all) | outside the spike's first minute | refused | p99 overall | max replicas | replica-hours |",
             "|---|---|---|---|---|---|---|"]
    for rule, r in results["rules"].items():
        lines.append(f"| {rule} | {r['fraction_of_time_over_slo']:.1%} | {r['fraction_over_slo_outside_spike_first_minute']:.1%} | {r['refused']} of "
                     f"{r['requests']} | {r['p99_s_overall']} s | {r['max_replicas']} | {r['replica_hours']:.2f} |")
    md = "\n".join(lines) + (f"\n\nReplica model: {model_info}. Trace: {args.minutes:g} min, {low:.1f}→{peak:.1f} req/s diurnal, {args.spike:g}× for "
                             f"{args.spike_minutes:g} min; SLO p99 {args.slo_ms:g} ms per 10 s window (a window with a refusal counts as over). "
                             f"Queue rule = the shipped ScaledObject (queue depth {targets['queue_depth']:g}, p90 queue wait "
                             f"{targets['queue_wait_p90_s']:g} s, engine busy {targets['engine_busy']:g} per replica); CPU rule = "
                             f"{args.cpu_target:.0%} utilisation; the same HPA behaviour for both.")
    payload = {"benchmark": "autoscaling", "command": command_line("autoscale", argv),
               "environment": environment(), **results}
    print(md)
    name = args.name or f"autoscaling_{Path(str(args.curve)).stem.split('_')[1] if '_' in Path(str(args.curve)).stem else 'model'}"
    rows = [(rule, f"over SLO {r['fraction_of_time_over_slo']:.1%} ({r['fraction_over_slo_outside_spike_first_minute']:.1%} outside the spike's "
                   f"first minute), {r['replica_hours']:.2f} replica-hours") for rule, r in results["rules"].items()]
    if args.no_write:
        return finish("autoscaling simulation", payload, rows, table=md, name=None)
    png = plot(results, result_stem(name, payload["environment"]).with_suffix(".png"), f"autoscaling: queue rule vs CPU rule ({model_info['source'].split('/')[-1]})")
    return finish("autoscaling simulation", payload, rows, table=md + f"\n\n![autoscaling]({png.name})", name=name, figures=[png])


if __name__ == "__main__":
    sys.exit(main())

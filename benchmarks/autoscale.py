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
import sys
from pathlib import Path

from benchmarks.cluster_sim import Behavior, model_from_compare, simulate

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CURVE = ROOT / "benchmarks" / "results" / "compare_vit-small_cpu2.json"
SCALEDOBJECT = ROOT / "k8s" / "components" / "keda" / "scaledobject.yaml"


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

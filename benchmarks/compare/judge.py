"""Judge: the measured numbers → the ratios, each target met or missed (by how much), and what a miss is blamed on.

Pure functions of a result dict (what run.py measures, or a stored result JSON), which add_verdicts stores in it;
nothing here measures or prints.
"""

from __future__ import annotations

from benchmarks.harness.load import saturation_run

# The targets. CPU ones are checked on every run; GPU ones where a GPU served.
CPU_TARGETS = {"vs_raw_end_to_end": 0.95, "vs_bentoml_throughput": 1.10, "vs_bentoml_p99": 0.5, "vs_naive_throughput": 3.0}
GPU_TARGETS = {"vs_raw_engine": 0.90, "p99_ms_at_half_peak": 25.0}
LOWER_IS_BETTER = ("vs_bentoml_p99", "gpu_p99_ms_at_half_peak")  # every other target wants at least its value

CONTENTION_LIMIT_CORES = 0.25  # other processes' mean CPU during a phase above which its figures are not trusted


def add_verdicts(result: dict, *, gpu: bool, quiet: dict | None) -> None:
    """Targets (met or missed, by how much, blamed on what) and validity, added to the measured result."""
    result["targets"] = evaluate(result, gpu=gpu)
    result["validity"] = validity(result, quiet)


def ratio(a, b):
    return None if a is None or not b else round(a / b, 3)


def _raw_at(raw: dict, batch: float) -> dict:
    return min(raw["batches"], key=lambda r: abs(r["batch"] - batch))


# ---- blame: what our stage histograms say a miss is due to --------------------------------------------------------
def blame_throughput(ours: dict, raw: dict) -> str:
    """Why our saturation throughput is below the raw ceiling, from our histograms at that run."""
    run = saturation_run(ours["closed_loop"])
    s = run["server_stages"]
    if not s.get("available") or not s.get("images"):
        return "no stage histograms were scraped"
    busy = s["engine_busy_fraction"]
    raw_row = _raw_at(raw, s["mean_batch_size"] or 1)
    raw_ms = raw_row["seconds_per_batch"] * 1000 / raw_row["batch"]
    svc_ms = s["inference_ms_per_image"]
    slow = svc_ms / raw_ms - 1
    parts = [f"engine busy {busy:.0%} of the window", f"inference {svc_ms:.1f} ms/image in the service vs {raw_ms:.1f} ms/image "
             f"raw at batch {raw_row['batch']} ({slow:+.0%})", f"decode {s['decode_ms_per_image']} ms/image in the service vs "
             f"{raw['decode_preprocess']['mean_ms_per_image']} ms raw", f"mean batch {s['mean_batch_size']}"]
    if busy < 0.9:
        verdict = "the engine sat idle part of the time: the front end/batcher did not keep it fed"
    elif slow > 0.05:
        verdict = ("the engine was kept busy but each batch ran slower than raw: decode threads, HTTP handling and the load "
                   "generator share the same cores with the engine's intra-op threads (CPU contention)")
    else:
        verdict = "engine busy and as fast as raw; the remainder is decode/HTTP work not overlapped with inference"
    return "; ".join(parts) + ". Blame: " + verdict


def blame_latency(run: dict) -> str:
    """Where our mean latency went at one open-loop rate: queue wait vs batch inference vs decode, the rest of our
    handler's time (waiting for a decode thread, the event loop), and before/after the handler (HTTP, multipart
    parsing, the client)."""
    s = run["server_stages"]
    if not s.get("available") or not s.get("images"):
        return "no stage histograms were scraped"
    mean = run["latency"]["mean_ms"] or 0
    parts = {"queue wait": s["queue_wait_ms_per_image"] or 0, "batch inference": s["inference_ms_per_batch"] or 0,
             "decode": s["decode_ms_per_image"] or 0}
    server = s.get("server_request_ms")
    if server:
        # Our request histogram (service.metrics.REQUEST_SECONDS) starts once FastAPI has parsed the multipart body.
        parts["rest of the handler (waiting for a decode thread, event loop)"] = max(0.0, server - sum(parts.values()))
        parts["before/after the handler (HTTP, multipart parsing, client)"] = max(0.0, mean - server)
    else:
        parts["HTTP/framework + client (rest)"] = max(0.0, mean - sum(parts.values()))
    top = max(parts, key=parts.get)
    return (f"at {run['target_rate_rps']}/s: mean latency {mean:.0f} ms (p99 {run['latency']['p99_ms']:.0f}) = "
            + " + ".join(f"{k} {v:.0f}" for k, v in parts.items()) + f" ms; mean batch {s['mean_batch_size']}. Largest share: {top}")


def blame_vs_naive(result: dict) -> str:
    """How far even a perfect server on our engine could get past the naive peer, and what the export chose."""
    raw = result["raw_engine"]["best"]["end_to_end_images_per_s"]
    naive = result["services"]["naive-pipeline"]["saturation"]["images_per_s"]
    ceiling = raw / naive if naive else None
    text = (f"the raw engine + decode ceiling ({raw:.2f} img/s) is itself only {ceiling:.2f}× the naive peer's {naive:.2f} img/s, "
            "so no serving layer on this engine reaches 3×; the gap is the engine" if ceiling and ceiling < 3
            else f"the raw ceiling is {ceiling:.2f}× the naive peer; the serving layer loses the rest")
    choice = result["model"].get("export_cpu_choice") or {}
    cands = choice.get("candidates", {})
    failed = [n for n, c in cands.items() if n.startswith("int8") and not c["passed_gate"]]
    if choice.get("chosen") == "fp32" and failed:
        best = lambda c: c["images_per_s"][str(c["best_batch"])] if str(c["best_batch"]) in c["images_per_s"] else c["images_per_s"][c["best_batch"]]  # noqa: E731
        text += (f". The artifact ships FP32 ONNX because {', '.join(failed)} failed the parity gate on this model ("
                 + ", ".join(f"{n} {best(cands[n]):.1f}" for n in failed) + f" vs FP32 {best(cands['fp32']):.1f} img/s at "
                 "each one's best batch in the export's own timing)")
    return text


# ---- targets ----------------------------------------------------------------------------------------------------
def judged(key: str, measured, target: float, blame: str | None = None, **extra) -> dict:
    """One target's verdict: met or not (None: nothing measured), and for a miss by how much and what it is blamed on."""
    higher_is_better = key not in LOWER_IS_BETTER
    met = None if measured is None else (measured >= target if higher_is_better else measured <= target)
    entry = {"target": target, "measured": measured, "met": met, **extra}
    if met is False:
        entry["missed_by"] = round(target - measured, 3) if higher_is_better else round(measured - target, 3)
        entry["missed_by_relative"] = round(abs(measured / target - 1), 3)
        if blame:
            entry["blame"] = blame
    return entry


def evaluate(result: dict, gpu: bool) -> dict:
    ours = result["services"]["vitserve"]
    raw = result["raw_engine"]
    ours_sat = ours["saturation"]["images_per_s"]
    targets: dict[str, dict] = {}

    def record(key, measured, target, blame=None, **extra):
        targets[key] = judged(key, measured, target, blame, **extra)

    record("vs_raw_end_to_end", ratio(ours_sat, raw["best"]["end_to_end_images_per_s"]), CPU_TARGETS["vs_raw_end_to_end"],
           blame_throughput(ours, raw), ours_images_per_s=ours_sat, raw_end_to_end_images_per_s=raw["best"]["end_to_end_images_per_s"],
           raw_batch=raw["best"]["batch"], vs_raw_engine_only=ratio(ours_sat, raw["best"]["engine_images_per_s"]))
    peers = result["services"]
    if "bentoml-batching" in peers:
        b = peers["bentoml-batching"]
        record("vs_bentoml_throughput", ratio(ours_sat, b["saturation"]["images_per_s"]), CPU_TARGETS["vs_bentoml_throughput"],
               blame_throughput(ours, raw), peer_images_per_s=b["saturation"]["images_per_s"])
        per_rate = []
        for o, p in zip(ours["open_loop"], b["open_loop"]):
            per_rate.append({"rate_rps": o["target_rate_rps"], "ours_p99_ms": o["latency"]["p99_ms"], "peer_p99_ms": p["latency"]["p99_ms"],
                             "ratio": ratio(o["latency"]["p99_ms"], p["latency"]["p99_ms"]), "ours_blame": blame_latency(o)})
        worst = max((r for r in per_rate if r["ratio"] is not None), key=lambda r: r["ratio"], default=None)
        record("vs_bentoml_p99", None if worst is None else worst["ratio"], CPU_TARGETS["vs_bentoml_p99"],
               None if worst is None else " | ".join(f"ours ÷ peer p99 {r['ratio']} ({r['ours_p99_ms']:.0f} vs {r['peer_p99_ms']:.0f} ms) "
                                                    + r["ours_blame"] for r in per_rate), per_rate=per_rate,
               rule="ours ÷ peer p99 at every offered rate; the worst rate is the one reported")
    if "naive-pipeline" in peers:
        n = peers["naive-pipeline"]
        record("vs_naive_throughput", ratio(ours_sat, n["saturation"]["images_per_s"]), CPU_TARGETS["vs_naive_throughput"],
               blame_vs_naive(result) + ". Our own losses: " + blame_throughput(ours, raw), peer_images_per_s=n["saturation"]["images_per_s"],
               raw_ceiling_vs_naive=ratio(raw["best"]["end_to_end_images_per_s"], n["saturation"]["images_per_s"]))
    if gpu:
        record("gpu_vs_raw_engine", ratio(ours_sat, raw["best"]["engine_images_per_s"]), GPU_TARGETS["vs_raw_engine"], blame_throughput(ours, raw))
        half = min(ours["open_loop"], key=lambda r: abs(r["target_rate_rps"] - 0.5 * ours_sat), default=None)
        record("gpu_p99_ms_at_half_peak", None if half is None else half["latency"]["p99_ms"], GPU_TARGETS["p99_ms_at_half_peak"],
               None if half is None else blame_latency(half), rate_rps=None if half is None else half["target_rate_rps"])
    else:
        for k in ("gpu_vs_raw_engine", "gpu_p99_ms_at_half_peak"):
            targets[k] = {"met": None, "why": "not applicable: no GPU on this machine"}
    return targets


# ---- validity ---------------------------------------------------------------------------------------------------
def validity(result: dict, quiet: dict | None) -> dict:
    """Whether the machine was ours while we measured: other processes' CPU in every measured window."""
    windows = {}
    for n, svc in result["services"].items():
        for r in svc["closed_loop"] + svc["open_loop"]:
            load = f"c={r['concurrency']}" if r["mode"] == "closed" else f"{r['target_rate_rps']}/s"
            windows[f"{n} {load}"] = r["cpu"]["other_processes_cores"]
    for i, p in enumerate(result["raw_engine"].get("passes", [])):
        windows[f"raw engine pass {i + 1}"] = p["cpu"]["other_processes_cores"]
    busy = {n: c for n, c in windows.items() if c > CONTENTION_LIMIT_CORES}
    return {
        "valid": not busy, "limit_cores": CONTENTION_LIMIT_CORES, "other_processes_cores": windows, "before_start": quiet,
        "note": "no other load while measuring" if not busy else
        f"other processes took more than {CONTENTION_LIMIT_CORES} cores in {len(busy)} of {len(windows)} measured windows "
        f"(up to {max(busy.values()):.2f} cores): those figures are skewed; the services were interleaved so that they "
        "share it, but re-run on a quiet machine for final numbers",
    }

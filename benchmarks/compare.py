"""Our service against its peers: same model, same machine, same images, same offered load, one run.

    vitserve bench compare --config vit-small        # the committed CPU table (~6 min on 2 quiet cores)
    vitserve bench compare --config tiny --concurrency 1,4 --warmup 0.5 --duration 2 --peers '' --no-write   # smoke

Steps, in order: build the model (random weights from a named config, or --checkpoint, or reuse --artifact) →
export it with the real pipeline → start every service on its own free loopback port — ours (`vitserve serve`,
shipped defaults), the BentoML-idiomatic peer (benchmarks/peers/bentoml_batching.py) and the naive
transformers-pipeline peer (benchmarks/peers/naive_pipeline.py) — and check each answers the same multipart request
→ the raw engine with no server (engine.run at batch sizes up to the service maximum; decode+preprocess timed
apart) → closed loop at each concurrency, every service back to back (order alternating) → open loop (Poisson) at
fixed fractions of *our* saturation, the same rates for every service → the raw engine again → stop everything.

Interleaving matters on a shared machine: other jobs' CPU use changes over minutes, and running each level on all
services in a row makes them share it. CPU taken by processes outside this benchmark is recorded per window, and a
run where it exceeded 0.25 cores anywhere is marked as not valid.

Then the ratios (ours ÷ each peer: throughput at saturation, p99 at each offered rate), the targets with by how
much each is met or missed, and — from our service's own stage histograms — what a miss is blamed on.
Results: benchmarks/results/compare_<model>_<env>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    cpu_snapshot,
    environment,
    load_average,
    other_cpu_load,
    print_summary,
    result_stem,
    wait_until_quiet,
    write_result,
)
from benchmarks.models import CONFIGS, build_artifact, checkpoint_shape, make_checkpoint, vit_flops
from benchmarks.photos import describe, realistic_photos
from benchmarks.service_load import multipart_bodies

PEERS = ("bentoml-batching", "naive-pipeline")

# The targets. CPU ones are checked on every run; GPU ones where a GPU served.
CPU_TARGETS = {"vs_raw_end_to_end": 0.95, "vs_bentoml_throughput": 1.10, "vs_bentoml_p99": 0.5, "vs_naive_throughput": 3.0}
GPU_TARGETS = {"vs_raw_engine": 0.90, "p99_ms_at_half_peak": 25.0}


# ---- running everything ------------------------------------------------------------------------------------------
def _prepare_artifact(args, work: Path, log) -> tuple[Path, dict]:
    if args.artifact:
        import json

        m = json.loads((args.artifact / "manifest.json").read_text())
        info = {"name": m["model"]["name"], "source": str(args.artifact)}
        if (args.artifact / "pytorch" / "config.json").is_file():
            shape = checkpoint_shape(args.artifact / "pytorch")
            info.update(shape=shape.__dict__, gflops_per_image=round(vit_flops(shape)["total"] / 1e9, 3))
        return args.artifact, info
    if args.checkpoint:
        ckpt, name = args.checkpoint, args.checkpoint.name
    else:
        ckpt, name = make_checkpoint(args.config, work / f"{args.config}-random"), args.config
    t = time.perf_counter()
    log(f"exporting {name} → artifact (parity gate on {args.export_images} images)…")
    art = build_artifact(ckpt, work / "artifact", max_images=args.export_images, max_batch=args.max_batch)
    log(f"  exported in {time.perf_counter() - t:.0f} s")
    shape = checkpoint_shape(ckpt)
    return art, {"name": name, "source": "random weights from config" if not args.checkpoint else str(ckpt),
                 "shape": shape.__dict__, "gflops_per_image": round(vit_flops(shape)["total"] / 1e9, 3)}


def _service_info(base: str) -> dict:
    import httpx

    try:
        r = httpx.get(f"{base}/info", timeout=10)
        return r.json() if r.status_code == 200 else {}
    except httpx.HTTPError:
        return {}


def _short(r: dict) -> str:
    lat = r["latency"]
    return (f"{r['throughput_images_per_s']:7.2f} img/s  p50 {_fmt(lat['p50_ms'], '{:.0f}')} ms  p99 {_fmt(lat['p99_ms'], '{:.0f}')} ms  "
            f"other CPU {r['cpu']['other_processes_cores']:.2f}  errors {r['errors'] or '-'}")


def run_compare(args, log=print) -> dict:
    """Every server is started first and stays up (idle ones cost next to nothing); then each load level runs on
    every service back to back, alternating the order, so load from other jobs on a shared machine — which
    changes over minutes — falls on all services alike instead of on whichever happened to run then."""
    from contextlib import ExitStack

    from benchmarks.peers import raw_engine
    from benchmarks.servers import running_peer, running_vitserve
    from benchmarks.service_load import check_answers, closed_loop, open_loop
    from service.artifact import read_manifest

    work = args.workdir or Path(tempfile.mkdtemp(prefix="vitserve-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        artifact, model = _prepare_artifact(args, work, log)
        manifest = read_manifest(artifact)
        model["num_parameters"] = manifest.model.num_parameters
        model["cpu_engine_file"] = next((e.file for e in manifest.engines if e.format == "onnx" and e.device == "cpu"), None)
        model["export_cpu_choice"] = manifest.export_report.get("cpu_engine")
        photos = realistic_photos()
        bodies = multipart_bodies(photos, args.images_per_request)
        concurrency = [int(c) for c in args.concurrency.split(",") if c]
        fractions = [float(f) for f in args.rate_fractions.split(",") if f]
        batches = sorted({b for b in (1, 4, 8, 16, args.max_batch) if b <= args.max_batch})
        # The peers refuse nothing and queue every request, so our service is measured the same way: its admission
        # bound is lifted to the request timeout (what refusing does under overload is `vitserve bench overload`'s).
        overrides = {"max_latency_ms": "10000", **dict(kv.split("=", 1) for kv in args.service_setting)}
        peers = [p for p in args.peers.split(",") if p]

        def raw_pass(label: str) -> dict:
            log(f"raw engine, no server ({label})…")
            cpu0 = cpu_snapshot()
            r = raw_engine.measure(artifact, photos, batches, min_seconds=args.raw_seconds, log=log)
            r["cpu"] = other_cpu_load(cpu0, cpu_snapshot())
            return r

        with ExitStack() as stack:
            log(f"starting our service ({'settings ' + str(overrides) if overrides else 'default settings'}) and peers {peers}…")
            servers = {"vitserve": stack.enter_context(running_vitserve(artifact, work / "vitserve", **overrides))}
            for peer in peers:
                servers[peer] = stack.enter_context(running_peer(peer, artifact, work / peer))
            services: dict[str, dict] = {}
            for name, srv in servers.items():
                services[name] = {"url": srv.url, "kind": name, "closed_loop": [], "open_loop": [],
                                  "answer_check": asyncio.run(check_answers(srv.url, bodies, name))}
            services["vitserve"]["info"] = _service_info(servers["vitserve"].url)
            raw_passes = [raw_pass("before the services")]

            def each(i: int):
                names = list(servers)
                return names if i % 2 == 0 else names[::-1]

            for i, c in enumerate(concurrency):
                for name in each(i):
                    r = asyncio.run(closed_loop(servers[name].url, bodies, concurrency=c, warmup_s=args.warmup,
                                                duration_s=args.duration, timeout_s=args.timeout))
                    services[name]["closed_loop"].append(r)
                    log(f"  {name:<17} closed c={c:<3d} {_short(r)}")
            ours_best = max(services["vitserve"]["closed_loop"], key=lambda r: r["throughput_images_per_s"])
            peak_rps = ours_best["throughput_images_per_s"] / args.images_per_request
            rates = [float(r) for r in args.rates.split(",") if r] or [round(f * peak_rps, 2) for f in fractions]
            for i, rate in enumerate(rates):
                for name in each(i + len(concurrency)):
                    r = asyncio.run(open_loop(servers[name].url, bodies, rate=rate, warmup_s=args.warmup, duration_s=args.open_duration,
                                              max_outstanding=args.max_outstanding, timeout_s=args.timeout, seed=args.seed))
                    services[name]["open_loop"].append(r)
                    log(f"  {name:<17} open {rate:6.2f}/s  {_short(r)}")
            raw_passes.append(raw_pass("after the services"))

        for name, svc in services.items():
            best = max(svc["closed_loop"], key=lambda r: r["throughput_images_per_s"])
            svc["saturation"] = {"images_per_s": best["throughput_images_per_s"], "concurrency": best["concurrency"], "latency": best["latency"]}
            runs = svc["closed_loop"] + svc["open_loop"]
            svc["cpu"] = {"other_processes_cores_mean": round(sum(r["cpu"]["other_processes_cores"] for r in runs) / len(runs), 2),
                          "other_processes_cores_max": max(r["cpu"]["other_processes_cores"] for r in runs)}
            svc["settings"] = ({"VITSERVE_" + k.upper(): v for k, v in overrides.items()} or "defaults (service/settings.py)") \
                if name == "vitserve" else _peer_settings(name)
        # The ceiling: the better of the two raw passes (the stricter comparison); both are kept.
        raw = dict(max(raw_passes, key=lambda r: r["best"]["end_to_end_images_per_s"]))
        raw["passes"] = [{"best": r["best"], "cpu": r["cpu"], "batches": r["batches"]} for r in raw_passes]
        return {"model": model, "images": describe(photos), "raw_engine": raw, "services": services,
                "offered_rates_rps": rates, "rate_fractions_of_our_saturation": fractions,
                "order": "servers all up; each load level run on every service back to back, order alternating"}
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def _peer_settings(peer: str) -> dict:
    if peer == "bentoml-batching":
        from benchmarks.peers import bentoml_batching as m

        return {"max_batch_size": m.MAX_BATCH_SIZE, "max_latency_ms": m.MAX_LATENCY_MS, "workers": 1, "engine": "auto"}
    return {"batching": "none", "pipeline": "transformers image-classification, PyTorch FP32 CPU", "workers": 1}


# ---- ratios, targets and blame ---------------------------------------------------------------------------------
def _ratio(a, b):
    return None if a is None or not b else round(a / b, 3)


def _raw_at(raw: dict, batch: float) -> dict:
    return min(raw["batches"], key=lambda r: abs(r["batch"] - batch))


def _saturation_run(svc: dict) -> dict:
    return max(svc["closed_loop"], key=lambda r: r["throughput_images_per_s"])


def blame_throughput(ours: dict, raw: dict) -> str:
    """Why our saturation throughput is below the raw ceiling, from our histograms at that run."""
    run = _saturation_run(ours)
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
        # vitserve_request_duration_seconds starts once FastAPI has parsed the multipart body.
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


def evaluate(result: dict, gpu: bool) -> dict:
    ours = result["services"]["vitserve"]
    raw = result["raw_engine"]
    ours_sat = ours["saturation"]["images_per_s"]
    targets: dict[str, dict] = {}

    def record(key, measured, target, higher_is_better, blame=None, **extra):
        met = None if measured is None else (measured >= target if higher_is_better else measured <= target)
        entry = {"target": target, "measured": measured, "met": met, **extra}
        if met is False:
            entry["missed_by"] = round(target - measured, 3) if higher_is_better else round(measured - target, 3)
            entry["missed_by_relative"] = round(abs(measured / target - 1), 3)
            if blame:
                entry["blame"] = blame
        targets[key] = entry

    record("vs_raw_end_to_end", _ratio(ours_sat, raw["best"]["end_to_end_images_per_s"]), CPU_TARGETS["vs_raw_end_to_end"], True,
           blame_throughput(ours, raw), ours_images_per_s=ours_sat, raw_end_to_end_images_per_s=raw["best"]["end_to_end_images_per_s"],
           raw_batch=raw["best"]["batch"], vs_raw_engine_only=_ratio(ours_sat, raw["best"]["engine_images_per_s"]))
    peers = result["services"]
    if "bentoml-batching" in peers:
        b = peers["bentoml-batching"]
        record("vs_bentoml_throughput", _ratio(ours_sat, b["saturation"]["images_per_s"]), CPU_TARGETS["vs_bentoml_throughput"], True,
               blame_throughput(ours, raw), peer_images_per_s=b["saturation"]["images_per_s"])
        per_rate = []
        for o, p in zip(ours["open_loop"], b["open_loop"]):
            per_rate.append({"rate_rps": o["target_rate_rps"], "ours_p99_ms": o["latency"]["p99_ms"], "peer_p99_ms": p["latency"]["p99_ms"],
                             "ratio": _ratio(o["latency"]["p99_ms"], p["latency"]["p99_ms"]), "ours_blame": blame_latency(o)})
        worst = max((r for r in per_rate if r["ratio"] is not None), key=lambda r: r["ratio"], default=None)
        record("vs_bentoml_p99", None if worst is None else worst["ratio"], CPU_TARGETS["vs_bentoml_p99"], False,
               None if worst is None else " | ".join(f"ours ÷ peer p99 {r['ratio']} ({r['ours_p99_ms']:.0f} vs {r['peer_p99_ms']:.0f} ms) "
                                                    + r["ours_blame"] for r in per_rate), per_rate=per_rate,
               rule="ours ÷ peer p99 at every offered rate; the worst rate is the one reported")
    if "naive-pipeline" in peers:
        n = peers["naive-pipeline"]
        record("vs_naive_throughput", _ratio(ours_sat, n["saturation"]["images_per_s"]), CPU_TARGETS["vs_naive_throughput"], True,
               blame_vs_naive(result) + ". Our own losses: " + blame_throughput(ours, raw), peer_images_per_s=n["saturation"]["images_per_s"],
               raw_ceiling_vs_naive=_ratio(raw["best"]["end_to_end_images_per_s"], n["saturation"]["images_per_s"]))
    if gpu:
        record("gpu_vs_raw_engine", _ratio(ours_sat, raw["best"]["engine_images_per_s"]), GPU_TARGETS["vs_raw_engine"], True, blame_throughput(ours, raw))
        half = min(ours["open_loop"], key=lambda r: abs(r["target_rate_rps"] - 0.5 * ours_sat), default=None)
        record("gpu_p99_ms_at_half_peak", None if half is None else half["latency"]["p99_ms"], GPU_TARGETS["p99_ms_at_half_peak"], False,
               None if half is None else blame_latency(half), rate_rps=None if half is None else half["target_rate_rps"])
    else:
        for k in ("gpu_vs_raw_engine", "gpu_p99_ms_at_half_peak"):
            targets[k] = {"met": None, "why": "not applicable: no GPU on this machine"}
    return targets


CONTENTION_LIMIT_CORES = 0.25  # other processes' mean CPU during a phase above which its figures are not trusted


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


# ---- reporting ---------------------------------------------------------------------------------------------------
def _fmt(v, spec="{:.2f}"):
    return "-" if v is None else spec.format(v)


def tables(result: dict) -> str:
    svcs, raw, rates = result["services"], result["raw_engine"], result["offered_rates_rps"]
    ours = svcs["vitserve"]
    out = []
    v = result.get("validity")
    if v and not v["valid"]:
        out.append(f"> **Contended run.** {v['note']}.\n")
    elif v:
        out.append(f"Valid run: other processes took at most {max(v['other_processes_cores'].values(), default=0):.2f} cores in any "
                   f"measured window (limit {v['limit_cores']}).\n")
    m = result["model"]
    out.append(f"Model: **{m['name']}** ({m.get('num_parameters', 0) / 1e6:.1f}M parameters, {m.get('gflops_per_image', '?')} GFLOP/image), "
               f"CPU engine file `{m.get('cpu_engine_file')}`; one {result['images']['size_px'][0]}×{result['images']['size_px'][1]} "
               f"photo per request (JPEG ~{result['images']['mean_bytes'].get('image/jpeg', 0) // 1000} KB and PNG "
               f"~{result['images']['mean_bytes'].get('image/png', 0) // 1000} KB, alternating).\n")
    head = ["service", "saturation img/s (at c)", "Little's law img/s (same run)", "p50 / p99 ms at saturation"] + [f"p99 ms at {r}/s" for r in rates] + \
           ["errors (all runs)", "ours ÷ this: throughput"] + [f"ours ÷ this: p99 at {r}/s" for r in rates]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for name, s in svcs.items():
        sat = _saturation_run(s)
        errs: dict[str, int] = {}
        for r in s["closed_loop"] + s["open_loop"]:
            for k, v in r["errors"].items():
                errs[k] = errs.get(k, 0) + v
        row = [name, f"{s['saturation']['images_per_s']:.2f} (c={s['saturation']['concurrency']})",
               _fmt(sat.get("littles_law_images_per_s")),
               f"{_fmt(sat['latency']['p50_ms'], '{:.0f}')} / {_fmt(sat['latency']['p99_ms'], '{:.0f}')}"]
        row += [_fmt(o["latency"]["p99_ms"], "{:.0f}") for o in s["open_loop"]]
        row += [", ".join(f"{k}: {v}" for k, v in sorted(errs.items())) or "none"]
        if name == "vitserve":
            row += ["—"] + ["—"] * len(rates)
        else:
            row += [_fmt(_ratio(ours["saturation"]["images_per_s"], s["saturation"]["images_per_s"]), "{:.2f}×")]
            row += [_fmt(_ratio(o["latency"]["p99_ms"], p["latency"]["p99_ms"]), "{:.2f}×") for o, p in zip(ours["open_loop"], s["open_loop"])]
        out.append("| " + " | ".join(row) + " |")
    b = raw["best"]
    out.append(f"| raw engine, no server (batch {b['batch']}) | {b['engine_images_per_s']:.2f} engine only; "
               f"{b['end_to_end_images_per_s']:.2f} with decode+preprocess | | | " + " | ".join("" for _ in rates) +
               f" | | {_ratio(ours['saturation']['images_per_s'], b['engine_images_per_s'])}× engine only; "
               f"{_ratio(ours['saturation']['images_per_s'], b['end_to_end_images_per_s'])}× end to end |" + " |" * len(rates))
    out.append("")
    v = result.get("validity")
    if v:
        out.append("CPU taken by *other* processes during each measured window (mean cores outside this benchmark's process "
                   "tree, which holds every server): " + ", ".join(f"{n} {c:.2f}" for n, c in v["other_processes_cores"].items()) + ".")
        out.append("")
    if raw.get("passes"):
        out.append("Raw engine passes (best end-to-end): " + ", ".join(
            f"{'before' if i == 0 else 'after'} the services {p['best']['end_to_end_images_per_s']:.2f} img/s at batch {p['best']['batch']} "
            f"(other CPU {p['cpu']['other_processes_cores']:.2f})" for i, p in enumerate(raw["passes"])) + "; the better one is the ceiling.")
        out.append("")
    out.append("Raw engine (`engine.run`, no server; decode+preprocess "
               f"{raw['decode_preprocess']['mean_ms_per_image']} ms/image measured apart): " +
               ", ".join(f"batch {r['batch']}: {r['engine_images_per_s']:.2f} img/s ({r['end_to_end_images_per_s']:.2f} with decode)" for r in raw["batches"]))
    out.append("")
    out.append("### Targets\n")
    out.append("| target | wanted | measured | result | blame (our stage histograms) |")
    out.append("|---|---|---|---|---|")
    for k, t in result["targets"].items():
        if t.get("met") is None:
            out.append(f"| {k} | | | n/a | {t.get('why', '')} |")
            continue
        cmp_ = "≥" if k not in ("vs_bentoml_p99", "gpu_p99_ms_at_half_peak") else "≤"
        res = "MET" if t["met"] else f"MISSED by {t['missed_by']} ({t['missed_by_relative']:.1%})"
        out.append(f"| {k} | {cmp_} {t['target']} | {t['measured']} | {res} | {t.get('blame', '') if not t['met'] else ''} |")
    out.append("")
    out.append("### Our service's stages per run (means over each measured window, from /metrics)\n")
    out.append("Engine busy = Σ batch inference seconds ÷ window; batches are counted when they finish, so it can be off "
               "by up to one batch time ÷ window (e.g. above 1 with 1.6 s batches in a 10 s window).\n")
    out.append("| run | img/s | p50 ms | p99 ms | mean batch | queue wait ms/img | inference ms/batch | inference ms/img | decode ms/img | engine busy |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in ours["closed_loop"] + ours["open_loop"]:
        s = r["server_stages"]
        load = f"closed c={r['concurrency']}" if r["mode"] == "closed" else f"open {r['target_rate_rps']}/s"
        out.append(f"| {load} | {r['throughput_images_per_s']:.2f} | {_fmt(r['latency']['p50_ms'], '{:.0f}')} | {_fmt(r['latency']['p99_ms'], '{:.0f}')} | "
                   f"{s.get('mean_batch_size', '-')} | {s.get('queue_wait_ms_per_image', '-')} | {s.get('inference_ms_per_batch', '-')} | "
                   f"{s.get('inference_ms_per_image', '-')} | {s.get('decode_ms_per_image', '-')} | {s.get('engine_busy_fraction', '-')} |")
    return "\n".join(out)


def summary_rows(result: dict) -> list[tuple[str, str]]:
    rows = [("model", f"{result['model']['name']} ({result['model'].get('gflops_per_image', '?')} GFLOP/img), engine file "
                      f"{result['model'].get('cpu_engine_file')}")]
    raw = result["raw_engine"]["best"]
    rows.append(("raw engine", f"{raw['engine_images_per_s']:.2f} img/s engine only, {raw['end_to_end_images_per_s']:.2f} with decode (batch {raw['batch']})"))
    for name, s in result["services"].items():
        sat = _saturation_run(s)
        opened = ", ".join(f"p99 {_fmt(o['latency']['p99_ms'], '{:.0f}')} ms @ {o['target_rate_rps']}/s" for o in s["open_loop"])
        rows.append((name, f"{s['saturation']['images_per_s']:.2f} img/s at c={s['saturation']['concurrency']} "
                           f"(p99 {_fmt(sat['latency']['p99_ms'], '{:.0f}')} ms); {opened}"))
    cpu = [(n, s["cpu"]["other_processes_cores_mean"]) for n, s in result["services"].items() if s.get("cpu")]
    rows.append(("other procs' CPU", ", ".join(f"{n} {c:.2f}" for n, c in cpu) + " cores, mean over windows (should be ~0)"))
    v = result.get("validity")
    if v:
        rows.append(("valid", "yes: " + v["note"] if v["valid"] else "NO: " + v["note"]))
    for k, t in result["targets"].items():
        if t.get("met") is None:
            rows.append((f"target {k}", "n/a"))
        else:
            rows.append((f"target {k}", f"{'MET' if t['met'] else 'MISSED'}: {t['measured']} (want {'≤' if k in ('vs_bentoml_p99', 'gpu_p99_ms_at_half_peak') else '≥'} {t['target']})"))
    return rows


# ---- command line ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from benchmarks.cli import HelpFormatter

    p = argparse.ArgumentParser(prog="vitserve bench compare", description=__doc__, formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", choices=sorted(CONFIGS), default="vit-small", help="random-weight model of this size")
    src.add_argument("--checkpoint", type=Path, help="HF ViT checkpoint directory to export and serve")
    src.add_argument("--artifact", type=Path, help="an existing artifact (skips export)")
    p.add_argument("--service-setting", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting for our service, as VITSERVE_KEY (e.g. max_batch_size=4); repeatable. Default: the shipped defaults, "
                        "but max_latency_ms=10000 (the peers refuse nothing either)")
    p.add_argument("--peers", default=",".join(PEERS), help="peers to run, comma-separated (empty: ours and the raw engine only)")
    p.add_argument("--concurrency", default="1,4,8,16", help="closed-loop client counts")
    p.add_argument("--rate-fractions", default="0.5,0.8", help="open-loop rates as fractions of our closed-loop saturation")
    p.add_argument("--rates", default="", help="open-loop rates in requests/s, overriding --rate-fractions (e.g. to repeat another run's offered load)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds before each measured window")
    p.add_argument("--duration", type=float, default=15.0, help="seconds in each closed-loop window")
    p.add_argument("--open-duration", type=float, default=40.0,
                   help="seconds in each open-loop window: long enough for a p99 over ~600 requests at half our peak, "
                   "not the 3rd-slowest of 200")
    p.add_argument("--wait-quiet", type=float, default=300.0,
                   help="first wait up to this long for other processes to use < 0.3 cores (0: start at once)")
    p.add_argument("--max-outstanding", type=int, default=64, help="open loop: client cap on unanswered requests")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request client timeout, seconds")
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=32, help="export max batch = the largest raw-engine batch measured")
    p.add_argument("--export-images", type=int, default=400, help="parity-gate images during export (0.99 agreement needs ≥ 380)")
    p.add_argument("--raw-seconds", type=float, default=3.0, help="raw engine: measure each batch size at least this long")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="keep the artifact and server logs here (default: temp dir, removed)")
    p.add_argument("--name", default=None, help="result file prefix (default: compare_<model>)")
    p.add_argument("--no-write", action="store_true", help="print only; write no result files")
    p.add_argument("--from-json", type=Path, default=None,
                   help="measure nothing: re-render targets, tables, figure and summary from a stored result JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from benchmarks.cli import quiet_libraries

    quiet_libraries()
    # SIGTERM (or SIGINT, which background shells ignore) must still stop the servers this run started: turn it
    # into SystemExit so every `with running_…` block's cleanup runs.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return _run(args, argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args, argv) -> int:
    if args.from_json:
        import json

        payload = json.loads(args.from_json.read_text())
        payload["targets"] = evaluate(payload, gpu=bool(payload["environment"]["gpu"]))
        payload["validity"] = validity(payload, (payload.get("validity") or {}).get("before_start"))
        payload["rendered_from_json_at"] = environment()["date"]
        return report(payload, args.from_json.stem.rsplit("_", 1)[0], write=not args.no_write)
    env = environment()
    quiet = wait_until_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
    load_before = load_average()
    t0 = time.perf_counter()
    result = run_compare(args)
    result["targets"] = evaluate(result, gpu=bool(env["gpu"]))
    result["validity"] = validity(result, quiet)
    payload = {
        "benchmark": "compare",
        "command": "vitserve bench compare " + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": env, "load_average": {"before": load_before, "after": load_average()},
        "wall_s": round(time.perf_counter() - t0, 1),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        **result,
    }
    return report(payload, args.name or f"compare_{result['model']['name']}", write=not args.no_write)


def report(payload: dict, name: str, *, write: bool) -> int:
    """Tables, figure, files and the summary block, from the payload alone (so a stored JSON can be re-rendered)."""
    env = payload["environment"]
    md = tables(payload)
    rows = summary_rows(payload)
    rows.append(("wall", f"{payload['wall_s']:.0f} s"))
    if write:
        from benchmarks.plot import latency_throughput

        png = latency_throughput(payload, result_stem(name, env).with_suffix(".png"),
                                 f"{payload['model']['name']} on {env['cpu']} ×{env['cpu_count']}: latency vs throughput")
        payload["figure"] = png.name
        md += f"\n\n![latency vs throughput]({png.name})"
        j, m = write_result(name, payload, md)
        rows.append(("written", f"{j.name}, {m.name}, {png.name} (benchmarks/results/)"))
    print()
    print(md)
    print()
    print_summary("compare", payload, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

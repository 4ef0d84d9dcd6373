"""Render: a measured and judged result → the markdown tables and the summary block's rows.

Pure formatting of a result dict (a fresh run's or a stored JSON's): nothing here measures or judges.
"""

from __future__ import annotations

from benchmarks.compare.judge import LOWER_IS_BETTER, ratio
from benchmarks.harness.load import saturation_run


def fmt(v, spec="{:.2f}"):
    return "-" if v is None else spec.format(v)


def _wanted(key: str) -> str:
    return "≤" if key in LOWER_IS_BETTER else "≥"


def progress_line(r: dict) -> str:
    """One load run, as the progress log prints it."""
    lat = r["latency"]
    return (f"{r['throughput_images_per_s']:7.2f} img/s  p50 {fmt(lat['p50_ms'], '{:.0f}')} ms  p99 {fmt(lat['p99_ms'], '{:.0f}')} ms  "
            f"other CPU {r['cpu']['other_processes_cores']:.2f}  errors {r['errors'] or '-'}")


# ---- the markdown -----------------------------------------------------------------------------------------------
def tables(result: dict) -> str:
    return "\n".join(_preamble(result) + _services(result) + _raw_engine(result) + _targets(result) + _stages(result))


def _preamble(result: dict) -> list[str]:
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
    return out


def _services(result: dict) -> list[str]:
    """Every service's row, ours ÷ each peer, and the raw engine's row."""
    svcs, raw, rates = result["services"], result["raw_engine"], result["offered_rates_rps"]
    ours = svcs["vitserve"]
    head = ["service", "saturation img/s (at c)", "Little's law img/s (same run)", "p50 / p99 ms at saturation"] + [f"p99 ms at {r}/s" for r in rates] + \
           ["errors (all runs)", "ours ÷ this: throughput"] + [f"ours ÷ this: p99 at {r}/s" for r in rates]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in svcs.items():
        sat = saturation_run(s["closed_loop"])
        errs: dict[str, int] = {}
        for r in s["closed_loop"] + s["open_loop"]:
            for k, n in r["errors"].items():
                errs[k] = errs.get(k, 0) + n
        row = [name, f"{s['saturation']['images_per_s']:.2f} (c={s['saturation']['concurrency']})",
               fmt(sat.get("littles_law_images_per_s")),
               f"{fmt(sat['latency']['p50_ms'], '{:.0f}')} / {fmt(sat['latency']['p99_ms'], '{:.0f}')}"]
        row += [fmt(o["latency"]["p99_ms"], "{:.0f}") for o in s["open_loop"]]
        row += [", ".join(f"{k}: {n}" for k, n in sorted(errs.items())) or "none"]
        if name == "vitserve":
            row += ["—"] + ["—"] * len(rates)
        else:
            row += [fmt(ratio(ours["saturation"]["images_per_s"], s["saturation"]["images_per_s"]), "{:.2f}×")]
            row += [fmt(ratio(o["latency"]["p99_ms"], p["latency"]["p99_ms"]), "{:.2f}×") for o, p in zip(ours["open_loop"], s["open_loop"])]
        out.append("| " + " | ".join(row) + " |")
    b = raw["best"]
    out.append(f"| raw engine, no server (batch {b['batch']}) | {b['engine_images_per_s']:.2f} engine only; "
               f"{b['end_to_end_images_per_s']:.2f} with decode+preprocess | | | " + " | ".join("" for _ in rates) +
               f" | | {ratio(ours['saturation']['images_per_s'], b['engine_images_per_s'])}× engine only; "
               f"{ratio(ours['saturation']['images_per_s'], b['end_to_end_images_per_s'])}× end to end |" + " |" * len(rates))
    out.append("")
    return out


def _raw_engine(result: dict) -> list[str]:
    """Other processes' CPU in each window, then the raw engine's passes and batch sizes."""
    raw, out = result["raw_engine"], []
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
    return out


def _targets(result: dict) -> list[str]:
    out = ["### Targets\n", "| target | wanted | measured | result | blame (our stage histograms) |", "|---|---|---|---|---|"]
    for k, t in result["targets"].items():
        if t.get("met") is None:
            out.append(f"| {k} | | | n/a | {t.get('why', '')} |")
            continue
        res = "MET" if t["met"] else f"MISSED by {t['missed_by']} ({t['missed_by_relative']:.1%})"
        out.append(f"| {k} | {_wanted(k)} {t['target']} | {t['measured']} | {res} | {t.get('blame', '') if not t['met'] else ''} |")
    out.append("")
    return out


def _stages(result: dict) -> list[str]:
    out = ["### Our service's stages per run (means over each measured window, from /metrics)\n",
           "Engine busy = Σ batch inference seconds ÷ window; batches are counted when they finish, so it can be off "
           "by up to one batch time ÷ window (e.g. above 1 with 1.6 s batches in a 10 s window).\n",
           "| run | img/s | p50 ms | p99 ms | mean batch | queue wait ms/img | inference ms/batch | inference ms/img | decode ms/img | engine busy |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    ours = result["services"]["vitserve"]
    for r in ours["closed_loop"] + ours["open_loop"]:
        s = r["server_stages"]
        load = f"closed c={r['concurrency']}" if r["mode"] == "closed" else f"open {r['target_rate_rps']}/s"
        out.append(f"| {load} | {r['throughput_images_per_s']:.2f} | {fmt(r['latency']['p50_ms'], '{:.0f}')} | {fmt(r['latency']['p99_ms'], '{:.0f}')} | "
                   f"{s.get('mean_batch_size', '-')} | {s.get('queue_wait_ms_per_image', '-')} | {s.get('inference_ms_per_batch', '-')} | "
                   f"{s.get('inference_ms_per_image', '-')} | {s.get('decode_ms_per_image', '-')} | {s.get('engine_busy_fraction', '-')} |")
    return out


# ---- the summary block ------------------------------------------------------------------------------------------
def summary_rows(result: dict) -> list[tuple[str, str]]:
    rows = [("model", f"{result['model']['name']} ({result['model'].get('gflops_per_image', '?')} GFLOP/img), engine file "
                      f"{result['model'].get('cpu_engine_file')}")]
    raw = result["raw_engine"]["best"]
    rows.append(("raw engine", f"{raw['engine_images_per_s']:.2f} img/s engine only, {raw['end_to_end_images_per_s']:.2f} with decode (batch {raw['batch']})"))
    for name, s in result["services"].items():
        sat = saturation_run(s["closed_loop"])
        opened = ", ".join(f"p99 {fmt(o['latency']['p99_ms'], '{:.0f}')} ms @ {o['target_rate_rps']}/s" for o in s["open_loop"])
        rows.append((name, f"{s['saturation']['images_per_s']:.2f} img/s at c={s['saturation']['concurrency']} "
                           f"(p99 {fmt(sat['latency']['p99_ms'], '{:.0f}')} ms); {opened}"))
    cpu = [(n, s["cpu"]["other_processes_cores_mean"]) for n, s in result["services"].items() if s.get("cpu")]
    rows.append(("other procs' CPU", ", ".join(f"{n} {c:.2f}" for n, c in cpu) + " cores, mean over windows (should be ~0)"))
    v = result.get("validity")
    if v:
        rows.append(("valid", "yes: " + v["note"] if v["valid"] else "NO: " + v["note"]))
    for k, t in result["targets"].items():
        if t.get("met") is None:
            rows.append((f"target {k}", "n/a"))
        else:
            rows.append((f"target {k}", f"{'MET' if t['met'] else 'MISSED'}: {t['measured']} (want {_wanted(k)} {t['target']})"))
    return rows

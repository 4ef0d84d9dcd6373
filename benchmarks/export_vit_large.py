"""Export a ViT-Large-shaped checkpoint (random weights, ~304M parameters) on CPU: time and peak memory.

    python -m benchmarks.export_vit_large [--max-images 16] [--labels 1000]

Builds the checkpoint from a config (nothing downloaded), runs the real `vitserve export` in a child
process and records its wall time, peak resident memory, per-stage timings, the gate figures and the
FP32-vs-INT8 CPU choice. Expect ~10+ minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness.results import environment, write_result
from benchmarks.models import checkpoint_shape, make_checkpoint
from finetune.shapes import parameter_count
from service.artifact import MANIFEST_NAME, read_manifest

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-images", type=int, default=16)
    p.add_argument("--labels", type=int, default=1000)
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vitl-export-"))
    ckpt, out = work / "vit-large-random", work / "artifact"
    make_checkpoint("vit-large", ckpt, labels=args.labels)  # ViT-L/16 @ 224, as google/vit-large-patch16-224
    n_params = parameter_count(checkpoint_shape(ckpt))
    cmd = [sys.executable, str(ROOT / "vitserve.py"), "export", str(ckpt), "-o", str(out), "--force",
           "--max-images", str(args.max_images), "--speed-seconds", "0"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB → GiB (Linux)
    print(proc.stdout)
    print(proc.stderr[-3000:], file=sys.stderr)
    export_report = read_manifest(out).export_report if (out / MANIFEST_NAME).exists() else {}
    sizes = {f.name: f.stat().st_size for f in out.rglob("*") if f.is_file()} if out.exists() else {}
    payload = {
        "benchmark": "export_vit_large",
        "command": "python -m benchmarks.export_vit_large " + " ".join(argv or sys.argv[1:]),
        "environment": environment(),
        "model": {"config": "ViT-L/16@224, random weights", "parameters": n_params, "labels": args.labels},
        "export_exit_code": proc.returncode,
        "wall_s": round(wall, 1),
        "peak_rss_gib": round(peak_gib, 2),
        "stage_timings_s": export_report.get("timings_s"),
        "cpu_engine": export_report.get("cpu_engine"),
        # Every candidate the gate measured, shipped or not (parity_report.json keeps the unshipped CPU one).
        "parity": {k.split(" ")[0]: v for k, v in json.loads((out / "parity_report.json").read_text())["engines"].items()}
        if (out / "parity_report.json").exists() else {},
        "file_sizes_bytes": sizes,
    }
    rows = ["| engine file | top-1 agree | top-5 overlap | max abs dlogit | max abs dprob | batch dlogit | gate |", "|---|---|---|---|---|---|---|"]
    for f, r in payload["parity"].items():
        if r:
            rows.append(f"| {f} | {r['top1_agreement']:.4f} | {r['top5_overlap']:.4f} | {r['max_abs_logit_diff']:.3g} | "
                        f"{r['max_abs_prob_diff']:.3g} | {r['batch_logit_diff']:.2g} | {'PASS' if r['passed'] else 'FAIL'} |")
    cpu = payload["cpu_engine"] or {}
    table = (f"ViT-L/16 ({n_params/1e6:.0f}M parameters) export on CPU: **{wall:.0f} s wall, peak RSS {peak_gib:.1f} GiB**, "
             f"exit code {proc.returncode}.\n\n" + "\n".join(rows) +
             "\n\nCPU candidates (img/s by batch): " + "; ".join(f"{k}: {v['images_per_s']}" for k, v in cpu.get("candidates", {}).items())
             + f"; shipped: {cpu.get('chosen')}")
    print(table)
    j, m = write_result("export_vit-large", payload, table)
    print(f"wrote {j} and {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

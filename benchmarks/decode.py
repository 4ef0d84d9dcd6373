"""Decode at the size it will be used: JPEG draft margins against decode time and parity.

    vitserve bench decode --config vit-small          # 224 px input; ~2 min on 2 cores

JPEG draft mode decodes in the DCT at 1/2, 1/4 or 1/8 scale; the manifest's ``preprocessing.jpeg_draft_margin`` says
how much larger than the model's input the draft must stay (0 = always full size). For each margin this measures
the serving decode + preprocess (``Preprocessor.from_bytes``) in ms per image on real photographs as 640×480,
1920×1080 and 4000×3000 JPEGs, and what the margin changes against a full-size decode: the model-input pixels
(uint8, after the resize) and the FP32 model's outputs on the same photos (top-1 agreement, max |Δprob|).
Results: benchmarks/results/decode_<model>_<env>.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.harness.results import checkpoint_for, command_line, environment, finish
from benchmarks.models import CONFIGS
from benchmarks.photos import realistic_photos

SIZES = ((640, 480), (1920, 1080), (4000, 3000))
MARGINS = (0.0, 2.0, 1.5, 1.0)


def decode_ms(pre, photos, repeats: int) -> float:
    times = []
    for p in photos:
        pre.from_bytes(p.data, max_pixels=10**9)  # warm
        for _ in range(repeats):
            t = time.perf_counter()
            pre.from_bytes(p.data, max_pixels=10**9)
            times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1000, 3)


def run(checkpoint: Path, repeats: int, log=print) -> dict:
    import torch

    from export.checkpoint import load_checkpoint
    from service.preprocess import Preprocessor
    from service.topk import softmax

    ckpt = load_checkpoint(str(checkpoint))
    by_size = {f"{w}x{h}": realistic_photos((w, h), formats=("JPEG",)) for w, h in SIZES}
    specs = {m: ckpt.preprocessing.model_copy(update={"jpeg_draft_margin": m}) for m in MARGINS}
    full = Preprocessor(specs[0.0])
    every = [p for photos in by_size.values() for p in photos]
    ref_u8 = np.stack([full.decode_uint8(p.data, max_pixels=10**9) for p in every]).astype(np.int16)
    with torch.inference_mode():
        ref_p = softmax(ckpt.model(torch.from_numpy(full.normalize(ref_u8.astype(np.uint8)))).numpy(), ckpt.temperature)
    rows = []
    for m, spec in specs.items():
        pre = Preprocessor(spec)
        u8 = np.stack([pre.decode_uint8(p.data, max_pixels=10**9) for p in every]).astype(np.int16)
        with torch.inference_mode():
            probs = softmax(ckpt.model(torch.from_numpy(pre.normalize(u8.astype(np.uint8)))).numpy(), ckpt.temperature)
        row = {"margin": m, "decode_ms": {k: decode_ms(pre, v, repeats) for k, v in by_size.items()},
               "pixel_max_abs_diff": int(np.abs(u8 - ref_u8).max()), "pixel_mean_abs_diff": round(float(np.abs(u8 - ref_u8).mean()), 3),
               "top1_agreement": float(np.mean(probs.argmax(1) == ref_p.argmax(1))), "max_abs_prob_diff": round(float(np.abs(probs - ref_p).max()), 5),
               "images": len(every)}
        rows.append(row)
        log(f"  margin {m}: {row['decode_ms']} ms; pixels max |Δ| {row['pixel_max_abs_diff']} mean {row['pixel_mean_abs_diff']}; "
            f"top-1 {row['top1_agreement']:.3f} max |Δprob| {row['max_abs_prob_diff']}")
    return {"input_size": list(full.input_size), "resample": ckpt.preprocessing.resample, "rows": rows}


def table(result: dict) -> str:
    sizes = [f"{w}x{h}" for w, h in SIZES]
    lines = ["| JPEG draft margin | " + " | ".join(f"decode ms/img {s}" for s in sizes) + " | pixels max / mean \\|Δ\\| (uint8) | top-1 agreement | max \\|Δprob\\| |",
             "|" + "---|" * (len(sizes) + 4)]
    for r in result["rows"]:
        label = "full size (0)" if r["margin"] == 0 else f"{r['margin']:g}×"
        lines.append(f"| {label} | " + " | ".join(f"{r['decode_ms'][s]:.2f}" for s in sizes)
                     + f" | {r['pixel_max_abs_diff']} / {r['pixel_mean_abs_diff']} | {r['top1_agreement']:.3f} | {r['max_abs_prob_diff']} |")
    return "\n".join(lines) + f"\n\nAgainst a full-size decode of the same {result['rows'][0]['images']} photographs; model input {result['input_size']}."


def main(argv: list[str] | None = None) -> int:
    from benchmarks.cli import HelpFormatter, quiet_libraries

    p = argparse.ArgumentParser(prog="vitserve bench decode", description=__doc__, formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", choices=sorted(CONFIGS), default="vit-small")
    src.add_argument("--checkpoint", type=Path)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--name", default=None, help="results file name (default: decode_<model>)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    quiet_libraries()
    with tempfile.TemporaryDirectory() as work:
        ckpt, _ = checkpoint_for(args, Path(work))
        result = run(ckpt, args.repeats)
    payload = {"benchmark": "decode", "command": command_line("decode", argv),
               "environment": environment(), "model": str(args.checkpoint or args.config), **result}
    md = table(result)
    print(md)
    rows = [(f"margin {r['margin']:g}", f"{r['decode_ms']} ms/img; top-1 {r['top1_agreement']:.3f}") for r in result["rows"]]
    name = args.name or f"decode_{Path(str(args.checkpoint)).name if args.checkpoint else args.config}"
    return finish("decode", payload, rows, table=md, name=None if args.no_write else name)


if __name__ == "__main__":
    sys.exit(main())

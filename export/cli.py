"""`vitserve export`: checkpoint → validated artifact, with the parity table printed and exit 1 on a failed gate."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from service.cli import HelpFormatter
from service.parity import DEFAULT_THRESHOLDS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vitserve export",
        description="Export a ViT checkpoint to an artifact: FP16 ONNX (GPU), the fastest of FP32 / INT8 ONNX that "
        "passes the gate (CPU), optional TensorRT plan and PyTorch weights, each checked against FP32 PyTorch, plus a "
        "golden set the service re-checks on the machine that serves.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("checkpoint", help="HF ViTForImageClassification directory (safetensors), a timm ViT folder, or hub id")
    p.add_argument("--output", "-o", type=Path, required=True, help="artifact directory to write")
    p.add_argument("--name", default=None, help="model name in the manifest (default: the checkpoint folder's name, or its run folder's for runs/NAME/checkpoint)")
    p.add_argument("--version", default="1", help="model version in the manifest")
    p.add_argument("--max-batch", type=int, default=64, help="largest batch every engine accepts")
    p.add_argument("--opt-batch", type=int, default=16, help="batch size TensorRT optimises for")
    p.add_argument("--tensorrt", action="store_true", help="also build an FP16 TensorRT plan (needs a GPU and tensorrt)")
    p.add_argument("--no-pytorch", dest="include_pytorch", action="store_false", help="do not copy safetensors weights for the PyTorch engine")
    p.add_argument("--calibration-dir", type=Path, default=None,
                   help="images for the parity gate and INT8 calibration, disjoint subsets (default: views of scikit-image's photographs)")
    p.add_argument("--max-images", type=int, default=1024,
                   help="parity-gate images; agreement is judged by its 95%% lower bound, so 0.99 needs at least 380")
    p.add_argument("--calibration-images", type=int, default=128, help="images that calibrate static INT8 (never gated on)")
    p.add_argument("--int8-calibration", choices=("percentile", "minmax"), default="percentile", help="static INT8 activation range rule")
    p.add_argument("--golden-images", type=int, default=32, help="golden-set images the service re-checks at startup")
    p.add_argument("--jpeg-draft-margin", type=float, default=1.0,
                   help="decode JPEGs at the smallest DCT scale keeping this × the input size (0: full size); in the manifest")
    p.add_argument("--cpu-candidates", default="fp32,int8-dynamic,int8-static",
                   help="CPU engines to build, gate and time by batch size; the fastest passing one ships (int8 = both schemes)")
    p.add_argument("--speed-seconds", type=float, default=0.5, help="time each candidate at least this long per batch size")
    p.add_argument(
        "--gate",
        action="append",
        default=[],
        metavar="PRECISION.METRIC=VALUE",
        help="override a parity threshold, e.g. fp16.max_abs_logit_diff=0.1 (repeatable). Defaults: "
        + "; ".join(f"{k}: {v.model_dump()}" for k, v in DEFAULT_THRESHOLDS.items()),
    )
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Our progress at INFO; the exporter's and quantiser's chatter (they log to the root logger) at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("vitserve").setLevel(logging.INFO)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.export internals' deprecation chatter
    from service.parity import format_table
    from export.pipeline import ExportOptions, export_artifact, parse_threshold_overrides, summarize_cpu_choice
    from export.tensorrt_build import TensorRTUnavailable

    try:
        thresholds = parse_threshold_overrides(args.gate)
        if args.max_batch < 1 or not 1 <= args.opt_batch:
            raise ValueError("--max-batch and --opt-batch must be at least 1")
        if args.max_images < 1 or args.golden_images < 1 or args.calibration_images < 0:
            raise ValueError("--max-images and --golden-images must be at least 1, --calibration-images at least 0")
        result = export_artifact(
            ExportOptions(
                checkpoint=args.checkpoint,
                output=args.output,
                name=args.name,
                version=args.version,
                max_batch=args.max_batch,
                opt_batch=args.opt_batch,
                tensorrt=args.tensorrt,
                include_pytorch=args.include_pytorch,
                calibration_dir=args.calibration_dir,
                max_images=args.max_images,
                calibration_images=args.calibration_images,
                int8_calibration=args.int8_calibration,
                golden_images=args.golden_images,
                jpeg_draft_margin=args.jpeg_draft_margin,
                cpu_candidates=tuple(c.strip() for c in args.cpu_candidates.split(",") if c.strip()),
                speed_seconds=args.speed_seconds,
                thresholds=thresholds,
                force=args.force,
            )
        )
    except TensorRTUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileExistsError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(result.reports))
    print(summarize_cpu_choice(result.manifest.export_report))
    print(f"artifact: {args.output}  (manifest.json, report: {result.report_path.name}, {result.timings_s['total']:.1f}s)")
    if not result.passed:
        print("PARITY GATE FAILED: see the table above; the artifact was written with the failing report.", file=sys.stderr)
        return 1
    print("parity gate: PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())

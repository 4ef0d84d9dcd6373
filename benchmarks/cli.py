"""`vitserve bench`: engine sweep, service load, and the peer comparison. Each subcommand owns its own options.

    vitserve bench engines --config vit-small          # every engine here × batch sizes (GPU: fraction of matmul)
    vitserve bench load --url http://127.0.0.1:3000     # load a running service (closed and open loop; --protocol grpc)
    vitserve bench protocols --images DIR               # the three protocols on every image of a labelled folder
    vitserve bench compare --config vit-small          # ours vs raw engine vs BentoML-idiomatic vs naive peer
    vitserve bench int8 --config vit-small             # INT8 schemes: img/s by batch and parity, old against new
    vitserve bench overload                            # 1x/2x/5x saturation on the demo: goodput, p99, refusals
    vitserve bench refusal-cost                        # server CPU per refused upload against uvicorn's floor
    vitserve bench batch-assembly                      # the batcher between requests and a fast stand-in engine
    vitserve bench engine-turns                        # ONNX Runtime's pool spinning against decode turns on the CPU
    vitserve bench door-budget                         # the event loop's CPU per request, layer by layer, in process
    vitserve bench gpu-check [--dry-run]               # the whole GPU proof in one run (docs/verification.md "GPU check")
    vitserve bench predict --images DIR                 # vitserve predict vs the raw engine on a folder
    vitserve bench autoscale                           # the shipped autoscaling rule, simulated on our measured curve
    vitserve bench fuzz                                # atheris on every request parser, 1,000,000 runs each
    vitserve bench soak                                # 30 min at 70 % of saturation: leaks and drift, minute by minute
    vitserve bench flops --config vit-large             # FLOPs per image of a config or checkpoint
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

SUBCOMMANDS = {
    "engines": ("benchmarks.engine_sweep", "every engine on this machine × a batch-size grid"),
    "load": ("benchmarks.service_load", "closed- and open-loop load against a running service URL"),
    "compare": ("benchmarks.compare", "our service vs the raw engine and two BentoML peers, one run"),
    "protocols": ("benchmarks.protocol_agreement", "every image of a labelled folder over /classify, KServe v2 HTTP and gRPC: same answers?"),
    "decode": ("benchmarks.decode", "JPEG draft margins: decode ms/image at 640x480 to 4000x3000 against parity"),
    "int8": ("benchmarks.int8_schemes", "old vs saturation-free INT8 schemes: speed by batch and parity (optionally on emulated AVX2)"),
    "front-door": ("benchmarks.front_door", "every protocol at c=16 against raw serial decode + engine: img/s, p99, server CPU per image"),
    "overload": ("benchmarks.overload", "1x, 2x, 5x saturation: goodput, accepted p99, refusals, unanswered requests, RSS"),
    "refusal-cost": ("benchmarks.refusal_cost", "server CPU per refused 61 KB upload against uvicorn's own floor, server on its own core"),
    "engine-turns": ("benchmarks.engine_turns", "a CPU engine taking turns with decoding: ONNX Runtime pool spinning settings, cycle img/s"),
    "door-budget": ("benchmarks.door_budget", "the event loop's CPU per request, layer by layer (uvicorn, body, door, top-k, render, hand-offs), in process"),
    "batch-assembly": ("benchmarks.batch_assembly", "the batcher alone with ViT-L-shaped rows and a stand-in engine: img/s against the engine's ceiling, event loop CPU per image"),
    "gpu-check": ("benchmarks.gpu_check", "the GPU path proven in one prepared run (<= 7.5 min): engines, GPU tests, memory, decode, service; --dry-run on CPU"),
    "predict": ("benchmarks.predict_throughput", "vitserve predict against the raw engine on one folder: img/s of each"),
    "autoscale": ("benchmarks.autoscale", "simulated replicas under the shipped KEDA rule vs a CPU rule: time over the SLO, replica-hours"),
    "soak": ("benchmarks.soak", "30 min at 70 % of saturation, every protocol and some bad requests: RSS, fds, threads, p99 per minute"),
    "fuzz": ("benchmarks.fuzz", "atheris (coverage-guided) on every request parser from valid seeds: executions, coverage, crashes"),
    "flops": ("benchmarks.cli", "FLOPs per image of a ViT config or checkpoint"),
}


from service.cli import HelpFormatter  # noqa: E402,F401 - the one help format of every `vitserve` command


def quiet_libraries() -> None:
    """Our progress lines only: the exporter's, quantiser's and transformers' chatter stays at WARNING or off."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("vitserve").setLevel(logging.WARNING)
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def flops_main(argv: list[str]) -> int:
    from pathlib import Path

    from benchmarks.models import CONFIGS, checkpoint_shape, vit_flops

    p = argparse.ArgumentParser(prog="vitserve bench flops", description="FLOPs per image (a multiply-add = 2 FLOPs)",
                                formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", choices=sorted(CONFIGS), default="vit-large")
    src.add_argument("--checkpoint", type=Path)
    args = p.parse_args(argv)
    shape = checkpoint_shape(args.checkpoint) if args.checkpoint else CONFIGS[args.config]
    f = vit_flops(shape)
    print(f"{args.checkpoint or args.config}: {f['total'] / 1e9:.2f} GFLOP/image "
          f"(encoder {f['encoder'] / 1e9:.2f}, patch embed {f['patch_embed'] / 1e9:.3f}, head {f['head'] / 1e9:.4f}; T={f['tokens']} tokens)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from vitserve import dispatch

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "flops":  # small enough to live here rather than in a module of its own
        return flops_main(argv[1:])
    return dispatch("vitserve bench", SUBCOMMANDS, argv, "vitserve bench <command> --help")


if __name__ == "__main__":
    sys.exit(main())

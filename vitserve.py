"""The `vitserve` command: one program, one subcommand per stage. Each stage owns its own argument parser."""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "export": ("export.cli", "checkpoint → validated FP16 ONNX / TensorRT / CPU artifact with a parity gate"),
    "serve": ("service.cli", "serve an artifact over HTTP with dynamic batching and Prometheus metrics"),
    "finetune": ("finetune.cli", "folder of class subfolders → fine-tuned ViT checkpoint with an evaluation report"),
    "predict": ("predict.cli", "score a folder of images offline with an artifact's engine → CSV/JSONL (+ accuracy)"),
    "plan": ("finetune.plan", "will it fit, how fast, which model: training/serving memory and speed estimates"),
    "explain": ("finetune.attention", "attention diagnostics: per-head entropy, collapsed heads, rollout maps"),
    "bench": ("benchmarks.cli", "engine sweep and service load benchmarks"),
}


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: vitserve <command> [options]   (vitserve <command> --help for its options; vitserve --version)", "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"vitserve {version('vitserve')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            from service import __version__

            print(f"vitserve {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"vitserve: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[command][0])  # imported lazily: `serve` never loads export code
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())

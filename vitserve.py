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
    "explain": ("finetune.explain", "attention diagnostics: per-head entropy, collapsed heads, rollout maps"),
    "bench": ("benchmarks.cli", "engine sweep and service load benchmarks"),
}


def usage(prog: str, subcommands: dict[str, tuple[str, str]], hint: str) -> str:
    width = max(map(len, subcommands))
    lines = [f"usage: {prog} <command> [options]   ({hint})", "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in subcommands.items()]
    return "\n".join(lines)


def dispatch(prog: str, subcommands: dict[str, tuple[str, str]], argv: list[str], hint: str) -> int:
    """Run ``argv[0]``'s module's ``main(argv[1:])``; usage on no command or -h, exit 2 on an unknown one. Shared by
    `vitserve` and `vitserve bench`. Modules are imported lazily: `serve` never loads export or training code."""
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(prog, subcommands, hint))
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in subcommands:
        print(f"{prog}: unknown command {command!r}\n\n{usage(prog, subcommands, hint)}", file=sys.stderr)
        return 2
    return int(importlib.import_module(subcommands[command][0]).main(rest) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--version":
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"vitserve {version('vitserve')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            from service import __version__

            print(f"vitserve {__version__}")
        return 0
    return dispatch("vitserve", SUBCOMMANDS, argv, "vitserve <command> --help for its options; vitserve --version")


if __name__ == "__main__":
    sys.exit(main())

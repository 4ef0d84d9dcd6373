"""`vitserve finetune`: the command line, generated from finetune.config.TrainConfig.

    vitserve finetune --train-dir data/train --base google/vit-base-patch16-224-in21k --output runs/flowers
    python -m finetune --help          # the same, without the top-level CLI

Exit codes: 0 done, 1 training failed (e.g. CUDA out of memory, NaN loss), 2 bad options or unusable data,
143 stopped by SIGTERM after saving its training state (continue with --resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing

from finetune.config import TrainConfig, UsageError, check
from service.cli import HelpFormatter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitserve finetune",
        description="Fine-tune a Hugging Face ViT on a folder of images (one subfolder per class).",
        formatter_class=HelpFormatter,
        epilog="Exit codes: 0 done, 1 training failed, 2 bad options or data, 143 stopped by SIGTERM (use --resume).",
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        meta = dict(f.metadata)
        title = meta.pop("group")
        group = groups[title] if title in groups else groups.setdefault(title, parser.add_argument_group(title))
        flags = ["--" + f.name.replace("_", "-"), *meta.pop("aliases", [])]
        kind = hints[f.name]
        if kind is bool:
            group.add_argument(*flags, dest=f.name, action="store_true", default=f.default, help=meta["help"])
            continue
        if isinstance(kind, types.UnionType):  # `int | None` -> int
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        default = argparse.SUPPRESS if meta.get("required") else f.default  # no "(default: None)" on required
        group.add_argument(*flags, dest=f.name, type=kind, default=default, **meta)
    return parser


def parse(argv: list[str] | None) -> TrainConfig:
    """argv -> TrainConfig; argparse itself exits with code 2 on unknown options or bad types."""
    namespace = build_parser().parse_args(argv)
    return TrainConfig(**vars(namespace))


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse(argv)
    except SystemExit as e:  # --help (0) or an argparse error (2, message already printed)
        return int(e.code or 0)
    try:
        for warning in check(cfg):
            if os.environ.get("RANK", "0") == "0":  # under torchrun, once
                print(f"warning: {warning}", file=sys.stderr)
        from finetune.train import run  # heavy imports (torch, transformers) only once the options are valid

        return run(cfg)
    except UsageError as e:
        print(f"vitserve finetune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m benchmarks.gpu_check`: the steps in order, each within its budget, under the run's time limit."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import benchmarks.gpu_check as package
from benchmarks.gpu_check.decode import step_decode
from benchmarks.gpu_check.engines import engines_step
from benchmarks.gpu_check.environment import step_environment
from benchmarks.gpu_check.gpu_tests import step_pytest
from benchmarks.gpu_check.packages import prepare_packages
from benchmarks.gpu_check.plan import DEMO_ARTIFACT, DRY_PLAN, GPU_PLAN, PROG, STEP_ORDER
from benchmarks.gpu_check.report import plot, summary_rows
from benchmarks.gpu_check.run import Run
from benchmarks.gpu_check.service import step_service
from benchmarks.gpu_check.training_memory import step_training_memory
from benchmarks.gpu_check.variants import compile_variants, engine_variants
from benchmarks.harness.results import print_summary


def build_parser() -> argparse.ArgumentParser:
    try:
        from benchmarks.cli import HelpFormatter
    except ImportError:  # pragma: no cover - the cli imports nothing heavy, but this check must start anywhere
        HelpFormatter = argparse.RawDescriptionHelpFormatter  # noqa: N806
    p = argparse.ArgumentParser(prog=PROG, description=package.__doc__, formatter_class=HelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="rehearse on CPU: tiny model and sizes, GPU-only parts skipped with their reason")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: benchmarks/results/gpu-check_<machine>/; dry run: build/gpu-check-dry-run/)")
    p.add_argument("--steps", default=",".join(STEP_ORDER),
                   help="the steps to run, comma-separated; `failed`: only those that failed or were skipped in OUT's "
                        "earlier results, which the new ones are merged into")
    p.add_argument("--time-limit", type=float, default=None,
                   help=f"seconds for the whole run (default: {GPU_PLAN.time_limit_s:.0f}, dry run {DRY_PLAN.time_limit_s:.0f})")
    p.add_argument("--server", choices=("auto", "bentoml", "uvicorn"), default="auto",
                   help="service step: `vitserve serve` (BentoML), our ASGI app under plain uvicorn, or BentoML where it imports")
    p.add_argument("--serve-artifact", type=Path, default=DEMO_ARTIFACT, help="the artifact the service step serves")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode of the compile step (Inductor)")
    p.add_argument("--replot", type=Path, default=None, metavar="JSON", help="only draw the figures of an earlier run's JSON, beside it")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one isolated step, for Run._in_child
    p.add_argument("--handoff", type=Path, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.replot:
        payload = json.loads(args.replot.read_text())
        for path in plot(payload, args.replot.parent, args.replot.stem).values():
            print(f"wrote {path}")
        return 0
    packages = prepare_packages()
    from benchmarks.cli import quiet_libraries

    quiet_libraries()
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    if args.dry_run:
        import torch

        # Tiny models gain nothing from threads, and on a shared 2-core machine two spinning OpenMP threads made the
        # demo model 50x slower (224 instead of 14 ms a call): the rehearsal checks that things run, not their speed.
        torch.set_num_threads(1)
    from benchmarks.harness.servers import bypass_proxies_for_loopback  # after prepare_packages: httpx may be carried

    bypass_proxies_for_loopback()  # the service step and the tests talk to 127.0.0.1: never through a proxy
    run = Run(plan, args, argv, packages)
    if not args.dry_run and not run.cuda:
        run.log("warning: no CUDA GPU visible; every GPU part is skipped with its reason (use --dry-run for the quick rehearsal)")
    steps = {
        "environment": ("environment", step_environment),
        "pytest": ("pytest", step_pytest),
        "engines": (f"engines/{plan.model}", engines_step(plan.model, engine_variants)),
        "engines/demo": ("engines/demo", engines_step("demo", engine_variants)),
        "training_memory": ("training_memory", step_training_memory),
        "decode": ("decode", step_decode),
        "service": ("service", step_service),
        "compile": (f"compile/{plan.model}", engines_step(plan.model, compile_variants)),
    }
    if args.child:  # in the child process of an isolated step: that step alone, directly
        run.hand_over(args.handoff)
        name, fn = steps[args.child]
        try:
            run.step(name, args.child, fn)
        finally:
            run.close()
        return 0
    wanted = run.resume() if args.steps == "failed" else [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = set(wanted) - set(steps)
    if unknown:
        print(f"unknown step(s) {sorted(unknown)}; choose from {', '.join(STEP_ORDER)} or `failed`", file=sys.stderr)
        return 2
    run.log(f"GPU check{' (dry run)' if args.dry_run else ''} → {run.out}; time limit {run.deadline - run.t0:.0f} s; "
            f"steps: {', '.join(k for k in STEP_ORDER if k in wanted)}")
    try:
        for kind in STEP_ORDER:
            if kind in wanted:
                name, fn = steps[kind]
                run.step(name, kind, fn)
        paths = run.save(figures=True)
    finally:
        run.close()
    rows = summary_rows(run.payload)
    files = run.payload["output_files"]
    rows.append(("written", ", ".join(str(p) for p in paths.values())))
    rows.append(("output folder", f"{files['count']} files, {files['depth']} folders deep "
                 + ("(within what comes back from a GPU machine)" if files["within_limits"] else f"(OVER the limits {files['limits']})")
                 + ": " + ", ".join(files["files"])))
    print_summary("GPU check" + (" (dry run)" if args.dry_run else ""), run.payload, rows)
    return 1 if any(s["status"] == "failed" for s in run.payload["sections"].values()) else 0

if __name__ == "__main__":
    sys.exit(main())

"""`vitserve predict IMAGES_DIR --output preds.csv`: score every file of a folder (recursively) offline, with the
artifact's engine and the service's own decoding, batching rule, calibration and top-k.

Exit codes: 0 every file scored; 1 some files could not be (each has a row with the service's error); 2 bad usage
(missing folder or artifact, an engine that may not run here, an output that exists without --resume/--force);
130 interrupted (the rows written so far stay: continue with --resume).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

from finetune.config import UsageError
from predict import shard, storage, summary
from predict.output import FORMATS, RowWriter, drop_partial_line, read_rows
from predict.run import open_classifier, score, settings_for
from service.cli import HelpFormatter, add_engine_options


def build_parser() -> argparse.ArgumentParser:
    from service.settings import Settings

    s = Settings()
    p = argparse.ArgumentParser(
        prog="vitserve predict",
        description="Score every file under IMAGES_DIR (recursively; hidden files skipped) with an artifact's engine "
        "exactly as `vitserve serve` would answer it: one row per file with its top-k labels and calibrated scores, or "
        "the service's error. When every file lies under a folder named after one of the artifact's labels, also "
        "writes accuracy, per-class figures and a confusion matrix next to the output. Exit codes: 0 all scored, "
        "1 some files failed, 2 bad usage, 130 interrupted.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("images_dir", metavar="IMAGES_DIR",
                   help="folder of images, searched recursively: a path, or an fsspec URL (s3://bucket/prefix, gs://, az://)")
    p.add_argument("--output", required=True,
                   help=f"rows file, format by suffix ({', '.join(FORMATS)}), a path or an fsspec URL; reports go beside it "
                   "(NAME.summary.json, ...)")
    add_engine_options(p, s)
    p.add_argument("--top-k", type=int, default=s.default_top_k, help="labels and scores per file")
    p.add_argument("--batch-size", type=int, default=s.max_batch_size,
                   help="images per engine call (capped by the engine's); unset: as the service, the engine's fastest batch "
                   "on this CPU, 32 on a GPU")
    p.add_argument("--max-image-pixels", type=int, default=s.max_image_pixels,
                   help="larger images get an image_too_large row, as in the service")
    p.add_argument("--no-startup-check", dest="startup_check", action="store_false",
                   help="skip re-checking the golden set through the engine on this machine")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--shard", metavar="I/N",
                       help="score only shard I of N (0-based) into OUTPUT's part (preds.shard-0000I-of-0000N.csv); "
                       "in a Kubernetes Indexed Job it defaults to JOB_COMPLETION_INDEX of JOB_COMPLETIONS")
    split.add_argument("--merge-shards", type=int, metavar="N",
                       help="merge the N parts written with --shard into OUTPUT, checking every file was scored exactly once")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="skip files already in --output (after an interruption) and append the rest")
    again.add_argument("--force", action="store_true", help="overwrite an existing --output")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar or startup lines (the bar is off anyway when stderr is not a terminal)")
    return p


def check_usage(args) -> tuple[object, list[str]]:
    """Everything that can be refused before loading an engine: the service's Settings and the artifact's labels."""
    from service.artifact import ArtifactError, read_manifest

    if not args.images.exists():
        raise UsageError(f"{args.images_dir}: no such folder")
    if args.output.suffix not in FORMATS:
        raise UsageError(f"--output {args.output_name}: the suffix chooses the format, one of {', '.join(FORMATS)}")
    if args.output.is_dir():
        raise UsageError(f"--output {args.output_name} is a folder; give a file name ending in {' or '.join(FORMATS)}")
    if args.output.exists() and not (args.resume or args.force):
        raise UsageError(f"{args.output_name} exists: --resume to continue it, --force to overwrite it")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    settings = settings_for(args.artifact, args.engine, batch_size=args.batch_size, startup_check=args.startup_check,
                            max_image_pixels=args.max_image_pixels)  # fmt: skip
    try:
        labels = read_manifest(settings.artifact).labels
    except ArtifactError as e:
        raise UsageError(str(e)) from None
    if not 1 <= args.top_k <= len(labels):
        raise UsageError(f"--top-k must be between 1 and {len(labels)} (the artifact's labels), got {args.top_k}")
    return settings, labels


def previous_rows(args, labels: list[str], log) -> list:
    """With --resume, the rows already in the output (a half-written last line cut off); otherwise a fresh file."""
    if not args.output.exists():
        return []
    if not args.resume:  # --force
        args.output.unlink()
        return []
    rows = read_rows(args.output, labels, args.top_k)  # refuses a file that is not ours before it is touched
    dropped = drop_partial_line(args.output)
    partial = f", a half-written line of {dropped} bytes dropped" if dropped else ""
    log(f"resuming {args.output_name}: {len(rows)} rows already written{partial}")
    return rows


def score_into(args, clf, todo: list[str]) -> float:
    """Rows for ``todo`` appended to the output a batch at a time, under a progress bar; returns the seconds taken."""
    try:
        from tqdm import tqdm
    except ImportError:  # the finetune extra brings it; without it, no bar
        tqdm = None
    start = time.perf_counter()
    show = tqdm is not None and not args.quiet and sys.stderr.isatty()
    bar = tqdm(total=len(todo), unit="img", desc="predict", smoothing=0.05) if show else contextlib.nullcontext()
    with RowWriter(args.output, args.top_k) as writer, bar:
        for rows in score(clf, args.images.read, todo, args.top_k):
            writer.write(rows)
            if args.staged is not None:
                args.staged.upload(now=False)  # a remote output, whole, every storage.UPLOAD_EVERY_S
            if show:
                bar.update(len(rows))
    return time.perf_counter() - start


def summarize(args, clf, files: list[str], timing: dict) -> dict:
    """The summary of every row now in the output, written to NAME.summary.json (with the class reports)."""
    m, paths = clf.manifest, summary.report_paths(args.output)
    listed = set(files)
    written = read_rows(args.output, m.labels, args.top_k)
    rows = [r for r in written if r.file in listed]
    out = {
        "images_dir": args.images.describe(), "output": output_location(args), "artifact": str(clf.settings.artifact),
        "model": f"{m.model.name} v{m.model.version}", "engine": clf.engine.name, "batch_size": clf.max_batch_size,
        "batch_size_reason": clf.max_batch_reason, "decode_threads": clf.threads.decode_threads, "top_k": args.top_k,
        "temperature": m.temperature, "counts": summary.counts(rows), "rows_for_other_files": len(written) - len(rows),
        "run": timing, "engine_selection": [a.summary() for a in clf.selection.attempts],
        **summary.class_figures(rows, files, m.labels, args.top_k, paths),
    }  # fmt: skip
    paths["summary.json"].write_text(json.dumps(out, indent=2) + "\n")
    out["written"] = [shown(args, args.output)] + [shown(args, p) for p in paths.values() if p.exists()]
    return out


def our_files(output: Path, count: int | None) -> list[Path]:
    """What this command writes for ``output`` (and, split N ways, every part), never scored as input."""
    outputs = [output, *(shard.parts(output, count) if count else [])]
    return [path for out in outputs for path in (out, *summary.report_paths(out).values())]


def run(args, log) -> int:
    merged = args.output
    split = shard.parse(args.shard) if args.shard else None if args.merge_shards else shard.from_environment()
    if args.merge_shards is not None and args.merge_shards < 1:
        raise UsageError(f"--merge-shards must be at least 1, got {args.merge_shards}")
    if split is not None:
        args.output = split.part(merged)  # this shard's part: resumed, forced and summarised on its own
        args.output_name = shown(args, args.output)
    if args.staged is not None:  # what this run reads or continues, from the bucket: its own files only
        needed = our_files(merged, args.merge_shards) if args.merge_shards else our_files(args.output, None)
        if found := args.staged.download([p.name for p in needed]):
            log(f"{args.output_name}: downloaded {', '.join(found)} from the bucket")
    settings, labels = check_usage(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    ours = our_files(merged, split.count if split else args.merge_shards)
    remote_ours = [args.staged.remote(p.name) for p in ours] if args.staged is not None else []
    files = args.images.files(exclude=ours, exclude_remote=remote_ours)
    if not files:
        raise UsageError(f"{args.images_dir}: no files to score (hidden files and folders are skipped)")
    if args.merge_shards:
        return merge(args, labels, files, log)
    if split is not None:
        files = [f for f in files if split.owns(f)]
        log(f"shard {split}: {len(files)} files → {args.output_name}")
    done = {r.file for r in previous_rows(args, labels, log)}
    start = time.perf_counter()
    clf = open_classifier(settings)
    startup_s = time.perf_counter() - start
    if args.batch_size is not None:  # the service names its own setting
        clf.max_batch_reason = "--batch-size (or VITSERVE_MAX_BATCH_SIZE), capped by the engine's limit"
    todo = [f for f in files if f not in done]
    log(f"engine {clf.engine.name} ({clf.selection.attempts[-1].reason}); batch {clf.max_batch_size}: {clf.max_batch_reason}")
    log(f"{len(todo)} of {len(files)} files to score → {args.output_name}")
    try:
        scoring_s = score_into(args, clf, todo)
    except KeyboardInterrupt:
        written = len(read_rows(args.output, labels, args.top_k))
        print(f"\ninterrupted: {written} rows are in {args.output_name}; run again with --resume to continue", file=sys.stderr)
        return 130
    timing = {"rows_written": len(todo), "resumed_rows": len(files) - len(todo), "startup_s": round(startup_s, 2),
           "scoring_s": round(scoring_s, 3), "images_per_s": round(len(todo) / scoring_s, 1) if todo else 0.0}  # fmt: skip
    out = summarize(args, clf, files, timing)
    print("\n".join(summary.describe(out) + ["wrote " + ", ".join(out["written"])]))
    return 1 if out["counts"]["failed"] else 0


def merge(args, labels: list[str], files: list[str], log) -> int:
    """OUTPUT from the N parts: every listed file's row exactly once (sorted by file), and the summary's counts and
    class figures over them."""
    count = args.merge_shards
    listed = set(files)
    rows_by_shard = []
    for part in shard.parts(args.output, count):
        if not part.exists():
            raise UsageError(f"{part} does not exist: run that shard (--shard I/{count}) first")
        rows_by_shard.append([r for r in read_rows(part, labels, args.top_k) if r.file in listed])
    rows = sorted(shard.check_complete(files, rows_by_shard, count), key=lambda r: r.file)
    if args.output.exists():
        args.output.unlink()  # --force (check_usage refused it otherwise); --resume has nothing to resume here
    with RowWriter(args.output, args.top_k) as writer:
        writer.write(rows)
    paths = summary.report_paths(args.output)
    out = {"images_dir": args.images.describe(), "output": output_location(args), "shards": count,
           "top_k": args.top_k, "counts": summary.counts(rows), **summary.class_figures(rows, files, labels, args.top_k, paths)}
    paths["summary.json"].write_text(json.dumps(out, indent=2) + "\n")
    c = out["counts"]
    print(f"merged {count} shards: {c['files']} files ({c['scored']} scored, {c['failed']} failed), each exactly once → {args.output_name}")
    if "accuracy" in out:
        print(f"accuracy {out['accuracy']:.2%} over {out['metrics']['num_samples']} scored images in {out['classes']} class folders")
    return 1 if c["failed"] else 0


def shown(args, path: Path) -> str:
    """A file this run writes, as the user named its place (the bucket's URL for a staged remote output)."""
    if args.staged is None:
        return str(path)
    return f"{args.staged.url.rsplit('/', 1)[0]}/{path.name}"


def output_location(args) -> str:
    return args.output_name if args.staged is not None else str(args.output.resolve())


def open_locations(args, log) -> None:
    """IMAGES_DIR and --output as given (paths or URLs): a remote output is staged in a local folder, where the run
    writes (run() downloads the files it continues from)."""
    args.images = storage.Folder(args.images_dir)
    args.output_name, args.staged = args.output, None
    if storage.is_url(args.output):
        args.staged = storage.StagedOutput(args.output)
        args.output = args.staged.local
    else:
        args.output = Path(args.output)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = (lambda *_: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        open_locations(args, log)
        return run(args, log)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if getattr(args, "staged", None) is not None:
            args.staged.upload()  # what was written, even after an interruption or a refusal
            args.staged.close()


if __name__ == "__main__":
    sys.exit(main())

"""`vitserve predict` against the raw engine on the same folder: what reading, decoding and writing rows cost.

    vitserve bench predict --images data/fashion-mnist/test     # demo artifact, Fashion-MNIST test: ~1 min

The raw engine is the one predict ran, at its batch size, on up to 1,024 images preprocessed in memory (cycled to
the folder's count). Results: benchmarks/results/predict-throughput_<artifact>_<env>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.harness.measure import load_average
from benchmarks.harness.results import command_line, environment, finish


def main(argv: list[str] | None = None) -> int:
    from benchmarks.cli import HelpFormatter
    from predict.cli import main as predict
    from predict.folder import list_files
    from predict.run import open_classifier, settings_for
    from service.settings import DEMO_ARTIFACT

    p = argparse.ArgumentParser(prog="vitserve bench predict", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--images", type=Path, required=True, help="a folder of images (class subfolders optional)")
    p.add_argument("--artifact", type=Path, default=DEMO_ARTIFACT)
    args = p.parse_args(argv)
    load_before, start = load_average(), time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        code = predict([str(args.images), "--artifact", str(args.artifact), "--output", f"{work}/p.csv", "--quiet"])
        run = json.loads(Path(work, "p.summary.json").read_text())
    wall, b = time.perf_counter() - start, run["batch_size"]
    clf = open_classifier(settings_for(args.artifact, "auto", batch_size=b, startup_check=False, max_image_pixels=10**9))
    files = list_files(args.images)
    pixels = np.stack([clf.preprocessor.from_bytes((args.images / f).read_bytes(), max_pixels=10**9) for f in files[:1024]])
    start = time.perf_counter()
    for i in range(0, len(files), b):
        clf.engine.run(pixels[np.arange(i, min(i + b, len(files))) % len(pixels)])  # (b, 3, H, W)
    rows = [("raw engine: engine.run on preprocessed batches", len(files), time.perf_counter() - start),
            ("vitserve predict: read, decode, engine, top-k, rows", run["run"]["rows_written"], run["run"]["scoring_s"]),
            ("vitserve predict with startup and summary", run["run"]["rows_written"], wall)]  # fmt: skip
    table = "\n".join(["| | images | seconds | img/s |", "|---|---|---|---|"] + [f"| {w} | {n} | {s:.2f} | {n / s:,.0f} |" for w, n, s in rows])
    table += f"\n\n{run['engine']}, batch {b}, {run['decode_threads']} decode threads; top-1 {run.get('accuracy')}"
    print(table)
    payload = {"benchmark": "predict-throughput", "command": command_line("predict", argv),
               "environment": environment(), "load_average": {"before": load_before, "after": load_average()}, "images": str(args.images),
               "exit_code": code, "engine": run["engine"], "batch_size": b, "accuracy": run.get("accuracy"),
               "rows": [{"what": w, "images": n, "seconds": round(s, 3), "images_per_s": round(n / s, 1)} for w, n, s in rows]}  # fmt: skip
    return finish("predict throughput", payload, [(w, f"{n / s:,.0f} img/s") for w, n, s in rows], table=table,
                  name=f"predict-throughput_{args.artifact.name}")


if __name__ == "__main__":
    sys.exit(main())

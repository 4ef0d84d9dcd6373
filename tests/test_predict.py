"""`vitserve predict` end to end: the real command in a subprocess, a real exported artifact, real photographs.

Expected answers come from the artifact's engine run directly (service.preprocess → engine.run → service.topk), the
path the service answers with, so a row that differs from what the service would say fails here.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, TINY_LABELS, run_cli

pytestmark = pytest.mark.timeout(600)

# The service's ranking of single images can differ from one inside a batch by float32 rounding in the GEMMs
# (the export gate bounds it); scores then differ in the last bits, never in the label order of these photos.
SCORE_TOLERANCE = dict(rtol=1e-5, atol=1e-7)


def predict(*args) -> subprocess.CompletedProcess:
    return run_cli("predict", *map(str, args))


def write_files(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def csv_rows(path: Path) -> list[dict]:
    """The CSV read with the csv module alone (not predict's own reader): the format as a user's script sees it."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def top_of(row: dict, k: int) -> tuple[list[str], list[float]]:
    return [row[f"label_{i}"] for i in range(1, k + 1)], [float(row[f"score_{i}"]) for i in range(1, k + 1)]


@functools.cache
def served_by(artifact: Path):
    """bytes → the service's top-k for that image alone, through the engine `auto` picks here for ``artifact``."""
    from service.artifact import load_artifact
    from service.engines import load_engine
    from service.preprocess import Preprocessor
    from service.settings import Settings
    from service.topk import predictions

    art = load_artifact(artifact)
    engine = load_engine(art, "auto")
    pre, m = Preprocessor(art.manifest.preprocessing), art.manifest

    def top(data: bytes, k: int = 5):
        x = pre.from_bytes(data, max_pixels=Settings().max_image_pixels)[None]  # (1, 3, H, W)
        return predictions(engine.run(x), m.labels, temperature=m.temperature, k=k)[0]

    top.engine, top.temperature = engine.name, m.temperature
    return top


@pytest.fixture(scope="module")
def served(tiny_artifact):
    return served_by(tiny_artifact)


@pytest.fixture(scope="module")
def nested_folder(tmp_path_factory, photo_bytes) -> tuple[Path, dict[str, bytes]]:
    """12 photographs at three depths, JPEG and PNG."""
    root = tmp_path_factory.mktemp("nested") / "images"
    places = ["", "a/", "a/b/", "c/"]
    files = {f"{places[i % 4]}{name}": data for i, (name, data) in enumerate(photo_bytes[:12])}
    write_files(root, files)
    return root, files


@pytest.fixture(scope="module")
def csv_run(nested_folder, tiny_artifact, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("out") / "preds.csv"
    proc = predict(nested_folder[0], "--artifact", tiny_artifact, "--output", out, "--top-k", 3, "--batch-size", 4)
    return proc, out


def test_csv_has_one_row_per_file_found_recursively_with_the_service_top_k(csv_run, nested_folder, served):
    proc, out = csv_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _, files = nested_folder
    with open(out, newline="") as f:
        assert next(csv.reader(f)) == ["file", "label_1", "score_1", "label_2", "score_2", "label_3", "score_3", "error"]
    rows = csv_rows(out)
    assert sorted(r["file"] for r in rows) == sorted(files)  # a/b/… too: every depth, each file once
    assert any(r["file"].count("/") == 2 for r in rows)
    for row in rows:
        want = served(files[row["file"]], k=3)
        labels, scores = top_of(row, 3)
        assert labels == [p.label for p in want], row["file"]
        np.testing.assert_allclose(scores, [p.score for p in want], **SCORE_TOLERANCE)
        assert row["error"] == ""
    summary = json.loads(out.with_name("preds.summary.json").read_text())
    assert summary["engine"] == served.engine and summary["batch_size"] == 4
    assert summary["counts"] == {"files": 12, "scored": 12, "failed": 0, "errors_by_type": {}}
    assert "accuracy" not in summary and not out.with_name("preds.per_class.csv").exists()  # not laid out by label
    assert "12 files: 12 scored, 0 failed" in proc.stdout


def test_jsonl_rows_are_the_csv_rows(csv_run, nested_folder, tiny_artifact, tmp_path):
    out = tmp_path / "preds.jsonl"
    proc = predict(nested_folder[0], "--artifact", tiny_artifact, "--output", out, "--top-k", 3, "--batch-size", 4)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    by_file = {r["file"]: r for r in csv_rows(csv_run[1])}
    assert sorted(r["file"] for r in records) == sorted(by_file)
    for record in records:
        assert record["error"] is None
        assert [p["index"] for p in record["top_k"]] == [TINY_LABELS.index(p["label"]) for p in record["top_k"]]
        # Same batches in both runs: the very same numbers, written at full precision by both formats.
        assert ([p["label"] for p in record["top_k"]], [p["score"] for p in record["top_k"]]) == top_of(by_file[record["file"]], 3)


def test_default_artifact_is_the_demo_and_scores_are_at_its_temperature(nested_folder, tmp_path):
    from service.settings import DEMO_ARTIFACT

    demo = served_by(DEMO_ARTIFACT)
    assert demo.temperature != 1.0  # else a softmax at the wrong temperature would go unseen
    root, files = nested_folder
    out = tmp_path / "preds.csv"
    proc = predict(root, "--output", out, "--top-k", 2)  # no --artifact
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for row in csv_rows(out):
        want = demo(files[row["file"]], k=2)
        assert top_of(row, 2)[0] == [p.label for p in want]
        np.testing.assert_allclose(top_of(row, 2)[1], [p.score for p in want], **SCORE_TOLERANCE)
    assert json.loads((tmp_path / "preds.summary.json").read_text())["model"] == "fashion-mnist-vit v1"


def test_unreadable_files_get_the_service_error_and_exit_code_1(tiny_artifact, photo_bytes, tmp_path):
    root = tmp_path / "mixed"
    truncated_jpeg = next(data for name, data in photo_bytes if name.endswith(".jpeg"))
    write_files(root, {"good1.png": photo_bytes[0][1], "sub/good2.jpg": photo_bytes[1][1],
                       "broken.jpg": truncated_jpeg[: len(truncated_jpeg) // 2], "notes.txt": b"not an image at all\n",
                       "empty.png": b""})  # fmt: skip
    out = tmp_path / "preds.csv"
    proc = predict(root, "--artifact", tiny_artifact, "--output", out)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = {r["file"]: r for r in csv_rows(out)}
    assert set(rows) == {"good1.png", "sub/good2.jpg", "broken.jpg", "notes.txt", "empty.png"}
    assert rows["broken.jpg"]["error"].startswith("invalid_image: ") and "truncated" in rows["broken.jpg"]["error"]
    assert rows["notes.txt"]["error"] == "unsupported_image: image 0 is not a recognised image format"
    assert rows["empty.png"]["error"] == "unsupported_image: image 0 is empty"
    for bad in ("broken.jpg", "notes.txt", "empty.png"):
        assert rows[bad]["label_1"] == "" and rows[bad]["score_1"] == ""
    for good in ("good1.png", "sub/good2.jpg"):
        assert rows[good]["error"] == "" and rows[good]["label_1"] in TINY_LABELS
    summary = json.loads((tmp_path / "preds.summary.json").read_text())
    assert summary["counts"] == {"files": 5, "scored": 2, "failed": 3,
                                 "errors_by_type": {"invalid_image": 1, "unsupported_image": 2}}  # fmt: skip
    assert "5 files: 2 scored, 3 failed (1 invalid_image, 2 unsupported_image)" in proc.stdout


@pytest.fixture(scope="module")
def slow_folder(tmp_path_factory, photo_bytes) -> Path:
    """60 files of 12 distinct 1200×900 PNGs (hard links: five names each). Large PNGs have no draft decoding, so a
    run takes long enough to be killed midway on any machine."""
    root = tmp_path_factory.mktemp("slow") / "images"
    (root / "more").mkdir(parents=True)
    for i, (name, data) in enumerate(photo_bytes[:12]):
        big = Image.open(io.BytesIO(data)).convert("RGB").resize((1200, 900), Image.Resampling.BICUBIC)
        first = root / f"{i:02d}-{Path(name).stem}.png"
        big.save(first, compress_level=1)
        for copy in range(1, 5):
            os.link(first, (root / "more" if copy % 2 else root) / f"{i:02d}-copy{copy}.png")
    return root


def wait_for_rows(path: Path, rows: int, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not (path.exists() and path.read_bytes().count(b"\n") >= rows + 1):  # + the header
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()}"
        assert time.monotonic() < deadline, f"no {rows} rows in {path} after {timeout_s} s"
        time.sleep(0.01)


def test_resume_after_sigkill_gives_one_row_per_file_and_the_same_scores(slow_folder, tiny_artifact, tmp_path):
    out, reference = tmp_path / "preds.csv", tmp_path / "reference.csv"
    args = [str(slow_folder), "--artifact", str(tiny_artifact), "--batch-size", "2"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "vitserve.py"), "predict", *args, "--output", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        wait_for_rows(out, 6, proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    before = csv_rows(out)
    assert 6 <= len(before) < 60, f"{len(before)} rows: the kill did not land midway"
    with open(out, "a") as f:  # what a kill in the middle of a write leaves: a line without its end
        f.write("more/07-copy1.png,class_3,0.12")

    resumed = run_cli("predict", *args, "--output", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "half-written line of 30 bytes dropped" in resumed.stderr and f"{60 - len(before)} of 60 files to score" in resumed.stderr
    after = csv_rows(out)
    assert [r["file"] for r in after[: len(before)]] == [r["file"] for r in before]  # appended, nothing rewritten
    assert sorted(r["file"] for r in after) == sorted(set(r["file"] for r in after)) and len(after) == 60

    whole = run_cli("predict", *args, "--output", str(reference))
    assert whole.returncode == 0, whole.stdout + whole.stderr
    want = {r["file"]: top_of(r, 5) for r in csv_rows(reference)}
    for row in after:
        labels, scores = top_of(row, 5)
        assert labels == want[row["file"]][0], row["file"]
        np.testing.assert_allclose(scores, want[row["file"]][1], **SCORE_TOLERANCE)


def test_class_folders_give_finetune_metrics_that_agree_with_the_rows(tiny_artifact, photo_bytes, served, tmp_path):
    root = tmp_path / "labelled"
    files = {}
    for i, (name, data) in enumerate(photo_bytes[:12]):
        top1 = served(data)[0].index
        # Half in the folder of the label the model gives them, half in another: the accuracy must come out at 50 %.
        folder = TINY_LABELS[top1 if i % 2 == 0 else (top1 + 1 + i % 3) % len(TINY_LABELS)]
        files[f"{folder}/{name}"] = data
    write_files(root, files)
    out = tmp_path / "out" / "preds.jsonl"
    proc = predict(root, "--artifact", tiny_artifact, "--output", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    records = [json.loads(line) for line in out.read_text().splitlines()]
    correct = sum(r["top_k"][0]["label"] == r["file"].split("/")[0] for r in records)
    summary = json.loads((tmp_path / "out" / "preds.summary.json").read_text())
    assert correct == 6 and summary["correct"] == 6 and summary["accuracy"] == correct / len(records) == 0.5
    assert summary["metrics"]["top1"] == pytest.approx(0.5) and summary["metrics"]["num_samples"] == 12
    assert "top5" in summary["metrics"] and "loss" not in summary["metrics"]  # top-5 of 10 labels: no true-label score
    in_folders = Counter(f.split("/")[0] for f in files)
    per_class = csv_rows(tmp_path / "out" / "preds.per_class.csv")
    assert {r["label"]: int(r["support"]) for r in per_class} == in_folders
    confusion = np.array(summary["confusion"]["rows_true_columns_predicted"])
    assert confusion.shape == (10, 10) and np.trace(confusion) == 6
    assert {TINY_LABELS[i]: int(n) for i, n in enumerate(confusion.sum(1)) if n} == in_folders
    assert Image.open(tmp_path / "out" / "preds.confusion.png").format == "PNG"
    assert "accuracy 50.00%" in proc.stdout


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing folder", "no such folder"),
        ("missing artifact", "not a vitserve artifact"),
        ("bad suffix", "the suffix chooses the format"),
        ("output exists", "exists: --resume to continue it, --force to overwrite it"),
        ("top-k too large", "--top-k must be between 1 and 10"),
        ("resume another top-k", "not written by `vitserve predict` with this artifact and --top-k 3"),
        ("empty folder", "no files to score"),
        ("shard out of range", "--shard 3/3: I must be between 0 and N-1"),
        ("shard not I/N", "expected I/N"),
        ("merge before the shards ran", "preds.shard-00000-of-00002.csv does not exist: run that shard"),
    ],
)
def test_bad_usage_exits_2_with_a_clear_message(case, message, tiny_artifact, photo_bytes, tmp_path, capsys):
    from predict.cli import main

    images, empty, out = tmp_path / "images", tmp_path / "empty", tmp_path / "preds.csv"
    write_files(images, {"a.png": photo_bytes[0][1]})
    empty.mkdir()
    args = {
        "missing folder": [tmp_path / "nope", "--output", out],
        "missing artifact": [images, "--output", out, "--artifact", tmp_path / "no-artifact"],
        "bad suffix": [images, "--output", tmp_path / "preds.txt"],
        "output exists": [images, "--output", out],
        "top-k too large": [images, "--output", out, "--top-k", 11],
        "resume another top-k": [images, "--output", out, "--top-k", 3, "--resume"],
        "empty folder": [empty, "--output", out],
        "shard out of range": [images, "--output", out, "--shard", "3/3"],
        "shard not I/N": [images, "--output", out, "--shard", "first"],
        "merge before the shards ran": [images, "--output", out, "--merge-shards", 2],
    }[case]
    if case in ("output exists", "resume another top-k"):
        out.write_text("file,label_1,score_1,label_2,score_2,label_3,score_3,label_4,score_4,label_5,score_5,error\n")
    argv = [str(a) for a in args]
    if "--artifact" not in argv:
        argv += ["--artifact", str(tiny_artifact)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err


def test_an_indexed_job_pod_without_the_shard_count_is_refused(tiny_artifact, photo_bytes, tmp_path, monkeypatch, capsys):
    from predict.cli import main

    write_files(tmp_path / "images", {"a.png": photo_bytes[0][1]})
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    monkeypatch.delenv("JOB_COMPLETIONS", raising=False)
    assert main([str(tmp_path / "images"), "--output", str(tmp_path / "p.csv"), "--artifact", str(tiny_artifact)]) == 2
    assert "JOB_COMPLETION_INDEX is set but JOB_COMPLETIONS is not" in capsys.readouterr().err


def test_bad_usage_exit_code_of_the_real_command(tmp_path):
    missing = predict(tmp_path / "nope", "--output", tmp_path / "p.csv")
    assert missing.returncode == 2 and f"error: {tmp_path / 'nope'}: no such folder" in missing.stderr
    both = predict(tmp_path, "--output", tmp_path / "p.csv", "--resume", "--force")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


def test_three_shards_as_an_indexed_job_then_merge_equal_one_unsharded_run(slow_folder, tiny_artifact, tmp_path):
    """Three processes with JOB_COMPLETION_INDEX 0..2 (as an Indexed Job's pods), one killed midway and re-run with
    --resume, then the merge: every file scored exactly once, the same rows as one unsharded run."""
    from predict.shard import Shard

    out, reference = tmp_path / "preds.csv", tmp_path / "reference.csv"
    args = [str(slow_folder), "--artifact", str(tiny_artifact), "--batch-size", "2", "--output", str(out)]
    env = lambda i: {**os.environ, "JOB_COMPLETION_INDEX": str(i), "JOB_COMPLETIONS": "3"}  # noqa: E731
    parts = [Shard(i, 3).part(out) for i in range(3)]
    procs = [subprocess.Popen([sys.executable, str(ROOT / "vitserve.py"), "predict", *args], cwd=ROOT, env=env(i),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(3)]  # fmt: skip
    try:
        wait_for_rows(parts[1], 2, procs[1])
        procs[1].send_signal(signal.SIGKILL)
    finally:
        procs[1].kill()
        procs[1].communicate()
    for p in (procs[0], procs[2]):
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stdout.decode() + stderr.decode()
    owned = {i: sorted(f for f in map(lambda r: r["file"], csv_rows(parts[i]))) for i in range(3)}
    assert all(Shard(i, 3).owns(f) for i in owned for f in owned[i])
    assert 2 <= len(owned[1]) < 60 - len(owned[0]) - len(owned[2]), "the kill did not land midway"

    incomplete = run_cli("predict", *args, "--merge-shards", "3")
    assert incomplete.returncode == 2 and "shard 1/3 lacks" in incomplete.stderr, incomplete.stderr
    resumed = subprocess.run([sys.executable, str(ROOT / "vitserve.py"), "predict", *args, "--resume"], cwd=ROOT,
                             env=env(1), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    merged = run_cli("predict", *args, "--merge-shards", "3")
    assert merged.returncode == 0, merged.stdout + merged.stderr
    assert "merged 3 shards: 60 files (60 scored, 0 failed), each exactly once" in merged.stdout

    whole = run_cli("predict", *args[:-1], str(reference))
    assert whole.returncode == 0, whole.stdout + whole.stderr
    rows, want = csv_rows(out), {r["file"]: top_of(r, 5) for r in csv_rows(reference)}
    assert [r["file"] for r in rows] == sorted(want) and len(rows) == 60  # each file once, in one file
    for row in rows:
        labels, scores = top_of(row, 5)
        assert labels == want[row["file"]][0], row["file"]
        np.testing.assert_allclose(scores, want[row["file"]][1], **SCORE_TOLERANCE)
    assert json.loads(out.with_name("preds.summary.json").read_text())["counts"]["files"] == 60


def test_a_shard_is_a_fixed_share_and_the_shards_cover_every_file_once():
    from predict.shard import Shard, parse

    files = [f"class_{i % 7}/img_{i}.jpg" for i in range(3000)]
    owners = [[i for i in range(5) if Shard(i, 5).owns(f)] for f in files]
    assert all(len(o) == 1 for o in owners)
    sizes = Counter(o[0] for o in owners)
    assert min(sizes.values()) > 0.8 * 600 and max(sizes.values()) < 1.2 * 600, sizes  # balanced
    assert parse("2/5") == Shard(2, 5) and Shard(2, 5).part(Path("out/p.jsonl")) == Path("out/p.shard-00002-of-00005.jsonl")


# ---- object storage ----------------------------------------------------------------------------------------------
def test_images_from_and_predictions_to_object_storage_equal_the_local_run(s3_server, csv_run, nested_folder, tiny_artifact):
    env, client = s3_server
    root, files = nested_folder
    for rel, data in files.items():
        client.put_object(Bucket="photos", Key=f"shop/{rel}", Body=data)
    client.put_object(Bucket="photos", Key="shop/.hidden/skip.png", Body=b"not scored")
    args = ["s3://photos/shop", "--artifact", str(tiny_artifact), "--top-k", "3", "--batch-size", "4"]

    remote = run_cli("predict", *args, "--output", "s3://photos/out/preds.csv", env=env)
    assert remote.returncode == 0, remote.stdout + remote.stderr
    body = client.get_object(Bucket="photos", Key="out/preds.csv")["Body"].read().decode()
    local = csv_run[1].read_text()
    assert body == local  # every row, byte for byte, as from the local folder
    summary = json.loads(client.get_object(Bucket="photos", Key="out/preds.summary.json")["Body"].read())
    assert summary["counts"]["files"] == len(files) and summary["output"] == "s3://photos/out/preds.csv"

    again = run_cli("predict", *args, "--output", "s3://photos/out/preds.csv", env=env)
    assert again.returncode == 2 and "s3://photos/out/preds.csv exists: --resume" in again.stderr
    resumed = run_cli("predict", *args, "--output", "s3://photos/out/preds.csv", "--resume", env=env)
    assert resumed.returncode == 0 and f"0 of {len(files)} files to score" in resumed.stderr, resumed.stderr

    # Sharded into the bucket too: two parts, merged there.
    for i in range(2):
        part = run_cli("predict", *args, "--output", "s3://photos/sharded/preds.csv", "--shard", f"{i}/2", env=env)
        assert part.returncode == 0, part.stdout + part.stderr
    merged = run_cli("predict", *args, "--output", "s3://photos/sharded/preds.csv", "--merge-shards", "2", env=env)
    assert merged.returncode == 0, merged.stdout + merged.stderr
    rows = client.get_object(Bucket="photos", Key="sharded/preds.csv")["Body"].read().decode().splitlines()
    assert sorted(rows[1:]) == sorted(local.splitlines()[1:]) and rows[0] == local.splitlines()[0]

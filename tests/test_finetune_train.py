"""End-to-end runs of `vitserve finetune` on tiny ViTs (CPU, no downloads): it learns Fashion-MNIST, a run killed
with SIGKILL resumes to the same weights as an uninterrupted one, SIGTERM saves and exits, LoRA / resolution /
freezing produce a plain checkpoint the export stage can take, and gradient accumulation equals a bigger batch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from demo.tiny_base import write_tiny_base
from finetune.cli import main

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # each test trains or runs the CLI: seconds to a minute on 2 CPU cores


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Tiny models on a shared machine: one thread for this module (conftest's one_torch_thread)."""


def write_images(root: Path, classes: int, per_class: int, size: int = 32, seed: int = 0) -> None:
    """A learnable synthetic task: noise plus a bright square whose position is the class."""
    rng = np.random.default_rng(seed)
    for k in range(classes):
        (root / f"class_{k}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 100, (size, size, 3), dtype=np.uint8)
            y, x = divmod(k, 2)
            pixels[y * size // 2 : y * size // 2 + size // 3, x * size // 2 : x * size // 2 + size // 3] = 255
            Image.fromarray(pixels).save(root / f"class_{k}" / f"{i}.png")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base") / "tiny"
    return write_tiny_base(out, image_size=32, patch_size=8, hidden=32, layers=2, heads=2, mlp_ratio=2)


@pytest.fixture(scope="module")
def squares(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("squares")
    write_images(root / "train", classes=3, per_class=20)
    return root / "train"


def _progress(run: Path) -> dict:
    from finetune.train_state import load_state

    return load_state(run)["progress"]


# --- it learns ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fashion_mnist(tmp_path_factory) -> Path:
    from demo.fashion_mnist import DEFAULT_SOURCE, write_folders

    if not (DEFAULT_SOURCE / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed: apt-get install -y dataset-fashion-mnist")
    root = tmp_path_factory.mktemp("fmnist")
    write_folders(root, per_class_train=60, per_class_test=30)
    return root


def test_short_run_learns_fashion_mnist(fashion_mnist, tmp_path, capsys):
    base = write_tiny_base(tmp_path / "base", image_size=28, patch_size=7, hidden=64, layers=2, heads=4, mlp_ratio=2)
    run = tmp_path / "run"
    rc = main([
        "--train-dir", str(fashion_mnist / "train"), "--test-dir", str(fashion_mnist / "test"), "--base", str(base),
        "--output", str(run), "--epochs", "8", "--batch-size", "32", "--lr", "3e-3", "--augment", "none",
        "--num-workers", "0", "--log-every-steps", "5", "--save-every-steps", "0",
    ])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    assert "--learning-rate 0.003 is outside the model card's recommended" in err
    metrics = json.loads((run / "metrics.json").read_text())
    log = metrics["train_log"]
    assert np.mean([r["loss"] for r in log[-3:]]) < 0.7 * np.mean([r["loss"] for r in log[:2]])  # loss falls
    assert metrics["test"]["num_samples"] == 300
    assert metrics["test"]["top1"] > 0.45, metrics["test"]  # chance is 0.10
    assert metrics["final"]["val"]["top1"] > 0.45
    assert len(metrics["history"]) == 8 and metrics["best"]["epoch"] in range(1, 9)
    labels = json.loads((run / "checkpoint" / "config.json").read_text())["id2label"]
    assert sorted(labels.values()) == sorted(p.name for p in (fashion_mnist / "train").iterdir())


# --- SIGKILL, SIGTERM, resume ------------------------------------------------------------------------------------

# Every random thing on: augmentation policy + erasing, dropout, drop path, and a mid-epoch kill.
RESUME_ARGS = [
    "--epochs", "4", "--batch-size", "8", "--lr", "1e-3", "--augment", "standard", "--dropout", "0.1",
    "--drop-path", "0.1", "--num-workers", "0", "--save-every-steps", "2", "--log-every-steps", "3",
]  # fmt: skip


def start(args: list[str], out: Path) -> subprocess.Popen:
    """`python -m finetune ... --output out` in the background; its stdout/stderr go to out.stdout/out.stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # one thread: runs comparable bit for bit
    with open(out.with_suffix(".stdout"), "a") as stdout, open(out.with_suffix(".stderr"), "a") as stderr:
        return subprocess.Popen([sys.executable, "-m", "finetune", *args, "--output", str(out)], cwd=ROOT, env=env,
                                stdout=stdout, stderr=stderr)  # fmt: skip


def logs(out: Path) -> tuple[str, str]:
    return out.with_suffix(".stdout").read_text(), out.with_suffix(".stderr").read_text()


def signal_on_first_state(runs: dict[subprocess.Popen, tuple[Path, int]], timeout: float = 120) -> None:
    """Poll every run at once; send each its signal as soon as its first training state is on disk."""
    waiting = dict(runs)
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        for proc, (run, signum) in list(waiting.items()):
            if (run / "train_state" / "state.json").exists():
                proc.send_signal(signum)
                del waiting[proc]
            elif proc.poll() is not None:
                del waiting[proc]  # ended without a state: the asserts below report it
        time.sleep(0.005)


def test_killed_and_terminated_runs_resume_to_the_same_state(squares, tiny_base, tmp_path):
    """Three runs side by side: (a) uninterrupted, (b) SIGKILLed and (c) sent SIGTERM after their first
    training-state save (mid-epoch). Resumed, (b) and (c) must end with exactly a's weights, optimizer state and
    metrics."""
    args = ["--train-dir", str(squares), "--base", str(tiny_base), *RESUME_ARGS]
    a, b, c = (start(args, tmp_path / name) for name in "abc")
    # Each run is signalled the moment its own first state appears (mid-epoch, step 2). Waiting for one before
    # polling the other let the second finish training meanwhile (a tiny model trains in well under a second).
    signal_on_first_state({b: (tmp_path / "b", signal.SIGKILL), c: (tmp_path / "c", signal.SIGTERM)})
    assert b.wait(60) == -signal.SIGKILL, "run b ended before it could be killed"
    assert c.wait(60) == 143, "run c did not stop on SIGTERM with exit code 143"
    c_step = _progress(tmp_path / "c")["step"]
    assert f"SIGTERM: saved the training state at step {c_step}" in logs(tmp_path / "c")[0]
    assert a.wait(300) == 0, logs(tmp_path / "a")[1][-3000:]
    total = json.loads((tmp_path / "a" / "args.json").read_text())["resolved"]["total_steps"]
    b_step = _progress(tmp_path / "b")["step"]
    assert 0 < b_step < total and 0 < c_step < total

    resumed = {name: start([*args, "--resume"], tmp_path / name) for name in "bc"}
    for (name, proc), step in zip(resumed.items(), (b_step, c_step)):
        assert proc.wait(300) == 0, logs(tmp_path / name)[1][-3000:]
        assert f"resumed at step {step}/{total}" in logs(tmp_path / name)[0]

    ma = json.loads((tmp_path / "a" / "metrics.json").read_text())
    for name in "bc":
        run = tmp_path / name
        for file in ("checkpoint/model.safetensors", "train_state/tensors.safetensors"):
            x, y = load_file(tmp_path / "a" / file), load_file(run / file)
            assert x.keys() == y.keys()
            different = [k for k in x if not torch.equal(x[k], y[k])]
            assert not different, f"run {name}, {file}: {different[:5]}"
        mb = json.loads((run / "metrics.json").read_text())
        assert [h["val"] for h in ma["history"]] == [h["val"] for h in mb["history"]]
        assert ma["train_log"] == mb["train_log"] and ma["final"] == mb["final"]
        assert (tmp_path / "a" / "split.json").read_text() == (run / "split.json").read_text()


def test_refuses_to_overwrite_a_run_and_resume_needs_a_state(squares, tiny_base, tmp_path, capsys):
    (tmp_path / "run" / "checkpoint").mkdir(parents=True)
    args = ["--train-dir", str(squares), "--base", str(tiny_base)]
    assert main([*args, "--output", str(tmp_path / "run")]) == 2
    assert main([*args, "--output", str(tmp_path / "new"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "has no training state" in err


# --- what is saved ----------------------------------------------------------------------------------------------


def test_lora_run_at_a_new_resolution_saves_a_plain_checkpoint(squares, tiny_base, tmp_path, capsys):
    """Corrupt files are skipped, LoRA is merged, the position embeddings are resized; the saved folder is what the
    export stage expects."""
    import shutil

    from transformers import ViTForImageClassification

    train = tmp_path / "train"
    shutil.copytree(squares, train)
    good = (train / "class_0" / "0.png").read_bytes()
    (train / "class_0" / "truncated.png").write_bytes(good[: len(good) // 3])
    (train / "class_1" / "fake.jpg").write_text("not an image")
    run = tmp_path / "run"
    rc = main([
        "--train-dir", str(train), "--base", str(tiny_base), "--output", str(run), "--lora", "--lora-r", "4",
        "--image-size", "48", "--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--num-workers", "0",
    ])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    assert "skipping unreadable file" in err and "truncated.png" in err and "fake.jpg" in err
    assert "warning: --learning-rate 0.001 is outside the model card's recommended 1e-06..0.0001" in err
    split = json.loads((run / "split.json").read_text())
    files = [f for f, _ in split["train"] + split["val"]]
    assert len(files) == 60 and not any("fake" in f or "truncated" in f for f in files)

    ckpt = run / "checkpoint"
    expected = {"config.json", "model.safetensors", "preprocessor_config.json", "vitserve_calibration.json"}
    assert {p.name for p in ckpt.iterdir()} >= expected
    weights = load_file(ckpt / "model.safetensors")
    assert not any("lora" in k or "base_model" in k for k in weights)
    assert weights["vit.embeddings.position_embeddings"].shape == (1, 1 + 6 * 6, 32)
    config = json.loads((ckpt / "config.json").read_text())
    assert config["image_size"] == 48 and config["id2label"] == {"0": "class_0", "1": "class_1", "2": "class_2"}
    pre = json.loads((ckpt / "preprocessor_config.json").read_text())
    assert pre["size"] == {"height": 48, "width": 48} and pre["image_mean"] == [0.5] * 3 and pre["resample"] == 2
    cal = json.loads((ckpt / "vitserve_calibration.json").read_text())
    assert set(cal) == {"temperature", "fitted_temperature", "applied", "decision", "warning", "held_out", "ece_before",
                        "ece_after", "nll_before", "nll_after", "num_samples", "min_reliable_samples", "source"}
    assert cal["temperature"] > 0 and cal["num_samples"] == len(split["val"])
    assert cal["temperature"] == (cal["fitted_temperature"] if cal["applied"] else 1.0)
    assert f"only {len(split['val'])} validation images" in cal["warning"] and cal["warning"] in err
    model = ViTForImageClassification.from_pretrained(ckpt, use_safetensors=True).eval()
    with torch.no_grad():
        assert model(pixel_values=torch.randn(2, 3, 48, 48)).logits.shape == (2, 3)  # no interpolate flag needed
    # the LoRA adapters trained: attention weights moved away from the base
    base = load_file(tiny_base / "model.safetensors")
    q = next(k for k in weights if k.endswith(("q_proj.weight", "query.weight")))  # names differ across versions
    assert not torch.equal(weights[q], base[q])
    assert {p.name for p in (run / "report").iterdir()} >= {
        "training_curves.png", "confusion_matrix.png", "reliability_diagram.png", "per_class.csv", "per_class.json"
    }
    args = json.loads((run / "args.json").read_text())
    assert args["lora"] is True and args["resolved"]["image_size"] == 48


def test_linear_probe_changes_only_the_head(squares, tiny_base, tmp_path):
    run = tmp_path / "run"
    rc = main([
        "--train-dir", str(squares), "--base", str(tiny_base), "--output", str(run), "--freeze", "linear-probe",
        "--epochs", "1", "--batch-size", "8", "--lr", "1e-2", "--num-workers", "0", "--weight-decay", "0.1",
    ])  # fmt: skip
    assert rc == 0
    base, tuned = load_file(tiny_base / "model.safetensors"), load_file(run / "checkpoint" / "model.safetensors")
    changed = sorted(k for k in tuned if k not in base or not torch.equal(tuned[k], base[k]))
    assert changed == ["classifier.bias", "classifier.weight"]


def test_gradient_accumulation_equals_the_larger_batch(squares, tiny_base, tmp_path):
    """8 x 1 and 4 x 2 see the same images per step and average the same gradient: same weights after an epoch."""
    weights = []
    for batch, accum in (("8", "1"), ("4", "2")):
        run = tmp_path / f"b{batch}"
        rc = main([
            "--train-dir", str(squares), "--base", str(tiny_base), "--output", str(run), "--augment", "none",
            "--batch-size", batch, "--gradient-accumulation-steps", accum, "--epochs", "1", "--lr", "1e-3",
            "--num-workers", "0", "--val-split", "0.2",  # 48 training images: whole batches only
        ])  # fmt: skip
        assert rc == 0
        weights.append(load_file(run / "checkpoint" / "model.safetensors"))
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], atol=2e-5, rtol=1e-4)
    base = load_file(tiny_base / "model.safetensors")
    assert all(not torch.equal(weights[0][k], base[k]) for k in base if "classifier" not in k and base[k].ndim == 2)


def test_every_optimizer_option_runs_end_to_end(squares, tiny_base, tmp_path):
    """SAM + LAMB + accumulation + gradient checkpointing + bf16 autocast on CPU + heavy augmentation (mixup/cutmix)."""
    run = tmp_path / "run"
    rc = main([
        "--train-dir", str(squares), "--base", str(tiny_base), "--output", str(run), "--optimizer", "lamb", "--sam",
        "--gradient-accumulation-steps", "2", "--gradient-checkpointing", "--precision", "bf16", "--augment", "heavy",
        "--label-smoothing", "0.1", "--epochs", "2", "--batch-size", "4", "--lr", "1e-2", "--num-workers", "1",
        "--metric", "loss", "--auto-batch",
    ])  # fmt: skip
    assert rc == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert all(np.isfinite(r["loss"]) for r in metrics["train_log"])
    assert metrics["best"]["metric"] == "loss" and len(metrics["history"]) == 2


# --- across nodes ---------------------------------------------------------------------------------------------------
def test_two_nodes_over_a_loopback_rendezvous_train_the_same_weights_as_one_node_with_two_processes(squares, tiny_base, tmp_path):
    """`torchrun --nnodes 2` as a second machine runs it: two launchers, one process each, meeting at a c10d
    rendezvous over loopback (gloo), against one launcher with two processes. Same ranks, same shards, same weights."""
    from benchmarks.harness.servers import free_port

    def args(out: Path) -> list[str]:
        return ["-m", "finetune", "--train-dir", str(squares), "--val-split", "0.25", "--base", str(tiny_base),
                "--output", str(out), "--epochs", "2", "--batch-size", "4", "--augment", "none", "--num-workers", "0"]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run"]
    one = subprocess.run([*launcher, "--standalone", "--nnodes", "1", "--nproc-per-node", "2", *args(tmp_path / "one")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]

    port = free_port()
    rendezvous = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                  "--rdzv-id", "vitserve-two-nodes"]
    nodes = [subprocess.Popen([*launcher, *rendezvous, *args(tmp_path / "two")], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(o[0][-2000:] + o[1][-2000:] for o in outputs)

    a = load_file(tmp_path / "one" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "two" / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), max((a[k] - b[k]).abs().max().item() for k in a)
    # And they trained: the two processes' weights moved from the base.
    base = load_file(tiny_base / "model.safetensors")
    assert any(not torch.equal(a[k], base[k]) for k in a if k in base and a[k].shape == base[k].shape)
    history = json.loads((tmp_path / "two" / "metrics.json").read_text())["history"]
    assert json.loads((tmp_path / "one" / "metrics.json").read_text())["history"][-1]["val"] == history[-1]["val"]


# --- from object storage --------------------------------------------------------------------------------------------
def test_training_images_read_from_an_s3_bucket_train_the_same_weights_as_the_local_folder(s3_server, squares, tiny_base, tmp_path):
    """The training folder as s3://bucket/prefix (a real S3-compatible server over HTTP, read through fsspec, item
    by item): the same split, the same weights as from the same files on disk."""
    env, client = s3_server
    for path in sorted(squares.rglob("*.png")):
        client.put_object(Bucket="photos", Key=f"train-squares/{path.relative_to(squares).as_posix()}", Body=path.read_bytes())

    def finetune(train_dir: str, out: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "vitserve.py"), "finetune", "--train-dir", train_dir,
                               "--val-split", "0.25", "--base", str(tiny_base), "--output", str(out), "--epochs", "1",
                               "--batch-size", "4", "--augment", "none", "--num-workers", "0"],
                              cwd=ROOT, env={**os.environ, **env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                              timeout=600)  # fmt: skip

    remote = finetune("s3://photos/train-squares", tmp_path / "remote")
    assert remote.returncode == 0, remote.stdout[-3000:] + remote.stderr[-3000:]
    local = finetune(str(squares), tmp_path / "local")
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
    split = {name: json.loads((tmp_path / name / "split.json").read_text()) for name in ("remote", "local")}
    assert split["remote"]["train_dir"] == "s3://photos/train-squares"
    assert all(split["remote"][k] == split["local"][k] for k in ("classes", "train", "val")) and len(split["local"]["train"]) == 45
    a = load_file(tmp_path / "remote" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "local" / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

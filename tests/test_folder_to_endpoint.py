"""The README's three commands, as a user runs them: a folder of class subfolders → `vitserve finetune` →
`vitserve export` (the parity gate passes) → `vitserve serve` → an HTTP classification with the folder's labels."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from demo.tiny_base import write_tiny_base
from service.artifact import read_manifest
from tests.conftest import GATE_IMAGES, run_cli
from tests.server import running_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
CLASSES = ("circle_left", "square_right", "stripes")


def draw(kind: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """Three visually distinct classes on noise, so a tiny ViT learns them in a few epochs."""
    px = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
    if kind == "circle_left":
        yy, xx = np.mgrid[:size, :size]
        px[(yy - size // 2) ** 2 + (xx - size // 4) ** 2 < (size // 5) ** 2] = 255
    elif kind == "square_right":
        px[size // 3 : 2 * size // 3, size // 2 + 2 : size - 2] = 255
    else:
        px[::4] = 255
    return Image.fromarray(px)


def finetune_on_drawn_photos(tmp_path, *, per_class: int, epochs: int, rng: np.random.Generator):
    """TMP/photos/<class>/*.png drawn by :func:`draw`, then `vitserve finetune` from a tiny base into TMP/run."""
    for kind in CLASSES:
        (tmp_path / "photos" / kind).mkdir(parents=True)
        for i in range(per_class):
            draw(kind, rng).save(tmp_path / "photos" / kind / f"{i}.png")
    base = write_tiny_base(tmp_path / "base", image_size=32, patch_size=8, hidden=32, layers=2, heads=2, mlp_ratio=2)
    trained = run_cli("finetune", "--train-dir", str(tmp_path / "photos"), "--val-split", "0.25", "--base", str(base),
                      "--output", str(tmp_path / "run"), "--epochs", str(epochs), "--batch-size", "8", "--lr", "3e-3",
                      "--augment", "none", "--num-workers", "0", env={"OMP_NUM_THREADS": "1"})
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    return trained


def test_folder_to_served_predictions(tmp_path):
    rng = np.random.default_rng(0)
    finetune_on_drawn_photos(tmp_path, per_class=24, epochs=6, rng=rng)
    calibration = json.loads((tmp_path / "run" / "checkpoint" / "vitserve_calibration.json").read_text())

    # 72 photos are fewer than the gate needs to show 0.99 agreement: export adds views of them to reach 400.
    exported = run_cli("export", str(tmp_path / "run" / "checkpoint"), "--output", str(tmp_path / "artifact"),
                       "--calibration-dir", str(tmp_path / "photos"), "--max-images", GATE_IMAGES, "--max-batch", "8")
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert "parity gate: PASS" in exported.stdout and "has 72 images; adding views" in exported.stderr
    manifest = read_manifest(tmp_path / "artifact")
    assert manifest.labels == sorted(CLASSES)
    assert manifest.temperature == pytest.approx(calibration["temperature"])
    # The run's held-out figures travel with the artifact, for the model card (no --test-dir: validation's).
    val = json.loads((tmp_path / "run" / "metrics.json").read_text())["final"]["val"]
    assert manifest.evaluation is not None and manifest.evaluation.split == "validation"
    assert manifest.evaluation.top1 == val["top1"] and manifest.evaluation.images == val["num_samples"] == 18
    assert np.array(manifest.evaluation.confusion).sum() == 18 and len(manifest.evaluation.confusion) == len(CLASSES)

    with running_server(tmp_path / "artifact", tmp_path / "srv") as server:
        fresh = [(kind, draw(kind, rng)) for kind in CLASSES for _ in range(4)]  # unseen images
        files = []
        for i, (_, img) in enumerate(fresh):
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=95)
            files.append(("images", (f"{i}.jpg", buf.getvalue(), "image/jpeg")))
        assert httpx.get(f"{server.url}/info", timeout=10).json()["evaluation"]["top1"] == val["top1"]
        r = httpx.post(f"{server.url}/classify", files=files, params={"top_k": 3}, timeout=60)
        assert r.status_code == 200, r.text
        predictions = r.json()["predictions"]
        got = [p["top1"]["label"] for p in predictions]
        accuracy = np.mean([g == kind for g, (kind, _) in zip(got, fresh)])
        assert accuracy >= 0.75, list(zip(got, [k for k, _ in fresh]))  # chance is 1/3
        assert all(abs(sum(p["score"] for p in pred["top5"]) - 1) < 1e-6 for pred in predictions)  # 3 labels, k=3

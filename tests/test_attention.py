"""Attention diagnostics (finetune/attention.py): the numbers on hand-made attention patterns whose answers are known,
then `vitserve explain` (finetune/explain.py) and `vitserve finetune`'s report end to end on tiny ViTs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from finetune import attention, explain
from tests.conftest import make_tiny_checkpoint, run_cli

T = 17  # a class token and a 4 x 4 patch grid


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Tiny models on a shared machine: one thread (conftest's one_torch_thread)."""


def uniform(batch=2, heads=3, tokens=T) -> torch.Tensor:
    return torch.full((batch, heads, tokens, tokens), 1 / tokens, dtype=torch.float64)


def one_hot(batch=2, heads=3, tokens=T, target: int | None = None) -> torch.Tensor:
    """Every query on one key: itself (the identity), or `target`."""
    a = torch.eye(tokens, dtype=torch.float64) if target is None else torch.zeros(tokens, tokens, dtype=torch.float64)
    if target is not None:
        a[:, target] = 1
    return a.expand(batch, heads, tokens, tokens).clone()


# --- the numbers ---------------------------------------------------------------------------------------------------


def test_uniform_attention_has_maximal_entropy_and_one_hot_has_none():
    assert attention.entropy(uniform()).sub(math.log(T)).abs().max() < 1e-12
    assert attention.entropy(one_hot()).abs().max() == 0
    peaked = torch.softmax(torch.randn(4, T, dtype=torch.float64) * 3, -1)
    assert (attention.entropy(peaked) < math.log(T)).all() and (attention.entropy(peaked) > 0).all()


def test_rollout_of_identity_attention_is_the_identity():
    layers = [one_hot(), one_hot(), one_hot()]
    assert torch.equal(attention.rollout(layers), torch.eye(T, dtype=torch.float64).expand(2, T, T))


def test_rollout_mixes_the_residual_and_multiplies_through_the_blocks():
    a1, a2 = uniform(heads=2), one_hot(heads=2, target=5)
    a2[:, 1] = torch.eye(T)  # head-averaging: block 2 is half "look at token 5", half "look at yourself"
    mix = lambda a: 0.5 * a.mean(1) + 0.5 * torch.eye(T, dtype=torch.float64)  # noqa: E731
    expected = mix(a2) @ mix(a1)
    assert torch.allclose(attention.rollout([a1, a2]), expected)
    assert torch.allclose(attention.rollout([a1, a2]).sum(-1), torch.ones(2, T, dtype=torch.float64))


def test_collapsed_and_duplicate_heads_are_flagged_and_others_not():
    block0 = uniform(heads=3)
    block0[:, 1] = torch.softmax(torch.randn(2, T, T, dtype=torch.float64) * 4, -1)  # a distinct, peaked head
    block1 = torch.stack([one_hot(heads=1)[:, 0], uniform(heads=1)[:, 0], one_hot(heads=1, target=3)[:, 0]], 1)
    stats = attention.AttentionStats(layers=2, heads=3, tokens=T)
    stats.update([block0.float(), block1.float()])
    summary = stats.summary(patch_size=8)
    flagged = {(f["layer"], f["head"]): f["why"] for f in summary["flagged"]}
    assert flagged[(0, 0)] == ["duplicate of head 2"] and flagged[(0, 2)] == ["duplicate of head 0"]
    assert (0, 1) not in flagged and (1, 1) not in flagged
    assert flagged[(1, 0)] == ["collapsed"] and flagged[(1, 2)] == ["collapsed"]  # both one-hot, on different keys
    head = summary["layers"][0]["heads"][0]
    assert head["entropy"] == pytest.approx(math.log(T), abs=1e-6) and head["entropy_fraction_of_uniform"] > 0.99


def test_distances_on_known_patterns():
    """The class token looking only at the top-left patch of the 4 x 4 grid: 1.5·√2 patches from the centre, spread
    0; every patch attending to itself: mean attention distance 0; uniform attention: the grid's mean distances."""
    corner = one_hot(heads=1, target=1)  # token 1 = patch (0, 0)
    stats = attention.AttentionStats(layers=2, heads=1, tokens=T)
    stats.update([corner, one_hot(heads=1)])
    summary = stats.summary(patch_size=8)
    first, second = summary["layers"][0]["heads"][0], summary["layers"][1]["heads"][0]
    assert first["cls_distance_patches"] == pytest.approx(1.5 * math.sqrt(2))
    assert first["cls_distance_px"] == pytest.approx(8 * 1.5 * math.sqrt(2)) and first["cls_spread_patches"] == 0
    assert second["mean_distance_patches"] == 0
    stats = attention.AttentionStats(layers=1, heads=1, tokens=T)
    stats.update([uniform(heads=1)])
    summary = stats.summary(patch_size=8)
    head, u = summary["layers"][0]["heads"][0], summary["uniform"]
    assert head["cls_distance_patches"] == pytest.approx(u["cls_distance_patches"])
    grid = attention.patch_positions(T)
    assert head["mean_distance_patches"] == pytest.approx(float(torch.cdist(grid, grid).mean()))


# --- on a model ------------------------------------------------------------------------------------------------------


def write_photos(folder, n=6, size=40):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size + 9, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    return folder


def test_sdpa_models_are_switched_to_eager_and_see_the_served_pixels(tmp_path):
    """SDPA returns no attention weights: diagnose switches to eager, and its numbers equal an eager model's. The
    batches are the service's own decode / resize / crop of each file."""
    from export.checkpoint import load_checkpoint
    from service.preprocess import Preprocessor
    from transformers import ViTForImageClassification

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    photos = write_photos(tmp_path / "photos")
    files = explain.image_files([str(photos)])
    spec = load_checkpoint(str(ckpt)).preprocessing
    skipped: list[str] = []
    batches = list(explain.served_batches(files, spec, 4, skipped))
    pre = Preprocessor(spec)
    served = np.stack([pre.decode_uint8(f.read_bytes(), max_pixels=10**8) for f in files]).transpose(0, 3, 1, 2)
    assert np.array_equal(torch.cat(batches).numpy(), served) and not skipped
    scale, offset = torch.from_numpy(pre.scale.reshape(3)), torch.from_numpy(pre.offset.reshape(3))
    sdpa = ViTForImageClassification.from_pretrained(ckpt, attn_implementation="sdpa")
    assert sdpa(pixel_values=torch.zeros(1, 3, 32, 32), output_attentions=True).attentions in (None, ())
    eager = ViTForImageClassification.from_pretrained(ckpt, attn_implementation="eager")
    a = attention.diagnose(sdpa, batches, scale, offset).summary
    b = attention.diagnose(eager, batches, scale, offset).summary
    assert a["images"] == 6 and json.dumps(a) == json.dumps(b)


def test_explain_writes_json_and_pngs_for_a_checkpoint_and_an_artifact(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    photos = write_photos(tmp_path / "photos")
    proc = run_cli("explain", str(photos), "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"),
                   "--rollout-images", "3", timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "out" / "attention.json").read_text())
    assert summary["images"] == 6 and summary["tokens"] == 17 and len(summary["layers"]) == 2
    for layer in summary["layers"]:
        assert len(layer["heads"]) == 4
        assert all(0 <= h["entropy"] <= math.log(17) + 1e-9 for h in layer["heads"])
    for png in ("attention_entropy.png", "attention_rollout.png"):
        assert Image.open(tmp_path / "out" / png).size[0] > 100
    assert "flagged" in proc.stdout and "class-token distance" in proc.stdout

    # The committed demo artifact: its pytorch/ weights and its manifest's (served) preprocessing
    proc = run_cli("explain", str(photos), "--artifact", "service/demo_artifact", "--out", str(tmp_path / "demo"),
                   timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    demo = json.loads((tmp_path / "demo" / "attention.json").read_text())
    assert demo["tokens"] == 17 and demo["patch_size"] == 7 and len(demo["layers"]) == 4
    assert run_cli("explain", str(photos), "--artifact", str(tmp_path)).returncode == 2  # no manifest: a clear error


def test_finetune_report_includes_attention_diagnostics(tmp_path):
    from finetune.cli import main
    from demo.tiny_base import write_tiny_base

    base = write_tiny_base(tmp_path / "base", image_size=32, patch_size=8, hidden=32, layers=2, heads=2, mlp_ratio=2)
    for k in range(2):
        write_photos(tmp_path / "data" / f"class_{k}", n=10, size=32)
    run = tmp_path / "run"
    assert main(["--train-dir", str(tmp_path / "data"), "--base", str(base), "--output", str(run), "--epochs", "1",
                 "--batch-size", "4", "--num-workers", "0", "--val-split", "0.3"]) == 0  # fmt: skip
    summary = json.loads((run / "report" / "attention.json").read_text())
    assert summary["images"] == 6 and len(summary["layers"]) == 2  # every validation image
    assert (run / "report" / "attention_rollout.png").is_file() and (run / "report" / "attention_entropy.png").is_file()

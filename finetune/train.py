"""The training run behind `vitserve finetune`, top to bottom (`_run` calls these stages in this order):

    prepare.py: open_run_folder -> prepare_data (scan, split) -> build_model (resolution, drop path, freeze / LoRA)
    -> make_loaders (the batch size that fits) -> build_stepper (optimizer + schedule) -> [restore]
    here: train: epochs of train_epoch (steps, save_training_state), validate (best checkpoint)
    -> finish: calibrate, test, report (+ attention)

What the stages hand each other (Splits, Model, Loaders, Stepper, RunState) is in stages.py.

Smallest real run (3,000 Fashion-MNIST images, a 0.35M-parameter ViT from scratch; measured on the shared 2-core
dev machine: 2.4 min, 68 % test top-1):

    python -m demo.fashion_mnist --out /tmp/fm --per-class-train 300 --per-class-test 100
    python -m demo.tiny_base --out /tmp/tiny --image-size 28 --patch-size 7 --hidden 96 --layers 3 --heads 3
    python -m finetune --train-dir /tmp/fm/train --test-dir /tmp/fm/test --base /tmp/tiny --output /tmp/run \
        --epochs 5 --batch-size 32 --lr 1e-3 --num-workers 0

The full demo (60,000 images, ~88-89 %, ~11 min on 2 cores) is in docs/finetune.md, "The demo model".

RUN_DIR afterwards: checkpoint/ (HF folder + vitserve_calibration.json), train_state/ (for --resume), split.json,
args.json, metrics.json, report/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from finetune import calibration, evaluate, report, runtime, train_state
from finetune import model as model_lib
from finetune.config import TrainConfig, to_dict
from finetune.prepare import autocast_for, build_model, build_stepper, make_loaders, open_run_folder, out_of_memory_message, prepare_data, restore, write_args
from finetune.stages import CHECKPOINT_DIR, Loaders, Model, RunState, Stepper, Throughput

EXIT_SIGTERM = 143  # 128 + SIGTERM, what a shell reports for a process ended by SIGTERM


# --- the run ------------------------------------------------------------------------------------------------------


def run(cfg: TrainConfig) -> int:
    rt = runtime.setup(cfg.device)
    run_dir = Path(cfg.output)
    created = not run_dir.exists()
    code = 1
    try:
        code = _run(cfg, rt)
        return code
    except torch.cuda.OutOfMemoryError:
        rt.error(out_of_memory_message(cfg, rt.device))
        return 1
    except FloatingPointError as e:
        rt.error(str(e))
        return 1
    finally:
        runtime.teardown(rt)
        if code != 0 and created and rt.is_main:
            _remove_if_empty(run_dir)  # a run that failed before writing anything leaves no folder behind


def _remove_if_empty(folder: Path) -> None:
    """Remove ``folder`` and its empty subfolders if no file was written under it."""
    if folder.is_dir() and not any(p.is_file() for p in folder.rglob("*")):
        shutil.rmtree(folder, ignore_errors=True)


def _run(cfg: TrainConfig, rt: runtime.Runtime) -> int:
    import transformers

    transformers.utils.logging.set_verbosity_error()  # we report the head re-initialisation ourselves
    transformers.utils.logging.disable_progress_bar()
    autocast = autocast_for(cfg.precision, rt.device)
    saved = open_run_folder(cfg, rt)
    splits = prepare_data(cfg, rt, resuming=saved is not None)
    m = build_model(cfg, rt, splits.classes, autocast)
    loaders = make_loaders(cfg, rt, splits, m)
    stepper = build_stepper(cfg, rt, m, loaders.total_steps, len(splits.classes))
    runtime.seed_everything(cfg.seed + rt.rank)  # augmentation and dropout differ across ranks
    state = RunState.fresh(cfg.metric) if saved is None else restore(rt, saved, m, stepper, loaders.total_steps)
    write_args(cfg, rt, splits, m, loaders, stepper)
    if train(cfg, rt, m, loaders, stepper, state) == EXIT_SIGTERM:
        return EXIT_SIGTERM
    if rt.is_main:  # only rank 0 calibrates, tests and reports; the others wait
        finish(Path(cfg.output), rt.device, splits.classes, m, loaders, state)
    rt.barrier()
    return 0


# --- training -------------------------------------------------------------------------------------------------------


def train(cfg: TrainConfig, rt: runtime.Runtime, m: Model, loaders: Loaders, stepper: Stepper, state: RunState) -> int:
    """The epochs from where `state` is: train, validate every --eval-steps epochs (and after the last), save the
    training state at each epoch end. Returns 0, or EXIT_SIGTERM once a SIGTERM made it save and stop."""
    with sigterm_flag() as stop:
        bar = tqdm(
            total=loaders.total_steps, initial=state.progress["step"], unit="step", dynamic_ncols=True,
            mininterval=1.0, disable=not rt.is_main,
        )  # fmt: skip
        for epoch in range(state.progress["epoch"], cfg.epochs):
            throughput = train_epoch(cfg, rt, epoch, m, loaders, stepper, state, bar, stop)
            if throughput is None:
                bar.close()
                rt.info(f"SIGTERM: saved the training state at step {state.progress['step']}; continue with --resume")
                return EXIT_SIGTERM
            train_loss = state.end_epoch(epoch)
            if (epoch + 1) % cfg.eval_steps == 0 or epoch + 1 == cfg.epochs:
                lr = stepper.scheduler.get_last_lr()[0]
                entry = {"epoch": epoch + 1, "step": state.progress["step"], "train_loss": train_loss, "lr": lr}
                validate(cfg, rt, m, loaders.val, state, entry, throughput, bar)
            save_training_state(cfg, rt, m, stepper, state)
        bar.close()
    return 0


@contextlib.contextmanager
def sigterm_flag():
    """While inside, SIGTERM only sets flag["requested"]: the run finishes its step, saves and exits."""
    flag = {"requested": False}
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: flag.update(requested=True))
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def train_epoch(
    cfg: TrainConfig, rt: runtime.Runtime, epoch: int, m: Model, loaders: Loaders, stepper: Stepper,
    state: RunState, bar: tqdm, stop: dict,
) -> Throughput | None:
    """Optimizer steps over what is left of `epoch` (all of it unless resumed mid-epoch), saving the training state
    every --save-every-steps. Returns the epoch's Throughput, or None once a SIGTERM made it save and stop."""
    loaders.sampler.set_epoch(epoch, start=state.progress["batch"] * loaders.micro)
    batches = iter(loaders.train)
    bar.set_description(f"epoch {epoch + 1}/{cfg.epochs}")
    started, images, saving, window = time.perf_counter(), 0, 0.0, (time.perf_counter(), 0)
    while group := list(itertools.islice(batches, loaders.accum)):
        loss = train_step(cfg, rt, m, stepper, group)
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss} at step {state.progress['step'] + 1}: lower --learning-rate, keep "
                "--max-grad-norm on, or use --precision bf16/fp32"
            )
        n = sum(len(labels) for _, labels in group)
        images += n
        lr = stepper.scheduler.get_last_lr()[0]
        state.record_step(loss, len(group), lr, cfg.log_every_steps)
        window = show_progress(bar, rt, loss, lr, n, window)
        stopping = rt.any(stop["requested"])
        if stopping or (cfg.save_every_steps and state.progress["step"] % cfg.save_every_steps == 0):
            t = time.perf_counter()
            save_training_state(cfg, rt, m, stepper, state)
            saving += time.perf_counter() - t
        if stopping:
            return None
    return Throughput(images, time.perf_counter() - started - saving)


def train_step(cfg: TrainConfig, rt: runtime.Runtime, m: Model, stepper: Stepper, micro_batches: list) -> float:
    """One optimizer step over `micro_batches` (augmented on the device); returns its loss."""
    optimizer, scaler = stepper.optimizer, stepper.scaler
    inputs = [
        stepper.augment(images.to(rt.device, non_blocking=True), labels.to(rt.device))
        for images, labels in micro_batches
    ]
    loss = loss_and_backward(cfg, rt, stepper, m.autocast, inputs)
    if stepper.sam is not None:  # second pass at the worst-case nearby weights; the step uses that gradient
        stepper.sam.perturb()
        optimizer.zero_grad(set_to_none=True)
        loss_and_backward(cfg, rt, stepper, m.autocast, inputs)
        stepper.sam.restore()
    if scaler is not None:
        scaler.unscale_(optimizer)
    if cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(stepper.trainable_params, cfg.max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    stepper.scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def loss_and_backward(cfg: TrainConfig, rt: runtime.Runtime, stepper: Stepper, autocast, inputs: list) -> float:
    """Forward/backward over the micro-batches of one step; gradients = mean over all their images."""
    model, scaler = stepper.train_model, stepper.scaler
    n_images, total_loss = sum(len(x) for x, _ in inputs), 0.0
    for i, (x, target) in enumerate(inputs):
        last = i == len(inputs) - 1
        sync = contextlib.nullcontext() if last or not rt.distributed else model.no_sync()
        with sync:
            with autocast():
                logits = model(pixel_values=x).logits  # (B, C)
            loss = F.cross_entropy(logits.float(), target, label_smoothing=cfg.label_smoothing)
            loss = loss * (len(x) / n_images)  # each image weighs the same, whatever its micro-batch
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total_loss += loss.item()
    return total_loss


def show_progress(bar, rt: runtime.Runtime, loss: float, lr: float, n: int, window: tuple) -> tuple[float, int]:
    """Advance the bar; img/s is measured over windows of ~2 s (start time, images so far), returns the next one."""
    t0, n0 = window
    elapsed = time.perf_counter() - t0
    images_per_s = (n0 + n) * rt.world_size / max(elapsed, 1e-9)
    postfix = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "img/s": f"{images_per_s:.0f}"}
    if (gb := runtime.memory_gb(rt.device)) is not None:
        postfix["gpu_mem"] = f"{gb:.1f}GB"
    bar.set_postfix(postfix, refresh=False)
    bar.update()
    return (time.perf_counter(), 0) if elapsed > 2 else (t0, n0 + n)


def validate(
    cfg: TrainConfig, rt: runtime.Runtime, m: Model, val_loader: DataLoader, state: RunState, entry: dict,
    throughput: Throughput, bar: tqdm,
) -> None:
    """Rank 0 evaluates on validation, adds `entry` to the history, saves the checkpoint when it is the best so
    far and rewrites metrics.json; the other ranks wait."""
    if rt.is_main:
        logits, labels = evaluate.predict(m.net, val_loader, rt.device, m.scale, m.offset, m.autocast)
        val = evaluate.metrics(logits, labels)
        state.history.append({**entry, "val": val, "images_per_s": throughput.per_second(rt.world_size)})
        improved = evaluate.is_better(cfg.metric, val[cfg.metric], state.best["value"])
        if improved:
            state.best.update(value=val[cfg.metric], epoch=entry["epoch"])
            save_best_checkpoint(cfg, m)
        bar.write(
            f"epoch {entry['epoch']}: train loss {entry['train_loss']:.4f} | val top-1 {val['top1']:.4f} "
            f"top-5 {val['top5']:.4f} macro-F1 {val['macro_f1']:.4f} ECE {val['ece']:.4f}"
            + (" (best, saved)" if improved else "")
        )
        write_metrics(Path(cfg.output), state)
    rt.barrier()


# --- saving ---------------------------------------------------------------------------------------------------------


def save_best_checkpoint(cfg: TrainConfig, m: Model) -> None:
    train_state.write_dir_atomically(
        Path(cfg.output) / CHECKPOINT_DIR, lambda tmp: model_lib.save_checkpoint(m.net, m.processor, tmp)
    )


def save_training_state(cfg: TrainConfig, rt: runtime.Runtime, m: Model, stepper: Stepper, state: RunState) -> None:
    """RUN_DIR/train_state/, everything --resume needs to continue bit for bit (rank 0 writes, all ranks wait)."""
    if rt.is_main:
        rng_tensors, rng_values = runtime.rng_state()
        train_state.save_state(Path(cfg.output), {
            "model": m.net.state_dict(),
            "optimizer": stepper.optimizer.state_dict(),
            "scheduler": stepper.scheduler.state_dict(),
            "scaler": stepper.scaler.state_dict() if stepper.scaler is not None else None,
            "rng": {"tensors": rng_tensors, "values": rng_values},
            **dataclasses.asdict(state),  # progress, best, history, log
            "config": to_dict(cfg),
        })  # fmt: skip
    rt.barrier()


def write_metrics(run_dir: Path, state: RunState, final: dict | None = None, test: dict | None = None) -> None:
    """RUN_DIR/metrics.json. `final` (the best checkpoint on validation, its calibration) and `test` are null
    until finish() writes the file for the last time."""
    out = {"history": state.history, "best": state.best, "final": final, "test": test, "train_log": state.log}
    train_state.write_json_atomically(run_dir / "metrics.json", out)


# --- after training (rank 0) ----------------------------------------------------------------------------------------


def finish(run_dir: Path, device, classes: list[str], m: Model, loaders: Loaders, state: RunState) -> None:
    """Reload the saved best checkpoint (proving it loads standalone), calibrate it on validation, evaluate the
    test set, write report/ and the final metrics.json."""
    from transformers import ViTForImageClassification

    ckpt = run_dir / CHECKPOINT_DIR
    best = ViTForImageClassification.from_pretrained(ckpt, use_safetensors=True).to(device)
    logits, labels = evaluate.predict(best, loaders.val, device, m.scale, m.offset, m.autocast)
    final = calibrate(ckpt, logits, labels, state.best["epoch"])
    temperature = final["calibration"]["temperature"]

    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    report.training_curves(state.log, state.history, out / "training_curves.png")
    report.confusion_matrix(torch.tensor(final["val"]["confusion"]), classes, out / "confusion_matrix.png", "validation")
    report.reliability_diagram(logits, labels, temperature, out / "reliability_diagram.png")
    report.per_class_files(evaluate.per_class(logits, labels, classes), out / "per_class")
    test = None
    if loaders.test is not None:
        t_logits, t_labels = evaluate.predict(best, loaders.test, device, m.scale, m.offset, m.autocast)
        test = evaluate_test(t_logits, t_labels, classes, temperature, out)
    attention_report(best, loaders.val, m.scale, m.offset, classes, out)
    write_metrics(run_dir, state, final, test)
    page = report.html_report(out, {"final": final, "test": test, "history": state.history}, f"Fine-tune report: {run_dir.name}")
    print(f"checkpoint: {ckpt}  report: {page}")


def calibrate(ckpt: Path, logits: torch.Tensor, labels: torch.Tensor, best_epoch: int) -> dict:
    """Fit the softmax temperature on the best checkpoint's validation logits and write it into the checkpoint;
    returns metrics.json's "final"."""
    cal = calibration.calibrate(logits, labels, source="validation")
    calibration.write(ckpt, cal)
    val = {**evaluate.metrics(logits, labels), "confusion": evaluate.confusion(logits, labels).tolist()}
    final = {"best_epoch": best_epoch, "val": val, "calibration": cal}
    print(
        f"best epoch {best_epoch}: val top-1 {final['val']['top1']:.4f}; calibration: {cal['decision']} "
        f"(ECE {cal['ece_before']:.4f} -> {cal['ece_after']:.4f})"
    )
    if cal["warning"]:
        print(f"warning: {cal['warning']}", file=sys.stderr)
    return final


def evaluate_test(logits: torch.Tensor, labels: torch.Tensor, classes: list[str], temperature: float, out: Path):
    """The test set's metrics (ECE and NLL also at the fitted temperature), confusion matrix and per-class files."""
    test = evaluate.metrics(logits, labels)
    test["ece_calibrated"] = calibration.ece(logits, labels, temperature)
    test["nll_calibrated"] = calibration.nll(logits, labels, temperature)
    confusion = evaluate.confusion(logits, labels)
    test["confusion"] = confusion.tolist()  # counts, for the artifact's model card (export reads metrics.json)
    report.confusion_matrix(confusion, classes, out / "test_confusion_matrix.png", "test")
    report.per_class_files(evaluate.per_class(logits, labels, classes), out / "test_per_class")
    print(
        f"test: top-1 {test['top1']:.4f} top-5 {test['top5']:.4f} macro-F1 {test['macro_f1']:.4f} "
        f"({test['num_samples']} images)"
    )
    return test


def attention_report(model, val_loader, scale, offset, classes: list[str], out: Path) -> None:
    """report/attention.json, attention_entropy.png, attention_rollout.png (finetune.attention) over up to
    DIAGNOSTIC_IMAGES validation images spread evenly over the (class-sorted) validation set."""
    from finetune import attention

    dataset = val_loader.dataset
    n = min(len(dataset), attention.DIAGNOSTIC_IMAGES)
    picks = [round(i * (len(dataset) - 1) / max(n - 1, 1)) for i in range(n)]
    loader = DataLoader(torch.utils.data.Subset(dataset, picks), val_loader.batch_size)
    every = max(1, n // attention.ROLLOUT_IMAGES)
    diagnostics = attention.diagnose(model, (images for images, _ in loader), scale, offset, n, every=every)
    attention.write_report(diagnostics, out, classes, [dataset.samples[i][0] for i in picks])
    flagged = attention.describe_flagged(diagnostics.summary)
    print(f"attention ({n} validation images, report/attention.json):\n{flagged}")



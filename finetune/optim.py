"""Optimizers for --optimizer adamw | sgd | adafactor | lamb | lars, the --sam wrapper, and the schedule.

torch ships AdamW, SGD and Adafactor. It has no LAMB, LARS or SAM, and no library that provides them installs
without touching the pinned torch here, so each is written out below (~30 lines each) after its paper.

Which suits what (also in docs/finetune.md, "Optimizers: which suits what"): AdamW is the safe default for fine-tuning
ViTs. SGD with momentum is how the ViT paper fine-tunes, but only with lr 0.003-0.03, warmup and clipping; at
AdamW-sized rates it barely moves. Adafactor keeps factored second moments: least optimizer memory for ViT-L. LAMB
and LARS scale each layer's step to the layer's weight norm, made for very large batches (many GPUs); they want
larger learning rates than AdamW (LAMB ~1e-3-5e-2; LARS ~1-10, its trust coefficient 0.001 shrinks every step).
SAM looks for flat minima: often +0.5-1 point on small datasets, at twice the compute per step.
"""

from __future__ import annotations

import math

import torch

NO_DECAY = ("position_embeddings", "cls_token", "mask_token")  # besides 1-D tensors (biases, norms)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters, with weight decay on weight matrices only (not biases, norms, embeddings tokens)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or any(k in name for k in NO_DECAY) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build(name: str, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("no trainable parameters")
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    if name == "adafactor":
        # torch's Adafactor scales each step by the parameter's RMS: lr is a relative step size.
        return torch.optim.Adafactor(groups, lr=lr)
    if name == "lamb":
        return Lamb(groups, lr=lr)
    if name == "lars":
        return Lars(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}")


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning"): the AdamW update, rescaled per tensor
    by the trust ratio ||w|| / ||update|| so every layer moves by about lr x its own norm."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"].item()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(p.grad, 1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                update = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                w_norm, u_norm = p.norm(), update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                p.sub_(update * (group["lr"] * trust))
        return loss


class Lars(torch.optim.Optimizer):
    """LARS (You, Gitman & Ginsburg 2017): SGD with momentum where each tensor's step is scaled by its trust ratio
    trust_coefficient x ||w|| / (||g|| + weight_decay x ||w||), so every layer moves by about lr x
    trust_coefficient x its own norm whatever its gradient scale. A tensor with zero norm (a fresh bias) takes a
    plain SGD step scaled by trust_coefficient. The base learning rate is large (~1-10) as in the paper."""

    def __init__(self, params, lr=1.0, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001, eps=1e-8):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient)
        super().__init__(params, dict(defaults, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            wd, eta = group["weight_decay"], group["trust_coefficient"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                w_norm, g_norm = p.norm(), p.grad.norm()
                ratio = torch.where((w_norm > 0) & (g_norm > 0), w_norm / (g_norm + wd * w_norm + group["eps"]), 1.0)
                update = (p.grad + wd * p) * (eta * ratio)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = update.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                p.sub_(state["momentum_buffer"], alpha=group["lr"])
        return loss


class SAM:
    """Sharpness-Aware Minimization (Foret et al. 2021) around any optimizer.

    One training step becomes:  loss(w).backward();  sam.perturb()   # w -> w + rho * g / ||g||
                                 zero_grad(); loss(w + e).backward();  sam.restore()   # back to w
                                 optimizer.step()                     # uses the gradient taken at w + e
    so the base optimizer descends on the worst-case loss in a rho-ball around w.
    """

    def __init__(self, params, rho: float = 0.05):
        self.params = [p for p in params if p.requires_grad]
        self.rho = rho
        self.offsets: list[tuple[torch.Tensor, torch.Tensor]] = []

    @torch.no_grad()
    def perturb(self) -> None:
        grads = [p for p in self.params if p.grad is not None]
        norm = torch.norm(torch.stack([p.grad.norm(2) for p in grads]), 2)
        scale = self.rho / (norm + 1e-12)
        self.offsets = []
        for p in grads:
            e = p.grad * scale
            p.add_(e)
            self.offsets.append((p, e))

    @torch.no_grad()
    def restore(self) -> None:
        for p, e in self.offsets:
            p.sub_(e)
        self.offsets = []


def schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    """Linear warmup over warmup_ratio of the steps, then cosine decay to 0 (returns scheduler, warmup steps).
    The formula of transformers.get_cosine_schedule_with_warmup, without importing its Trainer stack."""
    warmup, total = int(round(warmup_ratio * total_steps)), max(total_steps, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor), warmup

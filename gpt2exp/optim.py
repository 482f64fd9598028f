"""Parameter groups, the optimizer, and the learning rate as a pure function of the step."""

from __future__ import annotations

import math
from typing import Any


def param_groups(model, weight_decay: float) -> list[dict[str, Any]]:
    """2-D weight matrices (embeddings included) decay; biases and LayerNorm weights never do."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():  # tied weights appear once
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(cfg: Any, model, device_type: str):
    """The optimizer for `cfg` (the `optimizer` section); fused AdamW on CUDA and CPU unless told otherwise."""
    import torch

    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "adamw":
        # the fused kernel is one launch for all tensors: ~4x faster optimizer steps, on CPU too
        fused = cfg.fused if cfg.fused is not None else device_type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=bool(fused) or None)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    raise ValueError(f"unknown optimizer {cfg.name}")


def lr_at(step: int, peak_lr: float, cfg: Any) -> float:
    """Learning rate for optimizer step `step` (0-based) under `cfg` (the `scheduler` section).

    `cfg.decay_steps` is the schedule's horizon; it is fixed into the config of record at the first
    launch, so raising trainer.max_steps later continues at the final LR instead of replanning.
    """
    min_lr = peak_lr * cfg.min_lr_ratio
    # 0) past a horizon that ended within the warm-up (a run shorter than it, raised on resume): the LR
    #    its last step had, held, rather than the rest of the warm-up and then a drop to the final LR
    if cfg.name != "constant" and 1 <= cfg.decay_steps <= cfg.warmup_steps and step >= cfg.decay_steps:
        return peak_lr * cfg.decay_steps / cfg.warmup_steps
    # 1) linear warmup
    if step < cfg.warmup_steps:
        return peak_lr * (step + 1) / cfg.warmup_steps
    # 2) constant schedule: the peak for ever
    if cfg.name == "constant":
        return peak_lr
    # 3) past the horizon: the final LR
    if step >= cfg.decay_steps:
        return min_lr
    # 4) decay between warmup and the horizon
    progress = (step - cfg.warmup_steps) / max(1, cfg.decay_steps - cfg.warmup_steps)
    if cfg.name == "linear":
        return peak_lr - progress * (peak_lr - min_lr)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak_lr - min_lr)


class LRSchedule:
    """Applies `lr_at` to the optimizer each step; its state is the step it last applied.

    The peak LR and the horizon come from the config of record, so they are not state.
    """

    state_kind = "json"
    # saved by checkpoints written before only restored fields were saved; read and dropped
    LEGACY_KEYS = frozenset({"peak_lr", "decay_steps"})

    def __init__(self, optimizer, peak_lr: float, cfg: Any):
        self.optimizer, self.peak_lr, self.cfg = optimizer, peak_lr, cfg
        self.last_step = -1

    def apply(self, step: int) -> float:
        lr = lr_at(step, self.peak_lr, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.last_step = step
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"last_step"} - self.LEGACY_KEYS
        if unknown:
            raise ValueError(f"the LR schedule has no state {sorted(unknown)}; the checkpoint is from other code")
        self.last_step = int(state["last_step"])

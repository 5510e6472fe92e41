"""Learning-rate schedule: linear warmup, then constant or cosine decay to --min-lr."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from miles.trainer.config import TrainerConfig


def lr_at(step: int, cfg: TrainerConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): warmup (step+1)/warmup * lr, then constant/cosine."""
    if cfg.lr_warmup_iters > 0 and step < cfg.lr_warmup_iters:
        return cfg.lr * (step + 1) / cfg.lr_warmup_iters
    if cfg.lr_decay_style == "constant":
        return cfg.lr
    progress = min(max(step - cfg.lr_warmup_iters, 0) / max(cfg.lr_decay_iters or 1, 1), 1.0)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainerConfig) -> LambdaLR:
    """LambdaLR over `lr_at` (the optimizer's base lr must be cfg.lr)."""
    return LambdaLR(optimizer, lambda step: lr_at(step, cfg) / cfg.lr)

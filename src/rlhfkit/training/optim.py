"""The optimiser and schedule every trainer builds, and switching dropout off."""

from __future__ import annotations

import torch
from torch import nn
from transformers import get_scheduler

from rlhfkit.training.options import OptimOptions


def make_adamw(groups, weight_decay: float = 0.0, lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW with the fused kernel where this torch has one for the device (one pass over the
    weights instead of one per tensor: several times faster on CPU), else the default."""
    kwargs = {"weight_decay": weight_decay} | ({"lr": lr} if lr is not None else {})
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, **kwargs)


def make_optimizer(opts: OptimOptions, groups, total_steps: int) -> tuple[torch.optim.Optimizer, object]:
    """AdamW over ``groups`` (parameters, or dicts with their own ``lr``) and its schedule:
    linear warm-up over ``warmup_ratio`` of ``total_steps``, then ``opts.scheduler``."""
    optimizer = make_adamw(groups, weight_decay=opts.weight_decay, lr=opts.lr)
    scheduler = get_scheduler(
        opts.scheduler, optimizer, num_warmup_steps=int(opts.warmup_ratio * total_steps), num_training_steps=total_steps
    )
    return optimizer, scheduler


def disable_dropout(model: nn.Module) -> int:
    """Set every dropout probability in ``model`` to 0 (TRL's reward and PPO trainers do the
    same by default): a reward model then scores a text the same in training and use, and
    the step skips the dropout masks. Returns how many places were changed."""
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p:
            module.p = 0.0
            changed += 1
        for attr in ("dropout_prob", "attention_dropout"):  # functional dropout inside attention
            if isinstance(getattr(module, attr, None), float) and getattr(module, attr):
                setattr(module, attr, 0.0)
                changed += 1
    return changed

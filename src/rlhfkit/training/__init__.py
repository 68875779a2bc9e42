"""What every trainer does before and around its loop: start a run, build the optimizer,
switch dropout off."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlhfkit.checkpoint import find_checkpoint


class NonFiniteLossError(RuntimeError):
    """A NaN or infinite loss or gradient: the run stops before the optimizer writes it into
    the weights; the message names the step and the batch, and the last good checkpoint
    stays as it was."""


def start_run(cfg) -> tuple[Any, Path | None]:
    """The start every trainer shares: check ``--resume`` against the run folder, build the
    ``Accelerator`` (mixed precision ``auto``: bf16 on CUDA, fp32 on CPU), seed everything,
    and save the config beside the run. Returns (accelerator, checkpoint to resume or None).

    ``cfg`` needs ``output``, ``resume``, ``mixed_precision``, ``cpu`` and ``seed``.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from rlhfkit.config import ConfigError, save_yaml

    out = Path(cfg.output)
    existing = find_checkpoint(out)
    if cfg.resume and existing is None:
        raise ConfigError(f"--resume: {out} has no checkpoint to resume from (expected {out}/checkpoint)")
    if not cfg.resume and existing is not None:
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it, or choose a new --output")
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if (torch.cuda.is_available() and not cfg.cpu) else "no"
    accelerator = Accelerator(mixed_precision=mp, cpu=cfg.cpu)
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, out / "config.yaml")
    return accelerator, existing if cfg.resume else None


def make_adamw(groups, weight_decay: float = 0.0, lr: float | None = None):
    """AdamW with the fused kernel where this torch has one for the device (one pass over the
    weights instead of one per tensor: several times faster on CPU), else the default."""
    import torch

    kwargs = {"weight_decay": weight_decay} | ({"lr": lr} if lr is not None else {})
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, **kwargs)


def disable_dropout(model) -> int:
    """Set every dropout probability in ``model`` to 0 (TRL's reward and PPO trainers do the
    same by default): a reward model then scores a text the same in training and use, and
    the step skips the dropout masks. Returns how many places were changed."""
    from torch import nn

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


def guarded_step(accelerator, model, optimizer, scheduler, max_grad_norm: float, where: str):
    """Clip the gradient norm, refuse a non-finite one, then step the optimizer and schedule.

    ``where`` names the step and batch for the error message. Returns the gradient norm
    (a tensor) or None when clipping is off. The ``.item()`` is the one host sync per step
    that makes sure a NaN never reaches the weights.
    """
    import torch

    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm) if max_grad_norm > 0 else None
    if grad_norm is not None and not torch.isfinite(grad_norm).item():
        raise NonFiniteLossError(f"non-finite gradient norm at {where}; nothing was saved from this step. Lower --lr.")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm

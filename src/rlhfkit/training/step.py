"""One optimizer step, the same for every trainer and every network.

A step runs the micro-batches of one process: each one's forward and loss under autocast,
a finite-loss check, and its backward, with gradient all-reduce (DDP) or reduce-scatter
(FSDP) only on the last micro-batch; then gradient clipping with a finite-norm check, the
optimizer step and the learning-rate schedule. A loss or gradient that is not finite stops
the run with :class:`~rlhfkit.errors.RunStopped` before the optimizer writes it into the
weights.

The caller's ``loss_fn(micro_batch) -> (loss, stats)`` returns the micro-batch's loss,
already weighted so that the sum over micro-batches and processes is the step's loss, and
any detached statistics it wants back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from rlhfkit.errors import RunStopped

LossFn = Callable[[Any], "tuple[Tensor, Any]"]


def train_step(
    run: Any,
    models: nn.Module | Sequence[nn.Module],
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[Any],
    loss_fn: LossFn,
    *,
    max_grad_norm: float,
    where: str,
    scheduler: Any = None,
    clip_groups: Iterable[Sequence[nn.Parameter]] | None = None,
    hint: str = "Lower --lr, keep --max-grad-norm on, or check the data named above.",
    describe: Callable[[Any], str] | None = None,
) -> tuple[Tensor | None, list[Any]]:
    """Forward and backward every micro-batch, clip, step. Returns (gradient norm or None, stats per micro-batch).

    Args:
        run: the :class:`~rlhfkit.training.run.Run` (its accelerator, and what to say on a stop).
        models: the prepared model(s) whose gradients this step syncs.
        micro_batches: this process's micro-batches of the step (possibly zero-weight fillers).
        where: names the step for error messages ("step 12 (epoch 0, batch 11)").
        clip_groups: parameter groups clipped each on its own norm (default: all of ``models``).
        describe: names a micro-batch's source rows for the error message.
    """
    accelerator = run.accelerator
    models = [models] if isinstance(models, nn.Module) else list(models)
    stats = []
    for i, micro in enumerate(micro_batches):
        with contextlib.ExitStack() as stack:
            if i < len(micro_batches) - 1:  # gradients are synchronised on the last micro-batch only
                for model in models:
                    stack.enter_context(accelerator.no_sync(model))
            with accelerator.autocast():
                loss, micro_stats = loss_fn(micro)
            # One host sync per micro-batch, on purpose: a NaN must stop us before
            # optimizer.step() writes it into the weights.
            if not torch.isfinite(loss).item():
                rows = f", {describe(micro)}" if describe is not None else ""
                raise RunStopped(
                    f"non-finite loss ({loss.item()}) at {where}, micro-batch {i}{rows}. Nothing was saved "
                    f"from this step; {run.stop_note()}. {hint}"
                )
            accelerator.backward(loss)
        stats.append(micro_stats)
    grad_norm = None
    if max_grad_norm > 0:
        groups = list(clip_groups) if clip_groups is not None else [[p for m in models for p in m.parameters()]]
        grad_norm = torch.stack([_full(accelerator.clip_grad_norm_(group, max_grad_norm)) for group in groups]).max()
        if not torch.isfinite(grad_norm).item():
            raise RunStopped(
                f"non-finite gradient norm at {where} with a finite loss. Nothing was saved from this step; "
                f"{run.stop_note()}. {hint}"
            )
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, stats


def _full(norm: Any) -> Tensor:
    """A clipped norm as a plain float tensor (FSDP2 returns a DTensor)."""
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else torch.as_tensor(norm)
    return norm.float()

"""One optimizer step, the same for every trainer and every network.

A step runs the micro-batches of one process: each one's forward and loss under autocast,
and its backward, with gradient all-reduce (DDP) or reduce-scatter (FSDP) only on the last
micro-batch; then gradient clipping, the optimizer step and the learning-rate schedule. A
loss or gradient that is not finite never reaches the weights, and stops the run with
:class:`~rlhfkit.errors.RunStopped`.

**Without waiting for the device.** Reading a value on the host (``.item()``, ``bool(t)``)
makes the host wait until the device has computed it: on a GPU the queue of kernels runs dry
at every such read. So the finite checks stay on the device when the optimizer can skip a step
there: torch's fused AdamW (what :func:`~rlhfkit.training.optim.make_adamw` builds) reads a
``found_inf`` tensor, as AMP's GradScaler sets it, and leaves the weights, its moments and its
step count untouched when it is nonzero. The step's flags (one per micro-batch's loss, one for
the gradient norm; summed over processes, so every process skips alike) are kept on the run,
and :func:`check_finite` reads them all at once where the run reads its metrics anyway: at
each log line, before each checkpoint and at the finish. A bad step stops the run there,
naming the step, micro-batch and rows as before; the steps between trained (on weights that
never held the bad step) and nothing after the bad step is saved. With another optimizer, or
under fp16's grad scaler, each check is read at once, inside the step (a host sync per
micro-batch, as before).

The caller's ``loss_fn(micro_batch) -> (loss, stats)`` returns the micro-batch's loss,
already weighted so that the sum over micro-batches and processes is the step's loss, and
any detached statistics it wants back.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
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
    on_device = skips_on_device(optimizer, accelerator)
    stats, losses = [], []
    for i, micro in enumerate(micro_batches):
        with contextlib.ExitStack() as stack:
            if i < len(micro_batches) - 1:  # gradients are synchronised on the last micro-batch only
                for model in models:
                    stack.enter_context(accelerator.no_sync(model))
            with accelerator.autocast():
                loss, micro_stats = loss_fn(micro)
            if on_device:
                losses.append(loss.detach().float().reshape(()))
            elif not torch.isfinite(loss).item():  # a host sync: a NaN must stop us before optimizer.step()
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
        if not on_device and not torch.isfinite(grad_norm).item():
            raise RunStopped(
                f"non-finite gradient norm at {where} with a finite loss. Nothing was saved from this step; "
                f"{run.stop_note()}. {hint}"
            )
    if on_device:
        norm = grad_norm
        if norm is None:  # no clipping computed it; the finite check needs it
            grads = [p.grad for m in models for p in m.parameters() if p.grad is not None]
            norm = _full(torch.nn.utils.get_total_norm(grads)) if grads else torch.zeros(())
        flags = (~torch.isfinite(torch.stack([*losses, norm.to(losses[0].device)]))).float()  # (micro-batches + 1,)
        if run.world > 1:
            flags = accelerator.reduce(flags, reduction="sum")  # every process skips alike
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
        inner.found_inf = flags.sum().clamp(max=1)  # () 1.0: the fused kernel leaves everything as it was
        try:
            optimizer.step()
        finally:
            del inner.found_inf
        run.pending_checks.append(
            PendingCheck(where, flags, torch.stack(losses), [_describer(describe, m) for m in micro_batches], hint)
        )
    else:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, stats


@dataclass
class PendingCheck:
    """One step's finite checks, not yet read on the host."""

    where: str  # "step 12 (epoch 0, batch 11)"
    flags: Tensor  # (micro-batches + 1,): > 0 where a micro-batch's loss (or, last, the gradient norm) was not finite
    losses: Tensor  # (micro-batches,)
    describe: list[Callable[[], str] | None]  # names each micro-batch's rows
    hint: str


def skips_on_device(optimizer: torch.optim.Optimizer, accelerator: Any) -> bool:
    """Whether ``optimizer`` can skip a step on the device: torch's fused AdamW reads ``found_inf``
    (it must be the optimizer's own: fp16's grad scaler sets that attribute itself)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    fused = isinstance(inner, torch.optim.Adam | torch.optim.AdamW) and bool(inner.defaults.get("fused"))
    return fused and getattr(accelerator, "scaler", None) is None


def check_finite(run: Any) -> None:
    """Read the finite checks of the steps since the last call (one host sync), and stop the run
    at the first bad one with :class:`~rlhfkit.errors.RunStopped`. Every process calls it at the
    same steps; the flags are already summed over processes, so all stop alike."""
    pending: list[PendingCheck] = run.pending_checks
    if not pending:
        return
    run.pending_checks = []
    bad = torch.stack([c.flags.sum() for c in pending]).cpu().tolist()  # the one host sync
    first = next((i for i, b in enumerate(bad) if b > 0), None)
    if first is None:
        return
    check, later = pending[first], bad[first + 1 :]
    skipped = "The optimizer skipped that step (the weights never held it)"
    if later:
        also = sum(b > 0 for b in later)
        skipped += f"; {len(later) - also} of the {len(later)} step(s) after it trained before this check read it" + (
            f" ({also} skipped as well)" if also else ""
        )
    flags = check.flags.cpu().tolist()
    micro = next((i for i, f in enumerate(flags[:-1]) if f > 0), None)
    if micro is None:
        raise RunStopped(
            f"non-finite gradient norm at {check.where} with a finite loss. {skipped}. Nothing was saved from "
            f"this step on; {run.stop_note()}. {check.hint}"
        )
    value = check.losses[micro].item()
    if math.isfinite(value):  # finite here: the loss was not finite on another process
        what = f"non-finite loss on another process at {check.where}, micro-batch {micro}"
    else:
        rows = check.describe[micro]
        what = f"non-finite loss ({value}) at {check.where}, micro-batch {micro}" + (f", {rows()}" if rows else "")
    raise RunStopped(f"{what}. {skipped}. Nothing was saved from this step on; {run.stop_note()}. {check.hint}")


def _describer(describe: Callable[[Any], str] | None, micro: Any) -> Callable[[], str] | None:
    return None if describe is None else (lambda: describe(micro))


def _full(norm: Any) -> Tensor:
    """A clipped norm as a plain float tensor (FSDP2 returns a DTensor)."""
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else torch.as_tensor(norm)
    return norm.float()

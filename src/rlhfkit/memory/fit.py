"""The largest micro-batch that fits: ``rl --micro-batch-size auto``.

An optimizer step of online RL trains on a minibatch of ``mini_batch_size`` rollout rows, split
into ``grad_accum`` equal micro-batches (gradient accumulation is exact, so the split changes the
memory and the speed, not the update). Fewer, larger micro-batches are faster on a GPU; each
holds its activations and logits until its backward pass. :func:`largest_micro_batch` asks the
plan's estimate (:func:`rlhfkit.memory.estimate.estimate`, what ``rlhfkit plan`` prints) for every
micro-batch size that divides the minibatch, largest first, and takes the first whose peak fits
the memory budget. Pure: the caller measures the budget and builds the :class:`Setup`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from rlhfkit.memory.estimate import Estimate, Setup, estimate
from rlhfkit.memory.shapes import ModelShape

__all__ = ["MicroBatchChoice", "divisors", "largest_micro_batch"]


@dataclass(frozen=True)
class MicroBatchChoice:
    """``rows`` per micro-batch (``grad_accum`` of them per optimizer step), the plan's peak for it
    and the phase it falls in, the ``budget`` it was held to (bytes), whether it ``fits``, and every
    size tried as ``(rows, peak bytes)``, largest first."""

    rows: int
    grad_accum: int
    peak: float
    peak_phase: str
    budget: float
    fits: bool
    tried: tuple[tuple[int, float], ...]


def divisors(n: int) -> list[int]:
    """Every positive divisor of ``n``, largest first."""
    return [d for d in range(n, 0, -1) if n % d == 0]


def largest_micro_batch(
    setup: Setup, policy: ModelShape, config: str, budget: float, reward: ModelShape | None = None
) -> MicroBatchChoice:
    """The largest divisor ``m`` of ``setup.mini_batch_size`` whose estimate under ``config``
    (ddp, fsdp2, fsdp2-offload) with ``grad_accum = mini_batch_size // m`` needs at most
    ``budget`` bytes per device (on the CPU the processes share the machine: their sum). When none
    fits, one row per micro-batch (the least memory this knob can give) with ``fits`` False.

    The plain search it is: try ``m = mini_batch_size, ..., 1`` over the divisors, stop at the
    first that fits."""
    tried: list[tuple[int, float]] = []
    last: Estimate | None = None
    share = setup.gpus if setup.device == "cpu" else 1  # CPU processes share one machine's RAM
    for m in divisors(setup.mini_batch_size):
        last = estimate(replace(setup, grad_accum=setup.mini_batch_size // m), policy, config, reward)
        need = last.peak * share
        tried.append((m, need))
        if need <= budget:
            return MicroBatchChoice(m, setup.mini_batch_size // m, need, last.peak_phase, budget, True, tuple(tried))
    assert last is not None  # divisors(n >= 1) is never empty
    return MicroBatchChoice(1, setup.mini_batch_size, tried[-1][1], last.peak_phase, budget, False, tuple(tried))

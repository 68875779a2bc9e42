"""When a loop logs, evaluates and saves, and the running sums it logs.

Every trainer counts optimizer steps (PPO: updates) and does the same things at the same
moments: log every ``log_every`` steps and at the last one, evaluate every ``eval_every``,
checkpoint every ``save_every``, and stop at ``stop_after_steps`` (a checkpoint, so
``--resume`` can continue) or at the end of the schedule. The last step is left to the
trainer's finish, which evaluates, saves and exports once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rlhfkit.training.step import check_finite


@dataclass
class Cadence:
    """``total``: the schedule's length in steps; ``stop_at``: where this invocation stops."""

    total: int
    log_every: int
    save_every: int
    eval_every: int | None = None
    stop_after: int | None = None

    @property
    def stop_at(self) -> int:
        return min(self.total, self.stop_after or self.total)

    def log(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.stop_at

    def eval(self, step: int) -> bool:
        return self.eval_every is not None and step % self.eval_every == 0 and step != self.stop_at

    def save(self, step: int) -> bool:
        return step % self.save_every == 0 and step != self.stop_at

    def after_step(
        self,
        run,
        state,
        log: Callable[[], object],
        evaluate: Callable[[], object] | None = None,
        window: MetricsWindow | None = None,
    ) -> None:
        """What follows every optimizer step: the progress bar (and one early time estimate),
        then ``log()``, ``evaluate()`` (its time left out of the window's next throughput) and a
        checkpoint, each when it is due.

        A SIGTERM or SIGINT received during the step (:mod:`rlhfkit.training.signals`) ends the
        run here, at the same step on every process: this step is logged, its evaluation runs if
        due (it may draw random numbers, which the checkpoint must hold for an exact resume), a
        checkpoint is written and ``run.close`` raises ``Interrupted``. Every trainer's loop
        passes through here, so none needs code of its own to stop."""
        stop = run.stop_requested()
        run.step_done(state.step)
        if self.log(state.step) or stop:
            check_finite(run)  # the steps' finite checks, read with the metrics (one host sync)
            log()
        if evaluate is not None and self.eval(state.step):
            evaluate()
            if window is not None:
                window.restart_clock()
        if self.save(state.step) or stop:
            run.save(state)
        if stop:
            run.close(state, self.total)  # raises Interrupted

    def step_done(
        self,
        run,
        state,
        epoch: int,
        batch: int,
        stats: list,
        window: MetricsWindow,
        log: Callable[[], object],
        evaluate: Callable[[], object] | None = None,
    ) -> None:
        """Count the optimizer step that trained batch ``batch`` of ``epoch`` in ``state``, add its
        per-micro-batch ``stats`` to ``window``, then :meth:`after_step`."""
        state.step, state.epoch, state.batch_in_epoch = state.step + 1, epoch, batch + 1
        window.add(*stats)
        self.after_step(run, state, log, evaluate, window)


@dataclass
class MetricsWindow:
    """Running sums between two log lines, kept as tensors (no host sync per step).

    ``add(loss=..., lists=...)`` adds to each named sum; ``flush(run)`` sums them over
    processes (one all-reduce), returns them as floats with the seconds since the last
    flush, and starts a new window.
    """

    sums: dict[str, Tensor] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def add(self, *stats: dict, **values) -> None:
        """Add each dict of ``stats`` and the keyword ``values`` to the running sums."""
        for row in (*stats, values):
            for key, value in row.items():
                value = torch.as_tensor(value).detach().to(torch.float64)
                self.sums[key] = self.sums[key] + value if key in self.sums else value

    def flush(self, accelerator) -> tuple[dict[str, float], float]:
        keys = sorted(self.sums)
        totals: dict[str, float] = {}
        if keys:
            stacked = torch.stack([self.sums[k].reshape(()).to(accelerator.device) for k in keys])
            reduced = accelerator.reduce(stacked, reduction="sum").cpu().tolist()
            totals = dict(zip(keys, reduced))
        seconds = max(time.perf_counter() - self.started, 1e-9)
        self.sums, self.started = {}, time.perf_counter()
        return totals, seconds

    def restart_clock(self) -> None:
        """Leave time spent outside training (an evaluation) out of the next throughput."""
        self.started = time.perf_counter()

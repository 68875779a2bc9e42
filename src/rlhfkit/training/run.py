"""Starting, checkpointing and finishing a training run: what every trainer does around its loop.

The order is what makes a bad option or a bad file cost nothing: :func:`start_run` checks
the run folder and builds the accelerator but writes nothing; the trainer then reads its
data and loads its models (any error there leaves no trace); only :meth:`Run.begin` locks
the folder (:mod:`rlhfkit.training.lock`), makes it, writes ``config.yaml``, restores a
checkpoint and opens the metrics log (and the trackers of ``--report-to``, whose packages
the config checked for when it was built). From ``begin`` to ``close`` a SIGTERM or SIGINT
ends the run after the current step, with a checkpoint (:mod:`rlhfkit.training.signals`).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed

from rlhfkit.checkpoint import (
    find_checkpoint,
    load_checkpoint,
    missing_checkpoint,
    read_state,
    remove_stale_temp,
    save_checkpoint,
)
from rlhfkit.config import ConfigError, save_yaml, to_dict
from rlhfkit.cpu import configure_threads
from rlhfkit.defaults import EXPORT
from rlhfkit.errors import UserError
from rlhfkit.models.cpu_linear import reuse_cpu_matmul_choices, run_cpu_matmul_choices
from rlhfkit.tracking import MetricsLogger, Progress
from rlhfkit.training import lock as run_lock
from rlhfkit.training.distributed import describe, enable_fsdp_on_cpu, is_sharded
from rlhfkit.training.options import RunOptions, check_resume_matches
from rlhfkit.training.signals import Interrupted, StopSignals
from rlhfkit.training.step import check_finite

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Where a run is; saved with every checkpoint as ``trainer_state.json``."""

    step: int = 0  # optimizer steps (PPO: updates) done
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of ``epoch`` done
    episodes: int = 0  # online RL: responses sampled so far, all processes
    best_metric: float | None = None
    best_step: int | None = None


def improved(state: TrainState, value: float, higher_is_better: bool) -> bool:
    """Whether ``value`` beats ``state.best_metric``; if so it becomes the best (at ``state.step``)."""
    best = state.best_metric
    if best is not None and (value <= best if higher_is_better else value >= best):
        return False
    state.best_metric, state.best_step = value, state.step
    return True


def _mixed_precision(choice: str, cpu: bool) -> str:
    if choice == "auto":
        return "bf16" if (torch.cuda.is_available() and not cpu) else "no"
    return choice


def start_run(cfg: RunOptions, name: str) -> Run:
    """Build the accelerator, check that no other process writes into ``--output`` (its lock) and
    the folder against ``--resume``, seed, and install the stop signals; write nothing yet.

    The lock is only checked here and taken in :meth:`Run.begin`, before its first write: taking
    it here would make the folder, and an error while the trainer reads its data and loads its
    models would leave it behind. A second writer started while the first trains (the usual
    case) is refused here, before it loads anything; two started within the same few seconds
    both load their models and the later one is refused in ``begin``, still before writing."""
    out = Path(cfg.output)
    if cfg.threads is not None or cfg.cpu or not torch.cuda.is_available():  # GPU runs keep PyTorch's default
        configure_threads(cfg.threads)
    accelerator = Accelerator(mixed_precision=_mixed_precision(cfg.mixed_precision, cfg.cpu), cpu=cfg.cpu)
    enable_fsdp_on_cpu(accelerator)
    # the main process answers for the run: the others share its folder and must not be refused
    _agree(accelerator, run_lock.check(out) if accelerator.is_main_process else None)
    existing = find_checkpoint(out)
    if cfg.resume and existing is None:
        if (out / EXPORT).is_dir() and not (out / "checkpoint").exists():
            raise ConfigError(
                f"--resume: {out} finished and exported {out / EXPORT} but kept no resumable checkpoint "
                "(it ran with --no-final-checkpoint, or the pipeline removed it), so there is nothing to continue: "
                f"to train further, start a new run from {out / EXPORT} (its weights, a fresh optimizer) with another "
                "--output; to extend a run with --resume later, train it with --final-checkpoint (the default)"
            )
        raise ConfigError(f"--resume: {out} has no checkpoint to resume from ({missing_checkpoint(out)})")
    if not cfg.resume and existing is not None:
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it, or choose a new --output")
    set_seed(cfg.seed)
    run = Run(cfg, name, accelerator, existing if cfg.resume else None)
    run.signals.install()
    return run


def _agree(accelerator: Accelerator, refusal: str | None) -> None:
    """Raise the main process's ``refusal`` (a lock held by another run) on every process."""
    if accelerator.num_processes > 1:
        refusal = broadcast_object_list([refusal])[0]
    if refusal is not None:
        raise UserError(refusal)


class Run:
    """One training run: its accelerator, folder, metrics log, progress bar and checkpoints."""

    def __init__(self, cfg: RunOptions, name: str, accelerator: Accelerator, resume_from: Path | None):
        self.cfg, self.name, self.accelerator, self.resume_from = cfg, name, accelerator, resume_from
        self.out = Path(cfg.output)
        self.main = accelerator.is_main_process
        self.sharded = is_sharded(accelerator)  # FSDP: every process must take part in each forward pass
        self.world, self.rank, self.device = accelerator.num_processes, accelerator.process_index, accelerator.device
        self.log: MetricsLogger | None = None
        self.progress: Any = None
        self.saved_step: int | None = None  # the step of the newest checkpoint on disk
        self._stop_at = 0
        self.lock: run_lock.RunLock | None = None  # main process, from begin to close
        self.signals = StopSignals(self._interrupted_note)  # installed by start_run
        self.pending_checks: list = []  # finite checks of steps not yet read on the host (training/step.py)
        # --cpu-matmul auto: the kernels the checkpoint's run chose, for the models loaded next
        reuse_cpu_matmul_choices(_recorded_cpu_matmul(resume_from))

    def begin(self, state: TrainState, total_steps: int, unit: str = "step") -> TrainState:
        """Make the folder, save the config, restore the checkpoint of ``--resume`` (after
        ``accelerator.prepare``), open the metrics log (with its trackers, which get the config
        once) and the progress bar."""
        self._claim()
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.resume_from is not None:
                self._warn_changed_options()
            save_yaml(self.cfg, self.out / "config.yaml")
            _log_to_file(self.out / "run.log")
            for path in remove_stale_temp(self.out):
                logger.warning("removed %s, left half-written by a run that was killed", path)
            logger.warning(
                "%s: %s, device %s, precision %s",
                self.name,
                describe(self.accelerator),
                self.device,
                self.accelerator.mixed_precision,
            )
        if self.resume_from is not None:
            saved, warnings = load_checkpoint(self.accelerator, self.resume_from)
            known = {f.name for f in dataclasses.fields(TrainState)}
            state = TrainState(**{k: v for k, v in saved.items() if k in known})
            self.saved_step = state.step
            for warning in warnings:  # every process: each has its own RNG state
                logger.warning("process %d: %s", self.rank, warning)
            if self.main:
                logger.warning("resuming from %s at %s %d", self.resume_from, unit, state.step)
                if state.step >= total_steps:
                    logger.warning(
                        "%s is already finished at %s %d of %d; nothing to do",
                        self.out,
                        unit,
                        state.step,
                        total_steps,
                    )
        self.log = MetricsLogger(
            self.out,
            enabled=self.main,
            resume_step=state.step if self.resume_from else None,
            report_to=self.cfg.report_to,
            run_name=self.out.resolve().name,
            config=to_dict(self.cfg),
            cuda_memory=self.device.type == "cuda",
        )
        self.progress = Progress(
            total_steps, self.name, unit, initial=state.step, enabled=self.main and self.cfg.progress
        )
        self._stop_at = min(total_steps, self.cfg.stop_after_steps or total_steps)
        return state

    def step_done(self, step: int) -> None:
        """Advance the progress bar (and print the one early time estimate)."""
        self.progress.update(1, stop_at=self._stop_at)

    def _warn_changed_options(self) -> None:
        saved_file = self.out / "config.yaml"
        if not saved_file.is_file():
            return
        saved = yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {}
        changed = check_resume_matches(saved, to_dict(self.cfg))
        if changed:
            logger.warning(
                "--resume with changed options (%s): the run continues with the new values, so it will not "
                "end where the uninterrupted run would have",
                ", ".join(f"{k}: {saved[k]!r} -> {getattr(self.cfg, k)!r}" for k in changed),
            )

    def save(self, state: TrainState) -> None:
        """A resumable checkpoint (collective: every process calls it), after the steps' finite
        checks are read (:func:`~rlhfkit.training.step.check_finite`): no checkpoint holds a
        state after a step that was not finite."""
        check_finite(self)
        save_checkpoint(
            self.accelerator, self.out, {**dataclasses.asdict(state), "cpu_matmul": run_cpu_matmul_choices()}
        )
        self.saved_step = state.step

    def finish(self, state: TrainState, total_steps: int) -> bool:
        """After the loop: the last checkpoint, then :meth:`close`; returns whether the run reached
        ``total_steps`` (the caller then exports ``final/``). Collective: every process calls it.

        No checkpoint is written when the newest one on disk is already at this step (``--resume``
        of a finished run), nor, with ``--no-final-checkpoint``, when the run finished and no stop
        signal came: its weights are exported to ``final/`` next, and the optimizer state is only
        needed to extend the run. A run stopped early (``--stop-after-steps``, a signal) always saves."""
        check_finite(self)  # before the last checkpoint and the export
        finished = state.step >= total_steps
        if self.saved_step != state.step:
            if self.cfg.final_checkpoint or not finished or self.stop_requested() is not None:
                self.save(state)
            else:  # asked for, so a line of the run's output (and run.log), not a warning
                self.write(
                    f"--no-final-checkpoint: no resumable checkpoint after step {state.step}"
                    + (f" (the last is at step {self.saved_step})" if self.saved_step is not None else "")
                    + f"; {self.out}/{EXPORT} holds the weights"
                )
        return self.close(state, total_steps)

    def full_state_dict(self, model) -> dict | None:
        """The full weights of a sharded ``model`` (collective: every process calls it; the main
        process gets them), or None when ``model`` holds its full weights already."""
        return self.accelerator.get_state_dict(model) if self.sharded else None

    def evaluates(self) -> bool:
        """Whether this process runs evaluations: the main one, or every one when the model is
        sharded (each forward pass gathers weights from all processes)."""
        return self.main or self.sharded

    def stop_note(self) -> str:
        """What a stopped run leaves behind, for :class:`~rlhfkit.errors.RunStopped` messages."""
        if self.saved_step is None:
            return f"no checkpoint had been written yet (the first comes at step {self.cfg.save_every})"
        return f"the last good checkpoint in {self.out / 'checkpoint'} (step {self.saved_step}) is intact"

    def write(self, text: str) -> None:
        """Print a line above the progress bar (main process only)."""
        if self.main:
            self.progress.write(text) if self.progress is not None else print(text, flush=True)
            for handler in _RUN_LOG:
                handler.emit(logging.LogRecord(logger.name, logging.INFO, __file__, 0, text, None, None))

    def close(self, state: TrainState, total_steps: int) -> bool:
        """Close the log (finishing its trackers) and the progress bar, restore the signal handlers
        and release the folder's lock; returns whether the run reached ``total_steps``. A stop
        signal received during the run (see :mod:`rlhfkit.training.signals`) ends it here instead,
        with :class:`Interrupted` (the caller has just saved). A run that raises never gets here:
        its trackers are finished, as failed, when the next run opens its log or when the process
        exits; its lock and handlers are released by the CLI's error path, at exit or by the next run."""
        stop = self.stop_requested()
        finished = state.step >= total_steps
        if self.progress is not None:
            self.progress.close()
        if self.log is not None:
            self.log.close()
        if stop is not None:
            saved = (
                f"checkpoint written ({self.out / 'checkpoint'})" if self.saved_step == state.step else self.stop_note()
            )
            what = f"stopped by {signal.Signals(stop).name} at step {state.step}; {saved}"
            self._note_in_run_log(f"{what}; continue with --resume")
        elif self.main and not finished:
            logger.warning("%s stopped at step %d of %d; continue with --resume", self.name, state.step, total_steps)
        _log_to_file(None)
        self.signals.restore()
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if stop is not None:
            raise Interrupted(what, stop)
        return finished

    def _claim(self) -> None:
        """Before the first write: lock the folder (main process; every process learns whether
        it was refused), and from now on let a first stop signal finish the step."""
        refusal = None
        if self.main:
            try:
                self.lock = run_lock.RunLock.take(self.out)
            except UserError as e:
                refusal = str(e)
        _agree(self.accelerator, refusal)
        self.signals.deferred = True

    def stop_requested(self) -> int | None:
        """The signal that asks the run to stop at this step, or None; the same on every process
        (one all-reduce of two numbers per step when there are several: a process that got no
        signal stops with the others, at the same step)."""
        got = self.signals.received
        if self.world > 1:
            flags = torch.tensor(
                [got == signal.SIGTERM, got is not None and got != signal.SIGTERM], dtype=torch.float32
            )
            term, other = self.accelerator.reduce(flags.to(self.device), reduction="sum").tolist()
            got = signal.SIGTERM if term else signal.SIGINT if other else None
        return got

    def _interrupted_note(self) -> str:
        """What an immediate stop leaves: nothing before ``begin``, else the last checkpoint."""
        if not self.signals.deferred:
            return "nothing was written" + (
                f" (the checkpoint in {self.resume_from} is as it was)" if self.resume_from else ""
            )
        return self.stop_note()

    def _note_in_run_log(self, text: str) -> None:
        """Add ``text`` to the run folder's run.log only (the CLI prints it)."""
        if self.main:
            for handler in _RUN_LOG:
                handler.emit(logging.LogRecord(logger.name, logging.WARNING, __file__, 0, text, None, None))


def _recorded_cpu_matmul(checkpoint: Path | None) -> dict | None:
    """The ``--cpu-matmul auto`` choices saved in ``checkpoint`` (None: none, or an unreadable
    state, which :func:`~rlhfkit.checkpoint.load_checkpoint` reports when the run begins)."""
    if checkpoint is None:
        return None
    try:
        return read_state(checkpoint).get("cpu_matmul")
    except (ValueError, OSError):  # UserError is a ValueError
        return None


_RUN_LOG: list[logging.Handler] = []


def _log_to_file(path: Path | None) -> None:
    """Copy rlhfkit's log (the mode line, warnings, the stop note) into the run folder's
    ``run.log`` (appended to on resume), or stop copying (``None``). One run at a time: a
    run that died without closing hands the file over to the next one."""
    package = logging.getLogger("rlhfkit")
    while _RUN_LOG:
        handler = _RUN_LOG.pop()
        package.removeHandler(handler)
        handler.close()
    if path is not None:
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        package.addHandler(handler)
        _RUN_LOG.append(handler)

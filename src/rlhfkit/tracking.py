"""Metrics to JSONL and the trackers of ``--report-to`` (main process only), and curves to PNG.

``metrics.jsonl`` is always written; each row also goes, at the same step, to every tracker
named by ``--report-to`` (TensorBoard by default; wandb, mlflow, trackio, or none), through
accelerate's tracker classes. Each tracker is configured the way its users already do it,
by its own environment variables; where it keeps files locally, they go in the run folder
unless such a variable says otherwise. A tracker's package is imported only when a run asks
for it.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from rlhfkit.errors import ConfigError

logger = logging.getLogger(__name__)


def plural(unit: str, n: int) -> str:
    """``batch`` -> ``batches`` (n != 1), ``step`` -> ``steps``, ``step`` (n == 1)."""
    if n == 1:
        return unit
    return unit + ("es" if unit.endswith(("s", "sh", "ch", "x")) else "s")


class Progress:
    """A tqdm bar (its ETA on a terminal) that also prints, once, after the first measured
    updates, how long the rest should take: a line that survives in a log file or a
    pipeline's output, where a bar does not. The first update, with its one-off set-up, is
    left out of the rate.
    """

    def __init__(
        self, total: int, desc: str, unit: str = "step", initial: int = 0, enabled: bool = True, estimate_after: int = 3
    ):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit=unit, dynamic_ncols=True)
        self.desc, self.unit, self.enabled = desc, unit, enabled
        self.total, self.done, self.estimate_after = total, initial, estimate_after
        self._marks: list[float] = []

    def update(self, n: int = 1, stop_at: int | None = None) -> None:
        """``n`` more done; ``stop_at`` (default: the total) is where this invocation ends."""
        self.bar.update(n)
        self.done += n
        self._marks.append(time.perf_counter())
        left = (stop_at if stop_at is not None else self.total) - self.done
        if len(self._marks) == self.estimate_after and left > 0 and self.enabled:
            per = (self._marks[-1] - self._marks[0]) / (self.estimate_after - 1)
            self.write(
                f"{self.desc}: {per:.1f} s per {self.unit}; about {duration(per * left)} left for the "
                f"remaining {left} {plural(self.unit, left)}"
            )

    def set_postfix(self, **values) -> None:
        self.bar.set_postfix(**values)

    def write(self, text: str) -> None:
        self.bar.write(text) if not self.bar.disable else print(text, flush=True)

    def close(self) -> None:
        self.bar.close()


def duration(seconds: float) -> str:
    """``'2 min 5 s'`` or ``'45 s'``."""
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


# --report-to: tracker -> (the module it needs, the pip extra that installs it; None: a dependency already)
TRACKERS = {
    "tensorboard": ("tensorboard", None),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
}
PROJECT = (
    "rlhfkit"  # wandb project, mlflow experiment, trackio project, unless their environment variables say otherwise
)


def parse_report_to(value: list[str] | str) -> list[str]:
    """``--report-to`` as a list of known tracker names without repeats, or ``["none"]``; accepts
    ``["wandb,mlflow"]`` (the command line) as well as ``["wandb", "mlflow"]``, and a plain string
    (a config built in Python: ``report_to="none"``)."""
    value = [value] if isinstance(value, str) else list(value)
    names = list(dict.fromkeys(n.strip().lower() for item in value for n in str(item).split(",") if n.strip()))
    given, choices = ",".join(map(str, value)), f"{', '.join(TRACKERS)} or none"
    unknown = [n for n in names if n not in TRACKERS and n != "none"]
    if not names or unknown:
        what = f"unknown tracker {unknown[0]!r}" if unknown else "no tracker"
        raise ConfigError(
            f"option --report-to got {given!r}: {what}; choose from {choices} "
            "(several comma-separated: --report-to wandb,mlflow)",
            "report_to",
        )
    if "none" in names and len(names) > 1:
        raise ConfigError(
            f"option --report-to got {given!r}: 'none' means no tracker, so it cannot be combined with "
            "others; give --report-to none alone, or only the trackers you want",
            "report_to",
        )
    return names


def check_installed(names: list[str]) -> None:
    """Raise :class:`ConfigError` for the first tracker in ``names`` whose package is missing,
    naming the extra to install (checked at start-up, before a run folder exists)."""
    for name in names:
        if name == "none":
            continue
        module, extra = TRACKERS[name]
        if not _installed(module):
            fix = f"pip install 'rlhfkit[{extra}]'" if extra else f"pip install {module}"
            raise ConfigError(
                f"option --report-to {name}: the {name} package is not installed; install it with {fix}, "
                f"or leave {name} out of --report-to",
                "report_to",
            )


def _installed(module: str) -> bool:
    if module in sys.modules:  # None there: an import that is known to fail
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def flat_config(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config dict as one level of ``key: bool | int | float | str | None`` (nested dicts as
    ``outer.inner``, lists as ``a,b``, the way the command line writes them): what every
    tracker accepts as hyperparameters."""
    flat: dict[str, Any] = {}
    for key, v in values.items():
        if isinstance(v, dict):
            flat.update(flat_config(v, f"{prefix}{key}."))
        elif isinstance(v, (list, tuple)):
            flat[f"{prefix}{key}"] = ",".join(map(str, v))
        elif v is None or isinstance(v, (bool, int, float, str)):
            flat[f"{prefix}{key}"] = v
        else:
            flat[f"{prefix}{key}"] = str(v)
    return flat


_OPEN: list[MetricsLogger] = []  # loggers whose trackers are running (one run at a time)


class MetricsLogger:
    """Append ``{"step": s, "train/loss": ...}`` rows to ``metrics.jsonl`` and send them to the
    trackers of ``report_to`` (their names; ``["none"]``: only the file).

    ``run_name`` names the run in the trackers and ``config`` (the run's options, flattened by
    :func:`flat_config`) is logged once as its hyperparameters. On resume, rows past the
    checkpoint's step are dropped first, so the file reads as one uninterrupted run (and
    TensorBoard's events past it are purged); a tracker that keeps runs apart gets a new run
    starting at that step. Only the main process writes (``enabled=False`` elsewhere).
    :meth:`close` finishes the trackers; a logger left open (its run raised) is finished as
    failed when the next one opens or when the process exits.
    """

    def __init__(
        self,
        out_dir: str | Path,
        enabled: bool = True,
        resume_step: int | None = None,
        report_to: Iterable[str] = ("tensorboard",),
        run_name: str | None = None,
        config: dict[str, Any] | None = None,
        cuda_memory: bool = False,
    ):
        self.enabled = enabled
        self.cuda_memory = cuda_memory  # add memory/peak_gib: the most GPU memory this process has held so far
        self.path = Path(out_dir) / "metrics.jsonl"
        self._trackers: list[Any] = []  # accelerate GeneralTracker objects, started
        self._failed_log: set[str] = set()  # trackers whose log() raised once: warned, then left alone
        self._mlflow_uri_set = False
        if not enabled:
            return
        while _OPEN:  # a run that raised before closing: its trackers end now, as failed
            _OPEN.pop().close(failed=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        names = [n for n in report_to if n != "none"]
        if not names:
            return
        run_name = run_name or Path(out_dir).resolve().name
        hparams = flat_config(config or {})
        try:
            for name in names:
                self._trackers.append(self._start(name, Path(out_dir), run_name, resume_step, hparams))
        except BaseException:
            self.close(failed=True)
            raise
        _OPEN.append(self)
        atexit.register(self.close, failed=True)  # runs before the trackers' own exit hooks (registered earlier)

    def _start(self, name: str, out: Path, run_name: str, resume_step: int | None, hparams: dict[str, Any]) -> Any:
        """Start tracker ``name`` and log ``hparams`` to it once."""
        from accelerate import tracking

        try:
            if name == "tensorboard":  # OUT/tensorboard, as before --report-to existed
                tracker = tracking.TensorBoardTracker("tensorboard", out, purge_step=resume_step)
            elif name == "wandb":  # WANDB_MODE, WANDB_ENTITY, WANDB_RUN_GROUP, WANDB_TAGS, ...: wandb reads them itself
                kwargs = {
                    arg: value
                    for arg, value in (("name", run_name), ("dir", str(out)))
                    if f"WANDB_{arg.upper()}" not in os.environ
                }
                tracker = tracking.WandBTracker(os.environ.get("WANDB_PROJECT", PROJECT), **kwargs)
            elif name == "mlflow":  # MLFLOW_EXPERIMENT_NAME, MLFLOW_RUN_ID, MLFLOW_TAGS: read by accelerate's tracker
                artifacts = None
                if "MLFLOW_TRACKING_URI" not in os.environ:
                    import mlflow

                    # mlflow's own default is ./mlflow.db in the working directory (its file store needs an
                    # opt-in since mlflow 3); here the database goes in the run folder. set_tracking_uri also
                    # exports MLFLOW_TRACKING_URI, which close() takes back, or the next run would reuse it.
                    mlflow.set_tracking_uri(f"sqlite:///{(out / 'mlflow.db').resolve()}")
                    self._mlflow_uri_set, artifacts = True, str((out / "mlartifacts").resolve())
                tracker = tracking.MLflowTracker(experiment_name=PROJECT, logging_dir=artifacts, run_name=run_name)
            else:  # trackio: TRACKIO_DIR (default: the Hugging Face cache), TRACKIO_SPACE_ID, TRACKIO_SERVER_URL
                # The config goes to init: accelerate's store_init_configuration would call dict.update(...,
                # allow_val_change=True) on trackio's plain dict, adding that keyword to the config as a key.
                tracker = tracking.TrackioTracker(
                    os.environ.get("TRACKIO_PROJECT", PROJECT), name=run_name, config=hparams
                )
            tracker.start()
            if name != "trackio":
                tracker.store_init_configuration(hparams)
        except Exception as e:  # not logged in, a server out of reach, a broken install: say which tracker
            raise ConfigError(
                f"option --report-to {name}: {name} did not start ({type(e).__name__}: {e}); "
                "docs/tracking.md lists the environment variables it reads",
                "report_to",
            ) from e
        return tracker

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        if self.cuda_memory:
            row["memory/peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if not self._trackers:
            return
        numbers = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
        for tracker in self._trackers:
            if tracker.name in self._failed_log:
                continue
            try:
                tracker.log(numbers, step=step)
            except Exception as e:  # a tracker's outage must not end the run: metrics.jsonl has every row
                self._failed_log.add(tracker.name)
                logger.warning(
                    "--report-to %s: logging failed at step %d (%s: %s); the run goes on without it, "
                    "and %s has every row",
                    tracker.name,
                    step,
                    type(e).__name__,
                    e,
                    self.path,
                )

    def close(self, failed: bool = False) -> None:
        """Finish the trackers (``failed``: mark their runs failed, where they keep a status)."""
        atexit.unregister(self.close)
        if self in _OPEN:
            _OPEN.remove(self)
        while self._trackers:
            tracker = self._trackers.pop(0)
            try:
                if tracker.name == "wandb":
                    tracker.run.finish(exit_code=1 if failed else 0)
                elif tracker.name == "mlflow":
                    import mlflow

                    mlflow.end_run("FAILED" if failed else "FINISHED")
                else:
                    tracker.finish()
            except Exception as e:  # the run's own outcome matters more than a tracker's goodbye
                logger.warning("--report-to %s: finishing failed (%s: %s)", tracker.name, type(e).__name__, e)
        if self._mlflow_uri_set:
            import mlflow

            mlflow.set_tracking_uri(None)  # also unsets MLFLOW_TRACKING_URI again
            self._mlflow_uri_set = False


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


LEGACY_PREFIXES = {"ppo/": "rl/"}  # online RL's metrics before 0.2 (ppo/score_mean is rl/score_mean now)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl``; a row written by an earlier version also carries its
    metrics under today's names (``ppo/kl`` -> ``rl/kl``), so old runs plot and report as new."""
    path = Path(path)
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for row in rows:
        for key in [k for k in row if k.startswith(tuple(LEGACY_PREFIXES))]:
            old = next(p for p in LEGACY_PREFIXES if key.startswith(p))
            row.setdefault(LEGACY_PREFIXES[old] + key.removeprefix(old), row[key])
    return rows


def plot_curves(
    rows: Iterable[dict[str, Any]], panels: list[tuple[str, list[str]]], path: str | Path, title: str = ""
) -> Path:
    """One subplot per (title, [metric keys]) panel, metric vs step; saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(rows)
    panels = [(t, keys) for t, keys in panels if any(k in r for r in rows for k in keys)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.2 * max(1, len(panels)), 3.4), squeeze=False)
    for ax, (panel_title, keys) in zip(axes[0], panels):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, label=key)
        ax.set_title(panel_title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)

"""Metrics to JSONL and TensorBoard (main process only), and curves to PNG."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Iterable

import torch


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

    def __init__(self, total: int, desc: str, unit: str = "step", initial: int = 0, enabled: bool = True,
                 estimate_after: int = 3):
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
            self.write(f"{self.desc}: {per:.1f} s per {self.unit}; about {duration(per * left)} left for the "
                       f"remaining {left} {plural(self.unit, left)}")

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


class MetricsLogger:
    """Append ``{"step": s, "train/loss": ...}`` rows to ``metrics.jsonl`` and TensorBoard.

    On resume, rows past the checkpoint's step are dropped first, so the file reads as one
    uninterrupted run. Only the main process writes (``enabled=False`` elsewhere).
    """

    def __init__(self, out_dir: str | Path, enabled: bool = True, resume_step: int | None = None, tensorboard: bool = True,
                 cuda_memory: bool = False):
        self.enabled = enabled
        self.cuda_memory = cuda_memory  # add memory/peak_gib: the most GPU memory this process has held so far
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=resume_step)
            except ImportError:  # tensorboard is a declared dependency; stay usable without it
                self._tb = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        if self.cuda_memory:
            row["memory/peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_curves(rows: Iterable[dict[str, Any]], panels: list[tuple[str, list[str]]], path: str | Path, title: str = "") -> Path:
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

"""Helpers the benchmarks share: peak memory of this process, the machine and library versions
that go into every result file, the training-loop clock and running each side in a subprocess."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

PACKAGES = ("rlhfkit", "torch", "transformers", "accelerate", "peft", "datasets", "trl")


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (VmHWM), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


class LoopClock:
    """Times the loop identically on both sides with global PyTorch hooks.

    ``start``: the first ``nn.Module`` forward after ``install()`` (the hook then removes
    itself). At the end of every ``optimizer.step()``: wall time, this process's CPU time
    (what the loop computed, whatever else the machine runs) and its peak RSS so far, so
    the memory figure covers loading and the loop but not the saving after it.
    :meth:`summary` groups the steps into updates and leaves the first update out of the
    per-update figures when there are at least two.
    """

    def __init__(self):
        self.start: float | None = None
        self.start_cpu: float | None = None
        self.step_ends: list[float] = []
        self.step_cpu: list[float] = []
        self.peak_rss_mib = 0.0

    def install(self) -> None:
        from torch.nn.modules.module import register_module_forward_pre_hook
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self._fwd = register_module_forward_pre_hook(self._on_forward)
        self._opt = register_optimizer_step_post_hook(self._on_step)

    def remove(self) -> None:
        self._fwd.remove()
        self._opt.remove()

    def _on_forward(self, module, args):
        self.start, self.start_cpu = time.perf_counter(), time.process_time()
        self._fwd.remove()

    def _on_step(self, optimizer, args, kwargs):
        self.step_ends.append(time.perf_counter())
        self.step_cpu.append(time.process_time())
        self.peak_rss_mib = peak_rss_mib()

    def summary(self, steps_per_update: int) -> dict[str, Any]:
        if self.start is None or not self.step_ends:
            raise RuntimeError("the loop ran no forward or no optimizer step")
        n = len(self.step_ends)
        if n % steps_per_update:
            raise RuntimeError(f"{n} optimizer steps is not a whole number of updates of {steps_per_update}")
        updates = n // steps_per_update
        last = [(u + 1) * steps_per_update - 1 for u in range(updates)]  # the step that ends each update
        wall = [self.step_ends[i] for i in last]
        cpu = [self.step_cpu[i] for i in last]
        per_update = lambda ends, start: (ends[-1] - ends[0]) / (updates - 1) if updates > 1 else ends[-1] - start  # noqa: E731
        return {"loop_s": wall[-1] - self.start, "loop_cpu_s": cpu[-1] - self.start_cpu, "optimizer_steps": n,
                "updates": updates, "first_update_s": wall[0] - self.start,
                "s_per_update": per_update(wall, self.start), "cpu_s_per_update": per_update(cpu, self.start_cpu),
                "peak_rss_mib": self.peak_rss_mib}


def set_threads(n: int) -> None:
    """``n`` PyTorch threads for this process's kernels, one inter-op thread."""
    import torch

    torch.set_num_threads(n)
    torch.set_num_interop_threads(1)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def machine() -> dict:
    """CPU count, load average at the start (the other jobs a timing competes with), versions."""
    from rlhfkit.cpu import cpu_model

    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "isa_caps": {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS") if k in os.environ},
            "loadavg": " ".join(f"{x:.1f}" for x in os.getloadavg()), "versions": versions()}


def work_folder(work_dir: str | None, prefix: str) -> tuple[Path, bool]:
    """The benchmark's working folder and whether to keep it: ``work_dir`` if given (kept),
    else a new temporary folder (removed after a good run)."""
    import tempfile

    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    return work, work_dir is not None


def run_child(script: str | Path, work: Path, name: str, args: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``script --config WORK/args.yaml ARGS`` in a fresh interpreter, its output in
    ``WORK/NAME.log``; return the result it wrote to ``WORK/NAME.json`` plus the whole
    process's wall time and peak RSS (its own rusage). A failing child stops the benchmark
    with the last lines of its log."""
    import json
    import subprocess
    import sys
    import time

    log = work / f"{name}.log"
    cmd = [sys.executable, str(Path(script).resolve()), "--config", str(work / "args.yaml"), *args]
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=Path(script).resolve().parent.parent,
                                env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise SystemExit(f"{name} failed (exit {code}); last lines of {log}:\n{tail}")
    result = json.loads((work / f"{name}.json").read_text())
    result["process_s"] = time.perf_counter() - t0
    result["process_peak_rss_mib"] = usage.ru_maxrss / 1024
    return result

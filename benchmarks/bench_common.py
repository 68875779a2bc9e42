"""Helpers both benchmarks share: peak memory of this process, and the machine and library
versions that go into every result file."""

from __future__ import annotations

import os
import platform
from pathlib import Path

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
    return {"cpus": os.cpu_count(), "loadavg": " ".join(f"{x:.1f}" for x in os.getloadavg()), "versions": versions()}


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

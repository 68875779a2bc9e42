"""How many CPU threads a run uses, and what this machine is.

PyTorch's default (one OpenMP thread per core, spinning at every barrier) is right on an
idle machine and badly wrong on a busy one: with other processes on the cores, each
parallel region waits for its slowest thread, and spinning threads steal the time the
others need. :func:`choose_threads` starts from one thread per physical core (``--threads``
or ``OMP_NUM_THREADS`` overrides it) and, when the machine is busy at start, leaves the busy
cores to their owners; :func:`configure_threads` applies it. The measurements behind this are in the
docs/benchmarks.md ("Threads and a busy machine").
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def usable_cpus() -> int:
    """Logical CPUs this process may run on (affinity and cgroup limits included)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = Path("/sys/fs/cgroup/cpu.max")
    if quota.is_file():
        parts = quota.read_text().split()
        if len(parts) == 2 and parts[0] != "max":
            n = min(n, max(1, int(int(parts[0]) / int(parts[1]))))
    return max(1, n)


def physical_cores(cpuinfo: str | None = None) -> int:
    """Physical cores among the usable CPUs: distinct (package, core) pairs of ``/proc/cpuinfo``
    (hyper-threads share a core's arithmetic units, so one thread per core is faster)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.is_file() else ""
    blocks = [
        dict(re.findall(r"^([^:\n]+?)\s*:\s*(.*)$", b, flags=re.M)) for b in cpuinfo.split("\n\n") if "processor" in b
    ]
    cores = {(b.get("physical id"), b.get("core id")) for b in blocks if "core id" in b}
    usable = usable_cpus()
    if not cores:
        return usable
    return max(1, min(usable, round(usable * len(cores) / len(blocks))))


def cpu_model() -> str:
    """The CPU's marketing name and its widest vector instruction set, e.g. ``AMD EPYC 9B45 (avx512)``."""
    path = Path("/proc/cpuinfo")
    text = path.read_text() if path.is_file() else ""
    name = next(iter(re.findall(r"model name\s*:\s*(.+)", text)), "unknown CPU").strip()
    flags = set(next(iter(re.findall(r"flags\s*:\s*(.+)", text)), "").split())
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "sse/other"
    if "avx512_bf16" in flags:
        isa += "+bf16"
    if "amx_tile" in flags:
        isa += "+amx"
    return f"{name} ({isa})"


def busy_cpus(seconds: float = 0.25, stat: Path = Path("/proc/stat")) -> float:
    """How many CPUs other processes kept busy over the next ``seconds`` (0 when unknown)."""
    if not stat.is_file():
        return 0.0

    def sample() -> tuple[float, float]:
        fields = [float(x) for x in stat.read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
        return sum(fields), idle

    own0, (total0, idle0) = time.process_time(), sample()
    time.sleep(seconds)
    own1, (total1, idle1) = time.process_time(), sample()
    ticks = total1 - total0
    if ticks <= 0:
        return 0.0
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    cpus = os.cpu_count() or 1
    busy = (ticks - (idle1 - idle0)) / ticks * cpus  # CPUs busy, ours included
    own = (own1 - own0) / max(ticks / hz / cpus, 1e-9)
    return max(0.0, busy - own)


@dataclass
class ThreadChoice:
    threads: int
    reason: str


def choose_threads(
    requested: int | None, cores: int, busy: float, local_processes: int = 1, env_threads: str | None = None
) -> ThreadChoice:
    """``requested`` (``--threads``) as given; else ``OMP_NUM_THREADS`` (``env_threads``) when the
    user set it to a positive integer; else one per physical core (shared out among the
    processes of a multi-process run on this machine), less the cores other processes keep
    busy (rounded), at least one."""
    if requested is not None:
        return ThreadChoice(requested, "--threads")
    if env_threads is not None and env_threads.strip().isdigit() and int(env_threads) >= 1:
        return ThreadChoice(int(env_threads), "OMP_NUM_THREADS")
    share = max(1, cores // max(1, local_processes))
    why = (
        f"one per physical core ({cores})"
        if local_processes == 1
        else f"{cores} physical core(s) for {local_processes} processes"
    )
    taken = int(busy + 0.5)
    if taken <= 0:
        return ThreadChoice(share, why)
    return ThreadChoice(max(1, share - taken), f"{why}, about {busy:.1f} busy with other processes")


def cap_threads(choice: ThreadChoice, cpus: int) -> ThreadChoice:
    """At most one thread per usable logical CPU: more only wait on each other at every barrier,
    and a count like 100000 fails to create its threads and then crashes the process."""
    if choice.threads <= cpus:
        return choice
    logger.warning(
        "%s asks for %d CPU threads, but this process may use %d logical CPU(s); using %d",
        choice.reason,
        choice.threads,
        cpus,
        cpus,
    )
    return ThreadChoice(cpus, f"{choice.reason} {choice.threads}, capped at the {cpus} usable logical CPU(s)")


def configure_threads(requested: int | None) -> ThreadChoice:
    """Choose (:func:`choose_threads`, at most one per usable CPU) and set PyTorch's intra-op
    thread count; log why."""
    env = os.environ.get("OMP_NUM_THREADS")
    busy = busy_cpus() if requested is None and not (env or "").strip().isdigit() else 0.0
    choice = choose_threads(requested, physical_cores(), busy, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), env)
    choice = cap_threads(choice, usable_cpus())
    torch.set_num_threads(choice.threads)
    logger.info("CPU threads: %d (%s)", choice.threads, choice.reason)
    return choice

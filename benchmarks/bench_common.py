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

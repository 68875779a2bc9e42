"""Shared fixtures: tiny models built locally (never downloaded) and synthetic data."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread in every run a test starts: a run chooses its threads by how busy the machine is
# (rlhfkit.cpu), and a resumed run that chose other threads than the run it continues computes
# other last bits (seen: a resume test failing while other processes ran).
os.environ.setdefault("OMP_NUM_THREADS", "1")

WORDS = ["apple", "river", "stone", "cloud", "paper", "green", "quiet", "table", "light", "music", "north", "bread"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from more threads, and on a shared 2-core machine two
    OpenMP threads per process stall at every barrier (seen: 9 s -> 225 s)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    from rlhfkit.models.tiny import build_tiny_causal_lm

    return build_tiny_causal_lm(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    from rlhfkit.models.tiny import build_tiny_encoder

    return build_tiny_encoder(tmp_path_factory.mktemp("models") / "tiny-bert")


SHARE_LOWER = (
    "def share_lower(prompts, responses):\n"
    "    '''Share of lowercase ASCII letters in the response: ~0.1 for a random byte policy.'''\n"
    "    return [sum(c.islower() and c.isascii() for c in r) / max(len(r), 1) for r in responses]\n"
)


def write_rl_files(root: Path, prompts: list[str], extra_rewards: str = "") -> tuple[Path, Path]:
    """What a tiny RL run reads: ``root/prompts.txt`` (one prompt per line) and ``root/rewards.py``
    with ``share_lower`` (a reward a byte-level policy can learn), plus ``extra_rewards`` (source)."""
    root.mkdir(parents=True, exist_ok=True)
    prompt_file = root / "prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    rewards = root / "rewards.py"
    rewards.write_text(SHARE_LOWER + extra_rewards, encoding="utf-8")
    return prompt_file, rewards


def separable_lists(n: int, k: int = 4, seed: int = 0) -> list[list[str]]:
    """Rank lists whose quality is the number of leading 'good' words (best first)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        row = []
        for q in range(k - 1, -1, -1):
            body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
            row.append(("good " * q + body).strip())
        out.append(row)
    return out


def weights(folder: Path) -> dict:
    """The tensors of a saved model folder (``model.safetensors``), by name."""
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def step_losses(out: Path) -> list[float]:
    """``train/loss`` of every logged step of a run folder."""
    from rlhfkit.tracking import read_metrics

    return [r["train/loss"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]


@pytest.fixture
def separable_tsv(tmp_path) -> Path:
    path = tmp_path / "lists.tsv"
    path.write_text("\n".join("\t".join(r) for r in separable_lists(120)) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------ waiting, multi-process runs, shared data
# (one block: polling instead of sleeping, the one way tests launch several processes, the data outside the repo)

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T], timeout: float = 10.0, what: str = "the condition", interval: float = 0.005
) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns something true, and return
    that; after ``timeout`` seconds fail, saying ``what`` was awaited. The timeout is a bound
    on a hang, not a measurement: a slow machine only makes the test wait longer."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout:g} s for {what}; it did not happen (last value: {value!r})", pytrace=False)
        time.sleep(interval)


def launch(
    args: list, nprocs: int = 2, *, config_file: Path | None = None, timeout: float = 600, exit_code: int = 0
) -> subprocess.CompletedProcess:
    """Run ``args`` (a script and its arguments, or ``-m module ...``) as ``nprocs`` CPU processes
    under ``accelerate launch``, or, with ``nprocs=1``, as one plain Python process (the
    single-process reference of a multi-process test); return the finished process, whose
    ``stderr`` holds the runs' logs. ``config_file``: an accelerate config (FSDP2); without
    one, DDP. Each process gets one OpenMP thread (two processes on a shared 2-core machine
    stall at every barrier with more). An exit other than ``exit_code`` or ``timeout`` seconds
    fails the test with the tail of stdout and stderr."""
    if nprocs == 1:
        cmd = [sys.executable, *map(str, args)]
    else:
        accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
        assert accelerate, "accelerate's launcher is installed with the package"
        # accelerate 1.x's `launch --cpu --num_processes 2` starts ONE process unless mpirun is
        # configured; `--multi_gpu` uses torch's launcher, and rlhfkit's own `--cpu` flag then makes
        # Accelerator pick the gloo backend on CPU (DistributedType.MULTI_CPU).
        where = (
            ["--config_file", str(config_file)]
            if config_file is not None
            else ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        )
        # port 0: accelerate picks a free port for the processes to meet on
        cmd = [
            accelerate,
            "launch",
            *where,
            "--num_processes",
            str(nprocs),
            "--main_process_port",
            "0",
            *map(str, args),
        ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p),
    }
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        why = f"exited with {proc.returncode}, not {exit_code}" if proc.returncode != exit_code else ""
    except subprocess.TimeoutExpired:
        import psutil  # accelerate's dependency

        # torch's launcher starts each worker in a session of its own: kill them by id, found
        # before the launcher goes (they hold the output pipes open until they end)
        workers = psutil.Process(proc.pid).children(recursive=True)
        for process in [psutil.Process(proc.pid), *workers]:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        stdout, stderr = proc.communicate()
        why = f"did not finish in {timeout:g} s (killed)"
    if why:
        pytest.fail(
            f"{' '.join(cmd)}\n{why}.\n--- stdout (end) ---\n{stdout[-2000:]}\n--- stderr (end) ---\n{stderr[-4000:]}",
            pytrace=False,
        )
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The data folder shared beside the repository (``../shared/data``); skips where it is absent."""
    folder = REPO.parent / "shared" / "data"
    if not folder.is_dir():
        pytest.skip(f"no shared data folder at {folder} (it sits beside the repository on the development machines)")
    return folder

"""Multi-process training: 2 CPU processes x batch b == 1 process x batch 2b."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.tracking import read_metrics

pytestmark = pytest.mark.slow


def _train_args(model: Path, data: Path, out: Path, batch_size: int) -> list[str]:
    return ["rm", "train", "--model", str(model), "--train", str(data), "--n-train", "64", "--output", str(out),
            "--max-steps", "4", "--batch-size", str(batch_size), "--lr", "3e-3", "--log-every", "1",
            "--warmup-ratio", "0", "--max-grad-norm", "0", "--no-progress", "--no-tensorboard", "--cpu"]


def test_two_processes_match_one_process_with_double_batch(tiny_lm, separable_tsv, tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    assert accelerate, "accelerate's launcher is installed with the package"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    two = tmp_path / "ddp"
    # accelerate 1.x's `launch --cpu --num_processes 2` starts ONE process unless mpirun is
    # configured; `--multi_gpu` uses torch's launcher, and our own `--cpu` flag then makes
    # Accelerator pick the gloo backend on CPU (DistributedType.MULTI_CPU).
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--main_process_port", "0", "-m", "rlhfkit.cli"]
    res = subprocess.run(launch + _train_args(tiny_lm, separable_tsv, two, 4), env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rm train: DDP (2 processes, each with a full copy; MULTI_CPU)" in res.stderr, res.stderr[-2000:]
    one = tmp_path / "single"
    res = subprocess.run([sys.executable, "-m", "rlhfkit.cli"] + _train_args(tiny_lm, separable_tsv, one, 8), env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]

    def losses(out):
        return [r["train/loss"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]

    assert len(losses(one)) == 4
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    a, b = load_file(str(one / "last" / "model.safetensors")), load_file(str(two / "last" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)

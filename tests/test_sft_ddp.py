"""Multi-process SFT: 2 CPU processes x batch b == 1 process x batch 2b (packed rows, token-mean loss)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.cli import main
from rlhfkit.tracking import read_metrics

pytestmark = pytest.mark.slow


def _args(model: Path, data: Path, out: Path, batch_size: int) -> list[str]:
    return ["sft", "--policy", str(model), "--train", str(data), "--output", str(out), "--max-steps", "3", "--batch-size", str(batch_size),
            "--lr", "1e-2", "--log-every", "1", "--warmup-ratio", "0", "--max-grad-norm", "0", "--packing", "--max-length", "64",
            "--n-samples", "0", "--no-progress", "--no-tensorboard", "--cpu"]


def test_two_processes_match_one_process_with_double_batch(tiny_lm, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"repeat {'ab' * (i % 4 + 1)}", "response": "ab" * (i % 7 + 1)}) + "\n"
                            for i in range(40)))
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    assert accelerate, "accelerate's launcher is installed with the package"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    two = tmp_path / "ddp"
    # As in test_rm_ddp: --multi_gpu uses torch's launcher; our --cpu makes Accelerator pick gloo on CPU.
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--main_process_port", "0", "-m", "rlhfkit.cli"]
    res = subprocess.run(launch + _args(tiny_lm, data, two, 2), env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "sft: DDP (2 processes, each with a full copy; MULTI_CPU)" in res.stderr, res.stderr[-2000:]
    one = tmp_path / "single"
    assert main(_args(tiny_lm, data, one, 4)) == 0  # the single-process reference runs in this process

    def losses(out):
        return [r["train/loss"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]

    assert len(losses(one)) == 3
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    a, b = load_file(str(one / "final" / "model.safetensors")), load_file(str(two / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)

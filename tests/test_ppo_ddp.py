"""Multi-process PPO with a separate critic: actor and critic are prepared as two DDP models
and their backward passes run one after the other; two CPU processes must finish, count
both processes' episodes, and end with the same weights on both ranks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhfkit.tracking import read_metrics

pytestmark = pytest.mark.slow

# Each rank writes a digest of its actor and critic weights after training: DDP must have kept them equal.
PROBE = """
import sys, torch
import rlhfkit.rl.trainer as T
from rlhfkit.cli import main

real = T.optimise
def probe(cfg, run, steps, *a, **k):
    out = real(cfg, run, steps, *a, **k)
    digest = [float(sum(p.detach().double().sum() for p in s.net.parameters())) for s in steps]
    with open(f"{cfg.output}.rank{run.rank}", "a") as f:
        f.write(repr(digest) + "\\n")
    return out
T.optimise = probe
sys.exit(main(["ppo", *sys.argv[1:]]))
"""


def test_two_processes_with_a_reward_model_critic(tiny_lm, tmp_path):
    from rlhfkit.models.reward import RewardModel

    torch.manual_seed(0)
    RewardModel.from_pretrained(tiny_lm).save_pretrained(tmp_path / "rm")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(16)))
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--main_process_port", "0", str(probe),
              "--policy", str(tiny_lm), "--reward", str(tmp_path / "rm"), "--critic", "reward-model",
              "--prompts", str(prompts), "--output", str(out), "--steps", "2", "--batch-size", "4",
              "--mini-batch-size", "4", "--grad-accum", "2", "--ppo-epochs", "2", "--max-new-tokens", "5",
              "--lr", "1e-3", "--sample-every", "0", "--no-progress", "--no-tensorboard", "--cpu"]
    res = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ppo: DDP (2 processes, each with a full copy; MULTI_CPU)" in res.stderr, res.stderr[-2000:]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["ppo/episodes"] for r in rows] == [8, 16]  # 4 prompts per process per update, 2 processes
    rank0, rank1 = ((tmp_path / f"run.rank{i}").read_text().splitlines() for i in (0, 1))
    assert len(rank0) == 2 and rank0 == rank1  # same actor and critic weights after every update
    assert rank0[0] != rank0[1]  # and they did change
    assert (out / "policy" / "model.safetensors").is_file()

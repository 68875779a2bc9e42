"""Multi-process PPO with a separate critic: actor and critic are prepared as two DDP models
and their backward passes run one after the other; two CPU processes must finish, count
both processes' episodes, and end with the same weights on both ranks."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.tracking import read_metrics
from tests.conftest import launch

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
    out = tmp_path / "run"
    res = launch(
        [
            probe,
            "--policy",
            tiny_lm,
            "--reward",
            tmp_path / "rm",
            "--critic",
            "reward-model",
            "--prompts",
            prompts,
            "--output",
            out,
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--mini-batch-size",
            "4",
            "--grad-accum",
            "2",
            "--ppo-epochs",
            "2",
            "--max-new-tokens",
            "5",
            "--lr",
            "1e-3",
            "--sample-every",
            "0",
            "--no-progress",
            "--report-to",
            "none",
            "--cpu",
        ],
        timeout=300,
    )
    assert "ppo: DDP (2 processes, each with a full copy; MULTI_CPU)" in res.stderr, res.stderr[-2000:]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["rl/episodes"] for r in rows] == [8, 16]  # 4 prompts per process per update, 2 processes
    rank0, rank1 = ((tmp_path / f"run.rank{i}").read_text().splitlines() for i in (0, 1))
    assert len(rank0) == 2 and rank0 == rank1  # same actor and critic weights after every update
    assert rank0[0] != rank0[1]  # and they did change
    assert (out / "final" / "model.safetensors").is_file()

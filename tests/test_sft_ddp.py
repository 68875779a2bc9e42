"""Multi-process SFT: 2 CPU processes x batch b == 1 process x batch 2b (packed rows, token-mean loss)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhfkit.cli import main
from tests.conftest import launch, step_losses, weights

pytestmark = pytest.mark.slow


def _args(model: Path, data: Path, out: Path, batch_size: int) -> list[str]:
    return [
        "sft",
        "--policy",
        str(model),
        "--train",
        str(data),
        "--output",
        str(out),
        "--max-steps",
        "3",
        "--batch-size",
        str(batch_size),
        "--lr",
        "1e-2",
        "--log-every",
        "1",
        "--warmup-ratio",
        "0",
        "--max-grad-norm",
        "0",
        "--packing",
        "--max-length",
        "64",
        "--n-samples",
        "0",
        "--no-progress",
        "--report-to",
        "none",
        "--cpu",
    ]


def test_two_processes_match_one_process_with_double_batch(tiny_lm, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"repeat {'ab' * (i % 4 + 1)}", "response": "ab" * (i % 7 + 1)}) + "\n"
            for i in range(40)
        )
    )
    two = tmp_path / "ddp"
    res = launch(["-m", "rlhfkit.cli", *_args(tiny_lm, data, two, 2)], timeout=300)
    assert "sft: DDP (2 processes, each with a full copy; MULTI_CPU)" in res.stderr, res.stderr[-2000:]
    one = tmp_path / "single"
    assert main(_args(tiny_lm, data, one, 4)) == 0  # the single-process reference runs in this process
    assert len(step_losses(one)) == 3
    assert step_losses(two) == pytest.approx(step_losses(one), rel=1e-4)
    a, b = weights(one / "final"), weights(two / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)

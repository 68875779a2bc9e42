"""Multi-process training: 2 CPU processes x batch b == 1 process x batch 2b."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import launch, step_losses, weights

pytestmark = pytest.mark.slow


def _train_args(model: Path, data: Path, out: Path, batch_size: int) -> list[str]:
    return [
        "rm",
        "train",
        "--model",
        str(model),
        "--train",
        str(data),
        "--n-train",
        "64",
        "--output",
        str(out),
        "--max-steps",
        "4",
        "--batch-size",
        str(batch_size),
        "--lr",
        "3e-3",
        "--log-every",
        "1",
        "--warmup-ratio",
        "0",
        "--max-grad-norm",
        "0",
        "--no-progress",
        "--report-to",
        "none",
        "--cpu",
    ]


def test_two_processes_match_one_process_with_double_batch(tiny_lm, separable_tsv, tmp_path):
    two = tmp_path / "ddp"
    res = launch(["-m", "rlhfkit.cli", *_train_args(tiny_lm, separable_tsv, two, 4)], timeout=300)
    assert "rm train: DDP (2 processes, each with a full copy; MULTI_CPU)" in res.stderr, res.stderr[-2000:]
    one = tmp_path / "single"
    launch(["-m", "rlhfkit.cli", *_train_args(tiny_lm, separable_tsv, one, 8)], nprocs=1, timeout=300)
    assert len(step_losses(one)) == 4
    assert step_losses(two) == pytest.approx(step_losses(one), rel=1e-4)
    a, b = weights(one / "final"), weights(two / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)

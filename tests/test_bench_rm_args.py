"""benchmarks/rm_vs_trl.py: its optimisation options default to `rm train`'s own defaults."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from rlhfkit.config import ConfigError
from rlhfkit.rm.train import RMTrainConfig

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "rm_vs_trl.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH.parent))
    try:
        spec = importlib.util.spec_from_file_location("rm_vs_trl", BENCH)
        module = importlib.util.module_from_spec(spec)
        sys.modules["rm_vs_trl"] = module  # dataclasses look their module up while building Args
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("rm_vs_trl", None)
        sys.path.remove(str(BENCH.parent))


def test_unset_options_run_rm_train_defaults_on_both_sides(bench):
    ours = {f.name: f.default for f in fields(RMTrainConfig)}
    args = bench.Args()
    assert (args.batch_size, args.lr, args.head_lr, args.warmup_ratio, args.scheduler) == (
        ours["batch_size"],
        ours["lr"],
        ours["head_lr"] or ours["lr"],
        ours["warmup_ratio"],
        ours["scheduler"],
    )
    assert args.head_init == ours["head_init"] and bench.Args(head_init="random").head_init == "random"
    # TRL: the same lists per step (their C(K,2) pairs), body learning rate, warm-up and schedule
    assert bench.trl_pairs_per_step(args, pairs_per_list=6) == 6 * args.batch_size
    assert (args.trl_lr, args.trl_warmup_ratio, args.trl_scheduler) == (args.lr, args.warmup_ratio, args.scheduler)


def test_trl_options_apart(bench):
    args = bench.Args(batch_size=8, lr=1e-4, trl_pairs_per_step=8, trl_lr=2e-5, trl_warmup_ratio=0.0)
    assert bench.trl_pairs_per_step(args, pairs_per_list=6) == 8
    assert (args.lr, args.trl_lr, args.trl_warmup_ratio) == (1e-4, 2e-5, 0.0)
    assert args.warmup_ratio == {f.name: f.default for f in fields(RMTrainConfig)}["warmup_ratio"]
    with pytest.raises(ConfigError, match=r"option 'trl_pairs_per_step' must be >= 1, got 0"):
        bench.Args(trl_pairs_per_step=0)

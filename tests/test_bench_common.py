"""benchmarks/bench_common.py: the interval over held-out lists and seeds, the mean over runs, the per-seed folders."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_common as bc  # noqa: E402

sys.path.pop(0)


def counts(correct: list[int], pairs: int = 6) -> dict:
    return {"list_correct": correct, "list_pairs": [pairs] * len(correct)}


def random_lists(rng: random.Random, m: int, p: float) -> list[int]:
    return [sum(rng.random() < p for _ in range(6)) for _ in range(m)]


def test_equal_sides_give_a_zero_interval():
    run = counts(random_lists(random.Random(0), 200, 0.6))
    ci = bc.paired_bootstrap([run, run], [run], seed=1, n=300)
    assert ci == {"pairwise_accuracy": [0.0, 0.0], "list_exact_accuracy": [0.0, 0.0]}


def test_a_shift_on_every_list_is_the_whole_interval():
    trl = counts(random_lists(random.Random(0), 100, 0.5), pairs=7)
    ours = counts([c + 1 for c in trl["list_correct"]], pairs=7)  # one more correct pair in every list of 7
    ci = bc.paired_bootstrap([ours], [trl], seed=1, n=300)
    assert ci["pairwise_accuracy"] == pytest.approx([1 / 7, 1 / 7])


def test_one_run_a_side_matches_a_brute_force_paired_bootstrap():
    rng = random.Random(3)
    ours, trl = counts(random_lists(rng, 300, 0.65)), counts(random_lists(rng, 300, 0.6))
    diff = [o - t for o, t in zip(ours["list_correct"], trl["list_correct"])]
    reps = sorted(sum(diff[rng.randrange(300)] for _ in range(300)) / (6 * 300) for _ in range(2000))
    lo, hi = bc.paired_bootstrap([ours], [trl], seed=5, n=2000)["pairwise_accuracy"]
    assert lo == pytest.approx(reps[50], abs=0.006) and hi == pytest.approx(reps[1949], abs=0.006)


def test_seeds_that_disagree_widen_the_interval():
    rng = random.Random(4)
    trl = counts(random_lists(rng, 400, 0.6))
    base = random_lists(rng, 400, 0.62)
    agree = [counts(base), counts(base)]
    # the same mean, but the two runs 0.1 apart: a seed-level spread the lists alone do not show
    up = [min(6, c + (1 if i % 3 else 0)) for i, c in enumerate(base)]
    down = [max(0, 2 * c - u) for c, u in zip(base, up)]
    disagree = [counts(up), counts(down)]
    narrow = bc.paired_bootstrap(agree, [trl], seed=1, n=1000)["pairwise_accuracy"]
    wide = bc.paired_bootstrap(disagree, [trl], seed=1, n=1000)["pairwise_accuracy"]
    assert wide[1] - wide[0] > 1.5 * (narrow[1] - narrow[0])


def test_runs_on_other_lists_are_refused():
    with pytest.raises(ValueError, match="different held-out lists"):
        bc.paired_bootstrap([counts([1, 2])], [counts([1, 2, 3])], seed=0, n=10)


def test_mean_over_runs():
    runs = [
        {
            "lists_per_s": 4.0,
            "loop_s": 100.0,
            "call_s": 110.0,
            "peak_rss_mib": 900.0,
            "steps": 200,
            "eval": {"pairwise_accuracy": 0.60, "list_exact_accuracy": 0.10},
        },
        {
            "lists_per_s": 2.0,
            "loop_s": 200.0,
            "call_s": 210.0,
            "peak_rss_mib": 1000.0,
            "steps": 200,
            "eval": {"pairwise_accuracy": 0.70, "list_exact_accuracy": 0.20},
        },
    ]
    out = bc.mean_over_runs(runs)
    assert out["lists_per_s"] == pytest.approx(800 / 300)  # all lists over all loop time, not the mean of the rates
    assert (out["loop_s"], out["call_s"], out["peak_rss_mib"], out["steps"]) == (150.0, 160.0, 1000.0, 200)
    assert out["eval"]["pairwise_accuracy"] == pytest.approx(0.65) and out["eval"][
        "list_exact_accuracy"
    ] == pytest.approx(0.15)
    assert out["pairwise_accuracy_runs"] == [0.60, 0.70] and out["runs"] == runs
    assert runs[0]["eval"]["pairwise_accuracy"] == 0.60  # the runs are left as they were
    assert bc.mean_over_runs(runs[:1])["lists_per_s"] == 4.0


def test_seed_folder_links_the_prepared_data_and_sets_the_seed(tmp_path):
    from rlhfkit.config import load_yaml

    args = bc.ComparisonArgs(data="x.tsv", seeds=3, seed=42, work_dir=str(tmp_path))
    (tmp_path / "train.tsv").write_text("a\tb\n")
    (tmp_path / "backbone").mkdir()
    (tmp_path / "args.yaml").write_text("seed: 42\n")
    sub = bc.seed_folder(tmp_path, args, 43)
    assert sub == tmp_path / "seed43"
    assert (sub / "train.tsv").read_text() == "a\tb\n" and (sub / "backbone").is_dir()
    saved = load_yaml(sub / "args.yaml")
    assert (saved["seed"], saved["seeds"], saved["work_dir"]) == (43, 1, str(sub))
    assert (args.seed, args.seeds) == (42, 3)  # the parent's options are untouched
    assert bc.seed_folder(tmp_path, args, 43) == sub  # again: no error on the existing links

"""rlhfkit eval: the win-rate math against brute force, the length-controlled rate, the LM
judge's position swap, and the command end to end on the tiny random model."""

from __future__ import annotations

import json
import random

import pytest
import torch

from rlhfkit.cli import main
from rlhfkit.judge.judges import pairwise_outcomes
from rlhfkit.judge.winrate import (
    bootstrap_indices,
    lc_win_rate,
    lc_win_rate_ci,
    outcomes_from_scores,
    rates,
    win_rate_ci,
)


# ------------------------------------------------------------------------- math
def test_win_rate_ci_matches_a_plain_loop_bootstrap():
    rng = random.Random(0)
    P, n, R, seed = 13, 3, 2000, 7
    outcomes = torch.tensor([[rng.choice([1, 1, 0, -1]) for _ in range(n)] for _ in range(P)])
    g = torch.Generator().manual_seed(seed)  # the same seed, a plain loop
    stats = []
    for _ in range(R):
        idx = torch.randint(P, (P,), generator=g).tolist()
        pairs = [int(o) for i in idx for o in outcomes[i]]
        stats.append((pairs.count(1) + pairs.count(0) / 2) / len(pairs))
    stats.sort()

    def pct(q):  # linear interpolation between order statistics
        pos = q * (R - 1)
        lo = int(pos)
        return stats[lo] + (stats[min(lo + 1, R - 1)] - stats[lo]) * (pos - lo)

    lo, hi = win_rate_ci(outcomes, R, seed)
    assert lo == pytest.approx(pct(0.025), abs=1e-12)
    assert hi == pytest.approx(pct(0.975), abs=1e-12)
    assert bootstrap_indices(P, 5, seed).shape == (5, P)
    r = rates(outcomes)
    flat = outcomes.flatten().tolist()
    assert r["win_rate"] == pytest.approx((flat.count(1) + flat.count(0) / 2) / len(flat))
    assert r["win"] + r["tie"] + r["loss"] == pytest.approx(1.0)


def test_outcomes_from_scores_ties_on_equal_scores():
    o = outcomes_from_scores(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 2.0, 1.0]))
    assert o.tolist() == [-1, 0, 1]


def test_length_controlled_rate_is_near_half_when_the_judge_prefers_length_only():
    g = torch.Generator().manual_seed(0)
    P, n = 200, 2
    len_b = torch.randint(5, 40, (P, n), generator=g).double()
    len_a = len_b + torch.randint(-10, 30, (P, n), generator=g).double()  # A is usually longer
    diff = len_a - len_b
    outcomes = torch.sign(diff).long()  # the judge: the longer answer wins, nothing else
    raw = rates(outcomes)["win_rate"]
    lc = lc_win_rate(outcomes, diff)["lc_win_rate"]
    assert raw > 0.7  # far from 50%: A wins by being long
    assert 0.4 < lc < 0.6, (raw, lc)
    lo, hi = lc_win_rate_ci(outcomes, diff, 500, 0)
    assert lo <= lc + 0.05 and hi >= lc - 0.05 and lo < hi


def test_length_controlled_rate_keeps_a_real_preference():
    g = torch.Generator().manual_seed(1)
    diff = torch.randint(-20, 21, (300, 1), generator=g).double()  # lengths unrelated to the verdict
    outcomes = torch.where(torch.rand(300, 1, generator=g) < 0.8, 1, -1)
    lc = lc_win_rate(outcomes, diff)["lc_win_rate"]
    assert lc == pytest.approx(rates(outcomes)["win_rate"], abs=0.05)


# ------------------------------------------------------------------------- LM judge position swap
class ScriptedJudge:
    """Prefers the answer shown first (``always_first``), or the one containing 'good'."""

    def __init__(self, always_first: bool):
        self.always_first = always_first

    def margins(self, prompts, firsts, seconds):
        if self.always_first:
            return torch.ones(len(firsts), dtype=torch.float64)
        return torch.tensor([("good" in a) - ("good" in b) for a, b in zip(firsts, seconds)], dtype=torch.float64)


def test_position_biased_judge_gives_ties_counted_as_inconsistent():
    a, b = ["good x", "y", "good z"], ["w", "good v", "u"]
    outcomes, inconsistent = pairwise_outcomes(ScriptedJudge(always_first=True), ["p"] * 3, a, b)
    assert outcomes.tolist() == [0, 0, 0]
    assert inconsistent.tolist() == [True, True, True]


def test_consistent_judge_gives_wins_and_losses():
    a, b = ["good x", "y", "good z", "q"], ["w", "good v", "u", "r"]
    outcomes, inconsistent = pairwise_outcomes(ScriptedJudge(always_first=False), ["p"] * 4, a, b)
    assert outcomes.tolist() == [1, -1, 1, 0]  # the last: no preference either way, a plain tie
    assert not inconsistent.any()


# ------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_lm):
    root = tmp_path_factory.mktemp("judge")
    prompts = root / "prompts.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(5)))
    rule = root / "rule.py"
    rule.write_text("def length(prompts, responses):\n    return [float(len(r)) for r in responses]\n")
    from rlhfkit.models.reward import RewardModel

    RewardModel.from_pretrained(tiny_lm).save_pretrained(root / "rm")
    return {"lm": str(tiny_lm), "prompts": str(prompts), "rule": f"{rule}:length", "rm": str(root / "rm"), "root": root}


def _eval(files, out, *extra, judge=None, baseline=True):
    argv = ["eval", "--policy", files["lm"], "--prompts", files["prompts"], "--judge", judge or files["rule"]]
    argv += ["--max-new-tokens", "4", "--samples-per-prompt", "2", "--bootstrap", "200", "--output", str(out), "--cpu"]
    if baseline:
        argv += ["--baseline", files["lm"]]
    return main([*argv, *extra])


def test_eval_end_to_end_with_a_function_judge_is_deterministic(files, tmp_path, capsys):
    assert _eval(files, tmp_path / "a", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    for key in ("win_rate", "win_rate_ci", "lc_win_rate", "lc_win_rate_ci", "win", "tie", "loss", "kl"):
        assert key in summary, key
    assert summary["n_pairs"] == 10 and summary["judge_kind"] == "function"
    assert summary["win_rate_ci"][0] <= summary["win_rate"] <= summary["win_rate_ci"][1]
    assert summary["score_policy"] is not None and summary["length_policy"]["mean"] > 0
    for name in ("summary.json", "samples.jsonl", "report.md", "report.html"):
        assert (tmp_path / "a" / name).is_file(), name
    rows = [json.loads(line) for line in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and {r["verdict"] for r in rows} <= {"win", "tie", "loss"}
    for r in rows:  # the verdict is the rule's: the longer text (in characters) wins
        a, b = len(r["policy"]), len(r["baseline"])
        want = {1: "win", 0: "tie", -1: "loss"}[(a > b) - (a < b)]
        assert r["verdict"] == want
    assert "data:image/png;base64," in (tmp_path / "a" / "report.html").read_text()
    assert _eval(files, tmp_path / "b", "--json") == 0
    again = json.loads(capsys.readouterr().out)
    drop = ("output",)
    assert {k: v for k, v in again.items() if k not in drop} == {k: v for k, v in summary.items() if k not in drop}


def test_eval_with_a_reward_model_judge_and_a_recorded_baseline(files, tmp_path, capsys):
    import shutil

    policy = tmp_path / "policy"
    shutil.copytree(files["lm"], policy)
    (policy / "rlhfkit_ppo.json").write_text(json.dumps({"reference": files["lm"]}))
    argv = ["eval", "--policy", str(policy), "--prompts", files["prompts"], "--judge", files["rm"]]
    argv += ["--max-new-tokens", "3", "--bootstrap", "100", "--output", str(tmp_path / "o"), "--json", "--cpu"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["baseline"] == files["lm"] and summary["baseline_from"] == "recorded reference"
    assert summary["judge_kind"] == "reward-model" and summary["score_baseline"] is not None
    assert summary["kl"] is not None


def test_eval_without_a_baseline_exits_2_naming_the_option(files, tmp_path, capsys):
    assert _eval(files, tmp_path / "x", baseline=False) == 2
    assert "--baseline is needed" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_eval_with_a_missing_judge_exits_2(files, tmp_path, capsys):
    assert _eval(files, tmp_path / "x", judge=str(tmp_path / "no-such-judge")) == 2
    assert "--judge" in capsys.readouterr().err


def test_eval_with_an_lm_judge_counts_position_inconsistent_pairs(files, tmp_path, capsys):
    assert _eval(files, tmp_path / "lm", "--json", judge=f"lm:{files['lm']}") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["judge_kind"] == "lm-pairwise" and summary["score_policy"] is None
    rows = [json.loads(line) for line in (tmp_path / "lm" / "samples.jsonl").read_text().splitlines()]
    assert summary["position_inconsistent"] == sum(r["position_inconsistent"] for r in rows)
    assert all(r["verdict"] == "tie" for r in rows if r["position_inconsistent"])

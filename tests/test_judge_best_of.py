"""rlhfkit eval --best-of N --selector SPEC: the choice and the analytic KL against brute force,
and the command end to end on the tiny random model (best-of-N beats the plain policy by the
selector's own rule; every chosen answer is the selector's argmax of the N drawn)."""

from __future__ import annotations

import json
import logging
import math
import shutil

import pytest
import torch

from rlhfkit.cli import main
from rlhfkit.judge.best_of import best_of_n_kl, pick_best


# ------------------------------------------------------------------------- math
def test_pick_best_matches_a_plain_loop_and_keeps_the_first_of_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (200, 5), generator=g).double()  # (M, N): many ties
    want = []
    for row in scores.tolist():
        best = 0
        for j in range(1, len(row)):
            if row[j] > row[best]:
                best = j
        want.append(best)
    assert pick_best(scores).tolist() == want
    assert pick_best(torch.tensor([[1.0, 3.0, 3.0, 2.0]])).tolist() == [1]


def _exact_best_of_n_kl(p: list[float], n: int) -> float:
    """KL(best-of-n || p) for outcomes listed in increasing score, all scores distinct: the
    best of n is outcome i when all n draws are <= i and not all are < i."""
    kl, below = 0.0, 0.0
    for pi in p:
        q = (below + pi) ** n - below**n
        kl += q * math.log(q / pi) if q > 0 else 0.0
        below += pi
    return kl


@pytest.mark.parametrize("n", [1, 2, 4, 16])
def test_best_of_n_kl_is_the_limit_of_the_exact_kl_and_bounds_it(n):
    fine = _exact_best_of_n_kl([1 / 20000] * 20000, n)  # nearly continuous: the formula is exact in the limit
    assert best_of_n_kl(n) == pytest.approx(fine, abs=1e-3)
    g = torch.Generator().manual_seed(n)
    coarse = torch.rand(7, generator=g).double()
    coarse = (coarse / coarse.sum()).tolist()  # few outcomes: the formula is an upper bound
    assert _exact_best_of_n_kl(coarse, n) <= best_of_n_kl(n) + 1e-12
    assert best_of_n_kl(1) == 0.0 and best_of_n_kl(8) == pytest.approx(math.log(8) - 7 / 8)


# ------------------------------------------------------------------------- end to end
RULE = (
    "def letters(prompts, responses):\n"
    "    # the tiny model writes random bytes: lowercase letters are the 'a'-like answers it sometimes gives\n"
    "    return [float(sum('a' <= c <= 'z' for c in r)) for r in responses]\n"
)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_lm):
    root = tmp_path_factory.mktemp("best_of")
    prompts = root / "prompts.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(24)))
    (root / "rule.py").write_text(RULE)
    return {"lm": str(tiny_lm), "prompts": str(prompts), "rule": f"{root / 'rule.py'}:letters", "root": root}


def _eval(files, out, *extra, baseline=None):
    argv = ["eval", "--policy", files["lm"], "--baseline", baseline or files["lm"], "--prompts", files["prompts"]]
    argv += ["--judge", files["rule"], "--max-new-tokens", "8", "--samples-per-prompt", "2", "--bootstrap", "500"]
    return main([*argv, "--output", str(out), "--cpu", "--json", *extra])


def _rows(out):
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def _letters(text):
    return float(sum("a" <= c <= "z" for c in text))


def test_best_of_4_beats_the_plain_policy_by_its_rule_and_picks_the_argmax(files, tmp_path, capsys, caplog):
    bon = ["--best-of", "4", "--selector", files["rule"]]
    with caplog.at_level(logging.WARNING, logger="rlhfkit.judge.commands"):
        assert _eval(files, tmp_path / "bon", *bon) == 0
    assert "--selector and --judge are the same" in caplog.text  # fine for this test, not for a real verdict
    summary = json.loads(capsys.readouterr().out)
    assert summary["policy"] == f"best-of-4({files['lm']}) by {files['rule']}"
    assert summary["policy_model"] == files["lm"] and summary["best_of"] == 4
    assert summary["selector_kind"] == "function" and summary["n_pairs"] == 48
    assert summary["win_rate"] > 0.5 and summary["win_rate_ci"][0] > 0.5, summary["win_rate_ci"]
    assert summary["kl"] == pytest.approx(math.log(4) - 3 / 4) and summary["kl_kind"] == "analytic best-of-n"
    assert summary["kl_best_of_n"] == summary["kl"]
    assert summary["selector_score_policy"] > summary["selector_score_candidates"]

    rows = _rows(tmp_path / "bon")
    assert len(rows) == 48
    for r in rows:  # brute force: the answer judged is the rule's first argmax among the 4 drawn
        assert len(r["candidates"]) == 4
        scores = [_letters(c) for c in r["candidates"]]
        assert r["candidates_scores"] == scores
        assert r["chosen"] == scores.index(max(scores))
        assert r["policy"] == r["candidates"][r["chosen"]]
        assert r["score_policy"] == max(scores)
    report = (tmp_path / "bon" / "report.md").read_text()
    assert f"best-of-4({files['lm']})" in report and "KL of A to B, analytic best-of-n" in report

    assert _eval(files, tmp_path / "plain") == 0  # the plain policy against the same baseline answers
    plain = json.loads(capsys.readouterr().out)
    assert plain["best_of"] is None and plain["kl_kind"] == "sampled k1" and plain["policy"] == files["lm"]
    plain_rows = _rows(tmp_path / "plain")
    assert [r["baseline"] for r in plain_rows] == [r["baseline"] for r in rows]
    assert "candidates" not in plain_rows[0]
    assert summary["score_policy"] > plain["score_policy"]
    assert summary["win_rate"] > plain["win_rate"]

    assert _eval(files, tmp_path / "again", *bon) == 0  # the same seed: the same numbers
    again = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in again.items() if k != "output"} == {k: v for k, v in summary.items() if k != "output"}
    assert [r["candidates"] for r in _rows(tmp_path / "again")] == [r["candidates"] for r in rows]


def test_best_of_against_another_baseline_adds_the_sampled_kl_of_a_to_b(files, tmp_path, capsys):
    copy = tmp_path / "copy"  # another folder with the same weights: log pA - log pB is 0 on every token
    shutil.copytree(files["lm"], copy)
    assert _eval(files, tmp_path / "o", "--best-of", "2", "--selector", files["rule"], baseline=str(copy)) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kl_kind"] == "analytic best-of-n + sampled k1 of A to B"
    assert summary["kl_k1"] == pytest.approx(0.0, abs=1e-5)
    assert summary["kl"] == pytest.approx(math.log(2) - 1 / 2, abs=1e-5)


def test_a_reward_model_selector_and_a_missing_one(files, tmp_path, capsys):
    from rlhfkit.models.reward import RewardModel

    RewardModel.from_pretrained(files["lm"]).save_pretrained(tmp_path / "rm")
    assert _eval(files, tmp_path / "o", "--best-of", "3", "--selector", str(tmp_path / "rm"), "--n-prompts", "4") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["selector_kind"] == "reward-model" and summary["judge_kind"] == "function"
    for r in _rows(tmp_path / "o"):
        assert r["chosen"] == r["candidates_scores"].index(max(r["candidates_scores"]))
    missing = str(tmp_path / "no-such-rm")
    assert _eval(files, tmp_path / "x", "--best-of", "3", "--selector", missing) == 2
    assert f"--selector {missing!r}: no such folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--best-of", "1", "--selector", "x:y"],
            "option --best-of must be >= 2, got 1: best-of-1 is the policy itself",
        ),
        (["--best-of", "4"], "--best-of 4 needs --selector"),
        (["--best-of", "4", "--selector", "lm:somewhere"], "--selector lm:somewhere: an LM judge compares two answers"),
    ],
)
def test_best_of_refusals_exit_2_and_say_what_to_do(files, tmp_path, capsys, extra, message):
    assert _eval(files, tmp_path / "x", *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_best_of_with_checkpoints_exits_2(files, tmp_path, capsys):
    argv = ["eval", "--checkpoints", str(tmp_path), "--prompts", files["prompts"], "--judge", files["rule"]]
    argv += ["--best-of", "4", "--selector", files["rule"], "--output", str(tmp_path / "x")]
    assert main(argv) == 2
    assert "--best-of 4 with --checkpoints: the curve scores each checkpoint's own samples" in capsys.readouterr().err


def test_selector_without_best_of_warns_that_it_is_ignored(files, tmp_path, caplog):
    from rlhfkit.judge.commands import EvalConfig

    with caplog.at_level(logging.WARNING, logger="rlhfkit.judge.commands"):
        EvalConfig(
            policy=files["lm"],
            prompts=files["prompts"],
            judge=files["rule"],
            selector=files["rule"],
            output=str(tmp_path),
        )
    assert "--selector" in caplog.text and "ignored without --best-of" in caplog.text

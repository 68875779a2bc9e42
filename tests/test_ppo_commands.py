"""generate, bon and ppo-eval: best-of-n math against brute force, and the commands end to end."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch

from rlhfkit.cli import main
from rlhfkit.rl.commands import best_of_n_kl, expected_best_of_n


def test_expected_best_of_n_equals_the_mean_over_all_subsets():
    scores = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    for n in range(1, 8):
        brute = torch.tensor(
            [sum(max(s) for s in itertools.combinations(row.tolist(), n)) / math.comb(7, n) for row in scores],
            dtype=torch.float64,
        )
        torch.testing.assert_close(expected_best_of_n(scores, n), brute)
    torch.testing.assert_close(expected_best_of_n(scores, 1), scores.double().mean(1))
    torch.testing.assert_close(expected_best_of_n(scores, 7), scores.double().amax(1))
    with pytest.raises(ValueError, match="need 1 <= n <= K, got n=8, K=7"):
        expected_best_of_n(scores, 8)


def test_best_of_n_kl_is_log_n_minus_n_minus_1_over_n():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(16) == pytest.approx(2.7726 - 0.9375, abs=1e-4)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmd")
    rng = random.Random(1)
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"{rng.choice(['a', 'the', 'my'])} review {i}:"}) + "\n" for i in range(6))
    )
    rewards = root / "rewards.py"
    rewards.write_text(
        "def n_lower(prompts, responses):\n    return [float(sum(c.islower() for c in r)) for r in responses]\n"
    )
    return prompts, f"{rewards}:n_lower"


def test_generate_writes_n_rows_per_prompt_to_stdout_and_file(tiny_lm, files, tmp_path, capsys):
    prompts, _ = files
    common = [
        "--policy",
        str(tiny_lm),
        "--prompts",
        str(prompts),
        "--samples-per-prompt",
        "2",
        "--max-new-tokens",
        "5",
        "--seed",
        "3",
    ]
    assert main(["generate", *common]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 12 and rows[0]["prompt"] == rows[1]["prompt"] != rows[2]["prompt"]
    out = tmp_path / "gen.jsonl"
    assert main(["generate", *common, "--output", str(out)]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows  # seeded: same samples


def test_bon_keeps_the_best_and_writes_ranked_lists(tiny_lm, files, tmp_path):
    from rlhfkit.data.readers import read_preferences

    prompts, reward = files
    out, ranked = tmp_path / "bon.jsonl", tmp_path / "ranked.jsonl"
    assert (
        main(
            [
                "bon",
                "--policy",
                str(tiny_lm),
                "--prompts",
                str(prompts),
                "--reward",
                reward,
                "--samples-per-prompt",
                "4",
                "--max-new-tokens",
                "8",
                "--output",
                str(out),
                "--ranked-output",
                str(ranked),
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6
    for r in rows:
        assert len(r["scores"]) == 4 and r["score"] == max(r["scores"])
        assert r["score"] == float(sum(c.islower() for c in r["response"]))
    examples = read_preferences(ranked, format="ranked")
    assert len(examples) == 6
    assert examples[0].responses[0] == rows[0]["response"]  # best first
    assert (
        main(
            [
                "bon",
                "--policy",
                str(tiny_lm),
                "--prompts",
                str(prompts),
                "--reward",
                reward,
                "--samples-per-prompt",
                "1",
                "--ranked-output",
                str(ranked),
            ]
        )
        == 2
    )


def test_ppo_eval_reports_policy_reference_and_best_of_n(tiny_lm, files, tmp_path, capsys):
    prompts, reward = files
    out = tmp_path / "eval"
    argv = [
        "--policy",
        str(tiny_lm),
        "--reference",
        str(tiny_lm),
        "--prompts",
        str(prompts),
        "--reward",
        reward,
        "--bon",
        "1",
        "2",
        "4",
        "--max-new-tokens",
        "6",
        "--output",
        str(out),
    ]
    assert main(["ppo-eval", *argv]) == 0
    table = capsys.readouterr().out
    for name in ("policy", "reference", "best-of-1", "best-of-2", "best-of-4"):
        assert name in table
    report = json.loads((out / "ppo_eval.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["policy"]["kl"] == pytest.approx(0.0, abs=1e-5)  # the policy is the reference here
    assert rows["best-of-1"]["score"] == pytest.approx(rows["reference"]["score"])
    assert rows["best-of-1"]["score"] <= rows["best-of-2"]["score"] <= rows["best-of-4"]["score"]
    assert rows["best-of-4"]["kl"] == pytest.approx(math.log(4) - 0.75)
    assert (out / "reward_vs_kl.png").is_file()
    assert main(["ppo-eval", *argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_prompts"] == 6


def test_ppo_eval_needs_a_reference(tiny_lm, files, tmp_path, capsys):
    prompts, reward = files
    assert (
        main(
            [
                "ppo-eval",
                "--policy",
                str(tiny_lm),
                "--prompts",
                str(prompts),
                "--reward",
                reward,
                "--output",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "--reference is needed" in capsys.readouterr().err


def test_expected_best_of_n_of_another_value_is_the_mean_over_subsets_of_the_pick():
    g = torch.Generator().manual_seed(1)
    scores, gold = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    for n in range(1, 7):
        brute = torch.tensor(
            [
                sum(
                    gold[p, max(s, key=lambda j: scores[p, j].item())].item()
                    for s in itertools.combinations(range(6), n)
                )
                / math.comb(6, n)
                for p in range(4)
            ],
            dtype=torch.float64,
        )
        torch.testing.assert_close(expected_best_of_n(scores, n, gold), brute)


def test_ppo_eval_compares_several_policies_with_a_gold_score(tiny_lm, files, tmp_path, capsys):
    prompts, reward = files
    gold = reward.replace(":n_lower", ":n_upper")
    Path(reward.split(":")[0]).write_text(
        Path(reward.split(":")[0]).read_text()
        + "def n_upper(prompts, responses):\n    return [float(sum(c.isupper() for c in r)) for r in responses]\n"
    )
    out = tmp_path / "eval"
    assert (
        main(
            [
                "ppo-eval",
                "--policy",
                f"a={tiny_lm}",
                f"b={tiny_lm}",
                "--reference",
                str(tiny_lm),
                "--prompts",
                str(prompts),
                "--reward",
                reward,
                "--gold",
                gold,
                "--bon",
                "1",
                "2",
                "--max-new-tokens",
                "6",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads((out / "ppo_eval.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert set(rows) == {"a", "b", "reference", "best-of-1", "best-of-2"}
    assert rows["a"] == {**rows["b"], "name": "a"}  # the same weights and seed: the same samples and numbers
    assert all("gold" in r for r in report["rows"])
    assert rows["best-of-1"]["gold"] == pytest.approx(rows["reference"]["gold"])
    assert "gold" in capsys.readouterr().out and (out / "reward_vs_kl.png").is_file()

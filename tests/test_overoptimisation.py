"""``rlhfkit eval --checkpoints``: the over-optimisation curve. ``curve_summary`` on constructed
curves (over-optimised, monotone, noisy), the intervals against a plain loop, and the command end
to end on a tiny ``rl --save-policy-every 1`` run: a row per checkpoint, KL 0 at the reference,
the proxy and gold scores wired the right way round, deterministic for a seed; bad inputs exit 2
with pinned messages and write nothing."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from rlhfkit.cli import main
from rlhfkit.config import from_dict
from rlhfkit.judge.overoptimisation import curve_markdown, curve_summary, gain_ci, mean_ci, plot_curve
from rlhfkit.judge.winrate import bootstrap_indices
from tests.conftest import write_rl_files


# ------------------------------------------------------------------------- the summary, on constructed rows
def rows_from(gold: list[float], proxy: list[float], half_width: float = 0.1) -> list[dict]:
    """A curve: the reference first, then update 1, 2, ...; intervals of +-``half_width`` around each mean."""
    out = []
    for i, (g, p) in enumerate(zip(gold, proxy)):
        name = "reference" if i == 0 else f"update-{i}"
        out.append(
            {
                "name": name,
                "update": i,
                "path": f"run/snapshots/{name}",
                "kl": float(i),
                "sqrt_kl": i**0.5,
                "gold": g,
                "gold_ci": [g - half_width, g + half_width],
                "proxy": p,
                "proxy_ci": [p - half_width, p + half_width],
            }
        )
    return out


def test_gold_that_peaks_then_falls_while_the_proxy_rises_is_flagged(tmp_path):
    rows = rows_from(gold=[0.0, 0.5, 1.0, 0.6, 0.3], proxy=[0.0, 1.0, 2.0, 3.0, 4.0])
    s = curve_summary(rows)
    assert s["best"]["name"] == "update-2" and s["best"]["path"] == "run/snapshots/update-2" and s["best_index"] == 2
    assert s["proxy_rose_after_gold_fell"] and s["gold_fell_at"] == "update-3"
    assert s["message"].startswith("Over-optimisation: the gold judge peaked at update-2")
    assert "prefer update-2 to the last update" in s["message"]
    png = plot_curve(rows, tmp_path / "curve.png", s)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_monotone_gold_and_proxy_are_not_flagged():
    s = curve_summary(rows_from(gold=[0.0, 0.4, 0.8, 1.2], proxy=[0.0, 1.0, 2.0, 3.0]))
    assert s["best"]["name"] == "update-3" and not s["proxy_rose_after_gold_fell"] and s["gold_fell_at"] is None
    assert "highest at the last checkpoint, update-3" in s["message"]


def test_a_gold_dip_within_the_interval_is_not_flagged():
    # the best's interval is [0.9, 1.1]; the later points dip below its mean but not below 0.9 - 0.1 ... 0.9 + 0.1
    s = curve_summary(rows_from(gold=[0.0, 1.0, 0.95, 0.85], proxy=[0.0, 1.0, 2.0, 3.0]))
    assert s["best"]["name"] == "update-1" and not s["proxy_rose_after_gold_fell"]
    assert "within the noise" in s["message"]


def test_a_gold_drop_with_a_falling_proxy_is_not_flagged_and_a_tie_keeps_the_nearer_checkpoint():
    s = curve_summary(rows_from(gold=[0.0, 1.0, 1.0, 0.2], proxy=[0.0, 2.0, 2.5, 1.0]))
    assert s["best"]["name"] == "update-1"  # equal gold: the one nearer the reference
    assert not s["proxy_rose_after_gold_fell"] and "but the proxy fell with it" in s["message"]
    s = curve_summary(rows_from(gold=[1.0, 0.5, 0.2], proxy=[0.0, 1.0, 2.0]))
    assert s["best"]["name"] == "reference" and s["proxy_rose_after_gold_fell"]


def test_markdown_bolds_the_best_checkpoint():
    rows = rows_from(gold=[0.0, 0.5, 1.0, 0.6], proxy=[0.0, 1.0, 2.0, 3.0])
    result = {
        "run": "run",
        "reference": "sft",
        "judge": "gold:fn",
        "judge_kind": "function",
        "proxy": "rm",
        "proxy_kind": "reward-model",
        "n_prompts": 8,
        "samples_per_prompt": 2,
        "seed": 42,
        "rows": rows,
        **curve_summary(rows),
    }
    md = curve_markdown(result)
    assert "| **update-2** | 2 |" in md and "![gold and proxy against sqrt(KL)](curve.png)" in md
    assert result["message"] in md


def test_intervals_match_a_plain_loop_bootstrap():
    rng = random.Random(0)
    P, n, R, seed = 9, 3, 300, 5
    scores = torch.tensor([[rng.gauss(0, 1) for _ in range(n)] for _ in range(P)], dtype=torch.float64)
    ref = torch.tensor([[rng.gauss(0, 1) for _ in range(n)] for _ in range(P)], dtype=torch.float64)
    means, gains = [], []
    for idx in bootstrap_indices(P, R, seed).tolist():
        means.append(sum(scores[i].mean().item() for i in idx) / P)
        gains.append(sum(scores[i].mean().item() - ref[i].mean().item() for i in idx) / P)

    def pct(stats, q):  # linear interpolation between order statistics
        stats = sorted(stats)
        pos = q * (R - 1)
        lo = int(pos)
        return stats[lo] + (stats[min(lo + 1, R - 1)] - stats[lo]) * (pos - lo)

    assert mean_ci(scores, R, seed) == pytest.approx([pct(means, 0.025), pct(means, 0.975)], abs=1e-12)
    assert gain_ci(scores, ref, R, seed) == pytest.approx([pct(gains, 0.025), pct(gains, 0.975)], abs=1e-12)


def test_full_vocabulary_kl_matches_a_plain_loop_and_is_zero_against_itself(tiny_lm, run):
    """The curve's KL: sum over response tokens of the exact KL of the next-token distributions,
    checked against a loop over positions on the full forward pass (where a prompt's last token
    predicts response token 0, padding, the response mask)."""
    from rlhfkit.data.prompts import Prompt
    from rlhfkit.judge.commands import _sampled_kl_full, _samples
    from rlhfkit.models.policy import load_policy
    from rlhfkit.sampling import SamplingSettings

    a, tok = load_policy(str(run["out"] / "final"))
    b, _ = load_policy(str(tiny_lm))
    prompts = [Prompt("the cat"), Prompt("a much longer prompt than the first")]  # left padding in the batch
    torch.manual_seed(0)
    _, _, batches = _samples(a, tok, prompts, 2, SamplingSettings(4, 0.7, 0, 1.0, 32), False, 3)
    kl = _sampled_kl_full(a, b, batches, 0.7)
    assert _sampled_kl_full(a, a, batches, 0.7).abs().max() < 1e-5
    want = []
    for s in batches:
        ids = torch.cat([s.query_ids, s.response_ids], 1)
        mask = torch.cat([s.query_mask, s.response_mask], 1)
        for i in range(ids.shape[0]):
            real = mask[i].bool()  # drop the left padding: a plain forward of the real tokens alone
            la = a(ids[i][real][None]).logits[0] / 0.7
            lb = b(ids[i][real][None]).logits[0] / 0.7
            first = int(s.query_mask[i].sum())  # the prompt's real tokens; its last predicts response token 0
            total = 0.0
            for t in range(s.response_ids.shape[1]):
                if s.response_mask[i, t]:
                    pa, pb = la[first - 1 + t].log_softmax(-1), lb[first - 1 + t].log_softmax(-1)
                    total += (pa.exp() * (pa - pb)).sum().item()
            want.append(total)
    assert kl.tolist() == pytest.approx(want, abs=1e-4)
    assert (kl > 0).all()


# ------------------------------------------------------------------------- end to end on a tiny run
@pytest.fixture(scope="module")
def run(tiny_lm, tmp_path_factory) -> dict:
    """A tiny GRPO run with a snapshot after every update (update-1, update-2, final at 3)."""
    from rlhfkit.rl.trainer import RLConfig, train_rl

    root = tmp_path_factory.mktemp("overopt")
    length = "def length(prompts, responses):\n    return [float(len(r)) for r in responses]\n"
    prompts, rules = write_rl_files(root, [f"the cat {i} sat on a mat" for i in range(8)], extra_rewards=length)
    out = root / "rl"
    cfg = dict(
        policy=str(tiny_lm),
        reward=f"{rules}:share_lower",
        prompts=str(prompts),
        output=str(out),
        algo="grpo",
        max_steps=3,
        batch_size=2,
        mini_batch_size=8,
        ppo_epochs=1,
        max_new_tokens=5,
        lr=5e-2,
        save_policy_every=1,
        save_every=1000,
        sample_every=0,
        progress=False,
        report_to="none",
    )
    train_rl(from_dict(RLConfig, cfg))
    return {"out": out, "prompts": str(prompts), "rules": rules, "lm": str(tiny_lm), "root": root}


def _curve(run: dict, out: Path, *extra: str) -> int:
    argv = ["eval", "--checkpoints", str(run["out"]), "--prompts", run["prompts"], "--judge", f"{run['rules']}:length"]
    argv += ["--samples-per-prompt", "2", "--max-new-tokens", "5", "--bootstrap", "200", "--cpu", "--output", str(out)]
    return main([*argv, *extra])


def test_checkpoint_curve_end_to_end_is_deterministic_and_wired_right(run, tmp_path, capsys):
    assert _curve(run, tmp_path / "a", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    rows = result["rows"]
    assert [r["name"] for r in rows] == ["reference", "update-1", "update-2", "final"]
    assert [r["update"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["path"] == run["lm"] and rows[-1]["path"] == str(run["out"] / "final")
    assert rows[0]["kl"] == 0.0 and rows[0]["sqrt_kl"] == 0.0
    assert rows[0]["gold_gain"] == 0.0 and rows[0]["proxy_gain"] == 0.0
    assert result["proxy"] == f"{run['rules']}:share_lower" and result["proxy_from"] == "the run's reward"
    assert result["judge_kind"] == result["proxy_kind"] == "function" and result["reference"] == run["lm"]
    for r in rows:
        assert r["n"] == 16 and r["kl"] >= 0 and r["sqrt_kl"] == pytest.approx(r["kl"] ** 0.5)
        for key in ("proxy", "gold"):
            lo, hi = r[f"{key}_ci"]
            assert lo <= r[key] <= hi
    info = json.loads((run["out"] / "snapshots" / "update-2" / "rlhfkit_ppo.json").read_text())
    assert rows[2]["train_kl"] == info["rl/kl"]
    assert all(r["kl"] > 0.0 for r in rows[1:])  # the policy moved
    assert result["best"]["name"] == rows[result["best_index"]]["name"]
    assert result["best"]["path"] == rows[result["best_index"]]["path"]
    assert isinstance(result["proxy_rose_after_gold_fell"], bool) and result["message"]
    for name in ("curve.json", "curve.png", "curve.md", "curve_samples.jsonl"):
        assert (tmp_path / "a" / name).is_file(), name
    assert json.loads((tmp_path / "a" / "curve.json").read_text()) == result
    samples = [json.loads(line) for line in (tmp_path / "a" / "curve_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 * 16
    for s in samples:  # the proxy is the run's rule, the gold the --judge rule
        r = s["response"]
        assert s["gold"] == float(len(r))
        assert s["proxy"] == pytest.approx(sum(c.islower() and c.isascii() for c in r) / max(len(r), 1))
    ref = [s["response"] for s in samples if s["checkpoint"] == "reference"]
    assert len(set(ref)) > 1

    assert _curve(run, tmp_path / "b", "--json") == 0  # the same seed: the same numbers
    again = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in again.items() if k != "output"} == {k: v for k, v in result.items() if k != "output"}


def test_an_explicit_proxy_and_the_readable_summary(run, tmp_path, capsys):
    assert _curve(run, tmp_path / "p", "--proxy", f"{run['rules']}:length", "--n-prompts", "2") == 0
    printed = capsys.readouterr().out
    assert "<- best by gold" in printed and "curve.png" in printed
    result = json.loads((tmp_path / "p" / "curve.json").read_text())
    assert result["proxy_from"] == "--proxy" and result["n_prompts"] == 2
    assert all(r["proxy"] == r["gold"] for r in result["rows"])  # the same rule twice


def test_lora_snapshots_are_scored_on_the_starting_policy(run, tmp_path):
    from rlhfkit.rl.trainer import RLConfig, train_rl

    out = tmp_path / "lora"
    cfg = dict(policy=run["lm"], reward=f"{run['rules']}:share_lower", prompts=run["prompts"], output=str(out))
    cfg |= dict(algo="grpo", max_steps=2, batch_size=2, mini_batch_size=8, ppo_epochs=1, max_new_tokens=5, lr=5e-2)
    cfg |= dict(save_policy_every=1, save_every=1000, sample_every=0, progress=False, report_to="none")
    train_rl(from_dict(RLConfig, {**cfg, "lora": True, "lora_r": 2}))
    assert (out / "snapshots" / "update-1" / "adapter_config.json").is_file()
    argv = ["eval", "--checkpoints", str(out), "--prompts", run["prompts"], "--judge", f"{run['rules']}:length"]
    argv += ["--max-new-tokens", "5", "--bootstrap", "100", "--cpu", "--output", str(tmp_path / "c")]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "c" / "curve.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["reference", "update-1", "final"]
    assert rows[0]["kl"] == 0.0 and rows[1]["kl"] > 0.0


# ------------------------------------------------------------------------- bad input: exit 2, nothing written
def test_a_run_without_snapshots_says_to_use_save_policy_every(run, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    argv = ["eval", "--checkpoints", str(bare), "--prompts", run["prompts"], "--judge", f"{run['rules']}:length"]
    assert main([*argv, "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no snapshots/ folder in it" in err and "--save-policy-every N" in err
    assert not (tmp_path / "o").exists()


def test_an_lm_judge_is_refused_with_checkpoints(run, tmp_path, capsys):
    argv = ["eval", "--checkpoints", str(run["out"]), "--prompts", run["prompts"], "--judge", f"lm:{run['lm']}"]
    assert main([*argv, "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"--judge lm:{run['lm']} with --checkpoints: an LM judge compares two answers" in err
    assert "gives no score per answer" in err and not (tmp_path / "o").exists()


def test_policy_and_checkpoints_are_mutually_exclusive(run, tmp_path, capsys):
    argv = ["eval", "--policy", run["lm"], "--checkpoints", str(run["out"]), "--prompts", run["prompts"]]
    assert main([*argv, "--judge", f"{run['rules']}:length", "--output", str(tmp_path / "o")]) == 2
    assert "are mutually exclusive" in capsys.readouterr().err
    assert main(["eval", "--prompts", run["prompts"], "--judge", f"{run['rules']}:length"]) == 2
    assert "option --policy is required" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_reward_eval_cannot_score_with_needs_proxy(run, tmp_path, capsys):
    fake = tmp_path / "human-run"
    shutil.copytree(run["out"] / "snapshots" / "update-1", fake / "snapshots" / "update-1")
    info = fake / "snapshots" / "update-1" / "rlhfkit_ppo.json"
    info.write_text(json.dumps({**json.loads(info.read_text()), "reward": "human:console"}))
    argv = ["eval", "--checkpoints", str(fake), "--prompts", run["prompts"], "--judge", f"{run['rules']}:length"]
    assert main([*argv, "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--proxy is needed" in err and "--reward human:console" in err
    assert not (tmp_path / "o").exists()

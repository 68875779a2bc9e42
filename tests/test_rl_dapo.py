"""DAPO's knobs (Yu et al. 2025, arXiv:2503.14476) on `rlhfkit rl`, each against a hand-computed
case: clip-higher, the soft overlong penalty, masking truncated responses from the loss,
`--kl-penalty none`, and dynamic sampling."""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path

import pytest
import torch

from rlhfkit.config import ConfigError, from_dict
from rlhfkit.rl.losses import policy_loss
from rlhfkit.rl.rewards import RunningMoments, overlong_penalty
from rlhfkit.rl.rollout import Rollout
from rlhfkit.rl.trainer import RLConfig, UpdateBatch, normalise_scores, policy_objective, train_rl
from rlhfkit.tracking import read_metrics

BASE = {"reward": "m:f", "prompts": "p.txt"}


def config(tmp_path, **kw) -> RLConfig:
    return from_dict(RLConfig, {**BASE, "output": str(tmp_path / "o"), **kw})


# ------------------------------------------------------------------------- clip-higher
def clipped_surrogate_loop(lp, old, adv, mask, low, high):
    """Per-token PPO surrogate with the ratio clipped to [1 - low, 1 + high], a token mean,
    and the share of tokens where the clipped term is the larger (active) one."""
    total, clipped, n = 0.0, 0, 0
    for i in range(len(lp)):
        for t in range(len(lp[i])):
            if not mask[i][t]:
                continue
            ratio = math.exp(lp[i][t] - old[i][t])
            a = adv[i][t]
            un, cl = -a * ratio, -a * min(max(ratio, 1 - low), 1 + high)
            total += max(un, cl)
            clipped += cl > un
            n += 1
    return total / n, clipped / n


def test_clip_higher_clips_the_ratio_to_its_own_upper_range():
    # hand-computed: ratios 1.25 and 0.75 with eps_low 0.2, eps_high 0.28. A positive advantage
    # at ratio 1.25 is inside [0.8, 1.28] (not clipped), where symmetric 0.2 clips it to 1.2.
    log_r = torch.tensor([[math.log(1.25), math.log(0.75)]])
    adv = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    zero = torch.zeros(1, 2)
    loss, stats = policy_loss(log_r, zero, adv, mask, 0.2, clip_eps_high=0.28)
    # token 1: max(-1.25, -1.25) = -1.25; token 2: A = -1: max(0.75, 0.8) = 0.8 (clipped below)
    assert loss.item() == pytest.approx((-1.25 + 0.8) / 2)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    symmetric, stats = policy_loss(log_r, zero, adv, mask, 0.2)
    assert symmetric.item() == pytest.approx((-1.2 + 0.8) / 2)  # 1.25 clipped to 1.2
    assert stats["clipfrac"].item() == pytest.approx(1.0)
    same, _ = policy_loss(log_r, zero, adv, mask, 0.2, clip_eps_high=0.2)
    assert same.item() == symmetric.item()


def test_clip_higher_matches_the_loop_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    M, N = 5, 7
    lp, old = 0.4 * torch.randn(M, N, generator=g), 0.4 * torch.randn(M, N, generator=g)
    adv = torch.randn(M, N, generator=g)
    mask = (torch.arange(N) < torch.tensor([7, 3, 5, 1, 6]).unsqueeze(1)).float()
    loss, stats = policy_loss(lp, old, adv, mask, 0.1, clip_eps_high=0.35)
    want, frac = clipped_surrogate_loop(lp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.1, 0.35)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert stats["clipfrac"].item() == pytest.approx(frac)


def test_clip_eps_high_defaults_to_clip_eps_and_is_checked(tmp_path):
    assert config(tmp_path).clip_eps_high is None
    with pytest.raises(ConfigError, match="clip.eps.high"):
        config(tmp_path, clip_eps_high=0.0)


# --------------------------------------------------------------- the soft overlong penalty
def test_overlong_penalty_values_by_hand():
    # L_max 20, buffer 4, P 1: free up to 16 tokens, then -1/4 per token, -1 at 20 (eq. 13)
    lengths = torch.tensor([1, 10, 16, 17, 18, 19, 20])
    got = overlong_penalty(lengths, max_length=20, buffer=4, penalty=1.0)
    assert got.tolist() == pytest.approx([0, 0, 0, -0.25, -0.5, -0.75, -1.0])
    half = overlong_penalty(lengths, max_length=20, buffer=4, penalty=0.5)
    assert half.tolist() == pytest.approx([0, 0, 0, -0.125, -0.25, -0.375, -0.5])
    whole = overlong_penalty(torch.tensor([0, 5, 10]), max_length=10, buffer=10, penalty=2.0)
    assert whole.tolist() == pytest.approx([0, -1.0, -2.0])
    with pytest.raises(ValueError, match="buffer must be in"):
        overlong_penalty(lengths, max_length=20, buffer=21, penalty=1.0)


def test_overlong_penalty_is_added_to_the_score_and_checked(tmp_path):
    cfg = config(tmp_path, max_new_tokens=8, overlong_buffer=2, overlong_penalty=0.4, missing_eos_penalty=1.0)
    scores = torch.tensor([1.0, 1.0, 1.0])
    ended = torch.tensor([True, True, False])
    got = normalise_scores(cfg, scores, ended, RunningMoments(), torch.tensor([6, 7, 8]))
    assert got.tolist() == pytest.approx([1.0, 0.8, 1.0 - 1.0 - 0.4])
    assert config(tmp_path, overlong_buffer=4).overlong_penalty == 1.0  # the paper's
    with pytest.raises(ConfigError, match="--overlong-penalty 0.5 needs --overlong-buffer"):
        config(tmp_path, overlong_penalty=0.5)
    with pytest.raises(ConfigError, match=r"--overlong-buffer \(40\) must be at most --max-new-tokens \(32\)"):
        config(tmp_path, overlong_buffer=40, max_new_tokens=32)


# ------------------------------------------------------------- masking truncated responses
def _rollout(M: int = 4, N: int = 5, V: int = 11, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    response_mask = (torch.arange(N) < torch.tensor([5, 2, 4, 3])[:M].unsqueeze(1)).long()
    old = -torch.rand(M, N, generator=g) * response_mask
    r = Rollout(
        prompts=["p"] * M,
        responses=["r"] * M,
        query_ids=torch.ones(M, 2, dtype=torch.long),
        query_mask=torch.ones(M, 2, dtype=torch.long),
        response_ids=torch.randint(0, V, (M, N), generator=g),
        response_mask=response_mask,
        ended=torch.tensor([False, True, False, True])[:M],  # rows 0 and 2 were cut at max_new_tokens
        old_logprobs=old,
        ref_logprobs=(old - 0.3 * torch.rand(M, N, generator=g)) * response_mask,
        old_values=None,
        scores=torch.randn(M, generator=g),
    )
    advantages = torch.randn(M, 1, generator=g).expand(M, N) * response_mask
    logits = torch.randn(M, N, V, generator=g)
    return r, advantages, logits


def _select(r: Rollout, rows) -> Rollout:
    return Rollout(
        **{
            k: (v[rows] if isinstance(v, torch.Tensor) else [v[i] for i in rows.tolist()] if isinstance(v, list) else v)
            for k, v in vars(r).items()
        }
    )


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_masked_truncated_rows_contribute_nothing(aggregation, tmp_path):
    """The loss with rows 0 and 2 masked equals the loss on rows 1 and 3 alone; the masked rows'
    logits get zero gradient; micro-batches weighted by their share of the remaining rows/tokens
    sum to it, and a micro-batch of masked rows alone is 0, not nan."""
    from rlhfkit.rl.trainer import _share, loss_mask

    r, advantages, logits = _rollout()
    kw = dict(
        algo="grpo", kl_penalty="loss", kl_coef=0.1, entropy_coef=0.01, loss_aggregation=aggregation, clip_eps=0.2
    )
    masked_cfg = config(tmp_path, mask_truncated=True, **kw)
    plain_cfg = config(tmp_path, **kw)
    batch = UpdateBatch(r, advantages, advantages, kl_coef=0.1)
    rows = torch.arange(4)
    leaf = logits.clone().requires_grad_(True)
    loss, _ = policy_objective(masked_cfg, leaf, batch, rows)
    loss.backward()
    assert torch.all(leaf.grad[[0, 2]] == 0) and torch.any(leaf.grad[[1, 3]] != 0)

    kept = torch.tensor([1, 3])
    alone = UpdateBatch(_select(r, kept), advantages[kept], advantages[kept], kl_coef=0.1)
    want, _ = policy_objective(plain_cfg, logits[kept], alone, torch.arange(2))
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)

    # grad_accum 2: micro-batches [0, 2] (both cut) and [1, 3], weighted by _share
    mask = loss_mask(masked_cfg, r)
    total = 0.0
    for micro in (torch.tensor([0, 2]), torch.tensor([1, 3])):
        part, _ = policy_objective(masked_cfg, logits[micro], batch, micro)
        weighted = part * _share(mask, rows, micro, aggregation)
        assert torch.isfinite(weighted)
        total += weighted.item()
        if micro[0] == 0:
            assert weighted.item() == 0.0
    assert total == pytest.approx(want.item(), rel=1e-6)
    # the KL statistics still read every response: the rollout's own mask is untouched
    assert r.response_mask[[0, 2]].sum() > 0


# -------------------------------------------------------------------------- kl-penalty none
def test_kl_penalty_none_holds_no_reference_and_refuses_a_kl_coefficient(tmp_path, caplog):
    cfg = config(tmp_path, algo="grpo", kl_penalty="none")
    assert (cfg.kl_coef, cfg.uses_reference) == (0.0, False)
    assert config(tmp_path, algo="ppo", kl_penalty="none").uses_reference is False  # PPO without a leash
    assert config(tmp_path, algo="grpo").kl_coef == 0.05  # the default elsewhere is unchanged
    with pytest.raises(ConfigError, match="--kl-penalty none drops the KL term .* cannot take --kl-coef 0.1"):
        config(tmp_path, algo="grpo", kl_penalty="none", kl_coef=0.1)
    with pytest.raises(ConfigError, match="--kl-penalty none .* cannot take --adaptive-kl"):
        config(tmp_path, algo="grpo", kl_penalty="none", adaptive_kl=True)
    assert config(tmp_path, algo="grpo", kl_penalty="none", kl_coef=0.0).kl_coef == 0.0  # an explicit 0 agrees
    with caplog.at_level(logging.WARNING):
        config(tmp_path, algo="grpo", kl_penalty="none", max_kl=5.0)
    assert "--max-kl 5 is ignored" in caplog.text
    with pytest.raises(ConfigError, match="--kl-penalty loss is for the critic-free algorithms"):
        config(tmp_path, algo="ppo", kl_penalty="loss")


# ------------------------------------------------------------------------ end to end
WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "big"]


@pytest.fixture(scope="module")
def dapo_files(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dapo")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) for _ in range(24)]
    for i in range(0, 24, 3):  # every third prompt carries the marker: all its responses score 1.0
        lines[i] = "solved " + lines[i]
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(lines) + "\n")
    rewards = root / "rewards.py"
    rewards.write_text(
        "def marked(prompts, responses):\n"
        "    return [1.0 if p.startswith('solved') else sum(c.islower() for c in r) / max(len(r), 1)\n"
        "            for p, r in zip(prompts, responses)]\n"
    )
    return prompts, rewards


@pytest.mark.parametrize(
    "algo, extra",
    [
        ("grpo", {"dynamic_sampling": True, "samples_per_prompt": 2}),
        ("ppo", {"critic": "value-head", "grad_accum": 2}),  # the joint actor + value-head loss
    ],
)
def test_every_knob_at_once_trains_without_a_reference(algo, extra, tiny_lm, dapo_files, tmp_path, monkeypatch):
    import rlhfkit.rl.trainer as trainer

    prompts, rewards = dapo_files
    references = []
    real_load = trainer.load_models

    def recording_load(cfg, device):
        models = real_load(cfg, device)
        references.append(models[2])
        return models

    monkeypatch.setattr(trainer, "load_models", recording_load)
    out = tmp_path / "run"
    train_rl(
        from_dict(
            RLConfig,
            dict(
                policy=str(tiny_lm),
                reward=f"{rewards}:marked",
                prompts=str(prompts),
                output=str(out),
                algo=algo,
                max_steps=2,
                batch_size=4,
                mini_batch_size=4,
                max_new_tokens=6,
                lr=1e-2,
                kl_penalty="none",
                **extra,
                clip_eps_high=0.28,
                mask_truncated=True,
                overlong_buffer=2,
                sample_every=0,
                progress=False,
                report_to="none",
            ),
        )
    )
    assert references == [None]
    row = read_metrics(out / "metrics.jsonl")[-1]
    assert not {"rl/kl", "rl/kl_k3", "rl/kl_loss"} & set(row)
    assert math.isfinite(row["rl/policy_loss"])
    assert "--kl-penalty none: no reference policy" in (out / "run.log").read_text()


# ------------------------------------------------------------------------ dynamic sampling
def _scored_rollout(group_scores: list[list[float]], tag: str, N: int) -> Rollout:
    """A rollout of len(group_scores) groups of K responses with these scores; prompts named
    ``tag:g``, response lengths up to ``N`` (so rollouts of several shapes meet)."""
    M = sum(len(g) for g in group_scores)
    P = 2 + N % 3
    lengths = torch.tensor([1 + i % N for i in range(M)])
    return Rollout(
        prompts=[f"{tag}:{g}" for g, group in enumerate(group_scores) for _ in group],
        responses=[f"{tag}:{g}:{i}" for g, group in enumerate(group_scores) for i in range(len(group))],
        query_ids=torch.full((M, P), 7),
        query_mask=torch.ones(M, P, dtype=torch.long),
        response_ids=torch.full((M, N), 5),
        response_mask=(torch.arange(N) < lengths.unsqueeze(1)).long(),
        ended=torch.ones(M, dtype=torch.bool),
        old_logprobs=-torch.ones(M, N),
        ref_logprobs=-torch.ones(M, N),
        old_values=torch.zeros(M, N),
        scores=torch.tensor([s for group in group_scores for s in group]),
    )


def test_dynamic_sampling_refills_the_batch_with_informative_groups(tmp_path):
    from rlhfkit.rl.trainer import refill_informative

    cfg = config(tmp_path, algo="grpo", samples_per_prompt=2, batch_size=3, mini_batch_size=6, dynamic_sampling=True)
    first = _scored_rollout([[1, 1], [0.2, 0.5], [1, 1]], "a", N=4)
    more = [
        _scored_rollout([[0.1, 0.3], [1, 1], [0.4, 0.4]], "b", N=6),
        _scored_rollout([[0.5, 0.9], [0.2, 0.1], [1, 1]], "c", N=3),
        _scored_rollout([[0.0, 0.9], [0.0, 0.1], [0.0, 0.2]], "d", N=3),  # never reached
    ]
    calls = []

    def sample_more(round_):
        calls.append(round_)
        return more[round_]

    batch, stats = refill_informative(cfg, first, sample_more, agree=lambda short: short)
    # by hand: 1 informative group after the first rollout, 2 after the second, 4 after the third
    assert calls == [0, 1]
    assert batch.prompts == ["a:1", "a:1", "b:0", "b:0", "c:0", "c:0"]
    assert batch.scores.tolist() == pytest.approx([0.2, 0.5, 0.1, 0.3, 0.5, 0.9])
    assert stats == {"rl/extra_rollouts": 12.0, "rl/dropped_groups": 5.0, "rl/informative_groups": 3.0}
    assert batch.response_ids.shape == (6, 6) and batch.query_ids.shape == (6, 3)  # padded to the widest
    assert batch.response_mask.sum(1).tolist() == [3, 4, 1, 2, 1, 2]  # each row's own tokens, nothing more
    assert batch.query_mask.sum(1).tolist() == [3, 3, 2, 2, 2, 2]  # left padding on the narrower queries
    assert batch.query_mask[2].tolist() == [0, 1, 1] and batch.response_mask[2].tolist() == [1, 0, 0, 0, 0, 0]

    # the cap: one extra rollout, then equal-score groups fill the batch (advantage 0)
    capped = config(
        tmp_path,
        algo="grpo",
        samples_per_prompt=2,
        batch_size=3,
        mini_batch_size=6,
        dynamic_sampling=True,
        max_resample_batches=1,
    )
    calls.clear()
    batch, stats = refill_informative(capped, first, sample_more, agree=lambda short: short)
    assert calls == [0]
    assert batch.prompts == ["a:1", "a:1", "b:0", "b:0", "a:0", "a:0"]
    assert stats == {"rl/extra_rollouts": 6.0, "rl/dropped_groups": 4.0, "rl/informative_groups": 2.0}

    # enough already: nothing more sampled
    calls.clear()
    full = _scored_rollout([[0, 1], [1, 0], [0.5, 0.2]], "e", N=2)
    batch, stats = refill_informative(cfg, full, sample_more, agree=lambda short: short)
    assert calls == [] and batch.prompts == full.prompts and stats["rl/extra_rollouts"] == 0.0


def test_dynamic_sampling_is_for_the_group_algorithms(tmp_path, caplog):
    assert config(tmp_path, algo="grpo", dynamic_sampling=True).max_resample_batches == 3
    with caplog.at_level(logging.WARNING):
        config(tmp_path, algo="grpo", max_resample_batches=5)
    assert "--max-resample-batches 5 is ignored without --dynamic-sampling" in caplog.text
    with pytest.raises(ConfigError, match="--dynamic-sampling .* --algo ppo learns from every response"):
        config(tmp_path, algo="ppo", dynamic_sampling=True)
    with pytest.raises(ConfigError, match="max.resample.batches"):
        config(tmp_path, algo="grpo", dynamic_sampling=True, max_resample_batches=0)


def test_dynamic_sampling_logs_its_rollouts_and_resumes_exactly(tiny_lm, dapo_files, tmp_path):
    from safetensors.torch import load_file

    prompts, rewards = dapo_files
    common = dict(
        policy=str(tiny_lm),
        reward=f"{rewards}:marked",
        prompts=str(prompts),
        algo="grpo",
        samples_per_prompt=2,
        max_steps=4,
        batch_size=4,
        mini_batch_size=4,
        max_new_tokens=5,
        lr=1e-2,
        dynamic_sampling=True,
        max_resample_batches=2,
        save_every=2,
        sample_every=0,
        progress=False,
        report_to="none",
    )
    full, split = tmp_path / "full", tmp_path / "split"
    train_rl(from_dict(RLConfig, dict(common, output=str(full))))
    rows = read_metrics(full / "metrics.jsonl")
    assert sum(r["rl/extra_rollouts"] for r in rows) > 0  # a third of the prompts score 1.0 on every response
    assert sum(r["rl/dropped_groups"] for r in rows) > 0
    for r in rows:  # a refilled batch trains on informative groups only
        assert r["rl/extra_rollouts"] % (4 * 2) == 0
        if r["rl/informative_groups"] == 4:
            assert r["rl/equal_score_groups"] == 0.0
    train_rl(from_dict(RLConfig, dict(common, output=str(split), stop_after_steps=2)))
    train_rl(from_dict(RLConfig, dict(common, output=str(split), resume=True)))
    a, b = load_file(str(full / "final" / "model.safetensors")), load_file(str(split / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = read_metrics(split / "metrics.jsonl")
    for key in ("rl/score_mean", "rl/policy_loss", "rl/extra_rollouts", "rl/dropped_groups"):
        assert [r[key] for r in again] == [r[key] for r in rows], key


def test_the_cli_says_there_is_no_kl_without_a_reference(tiny_lm, dapo_files, tmp_path, capsys):
    from rlhfkit.cli import main

    prompts, rewards = dapo_files
    argv = [
        "rl",
        "--algo",
        "grpo",
        "--policy",
        str(tiny_lm),
        "--reward",
        f"{rewards}:marked",
        "--prompts",
        str(prompts),
    ]
    argv += ["--output", str(tmp_path / "o"), "--max-steps", "1", "--batch-size", "2", "--samples-per-prompt", "2"]
    argv += ["--mini-batch-size", "4", "--max-new-tokens", "4", "--kl-penalty", "none", "--no-progress"]
    assert main([*argv, "--report-to", "none", "--sample-every", "0"]) == 0
    out = capsys.readouterr().out
    assert "no KL (no reference policy) at the last update" in out and "KL nan" not in out

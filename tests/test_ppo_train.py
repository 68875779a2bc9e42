"""PPO on a tiny random policy: it learns, the KL leash holds, resume is exact, stops are clean, CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.cli import main
from rlhfkit.config import ConfigError, from_dict
from rlhfkit.errors import RunStopped
from rlhfkit.rl.trainer import PPOConfig, train_ppo
from rlhfkit.tracking import read_metrics
from tests.conftest import write_rl_files

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "big"]


@pytest.fixture(scope="module")
def ppo_files(tmp_path_factory) -> tuple[Path, Path]:
    rng = random.Random(0)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) for _ in range(64)]
    return write_rl_files(tmp_path_factory.mktemp("ppo"), prompts)


def cfg(tiny_lm, ppo_files, out, **kw) -> PPOConfig:
    prompts, rewards = ppo_files
    base = dict(
        policy=str(tiny_lm),
        reward=f"{rewards}:share_lower",
        prompts=str(prompts),
        output=str(out),
        max_steps=24,
        batch_size=32,
        mini_batch_size=16,
        max_new_tokens=8,
        lr=1e-2,
        critic_lr=1e-2,
        kl_coef=0.02,
        scheduler="constant",
        sample_every=0,
        progress=False,
        report_to="none",
        save_every=1000,
    )
    base.update(kw)
    return from_dict(PPOConfig, base)


def series(out: Path, key: str) -> list[float]:
    return [r[key] for r in read_metrics(out / "metrics.jsonl") if key in r]


def mean(xs):
    return sum(xs) / len(xs)


def test_tiny_policy_learns_the_synthetic_reward_within_a_kl_bound(tiny_lm, ppo_files, tmp_path):
    out = tmp_path / "run"
    train_ppo(cfg(tiny_lm, ppo_files, out))
    score, kl = series(out, "rl/score_mean"), series(out, "rl/kl_k3")
    assert len(score) == 24
    assert score[0] < 0.2  # random bytes: ~10% lowercase letters
    assert mean(score[-3:]) > score[0] + 0.35, score  # a large, real improvement
    assert max(kl) < 30.0, kl  # nats per 8-token response: the leash holds
    for key in (
        "rl/reward_mean",
        "rl/kl",
        "rl/kl_coef",
        "rl/entropy",
        "rl/policy_loss",
        "rl/value_loss",
        "rl/clipfrac",
        "rl/approx_kl",
        "rl/explained_variance",
        "rl/response_length",
        "rl/tokens_per_s",
    ):
        assert len(series(out, key)) == 24, key
    assert series(out, "rl/entropy")[-1] < series(out, "rl/entropy")[0]
    # the exported policy is a plain HF checkpoint that knows its reference
    info = json.loads((out / "final" / "rlhfkit_ppo.json").read_text())
    assert info["reference"] == str(tiny_lm)
    assert (out / "curves.png").is_file() and (out / "final" / "model.safetensors").is_file()


def test_large_kl_coef_keeps_the_policy_at_the_reference(tiny_lm, ppo_files, tmp_path):
    out = tmp_path / "leashed"
    train_ppo(cfg(tiny_lm, ppo_files, out, max_steps=16, kl_coef=3.0))
    kl, score = series(out, "rl/kl_k3"), series(out, "rl/score_mean")
    assert max(kl) < 1.0, kl  # the free run is past 5 nats by update 16
    assert mean(score[-3:]) < score[0] + 0.15, score


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_resume_continues_exactly_the_interrupted_run(tiny_lm, ppo_files, tmp_path):
    """Adaptive KL and running score whitening too: every piece of state must come back."""
    common = dict(
        max_steps=4,
        batch_size=8,
        mini_batch_size=4,
        adaptive_kl=True,
        kl_target=0.5,
        kl_horizon=40,
        score_norm="whiten",
        missing_eos_penalty=0.1,
        scheduler="linear",
        save_every=2,
    )
    full = tmp_path / "full"
    train_ppo(cfg(tiny_lm, ppo_files, full, **common))
    split = tmp_path / "split"
    train_ppo(cfg(tiny_lm, ppo_files, split, stop_after_steps=2, **common))
    assert not (split / "final").exists()
    assert json.loads((split / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    train_ppo(cfg(tiny_lm, ppo_files, split, resume=True, **common))
    a, b = weights(full / "final"), weights(split / "final")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    for key in ("rl/score_mean", "rl/kl", "rl/kl_coef", "rl/policy_loss", "rl/value_loss", "rl/lr"):
        assert series(split, key) == series(full, key), key
    assert len(set(series(full, "rl/kl_coef"))) > 1  # the controller did move, and was restored


def test_gradient_accumulation_equals_the_full_minibatch(tiny_lm, ppo_files, tmp_path):
    common = dict(max_steps=1, batch_size=8, mini_batch_size=8, ppo_epochs=2, max_grad_norm=0.0)
    train_ppo(cfg(tiny_lm, ppo_files, tmp_path / "a1", grad_accum=1, **common))
    train_ppo(cfg(tiny_lm, ppo_files, tmp_path / "a4", grad_accum=4, **common))
    a, b = weights(tmp_path / "a1" / "final"), weights(tmp_path / "a4" / "final")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)


def test_kl_past_max_kl_stops_and_keeps_the_last_good_checkpoint(tiny_lm, ppo_files, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(
        RunStopped,
        match=r"update 2: mean KL to the reference is .* past --max-kl 0.01.*checkpoint .* \(step 1\) is intact",
    ) as e:
        train_ppo(
            cfg(
                tiny_lm,
                ppo_files,
                out,
                max_steps=10,
                batch_size=8,
                mini_batch_size=8,
                lr=5e-2,
                max_kl=0.01,
                save_every=1,
            )
        )
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 1
    assert "Lower --lr, raise --kl-coef" in str(e.value)


class _NanGradient(torch.autograd.Function):
    """The identity forward, a NaN gradient backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.mark.parametrize(
    "poison, message",
    [
        (lambda loss: loss * float("nan"), r"non-finite loss \(nan\) at update 2 \(PPO epoch 1\), micro-batch 0"),
        (_NanGradient.apply, r"non-finite gradient norm at update 2 \(PPO epoch 1\) with a finite loss"),
    ],
)
def test_non_finite_loss_or_gradient_stops_and_keeps_the_last_good_checkpoint(
    tiny_lm, ppo_files, tmp_path, monkeypatch, poison, message
):
    import rlhfkit.rl.trainer as T

    common = dict(max_steps=3, batch_size=4, mini_batch_size=4, save_every=1)
    good = tmp_path / "good"
    train_ppo(cfg(tiny_lm, ppo_files, good, stop_after_steps=1, **common))  # the uninterrupted first update
    real, calls = T.policy_loss, {"n": 0}

    def poisoned(*args, **kw):  # update 1 is clean; the first minibatch of update 2 is not
        loss, stats = real(*args, **kw)
        calls["n"] += 1
        return (poison(loss) if calls["n"] > 4 else loss), stats  # 4 = ppo_epochs x 1 minibatch in update 1

    monkeypatch.setattr(T, "policy_loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(
        RunStopped,
        match=message + r".*Nothing was saved from this step on; the last good checkpoint in .* \(step 1\) is intact",
    ):
        train_ppo(cfg(tiny_lm, ppo_files, out, **common))
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 1
    kept, expected = (load_file(str(d / "checkpoint" / "model.safetensors")) for d in (out, good))
    for k in expected:  # the weights of the last good update, bit for bit: the bad step wrote nothing
        torch.testing.assert_close(kept[k], expected[k], rtol=0, atol=0, msg=k)
    assert not (out / "final").exists()


def test_cli_stop_exits_1_and_says_why(tiny_lm, ppo_files, tmp_path, monkeypatch, capsys):
    import rlhfkit.rl.trainer as T

    real = T.policy_loss
    monkeypatch.setattr(T, "policy_loss", lambda *a, **k: (real(*a, **k)[0] * float("nan"), real(*a, **k)[1]))
    prompts, rewards = ppo_files
    code = main(
        [
            "ppo",
            "--policy",
            str(tiny_lm),
            "--reward",
            f"{rewards}:share_lower",
            "--prompts",
            str(prompts),
            "--output",
            str(tmp_path / "nan"),
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--mini-batch-size",
            "4",
            "--no-progress",
            "--report-to",
            "none",
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "rlhfkit ppo: stopped: non-finite loss (nan) at update 1 (PPO epoch 1)" in err
    assert "no checkpoint had been written yet" in err and "Traceback" not in err


def test_config_errors_say_what_to_do(tiny_lm, ppo_files, tmp_path):
    with pytest.raises(
        ConfigError, match=r"--mini-batch-size \(8\) must divide the rollout's 12 responses.*--mini-batch-size 4"
    ):
        cfg(tiny_lm, ppo_files, tmp_path, batch_size=12, mini_batch_size=8)
    with pytest.raises(ConfigError, match=r"--grad-accum \(3\) must divide --mini-batch-size \(8\)"):
        cfg(tiny_lm, ppo_files, tmp_path, batch_size=8, mini_batch_size=8, grad_accum=3)
    with pytest.raises(ConfigError, match="option --reward is required"):
        from_dict(PPOConfig, {"prompts": "p.txt", "output": "o"})
    with pytest.raises(ConfigError, match="has no checkpoint to resume from"):
        train_ppo(cfg(tiny_lm, ppo_files, tmp_path / "empty", resume=True))


def test_cli_ppo_with_lora_and_a_reward_model_critic(tiny_lm, ppo_files, tmp_path, capsys):
    """--lora: the reference is the adapter-free actor; --critic auto picks the reward model (same tokenizer)."""
    from transformers import AutoModelForCausalLM

    from rlhfkit.models.reward import RewardModel

    rm_dir = tmp_path / "rm"
    RewardModel.from_pretrained(tiny_lm).save_pretrained(rm_dir)
    prompts, _ = ppo_files
    out = tmp_path / "run"
    yaml_file = tmp_path / "ppo.yaml"
    yaml_file.write_text("lora: true\nlora_r: 4\nlora_target: [q_proj, v_proj]\nkl_coef: 0.1\nsteps: 5\n")
    argv = [
        "--config",
        str(yaml_file),
        "--policy",
        str(tiny_lm),
        "--reward",
        str(rm_dir),
        "--prompts",
        str(prompts),
        "--output",
        str(out),
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--mini-batch-size",
        "2",
        "--max-new-tokens",
        "6",
        "--lr",
        "1e-3",
        "--sample-every",
        "1",
        "--no-progress",
    ]  # flags override the YAML (steps 2, not 5)
    assert main(["ppo", *argv]) == 0
    assert list((out / "tensorboard").iterdir()) and (out / "curves.png").is_file()
    captured = capsys.readouterr()
    assert "policy saved to" in captured.out and "--- update 1: samples ---" in captured.out + captured.err
    merged = AutoModelForCausalLM.from_pretrained(out / "final")  # a plain model: LoRA merged in
    assert not any("lora" in n for n, _ in merged.named_parameters())
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    # a separate critic is prepared (and checkpointed) as its own model, beside the actor
    actor, critic = (load_file(str(out / "checkpoint" / f)) for f in ("model.safetensors", "model_1.safetensors"))
    assert any("lora_A" in k for k in actor) and any(k.endswith("score.weight") for k in critic)
    assert (out / "checkpoint" / "optimizer.bin").is_file() and (
        out / "checkpoint" / "optimizer_1.bin"
    ).is_file()  # one each
    assert not any("value_head" in k for k in actor | critic)
    assert main(["ppo", *argv]) == 2  # the folder now holds a run
    assert "already holds a run; pass --resume" in capsys.readouterr().err


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_a_separate_critic_trains_exactly_as_with_the_summed_loss(tiny_lm, tmp_path, aggregation):
    """The actor's and the critic's backward passes run one after the other (less memory);
    the update must equal the one from the summed loss through one joint forward, with either
    --loss-aggregation (the value-head path once ignored it and always averaged per token)."""
    import copy

    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhfkit.models.logprobs import policy_logprobs
    from rlhfkit.models.reward import RewardModel
    from rlhfkit.rl.critic import ActorCritic, load_critic
    from rlhfkit.rl.rollout import Rollout
    from rlhfkit.rl.trainer import (
        NetworkStep,
        UpdateBatch,
        actor_micro_loss,
        critic_micro_loss,
        joint_micro_loss,
        network_steps,
        optimise,
    )
    from rlhfkit.training.optim import make_adamw
    from rlhfkit.training.run import Run

    torch.manual_seed(0)
    RewardModel.from_pretrained(tiny_lm).save_pretrained(tmp_path / "rm")
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    joint = ActorCritic(
        AutoModelForCausalLM.from_pretrained(tiny_lm),
        load_critic("reward-model", tok, reward=str(tmp_path / "rm"), policy=str(tiny_lm)),
    ).eval()
    split = copy.deepcopy(joint)
    M, P, N = 6, 5, 7
    query_ids, response_ids = torch.randint(3, 200, (M, P)), torch.randint(3, 200, (M, N))
    query_mask = torch.ones(M, P, dtype=torch.long)
    query_mask[::2, :2] = 0  # left padding
    response_mask = (torch.arange(N) < torch.tensor([7, 3, 5, 7, 1, 6]).unsqueeze(1)).long()
    ids, am = torch.cat([query_ids, response_ids], 1), torch.cat([query_mask, response_mask], 1)
    with torch.no_grad():
        old = policy_logprobs(joint.actor, ids, am, response_ids, 1.0) + 0.05 * torch.randn(M, N)
    r = Rollout(
        prompts=["p"] * M,
        responses=["r"] * M,
        query_ids=query_ids,
        query_mask=query_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        ended=torch.ones(M, dtype=torch.bool),
        old_logprobs=old * response_mask,
        ref_logprobs=old * response_mask,
        old_values=torch.randn(M, N) * response_mask,
        scores=torch.randn(M),
    )
    advantages, returns = torch.randn(M, N), torch.randn(M, N)
    c = cfg(
        tiny_lm,
        ("p.txt", "r.py"),
        tmp_path / "unused",
        batch_size=M,
        mini_batch_size=3,
        grad_accum=3,
        ppo_epochs=2,
        max_grad_norm=0.5,
        entropy_coef=0.01,
        lr=1e-3,
        critic_lr=3e-3,
        loss_aggregation=aggregation,
    )
    run = Run(c, "test", Accelerator(cpu=True), None)
    stats = {}
    joint_opt = (
        make_adamw(
            [{"params": joint.actor_parameters(), "lr": c.lr}, {"params": joint.critic_parameters(), "lr": c.critic_lr}]
        ),
    )
    split_opts = (make_adamw(split.actor_parameters(), lr=c.lr), make_adamw(split.critic_parameters(), lr=c.critic_lr))
    joint_steps = [
        NetworkStep(joint, joint_opt[0], joint_micro_loss, [joint.actor_parameters(), joint.critic_parameters()])
    ]
    split_steps = network_steps((split.actor, split.critic), split_opts, split)  # what the trainer does
    assert [s.loss for s in split_steps] == [actor_micro_loss, critic_micro_loss]
    for name, steps in (("joint", joint_steps), ("split", split_steps)):
        stats[name] = optimise(c, run, steps, UpdateBatch(r, advantages, returns, c.kl_coef), step=0)
    for (k, a), (_, b) in zip(joint.named_parameters(), split.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=k)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(
            joint.parameters(), ActorCritic(AutoModelForCausalLM.from_pretrained(tiny_lm), None).actor.parameters()
        )
    )  # the step did change the weights
    for k in stats["joint"]:
        torch.testing.assert_close(stats["split"][k], stats["joint"][k], rtol=1e-5, atol=1e-6, msg=k)

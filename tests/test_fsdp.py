"""Sharded training (FSDP2 through accelerate, 2 CPU processes on gloo): the parameters really
are sharded, and the runs give what one process gives: the same per-step losses and weights,
the same RL update, an exact resume, and an export that loads on one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.tracking import read_metrics
from tests.conftest import REPO, launch

pytestmark = pytest.mark.slow

FSDP2 = REPO / "examples" / "accelerate" / "fsdp2.yaml"
# `PROBE PREFIX ARGS...` runs an rlhfkit command and records how each process held the models it trained
PROBE = Path(__file__).resolve().parent / "fsdp_probe.py"


def assert_sharded(prefix: Path, processes: int = 2) -> None:
    """Every trained model's parameters are DTensors and each process holds about 1/N of them."""
    for rank in range(processes):
        record = json.loads(Path(f"{prefix}.rank{rank}.json").read_text())
        assert record, "no training step was recorded"
        for name, info in record.items():
            assert info["dtensor"], (rank, name, info)
            assert 0.4 * info["global"] / processes <= info["local"] <= 0.6 * info["global"] * 2 / processes, (
                rank,
                name,
                info,
            )
            assert info["local"] < info["global"], (rank, name, info)


def losses(out: Path) -> list[float]:
    return [r["train/loss"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]


def assert_same_weights(a: Path, b: Path, rtol=1e-4, atol=1e-5) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=rtol, atol=atol, msg=k)


def rm_args(model: Path, data: Path, out: Path, batch_size: int, **extra) -> list[str]:
    args = [
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
        "--eval-every",
        "2",
        "--save-every",
        "2",
        "--no-progress",
        "--report-to",
        "none",
        "--cpu",
    ]
    return args + [x for k, v in extra.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def test_reward_model_fsdp2_matches_one_process_and_exports_a_plain_model(tiny_lm, separable_tsv, tmp_path):
    sharded, one = tmp_path / "fsdp", tmp_path / "single"
    res = launch([PROBE, tmp_path / "probe-fsdp", *rm_args(tiny_lm, separable_tsv, sharded, 4)], config_file=FSDP2)
    assert "rm train: FSDP2 (parameters, gradients and optimizer state sharded over 2 processes)" in res.stderr
    assert_sharded(tmp_path / "probe-fsdp")
    assert (sharded / "checkpoint" / "pytorch_model_fsdp_0").is_dir()  # each process wrote its shard
    launch([PROBE, tmp_path / "probe-one", *rm_args(tiny_lm, separable_tsv, one, 8)], nprocs=1)
    assert len(losses(one)) == 4 and losses(sharded) == pytest.approx(losses(one), rel=1e-4)
    assert_same_weights(one / "final", sharded / "final")
    from transformers import AutoModelForSequenceClassification

    from rlhfkit.models.reward import RewardModel

    rm = RewardModel.from_pretrained(sharded / "final").eval()
    hf = AutoModelForSequenceClassification.from_pretrained(sharded / "final").eval()
    batch = rm.pad([rm.encode("", "good good apple")[0], rm.encode("", "apple")[0]])
    with torch.no_grad():
        torch.testing.assert_close(rm(**batch), hf(**batch).logits.squeeze(-1), atol=1e-5, rtol=1e-5)


def test_a_killed_and_resumed_fsdp2_run_ends_with_the_uninterrupted_weights(tiny_lm, separable_tsv, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    launch([PROBE, tmp_path / "p1", *rm_args(tiny_lm, separable_tsv, full, 4)], config_file=FSDP2)
    launch([PROBE, tmp_path / "p2", *rm_args(tiny_lm, separable_tsv, split, 4, stop_after_steps=2)], config_file=FSDP2)
    assert json.loads((split / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    launch([PROBE, tmp_path / "p3", *rm_args(tiny_lm, separable_tsv, split, 4), "--resume"], config_file=FSDP2)
    assert_same_weights(full / "final", split / "final", rtol=0, atol=0)


def test_sft_fsdp2_matches_one_process(tiny_lm, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"repeat {'ab' * (i % 4 + 1)}", "response": "ab" * (i % 7 + 1)}) + "\n"
            for i in range(40)
        )
    )

    def args(out: Path, batch: int) -> list[str]:
        return [
            "sft",
            "--policy",
            str(tiny_lm),
            "--train",
            str(data),
            "--output",
            str(out),
            "--max-steps",
            "3",
            "--batch-size",
            str(batch),
            "--lr",
            "1e-2",
            "--log-every",
            "1",
            "--warmup-ratio",
            "0",
            "--max-grad-norm",
            "0",
            "--n-samples",
            "1",
            "--eval-fraction",
            "0.2",
            "--no-progress",
            "--report-to",
            "none",
            "--cpu",
        ]

    launch([PROBE, tmp_path / "probe-fsdp", *args(tmp_path / "fsdp", 2)], config_file=FSDP2)
    assert_sharded(tmp_path / "probe-fsdp")
    launch([PROBE, tmp_path / "probe-one", *args(tmp_path / "one", 4)], nprocs=1)
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    assert_same_weights(tmp_path / "one" / "final", tmp_path / "fsdp" / "final")
    assert (tmp_path / "fsdp" / "samples.jsonl").read_text() == (tmp_path / "one" / "samples.jsonl").read_text()


def test_dpo_fsdp2_matches_one_process(tiny_lm, separable_tsv, tmp_path):
    def args(out: Path, batch: int) -> list[str]:
        return [
            "dpo",
            "--policy",
            str(tiny_lm),
            "--train",
            str(separable_tsv),
            "--n-train",
            "64",
            "--output",
            str(out),
            "--max-steps",
            "3",
            "--batch-size",
            str(batch),
            "--lr",
            "1e-2",
            "--log-every",
            "1",
            "--warmup-ratio",
            "0",
            "--max-grad-norm",
            "0",
            "--eval-every",
            "2",
            "--eval-kl-prompts",
            "1",
            "--no-progress",
            "--report-to",
            "none",
            "--cpu",
        ]

    launch([PROBE, tmp_path / "probe-fsdp", *args(tmp_path / "fsdp", 2)], config_file=FSDP2)
    assert_sharded(tmp_path / "probe-fsdp")
    launch([PROBE, tmp_path / "probe-one", *args(tmp_path / "one", 4)], nprocs=1)
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    assert_same_weights(tmp_path / "one" / "final", tmp_path / "fsdp" / "final")
    ref_one, ref_fsdp = (load_file(str(tmp_path / run / "reference_logprobs.safetensors")) for run in ("one", "fsdp"))
    torch.testing.assert_close(ref_fsdp["train"], ref_one["train"], rtol=1e-5, atol=1e-5)
    one, fsdp = (json.loads((tmp_path / run / "eval_report.json").read_text()) for run in ("one", "fsdp"))
    assert fsdp["eval/pairwise_accuracy"] == one["eval/pairwise_accuracy"] and fsdp["eval/kl"] == pytest.approx(
        one["eval/kl"], abs=1e-3
    )


def test_logprob_chunks_under_fsdp2_are_refused_naming_the_option(tiny_lm, separable_tsv, tmp_path):
    """The chunked log-probs read the LM head's weight outside the model's forward pass, where
    FSDP2 keeps it sharded: sft, dpo and rl stop at the start (each process exits 2, the launcher 1),
    saying what to pass."""
    prompts, rewards = tmp_path / "prompts.txt", tmp_path / "rewards.py"
    prompts.write_text("a\nb\n")
    rewards.write_text("def size(prompts, responses):\n    return [len(r) for r in responses]\n")
    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text('{"prompt": "a", "response": "b"}\n' * 4)
    common = ["--policy", str(tiny_lm), "--max-steps", "1", "--logprob-chunk-size", "4", "--cpu", "--no-progress"]
    runs = {
        "sft": ["sft", "--train", str(sft_data), "--output", str(tmp_path / "sft")],
        "dpo": ["dpo", "--train", str(separable_tsv), "--output", str(tmp_path / "dpo")],
        "rl": [
            "rl",
            "--algo",
            "grpo",
            "--reward",
            f"{rewards}:size",
            "--prompts",
            str(prompts),
            "--output",
            str(tmp_path / "rl"),
        ],
    }
    for name, args in runs.items():
        res = launch(["-m", "rlhfkit.cli", *args, *common], config_file=FSDP2, exit_code=1)
        assert "--logprob-chunk-size 4 reads the LM head's weight outside the model's forward pass" in res.stderr, name
        assert "pass --logprob-chunk-size 0 under fsdp2" in res.stderr, name
        assert "exitcode  : 2" in res.stderr, name  # torch's launcher reports each worker's exit code
        assert not (tmp_path / name / "final").exists()


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_one_rl_update_under_fsdp2_matches_the_single_process_update(algo, tiny_lm, tmp_path):
    from rlhfkit.models.reward import RewardModel

    torch.manual_seed(0)
    RewardModel.from_pretrained(tiny_lm).save_pretrained(tmp_path / "rm")
    launch([PROBE, "--update", tmp_path / "fsdp", tiny_lm, tmp_path / "rm", algo], config_file=FSDP2)
    assert_sharded(tmp_path / "fsdp")
    launch([PROBE, "--update", tmp_path / "one", tiny_lm, tmp_path / "rm", algo], nprocs=1)
    a, b = load_file(str(tmp_path / "one.actor.safetensors")), load_file(str(tmp_path / "fsdp.actor.safetensors"))
    assert a.keys() == b.keys()
    changed = False
    before = load_file(str(Path(tiny_lm) / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
        changed |= k in before and not torch.equal(a[k], before[k])
    assert changed  # the update did move the weights


@pytest.mark.parametrize("algo,extra", [("grpo", ["--samples-per-prompt", "4"]), ("ppo", ["--critic", "value-head"])])
def test_lora_rl_under_fsdp2_shards_trains_and_exports_a_plain_policy(algo, extra, tiny_lm, tmp_path):
    """LoRA on a sharded policy: generation and the reference pass enter the model below the
    module that was sharded (peft's ``generate``, the actor inside an actor-critic)."""
    from transformers import AutoModelForCausalLM

    (tmp_path / "prompts.txt").write_text("alpha beta\ngamma delta\nepsilon zeta\neta theta\n", encoding="utf-8")
    (tmp_path / "reward.py").write_text(
        "def lower(prompts, responses):\n    return [sum(c.islower() for c in r) / max(len(r), 1) for r in responses]\n"
    )
    out = tmp_path / "run"
    launch(
        [
            PROBE,
            tmp_path / "probe",
            "rl",
            "--algo",
            algo,
            *extra,
            "--policy",
            str(tiny_lm),
            "--prompts",
            str(tmp_path / "prompts.txt"),
            "--reward",
            f"{tmp_path / 'reward.py'}:lower",
            "--max-new-tokens",
            "5",
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--mini-batch-size",
            "4",
            "--lora",
            "--lora-r",
            "4",
            "--lr",
            "1e-2",
            "--output",
            str(out),
            "--log-every",
            "1",
            "--no-progress",
            "--report-to",
            "none",
            "--cpu",
            "--cpu-matmul",
            "torch",
        ],
        config_file=FSDP2,
    )
    assert_sharded(tmp_path / "probe")
    assert "FSDP2" in (out / "run.log").read_text()
    exported = AutoModelForCausalLM.from_pretrained(out / "final")
    start = load_file(str(Path(tiny_lm) / "model.safetensors"))
    state = exported.state_dict()
    assert not any("lora" in k for k in state)  # the adapter is merged
    assert any(not torch.equal(state[k], start[k]) for k in start if k in state)


def test_sharded_frozen_models_give_the_replicated_rollout(tiny_lm, tmp_path):
    """PPO with a reward model and a frozen reference under FSDP2: sharded for inference (the
    default; each process holds half of them) they score and compare exactly as full copies do."""
    from rlhfkit.models.reward import RewardModel

    torch.manual_seed(0)
    RewardModel.from_pretrained(tiny_lm).save_pretrained(tmp_path / "rm")
    (tmp_path / "prompts.txt").write_text("alpha beta\ngamma delta\nepsilon zeta\neta theta\n", encoding="utf-8")
    rows = {}
    for mode in ("shard", "replicate"):
        out = tmp_path / mode
        launch(
            [
                PROBE,
                tmp_path / f"probe-{mode}",
                "rl",
                "--algo",
                "ppo",
                "--policy",
                str(tiny_lm),
                "--reward",
                str(tmp_path / "rm"),
                "--critic",
                "reward-model",
                "--prompts",
                str(tmp_path / "prompts.txt"),
                "--max-new-tokens",
                "5",
                "--max-steps",
                "2",
                "--batch-size",
                "4",
                "--mini-batch-size",
                "4",
                "--kl-coef",
                "0.1",
                "--lr",
                "1e-2",
                "--frozen-models",
                mode,
                "--output",
                str(out),
                "--log-every",
                "1",
                "--no-progress",
                "--report-to",
                "none",
                "--cpu",
                "--cpu-matmul",
                "torch",
            ],
            config_file=FSDP2,
        )
        rows[mode] = read_metrics(out / "metrics.jsonl")[-1]  # the second rollout: the policy has left the reference
        assert f"frozen models {'sharded' if mode == 'shard' else 'replicated'}" in (out / "run.log").read_text()
    assert_sharded(tmp_path / "probe-shard")  # the reference, the reward model, the actor and the critic
    frozen = json.loads((tmp_path / "probe-shard.rank0.json").read_text())
    assert sum(name.startswith("frozen") for name in frozen) == 2
    assert not any(n.startswith("frozen") for n in json.loads((tmp_path / "probe-replicate.rank0.json").read_text()))
    assert abs(rows["shard"]["rl/kl"]) > 1e-4
    for key in ("rl/score_mean", "rl/kl", "rl/reward_mean", "rl/policy_loss", "rl/value_loss"):
        assert rows["shard"][key] == pytest.approx(rows["replicate"][key], rel=1e-4, abs=1e-7), key

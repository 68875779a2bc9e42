"""``rl --reference``: the KL term's frozen model apart from the starting policy (InstructGPT-style
rounds: continue from the last round's ``final/`` with the KL anchored to the first model), with
LoRA too; recorded in the exported info, kept over ``--resume``; refused without a KL term or
with another tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer

from rlhfkit.config import ConfigError, from_dict
from rlhfkit.models.logprobs import response_logits
from rlhfkit.models.policy import load_policy
from rlhfkit.models.policy_info import read_policy_info
from rlhfkit.models.snapshots import list_snapshots, load_snapshot
from rlhfkit.ops import logprobs_from_logits
from rlhfkit.rl import trainer
from rlhfkit.rl.trainer import RLConfig, separate_reference, train_rl
from rlhfkit.tracking import read_metrics
from tests.conftest import write_rl_files


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    return write_rl_files(tmp_path_factory.mktemp("reference"), [f"the cat {i} sat on a mat" for i in range(16)])


def config(policy, files, out: Path, **extra) -> RLConfig:
    prompts, rewards = files
    base = dict(
        policy=str(policy),
        reward=f"{rewards}:share_lower",
        prompts=str(prompts),
        output=str(out),
        algo="grpo",
        max_steps=3,
        batch_size=2,
        mini_batch_size=8,
        ppo_epochs=1,
        max_new_tokens=6,
        lr=5e-2,
        lora=True,
        lora_r=2,
        save_every=1000,
        sample_every=0,
        progress=False,
        report_to="none",
    )
    return from_dict(RLConfig, {**base, **extra})


@pytest.fixture(scope="module")
def round1(tiny_lm, files, tmp_path_factory) -> Path:
    """A first LoRA round from the tiny model: its ``final/``."""
    out = tmp_path_factory.mktemp("round1") / "run"
    train_rl(config(tiny_lm, files, out))
    return out / "final"


def sequence_logprobs(model, r) -> torch.Tensor:
    """``(M, N)`` log-probs of the rollout's response tokens under ``model``, unpacked, recomputed here."""
    input_ids = torch.cat([r.query_ids, r.response_ids], dim=1)  # (M, P + N)
    attention_mask = torch.cat([r.query_mask, r.response_mask], dim=1)  # (M, P + N)
    with torch.no_grad():
        logits, _ = response_logits(model, input_ids, attention_mask, r.response_ids.shape[1])  # (M, N, V)
    return logprobs_from_logits(logits.float(), r.response_ids) * r.response_mask  # (M, N)


def test_a_lora_round_exports_a_merged_policy_that_the_next_round_continues_from(round1, tiny_lm):
    names = {p.name for p in round1.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names  # a whole model, LoRA merged
    assert "adapter_config.json" not in names
    info = read_policy_info(str(round1))
    assert info["reference"] == str(tiny_lm) and info["policy"] == str(tiny_lm)
    model, _ = load_policy(str(round1))  # loads as a policy
    original, _ = load_policy(str(tiny_lm))
    moved = model.state_dict()
    assert any(not torch.equal(moved[k], v) for k, v in original.state_dict().items())


def test_round_two_measures_its_kl_to_the_reference_not_to_its_start(round1, tiny_lm, files, tmp_path, monkeypatch):
    """Round 2 starts from round 1's policy: against ``--reference`` (the first model) its KL at update 1
    is round 1's policy against the first model on the same samples, recomputed here; without
    ``--reference`` (the starting policy) it is 0. Both with LoRA, whose default reference is the
    actor with its adapter off."""
    rollouts = []

    def recording(*args, **kwargs):
        rollouts.append(trainer_make_rollout(*args, **kwargs))
        return rollouts[-1]

    trainer_make_rollout = trainer.make_rollout
    monkeypatch.setattr(trainer, "make_rollout", recording)
    out = tmp_path / "round2"
    train_rl(config(round1, files, out, reference=str(tiny_lm), max_steps=2, save_policy_every=1))
    first = read_metrics(out / "metrics.jsonl")[0]
    r = rollouts[0]
    policy, _ = load_policy(str(round1))
    reference, _ = load_policy(str(tiny_lm))
    kl = (sequence_logprobs(policy, r) - sequence_logprobs(reference, r)).sum(1).mean().item()  # k1, per response
    assert first["rl/kl_k3"] > 1e-3  # the policy moved (k3 is never negative)
    assert first["rl/kl"] == pytest.approx(kl, rel=1e-3, abs=1e-5)
    assert (r.old_logprobs - r.ref_logprobs).sum(1).mean().item() == pytest.approx(kl, rel=1e-3, abs=1e-5)

    info = read_policy_info(str(out / "final"))
    assert info["reference"] == str(tiny_lm) and info["policy"] == str(round1)  # rlhfkit eval's baseline
    assert "KL reference" in (out / "run.log").read_text()
    snap = list_snapshots(out)[0]  # update 1: the adapter alone, on round 1's policy, not on the reference
    assert snap.is_adapter and snap.base == str(round1)
    merged, _ = load_snapshot(snap)
    assert merged.state_dict().keys() == policy.state_dict().keys()

    rollouts.clear()
    same = tmp_path / "same"
    train_rl(config(round1, files, same, max_steps=1))
    assert read_metrics(same / "metrics.jsonl")[0]["rl/kl"] == pytest.approx(0.0, abs=1e-4)
    assert read_policy_info(str(same / "final"))["reference"] == str(round1)


def test_reference_without_lora_and_over_resume(round1, tiny_lm, files, tmp_path):
    """A full fine-tune holds the reference as its own frozen model; a resumed run loads it again
    from the saved config and records it, ending where the uninterrupted run ends."""
    whole = tmp_path / "whole"
    train_rl(config(round1, files, whole, reference=str(tiny_lm), lora=False, max_steps=2))
    split = tmp_path / "split"
    train_rl(config(round1, files, split, reference=str(tiny_lm), lora=False, max_steps=2, stop_after_steps=1))
    assert yaml.safe_load((split / "config.yaml").read_text())["reference"] == str(tiny_lm)
    train_rl(config(round1, files, split, reference=str(tiny_lm), lora=False, max_steps=2, resume=True))
    a, b = read_metrics(whole / "metrics.jsonl"), read_metrics(split / "metrics.jsonl")
    assert a[0]["rl/kl_k3"] > 1e-3
    assert [row["rl/kl"] for row in a] == pytest.approx([row["rl/kl"] for row in b], rel=1e-5, abs=1e-7)
    assert read_policy_info(str(split / "final"))["reference"] == str(tiny_lm)


def test_a_reference_that_resolves_to_the_policy_is_the_policy(round1, tiny_lm, files, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(round1, target_is_directory=True)
    assert not separate_reference(config(round1, files, tmp_path / "o", reference=str(link)))
    assert not separate_reference(config(round1, files, tmp_path / "o", reference=str(round1.parent)))  # run folder
    assert not separate_reference(config(round1, files, tmp_path / "o"))
    assert separate_reference(config(round1, files, tmp_path / "o", reference=str(tiny_lm)))


def test_a_reference_with_another_tokenizer_is_refused_naming_both(tiny_lm, files, tmp_path):
    other = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_lm, other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<|extra|>"])  # one more id: the same model, another vocabulary
    tokenizer.save_pretrained(other)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=f"--reference {other} has another tokenizer than --policy {tiny_lm}"):
        train_rl(config(tiny_lm, files, out, reference=str(other)))
    assert not out.exists()


def test_reference_needs_a_kl_term(tiny_lm, files, tmp_path, caplog):
    with pytest.raises(ConfigError, match=r"--reference .* names the model of the KL term, and --kl-penalty none"):
        config(tiny_lm, files, tmp_path / "o", reference=str(tiny_lm), kl_penalty="none")
    config(tiny_lm, files, tmp_path / "o", reference=str(tiny_lm), kl_coef=0.0)
    assert "is ignored: --kl-coef 0 without --adaptive-kl" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["fsdp2", "ddp"])
def test_a_separate_reference_under_several_processes(launcher, round1, tiny_lm, files, tmp_path):
    """2 CPU processes, LoRA: the separate reference follows the frozen models' path (under FSDP2
    sharded or replicated by --frozen-models, under DDP whole on each process); round 2's KL at
    update 1 is round 1's drift, the same whether the reference is sharded or replicated."""
    from tests.conftest import REPO, launch

    prompts, rewards = files
    modes = ["shard", "replicate"] if launcher == "fsdp2" else [None]
    kls = []
    for mode in modes:
        out = tmp_path / f"run-{mode}"
        argv = ["rl", "--algo", "grpo", "--policy", str(round1), "--reference", str(tiny_lm), "--lora"]
        argv += ["--prompts", str(prompts), "--reward", f"{rewards}:share_lower", "--max-new-tokens", "5"]
        argv += ["--max-steps", "2", "--batch-size", "2", "--mini-batch-size", "8", "--lr", "5e-2", "--lora-r", "2"]
        argv += ["--output", str(out), "--no-progress", "--report-to", "none", "--cpu", "--cpu-matmul", "torch"]
        argv += ["--frozen-models", mode] if mode else []
        config_file = REPO / "examples" / "accelerate" / "fsdp2.yaml" if mode else None
        launch(["-m", "rlhfkit.cli", *argv], config_file=config_file)
        log = (out / "run.log").read_text()
        assert f"KL reference {tiny_lm}" in log
        if mode:
            assert "FSDP2" in log and f"frozen models {mode}" in log, log[:2000]
        first = read_metrics(out / "metrics.jsonl")[0]
        assert first["rl/kl_k3"] > 1e-3  # k3 is never negative; k1 on a batch can be
        kls.append((first["rl/kl"], first["rl/kl_k3"]))
        assert read_policy_info(str(out / "final"))["reference"] == str(tiny_lm)
    for kl in kls[1:]:
        assert kl == pytest.approx(kls[0], rel=1e-4, abs=1e-6)

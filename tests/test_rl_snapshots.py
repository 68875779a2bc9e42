"""``rl --save-policy-every``: snapshots every N updates, loadable, LoRA adapters small, resume
ends with the same snapshots, and ``list_snapshots`` reads them in order with their KL."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.config import from_dict
from rlhfkit.models.snapshots import list_snapshots, load_snapshot
from rlhfkit.rl.trainer import RLConfig, train_rl
from rlhfkit.tracking import read_metrics
from tests.conftest import write_rl_files


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    return write_rl_files(tmp_path_factory.mktemp("snap"), [f"the cat {i} sat on a mat" for i in range(16)])


def config(tiny_lm, files, out: Path, **extra) -> RLConfig:
    prompts, rewards = files
    base = dict(
        policy=str(tiny_lm),
        reward=f"{rewards}:share_lower",
        prompts=str(prompts),
        output=str(out),
        algo="grpo",
        max_steps=8,
        batch_size=2,
        mini_batch_size=8,
        ppo_epochs=1,
        max_new_tokens=6,
        lr=1e-2,
        save_policy_every=2,
        save_every=1000,
        sample_every=0,
        progress=False,
        report_to="none",
    )
    return from_dict(RLConfig, {**base, **extra})


def tensors(folder: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(folder / name))


def assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_snapshots_every_n_updates_load_differ_and_resume_to_the_same_ones(tiny_lm, files, tmp_path):
    full = tmp_path / "full"
    train_rl(config(tiny_lm, files, full))
    # update 8 is the last: final/, not a snapshot; the list ends with it
    assert sorted(p.name for p in (full / "snapshots").iterdir()) == ["update-2", "update-4", "update-6"]
    snaps = list_snapshots(full)
    assert [s.update for s in snaps] == [2, 4, 6, 8] and snaps[-1].path == full / "final"
    rows = {r["step"]: r for r in read_metrics(full / "metrics.jsonl")}
    for s in snaps:
        assert s.info["update"] == s.update and s.info["reference"] == str(tiny_lm)
        assert s.info["rl/kl"] == rows[s.update]["rl/kl"] and s.info["rl/score_mean"] == rows[s.update]["rl/score_mean"]
        assert not s.is_adapter and s.base is None
    model, _ = load_snapshot(snaps[0])  # a plain Hugging Face folder
    state, saved = model.state_dict(), tensors(snaps[0].path)
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    weights = [tensors(s.path) for s in snaps]
    for a, b in zip(weights, weights[1:]):
        assert any(not torch.equal(a[k], b[k]) for k in a)  # the policy moved between snapshots

    # stopped at update 3 (after snapshot 2, checkpoint at 3); the killed run had also written
    # update-4 before dying: it is left as is, and update-6 and final/ come from the resumed run
    split = tmp_path / "split"
    train_rl(config(tiny_lm, files, split, stop_after_steps=3))
    assert [s.update for s in list_snapshots(split)] == [2]
    shutil.copytree(full / "snapshots" / "update-4", split / "snapshots" / "update-4")
    (split / "snapshots" / "update-4" / "kept").write_text("")
    (split / "snapshots" / ".update-6.tmp-abc123").mkdir()  # a half-written one: removed
    train_rl(config(tiny_lm, files, split, resume=True))
    assert (split / "snapshots" / "update-4" / "kept").is_file()
    assert not (split / "snapshots" / ".update-6.tmp-abc123").exists()
    assert [s.update for s in list_snapshots(split)] == [2, 4, 6, 8]
    for a, b in zip(list_snapshots(full), list_snapshots(split)):
        assert_equal(tensors(a.path), tensors(b.path))
        assert a.info == b.info
    checkpoint = split / "checkpoint"
    assert not any("update-" in p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*"))


def test_lora_snapshots_hold_the_adapter_alone_and_load_onto_the_reference(tiny_lm, files, tmp_path):
    out = tmp_path / "lora"
    train_rl(config(tiny_lm, files, out, max_steps=3, save_policy_every=1, lora=True, lora_r=2, lr=5e-2))
    snaps = list_snapshots(out)
    assert [s.update for s in snaps] == [1, 2, 3]
    folder = snaps[0].path
    names = {p.name for p in folder.iterdir()}  # and peft's model card, README.md
    assert {"adapter_config.json", "adapter_model.safetensors", "rlhfkit_ppo.json"} <= names
    assert not names & {"model.safetensors", "config.json", "tokenizer.json"}
    assert snaps[0].is_adapter and snaps[0].base == str(tiny_lm)
    adapter = (folder / "adapter_model.safetensors").stat().st_size  # rank 2 on hidden 8: a tenth of the model
    assert adapter < (out / "final" / "model.safetensors").stat().st_size / 5
    merged, _ = load_snapshot(snaps[1])
    reference = tensors(Path(tiny_lm))
    state = merged.state_dict()
    assert any(not torch.equal(state[k], reference[k]) for k in reference)  # the adapter moved the policy
    assert json.loads((folder / "rlhfkit_ppo.json").read_text())["update"] == 1


def test_save_policy_every_is_validated(tiny_lm, files, tmp_path, caplog):
    with pytest.raises(Exception, match="save.policy.every"):
        config(tiny_lm, files, tmp_path / "x", save_policy_every=0)
    with caplog.at_level("WARNING"):
        config(tiny_lm, files, tmp_path / "y", save_policy_every=8)
    assert "--save-policy-every 8 writes no snapshot" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("lora", [True, False])
def test_fsdp2_snapshots_gather_the_sharded_policy(lora, tiny_lm, files, tmp_path):
    """Under FSDP2 (2 CPU processes) every process takes part in gathering the weights; the main
    one writes a snapshot that loads on one process: the adapter alone with --lora."""
    from tests.conftest import REPO, launch

    prompts, rewards = files
    out = tmp_path / "run"
    argv = ["rl", "--algo", "grpo", "--policy", str(tiny_lm), "--prompts", str(prompts)]
    argv += ["--reward", f"{rewards}:share_lower", "--max-new-tokens", "5", "--max-steps", "3"]
    argv += ["--batch-size", "2", "--mini-batch-size", "8", "--lr", "5e-2", "--save-policy-every", "1"]
    argv += ["--output", str(out), "--no-progress", "--report-to", "none", "--cpu", "--cpu-matmul", "torch"]
    argv += ["--lora", "--lora-r", "4"] if lora else []
    launch(["-m", "rlhfkit.cli", *argv], config_file=REPO / "examples" / "accelerate" / "fsdp2.yaml")
    assert "FSDP2" in (out / "run.log").read_text()
    snaps = list_snapshots(out)
    assert [s.update for s in snaps] == [1, 2, 3] and snaps[-1].path == out / "final"
    assert all(s.is_adapter == lora for s in snaps[:-1]) and not snaps[-1].is_adapter  # final/ is merged
    start = tensors(Path(tiny_lm))
    states = [load_snapshot(s)[0].state_dict() for s in snaps]
    for state in states:
        assert not any("lora" in k for k in state)
    assert any(not torch.equal(states[0][k], start[k]) for k in start)
    assert any(not torch.equal(states[0][k], states[1][k]) for k in start)

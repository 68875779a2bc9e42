"""``rm train --init-from RM``: continue training a reward model (InstructGPT-style rounds): its
trained head and text format kept (no probe re-fit over it), LoRA on top, and a folder that is
no reward model refused."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from rlhfkit.config import ConfigError, from_dict
from rlhfkit.models.hub import ModelNotFoundError
from rlhfkit.models.reward import RewardModel
from rlhfkit.rm.train import RMTrainConfig, train_reward_model
from tests.conftest import separable_lists

TEXTS = ["good good good apple river", "good apple", "apple river stone", "good good quiet table light"]


def cfg(**kw) -> RMTrainConfig:
    base = dict(
        n_train=90,
        lr=3e-3,
        head_lr=None,
        batch_size=8,
        eval_every=1000,
        save_every=1000,
        log_every=1,
        progress=False,
        report_to="none",
        warmup_ratio=0.0,
        chat_template=False,
    )
    return from_dict(RMTrainConfig, base | kw)


def accuracy(out: Path) -> float:
    return json.loads((out / "eval_report.json").read_text())["pairwise_accuracy"]


@pytest.fixture(scope="module")
def lists(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("warm") / "lists.tsv"
    path.write_text("\n".join("\t".join(r) for r in separable_lists(120)) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def rm1(tiny_lm, lists, tmp_path_factory) -> Path:
    """Round 1: a reward model trained half-way (one epoch, plain text), its run folder."""
    out = tmp_path_factory.mktemp("rm1") / "run"
    train_reward_model(cfg(model=str(tiny_lm), train=str(lists), output=str(out)))
    return out


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_warm_start_keeps_the_trained_head_and_does_not_fit_a_probe_over_it(rm1, lists, tmp_path, caplog, lora):
    """One step at a negligible learning rate from round 1's final/: the same scores and held-out
    accuracy as round 1 (a new or probed head would not give them), with --head-init probe asked
    for and ignored; the text format round 1 trained with is kept over the chat-template default."""
    out = tmp_path / "rm2"
    extra = dict(lora=True, lora_r=2) if lora else {}
    with caplog.at_level(logging.WARNING):
        train_reward_model(
            cfg(
                init_from=str(rm1 / "final"),
                train=str(lists),
                output=str(out),
                max_steps=1,
                lr=1e-12,
                head_init="probe",
                chat_template=None,
                **extra,
            )
        )
    assert "--head-init probe is ignored" in caplog.text
    assert f"head: the trained head of {rm1 / 'final'} (warm start)" in (out / "run.log").read_text()
    assert accuracy(out) == accuracy(rm1)
    before, after = RewardModel.from_pretrained(rm1 / "final"), RewardModel.from_pretrained(out / "final")
    assert after.meta.text_format == "plain" and not (out / "final" / "adapter_config.json").exists()
    assert after.score(None, TEXTS).tolist() == pytest.approx(before.score(None, TEXTS).tolist(), rel=1e-4, abs=1e-5)


def test_a_warm_start_trains_on_from_where_round_one_stopped(rm1, tiny_lm, lists, tmp_path):
    """Round 2 from round 1's run folder (its best/) keeps or raises the held-out accuracy, and
    ends above a new head trained for as long."""
    warm, cold = tmp_path / "warm", tmp_path / "cold"
    train_reward_model(cfg(init_from=str(rm1), train=str(lists), output=str(warm), epochs=2))
    train_reward_model(cfg(model=str(tiny_lm), train=str(lists), output=str(cold), epochs=2))
    assert accuracy(warm) >= accuracy(rm1)
    assert accuracy(warm) >= accuracy(cold)


def test_a_reward_model_named_by_model_is_a_warm_start_too(rm1, lists, tmp_path):
    out = tmp_path / "by-model"
    train_reward_model(cfg(model=str(rm1 / "final"), train=str(lists), output=str(out), max_steps=1, lr=1e-12))
    assert f"head: the trained head of {rm1 / 'final'} (warm start)" in (out / "run.log").read_text()
    assert accuracy(out) == accuracy(rm1)


def test_init_from_a_folder_that_is_no_reward_model_is_refused(tiny_lm, lists, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(
        ConfigError,
        match=rf"--init-from {tiny_lm} is not a reward model: {tiny_lm} has no reward_model.json, the file "
        r"rlhfkit rm train writes beside the weights and the trained head\. Give the folder of an earlier rm train",
    ):
        train_reward_model(cfg(init_from=str(tiny_lm), train=str(lists), output=str(out), max_steps=1))
    with pytest.raises(ModelNotFoundError, match=f"model path {tmp_path / 'missing'} does not exist"):
        train_reward_model(cfg(init_from=str(tmp_path / "missing"), train=str(lists), output=str(out), max_steps=1))
    assert not out.exists()

"""Reward-model training on tiny models: learning, resume, invariances, errors, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.cli import main
from rlhfkit.config import ConfigError, from_dict
from rlhfkit.rm.train import RMTrainConfig, train_reward_model
from rlhfkit.tracking import read_metrics


def cfg(**kw) -> RMTrainConfig:
    base = dict(
        lr=3e-3,
        head_lr=None,
        batch_size=8,
        eval_every=1000,
        save_every=1000,
        log_every=1,
        progress=False,
        report_to="none",
        warmup_ratio=0.0,
    )
    base.update(kw)
    return from_dict(RMTrainConfig, base)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def step_losses(out: Path) -> list[float]:
    return [r["train/loss"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]


def test_tiny_decoder_learns_separable_rank_lists(tiny_lm, separable_tsv, tmp_path):
    out = tmp_path / "run"
    final = train_reward_model(cfg(model=str(tiny_lm), train=str(separable_tsv), n_train=90, output=str(out), epochs=4))
    assert final["pairwise_accuracy"] > 0.95, final
    assert final["n_lists"] == 30 and final["n_pairs"] == 30 * 6
    # the saved model reproduces the reported accuracy through the public API
    from rlhfkit.models.reward import RewardModel

    rm = RewardModel.from_pretrained(out)
    s = rm.score(None, ["good good good apple river", "apple river"])
    assert s[0] > s[1]
    for f in (
        "curves.png",
        "eval_scores.png",
        "metrics.jsonl",
        "eval_report.json",
        "config.yaml",
        "best/config.json",
        "final/config.json",
    ):
        assert (out / f).exists(), f


def test_tiny_encoder_learns(tiny_encoder, separable_tsv, tmp_path):
    final = train_reward_model(
        cfg(
            model=str(tiny_encoder), train=str(separable_tsv), n_train=90, output=str(tmp_path / "r"), epochs=4, lr=5e-3
        )
    )
    assert final["pairwise_accuracy"] > 0.9, final


@pytest.mark.parametrize("head", [{}, {"head_init": "probe"}], ids=["random-head", "probe-head"])
def test_resume_after_stop_matches_uninterrupted_run(tiny_lm, separable_tsv, tmp_path, head):
    common = dict(
        model=str(tiny_lm), train=str(separable_tsv), n_train=90, epochs=2, batch_size=8, save_every=3, **head
    )
    full = tmp_path / "full"
    train_reward_model(cfg(output=str(full), **common))
    split = tmp_path / "split"
    train_reward_model(cfg(output=str(split), stop_after_steps=7, **common))  # "killed" mid-epoch 1
    assert not (split / "final").exists()
    assert json.loads((split / "checkpoint" / "trainer_state.json").read_text())["step"] == 7
    train_reward_model(cfg(output=str(split), resume=True, **common))
    assert "head: from the checkpoint" in (split / "run.log").read_text()  # a resumed run does not fit a probe again
    a, b = weights(full / "final"), weights(split / "final")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert step_losses(full) == pytest.approx(step_losses(split), abs=1e-6)


def test_batch_8_x_accum_1_equals_batch_1_x_accum_8(tiny_lm, separable_tsv, tmp_path):
    common = dict(model=str(tiny_lm), train=str(separable_tsv), n_train=64, max_steps=4, max_grad_norm=0.0)
    one = tmp_path / "b8"
    eight = tmp_path / "b1x8"
    train_reward_model(cfg(output=str(one), batch_size=8, grad_accum=1, **common))
    train_reward_model(cfg(output=str(eight), batch_size=1, grad_accum=8, **common))
    assert step_losses(one) == pytest.approx(step_losses(eight), rel=1e-4)
    a, b = weights(one / "final"), weights(eight / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_non_finite_loss_stops_and_keeps_good_checkpoint(tiny_lm, separable_tsv, tmp_path, monkeypatch):
    import rlhfkit.rm.train as T
    from rlhfkit.errors import RunStopped

    out = tmp_path / "nan"
    real, calls = T.list_losses, {"n": 0}

    def poisoned(*args, **kwargs):  # the 5th training batch produces a NaN loss
        calls["n"] += 1
        per_list = real(*args, **kwargs)
        return per_list * float("nan") if calls["n"] == 5 else per_list

    monkeypatch.setattr(T, "list_losses", poisoned)
    c = cfg(model=str(tiny_lm), train=str(separable_tsv), n_train=90, output=str(out), epochs=2, save_every=2)
    with pytest.raises(
        RunStopped,
        match=r"non-finite loss \(nan\) at step 5 .*lists from .*lists\.tsv:\d+.*checkpoint in .* \(step 4\) is intact",
    ):
        train_reward_model(c)
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 4  # the last good checkpoint, untouched by the failing step
    for name, t in load_file(str(out / "checkpoint" / "model.safetensors")).items():
        assert torch.isfinite(t).all(), name
    assert not (out / "best").exists() and not (out / "final").exists()


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(loss="hinge"), r"option --loss got 'hinge'; choose one of pairwise, logexp"),
        (dict(batch_size=0), r"option --batch-size must be >= 1, got 0"),
        (dict(lr=-1.0), r"option --lr must be > 0, got -1.0"),
        (dict(n_train=5, eval_fraction=0.1), r"--n-train and --eval-fraction both split --train"),
        (dict(lrr=1.0), r"unknown option\(s\) 'lrr'"),
        (dict(batch_size="eight"), r"option --batch-size expects int, got 'eight'"),
    ],
)
def test_config_errors_name_the_option(bad, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(RMTrainConfig, {"train": "x.tsv", "output": "o", **bad})


def test_loss_that_does_not_fit_the_data_is_refused(tiny_lm, separable_tsv, tmp_path):
    with pytest.raises(ValueError, match=r"loss 'mse' needs scalar labels .*lists\.tsv:1 is a preference list"):
        train_reward_model(cfg(model=str(tiny_lm), train=str(separable_tsv), output=str(tmp_path / "o"), loss="mse"))
    with pytest.raises(ValueError, match=r"loss 'margin' needs a 'margin' field"):
        train_reward_model(
            cfg(model=str(tiny_lm), train=str(separable_tsv), output=str(tmp_path / "o2"), loss="margin")
        )


def test_existing_run_needs_resume(tiny_lm, separable_tsv, tmp_path):
    c = dict(model=str(tiny_lm), train=str(separable_tsv), output=str(tmp_path / "o"), max_steps=1)
    train_reward_model(cfg(**c))
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        train_reward_model(cfg(**c))
    with pytest.raises(ConfigError, match="has no checkpoint to resume from"):
        train_reward_model(cfg(**{**c, "output": str(tmp_path / "new")}, resume=True))


@pytest.mark.parametrize("loss", ["logexp", "listwise", "plackett-luce", "token-pairwise"])
def test_every_list_loss_trains(loss, tiny_lm, separable_tsv, tmp_path):
    final = train_reward_model(
        cfg(model=str(tiny_lm), train=str(separable_tsv), n_train=90, output=str(tmp_path / loss), epochs=3, loss=loss)
    )
    assert final["pairwise_accuracy"] > 0.8, (loss, final)


def test_scalar_losses_train(tiny_lm, tmp_path):
    from tests.conftest import separable_lists

    rows = []
    for lst in separable_lists(60, seed=3):
        rows.append({"prompt": "", "response": lst[0], "label": 1})
        rows.append({"prompt": "", "response": lst[-1], "label": 0})
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    final = train_reward_model(
        cfg(
            model=str(tiny_lm),
            train=str(path),
            eval_fraction=0.25,
            output=str(tmp_path / "bin"),
            epochs=4,
            loss="binary",
        )
    )
    assert final["binary_accuracy"] > 0.9, final


def test_cli_train_eval_score(tiny_lm, separable_tsv, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(
        [
            "rm",
            "train",
            "--model",
            str(tiny_lm),
            "--train",
            str(separable_tsv),
            "--n-train",
            "90",
            "--output",
            str(out),
            "--epochs",
            "3",
            "--lr",
            "3e-3",
            "--no-progress",
            "--report-to",
            "none",
        ]
    )
    assert rc == 0
    capsys.readouterr()
    assert main(["rm", "eval", "--model", str(out), "--data", str(separable_tsv), "--n-skip", "90", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    for key in (
        "pairwise_accuracy",
        "list_exact_accuracy",
        "kendall_tau",
        "n_lists",
        "n_pairs",
        "reward_mean",
        "reward_std",
    ):
        assert key in metrics and not (isinstance(metrics[key], float) and math.isnan(metrics[key])), key
    assert metrics["n_lists"] == 30 and metrics["n_pairs"] == 180
    assert main(["score", "--model", str(out), "good good good apple", "apple"]) == 0
    lines = capsys.readouterr().out.split()
    assert len(lines) == 2 and float(lines[0]) > float(lines[1])


def hh_rows(n: int, empty_chosen: int) -> list[dict]:
    """HH-RLHF-style rows (whole dialogues); row ``empty_chosen`` has an empty preferred answer."""
    rows = []
    for i in range(n):
        prompt = f"\n\nHuman: question {i} about the river\n\nAssistant: which river?\n\nHuman: the green one {i}\n\nAssistant:"
        chosen = "" if i == empty_chosen else " good good apple river"
        rows.append({"chosen": prompt + chosen, "rejected": prompt + " stone stone"})
    return rows


@pytest.mark.parametrize("backbone", ["tiny_lm", "tiny_encoder"])
def test_hh_file_with_an_empty_chosen_answer_trains_and_counts_it(backbone, request, tmp_path, capsys, caplog):
    model = str(request.getfixturevalue(backbone))
    train, held_out = tmp_path / "hh_train.jsonl", tmp_path / "hh_test.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in hh_rows(24, empty_chosen=5)))
    held_out.write_text("".join(json.dumps(r) + "\n" for r in hh_rows(6, empty_chosen=2)))
    out = tmp_path / "hh"
    with caplog.at_level("WARNING"):
        rc = main(
            [
                "rm",
                "train",
                "--model",
                model,
                "--train",
                str(train),
                "--output",
                str(out),
                "--epochs",
                "2",
                "--lr",
                "3e-3",
                "--max-length",
                "24",
                "--no-progress",
                "--report-to",
                "none",
            ]
        )
    assert rc == 0
    assert (
        f"{train}: 1 of 48 unique texts have an empty response, scored as the prompt and the end token alone"
        in caplog.text
    )
    assert "longer than max_length=24" in caplog.text  # most dialogues overflow 24 tokens: counted too
    losses = step_losses(out)
    assert losses and all(math.isfinite(v) for v in losses)
    capsys.readouterr()
    assert main(["rm", "eval", "--model", str(out), "--data", str(held_out), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n_lists"] == 6 and metrics["n_empty_responses"] == 1 and metrics["n_truncated"] > 0


def test_cli_reports_bad_input_with_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "bad.tsv"
    bad.write_text("only one text\n")
    rc = main(["rm", "train", "--train", str(bad), "--output", str(tmp_path / "o")])
    assert rc == 2
    assert "bad.tsv, line 1" in capsys.readouterr().err


def test_lora_run_saves_a_merged_plain_checkpoint(tiny_lm, separable_tsv, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from rlhfkit.models.reward import RewardModel

    out = tmp_path / "lora"
    final = train_reward_model(
        cfg(
            model=str(tiny_lm),
            train=str(separable_tsv),
            n_train=90,
            output=str(out),
            epochs=4,
            lora=True,
            lora_r=8,
            lr=1e-2,
        )
    )
    assert final["pairwise_accuracy"] > 0.8, final
    saved = weights(out / "best")
    assert not any("lora" in k for k in saved), "LoRA adapters are merged on save"
    rm = RewardModel.from_pretrained(out / "best").eval()
    hf = AutoModelForSequenceClassification.from_pretrained(out / "best").eval()
    batch = rm.pad([rm.encode("", "good good apple")[0], rm.encode("", "apple")[0]])
    with torch.no_grad():
        torch.testing.assert_close(rm(**batch), hf(**batch).logits.squeeze(-1), atol=1e-5, rtol=1e-5)


def test_freeze_layers_keeps_lower_layers_fixed(tiny_lm, separable_tsv, tmp_path):
    out = tmp_path / "frozen"
    train_reward_model(cfg(model=str(tiny_lm), train=str(separable_tsv), output=str(out), max_steps=3, freeze_layers=1))
    before = load_file(str(Path(tiny_lm) / "model.safetensors"))
    after = weights(out / "final")
    torch.testing.assert_close(after["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])
    torch.testing.assert_close(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert not torch.equal(after["model.layers.1.mlp.up_proj.weight"], before["model.layers.1.mlp.up_proj.weight"])
    with pytest.raises(ConfigError, match="--freeze-layers 5 but the model has 2 layers"):
        train_reward_model(
            cfg(model=str(tiny_lm), train=str(separable_tsv), output=str(tmp_path / "f2"), max_steps=1, freeze_layers=5)
        )

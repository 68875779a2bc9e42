"""Inputs that run but are probably not what the user meant each log one warning that says
what happens and what to do: NUL bytes in a prompt file, an empty text to score, an RL
--batch-size larger than the prompt set."""

from __future__ import annotations

import logging

import pytest

from rlhfkit.cli import main
from rlhfkit.config import from_dict
from rlhfkit.data.prompts import Prompt, read_prompts


def test_nul_bytes_in_a_prompt_file_are_removed_with_a_warning_naming_file_and_line(tmp_path, caplog):
    f = tmp_path / "prompts.txt"
    f.write_bytes(b"first prompt\nsec\x00ond\n\x00\x00\nthird\x00\n")
    with caplog.at_level(logging.WARNING, logger="rlhfkit.data.prompts"):
        got = read_prompts(f)
    assert got == [Prompt("first prompt"), Prompt("second"), Prompt("third")]  # a line of NULs alone is blank
    assert f"{f}:2: NUL bytes (\\0) on 3 line(s) of the --prompts file" in caplog.text
    caplog.clear()
    (tmp_path / "clean.txt").write_text("a\nb\n")
    with caplog.at_level(logging.WARNING, logger="rlhfkit.data.prompts"):
        read_prompts(tmp_path / "clean.txt")
    assert not caplog.records


@pytest.mark.slow
def test_score_of_an_empty_text_warns_that_it_scores_the_prompt_and_end_token(tiny_lm, caplog, capsys):
    with caplog.at_level(logging.WARNING, logger="rlhfkit.rm.commands"):
        assert main(["score", "--model", str(tiny_lm), "--cpu", "", "an answer"]) == 0
    assert "text 1 is empty: its score is the reward model's score of the prompt and the end token alone" in caplog.text
    assert len(capsys.readouterr().out.split()) == 2  # both scored
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rlhfkit.rm.commands"):
        assert main(["score", "--model", str(tiny_lm), "--cpu", "an answer"]) == 0
    assert "is empty" not in caplog.text


def test_rl_batch_size_above_the_prompt_count_warns_at_start(tmp_path, caplog, monkeypatch):
    import rlhfkit.rl.trainer as trainer

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\nthree\n")

    class Loaded(Exception):
        pass

    def stop(*args, **kwargs):  # the warning comes before any model is loaded
        raise Loaded

    monkeypatch.setattr(trainer, "load_models", stop)
    cfg = dict(policy="p", reward="r.py:f", prompts=str(prompts), report_to="none", progress=False, cpu=True)
    cfg.update(algo="grpo", samples_per_prompt=2, mini_batch_size=4)
    with caplog.at_level(logging.WARNING, logger="rlhfkit.rl.trainer"), pytest.raises(Loaded):
        trainer.train_rl(from_dict(trainer.RLConfig, dict(cfg, output=str(tmp_path / "a"), batch_size=4)))
    assert f"--batch-size 4 is more than the 3 prompt(s) in {prompts}: each rollout samples some prompts more" in (
        caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rlhfkit.rl.trainer"), pytest.raises(Loaded):
        trainer.train_rl(from_dict(trainer.RLConfig, dict(cfg, output=str(tmp_path / "b"), batch_size=2)))
    assert "--batch-size" not in caplog.text

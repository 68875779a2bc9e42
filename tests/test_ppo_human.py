"""Human rewards in the loop: typed scores, validation, undo, the JSONL log, resume."""

from __future__ import annotations

import io
import json

import pytest

from rlhfkit.rl.human import HumanRewardSource

P = ["Review the kettle.", "Review the lamp.", "Review the mug."]
R = ["Great kettle.", "The lamp broke.", "A fine mug."]


def source(tmp_path, typed: str, spec_suffix: str = ""):
    out = io.StringIO()
    src = HumanRewardSource(str(tmp_path / "scores.jsonl") + spec_suffix, stdin=io.StringIO(typed), stdout=out)
    return src, out


def test_scores_validation_and_undo(tmp_path):
    # "abc" is rejected, 5 is out of range, then 0.5 for #1, undo, 0.7 for #1 again, -1, 0.
    src, out = source(tmp_path, "abc\n5\n0.5\nu\n0.7\n-1\n?\n0\n", "@-1..1")
    scores = src(P, R)
    assert scores.tolist() == pytest.approx([0.7, -1.0, 0.0])
    text = out.getvalue()
    assert "'abc' is not a number" in text and "between -1 and 1" in text and "undone" in text
    rows = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [r.get("score") for r in rows] == [0.5, None, 0.7, -1.0, 0.0]
    assert "undo" in rows[1]


def test_resume_reads_the_log_and_does_not_ask_again(tmp_path):
    src, _ = source(tmp_path, "1\n2\n")
    with pytest.raises(EOFError, match="the 2 scores typed in this batch are saved in"):
        src(P, R)  # the person stopped after two answers
    again, out = source(tmp_path, "3\n")
    assert again(P, R).tolist() == [1.0, 2.0, 3.0]  # only the third generation was asked
    assert "2 earlier scores read back" in out.getvalue()
    assert out.getvalue().count("score>") == 1


def test_bad_range_spec_is_explained(tmp_path):
    with pytest.raises(ValueError, match="the range must look like LOW..HIGH"):
        HumanRewardSource(str(tmp_path / "s.jsonl") + "@high", stdin=io.StringIO(""), stdout=io.StringIO())


def test_ppo_with_human_rewards_end_to_end(tiny_lm, tmp_path, monkeypatch, capsys):
    from rlhfkit.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\nworld\n")
    log = tmp_path / "human.jsonl"
    monkeypatch.setattr("sys.stdin", io.StringIO("1\n0\nx\n0.5\n-1\n"))
    args = [
        "--policy",
        str(tiny_lm),
        "--reward",
        f"human:{log}",
        "--prompts",
        str(prompts),
        "--output",
        str(tmp_path / "run"),
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--mini-batch-size",
        "2",
        "--max-new-tokens",
        "4",
        "--no-progress",
        "--report-to",
        "none",
        "--sample-every",
        "0",
    ]
    assert main(["ppo", *args]) == 0
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["score"] for r in rows] == [1.0, 0.0, 0.5, -1.0]  # 'x' was refused and asked again
    assert "'x' is not a number" in capsys.readouterr().out
    assert (tmp_path / "run" / "final" / "config.json").is_file()

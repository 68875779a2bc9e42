"""The whole pipeline on tiny models: every stage runs, the report holds every stage's
metrics, and a second run reuses completed stages."""

from __future__ import annotations

import json

import pytest

from rlhfkit.pipeline.simulated import lexicon_score, rank_samples

pytestmark = pytest.mark.slow

RULE = '''
def count_a(prompts, responses):
    """A scripted rule for tiny random models: more letters 'a' is better."""
    return [r.count("a") + 0.01 * len(r) for r in responses]
'''


def summary_text(out) -> str:
    return json.loads((out / "summary.json").read_text())["summary"]


def test_simulated_annotator_ranks_ties_and_reports_no_preference():
    examples, stats = rank_samples(
        ["p1", "p2", "p3"],
        [["I love it, great", "It is bad", "It is fine", "It is fine too"], ["same", "same"], ["ok", "meh"]],
    )
    assert stats.n_no_preference == 2 and stats.n_duplicate_answers == 1 and stats.n_lists == 1
    (ex,) = examples
    assert ex.responses[0] == "I love it, great" and ex.responses[-1] == "It is bad"
    assert ex.ranks == (0, 1, 1, 2)  # the two neutral answers tie
    assert lexicon_score("great great bad") == pytest.approx(100 / 3)


def test_pipeline_end_to_end_on_tiny_models(tiny_lm, tmp_path):
    from rlhfkit.cli import main

    (tmp_path / "rule.py").write_text(RULE)
    sft = tmp_path / "sft.jsonl"
    sft.write_text(
        "".join(json.dumps({"prompt": f"say a {i}", "response": "aaa ab " * (i % 3 + 1)}) + "\n" for i in range(12))
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"say something {i}\n" for i in range(12)))
    out = tmp_path / "pipe"
    config = tmp_path / "pipeline.yaml"

    def write_config(ppo_steps: int, rm_epochs: int = 2) -> None:
        config.write_text(
            f"""
output: {out}
policy: {tiny_lm}
sft: {{train: {sft}, max_steps: 4, batch_size: 4, lr: 1.0e-3, max_length: 48, no_progress: true}}
preferences: {{source: simulated, labeller: "{tmp_path / "rule.py"}:count_a", prompts: {prompts}, n_prompts: 12, k: 3, max_new_tokens: 8, chat_template: false}}
reward_model: {{epochs: {rm_epochs}, batch_size: 4, lr: 3.0e-3, eval_every: 1000, progress: false, report_to: none}}
algorithm: [ppo, grpo, dpo]
dpo: {{max_steps: 3, batch_size: 2, lr: 1.0e-3, eval_kl_prompts: 2, eval_max_new_tokens: 4, progress: false, report_to: none}}
rl: {{prompts: {prompts}, max_steps: {ppo_steps}, batch_size: 4, mini_batch_size: 4, max_new_tokens: 8, lr: 1.0e-3, progress: false, report_to: none, sample_every: 0}}
evaluation: {{n_prompts: 4, bon: [1, 2, 4], max_new_tokens: 8}}
""".replace("no_progress: true", "progress: false")
        )

    write_config(ppo_steps=3)
    assert main(["pipeline", "--config", str(config)]) == 0
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    for needle in (
        "Supervised fine-tuning",
        "Preference data",
        "Reward model",
        "PPO",
        "GRPO",
        "DPO",
        "Evaluation on held-out prompts",
        "pairwise_accuracy",
        "best-of-4",
        "before (starting policy)",
        "after GRPO",
        "SIMULATED ANNOTATOR",
        "gold score",
    ):
        assert needle in html and needle in md, needle
    evaluation = json.loads((out / "evaluation" / "ppo_eval.json").read_text())
    assert [r["name"] for r in evaluation["rows"][:4]] == ["ppo", "grpo", "dpo", "reference"]
    assert all("gold" in r for r in evaluation["rows"])  # the labeller's own rule, scored on the same samples
    assert html.count("data:image/png;base64,") >= 4  # curves of every stage, inlined: opens offline
    for stage in ("sft", "preferences", "reward_model", "ppo", "grpo", "dpo", "evaluation", "judge"):
        assert (out / stage / "stage.json").is_file(), stage
    # win rates against the starting policy by the gold rule (rlhfkit eval), best-of-4 of the start by the RM too
    judged = json.loads((out / "judge" / "stage.json").read_text())["summary"]["rows"]
    assert [r["name"] for r in judged] == ["ppo", "grpo", "dpo", "best-of-4"]
    assert all(0 <= r["win_rate_ci"][0] <= r["win_rate"] <= r["win_rate_ci"][1] <= 1 for r in judged)
    assert "Win rates against the starting policy, by the gold judge" in md and "wins" in summary_text(out)
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert "held-out prompts" in summary and "nats per response" in summary

    # same config: every stage is reused (no stage folder is touched); changed PPO: only PPO and evaluation run again
    before = {
        s: (out / s / "stage.json").stat().st_mtime_ns
        for s in ("sft", "preferences", "reward_model", "ppo", "grpo", "dpo", "evaluation", "judge")
    }
    assert main(["pipeline", str(config)]) == 0  # the old positional form still works
    assert {s: (out / s / "stage.json").stat().st_mtime_ns for s in before} == before
    assert (out / "report.md").read_text().count("reused (complete, same config)") == 8
    marks = {s: json.loads((out / s / "stage.json").read_text())["hash"] for s in ("sft", "reward_model", "ppo", "dpo")}
    write_config(ppo_steps=4)
    assert main(["pipeline", str(config)]) == 0
    assert json.loads((out / "sft" / "stage.json").read_text())["hash"] == marks["sft"]
    assert json.loads((out / "reward_model" / "stage.json").read_text())["hash"] == marks["reward_model"]
    assert json.loads((out / "ppo" / "stage.json").read_text())["hash"] != marks["ppo"]
    assert "reused (complete, same config)" in (out / "report.md").read_text()
    write_config(ppo_steps=4, rm_epochs=1)  # another reward model: DPO, which never reads it, is reused
    assert main(["pipeline", str(config)]) == 0
    assert json.loads((out / "reward_model" / "stage.json").read_text())["hash"] != marks["reward_model"]
    assert json.loads((out / "dpo" / "stage.json").read_text())["hash"] == marks["dpo"]


def test_a_bad_value_in_the_last_section_fails_before_any_stage(tiny_lm, tmp_path, capsys, monkeypatch):
    from rlhfkit.cli import main
    from rlhfkit.pipeline.run import Runner

    started = []

    def no_stage(self, name, config, run):
        started.append(name)
        raise AssertionError(f"stage {name} started although the config is invalid")

    monkeypatch.setattr(Runner, "stage", no_stage)
    config = tmp_path / "pipeline.yaml"
    config.write_text(f"""
output: {tmp_path / "pipe"}
policy: {tiny_lm}
sft: {{train: nowhere.jsonl, max_steps: 4}}
preferences: {{source: simulated, prompts: p.txt, samples_per_prompt: 3}}
reward_model: {{epochs: 2}}
rl: {{prompts: p.txt, max_steps: 3}}
evaluation: {{bon: [1, 0]}}
""")
    assert main(["pipeline", "--config", str(config)]) == 2
    assert started == []  # no stage ran, SFT (the first) included
    err = capsys.readouterr().err
    assert "pipeline evaluation: option --bon must list sizes >= 1, got [1, 0]" in err and "Traceback" not in err
    assert not (tmp_path / "pipe").exists()
    config.write_text(config.read_text().replace("bon: [1, 0]", "bon: [1, 2]").replace("max_steps: 3", "max_steps: -1"))
    assert main(["pipeline", "--config", str(config)]) == 2
    # a value read from the YAML is named by its key there; the stage of algorithm ppo too
    assert "pipeline ppo: rl.max_steps must be >= 1, got -1" in capsys.readouterr().err
    config.write_text(
        config.read_text()
        .replace("max_steps: -1", "max_steps: 3")
        .replace("evaluation: {bon: [1, 2]}", "evaluation: {bon: [1, 2], n_prompts: -2}")
    )
    assert main(["pipeline", "--config", str(config)]) == 2
    assert "pipeline evaluation: evaluation.n_prompts must be >= 1, got -2" in capsys.readouterr().err
    config.write_text(
        config.read_text().replace(", n_prompts: -2", "").replace("samples_per_prompt: 3", "samples_per_prompt: many")
    )
    assert main(["pipeline", "--config", str(config)]) == 2
    assert "preferences.samples_per_prompt expects int, got 'many'" in capsys.readouterr().err
    config.write_text(
        config.read_text()
        .replace("samples_per_prompt: many", "samples_per_prompt: 3")
        .replace("reward_model: {epochs: 2}", "reward_model: {skip: true}")
    )
    assert main(["pipeline", "--config", str(config)]) == 2
    assert (
        "pipeline reward_model: skip is only for algorithm: [dpo]; ppo train against the reward model"
        in capsys.readouterr().err
    )
    config.write_text(config.read_text() + "algorithm: [dpo]\n")
    assert main(["pipeline", "--config", str(config)]) == 2
    assert "pipeline evaluation: with reward_model skipped, give evaluation a 'reward'" in capsys.readouterr().err
    assert not (tmp_path / "pipe").exists() and started == []


def test_every_section_s_files_are_read_before_any_stage(tiny_lm, tmp_path, capsys, monkeypatch):
    """A missing, undecodable or empty input file in any section fails before SFT starts, naming
    the YAML key and the file; the preferences the pipeline writes itself are not looked for."""
    from rlhfkit.cli import main
    from rlhfkit.pipeline.run import Runner

    started = []

    class Started(Exception):
        pass

    def no_stage(self, name, config, run):
        started.append(name)
        raise Started(name)

    monkeypatch.setattr(Runner, "stage", no_stage)
    sft = tmp_path / "sft.jsonl"
    sft.write_text('{"prompt": "q", "response": "a"}\n')
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a prompt\n")
    lists = tmp_path / "lists.tsv"
    lists.write_text("good\tbad\n")
    latin1 = tmp_path / "latin1.tsv"
    latin1.write_bytes("caf\xe9\tth\xe9\n".encode("latin-1"))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    bad_sft = tmp_path / "bad.jsonl"
    bad_sft.write_text('{"prompt": "q"}\n')
    missing = tmp_path / "missing.txt"
    config = tmp_path / "pipeline.yaml"

    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text("{}")

    def write(sft_train=sft, prefs=lists, rl_prompts=prompts, ev_prompts=prompts, policy=tiny_lm):
        config.write_text(f"""
output: {tmp_path / "pipe"}
policy: {policy}
sft: {{train: {sft_train}, max_steps: 1}}
preferences: {{source: file, file: {prefs}}}
rl: {{prompts: {rl_prompts}, max_steps: 1}}
evaluation: {{prompts: {ev_prompts}}}
""")

    cases = [
        (dict(rl_prompts=missing), f"pipeline rl: rl.prompts {missing} does not exist"),
        (dict(ev_prompts=missing), f"pipeline evaluation: evaluation.prompts {missing} does not exist"),
        (dict(prefs=latin1), f"pipeline preferences: preferences.file: {latin1}, line 1: is not valid UTF-8"),
        (dict(prefs=tmp_path), f"pipeline preferences: preferences.file {tmp_path} is a folder"),
        (dict(rl_prompts=blank), f"pipeline rl: rl.prompts: {blank}: holds no prompts"),
        (dict(sft_train=bad_sft), f"pipeline sft: sft.train: {bad_sft}, line 1: has no 'response'"),
        (dict(policy=not_a_model), f"pipeline: policy {not_a_model} is not a loadable model: its config.json names"),
    ]
    for files, needle in cases:
        write(**files)
        assert main(["pipeline", "--config", str(config)]) == 2, files
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, (files, err)
    assert started == [] and not (tmp_path / "pipe").exists()
    write()  # every file readable; preferences/preferences.jsonl, written by a stage, is not looked for
    with pytest.raises(Started):
        main(["pipeline", "--config", str(config)])
    assert started == ["sft"]


def test_interrupted_stage_resumes_from_its_checkpoint_or_restarts(tmp_path):
    from rlhfkit.pipeline.run import Runner

    calls = []

    def run(folder, resume):
        calls.append(resume)
        if len(calls) == 1:
            raise KeyboardInterrupt  # killed before its first checkpoint
        if len(calls) == 2:
            (folder / "checkpoint").mkdir()
            (folder / "checkpoint" / "trainer_state.json").write_text("{}")
            raise KeyboardInterrupt  # killed after a checkpoint
        return {"ok": True}

    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            Runner(tmp_path, []).stage("ppo", {"a": 1}, run)
    res = Runner(tmp_path, []).stage("ppo", {"a": 1}, run)
    assert calls == [False, False, True] and res.summary == {"ok": True}
    assert not (tmp_path / "ppo" / "checkpoint").exists()  # finished: its resumable checkpoint is removed
    again = Runner(tmp_path, []).stage("ppo", {"a": 1}, run)
    assert again.reused and calls == [False, False, True]


def test_keep_checkpoints_keeps_a_finished_stage_s_checkpoint(tmp_path):
    from rlhfkit.pipeline.run import Runner

    def run(folder, resume):
        (folder / "checkpoint").mkdir()
        (folder / "checkpoint" / "trainer_state.json").write_text("{}")
        return {}

    Runner(tmp_path, [], keep_checkpoints=True).stage("sft", {"a": 1}, run)
    assert (tmp_path / "sft" / "checkpoint" / "trainer_state.json").is_file()


@pytest.mark.parametrize(
    "name", ["pipeline_demo.yaml", "pipeline_algorithms.yaml", "pipeline_rounds.yaml", "pipeline_rounds_people.yaml"]
)
def test_shipped_pipeline_examples_are_valid(name, tmp_path, monkeypatch):
    """The example YAMLs pass every check the pipeline runs before its first stage."""
    from pathlib import Path

    from rlhfkit.config import from_dict, load_yaml
    from rlhfkit.pipeline.run import PipelineConfig

    repo = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(repo)  # the examples name their files relative to the repository
    values = load_yaml(repo / "examples" / name) | {"output": str(tmp_path / "out")}
    config = from_dict(PipelineConfig, values, where=name)
    config.validate()
    stages = config.stage_configs()
    assert all(stages[a] is not None for a in config.algorithm)


def test_progress_estimate_names_its_unit_in_the_plural():
    from rlhfkit.tracking import plural

    assert [plural("batch", 2), plural("step", 3), plural("update", 1), plural("pass", 0)] == [
        "batches",
        "steps",
        "update",
        "passes",
    ]


def test_the_report_shows_the_over_optimisation_curve_and_exports_the_best_policy(tiny_lm, tmp_path):
    from rlhfkit.cli import main

    (tmp_path / "rule.py").write_text(RULE)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"say something {i}\n" for i in range(8)))
    out = tmp_path / "pipe"
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        f"""
output: {out}
policy: {tiny_lm}
sft: {{skip: true}}
preferences: {{source: simulated, labeller: "{tmp_path / "rule.py"}:count_a", prompts: {prompts}, k: 3, max_new_tokens: 8, chat_template: false}}
reward_model: {{max_steps: 4, batch_size: 4, lr: 3.0e-3, eval_every: 1000, progress: false, report_to: none}}
algorithm: [ppo]
rl: {{prompts: {prompts}, max_steps: 3, save_policy_every: 1, batch_size: 4, mini_batch_size: 4, max_new_tokens: 8, lr: 3.0e-3, progress: false, report_to: none, sample_every: 0}}
evaluation: {{n_prompts: 4, bon: [1, 2], max_new_tokens: 8}}
"""
    )
    assert main(["pipeline", "--config", str(config)]) == 0
    curve = json.loads((out / "overoptimisation" / "ppo" / "curve.json").read_text())
    assert [r["name"] for r in curve["rows"]][0] == "reference" and len(curve["rows"]) == 4  # start, 1, 2, final
    stage = json.loads((out / "overoptimisation" / "ppo" / "stage.json").read_text())["summary"]
    assert stage["best"] == curve["best"]["name"] and stage["message"] == curve["message"]
    if curve["best"]["name"] != "reference":  # the best checkpoint by the gold rule, as a whole model
        best = json.loads((out / "ppo" / "best" / "best.json").read_text())
        assert best["name"] == curve["best"]["name"] and best["chosen_by"].endswith(":count_a")
        assert (out / "ppo" / "best" / "rlhfkit_ppo.json").is_file()
    md = (out / "report.md").read_text()
    assert "Over-optimisation: PPO" in md and "curve.png" in md and curve["message"] in md

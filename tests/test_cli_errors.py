"""Every command refuses a bad option, a bad file or a bad --output the same way: exit 2, one
paragraph that names the option or file, no traceback, and nothing written.

The cases are generated from each command's config class, so an option added later with a
fixed set of values or a lower bound is covered without touching this file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from pathlib import Path

import pytest

from rlhfkit.cli import COMMANDS, main
from rlhfkit.config import _choices, _flag, _unwrap_optional

pytestmark = pytest.mark.slow

LATIN1 = "caf\xe9 au lait\n".encode("latin-1")  # not UTF-8


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_lm):
    root = tmp_path_factory.mktemp("cli")
    lists = root / "lists.tsv"
    lists.write_text("".join(f"good answer {i}\tokay answer {i}\tbad answer {i}\n" for i in range(12)))
    sft = root / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(8)))
    prompts = root / "prompts.txt"
    prompts.write_text("first prompt\nsecond prompt\n")
    rewards = root / "rewards.py"
    rewards.write_text("def n(prompts, responses):\n    return [float(len(r)) for r in responses]\n")
    from rlhfkit.models.reward import RewardModel

    RewardModel.from_pretrained(tiny_lm).save_pretrained(root / "rm")
    pipeline = root / "pipeline.yaml"
    pipeline.write_text(
        f"output: OUT\npolicy: {tiny_lm}\nsft: {{train: {sft}}}\n"
        f"preferences: {{source: file, file: {lists}}}\nppo: {{prompts: {prompts}}}\n"
    )
    return {
        "lm": str(tiny_lm),
        "lists": str(lists),
        "sft": str(sft),
        "prompts": str(prompts),
        "reward": f"{rewards}:n",
        "rm": str(root / "rm"),
        "pipeline": str(pipeline),
        "root": root,
    }


def _commands(f, out: str) -> dict[str, tuple[list[str], type, dict[str, str]]]:
    """command -> (valid argv writing to ``out``, its config class, {input-file option: its flag})."""
    from rlhfkit.annotate.cli import ExportArgs, ServeArgs
    from rlhfkit.dpo.train import DPOConfig
    from rlhfkit.judge.commands import EvalConfig
    from rlhfkit.pipeline.run import PipelineConfig
    from rlhfkit.plan.commands import PlanConfig
    from rlhfkit.rl.commands import BonConfig, GenerateConfig, PPOEvalConfig
    from rlhfkit.rl.trainer import PPOConfig, RLConfig
    from rlhfkit.rm.commands import RMEvalConfig, ScoreConfig
    from rlhfkit.rm.train import RMTrainConfig
    from rlhfkit.sft.train import SFTConfig

    sample = ["--policy", f["lm"], "--prompts", f["prompts"], "--max-new-tokens", "2"]
    return {
        "rm train": (
            ["rm", "train", "--model", f["lm"], "--train", f["lists"], "--output", out, "--max-steps", "1"],
            RMTrainConfig,
            {"train": "--train"},
        ),
        "rm eval": (["rm", "eval", "--model", f["rm"], "--eval", f["lists"]], RMEvalConfig, {"eval": "--eval"}),
        "score": (
            ["score", "--model", f["rm"], "--responses", f["prompts"]],
            ScoreConfig,
            {"responses": "--responses"},
        ),
        "sft": (
            ["sft", "--policy", f["lm"], "--train", f["sft"], "--output", out, "--max-steps", "1"],
            SFTConfig,
            {"train": "--train"},
        ),
        "dpo": (
            ["dpo", "--policy", f["lm"], "--train", f["lists"], "--output", out, "--max-steps", "1"],
            DPOConfig,
            {"train": "--train"},
        ),
        "ppo": (
            [
                "ppo",
                *sample,
                "--reward",
                f["reward"],
                "--output",
                out,
                "--max-steps",
                "1",
                "--batch-size",
                "2",
                "--mini-batch-size",
                "2",
            ],
            PPOConfig,
            {"prompts": "--prompts"},
        ),
        "rl": (
            [
                "rl",
                "--algo",
                "grpo",
                *sample,
                "--reward",
                f["reward"],
                "--output",
                out,
                "--max-steps",
                "1",
                "--batch-size",
                "2",
                "--mini-batch-size",
                "4",
            ],
            RLConfig,
            {"prompts": "--prompts"},
        ),
        "generate": (
            ["generate", *sample, "--output", str(Path(out) / "g.jsonl")],
            GenerateConfig,
            {"prompts": "--prompts"},
        ),
        "bon": (
            ["bon", *sample, "--reward", f["reward"], "--output", str(Path(out) / "b.jsonl")],
            BonConfig,
            {"prompts": "--prompts"},
        ),
        "ppo-eval": (
            ["ppo-eval", *sample, "--reference", f["lm"], "--reward", f["reward"], "--output", out],
            PPOEvalConfig,
            {"prompts": "--prompts"},
        ),
        "eval": (
            ["eval", *sample, "--baseline", f["lm"], "--judge", f["reward"], "--output", out],
            EvalConfig,
            {"prompts": "--prompts"},
        ),
        "pipeline": (["pipeline", "--config", f["pipeline"], "--output", out], PipelineConfig, {}),
        "annotate": (
            [
                "annotate",
                "--policy",
                f["lm"],
                "--prompts",
                f["prompts"],
                "--db",
                str(Path(out) / "a.db"),
                "--port",
                "0",
            ],
            ServeArgs,
            {"prompts": "--prompts"},
        ),
        "annotate export": (
            ["annotate", "export", "--db", str(f["root"] / "missing.db"), "--output", str(Path(out) / "e.jsonl")],
            ExportArgs,
            {},
        ),
        "plan": (["plan", "--model", "SmolLM2-135M", "--algo", "grpo"], PlanConfig, {}),
    }


def _cases(f, out: str):
    """(command, argv, what the message must name) for every generated bad input."""
    for name, (argv, cls, inputs) in _commands(f, out).items():
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if field.metadata.get("cli") is False:
                continue
            flag, tp = _flag(field.name), _unwrap_optional(hints[field.name])[0]
            if _choices(tp):
                yield name, [*argv, flag, "bogus"], f"argument {flag}: invalid choice: 'bogus'"
            ge, gt = field.metadata.get("ge"), field.metadata.get("gt")
            if tp in (int, float) and (ge is not None or gt is not None):  # sizes, rates: the first value out of range
                bad = gt if gt is not None else (ge - 1 if tp is int else ge - 0.5)
                yield name, [*argv, flag, str(bad)], f"option {flag} must be"
        for opt_name, flag in inputs.items():
            missing = str(f["root"] / f"missing-{opt_name}.txt")
            yield name, [*argv, flag, missing], f"missing-{opt_name}.txt"
            undecodable = f["root"] / f"latin1-{name.replace(' ', '-')}.{'tsv' if 'lists' in opt_name else 'txt'}"
            undecodable.write_bytes(LATIN1)
            yield name, [*argv, flag, str(undecodable)], undecodable.name
        yaml_file = f["root"] / "unknown-key.yaml"
        yaml_file.write_text("no_such_option: 1\n")
        if name != "pipeline":
            yield name, [*argv, "--config", str(yaml_file)], "unknown option(s) 'no_such_option'"
        undecodable_yaml = f["root"] / "latin1.yaml"
        undecodable_yaml.write_bytes(LATIN1)
        if name not in ("annotate", "annotate export"):
            yield name, [*argv, "--config", str(undecodable_yaml)], "latin1.yaml is not UTF-8 text"


def test_every_command_refuses_bad_input_with_exit_2_and_writes_nothing(files, tmp_path, capsys):
    out = tmp_path / "out"
    cases = list(_cases(files, str(out)))
    assert len(cases) > 150  # every command, every option with choices or bounds
    seen = set()
    for name, argv, needle in cases:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, (name, argv, err[-2000:])
        assert needle in err, (name, argv, needle, err[-2000:])
        assert "Traceback" not in err, (name, argv, err[-2000:])
        assert not out.exists(), (name, argv, "wrote", sorted(out.rglob("*")))
        seen.add(name)
    assert {s.split()[0] for s in seen} >= set(COMMANDS) - {"models"}, (
        set(COMMANDS) - {"models"} - {s.split()[0] for s in seen}
    )


@pytest.mark.parametrize(
    "command", ["rm train", "sft", "dpo", "ppo", "ppo-eval", "pipeline", "generate", "bon", "annotate export"]
)
def test_output_that_is_a_file_or_read_only_is_refused(command, files, tmp_path, capsys):
    occupied = tmp_path / "occupied"
    occupied.write_text("x")
    for out, needle in ((occupied, "is a file"), (Path("/sys/rlhfkit-out"), "is not writable")):
        argv, _, _ = _commands(files, str(out))[command]
        assert main(argv) == 2, command
        err = capsys.readouterr().err
        assert needle in err and "--output" in err and "Traceback" not in err, (command, err[-1500:])
    assert occupied.read_text() == "x"


def test_read_only_folder_for_a_non_root_user(files, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; the /sys case above covers root")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    argv, _, _ = _commands(files, str(ro / "run"))["rm train"]
    assert main(argv) == 2 and "is not writable" in capsys.readouterr().err


def test_misc_user_errors_exit_2(files, tmp_path, capsys):
    cases = [
        (["rm", "eval", "--model", files["sft"], "--eval", files["lists"]], "is a file, not a model"),
        (["score", "--model", files["rm"], "--responses", str(tmp_path / "empty.txt")], "does not exist"),
        (["models", "frobnicate"], "unknown argument 'frobnicate'"),
        (["rm", "frob"], "unknown subcommand 'frob'"),
    ]
    plan = ["plan", "--model", "7B", "--algo", "sft"]
    cases += [
        (["plan", "--algo", "sft"], "option --model is required"),
        (["plan", "--model", "7B"], "option --algo is required"),
        (["plan", "--model", "gpt-17", "--algo", "sft"], "'gpt-17' is not a model folder, a known name or a size"),
        (["plan", "--model", files["sft"], "--algo", "sft"], "is a file; give a model folder"),
        (["plan", "--model", str(tmp_path), "--algo", "sft"], "has no config.json"),
        (["plan", "--model", "0.0001B", "--algo", "sft"], "outside the sizes planned for"),
        ([*plan, "--gpus", "-2"], "option --gpus must be >= 1, got -2"),
        ([*plan, "--algo", "dpo2"], "argument --algo: invalid choice: 'dpo2'"),
        ([*plan, "--config", "zero3"], "zero3"),
        (
            [*plan, "--config", "fsdp2"],
            "--config is a YAML file of options in every command; for the sharding use --sharding fsdp2",
        ),
        ([*plan, "--device", "cpu", "--sharding", "fsdp2-offload"], "nothing to offload to"),
        (
            ["plan", "--model", "7B", "--algo", "grpo", "--mini-batch-size", "6"],
            "--mini-batch-size 6 must divide the rollout's 64 rows",
        ),
        (["plan", "--model", "7B", "--algo", "ppo", "--critic", "reward-model"], "give --reward-model too"),
        (["plan", "--model", "7B", "--algo", "grpo", "--reward-model", "gpt-17"], "--reward-model: 'gpt-17' is not"),
    ]
    (tmp_path / "blank.txt").write_text("\n\n")
    cases.append(
        (["score", "--model", files["rm"], "--responses", str(tmp_path / "blank.txt")], "holds no non-blank line")
    )
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, (argv, err)
    assert main(["models", "--help"]) == 0 and "usage: rlhfkit models" in capsys.readouterr().out


def test_a_folder_that_is_not_a_model_exits_2_saying_why(files, tmp_path, capsys):
    """Every loader checks a local model folder first (rlhfkit.models.hub.check_model_folder):
    a config.json without model_type, no weights, no tokenizer -> exit 2 naming the option, the
    folder and what is missing, instead of a transformers traceback."""
    import shutil

    broken = {}
    broken["empty-config"] = tmp_path / "empty-config"
    broken["empty-config"].mkdir()
    (broken["empty-config"] / "config.json").write_text("{}")
    broken["no-weights"] = Path(shutil.copytree(files["lm"], tmp_path / "no-weights"))
    for f in broken["no-weights"].glob("*.safetensors"):
        f.unlink()
    broken["no-tokenizer"] = Path(shutil.copytree(files["lm"], tmp_path / "no-tokenizer"))
    for f in broken["no-tokenizer"].iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "chat_template")):
            f.unlink()
    why = {
        "empty-config": "its config.json names no model_type",
        "no-weights": "it has a config.json but no weights",
        "no-tokenizer": "it has no tokenizer files",
    }
    cmd = _commands(files, str(tmp_path / "out"))
    for command, flag in [
        ("score", "--model"),
        ("rm eval", "--model"),
        ("ppo-eval", "--policy"),
        ("generate", "--policy"),
        ("rl", "--policy"),
        ("sft", "--policy"),
        ("rl", "--reference"),  # options that name a second model, given after the command's own
        ("rm train", "--init-from"),
    ]:
        argv = cmd[command][0]
        argv = argv if flag in argv else [*argv, flag, "PLACEHOLDER"]
        at = argv.index(flag) + 1
        for kind, folder in broken.items():
            bad = [*argv[:at], str(folder), *argv[at + 1 :]]
            assert main(bad) == 2, (command, kind)
            err = capsys.readouterr().err
            assert f"{flag} {folder} is not a loadable model: {why[kind]}" in err, (command, kind, err)
            assert "Traceback" not in err, (command, kind, err)


def test_options_valid_alone_but_not_together_exit_2_and_write_nothing(files, tiny_encoder, tmp_path, capsys):
    """Cross-field cases: each option is a valid value on its own, the combination (with each
    other, with the model or with the data) is not. Same contract as above: exit 2, the
    message names the option, no traceback, nothing written."""
    import shutil

    out = str(tmp_path / "out")
    cmd = _commands(files, out)
    no_template = tmp_path / "lm-without-chat-template"
    shutil.copytree(files["lm"], no_template)
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    chats = tmp_path / "chats.jsonl"
    chats.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]})
            + "\n"
            for i in range(4)
        )
    )
    rm, dpo, sft = cmd["rm train"][0], cmd["dpo"][0], cmd["sft"][0]
    rm_encoder = [
        "rm",
        "train",
        "--model",
        str(tiny_encoder),
        "--train",
        files["lists"],
        "--output",
        out,
        "--max-steps",
        "1",
    ]
    cases = [
        # the option against the model
        ([*rm, "--pooling", "cls"], "--pooling cls is for encoders"),
        ([*rm, "--pooling", "mean"], "--pooling mean is for encoders"),
        ([*rm_encoder, "--pooling", "last"], "--pooling last is for decoders"),
        (
            ["sft", "--policy", str(no_template), "--train", str(chats), "--output", out, "--max-steps", "1"],
            "is a chat ('messages') row, but the tokenizer of",
        ),
        # the option against the data (12 lists, 8 SFT rows)
        (
            [*rm, "--eval-fraction", "0.99"],
            "--eval-fraction: eval_fraction=0.99 of 12 examples leaves nothing to train on",
        ),
        (
            [*dpo, "--eval-fraction", "0.99"],
            "--eval-fraction: eval_fraction=0.99 of 12 examples leaves nothing to train on",
        ),
        ([*sft, "--eval-fraction", "0.99"], "--eval-fraction"),
        ([*rm, "--n-train", "12"], "--n-train 12 leaves no evaluation lists"),
        # two options against each other
        ([*rm, "--n-train", "4", "--eval-fraction", "0.5"], "options --n-train and --eval-fraction both split --train"),
        ([*dpo, "--eval", files["lists"], "--n-train", "4"], "give either --eval FILE or a split of --train"),
        ([*sft, "--eval", files["sft"], "--eval-fraction", "0.5"], "give either --eval FILE or --eval-fraction"),
        ([*cmd["rl"][0], "--samples-per-prompt", "1"], "--algo grpo compares the samples of a prompt"),
        ([*cmd["ppo"][0], "--kl-penalty", "loss"], "--kl-penalty loss is for the critic-free algorithms"),
        (
            [*cmd["rl"][0], "--kl-penalty", "none", "--reference", files["lm"]],
            f"--reference {files['lm']} names the model of the KL term, and --kl-penalty none drops that term",
        ),
        (
            [*cmd["ppo"][0], "--mini-batch-size", "3"],
            "option --mini-batch-size (3) must divide the rollout's 2 responses",
        ),
        ([*cmd["ppo"][0], "--grad-accum", "4"], "option --grad-accum (4) must divide --mini-batch-size (2)"),
    ]
    for argv, needle in cases:
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, (argv, err[-2000:])
        assert needle in err and "Traceback" not in err, (argv, needle, err[-2000:])
        assert not Path(out).exists(), (argv, "wrote", sorted(Path(out).rglob("*")))

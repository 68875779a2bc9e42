"""A damaged run folder is named, never silently wrong: every way a checkpoint file or a cache
can be damaged, for each trainer, ends in an exit code and a message naming the file.

Damage table: (trainer x checkpoint file x kind of damage) -> exit code and the file's name in
the message, never a traceback. Each trainer runs once (2 steps, a checkpoint after step 1,
stopped there); every case damages a copy of that stopped folder and resumes it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhfkit.cli import main
from tests.conftest import REPO, weights

pytestmark = pytest.mark.slow

TRAINERS = ("grpo", "dpo", "rm")
FILES = ("model.safetensors", "optimizer.bin", "custom_checkpoint_0.pkl", "random_states_0.pkl", "trainer_state.json")
KINDS = ("truncate", "empty", "garbage", "delete")


def damage(path: Path, kind: str) -> None:
    if kind == "truncate":
        os.truncate(path, min(10, path.stat().st_size // 2))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":  # the same size: only the checksum sees it
        path.write_bytes(bytes((i * 7 + 3) % 256 for i in range(path.stat().st_size)))
    else:
        path.unlink()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_lm) -> dict:
    root = tmp_path_factory.mktemp("damage")
    lists = root / "lists.tsv"
    lists.write_text("".join(f"good answer {i}\tokay answer {i}\tbad answer {i}\n" for i in range(8)))
    prompts = root / "prompts.txt"
    prompts.write_text("first prompt\nsecond prompt\n")
    rewards = root / "rewards.py"
    rewards.write_text("def n(prompts, responses):\n    return [float(len(r)) for r in responses]\n")
    return {"lm": str(tiny_lm), "lists": str(lists), "prompts": str(prompts), "reward": f"{rewards}:n", "root": root}


def argv(trainer: str, f: dict, out: Path) -> list[str]:
    common = ["--output", str(out), "--max-steps", "2", "--save-every", "1", "--no-progress", "--report-to", "none"]
    if trainer == "grpo":
        return [
            "rl", "--algo", "grpo", "--policy", f["lm"], "--prompts", f["prompts"], "--reward", f["reward"],
            "--max-new-tokens", "2", "--batch-size", "2", "--mini-batch-size", "4", *common,
        ]  # fmt: skip
    if trainer == "dpo":
        return ["dpo", "--policy", f["lm"], "--train", f["lists"], "--batch-size", "2", *common]
    return ["rm", "train", "--model", f["lm"], "--train", f["lists"], "--batch-size", "2", *common]


@pytest.fixture(scope="module")
def stopped(inputs) -> dict[str, Path]:
    """Each trainer's run folder, stopped after step 1 with its checkpoint."""
    folders = {}
    for trainer in TRAINERS:
        out = inputs["root"] / f"{trainer}-stopped"
        assert main([*argv(trainer, inputs, out), "--stop-after-steps", "1"]) == 0
        folders[trainer] = out
    return folders


def resume(trainer: str, inputs: dict, stopped: dict, tmp_path: Path, name: str, harm) -> tuple[int, Path]:
    out = tmp_path / name
    shutil.copytree(stopped[trainer], out)
    harm(out)
    return main([*argv(trainer, inputs, out), "--resume"]), out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("file", FILES)
@pytest.mark.parametrize("trainer", TRAINERS)
def test_a_damaged_checkpoint_file_is_named(trainer, file, kind, inputs, stopped, tmp_path, capsys, caplog):
    rc, out = resume(trainer, inputs, stopped, tmp_path, "run", lambda o: damage(o / "checkpoint" / file, kind))
    err = capsys.readouterr().err + caplog.text  # the message, and the warnings logged
    assert "Traceback" not in err
    if file == "random_states_0.pkl" and kind == "delete":  # the user's way to accept an inexact resume
        assert rc == 0 and "random_states_0.pkl is missing" in err and "NOT end where" in err
        return
    assert rc == 2, err
    assert file in err
    if file == "random_states_0.pkl":
        assert "delete" in err and "fresh random numbers" in err  # how to resume anyway, inexactly
    elif file != "trainer_state.json" or kind != "delete":
        assert "start over with a new --output" in err.lower()  # what to do


def test_an_older_complete_checkpoint_is_pointed_at(inputs, stopped, tmp_path, capsys, caplog):
    def harm(out: Path) -> None:
        shutil.copytree(out / "checkpoint", out / "checkpoint.old")
        state = json.loads((out / "checkpoint.old" / "trainer_state.json").read_text())
        (out / "checkpoint.old" / "trainer_state.json").write_text(json.dumps({**state, "step": 0}))
        damage(out / "checkpoint" / "model.safetensors", "garbage")

    rc, out = resume("rm", inputs, stopped, tmp_path, "run", harm)
    err = capsys.readouterr().err + caplog.text  # the message, and the warnings logged
    assert rc == 2 and "model.safetensors" in err and f"{out / 'checkpoint.old'} (step 0)" in err


@pytest.fixture(scope="module")
def dpo_resumed(inputs, stopped, tmp_path_factory) -> Path:
    """The dpo run resumed undamaged: the weights every cache case must end with."""
    out = tmp_path_factory.mktemp("dpo-clean") / "run"
    shutil.copytree(stopped["dpo"], out)
    assert main([*argv("dpo", inputs, out), "--resume"]) == 0
    return out / "final"


def overwrite_values(path: Path) -> None:
    """Every tensor byte rewritten with plausible log-probabilities, the header left intact."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    n = (len(data) - header) // 4
    data[header:] = torch.full((n,), -1.5).numpy().tobytes()
    path.write_bytes(bytes(data))


def positive_values(path: Path) -> None:
    """Values above 0 (impossible log-probabilities), checksum and header left intact."""
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header:] = torch.full(((len(data) - header) // 4,), 0.5).numpy().tobytes()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "harm, what",
    [
        (overwrite_values, "checksum"),
        (positive_values, "checksum"),
        (lambda p: damage(p, "truncate"), "damaged"),
        (lambda p: damage(p, "empty"), "damaged"),
        (lambda p: damage(p, "garbage"), "damaged"),
    ],
    ids=["values-overwritten", "values-above-0", "truncate", "empty", "garbage"],
)
def test_a_damaged_reference_cache_is_recomputed(harm, what, inputs, stopped, dpo_resumed, tmp_path, capsys, caplog):
    rc, out = resume("dpo", inputs, stopped, tmp_path, "run", lambda o: harm(o / "reference_logprobs.safetensors"))
    err = capsys.readouterr().err + caplog.text  # the message, and the warnings logged
    assert rc == 0 and "Traceback" not in err
    assert "reference_logprobs.safetensors" in err and "recomputing" in err and what in err
    a, b = weights(dpo_resumed), weights(out / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_reference_cache_checks_shapes_and_signs(tiny_lm, tmp_path):
    """The checks behind the checksum: one float32 value <= 0 per text, against the data."""
    from safetensors.torch import save_file

    from rlhfkit.dpo.train import fingerprint, read_reference_cache, tensor_checksum

    class Data:
        texts = [{"input_ids": [1, 2], "response_mask": [0, 1]}] * 3

    data = {"train": Data(), "eval": None}
    meta = {"train": fingerprint(Data()), "eval": fingerprint(None)}
    path = tmp_path / "ref.safetensors"
    for tensors, problem in [
        ({"train": torch.tensor([-1.0, -2.0, -3.0]), "eval": torch.zeros(0)}, ""),
        ({"train": torch.tensor([-1.0, -2.0]), "eval": torch.zeros(0)}, "expected float32 (3,)"),
        ({"train": torch.tensor([-1.0, 2.0, -3.0]), "eval": torch.zeros(0)}, "above 0"),
        ({"train": torch.tensor([-1.0, float("nan"), -3.0]), "eval": torch.zeros(0)}, "not finite"),
        ({"train": torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float64), "eval": torch.zeros(0)}, "float64"),
    ]:
        save_file(tensors, str(path), metadata={**meta, "checksum": tensor_checksum(tensors)})
        cached, why = read_reference_cache(path, data)
        assert (cached is None) == bool(problem) and problem in why, (problem, why)


@pytest.mark.parametrize("file", ["model.safetensors", "optimizer.bin"])  # safetensors' writer, then torch's
def test_disk_full_while_checkpointing_keeps_the_last_checkpoint(file, inputs, stopped, tmp_path):
    """A file-size limit (EFBIG, as a full disk gives ENOSPC) while writing the step-2 checkpoint."""
    out = tmp_path / "run"
    shutil.copytree(stopped["rm"], out)
    before = {p.name: p.read_bytes() for p in (out / "checkpoint").iterdir()}
    model_size = (out / "checkpoint" / "model.safetensors").stat().st_size
    limit = model_size // 2 if file == "model.safetensors" else model_size + 1024
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        "from rlhfkit.cli import main\n"
        f"sys.exit(main({[*argv('rm', inputs, out), '--resume']!r}))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "no space left" in proc.stderr and f"checkpoint.tmp/{file}" in proc.stderr
    assert f"the last checkpoint in {out / 'checkpoint'} (step 1) is intact" in proc.stderr
    assert not (out / "checkpoint.tmp").exists()
    assert {p.name: p.read_bytes() for p in (out / "checkpoint").iterdir()} == before


def test_resume_of_a_finished_run_says_so(inputs, stopped, dpo_resumed, capsys, caplog):
    out = dpo_resumed.parent
    assert main([*argv("dpo", inputs, out), "--resume"]) == 0
    captured = capsys.readouterr()
    assert f"{out} is already finished at step 2 of 2; nothing to do" in captured.out
    assert "nan" not in captured.out


def test_stale_export_folders_are_removed_and_a_copied_folder_is_the_same_run(
    inputs, stopped, tmp_path, capsys, caplog
):
    def harm(out: Path) -> None:
        (out / ".final.tmp-abc123").mkdir()
        (out / ".final.tmp-abc123" / "model.safetensors").write_bytes(b"half")
        (out / "notes.tmp-keep").mkdir()  # not rlhfkit's naming: left alone

    rc, out = resume("rm", inputs, stopped, tmp_path, "copied", harm)  # a copy: --output differs from config.yaml's
    err = capsys.readouterr().err + caplog.text  # the message, and the warnings logged
    assert rc == 0 and not (out / ".final.tmp-abc123").exists() and (out / "notes.tmp-keep").is_dir()
    assert "removed" in err and ".final.tmp-abc123" in err
    assert "changed options" not in err


def test_cpu_matmul_auto_choice_is_reused_on_resume(inputs, stopped, tmp_path, capsys, caplog):
    from rlhfkit.models.cpu_linear import onednn_available

    if not onednn_available():
        pytest.skip("this PyTorch build has no oneDNN: --cpu-matmul auto does nothing")
    state = json.loads((stopped["rm"] / "checkpoint" / "trainer_state.json").read_text())
    assert state["cpu_matmul"], "the auto choice is recorded with the checkpoint"

    rc, _ = resume("rm", inputs, stopped, tmp_path, "run", lambda o: None)
    assert rc == 0
    assert "recorded in the checkpoint being resumed" in caplog.text


@pytest.mark.parametrize(
    "content", ["", "{not json", "[1, 2]", "KEY"], ids=["empty", "garbage", "not-an-object", "bad-entry"]
)
def test_a_damaged_cpu_matmul_cache_is_measured_again(content, tmp_path, caplog):
    from rlhfkit.models import cpu_linear

    shapes = {(64, 64): 1}
    cache = tmp_path / "cpu_matmul.json"
    if content == "KEY":  # the right key, an entry without a kernel
        key = f"{cpu_linear.machine_key(1)} | {sorted(shapes.items())}"
        content = json.dumps({key: {"onednn_gflops": 1.0}})
    cache.write_text(content)
    timer = lambda kernel, tokens, k, n: 1.0 if kernel == "onednn" else 2.0  # noqa: E731
    choice = cpu_linear.choose_cpu_matmul(shapes, threads=1, cache_file=cache, timer=timer)
    assert choice.kernel == "onednn" and choice.source == "measured"
    assert "cpu_matmul.json" in caplog.text and "damaged" in caplog.text
    assert cpu_linear.choose_cpu_matmul(shapes, threads=1, cache_file=cache, timer=timer).source == "cache"  # rewritten


def test_a_damaged_model_conversion_is_converted_again(tiny_lm, tmp_path, monkeypatch, caplog):
    from rlhfkit.models import hub

    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path))
    target = tmp_path / "models" / "smollm2-135m"
    shutil.copytree(tiny_lm, target)
    assert hub.smollm2_path() == target  # intact: used as it is
    damage(target / "model.safetensors", "truncate")
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / hub.SMOLLM2_GGUF).write_bytes(b"")
    monkeypatch.setattr(hub, "_package_dir", lambda module, pip_name: tmp_path / "gguf")
    converted = []
    monkeypatch.setattr(hub, "convert_gguf", lambda *a, **k: converted.append(shutil.copytree(tiny_lm, target)))
    assert hub.smollm2_path() == target and converted
    assert "smollm2-135m is damaged" in caplog.text and "converting the model again" in caplog.text


@pytest.mark.parametrize("kind", ["intact", "garbage", "delete"])
def test_a_checkpoint_without_a_manifest_is_checked_by_reading_it(kind, inputs, stopped, tmp_path, capsys, caplog):
    """A checkpoint written before manifest.json existed: each file is read, the first bad one named."""

    def harm(out: Path) -> None:
        (out / "checkpoint" / "manifest.json").unlink()
        if kind == "garbage":
            damage(out / "checkpoint" / "optimizer.bin", "garbage")
        elif kind == "delete":
            damage(out / "checkpoint" / "model.safetensors", "delete")

    rc, _ = resume("rm", inputs, stopped, tmp_path, "run", harm)
    err = capsys.readouterr().err + caplog.text
    assert "Traceback" not in err
    if kind == "intact":
        assert rc == 0, err
    else:
        assert rc == 2 and ("optimizer.bin" if kind == "garbage" else "model.safetensors is missing") in err

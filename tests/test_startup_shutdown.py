"""What a short run pays outside its updates: the checkpoint after the last update is written only
when it can serve a later ``--resume`` (docs/benchmarks.md, "Start-up and shut-down of a short run")."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from rlhfkit.checkpoint import STATE_FILE
from rlhfkit.cli import main
from rlhfkit.config import from_dict
from rlhfkit.rl.trainer import RLConfig, train_rl
from rlhfkit.tracking import read_metrics
from tests.conftest import weights, write_rl_files

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "big"]


@pytest.fixture(scope="module")
def rl_files(tmp_path_factory) -> tuple[Path, Path]:
    prompts = [" ".join(WORDS[(i + j) % 10] for j in range(3)) for i in range(16)]
    return write_rl_files(tmp_path_factory.mktemp("startup"), prompts)


def grpo(tiny_lm, rl_files, out: Path, **kw) -> RLConfig:
    prompts, rewards = rl_files
    base = dict(
        algo="grpo",
        policy=str(tiny_lm),
        reward=f"{rewards}:share_lower",
        prompts=str(prompts),
        output=str(out),
        max_steps=3,
        batch_size=2,
        samples_per_prompt=2,
        mini_batch_size=4,
        max_new_tokens=4,
        lr=1e-2,
        scheduler="constant",
        sample_every=0,
        progress=False,
        report_to="none",
        save_every=1000,
    )
    return from_dict(RLConfig, {**base, **kw})


def steps(out: Path) -> list[int]:
    return [r["step"] for r in read_metrics(out / "metrics.jsonl")]


def test_no_final_checkpoint_still_exports_and_a_resume_says_what_to_do(tiny_lm, rl_files, tmp_path, capsys):
    out = tmp_path / "run"
    result = train_rl(grpo(tiny_lm, rl_files, out, final_checkpoint=False))
    assert result["final"] == str(out / "final")
    assert (out / "final" / "model.safetensors").is_file() and steps(out) == [1, 2, 3]
    assert not (out / "checkpoint").exists()
    assert "--no-final-checkpoint: no resumable checkpoint after step 3" in (out / "run.log").read_text()
    prompts, rewards = rl_files
    argv = ["rl", "--algo", "grpo", "--policy", str(tiny_lm), "--reward", f"{rewards}:share_lower"]
    code = main([*argv, "--prompts", str(prompts), "--output", str(out), "--max-steps", "5", "--resume"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{out} finished and exported {out / 'final'} but kept no resumable checkpoint" in err
    assert f"start a new run from {out / 'final'}" in err and "--final-checkpoint" in err


def test_the_final_checkpoint_by_default_extends_the_run_and_a_finished_resume_writes_none(tiny_lm, rl_files, tmp_path):
    out = tmp_path / "run"
    train_rl(grpo(tiny_lm, rl_files, out, max_steps=2))
    state = out / "checkpoint" / STATE_FILE
    assert json.loads(state.read_text())["step"] == 2
    written = state.stat().st_mtime_ns
    train_rl(grpo(tiny_lm, rl_files, out, max_steps=2, resume=True))  # finished: nothing to do, nothing rewritten
    assert state.stat().st_mtime_ns == written and (out / "final").is_dir()
    train_rl(grpo(tiny_lm, rl_files, out, max_steps=3, resume=True))  # a larger --max-steps extends it
    assert json.loads(state.read_text())["step"] == 3 and steps(out) == [1, 2, 3]


def test_without_it_the_periodic_checkpoints_and_a_stop_still_save_and_resume_exactly(tiny_lm, rl_files, tmp_path):
    full = tmp_path / "full"
    train_rl(grpo(tiny_lm, rl_files, full, max_steps=4, save_every=2, final_checkpoint=False))
    assert json.loads((full / "checkpoint" / STATE_FILE).read_text())["step"] == 2  # the periodic one stays
    split = tmp_path / "split"
    train_rl(grpo(tiny_lm, rl_files, split, max_steps=4, save_every=2, final_checkpoint=False, stop_after_steps=3))
    assert json.loads((split / "checkpoint" / STATE_FILE).read_text())["step"] == 3  # stopped early: saved
    assert not (split / "final").exists()
    train_rl(grpo(tiny_lm, rl_files, split, max_steps=4, save_every=2, final_checkpoint=False, resume=True))
    a, b = weights(full / "final"), weights(split / "final")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    assert json.loads((split / "checkpoint" / STATE_FILE).read_text())["step"] == 3


def test_the_pipeline_writes_final_checkpoints_only_when_it_keeps_them(tmp_path):
    from rlhfkit.pipeline.run import _final_checkpoints, _options

    prompts = tmp_path / "p.txt"
    configs = {
        "preferences": object(),
        "grpo": from_dict(RLConfig, {"algo": "grpo", "reward": "m:f", "prompts": str(prompts), "output": "a"}),
        "rounds": [{"grpo": from_dict(RLConfig, {"reward": "m:f", "prompts": str(prompts), "output": "b"})}],
    }
    before = _options(configs["grpo"])
    _final_checkpoints(configs, keep=False)
    assert not configs["grpo"].final_checkpoint and not configs["rounds"][0]["grpo"].final_checkpoint
    assert _options(configs["grpo"]) == before  # a finished stage is reused whatever the flag
    _final_checkpoints(configs, keep=True)
    assert configs["rounds"][0]["grpo"].final_checkpoint


# ------------------------------------------------------------------- the quick exit of the command
def _python(code: str, *args: str, cwd: Path | None = None):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=cwd)


def test_the_command_exits_quickly_with_its_code_and_every_file_complete(tiny_lm, rl_files, tmp_path):
    out = tmp_path / "run"
    prompts, rewards = rl_files
    argv = ["rl", "--algo", "grpo", "--policy", str(tiny_lm), "--reward", f"{rewards}:share_lower"]
    argv += ["--prompts", str(prompts), "--output", str(out), "--max-steps", "2", "--batch-size", "2"]
    argv += ["--samples-per-prompt", "2", "--mini-batch-size", "4", "--max-new-tokens", "4", "--no-progress"]
    argv += ["--log-every", "1"]
    run = _python("from rlhfkit.cli import console; console()", *argv)
    assert run.returncode == 0, run.stderr
    assert "policy saved to" in run.stdout  # flushed before the process ended
    assert steps(out) == [1, 2] and weights(out / "final")
    assert json.loads((out / "checkpoint" / STATE_FILE).read_text())["step"] == 2
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))  # the tracker was flushed and closed
    assert not (out / "run.lock").exists()  # released
    bad = _python("from rlhfkit.cli import console; console()", "no-such-command")
    assert bad.returncode == 2 and "unknown command 'no-such-command'" in bad.stderr


def test_the_quick_exit_waits_for_a_running_thread_and_runs_the_exit_hooks(tmp_path):
    code = (
        "import atexit, sys, threading, time\n"
        "from pathlib import Path\n"
        "import rlhfkit.cli as cli\n"
        "out = Path(sys.argv[1])\n"
        "atexit.register(lambda: (out / 'hook').write_text('ran'))\n"
        "def main():\n"
        "    threading.Thread(target=lambda: (time.sleep(0.3), (out / 'thread').write_text('done'))).start()\n"
        "    return 3\n"
        "class Teardown:\n"  # noticed only when the interpreter tears its modules down
        "    def __del__(self):\n"
        "        (out / 'teardown').write_text('ran')\n"
        "teardown = Teardown()\n"
        "cli.main = main\n"
        "cli.console()\n"
    )
    run = _python(code, str(tmp_path))
    assert run.returncode == 3, run.stderr
    assert (tmp_path / "thread").read_text() == "done" and (tmp_path / "hook").read_text() == "ran"
    assert (tmp_path / "teardown").is_file()  # the ordinary exit, which waited for the thread
    (tmp_path / "hook").unlink()
    (tmp_path / "teardown").unlink()
    daemon = "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()"  # as tqdm's monitor
    started = time.perf_counter()
    quick = _python(code.replace(code.split("\n")[6].strip(), daemon), str(tmp_path))
    assert quick.returncode == 3 and (tmp_path / "hook").read_text() == "ran"
    assert time.perf_counter() - started < 30  # a daemon thread is not waited for
    assert not (tmp_path / "teardown").exists()  # the quick exit: no teardown

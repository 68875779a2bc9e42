"""One writer per run folder, and pre-emption: a second process is refused, a stale lock is
taken over, and SIGTERM or SIGINT ends a run after the step with a checkpoint that resumes
to the uninterrupted run's weights (rlhfkit/training/lock.py, rlhfkit/training/signals.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhfkit.cli import main
from rlhfkit.errors import UserError
from rlhfkit.tracking import read_metrics
from rlhfkit.training import lock
from rlhfkit.training.signals import Interrupted, StopSignals
from tests.conftest import REPO, wait_until, weights, write_rl_files


@pytest.fixture
def rl_files(tmp_path):
    return write_rl_files(tmp_path, ["apple river", "stone cloud paper", "green quiet", "table light music"])


def grpo(tiny_lm, rl_files, out, steps: int) -> list[str]:
    prompts, rewards = rl_files
    return [
        *("rl", "--algo", "grpo", "--policy", str(tiny_lm), "--reward", f"{rewards}:share_lower"),
        *("--prompts", str(prompts), "--output", str(out), "--max-steps", str(steps)),
        *("--batch-size", "2", "--samples-per-prompt", "2", "--mini-batch-size", "4", "--max-new-tokens", "4"),
        *("--save-every", "100", "--log-every", "1", "--sample-every", "0", "--no-progress", "--report-to", "none"),
        *("--cpu", "--threads", "1", "--cpu-matmul", "torch"),
    ]


def start(argv: list[str], tmp_path, name: str) -> tuple[subprocess.Popen, object]:
    """``python -m rlhfkit.cli ARGV`` in a process of its own; its stderr goes to a file (a
    pipe nobody reads would fill and stall it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    err = open(tmp_path / f"{name}.err", "w+")  # noqa: SIM115 (closed by the test)
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhfkit.cli", *argv], env=env, stdout=subprocess.DEVNULL, stderr=err, text=True
    )
    return proc, err


def finish(proc: subprocess.Popen, err) -> tuple[int, str]:
    code = proc.wait(timeout=120)
    err.seek(0)
    text = err.read()
    err.close()
    return code, text


def logged_steps(out) -> list[int]:
    path = out / "metrics.jsonl"
    return [r["step"] for r in read_metrics(path)] if path.is_file() else []


def dead_pid() -> int:
    """The PID of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(folder, **holder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / lock.LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "started": 1.0, **holder}))


# ----------------------------------------------------------------------- two writers
def test_a_second_writer_is_refused_with_exit_2_before_it_writes(tiny_lm, rl_files, tmp_path, capsys):
    out = tmp_path / "run"
    first, err = start(grpo(tiny_lm, rl_files, out, 100000), tmp_path, "first")
    try:
        wait_until(lambda: logged_steps(out), timeout=120, what="the first run's first update")
        for extra in ([], ["--resume"]):  # started twice, or --resume while the first trains
            assert main(grpo(tiny_lm, rl_files, out, 100000) + extra) == 2
            message = capsys.readouterr().err
            assert f"{out} is in use by PID {first.pid} on {socket.gethostname()} (started at " in message
            assert "wait for it to finish or stop it, or choose another --output" in message
            assert "Traceback" not in message
        n = len(logged_steps(out))
        wait_until(lambda: len(logged_steps(out)) > n + 1, timeout=60, what="the first run to go on training")
    finally:
        first.kill()
        finish(first, err)
    steps = logged_steps(out)
    assert steps == list(range(1, len(steps) + 1))  # one writer: no step twice
    # killed: the kernel dropped its flock, the file still names it; the next run takes it over
    assert lock.check(out) is None and json.loads((out / lock.LOCK_FILE).read_text())["pid"] == first.pid


def test_a_stale_lock_is_taken_over_with_a_warning(tiny_lm, rl_files, tmp_path, caplog):
    out = tmp_path / "run"
    gone = dead_pid()
    write_lock(out, pid=gone, command="rlhfkit rl ...")
    assert main(grpo(tiny_lm, rl_files, out, 1)) == 0
    assert f"taking over the lock of PID {gone} on {socket.gethostname()}, which is no longer running" in caplog.text
    assert not (out / lock.LOCK_FILE).exists()  # released at the end


def test_a_reused_pid_is_stale_and_another_hosts_lock_is_refused_with_how_to_remove_it(
    tiny_lm, rl_files, tmp_path, caplog, capsys
):
    mine = tmp_path / "reused"
    write_lock(mine, pid=os.getpid())  # this process, but started at another time: the PID was reused
    held = lock.RunLock.take(mine)
    assert "its PID now belongs to another process" in caplog.text
    assert json.loads((mine / lock.LOCK_FILE).read_text())["pid"] == os.getpid()
    held.release()
    assert not (mine / lock.LOCK_FILE).exists()

    other = tmp_path / "other"
    write_lock(other, pid=4242, host="gpu-node-7", started=1.7e9)
    message = lock.check(other)
    assert message is not None and "is in use by PID 4242 on gpu-node-7 (started at " in message
    assert "another machine, so rlhfkit cannot check that the process is still running" in message
    assert message.endswith(f"if you know it has ended, delete {other / lock.LOCK_FILE}")
    with pytest.raises(UserError) as e:
        lock.RunLock.take(other)
    assert str(e.value) == message
    assert main(grpo(tiny_lm, rl_files, other, 1)) == 2 and message in capsys.readouterr().err


def test_a_run_of_this_process_that_raised_hands_its_lock_to_the_next(tmp_path):
    held = lock.RunLock.take(tmp_path / "run")  # never released: its run raised
    again = lock.RunLock.take(tmp_path / "run")
    assert held.fd == -1 and again.fd >= 0
    lock.release_all()
    assert not (tmp_path / "run" / lock.LOCK_FILE).exists()


# ----------------------------------------------------------------------- pre-emption
def test_sigterm_writes_a_checkpoint_and_resumes_to_the_uninterrupted_weights(tiny_lm, rl_files, tmp_path, capsys):
    out, full, steps = tmp_path / "stopped", tmp_path / "full", 12
    proc, err = start(grpo(tiny_lm, rl_files, out, steps), tmp_path, "sigterm")
    wait_until(lambda: logged_steps(out) or proc.poll() is not None, timeout=120, what="the first update")
    proc.send_signal(signal.SIGTERM)
    code, text = finish(proc, err)
    assert code == 143, text[-3000:]
    stopped = re.search(
        r"rlhfkit rl: stopped by SIGTERM at step (\d+); checkpoint written \(.*\); continue with --resume", text
    )
    assert stopped, text[-3000:]
    k = int(stopped.group(1))
    assert 1 <= k < steps
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == k  # --save-every 100
    assert not (out / "final").exists() and not (out / lock.LOCK_FILE).exists()

    assert main(grpo(tiny_lm, rl_files, out, steps) + ["--resume"]) == 0
    assert main(grpo(tiny_lm, rl_files, full, steps)) == 0
    capsys.readouterr()
    a, b = weights(full / "final"), weights(out / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_sigint_stops_rm_train_after_the_step_with_exit_130(tiny_lm, separable_tsv, tmp_path):
    out = tmp_path / "rm"
    argv = [
        *("rm", "train", "--model", str(tiny_lm), "--train", str(separable_tsv), "--output", str(out)),
        *("--n-train", "90", "--max-steps", "100000", "--batch-size", "8", "--save-every", "100000"),
        *("--eval-every", "100000", "--log-every", "1", "--no-progress", "--report-to", "none", "--cpu"),
        *("--threads", "1"),
    ]
    proc, err = start(argv, tmp_path, "sigint")
    wait_until(lambda: logged_steps(out), timeout=120, what="the first step")
    proc.send_signal(signal.SIGINT)
    code, text = finish(proc, err)
    assert code == 130, text[-3000:]
    stopped = re.search(r"rlhfkit rm: stopped by SIGINT at step (\d+); checkpoint written", text)
    assert stopped and "Traceback" not in text, text[-3000:]
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == int(stopped.group(1))


def test_a_second_signal_or_one_before_the_run_began_stops_at_once():
    handlers = StopSignals(lambda: "the last checkpoint is intact")
    previous = signal.getsignal(signal.SIGTERM)
    previous_int = signal.getsignal(signal.SIGINT)  # SIG_IGN in a shell's background job, else Python's handler
    handlers.install()
    try:
        with pytest.raises(Interrupted, match="stopped by SIGTERM before training began") as e:
            signal.raise_signal(signal.SIGTERM)  # before Run.begin: nothing to save
        assert e.value.exit_code == 143 and signal.getsignal(signal.SIGTERM) is previous
        handlers.install()
        handlers.deferred = True
        signal.raise_signal(signal.SIGINT)  # the first: noted, the step goes on
        assert handlers.received == signal.SIGINT
        with pytest.raises(Interrupted, match="stopped by SIGINT at once") as e:
            signal.raise_signal(signal.SIGINT)
        assert e.value.exit_code == 130
    finally:
        handlers.restore()
    assert signal.getsignal(signal.SIGTERM) is previous and signal.getsignal(signal.SIGINT) is previous_int


def test_under_ddp_a_sigterm_to_one_process_stops_both_at_the_same_step(tiny_lm, rl_files, tmp_path):
    """The flag is agreed over processes: rank 1 alone gets the signal, rank 0 stops with it."""
    import shutil

    import psutil

    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    out = tmp_path / "ddp"
    launcher = [
        *(accelerate, "launch", "--multi_gpu", "--num_machines", "1", "--mixed_precision", "no"),
        *("--dynamo_backend", "no", "--num_processes", "2", "--main_process_port", "0", "-m", "rlhfkit.cli"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    with open(tmp_path / "ddp.err", "w+") as err:
        proc = subprocess.Popen(
            [*launcher, *grpo(tiny_lm, rl_files, out, 100000)], env=env, stdout=subprocess.DEVNULL, stderr=err
        )
        try:
            wait_until(lambda: logged_steps(out), timeout=180, what="the first DDP update")
            workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "rlhfkit.cli" in p.cmdline()]
            rank1 = [p for p in workers if p.environ().get("RANK") == "1"]
            assert len(rank1) == 1, [(p.pid, p.cmdline()) for p in workers]
            rank1[0].send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                for p in psutil.Process(proc.pid).children(recursive=True):
                    p.kill()
                proc.kill()
                proc.wait()
        err.seek(0)
        text = err.read()
    stops = re.findall(r"rlhfkit rl: stopped by SIGTERM at step (\d+); checkpoint written", text)
    assert len(stops) == 2 and stops[0] == stops[1], text[-4000:]  # both processes, the same step
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == int(stops[0])
    assert not (out / lock.LOCK_FILE).exists()
    assert not re.search(r'File ".*/rlhfkit/', text), text[-4000:]  # (torchrun prints its own ChildFailedError)

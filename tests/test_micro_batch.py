"""``rl --micro-batch-size N|auto``: the largest micro-batch that fits (against a brute-force
search over the plan's estimates), the option's values and their errors, and runs that choose it."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from rlhfkit.config import ConfigError, from_dict
from rlhfkit.memory.estimate import GIB, Setup, estimate
from rlhfkit.memory.fit import divisors, largest_micro_batch
from rlhfkit.memory.shapes import KNOWN
from rlhfkit.rl.trainer import RLConfig, train_rl

SMOL = KNOWN["smollm2-135m"]
SETUP = Setup(
    algo="grpo", device="cuda", bf16=True, batch_size=16, samples_per_prompt=8, mini_batch_size=32, new_tokens=512
)


def test_divisors_brute_force():
    for n in range(1, 50):
        assert divisors(n) == [d for d in reversed(range(1, n + 1)) if n % d == 0]


def _peaks(setup: Setup) -> dict[int, float]:
    """Brute force: the plan's peak for every micro-batch size that divides the minibatch."""
    m = setup.mini_batch_size
    return {r: estimate(replace(setup, grad_accum=m // r), SMOL, "ddp").peak for r in range(1, m + 1) if m % r == 0}


def test_the_largest_fitting_micro_batch_is_the_brute_force_one():
    peaks = _peaks(SETUP)
    assert peaks[32] > peaks[1]  # the knob matters at this shape: activations and logits grow with the rows
    for budget in sorted({*peaks.values()}) + [(peaks[4] + peaks[8]) / 2, peaks[32] * 2]:
        want = max(r for r, p in peaks.items() if p <= budget)
        choice = largest_micro_batch(SETUP, SMOL, "ddp", budget)
        assert (choice.rows, choice.grad_accum, choice.fits) == (want, 32 // want, True)
        assert choice.peak == peaks[want] and choice.tried[0] == (32, peaks[32])
    none = largest_micro_batch(SETUP, SMOL, "ddp", peaks[1] / 2)
    assert (none.rows, none.grad_accum, none.fits, none.peak) == (1, 32, False, peaks[1])
    assert [r for r, _ in none.tried] == divisors(32)


def test_cpu_processes_share_the_machine():
    cpu = replace(SETUP, device="cpu", bf16=False, gpus=2)
    one = largest_micro_batch(replace(cpu, gpus=1), SMOL, "ddp", 1e15)
    two = largest_micro_batch(cpu, SMOL, "ddp", 1e15)
    assert two.peak == pytest.approx(2 * estimate(cpu, SMOL, "ddp").peak) and one.rows == two.rows == 32


def _cfg(**kw) -> RLConfig:
    base = dict(policy="p", reward="m:f", prompts="x", output="o", algo="grpo", batch_size=2, samples_per_prompt=4)
    return from_dict(RLConfig, {**base, **kw})


def test_a_number_sets_grad_accum_and_bad_values_say_what_to_give():
    assert _cfg(mini_batch_size=8, micro_batch_size=2).grad_accum == 4
    assert _cfg(mini_batch_size=8, micro_batch_size="8").grad_accum == 1
    assert _cfg(mini_batch_size=8, micro_batch_size=2, grad_accum=4).grad_accum == 4  # the same thing twice
    assert _cfg(micro_batch_size="AUTO").micro_batch_size == "auto"
    bad = [
        (dict(micro_batch_size="abc"), r"--micro-batch-size abc: give a number of rows \(e.g. 4\) or auto"),
        (dict(micro_batch_size=0), "--micro-batch-size 0: give a number of rows"),
        (dict(mini_batch_size=8, micro_batch_size=3), r"--micro-batch-size 3 must divide --mini-batch-size \(8\)"),
        (dict(mini_batch_size=8, micro_batch_size=4, grad_accum=4), "means --grad-accum 2, and --grad-accum 4 was"),
        (dict(micro_batch_size="auto", grad_accum=2), "--micro-batch-size auto chooses --grad-accum itself"),
    ]
    for kw, match in bad:
        with pytest.raises(ConfigError, match=match):
            _cfg(**kw)


def _run(tiny_lm, tmp_path, name: str, **kw) -> dict:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(["red apple", "a quiet river", "green stone", "north light"]) + "\n")
    rewards = tmp_path / "rewards.py"
    rewards.write_text(
        "def lower(prompts, responses):\n    return [sum(c.islower() for c in r) / 8 for r in responses]\n"
    )
    cfg = dict(
        policy=str(tiny_lm),
        reward=f"{rewards}:lower",
        prompts=str(prompts),
        output=str(tmp_path / name),
        algo="grpo",
        max_steps=2,
        batch_size=2,
        samples_per_prompt=4,
        mini_batch_size=8,
        max_new_tokens=6,
        lr=1e-2,
        sample_every=0,
        progress=False,
        report_to="none",
        save_every=1000,
        cpu_matmul="torch",
    )
    return train_rl(from_dict(RLConfig, {**cfg, **kw}))


def test_auto_takes_the_whole_minibatch_when_it_fits(tiny_lm, tmp_path, capsys):
    _run(tiny_lm, tmp_path, "auto", micro_batch_size="auto")
    out = capsys.readouterr().out
    assert "--micro-batch-size auto: 8 rows (--grad-accum 1); plan: peak" in out
    assert "GiB by rows tried: 8: " in out
    assert "--micro-batch-size auto: 8 rows" in (tmp_path / "auto" / "run.log").read_text()


def test_auto_under_a_small_budget_splits_the_minibatch_and_trains_as_that_split_does(
    tiny_lm, tmp_path, capsys, monkeypatch
):
    """The budget (free memory, here held at a value between the plan's peaks for 2 and 4 rows)
    decides the split; the run then equals one given that --grad-accum by hand."""
    from safetensors.torch import load_file

    import rlhfkit.rl.micro_batch as mb
    from rlhfkit.memory.shapes import resolve_shape

    setups = {}
    real = mb.largest_micro_batch

    def spy(setup, policy, config, budget, reward=None):
        setups["setup"], setups["policy"] = setup, policy
        return real(setup, policy, config, budget, reward)

    monkeypatch.setattr(mb, "largest_micro_batch", spy)
    _run(tiny_lm, tmp_path, "probe", micro_batch_size="auto", max_steps=1)
    setup, policy = setups["setup"], setups["policy"]
    assert policy == resolve_shape(str(tiny_lm)) and setup.prompt_length > 0 and setup.device == "cpu"
    peaks = {r: estimate(replace(setup, grad_accum=8 // r), policy, "ddp").peak for r in (1, 2, 4, 8)}
    assert peaks[1] <= peaks[2] < peaks[4] < peaks[8]  # fewer rows than the rollout's: its phase is the peak
    # the budget is MARGIN x (free memory + what the loaded models hold): hold it between 2 and 4 rows' peaks
    monkeypatch.setattr(mb, "held_bytes", lambda *modules: 0.0)
    monkeypatch.setattr(mb, "free_bytes", lambda device: (peaks[2] + peaks[4]) / 2 / mb.MARGIN)
    capsys.readouterr()
    _run(tiny_lm, tmp_path, "auto", micro_batch_size="auto")
    assert "--micro-batch-size auto: 2 rows (--grad-accum 4)" in capsys.readouterr().out
    _run(tiny_lm, tmp_path, "by-hand", grad_accum=4)
    a = load_file(str(tmp_path / "auto" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "by-hand" / "final" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_free_bytes_reads_the_machines_available_memory():
    import psutil

    from rlhfkit.rl.micro_batch import free_bytes, held_bytes

    free = free_bytes(torch.device("cpu"))
    assert 0.5 < free / psutil.virtual_memory().available < 2 and free > 0.1 * GIB
    lin = torch.nn.Linear(4, 3)
    assert held_bytes(lin, None, lin, "not a module") == (4 * 3 + 3) * 4


def test_reading_a_folders_shape_leaves_the_random_state_alone(tiny_lm):
    """auto reads the shapes inside a seeded run: it must not move the sampling's random stream."""
    from rlhfkit.memory.shapes import resolve_shape

    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    resolve_shape(str(tiny_lm))
    assert torch.equal(torch.rand(3), want)


# Each rank reads a different free memory (rank 1: almost none); the main process's choice must hold on both.
DDP_PROBE = """
import sys
import rlhfkit.rl.micro_batch as mb
import rlhfkit.rl.trainer as T
from rlhfkit.cli import main

mb.free_bytes = lambda device: 1e12 if T_rank() == 0 else 1.0
def T_rank():
    import torch.distributed as dist
    return dist.get_rank()
real = T.optimise
def probe(cfg, run, *a, **k):
    with open(f"{cfg.output}.rank{run.rank}", "a") as f:
        f.write(f"{cfg.grad_accum}\\n")
    return real(cfg, run, *a, **k)
T.optimise = probe
sys.exit(main(["rl", *sys.argv[1:]]))
"""


@pytest.mark.slow  # two processes
def test_under_ddp_every_process_takes_the_main_processs_choice(tiny_lm, tmp_path):
    from tests.conftest import launch

    prompts, rewards, probe = tmp_path / "p.txt", tmp_path / "r.py", tmp_path / "probe.py"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(8)))
    rewards.write_text("def n(prompts, responses):\n    return [len(r) / 8 for r in responses]\n")
    probe.write_text(DDP_PROBE)
    out = tmp_path / "run"
    argv = [probe, "--algo", "grpo", "--policy", tiny_lm, "--reward", f"{rewards}:n", "--prompts", prompts]
    argv += ["--output", out, "--max-steps", "1", "--batch-size", "2", "--samples-per-prompt", "4"]
    argv += ["--mini-batch-size", "8", "--max-new-tokens", "4", "--micro-batch-size", "auto", "--cpu"]
    res = launch([*argv, "--sample-every", "0", "--no-progress", "--report-to", "none"], timeout=300)
    assert "DDP (2 processes" in res.stderr
    assert "--micro-batch-size auto: 8 rows (--grad-accum 1)" in res.stdout
    assert [(tmp_path / f"run.rank{r}").read_text().split() for r in (0, 1)] == [["1"], ["1"]]

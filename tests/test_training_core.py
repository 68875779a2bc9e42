"""The training core every trainer uses: one step with its finite checks, the cadence,
checkpoints that survive a crash at any moment, and the shared config pieces."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from rlhfkit.checkpoint import STATE_FILE, find_checkpoint
from rlhfkit.config import ConfigError, from_dict, opt, parse_args
from rlhfkit.errors import RunStopped, UserError
from rlhfkit.training.cadence import Cadence, MetricsWindow
from rlhfkit.training.options import LoraOptions, OptimOptions, RunOptions
from rlhfkit.training.run import Run, TrainState, improved
from rlhfkit.training.step import check_finite, skips_on_device, train_step


@dataclass(kw_only=True)
class Demo(RunOptions, OptimOptions, LoraOptions):
    """A trainer's config built from the shared pieces."""

    batch_size: int = opt(8, "rows per step", ge=1)
    policy: str = opt("p", "the model", was=("model",))


def run_for(tmp_path) -> Run:
    return Run(Demo(output=str(tmp_path / "out")), "demo", Accelerator(cpu=True), None)


# ------------------------------------------------------------------------- the step
def test_train_step_accumulates_the_same_gradient_as_one_batch(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randn(8)
    one, four = nn.Linear(3, 1), nn.Linear(3, 1)
    four.load_state_dict(one.state_dict())
    run = run_for(tmp_path)

    def loss_fn(model, rows):
        loss = ((model(x[rows]).squeeze(-1) - y[rows]) ** 2).sum() / 8  # each micro-batch's share of the step mean
        return loss, {"rows": len(rows)}

    for model, micro in ((one, [list(range(8))]), (four, [[0, 1], [2, 3], [4, 5], [6, 7]])):
        opt_ = torch.optim.SGD(model.parameters(), lr=0.1)
        norm, stats = train_step(
            run, model, opt_, micro, lambda m, model=model: loss_fn(model, m), max_grad_norm=10.0, where="step 1"
        )
        assert sum(s["rows"] for s in stats) == 8 and torch.isfinite(norm)
    for a, b in zip(one.parameters(), four.parameters()):
        torch.testing.assert_close(a, b)


class _NanGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.mark.parametrize(
    "poison, message",
    [
        (
            lambda loss: loss * float("nan"),
            r"non-finite loss \(nan\) at step 3, micro-batch 1, rows \[2\]\. Nothing was saved",
        ),
        (_NanGradient.apply, r"non-finite gradient norm at step 3 with a finite loss\. Nothing was saved"),
    ],
)
def test_a_non_finite_loss_or_gradient_stops_before_the_weights_change(tmp_path, poison, message):
    model = nn.Linear(3, 1)
    before = [p.detach().clone() for p in model.parameters()]
    opt_ = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 3)

    def loss_fn(rows):
        loss = model(x[rows]).sum()
        return (poison(loss) if rows == [2] else loss), {}

    with pytest.raises(
        RunStopped, match=message + r".*no checkpoint had been written yet \(the first comes at step 100\)\. Lower --lr"
    ):
        train_step(
            run_for(tmp_path),
            model,
            opt_,
            [[0, 1], [2]],
            loss_fn,
            max_grad_norm=1.0,
            where="step 3",
            describe=lambda rows: f"rows {rows}",
        )
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)


class _NoHostReads(torch.overrides.TorchFunctionMode):
    """Fails on any read of a tensor's value by the host (what makes a GPU wait)."""

    READS = {
        torch.Tensor.item,
        torch.Tensor.tolist,
        torch.Tensor.__bool__,
        torch.Tensor.__float__,
        torch.Tensor.__int__,
    }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            raise AssertionError(f"host read inside the step: {func.__name__}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "poison, message",
    [
        (lambda loss: loss * float("nan"), r"non-finite loss \(nan\) at step 3, micro-batch 1, rows \[2\]\. "),
        (_NanGradient.apply, r"non-finite gradient norm at step 3 with a finite loss\. "),
    ],
)
def test_with_fused_adamw_a_bad_step_is_skipped_on_the_device_and_stops_the_run_at_the_check(tmp_path, poison, message):
    """No host read inside the step; the fused optimizer leaves weights, moments and step count
    as they were; the next good step trains; the check names the bad step and what came after."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt_ = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    run = run_for(tmp_path)
    x = torch.randn(4, 3)

    def step(where, poisoned):
        def loss_fn(rows):
            loss = model(x[rows]).sum()
            return (poison(loss) if poisoned and rows == [2] else loss), {}

        with _NoHostReads():
            train_step(
                run, model, opt_, [[0, 1], [2]], loss_fn, max_grad_norm=1.0, where=where, describe=lambda r: f"rows {r}"
            )

    step("step 1", False)
    check_finite(run)  # all good: nothing raised, nothing pending
    assert run.pending_checks == []
    before = [p.detach().clone() for p in model.parameters()]
    moments = [opt_.state[p]["exp_avg"].clone() for p in model.parameters()]
    step("step 3", True)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # skipped on the device
    assert all(torch.equal(m, opt_.state[p]["exp_avg"]) for m, p in zip(moments, model.parameters()))
    assert all(opt_.state[p]["step"].item() == 1 for p in model.parameters())
    step("step 4", False)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # a good step trains
    with pytest.raises(
        RunStopped,
        match=message
        + r"The optimizer skipped that step \(the weights never held it\); 1 of the 1 step\(s\) after it trained "
        r"before this check read it\. Nothing was saved from this step on; no checkpoint had been written yet",
    ):
        check_finite(run)
    assert run.pending_checks == []


def test_without_clipping_the_fused_step_still_checks_the_gradient(tmp_path):
    model = nn.Linear(3, 1)
    opt_ = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    run = run_for(tmp_path)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(2, 3)
    train_step(
        run, model, opt_, [None], lambda _: (_NanGradient.apply(model(x).sum()), {}), max_grad_norm=0, where="step 1"
    )
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(
        RunStopped, match=r"non-finite gradient norm at step 1 with a finite loss\. The optimizer skipped"
    ):
        check_finite(run)


def test_other_optimizers_and_fp16_scaling_check_inside_the_step():
    model = nn.Linear(2, 1)
    acc = Accelerator(cpu=True)
    assert skips_on_device(torch.optim.AdamW(model.parameters(), fused=True), acc)
    assert not skips_on_device(torch.optim.AdamW(model.parameters(), fused=False), acc)
    assert not skips_on_device(torch.optim.SGD(model.parameters(), lr=0.1), acc)
    acc.scaler = object()  # fp16: the grad scaler sets found_inf itself
    assert not skips_on_device(torch.optim.AdamW(model.parameters(), fused=True), acc)


def test_clip_groups_are_clipped_each_on_its_own_norm(tmp_path):
    a, b = nn.Linear(2, 1, bias=False), nn.Linear(2, 1, bias=False)
    x = torch.ones(1, 2)
    opt_ = torch.optim.SGD([*a.parameters(), *b.parameters()], lr=1.0)
    before = [p.detach().clone() for p in (a.weight, b.weight)]
    loss_fn = lambda m: ((a(x) * 100 + b(x) * 0.01).sum(), {})  # noqa: E731
    norm, _ = train_step(
        run_for(tmp_path),
        [a, b],
        opt_,
        [None],
        loss_fn,
        max_grad_norm=1.0,
        where="s",
        clip_groups=[list(a.parameters()), list(b.parameters())],
    )
    assert norm.item() == pytest.approx(100 * 2**0.5, rel=1e-5)  # the largest group norm is reported
    assert (before[0] - a.weight).norm().item() == pytest.approx(1.0, rel=1e-5)  # clipped to 1
    assert (before[1] - b.weight).norm().item() == pytest.approx(0.01 * 2**0.5, rel=1e-5)  # untouched: already small


# ---------------------------------------------------------------------- the cadence
def test_cadence_logs_evaluates_and_saves_on_multiples_but_leaves_the_last_step_to_the_finish():
    c = Cadence(total=10, log_every=3, save_every=4, eval_every=5, stop_after=None)
    assert [s for s in range(1, 11) if c.log(s)] == [3, 6, 9, 10]
    assert [s for s in range(1, 11) if c.eval(s)] == [5]
    assert [s for s in range(1, 11) if c.save(s)] == [4, 8]
    stopped = Cadence(total=10, log_every=3, save_every=4, stop_after=8)
    assert stopped.stop_at == 8 and not stopped.save(8) and stopped.log(8)
    assert Cadence(total=5, log_every=1, save_every=1, stop_after=50).stop_at == 5


def test_metrics_window_sums_between_flushes(tmp_path):
    acc = Accelerator(cpu=True)
    w = MetricsWindow()
    w.add(loss=torch.tensor(2.0), n=3)
    w.add(loss=1.5, n=1)
    sums, seconds = w.flush(acc)
    assert sums == {"loss": 3.5, "n": 4.0} and seconds > 0
    assert w.flush(acc)[0] == {}


def test_improved_keeps_the_best_in_either_direction():
    s = TrainState(step=1)
    assert improved(s, 0.5, higher_is_better=True) and s.best_metric == 0.5 and s.best_step == 1
    s.step = 2
    assert not improved(s, 0.4, higher_is_better=True) and s.best_step == 1
    s = TrainState(step=3)
    assert improved(s, 2.0, higher_is_better=False) and not improved(s, 2.5, higher_is_better=False)


# ---------------------------------------------------------------------- checkpoints
def _checkpoint(folder, step, complete=True):
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_text("x")
    if complete:
        (folder / STATE_FILE).write_text(json.dumps({"step": step}))


def test_find_checkpoint_takes_the_newest_complete_one(tmp_path):
    assert find_checkpoint(tmp_path) is None
    _checkpoint(tmp_path / "checkpoint.old", 4, complete=False)  # half deleted: its state file went first
    _checkpoint(tmp_path / "checkpoint.tmp", 6)  # written, not yet swapped in (a crash in between)
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint.tmp"
    _checkpoint(tmp_path / "checkpoint", 4)
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint.tmp"  # newer than the swapped-in one
    (tmp_path / "checkpoint.tmp" / STATE_FILE).unlink()
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoint"


def test_resume_uses_a_complete_tmp_beside_an_incomplete_old(tiny_lm, separable_tsv, tmp_path):
    """The crash the issue describes: the swap stopped after moving 'checkpoint' aside."""
    import shutil

    from rlhfkit.rm.train import RMTrainConfig, train_reward_model

    common = dict(
        model=str(tiny_lm),
        train=str(separable_tsv),
        n_train=90,
        max_steps=6,
        batch_size=8,
        save_every=2,
        progress=False,
        report_to="none",
        eval_every=1000,
    )
    full = tmp_path / "full"
    train_reward_model(from_dict(RMTrainConfig, {**common, "output": str(full)}))
    out = tmp_path / "crashed"
    train_reward_model(from_dict(RMTrainConfig, {**common, "output": str(out), "stop_after_steps": 4}))
    shutil.copytree(out / "checkpoint", out / "checkpoint.tmp")
    (out / "checkpoint").rename(out / "checkpoint.old")
    (out / "checkpoint.old" / "model.safetensors").unlink()  # and the old one was half removed...
    (out / "checkpoint.old" / STATE_FILE).unlink()  # ...state file first, as discard_dir does
    train_reward_model(from_dict(RMTrainConfig, {**common, "output": str(out), "resume": True}))
    from safetensors.torch import load_file

    a, b = load_file(str(full / "final" / "model.safetensors")), load_file(str(out / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


# ----------------------------------------------------------------- shared config pieces
@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(lr=0), r"option --lr must be > 0, got 0"),
        (dict(warmup_ratio=1.0), r"option --warmup-ratio must be < 1, got 1.0"),
        (dict(max_grad_norm=-1), r"option --max-grad-norm must be >= 0"),
        (dict(grad_accum=0), r"option --grad-accum must be >= 1"),
        (dict(stop_after_steps=0), r"option --stop-after-steps must be >= 1, got 0"),
        (dict(save_every=0), r"option --save-every must be >= 1"),
        (dict(lora_r=0), r"option --lora-r must be >= 1"),
        (dict(lora_dropout=1.0), r"option --lora-dropout must be < 1"),
        (dict(mixed_precision="fp8"), r"option --mixed-precision got 'fp8'; choose one of auto, no, bf16, fp16"),
        (dict(lr=float("nan")), r"option --lr must be a finite number"),
        (dict(batch_size=2.5), r"option --batch-size expects int, got 2.5"),
    ],
)
def test_shared_options_are_checked_once_for_every_trainer(bad, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        from_dict(Demo, {"output": str(tmp_path / "o"), **bad})


def test_required_renamed_and_ignored_options(tmp_path, caplog):
    with pytest.raises(ConfigError, match=r"option --output is required \(run folder"):
        from_dict(Demo, {})
    with caplog.at_level("WARNING"):
        cfg = parse_args(Demo, ["--output", str(tmp_path / "o"), "--model", "m", "--lora-r", "4"])
    assert cfg.policy == "m"
    assert "option 'model' is now called 'policy'" in caplog.text
    assert "--lora-r: ignored without --lora" in caplog.text


def test_output_that_is_a_file_or_unwritable_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"--output .*file is a file; give a folder"):
        from_dict(Demo, {"output": str(tmp_path / "file")})
    with pytest.raises(UserError, match=r"is a file, so no folder can be made under it"):
        from_dict(Demo, {"output": str(tmp_path / "file" / "run")})
    with pytest.raises(UserError, match=r"not writable; choose a folder you can write to"):
        from_dict(Demo, {"output": "/sys/rlhfkit-run"})  # read-only for every user, root included


def test_a_bad_value_from_a_yaml_file_is_named_by_its_key(tmp_path):
    """A value the user wrote in a YAML file is named as written there; a flag by its flag,
    also when both are given (the flag wins)."""
    config = tmp_path / "run.yaml"
    config.write_text(f"output: {tmp_path / 'o'}\nwarmup_ratio: 1.5\n")
    with pytest.raises(ConfigError, match=r"run.yaml: warmup_ratio must be < 1, got 1.5$"):
        parse_args(Demo, ["--config", str(config)])
    with pytest.raises(ConfigError, match=r"run.yaml: option --warmup-ratio must be < 1, got 2.0$"):
        parse_args(Demo, ["--config", str(config), "--warmup-ratio", "2"])
    config.write_text(f"output: {tmp_path / 'o'}\nmixed_precision: fp8\n")
    with pytest.raises(ConfigError, match=r"run.yaml: mixed_precision got 'fp8'; choose one of"):
        parse_args(Demo, ["--config", str(config)])


def test_metrics_written_by_earlier_versions_read_under_todays_names(tmp_path):
    """Online RL logged ``ppo/...`` before it logged ``rl/...``: an old run folder's metrics
    still plot and report, under the new keys, and keep the old ones."""
    from rlhfkit.tracking import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text(
        json.dumps({"step": 1, "ppo/score_mean": 0.5, "ppo/kl": 1.25, "time/update_s": 3.0})
        + "\n"
        + json.dumps({"step": 2, "rl/score_mean": 0.75})
        + "\n"
    )
    old, new = read_metrics(path)
    assert old["rl/score_mean"] == old["ppo/score_mean"] == 0.5 and old["rl/kl"] == 1.25 and "rl/update_s" not in old
    assert new == {"step": 2, "rl/score_mean": 0.75}


def test_a_plain_string_for_a_list_option_in_python_is_one_value(tmp_path):
    """A config built in Python with a string where a list of strings goes holds that one string
    (it held its letters: report_to="none" was refused as 'n,o,n,e', a LoRA target 'q_proj' became
    six one-letter module names)."""
    cfg = Demo(output=str(tmp_path / "o"), report_to="none", lora_target="q_proj")
    assert cfg.report_to == ["none"] and cfg.lora_target == ["q_proj"]
    assert Demo(output=str(tmp_path / "o"), lora_target=["q_proj", "v_proj"]).lora_target == ["q_proj", "v_proj"]
    assert from_dict(Demo, {"output": str(tmp_path / "o"), "lora_target": "q_proj"}).lora_target == ["q_proj"]

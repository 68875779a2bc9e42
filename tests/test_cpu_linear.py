"""oneDNN Linear on the CPU: same numbers as nn.Linear (forward and all three gradients),
same checkpoints, LoRA on top, and the fallbacks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rlhfkit.models import cpu_linear
from rlhfkit.models.cpu_linear import (
    MIN_MACS,
    OneDNNLinear,
    apply_cpu_matmul,
    onednn_available,
    use_onednn_linear,
)

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN")


def x_rows(shape) -> int:
    return int(torch.tensor(shape[:-1]).prod())


def _pair(in_features: int, out_features: int, bias: bool) -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(0)
    ref = nn.Linear(in_features, out_features, bias=bias)
    fast = copy.deepcopy(ref)
    assert use_onednn_linear(fast) == 1 and type(fast) is OneDNNLinear
    return ref, fast


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(4, 40, 96), (160, 96)])  # 3-D (batch, tokens, features) and 2-D
def test_forward_and_gradients_match_nn_linear_against_float64(shape, bias):
    ref, fast = _pair(96, 200, bias)
    assert x_rows(shape) * 96 * 200 >= MIN_MACS  # big enough to take the oneDNN path
    x = torch.randn(*shape)
    outs = {}
    for name, layer in (("ref", ref), ("fast", fast)):
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        outs[name] = (y.detach(), xi.grad, layer.weight.grad, layer.bias.grad if bias else None)
    # The exact value, in float64, and both fp32 paths within fp32 rounding of it.
    x64, w64 = x.double().requires_grad_(True), ref.weight.detach().double().requires_grad_(True)
    y64 = x64 @ w64.T + (ref.bias.detach().double() if bias else 0)
    (y64 * torch.linspace(-1, 1, y64.shape[-1], dtype=torch.float64)).sum().backward()
    exact = (y64.detach(), x64.grad, w64.grad)
    for name in ("ref", "fast"):
        for got, want in zip(outs[name][:3], exact):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4 * want.abs().max().item())
    if bias:
        torch.testing.assert_close(outs["fast"][3], outs["ref"][3], rtol=1e-5, atol=1e-5)


@needs_onednn
def test_the_onednn_kernel_is_the_one_that_runs(monkeypatch):
    calls = []
    real = cpu_linear._nt

    def spy(a, b):
        calls.append((tuple(a.shape), tuple(b.shape), a.shape[0] * a.shape[1] * b.shape[0] >= MIN_MACS))
        return real(a, b)

    monkeypatch.setattr(cpu_linear, "_nt", spy)
    _, fast = _pair(128, 256, True)
    x = torch.randn(64, 128, requires_grad=True)
    fast(x).sum().backward()
    # forward, input gradient, weight gradient: all three matmuls, all large enough for oneDNN
    assert calls == [((64, 128), (256, 128), True), ((64, 256), (128, 256), True), ((256, 64), (128, 64), True)]


@needs_onednn
def test_the_output_can_be_modified_in_place_like_any_linear_output():
    """TRL divides a slice of the logits in place; a view made inside a custom Function would refuse."""
    ref, fast = _pair(128, 256, False)
    x = torch.randn(2, 40, 128)
    grads = []
    for layer in (ref, fast):
        y = layer(x)[:, 5:]
        y /= 0.7
        y.sum().backward()
        grads.append(layer.weight.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-4)


def test_fallbacks_are_exactly_nn_linear():
    ref, fast = _pair(8, 16, True)
    x = torch.randn(3, 8)
    assert torch.equal(fast(x), ref(x))  # too small for oneDNN: plain F.linear
    x64 = torch.randn(300, 8, dtype=torch.float64)
    assert torch.equal(fast.double()(x64), ref.double()(x64))  # not fp32
    big_ref, big_fast = _pair(512, 512, False)
    xb = torch.randn(64, 512)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast decides the dtype: nn.Linear's path
        assert torch.equal(big_fast(xb), big_ref(xb))
    empty = torch.randn(0, 512)
    assert big_fast(empty).shape == (0, 512)


@needs_onednn
def test_no_gradient_is_computed_for_frozen_weights_or_inputs(monkeypatch):
    ref, fast = _pair(128, 256, False)
    fast.weight.requires_grad_(False)
    calls = []
    real = cpu_linear._nt
    monkeypatch.setattr(cpu_linear, "_nt", lambda a, b: calls.append(a.shape) or real(a, b))
    x = torch.randn(64, 128, requires_grad=True)
    fast(x).sum().backward()
    assert len(calls) == 2 and fast.weight.grad is None  # forward + input gradient only
    torch.testing.assert_close(x.grad, torch.ones(64, 256) @ ref.weight.detach(), rtol=1e-5, atol=1e-5)


def test_a_model_keeps_its_weights_checkpoints_and_lora(tiny_lm, tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    fast = copy.deepcopy(plain)
    n = use_onednn_linear(fast)
    assert n == sum(type(m) is nn.Linear for m in plain.modules()) > 0
    assert use_onednn_linear(fast) == 0  # idempotent
    ids = torch.randint(3, plain.config.vocab_size, (2, 9))
    torch.testing.assert_close(fast(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
    fast.save_pretrained(tmp_path / "fast")
    plain.save_pretrained(tmp_path / "plain")
    a, b = (
        load_file(str(tmp_path / "fast" / "model.safetensors")),
        load_file(str(tmp_path / "plain" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fast")
    assert not any(isinstance(m, OneDNNLinear) for m in reloaded.modules())  # a plain HF model again
    lora = get_peft_model(fast, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lora(ids).logits.sum().backward()
    assert all(p.grad is not None for n_, p in lora.named_parameters() if p.requires_grad)


def test_apply_cpu_matmul_choices(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path))
    model = nn.Sequential(nn.Linear(64, 64))
    assert apply_cpu_matmul("torch", "cpu", model) is None and type(model[0]) is nn.Linear
    assert apply_cpu_matmul("auto", "cuda", model) is None and apply_cpu_matmul("onednn", "cuda", model) is None
    with pytest.raises(ValueError, match="cpu_matmul must be auto, onednn or torch"):
        apply_cpu_matmul("mkl", "cpu", model)
    forced = apply_cpu_matmul("onednn", "cpu", model)
    assert forced.kernel == "onednn" and forced.source == "forced" and type(model[0]) is OneDNNLinear


def test_onednn_insists_or_says_what_to_do(monkeypatch):
    monkeypatch.setattr(cpu_linear, "onednn_available", lambda: False)
    assert apply_cpu_matmul("auto", "cpu", nn.Linear(4, 4)) is None
    with pytest.raises(RuntimeError, match="no oneDNN.*--cpu-matmul torch"):
        apply_cpu_matmul("onednn", "cpu", nn.Linear(4, 4))


# ----------------------------------------------------- auto: measured, with the timer injected
SHAPES = {(576, 576): 60, (576, 1536): 60, (1536, 576): 30, (576, 49152): 1}


def fake_timer(gflops: dict[str, float], calls: list | None = None):
    """A timer that reports a fixed speed per kernel (seconds = work / speed), recording its calls."""

    def timer(kernel, tokens, k, n):
        if calls is not None:
            calls.append((kernel, tokens, k, n))
        return 3 * 2 * tokens * k * n / (gflops[kernel] * 1e9)

    return timer


@pytest.mark.parametrize(
    "speeds, expected",
    [
        ({"onednn": 240.0, "torch": 105.0}, "onednn"),  # AMD Zen 5, one thread: MKL on its AVX2 path
        ({"onednn": 48.0, "torch": 53.0}, "torch"),  # an AVX2-only EPYC, one thread (the numbers)
        ({"onednn": 119.0, "torch": 79.0}, "onednn"),  # the same machine, two threads
    ],
)
def test_auto_takes_the_kernel_measured_faster_and_reports_both(speeds, expected, tmp_path):
    choice = cpu_linear.choose_cpu_matmul(SHAPES, threads=1, cache_file=tmp_path / "c.json", timer=fake_timer(speeds))
    assert choice.kernel == expected and choice.source == "measured"
    assert choice.onednn_gflops == pytest.approx(speeds["onednn"]) and choice.torch_gflops == pytest.approx(
        speeds["torch"]
    )


def test_auto_is_cached_per_machine_threads_torch_and_model(tmp_path, monkeypatch):
    for cap in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS"):  # start from this machine uncapped, even when
        monkeypatch.delenv(cap, raising=False)  # the suite itself runs under an emulated older CPU
    cache, calls = tmp_path / "c.json", []
    first = cpu_linear.choose_cpu_matmul(
        SHAPES, threads=1, cache_file=cache, timer=fake_timer({"onednn": 2.0, "torch": 1.0}, calls)
    )
    assert first.kernel == "onednn" and len(calls) == 2 * len(SHAPES)
    assert all(
        t * k * n <= max(2**27, 8 * k * n) for _, t, k, n in calls
    )  # an LM head is timed on fewer rows: a second or two
    again = cpu_linear.choose_cpu_matmul(
        SHAPES, threads=1, cache_file=cache, timer=fake_timer({"onednn": 1.0, "torch": 2.0}, calls)
    )
    assert again.source == "cache" and again.kernel == "onednn" and len(calls) == 2 * len(SHAPES)  # not timed again
    for changed in (dict(threads=2), dict(threads=1, shapes={(8, 8): 1})):  # another thread count, another model
        shapes = changed.pop("shapes", SHAPES)
        assert (
            cpu_linear.choose_cpu_matmul(
                shapes, cache_file=cache, timer=fake_timer({"onednn": 1.0, "torch": 2.0}), **changed
            ).source
            == "measured"
        )
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # an emulated older CPU is another machine
    slow = cpu_linear.choose_cpu_matmul(
        SHAPES, threads=1, cache_file=cache, timer=fake_timer({"onednn": 1.0, "torch": 2.0})
    )
    assert slow.source == "measured" and slow.kernel == "torch"
    busy = cpu_linear.choose_cpu_matmul(
        {(4, 4): 1}, threads=1, cache_file=cache, timer=fake_timer({"onednn": 1.0, "torch": 2.0}), cache_ok=False
    )
    assert busy.source == "measured" and "(4, 4)" not in cache.read_text()  # measured on a busy machine: not kept
    calls = []  # ... in the file; this process keeps its decision: a policy and its reference run the same kernel
    same = cpu_linear.choose_cpu_matmul(
        {(4, 4): 1}, threads=1, cache_file=cache, timer=fake_timer({"onednn": 2.0, "torch": 1.0}, calls), cache_ok=False
    )
    assert same.kernel == busy.kernel and not calls


def test_the_real_timer_times_both_kernels_once_per_shape_on_few_rows():
    """How long the measurement takes is benchmarks/cpu_linear_speed.py's business; here: what it runs."""
    shapes = cpu_linear.linear_shapes(nn.Sequential(nn.Linear(576, 1536), nn.Linear(1536, 576), nn.Linear(576, 1536)))
    assert shapes == {(576, 1536): 2, (1536, 576): 1}
    calls = []

    def real_timer(kernel, tokens, k, n):
        calls.append((kernel, tokens, k, n))
        seconds = cpu_linear.time_layer(kernel, tokens, k, n)
        assert seconds > 0, (kernel, tokens, k, n)
        return seconds

    onednn, plain = cpu_linear.measure_kernels(shapes, timer=real_timer)
    assert onednn > 0 and plain > 0
    # each shape once per kernel (not once per layer), on few enough rows that the work it times is bounded
    assert sorted((kernel, k, n) for kernel, _, k, n in calls) == [
        ("onednn", 576, 1536),
        ("onednn", 1536, 576),
        ("torch", 576, 1536),
        ("torch", 1536, 576),
    ]
    assert all(8 <= t and t * k * n <= 2**27 for _, t, k, n in calls), calls


def test_threads_follow_the_flag_then_omp_num_threads_then_the_free_physical_cores():
    from rlhfkit.cpu import choose_threads

    assert choose_threads(3, cores=8, busy=5.0, env_threads="1").threads == 3  # --threads wins
    env = choose_threads(None, cores=8, busy=5.0, env_threads="2")
    assert (env.threads, env.reason) == (2, "OMP_NUM_THREADS")
    assert choose_threads(None, cores=8, busy=0.2, env_threads="").threads == 8  # unset or empty: the cores
    assert choose_threads(None, cores=8, busy=0.2, env_threads="0").threads == 8  # not a positive count: ignored
    assert choose_threads(None, cores=8, busy=0.0, local_processes=2).threads == 4  # shared between processes
    busy = choose_threads(None, cores=2, busy=1.3)
    assert busy.threads == 1 and "busy with other processes" in busy.reason
    assert choose_threads(None, cores=2, busy=3.0).threads == 1  # never fewer than one


def test_physical_cores_counts_hyperthread_siblings_once(monkeypatch):
    from rlhfkit import cpu

    block = "processor\t: {i}\nphysical id\t: 0\ncore id\t\t: {c}\n"
    info = "\n".join(block.format(i=i, c=i // 2) for i in range(4))  # 2 cores, 2 threads each
    monkeypatch.setattr(cpu, "usable_cpus", lambda: 4)
    assert cpu.physical_cores(info) == 2
    monkeypatch.setattr(cpu, "usable_cpus", lambda: 2)  # the affinity mask allows 2 of the 4
    assert cpu.physical_cores(info) == 1

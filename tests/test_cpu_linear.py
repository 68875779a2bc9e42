"""oneDNN Linear on the CPU: same numbers as nn.Linear (forward and all three gradients),
same checkpoints, LoRA on top, and the fallbacks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rlhfkit.models import cpu_linear
from rlhfkit.models.cpu_linear import (
    MIN_MACS, OneDNNLinear, apply_cpu_matmul, onednn_available, resolve_cpu_matmul, use_onednn_linear)

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
    a, b = load_file(str(tmp_path / "fast" / "model.safetensors")), load_file(str(tmp_path / "plain" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fast")
    assert not any(isinstance(m, OneDNNLinear) for m in reloaded.modules())  # a plain HF model again
    lora = get_peft_model(fast, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lora(ids).logits.sum().backward()
    assert all(p.grad is not None for n_, p in lora.named_parameters() if p.requires_grad)


def test_resolve_cpu_matmul():
    assert resolve_cpu_matmul("torch", "cpu") is False
    assert resolve_cpu_matmul("auto", "cuda") is False and resolve_cpu_matmul("onednn", "cuda") is False
    assert resolve_cpu_matmul("auto", "cpu") is onednn_available()
    with pytest.raises(ValueError, match="cpu_matmul must be auto, onednn or torch"):
        resolve_cpu_matmul("mkl", "cpu")
    model = nn.Sequential(nn.Linear(4, 4))
    assert apply_cpu_matmul("torch", "cpu", model) is False and type(model[0]) is nn.Linear
    assert apply_cpu_matmul("auto", "cpu", model, None) is onednn_available()


def test_onednn_insists_or_says_what_to_do(monkeypatch):
    monkeypatch.setattr(cpu_linear, "onednn_available", lambda: False)
    assert resolve_cpu_matmul("auto", "cpu") is False
    with pytest.raises(RuntimeError, match="no oneDNN.*--cpu-matmul torch"):
        resolve_cpu_matmul("onednn", "cpu")

"""fp32 ``nn.Linear`` on the CPU through oneDNN instead of the BLAS PyTorch picks by default.

PyTorch's CPU build sends an fp32 ``nn.Linear`` to MKL's ``sgemm``. On AMD CPUs MKL takes
its AVX2 code path even where the CPU has AVX-512; oneDNN, which ships inside the same
PyTorch build, picks its kernels by instruction set. Measured on this project's AMD EPYC
(Zen 5, one thread, shapes of a 135M-parameter decoder at batch 8 x 63 tokens): MKL
105-115 GFLOP/s, oneDNN 225-260 GFLOP/s, the same fp32 arithmetic (relative error against
float64 8e-7 vs 4e-7; only the summation order differs). Transformer training on a CPU is
almost all matmul, so every forward and backward pass gets about 2x faster.

:func:`use_onednn_linear` swaps the class of a model's ``nn.Linear`` modules to
:class:`OneDNNLinear`: same parameters, same ``state_dict``, same checkpoints (Hugging Face
``save_pretrained`` writes the same files, and peft's LoRA wraps it as any ``nn.Linear``).
Its forward runs the three matmuls of a linear layer (forward, input gradient, weight
gradient) through oneDNN when the tensors are fp32 on the CPU, autocast is off and the
matmul is large enough to pay for oneDNN's per-call overhead; otherwise it is exactly
``nn.Linear``.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = ["OneDNNLinear", "onednn_available", "use_onednn_linear", "resolve_cpu_matmul", "apply_cpu_matmul", "MIN_MACS"]

CpuMatmul = Literal["auto", "onednn", "torch"]

# Below this many multiply-adds oneDNN's call overhead (~10 us) outweighs its faster kernel
# (measured: 64x64x128 is 12 us with MKL and 16 us with oneDNN; 8x576x1536 is 200 vs 130 us).
MIN_MACS = 1 << 20


def onednn_available() -> bool:
    """Whether this PyTorch build has oneDNN's linear kernel."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _nt(a: Tensor, b: Tensor) -> Tensor:
    """``a (T, K) @ b (N, K).T -> (T, N)``, through oneDNN when it is large enough to be faster."""
    if a.shape[0] * a.shape[1] * b.shape[0] < MIN_MACS:
        return F.linear(a, b)
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


class _OneDNNLinearFn(torch.autograd.Function):
    """``y = x W^T + b`` with all three matmuls through :func:`_nt`.

    Shapes: ``x (T, K)``, ``weight (N, K)``, ``bias (N,)`` or None -> ``y (T, N)``. Two-dimensional
    on purpose: reshaping happens outside, so the output is no view made inside a custom
    Function, and callers may modify slices of it in place.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        y = _nt(x, weight)  # (T, N)
        return y + bias if bias is not None else y

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _nt(grad_out, weight.t())  # (T, N) @ (N, K) -> (T, K)
        if ctx.needs_input_grad[1]:
            grad_w = _nt(grad_out.t(), x.t())  # (N, T) @ (T, K) -> (N, K)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(0)  # (N,)
        return grad_x, grad_w, grad_b


class OneDNNLinear(nn.Linear):
    """An ``nn.Linear`` whose fp32 CPU matmuls run through oneDNN (see the module docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        if (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and x.numel() > 0
            and not torch.is_autocast_enabled("cpu")
        ):
            y = _OneDNNLinearFn.apply(x.reshape(-1, x.shape[-1]), self.weight, self.bias)  # (T, N)
            return y.view(*x.shape[:-1], y.shape[-1])
        return F.linear(x, self.weight, self.bias)


def resolve_cpu_matmul(choice: CpuMatmul, device: torch.device | str) -> bool:
    """Whether ``choice`` means oneDNN on this device: ``auto`` = on the CPU where the build
    has oneDNN; ``onednn`` insists (an error if the build lacks it); ``torch`` = off. (Non-fp32
    tensors take ``nn.Linear``'s own path either way.)"""
    if choice not in ("auto", "onednn", "torch"):
        raise ValueError(f"cpu_matmul must be auto, onednn or torch, got {choice!r}")
    if choice == "torch" or torch.device(device).type != "cpu":
        return False
    if not onednn_available():
        if choice == "onednn":
            raise RuntimeError("--cpu-matmul onednn: this PyTorch build has no oneDNN (mkldnn); use --cpu-matmul torch")
        return False
    return True


def use_onednn_linear(model: nn.Module) -> int:
    """Switch every plain ``nn.Linear`` in ``model`` to :class:`OneDNNLinear` in place.

    Parameters, buffers, hooks and ``state_dict`` are untouched (only the class changes), so
    this can be done before or after loading weights, LoRA wrapping or ``accelerate.prepare``.
    Returns how many layers were switched.
    """
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
            n += 1
    return n


def apply_cpu_matmul(choice: CpuMatmul, device, *models: nn.Module | None) -> bool:
    """:func:`use_onednn_linear` on each model when :func:`resolve_cpu_matmul` says so."""
    on = resolve_cpu_matmul(choice, device)
    if on:
        n = sum(use_onednn_linear(m) for m in models if m is not None)
        logger.info("cpu_matmul: %d linear layers run their fp32 matmuls through oneDNN", n)
    return on

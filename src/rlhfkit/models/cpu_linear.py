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

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlhfkit.cpu import busy_cpus, cpu_model
from rlhfkit.models.hub import cache_dir

logger = logging.getLogger(__name__)

__all__ = [
    "OneDNNLinear",
    "onednn_available",
    "use_onednn_linear",
    "KernelChoice",
    "linear_shapes",
    "measure_kernels",
    "choose_cpu_matmul",
    "apply_cpu_matmul",
    "run_cpu_matmul_choices",
    "reuse_cpu_matmul_choices",
    "MIN_MACS",
]

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


@dataclass
class KernelChoice:
    """What ``--cpu-matmul auto`` decided, and the two measurements behind it."""

    kernel: str  # "onednn" | "torch"
    onednn_gflops: float
    torch_gflops: float
    source: str  # "measured" | "cache" | "forced"


Timer = Callable[[str, int, int, int], float]  # (kernel, tokens, in_features, out_features) -> seconds per layer call


def linear_shapes(*models: nn.Module | None) -> dict[tuple[int, int], int]:
    """``{(in_features, out_features): count}`` of the fp32 ``nn.Linear`` layers of ``models``."""
    shapes: dict[tuple[int, int], int] = {}
    for model in models:
        for m in model.modules() if model is not None else ():
            if isinstance(m, nn.Linear) and m.weight.dtype == torch.float32:
                key = (m.in_features, m.out_features)
                shapes[key] = shapes.get(key, 0) + 1
    return shapes


def _tokens_for(k: int, n: int) -> int:
    """Rows to time a (k -> n) layer with: 256, fewer for huge layers (an LM head) to stay within budget."""
    return int(min(256, max(8, 2**27 // (k * n))))


def time_layer(kernel: str, tokens: int, k: int, n: int, repeats: int = 2) -> float:
    """Seconds for one training call of a (k -> n) linear layer on ``tokens`` rows: the forward
    matmul and the two of the backward pass, through ``kernel``; the best of ``repeats``."""
    x, w, g = torch.randn(tokens, k), torch.randn(n, k), torch.randn(tokens, n)
    if kernel == "onednn":
        calls = (lambda: _nt(x, w), lambda: _nt(g, w.t()), lambda: _nt(g.t(), x.t()))
    else:
        calls = (lambda: F.linear(x, w), lambda: g @ w, lambda: g.t() @ x)
    for call in calls:  # warm-up: oneDNN builds and caches a primitive per shape
        call()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for call in calls:
            call()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_kernels(shapes: dict[tuple[int, int], int], timer: Timer = time_layer) -> tuple[float, float]:
    """(oneDNN GFLOP/s, PyTorch GFLOP/s) over a model's layers, each weighted by its share of the
    model's multiply-adds (every layer timed at :func:`_tokens_for` rows, then scaled)."""
    flops = {"onednn": 0.0, "torch": 0.0}
    seconds = {"onednn": 0.0, "torch": 0.0}
    for (k, n), count in shapes.items():
        t = _tokens_for(k, n)
        for kernel in flops:
            flops[kernel] += count * 3 * 2 * t * k * n
            seconds[kernel] += count * timer(kernel, t, k, n)
    return tuple(flops[kk] / max(seconds[kk], 1e-12) / 1e9 for kk in ("onednn", "torch"))  # type: ignore[return-value]


def machine_key(threads: int) -> str:
    """What a kernel measurement depends on: the CPU, oneDNN's instruction-set cap, torch, threads."""
    isa_cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "default")
    return f"{cpu_model()} | ONEDNN_MAX_CPU_ISA={isa_cap} | torch {torch.__version__} | {threads} thread(s)"


_DECIDED: dict[tuple[Path | None, str], KernelChoice] = {}  # this process's measured decisions


def choose_cpu_matmul(
    shapes: dict[tuple[int, int], int],
    *,
    threads: int | None = None,
    cache_file: Path | None = None,
    timer: Timer = time_layer,
    cache_ok: bool = True,
) -> KernelChoice:
    """The faster kernel for these layer shapes on this machine, measured once and cached.

    The cache (``cache_file``, JSON) is keyed by :func:`machine_key` and the shapes, so another
    CPU, thread count, torch version or model measures again. ``cache_ok=False`` (the machine
    was busy while measuring) uses the result without storing it in the file; this process
    still keeps it, so every model it loads with these shapes runs the same kernel (runs
    compared with each other, a policy and its reference copy).
    """
    threads = threads or torch.get_num_threads()
    key = f"{machine_key(threads)} | {sorted(shapes.items())}"
    if (cache_file, key) in _DECIDED:
        return _DECIDED[cache_file, key]
    cache = _read_cache(cache_file) if cache_file is not None and cache_file.is_file() else {}
    if key in cache:
        hit = cache[key]
        if isinstance(hit, dict) and hit.get("kernel") in ("onednn", "torch"):
            return KernelChoice(
                hit["kernel"], hit.get("onednn_gflops", math.nan), hit.get("torch_gflops", math.nan), "cache"
            )
        logger.warning("%s: the entry for this machine and these shapes is damaged; measuring again", cache_file)
    onednn, plain = measure_kernels(shapes, timer)
    choice = KernelChoice("onednn" if onednn > plain else "torch", round(onednn, 1), round(plain, 1), "measured")
    if not (cache_file is not None and cache_ok):
        _DECIDED[cache_file, key] = dataclasses.replace(choice, source="measured earlier in this process")
    if cache_file is not None and cache_ok:
        cache[key] = {
            "kernel": choice.kernel,
            "onednn_gflops": choice.onednn_gflops,
            "torch_gflops": choice.torch_gflops,
        }
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, cache_file)
    return choice


def _read_cache(cache_file: Path) -> dict:
    """The measurements cached in ``cache_file``; a damaged file is measured again (and rewritten), with a warning."""
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        logger.warning("%s is damaged (%s); measuring the kernels again", cache_file, type(e).__name__)
        return {}
    if not isinstance(cache, dict):
        logger.warning("%s is damaged (not a JSON object); measuring the kernels again", cache_file)
        return {}
    return cache


def default_cache_file() -> Path:
    return cache_dir() / "cpu_matmul.json"


# ``--cpu-matmul auto`` in a training run: the kernels chosen (by layer shapes) are saved with
# each checkpoint and reused on --resume, because measuring again can flip the choice on a busy
# machine and the two kernels sum in different orders (a resumed run would then end 1e-4 away
# from the uninterrupted one).
_RUN_CHOICES: dict[str, str] = {}  # shapes -> kernel, the auto choices of the current run
_REUSED: dict[str, str] = {}  # shapes -> kernel, recorded in the checkpoint being resumed


def run_cpu_matmul_choices() -> dict[str, str]:
    """The kernels ``--cpu-matmul auto`` chose in the current run, by layer shapes (saved with a checkpoint)."""
    return dict(_RUN_CHOICES)


def reuse_cpu_matmul_choices(recorded: dict[str, str] | None) -> None:
    """Start a run: forget the previous run's choices, and reuse ``recorded`` (a resumed
    checkpoint's :func:`run_cpu_matmul_choices`) instead of measuring these shapes again."""
    _RUN_CHOICES.clear()
    _REUSED.clear()
    if isinstance(recorded, dict):
        _REUSED.update({str(k): v for k, v in recorded.items() if v in ("onednn", "torch")})


def apply_cpu_matmul(choice: CpuMatmul, device, *models: nn.Module | None) -> KernelChoice | None:
    """Run ``models``' fp32 Linear layers through the kernel ``choice`` names (``auto``: the one
    :func:`choose_cpu_matmul` measures faster on this machine). Returns the decision, or None
    off the CPU or without oneDNN (then nothing changes)."""
    if choice not in ("auto", "onednn", "torch"):
        raise ValueError(f"cpu_matmul must be auto, onednn or torch, got {choice!r}")
    if torch.device(device).type != "cpu" or choice == "torch":
        return None
    if not onednn_available():
        if choice == "onednn":
            raise RuntimeError("--cpu-matmul onednn: this PyTorch build has no oneDNN (mkldnn); use --cpu-matmul torch")
        return None
    if choice == "onednn":
        decision = KernelChoice("onednn", math.nan, math.nan, "forced")
    else:
        shapes = linear_shapes(*models)
        if not shapes:
            return None
        key = str(sorted(shapes.items()))
        if key in _REUSED:
            decision = KernelChoice(_REUSED[key], math.nan, math.nan, "recorded in the checkpoint")
            logger.warning("--cpu-matmul auto: %s (recorded in the checkpoint being resumed)", decision.kernel)
        else:
            decision = choose_cpu_matmul(shapes, cache_file=default_cache_file(), cache_ok=busy_cpus(0.1) < 0.5)
            logger.warning(
                "--cpu-matmul auto: %s (%s: oneDNN %.0f GFLOP/s, PyTorch %.0f GFLOP/s on these layers, %d thread(s))",
                decision.kernel,
                decision.source,
                decision.onednn_gflops,
                decision.torch_gflops,
                torch.get_num_threads(),
            )
        _RUN_CHOICES[key] = decision.kernel
    if decision.kernel == "onednn":
        n = sum(use_onednn_linear(m) for m in models if m is not None)
        logger.info("cpu_matmul: %d linear layers run their fp32 matmuls through oneDNN", n)
    return decision

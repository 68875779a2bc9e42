"""Loading a causal language model (a policy) with its tokenizer, the same way everywhere.

Training (SFT, PPO, DPO), sampling (``generate``, ``bon``, the annotation app) and
evaluation all load a policy through :func:`load_policy`: left padding (a batch of prompts
ends at the same position, so new tokens follow each prompt directly) and a pad token
distinct from EOS (masks built from the pad id must not erase real end tokens).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhfkit.errors import UserError
from rlhfkit.models.hub import resolve_model
from rlhfkit.models.tokenizers import ensure_distinct_pad

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def forward_accepts(model: Any, parameter: str) -> bool:
    """Whether a model's ``forward`` takes ``parameter`` (e.g. ``logits_to_keep``; ``cache``,
    transformers 5's name for ``past_key_values``), looking through DDP and peft wrappers."""
    model = getattr(model, "module", model)  # under DistributedDataParallel
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    return parameter in _forward_parameters(type(base))


@functools.cache
def _forward_parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def inference_dtype(dtype: Any, device: torch.device) -> torch.dtype:
    """``None`` -> fp32 on the CPU, bf16 on CUDA; names like ``"bf16"`` -> the torch dtype."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in _DTYPES:
        raise UserError(f"dtype {dtype!r} is not supported; use one of {', '.join(_DTYPES)}")
    return _DTYPES[str(dtype)]


def load_policy(
    name_or_path: str, *, device: Any = None, dtype: Any = torch.float32, option: str | None = "--policy"
) -> tuple[Any, Any]:
    """``(model, tokenizer)``: eval mode, on ``device`` (default: stay on the CPU), left padding, pad != EOS.

    Training keeps ``dtype`` fp32 (mixed precision comes from autocast); sampling passes
    :func:`inference_dtype`'s choice. ``option``: the flag that named the model, for the
    error about a folder that is not a loadable model.
    """
    path = resolve_model(name_or_path, option)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    ensure_distinct_pad(tokenizer, model)
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer

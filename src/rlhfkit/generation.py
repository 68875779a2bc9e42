"""Load a causal LM for sampling and sample K responses per prompt.

Shared by the annotation server (``rlhfkit annotate``) and the PPO stage (``rlhfkit
generate``/``bon``). Two details matter for everything downstream:

- **Left padding.** A batch of prompts is padded on the left so every sequence's last
  prompt token sits at the same position and new tokens are appended right after it.
- **A pad token distinct from EOS.** Many chat models pad with their end token; masks built
  from ``pad_token_id`` would then erase real end tokens. :func:`load_policy` swaps in a
  separate pad token (``<|endoftext|>`` when the vocabulary has it and it is not EOS).
"""

from __future__ import annotations

import logging
from typing import Any

from rlhfkit.models.hub import resolve_model
from rlhfkit.models.tokenizers import ensure_distinct_pad, eos_token_ids

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
           "fp16": "float16", "float16": "float16"}


def _resolve_dtype(dtype: Any, device: Any) -> Any:
    """``None`` -> fp32 on CPU, bf16 on CUDA; strings like ``"bf16"`` -> ``torch.bfloat16``."""
    import torch

    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(_DTYPES)}")
    return getattr(torch, _DTYPES[str(dtype)])


def ensure_pad_token(model: Any, tokenizer: Any) -> None:
    """Give ``tokenizer`` a pad token that is not EOS (warns when it changes anything)."""
    ensure_distinct_pad(tokenizer, model)


def load_policy(name_or_path: str, device: Any = None, dtype: Any = None, cpu_matmul: str = "auto") -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` for sampling: eval mode, left padding, pad != EOS.

    ``name_or_path`` is an alias (``smollm2-135m``), a local checkpoint folder or a hub id.
    ``device`` defaults to CUDA when available; ``dtype`` to fp32 on CPU and bf16 on CUDA;
    ``cpu_matmul`` as in :func:`rlhfkit.models.cpu_linear.apply_cpu_matmul`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhfkit.models.cpu_linear import apply_cpu_matmul

    path = resolve_model(name_or_path)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _resolve_dtype(dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    ensure_pad_token(model, tokenizer)
    model.to(device).eval()
    apply_cpu_matmul(cpu_matmul, device, model)
    return model, tokenizer


def format_prompt(tokenizer: Any, prompt: str, use_chat_template: bool = True) -> str:
    """The text the model continues: the chat template with a generation prompt, or the raw prompt."""
    if use_chat_template and tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


def sample_responses(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    n: int,
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    use_chat_template: bool = True,
    seed: int | None = None,
    batch_size: int = 16,
) -> list[list[str]]:
    """Sample ``n`` responses for each prompt; ``result[i][j]`` is response j to prompt i.

    Sequences are generated in batches of ``batch_size`` (prompt-major: prompt 0's n
    samples first) with the KV cache, left padding, and stop at EOS. Only the new tokens are
    decoded, without special tokens. ``temperature=0`` is greedy decoding; ``top_k=0`` and
    ``top_p=1`` switch those filters off. With ``seed`` the samples are reproducible and
    the global RNG is left as it was.
    """
    import torch

    if n < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"n, batch_size and max_new_tokens must be >= 1, got {n}, {batch_size}, {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
    if tokenizer.padding_side != "left":
        raise ValueError("sample_responses needs tokenizer.padding_side == 'left'; load the model with load_policy()")
    if use_chat_template and not tokenizer.chat_template:
        logger.warning("the tokenizer has no chat template; sampling from the raw prompts")

    texts = [format_prompt(tokenizer, p, use_chat_template) for p in prompts]
    flat = [t for t in texts for _ in range(n)]  # prompt-major: (P * n,)
    eos_ids = eos_token_ids(model, tokenizer)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k) if temperature > 0 else dict(do_sample=False)
    devices = [model.device] if model.device.type == "cuda" else []
    decoded: list[str] = []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None), torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        for start in range(0, len(flat), batch_size):
            # The chat template already writes BOS where the model wants one.
            enc = tokenizer(
                flat[start:start + batch_size], return_tensors="pt", padding=True,
                add_special_tokens=not (use_chat_template and tokenizer.chat_template),
            ).to(model.device)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_ids,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
                **sampling,
            )
            new_tokens = out[:, enc["input_ids"].shape[1]:]  # (B, T_new)
            for row in new_tokens.tolist():
                cut = next((i for i, t in enumerate(row) if t in eos_ids), len(row))
                decoded.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return [decoded[i * n:(i + 1) * n] for i in range(len(prompts))]

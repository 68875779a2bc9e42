"""Sampling from a policy: the one function every command samples through.

:func:`sample` takes a batch of rendered, left-padded prompts and returns the response
token ids with the KV cache; PPO and the critic-free trainers use it for rollouts, and
:func:`sample_texts` (``generate``, ``bon``, ``ppo-eval``, the annotation app, simulated
preferences, SFT's samples) is a loop over it that renders, batches and decodes.

Prompts are rendered by one rule, :func:`rlhfkit.models.tokenizers.use_chat_template`:
with the tokenizer's chat template when it has one (unless ``--no-chat-template``), and
always for ``messages`` prompts. Two details matter downstream:

- **Left padding.** Every prompt of a batch ends at the same position, so new tokens follow
  each prompt directly.
- **Masks from EOS, not from the pad id.** ``response_mask`` is 1 up to and including the
  first EOS; a pad id the model happened to sample before it still counts as a real token.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rlhfkit.config import Options, opt
from rlhfkit.data.prompts import Prompt
from rlhfkit.decoding import SamplingSettings, decode, prefill_positions
from rlhfkit.defaults import MAX_NEW_TOKENS, MAX_PROMPT_LENGTH
from rlhfkit.errors import UserError
from rlhfkit.models.policy import forward_accepts
from rlhfkit.models.tokenizers import eos_token_ids

__all__ = [
    "SamplingOptions",
    "SamplingSettings",
    "render_prompt",
    "encode_queries",
    "shared_prompt_cache",
    "sample",
    "response_mask_from_eos",
    "decode_responses",
    "Samples",
    "iter_samples",
    "sample_texts",
]


@dataclass(kw_only=True)
class SamplingOptions(Options):
    """The options of every command that samples from a policy."""

    policy: str = opt("smollm2-135m", "the policy (a causal LM): alias, folder or hub id")
    prompts: str = opt(help="prompts: text file (one per line) or JSONL with 'prompt' or 'messages'")
    max_new_tokens: int = opt(MAX_NEW_TOKENS, "response length limit", ge=1)
    max_prompt_length: int = opt(MAX_PROMPT_LENGTH, "prompt tokens kept (longer prompts keep their end)", ge=1)
    temperature: float = opt(1.0, "sampling temperature (0 = greedy)", ge=0)
    top_k: int = opt(0, "top-k filter, 0 = off", ge=0)
    top_p: float = opt(1.0, "nucleus filter, 1 = off", gt=0, le=1)
    chat_template: bool | None = opt(
        None,
        "render prompts with the policy's chat template (default: when its tokenizer "
        "has one; 'messages' prompts always use it)",
    )

    def settings(self) -> SamplingSettings:
        return SamplingSettings(self.max_new_tokens, self.temperature, self.top_k, self.top_p, self.max_prompt_length)


def render_prompt(tokenizer: Any, prompt: Prompt, chat: bool) -> str:
    """The text the policy continues: the chat template with a generation prompt, or the raw
    text. ``messages`` prompts always use the template; ``chat`` comes from :func:`use_chat_template`."""
    if prompt.messages is None and not chat:
        return prompt.text
    if not tokenizer.chat_template:
        raise UserError(
            "a prompt has 'messages' (a chat), but the policy's tokenizer has no chat template; "
            "give plain 'prompt' rows instead"
        )
    messages = list(prompt.messages or ({"role": "user", "content": prompt.text},))
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_queries(tokenizer: Any, texts: Sequence[str], max_prompt_length: int, chat: bool) -> tuple[Tensor, Tensor]:
    """Left-padded ``query_ids (M, P)`` and ``query_mask (M, P)``; long prompts keep their end."""
    # The chat template writes BOS itself where the model wants one.
    ids = [tokenizer(t, add_special_tokens=not chat)["input_ids"][-max_prompt_length:] for t in texts]
    empty = [i for i, seq in enumerate(ids) if not seq]
    if empty:
        raise UserError(
            f"prompt {empty[0]} ({texts[empty[0]]!r}) encodes to no tokens, and the first response token needs a "
            "position to be predicted from; drop empty prompts or use the chat template"
        )
    P = max(len(i) for i in ids)
    query_ids = torch.full((len(ids), P), tokenizer.pad_token_id, dtype=torch.long)
    query_mask = torch.zeros((len(ids), P), dtype=torch.long)
    for row, seq in enumerate(ids):
        query_ids[row, P - len(seq) :] = torch.tensor(seq)
        query_mask[row, P - len(seq) :] = 1
    return query_ids, query_mask


def shared_prompt_cache(model: Any, query_ids: Tensor, query_mask: Tensor) -> Any:
    """A KV cache of every row's prompt but its last token, each distinct prompt computed once.

    With ``K`` samples per prompt (group-sampled RL, best-of-n, several responses to show), the
    batch repeats each prompt ``K`` times. The prompt's tokens but the last are run once per
    distinct prompt and their KV cache copied to each of its rows (:func:`~rlhfkit.decoding.decode`
    then runs the last prompt token and samples as before, from the same logits up to the order
    of floating-point sums). ``None`` when every prompt is distinct (nothing to share) or the
    model's cache cannot be copied row by row.

    Args:
        query_ids, query_mask: ``(M, P)`` left-padded prompts.
    """
    P = query_ids.shape[1]
    rows = torch.cat([query_ids, query_mask.to(query_ids.dtype)], dim=1)  # (M, 2P): equal tokens and padding
    unique, inverse = torch.unique(rows, dim=0, return_inverse=True)  # (U, 2P), (M,)
    if len(unique) == len(rows) or P < 2:
        return None
    ids, mask = unique[:, : P - 1], unique[:, P : 2 * P - 1]  # (U, P - 1): all but the last prompt token
    name = "cache" if forward_accepts(model, "cache") else "past_key_values"  # transformers 5 / earlier
    out = model(input_ids=ids, attention_mask=mask, position_ids=prefill_positions(mask), use_cache=True)
    cache = getattr(out, name, None)  # the output field has the argument's name
    if cache is None or not hasattr(cache, "batch_select_indices"):
        return None  # a model without a reusable cache object: prefill as usual
    cache.batch_select_indices(inverse)  # (M, ...): each row gets its prompt's keys and values
    return cache


@torch.no_grad()
def sample(
    model: Any,
    tokenizer: Any,
    query_ids: Tensor,
    query_mask: Tensor,
    settings: SamplingSettings,
    eos_ids: Sequence[int],
    with_logprobs: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Sample ``response_ids (M, N)`` with the KV cache; every token after a row's EOS is pad.

    ``N <= max_new_tokens``: sampling stops when every row has ended, and a row that has ended
    leaves the batch (:func:`~rlhfkit.decoding.decode`). ``temperature`` 0 is greedy decoding;
    otherwise :func:`~rlhfkit.decoding.categorical_draw` draws each token. ``with_logprobs``
    also returns the sampled tokens' log-probabilities ``(M, N)`` under
    ``softmax(logits / temperature)``, recorded while sampling; they are the sampling
    distribution's only without top-k/top-p filters. A prompt repeated in the batch is
    computed once (:func:`shared_prompt_cache`).
    """
    decoded = decode(
        model,
        query_ids,
        query_mask,
        settings,
        eos_ids,
        tokenizer.pad_token_id,
        with_logprobs=with_logprobs,
        prompt_cache=shared_prompt_cache(model, query_ids, query_mask),
    )
    return (decoded.response_ids, decoded.logprobs) if with_logprobs else decoded.response_ids


def response_mask_from_eos(response_ids: Tensor, eos_ids: Sequence[int]) -> tuple[Tensor, Tensor]:
    """``response_mask (M, N)``: 1 up to and including the first EOS (all 1 without one); ``ended (M,)``."""
    is_eos = torch.isin(response_ids, torch.tensor(list(eos_ids), device=response_ids.device))  # (M, N)
    ended = is_eos.any(dim=1)  # (M,)
    n = response_ids.shape[1]
    first_eos = torch.where(ended, is_eos.long().argmax(dim=1), torch.full_like(ended, n - 1, dtype=torch.long))  # (M,)
    positions = torch.arange(n, device=response_ids.device).expand_as(response_ids)  # (M, N)
    return (positions <= first_eos.unsqueeze(1)).long(), ended


def decode_responses(tokenizer: Any, response_ids: Tensor, response_mask: Tensor, eos_ids: Sequence[int]) -> list[str]:
    """The response texts: real tokens, EOS and special tokens dropped."""
    texts = []
    for row, mask in zip(response_ids.tolist(), response_mask.tolist()):
        toks = [t for t, m in zip(row, mask) if m and t not in eos_ids]
        texts.append(tokenizer.decode(toks, skip_special_tokens=True))
    return texts


@dataclass
class Samples:
    """One batch of :func:`iter_samples`: ``B`` rows, prompt-major."""

    prompts: list[Prompt]  # (B,)
    query_ids: Tensor  # (B, P)
    query_mask: Tensor  # (B, P)
    response_ids: Tensor  # (B, N)
    response_mask: Tensor  # (B, N)
    responses: list[str]  # (B,)


def iter_samples(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    n: int,
    settings: SamplingSettings,
    *,
    chat: bool,
    batch_size: int = 16,
) -> Iterator[Samples]:
    """``n`` responses to each prompt through :func:`sample`, in batches of ``batch_size`` rows (prompt ``i``'s first)."""
    eos_ids = eos_token_ids(model, tokenizer)
    chat = chat or any(p.messages is not None for p in prompts)  # one format for every prompt
    flat = [p for p in prompts for _ in range(n)]  # (P * n,) prompt-major
    device = next(model.parameters()).device
    for start in range(0, len(flat), batch_size):
        chunk = flat[start : start + batch_size]
        rendered = [render_prompt(tokenizer, p, chat) for p in chunk]
        query_ids, query_mask = encode_queries(tokenizer, rendered, settings.max_prompt_length, chat)
        query_ids, query_mask = query_ids.to(device), query_mask.to(device)
        response_ids = sample(model, tokenizer, query_ids, query_mask, settings, eos_ids)
        response_mask, _ = response_mask_from_eos(response_ids, eos_ids)
        yield Samples(
            chunk,
            query_ids,
            query_mask,
            response_ids,
            response_mask,
            decode_responses(tokenizer, response_ids, response_mask, eos_ids),
        )


def sample_texts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    n: int,
    settings: SamplingSettings,
    *,
    chat: bool,
    batch_size: int = 16,
    seed: int | None = None,
) -> list[list[str]]:
    """``n`` responses to each prompt, ``result[i][j]``, decoded (:func:`iter_samples`). With
    ``seed`` the samples are reproducible and the global RNG is left as it was."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        texts = [
            t
            for s in iter_samples(model, tokenizer, prompts, n, settings, chat=chat, batch_size=batch_size)
            for t in s.responses
        ]
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]

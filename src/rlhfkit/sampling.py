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
from transformers import LogitsProcessor, LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper

from rlhfkit.config import Options, opt
from rlhfkit.data.prompts import Prompt
from rlhfkit.defaults import MAX_NEW_TOKENS, MAX_PROMPT_LENGTH
from rlhfkit.errors import UserError
from rlhfkit.models.policy import forward_accepts
from rlhfkit.models.tokenizers import eos_token_ids
from rlhfkit.ops import tempered

__all__ = [
    "SamplingOptions",
    "SamplingSettings",
    "render_prompt",
    "encode_queries",
    "CategoricalSampler",
    "shared_prompt_cache",
    "sample",
    "response_mask_from_eos",
    "decode_responses",
    "Samples",
    "iter_samples",
    "sample_texts",
]


@dataclass
class SamplingSettings:
    max_new_tokens: int = MAX_NEW_TOKENS
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    max_prompt_length: int = MAX_PROMPT_LENGTH


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


class LogprobRecorder(LogitsProcessor):
    """Records, while ``generate`` samples, each sampled token's log-probability under
    ``softmax(logits / temperature)``: what a forward pass over the finished sequences would
    give (up to the summation order of the KV-cached steps), without that forward pass.

    It sees the model's raw logits (it runs before :class:`CategoricalSampler`, and rlhfkit
    sets no other processor). It keeps one step's ``(M, V)`` log-softmax at a time, never all
    ``N`` steps'.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.previous: Tensor | None = None  # (M, V) log-probs of the step whose token is not yet known
        self.steps: list[Tensor] = []  # N x (M,)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.previous is not None:  # the token sampled from the previous step is now the last input
            self.steps.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(tempered(scores.float(), self.temperature), dim=-1)
        return scores

    def logprobs(self, response_ids: Tensor) -> Tensor:
        """``(M, N)`` log-probs of ``response_ids`` (the last step's token gathered here)."""
        steps = self.steps + [
            self.previous.gather(1, response_ids[:, len(self.steps) : len(self.steps) + 1]).squeeze(1)
        ]
        return torch.stack(steps[: response_ids.shape[1]], dim=1)


class CategoricalSampler(LogitsProcessor):
    """Draws each row's next token from ``softmax(logits / temperature)``, after the top-k and
    top-p filters when set, and returns scores whose only finite entry is that token, so
    ``generate`` run greedily emits it.

    The draw is ``torch.multinomial``'s own: ``argmax_v p_v / E_v`` with ``E_v ~ Exp(1)``, an
    exact sample of the categorical distribution (the "exponential race", equivalent to the
    Gumbel-max trick). It draws ``E = -log U`` from ``torch.rand``, where the CPU's
    ``exponential_``, which ``multinomial`` uses, takes 34 ms for 32 x 49,152 variates on the
    Intel Xeon of docs/benchmarks.md against 6 ms (a whole step: 41 ms -> 11 ms). A race and not an
    inverse-CDF draw (one uniform per row, 2 ms): a last-bit change in the logits (another
    thread count or CPU) flips a race only when the two best ``p / E`` tie to that bit, while
    it moves every boundary of a cumulative sum, and flipped a token in a few percent of
    inverse-CDF draws (the demo printed other numbers on an emulated slow machine, one thread
    and AVX2 kernels, than on the normal run; with the race, the same numbers).
    """

    def __init__(self, settings: SamplingSettings, recorder: LogprobRecorder | None = None):
        self.temperature = settings.temperature
        self.filters = ([TopKLogitsWarper(settings.top_k)] if settings.top_k > 0 else []) + (
            [TopPLogitsWarper(settings.top_p)] if settings.top_p < 1 else []
        )  # generate's order
        self.recorder = recorder  # its log-softmax of this step, reused when nothing is filtered

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.filters or self.recorder is None:
            logits = tempered(scores.float(), self.temperature)  # (M, V)
            for f in self.filters:
                logits = f(input_ids, logits)  # -inf outside the kept tokens
            probs = torch.softmax(logits, dim=-1)
        else:
            probs = self.recorder.previous.exp()  # (M, V): softmax(scores / temperature)
        u = torch.rand(probs.shape, device=probs.device, dtype=probs.dtype).clamp_(min=torch.finfo(probs.dtype).tiny)
        race = probs / u.log_().neg_()  # (M, V): p / E, E = -log U ~ Exp(1)
        token = race.argmax(dim=-1, keepdim=True)  # (M, 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)


def shared_prompt_cache(model: Any, query_ids: Tensor, query_mask: Tensor) -> dict[str, Any]:
    """``generate``'s keyword arguments that compute each distinct prompt once.

    With ``K`` samples per prompt (group-sampled RL, best-of-n, several responses to show), the
    batch repeats each prompt ``K`` times. The prompt's tokens but the last are run once per
    distinct prompt and their KV cache copied to each of its rows (``generate`` then runs the
    last prompt token and samples as before, from the same logits up to the order of
    floating-point sums). Empty when every prompt is distinct (nothing to share).

    Args:
        query_ids, query_mask: ``(M, P)`` left-padded prompts.
    """
    P = query_ids.shape[1]
    rows = torch.cat([query_ids, query_mask.to(query_ids.dtype)], dim=1)  # (M, 2P): equal tokens and padding
    unique, inverse = torch.unique(rows, dim=0, return_inverse=True)  # (U, 2P), (M,)
    if len(unique) == len(rows) or P < 2:
        return {}
    ids, mask = unique[:, : P - 1], unique[:, P : 2 * P - 1]  # (U, P - 1): all but the last prompt token
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate numbers left-padded rows
    name = "cache" if forward_accepts(model, "cache") else "past_key_values"  # transformers 5 / earlier
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    cache = getattr(out, name, None)  # the output field has the argument's name
    if cache is None or not hasattr(cache, "batch_select_indices"):
        return {}  # a model without a reusable cache object: prefill as usual
    cache.batch_select_indices(inverse)  # (M, ...): each row gets its prompt's keys and values
    return {name: cache}


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

    ``N <= max_new_tokens``: generation stops when every row has ended. ``temperature`` 0 is
    greedy decoding; otherwise :class:`CategoricalSampler` draws each token. ``with_logprobs`` also returns the sampled tokens' log-probabilities
    ``(M, N)`` under ``softmax(logits / temperature)`` (:class:`LogprobRecorder`); they are
    the sampling distribution's only without top-k/top-p filters. A prompt repeated in the
    batch is computed once (:func:`shared_prompt_cache`).
    """
    recorder = LogprobRecorder(settings.temperature if settings.temperature > 0 else 1.0) if with_logprobs else None
    processors = [recorder] if recorder is not None else []
    if settings.temperature > 0:  # generate runs greedily over the sampler's choice
        processors.append(CategoricalSampler(settings, recorder))
    out = model.generate(
        input_ids=query_ids,
        attention_mask=query_mask,
        max_new_tokens=settings.max_new_tokens,
        min_new_tokens=0,
        eos_token_id=list(eos_ids),
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        do_sample=False,
        temperature=None,
        top_k=None,
        top_p=None,  # not the model's generation-config defaults: none apply greedily
        logits_processor=LogitsProcessorList(processors) if processors else None,
        **shared_prompt_cache(model, query_ids, query_mask),
    )
    response_ids = out[:, query_ids.shape[1] :]  # (M, N)
    mask, _ = response_mask_from_eos(response_ids, eos_ids)
    response_ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, tokenizer.pad_token_id))
    return (response_ids, recorder.logprobs(out[:, query_ids.shape[1] :])) if recorder is not None else response_ids


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

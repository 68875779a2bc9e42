"""Rollouts: read prompts, sample responses, and compute what PPO needs about them.

For a batch of ``M`` prompts and ``N`` response tokens (the longest response of the batch):

- ``query_ids (M, P)``, left-padded, and ``response_ids (M, N)``, right-padded;
- ``response_mask (M, N)``: 1 on real response tokens up to and including the first EOS,
  0 after it (the pad tokens ``generate`` writes, or anything else);
- under ``torch.no_grad``, one batched forward pass each for ``old_logprobs (M, N)`` (actor),
  ``ref_logprobs (M, N)`` (reference: the LoRA actor with its adapter disabled, or a frozen
  copy), ``values (M, N)`` (critic) and ``scores (M,)`` (the reward source, which sees the
  prompt and response as text, the response cut before EOS).

Log-probs are taken from ``logits / temperature``: the distribution the tokens were
sampled from. ``top_k``/``top_p`` filters are not modelled in the log-probs, so PPO
should sample with them off (the defaults).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from rlhfkit.data.types import DataFormatError
from rlhfkit.models.tokenizers import eos_token_ids
from rlhfkit.ops import logprobs_from_logits
from rlhfkit.ppo.critic import response_logits


__all__ = [
    "Prompt",
    "read_prompts",
    "render_prompt",
    "GenerationSettings",
    "Rollout",
    "encode_queries",
    "eos_token_ids",
    "sample_responses",
    "response_mask_from_eos",
    "decode_responses",
    "policy_logprobs",
    "score_rollout",
    "make_rollout",
]


# ------------------------------------------------------------------------ prompts
@dataclass(frozen=True)
class Prompt:
    """One prompt: ``text`` is what reward sources and logs see; ``messages`` a chat, if given."""

    text: str
    messages: tuple[dict[str, str], ...] | None = None


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from a text file (one per non-empty line) or JSONL (``prompt`` or ``messages``).

    A JSONL ``messages`` row is a chat (``[{"role", "content"}, ...]``) that the policy sees
    through its chat template; its ``text`` for the reward source is the last user turn, or
    the ``prompt`` field when the row has one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    prompts: list[Prompt] = []
    if path.suffix != ".jsonl":
        prompts = [Prompt(line) for line in lines if line.strip()]
    else:
        for n, line in enumerate(lines, 1):
            if line.strip():
                prompts.append(_parse_prompt_row(line, str(path), n))
    if not prompts:
        raise DataFormatError(str(path), None, "holds no prompts; write one prompt per line (or JSONL rows with 'prompt')")
    return prompts


def _parse_prompt_row(line: str, source: str, n: int) -> Prompt:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataFormatError(source, n, f"not valid JSON ({e.msg}); each line must be an object with 'prompt' or 'messages'") from None
    if not isinstance(row, dict) or not ({"prompt", "messages"} & row.keys()):
        raise DataFormatError(source, n, "expected an object with a 'prompt' string or a 'messages' list")
    messages = row.get("messages")
    if messages is None:
        if not isinstance(row["prompt"], str):
            raise DataFormatError(source, n, f"'prompt' must be a string, got {type(row['prompt']).__name__}")
        return Prompt(row["prompt"])
    if not (isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    )):
        raise DataFormatError(source, n, "'messages' must be a non-empty list of {\"role\": str, \"content\": str}")
    if messages[-1]["role"] == "assistant":
        raise DataFormatError(source, n, "'messages' ends with an assistant turn; the policy writes that turn, drop it")
    users = [m["content"] for m in messages if m["role"] == "user"]
    text = row.get("prompt") if isinstance(row.get("prompt"), str) else (users[-1] if users else messages[-1]["content"])
    return Prompt(text, tuple({"role": m["role"], "content": m["content"]} for m in messages))


def render_prompt(tokenizer: Any, prompt: Prompt, chat_template: bool) -> str:
    """The text the policy continues: the chat template with a generation prompt, or the raw text.

    ``messages`` prompts always use the chat template.
    """
    if prompt.messages is None and not chat_template:
        return prompt.text
    if not tokenizer.chat_template:
        raise ValueError(
            "the policy's tokenizer has no chat template, but --chat-template is on or a prompt has 'messages'; "
            "turn --chat-template off and give plain 'prompt' rows"
        )
    messages = list(prompt.messages or ({"role": "user", "content": prompt.text},))
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ----------------------------------------------------------------------- sampling
@dataclass
class GenerationSettings:
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_prompt_length: int = 256
    chat_template: bool = False


def encode_queries(tokenizer: Any, texts: Sequence[str], max_prompt_length: int, chat: bool) -> tuple[Tensor, Tensor]:
    """Left-padded ``query_ids (M, P)`` and ``query_mask (M, P)``; long prompts keep their end."""
    # The chat template writes BOS itself where the model wants one.
    ids = [tokenizer(t, add_special_tokens=not chat)["input_ids"][-max_prompt_length:] for t in texts]
    empty = [i for i, seq in enumerate(ids) if not seq]
    if empty:
        raise ValueError(
            f"prompt {empty[0]} ({texts[empty[0]]!r}) encodes to no tokens, and the first response token needs a "
            "position to be predicted from; drop empty prompts or use --chat-template"
        )
    P = max(len(i) for i in ids)
    pad = tokenizer.pad_token_id
    query_ids = torch.full((len(ids), P), pad, dtype=torch.long)
    query_mask = torch.zeros((len(ids), P), dtype=torch.long)
    for row, seq in enumerate(ids):
        query_ids[row, P - len(seq):] = torch.tensor(seq)
        query_mask[row, P - len(seq):] = 1
    return query_ids, query_mask


@torch.no_grad()
def sample_responses(
    model: Any, tokenizer: Any, query_ids: Tensor, query_mask: Tensor, settings: GenerationSettings, eos_ids: list[int]
) -> Tensor:
    """Sample ``response_ids (M, N)`` with the KV cache; every token after a row's EOS is pad.

    ``N <= max_new_tokens``: generation stops when every row has ended.
    """
    sampling: dict[str, Any] = dict(do_sample=False)
    if settings.temperature > 0:
        sampling = dict(do_sample=True, temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
    out = model.generate(
        input_ids=query_ids,
        attention_mask=query_mask,
        max_new_tokens=settings.max_new_tokens,
        min_new_tokens=0,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        **sampling,
    )
    response_ids = out[:, query_ids.shape[1]:]  # (M, N)
    mask, _ = response_mask_from_eos(response_ids, eos_ids)
    return torch.where(mask.bool(), response_ids, torch.full_like(response_ids, tokenizer.pad_token_id))


def response_mask_from_eos(response_ids: Tensor, eos_ids: Sequence[int]) -> tuple[Tensor, Tensor]:
    """``response_mask (M, N)``: 1 up to and including the first EOS (all 1 without one); ``ended (M,)``.

    The mask is built from the EOS position alone, never from the pad id, so a pad id the
    model happened to sample before its EOS still counts as a real token.
    """
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


# ----------------------------------------------------------------------- rollout
@dataclass
class Rollout:
    """One batch of experience. Tensors are on the model's device; see the module docstring."""

    prompts: list[str]  # (M,) prompt texts as the reward source saw them
    responses: list[str]  # (M,) decoded responses
    query_ids: Tensor  # (M, P)
    query_mask: Tensor  # (M, P)
    response_ids: Tensor  # (M, N)
    response_mask: Tensor  # (M, N)
    ended: Tensor  # (M,) bool: the response ends with EOS (not cut at max_new_tokens)
    old_logprobs: Tensor  # (M, N)
    ref_logprobs: Tensor  # (M, N)
    values: Tensor  # (M, N)
    scores: Tensor  # (M,)

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.query_ids, self.response_ids], dim=1)  # (M, P + N)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.query_mask, self.response_mask], dim=1)  # (M, P + N)

    def __len__(self) -> int:
        return len(self.prompts)


def policy_logprobs(
    model: Any, input_ids: Tensor, attention_mask: Tensor, response_ids: Tensor, temperature: float
) -> Tensor:
    """Log-probs ``(M, N)`` of ``response_ids`` under a plain causal LM (the reference, or eval)."""
    logits, _ = response_logits(model, input_ids, attention_mask, response_ids.shape[1])
    return logprobs_from_logits(logits / temperature, response_ids)


@torch.no_grad()
def score_rollout(
    model: Any,
    ref_model: Any | None,
    reward: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    query_ids: Tensor,
    query_mask: Tensor,
    response_ids: Tensor,
    response_mask: Tensor,
    *,
    temperature: float,
    eos_ids: Sequence[int],
) -> Rollout:
    """Everything PPO needs about sampled responses, each in one batched no-grad pass.

    Args:
        model: an :class:`~rlhfkit.ppo.critic.ActorCritic` (unwrapped).
        ref_model: the frozen reference causal LM; ``None`` with a LoRA actor (adapter off).
        reward: a reward source, ``reward(prompts, responses) -> (M,)``.
        prompts: ``M`` prompt texts for the reward source.
        query_ids, query_mask: ``(M, P)`` left-padded.
        response_ids, response_mask: ``(M, N)`` right-padded; tokens where the mask is 0
            change nothing in the results.
    """
    input_ids = torch.cat([query_ids, response_ids], dim=1)  # (M, P + N)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)  # (M, P + N)
    n = response_ids.shape[1]
    logits, values = model(input_ids, attention_mask, n, temperature)  # (M, N, V), (M, N)
    old_logprobs = logprobs_from_logits(logits, response_ids)  # (M, N)
    del logits
    if ref_model is None:
        with model.reference() as ref:
            ref_logprobs = policy_logprobs(ref, input_ids, attention_mask, response_ids, temperature)
    else:
        ref_logprobs = policy_logprobs(ref_model, input_ids, attention_mask, response_ids, temperature)
    responses = decode_responses(tokenizer, response_ids, response_mask, eos_ids)
    scores = reward(list(prompts), responses).to(values.device, torch.float32)  # (M,)
    _, ended = response_mask_from_eos(torch.where(response_mask.bool(), response_ids, -1), eos_ids)
    zero = torch.zeros((), device=values.device)
    real = response_mask.bool()
    return Rollout(
        prompts=list(prompts), responses=responses, query_ids=query_ids, query_mask=query_mask,
        response_ids=response_ids, response_mask=response_mask, ended=ended,
        old_logprobs=torch.where(real, old_logprobs.float(), zero),
        ref_logprobs=torch.where(real, ref_logprobs.float(), zero),
        values=torch.where(real, values.float(), zero), scores=scores,
    )


def make_rollout(
    model: Any, ref_model: Any | None, reward: Any, tokenizer: Any, prompts: Sequence[Prompt], settings: GenerationSettings
) -> Rollout:
    """Sample one response per prompt and score it: :func:`sample_responses` then :func:`score_rollout`."""
    device = next(model.parameters()).device
    chat = settings.chat_template or any(p.messages for p in prompts)  # one format for the whole batch
    texts = [render_prompt(tokenizer, p, chat) for p in prompts]
    query_ids, query_mask = encode_queries(tokenizer, texts, settings.max_prompt_length, chat)
    query_ids, query_mask = query_ids.to(device), query_mask.to(device)
    eos_ids = eos_token_ids(model.actor, tokenizer)
    response_ids = sample_responses(model.actor, tokenizer, query_ids, query_mask, settings, eos_ids)
    response_mask, _ = response_mask_from_eos(response_ids, eos_ids)
    return score_rollout(
        model, ref_model, reward, tokenizer, [p.text for p in prompts], query_ids, query_mask, response_ids, response_mask,
        temperature=settings.temperature if settings.temperature > 0 else 1.0, eos_ids=eos_ids,
    )

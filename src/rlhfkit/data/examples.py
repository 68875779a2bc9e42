"""A (prompt, response) or a chat as a causal LM reads it: token ids, and which of them are targets.

One tokenisation for every trainer of a policy: SFT's examples (:mod:`rlhfkit.sft.data`) and
the (prompt, response) texts of DPO and of a DPO policy's implicit reward
(:mod:`rlhfkit.models.implicit_reward`), so the text before a reply is what the policy is fed
when it samples.

What the model reads, and where the loss is (``labels`` are -100 everywhere else):

- **chat** (``messages`` rows always; ``prompt``/``response`` rows with ``chat_template=True``):
  the tokenizer's chat template. A prompt/response row is one user turn and one assistant
  turn, so the text before the reply is exactly what :func:`rlhfkit.sampling.render_prompt`
  and PPO's rollout feed the model at sampling time. The loss covers each assistant turn's
  content and its end-of-turn token (``assistant_turns="all"``) or only the final turn's
  (``"last"``); system and user turns, role headers and the newline after the end token are
  not targets. Turn boundaries come from rendering the conversation up to each assistant
  turn (with the generation prompt) and through it. A template that does not render a
  conversation's beginning as a prefix of the whole (some drop earlier reasoning, or change
  earlier text when later turns follow) cannot be split that way: then only the final
  assistant turn is trained, and a warning says how many rows this affected.
- **plain** (``prompt``/``response`` rows with ``chat_template=False``): the prompt as the
  tokenizer encodes it by default (with BOS if it adds one), then ``response + EOS``; the
  loss covers the response and EOS.

Every reply ends with the EOS token that generation stops at. A sequence's first token is
never a target (nothing precedes it), which is also why a packed row never predicts one
example's first token from the previous example's last.

**Truncation.** An example longer than ``max_length`` is cut, counted and reported, never
dropped: the text before the final reply loses tokens from its start (its end holds the
assistant header) until the reply fits or only ``max_length // 2`` of it remain; then the
reply loses tokens from its end (and so has no EOS: the model is not taught to stop there).

**DPO** (:func:`encode_response`): a (prompt, response) is tokenised as a prompt/response
example by :func:`encode_example` (the chat-template choice by the one rule,
:func:`rlhfkit.models.tokenizers.use_chat_template`). ``response_mask`` marks the tokens whose
log-probability enters ``log pi(y | x)``: the reply and its end token, never the prompt,
template headers or the first token. Long texts are truncated by the same rule, counted and
kept, never dropped. :func:`policy_encoder` plugs into
:class:`rlhfkit.data.collate.EncodedPreferences`, which encodes every unique text of the data
once: a list of ``K`` responses costs ``K`` sequences per step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from rlhfkit.data.collate import Encoder
from rlhfkit.data.types import DataFormatError

__all__ = [
    "IGNORE_INDEX",
    "SFTExample",
    "chat_segments",
    "encode_example",
    "encode_response",
    "policy_encoder",
    "pad_right",
    "Pad",
]

IGNORE_INDEX = -100
"""Label of a token that is not a target (prompt, template text, padding); PyTorch's ``ignore_index``."""


@dataclass(frozen=True)
class SFTExample:
    """One training example. ``messages`` is set for chat rows (then ``prompt`` is the last
    user turn and ``response`` the final assistant turn, for logs and samples)."""

    prompt: str
    response: str
    messages: tuple[dict[str, str], ...] | None = None
    source: str = ""  # "file:line", for error messages

    def chat(self) -> list[dict[str, str]]:
        """The example as a conversation: its messages, or a user and an assistant turn."""
        if self.messages is not None:
            return [dict(m) for m in self.messages]
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.response}]


def _render(tokenizer: Any, messages: Sequence[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def _cut_after_eos(reply: str, eos_text: str | None) -> str:
    """The reply through its end-of-turn token (the newline after it is template text, not a target)."""
    k = reply.rfind(eos_text) if eos_text else -1
    return reply[: k + len(eos_text)] if k >= 0 else reply.rstrip()  # type: ignore[arg-type]


def chat_segments(
    tokenizer: Any, messages: Sequence[dict[str, str]], assistant_turns: str = "all"
) -> tuple[list[tuple[str, bool]], bool]:
    """Split a rendered chat into ``(text, is_target)`` pieces that concatenate to the text
    through the final reply's end token. Returns ``(segments, all_turns_split)``: the flag is
    False when the template's renderings are not prefixes of each other, so only the final
    assistant turn is a target (see the module docstring).
    """
    eos = tokenizer.eos_token
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if assistant_turns == "last":
        turns = turns[-1:]
    segments: list[tuple[str, bool]] = []
    done = ""
    for i in turns:
        before = _render(tokenizer, messages[:i], True)
        through = _render(tokenizer, messages[: i + 1], False)
        if not (before.startswith(done) and through.startswith(before)):
            break
        reply = _cut_after_eos(through[len(before) :], eos)
        segments += [(before[len(done) :], False), (reply, True)]
        done = before + reply
    else:
        return segments, True
    before = _render(tokenizer, messages[:-1], True)
    whole = _render(tokenizer, messages, False)
    if not whole.startswith(before):
        raise ValueError(
            "the chat template does not render the conversation without its last turn (plus the generation prompt) as a "
            "prefix of the whole conversation, so the reply's tokens cannot be told apart; use prompt/response rows"
        )
    return [(before, False), (_cut_after_eos(whole[len(before) :], eos), True)], False


def encode_example(
    tokenizer: Any, example: SFTExample, *, max_length: int, chat_template: bool = True, assistant_turns: str = "all"
) -> tuple[list[int], list[int], bool, bool]:
    """``(input_ids, labels, truncated, all_turns_split)`` of one example (module docstring)."""
    eos = tokenizer.eos_token_id
    if example.messages is None and not chat_template:
        prompt = tokenizer(example.prompt)["input_ids"]  # with BOS when the tokenizer adds one, as generation does
        reply = tokenizer(example.response, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        ids, labels = list(prompt) + reply, [IGNORE_INDEX] * len(prompt) + reply
        n_before, split_all = len(prompt), True
    else:
        if not tokenizer.chat_template:
            raise ValueError(
                f"{example.source}: chat rows ('messages', or prompt/response with chat_template on) need a tokenizer with "
                "a chat template, and this one has none; give prompt/response rows and turn the chat template off"
            )
        try:
            segments, split_all = chat_segments(tokenizer, example.chat(), assistant_turns)
        except Exception as e:  # jinja errors from the template (e.g. "roles must alternate")
            path, _, line = example.source.rpartition(":")
            raise DataFormatError(
                path or example.source,
                int(line) if line.isdigit() else None,
                f"the chat template cannot render this row: {e}",
            ) from None
        ids, labels = [], []
        n_before = 0
        for text, target in segments:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []  # the template writes BOS
            if target:
                n_before = len(ids)
            ids += piece
            labels += piece if target else [IGNORE_INDEX] * len(piece)
        if eos is not None and ids and ids[-1] != eos:
            ids.append(eos)  # a template whose turns do not end with EOS: the final reply still must
            labels.append(eos)
    truncated = len(ids) > max_length
    if truncated:
        n_reply = len(ids) - n_before
        keep_before = max(max_length - n_reply, min(n_before, max_length // 2))
        start = n_before - keep_before
        ids, labels = ids[start : start + max_length], labels[start : start + max_length]
    if labels:
        labels[0] = IGNORE_INDEX  # nothing precedes the first token
    return ids, labels, truncated, split_all


def encode_response(
    tokenizer: Any, prompt: str, response: str, *, chat: bool, max_length: int
) -> tuple[dict[str, list[int]], int, bool]:
    """``({"input_ids", "response_mask"}, tokens before the response, truncated)`` of one (prompt, response)."""
    ids, labels, truncated, _ = encode_example(
        tokenizer, SFTExample(prompt, response), max_length=max_length, chat_template=chat
    )
    response_mask = [int(t != IGNORE_INDEX) for t in labels]
    n_before = response_mask.index(1) if 1 in response_mask else len(ids)
    return {"input_ids": ids, "response_mask": response_mask}, n_before, truncated


def policy_encoder(tokenizer: Any, chat: bool, max_length: int) -> Encoder:
    """:func:`encode_response` for this tokenizer and format, as an :data:`~rlhfkit.data.collate.Encoder`."""
    return partial(encode_response, tokenizer, chat=chat, max_length=max_length)


def pad_right(pad_id: int, features: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``response_mask``, each ``(N, T)``, right-padded
    to the longest sequence (``pad_id``; masks 0 on padding)."""
    n, t = len(features), max(len(f["input_ids"]) for f in features)
    out = {
        "input_ids": torch.full((n, t), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((n, t), dtype=torch.long),
        "response_mask": torch.zeros((n, t), dtype=torch.long),
    }
    for i, f in enumerate(features):
        length = len(f["input_ids"])
        out["input_ids"][i, :length] = torch.tensor(f["input_ids"])
        out["attention_mask"][i, :length] = 1
        out["response_mask"][i, :length] = torch.tensor(f["response_mask"])
    return out


Pad = Callable[[Sequence[dict[str, list[int]]]], dict[str, torch.Tensor]]

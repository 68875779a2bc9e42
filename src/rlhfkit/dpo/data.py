"""What the policy reads for DPO: each (prompt, response) once, with a mask on its response tokens.

A (prompt, response) is tokenised exactly as SFT tokenises a prompt/response row
(:func:`rlhfkit.sft.data.encode_example`): with the chat template as one user and one
assistant turn, or as ``prompt + response + EOS`` (the one chat-template rule,
:func:`rlhfkit.models.tokenizers.use_chat_template`), so the text before the reply is what
the policy is fed when it samples. ``response_mask`` marks the tokens whose log-probability
enters ``log pi(y | x)``: the reply and its end token, never the prompt, template headers or
the first token (nothing precedes it). Long texts are truncated by SFT's rule, counted and
kept, never dropped.

:func:`policy_encoder` plugs into :class:`rlhfkit.data.collate.EncodedPreferences`, which
encodes every unique text of the data once: a list of ``K`` responses costs ``K``
sequences per step.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence

import torch

from rlhfkit.data.collate import Encoder
from rlhfkit.sft.data import SFTExample, encode_example
from rlhfkit.sft.losses import IGNORE_INDEX


def encode_response(tokenizer: Any, prompt: str, response: str, *, chat: bool, max_length: int) -> tuple[dict[str, list[int]], int, bool]:
    """``({"input_ids", "response_mask"}, tokens before the response, truncated)`` of one (prompt, response)."""
    ids, labels, truncated, _ = encode_example(tokenizer, SFTExample(prompt, response), max_length=max_length, chat_template=chat)
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
    out = {"input_ids": torch.full((n, t), pad_id, dtype=torch.long), "attention_mask": torch.zeros((n, t), dtype=torch.long),
           "response_mask": torch.zeros((n, t), dtype=torch.long)}
    for i, f in enumerate(features):
        length = len(f["input_ids"])
        out["input_ids"][i, :length] = torch.tensor(f["input_ids"])
        out["attention_mask"][i, :length] = 1
        out["response_mask"][i, :length] = torch.tensor(f["response_mask"])
    return out


Pad = Callable[[Sequence[dict[str, list[int]]]], dict[str, torch.Tensor]]

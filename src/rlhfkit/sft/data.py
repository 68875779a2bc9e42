"""Instruction data for supervised fine-tuning: tokenise with a loss mask, pack, collate.

Reading the file (formats, the errors of a bad line) is :mod:`rlhfkit.data.instructions`
(``read_sft_data``), a floor down because ``rlhfkit plan`` reads it too.

Tokenising, the same for SFT and DPO (what the model reads, where the loss is, how a long
example is cut): :func:`rlhfkit.data.examples.encode_example`.

**Packing.** :func:`pack_examples` puts whole examples into rows of at most ``max_length``
tokens (best-fit decreasing). :func:`collate` gives a packed row ``position_ids`` that
restart at 0 for each example and ``seq_ids`` from which :func:`block_causal_mask` builds a
4D block-diagonal causal mask, so no token attends across an example boundary: a packed
row gives each example the same per-token losses as running it alone (tested).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlhfkit.data.examples import IGNORE_INDEX, SFTExample, encode_example
from rlhfkit.data.readers import split_train_eval

logger = logging.getLogger(__name__)


def split_examples(
    examples: Sequence[SFTExample], eval_fraction: float, seed: int
) -> tuple[list[SFTExample], list[SFTExample]]:
    """Hold out ``round(len * eval_fraction)`` (at least 1) seeded random examples; both parts keep file order."""

    return split_train_eval(examples, eval_fraction=eval_fraction, seed=seed)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# Tokenising
# --------------------------------------------------------------------------------------


def prompt_text(tokenizer: Any, example: SFTExample, chat_template: bool) -> str:
    """The text the model continues to write ``example``'s final reply (for sampling)."""
    if example.messages is None and not chat_template:
        return example.prompt
    return tokenizer.apply_chat_template(example.chat()[:-1], tokenize=False, add_generation_prompt=True)


@dataclass
class EncodedSFT:
    """Tokenised examples: ``input_ids[i]`` and ``labels[i]`` (same length; -100 = not a target)."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    sources: list[str]
    n_truncated: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def length(self, i: int) -> int:
        return len(self.input_ids[i])

    def n_targets(self, i: int) -> int:
        """Response tokens of example ``i`` that enter the loss."""
        return sum(1 for t in self.labels[i] if t != IGNORE_INDEX)

    @classmethod
    def build(
        cls,
        examples: Sequence[SFTExample],
        tokenizer: Any,
        *,
        max_length: int,
        chat_template: bool = True,
        assistant_turns: str = "all",
        what: str = "data",
    ) -> EncodedSFT:
        """Tokenise every example (see the module docstring); warn once about truncation and template fallbacks."""
        ids_all, labels_all, sources = [], [], []
        truncated = fallbacks = 0
        for ex in examples:
            ids, labels, cut, split_all = encode_example(
                tokenizer, ex, max_length=max_length, chat_template=chat_template, assistant_turns=assistant_turns
            )
            ids_all.append(ids)
            labels_all.append(labels)
            sources.append(ex.source)
            truncated += int(cut)
            fallbacks += int(not split_all)
        if truncated:
            # Never silently: the user sees how much was cut, and nothing is dropped.
            logger.warning(
                "%s: %d of %d examples are longer than max_length=%d and were truncated (kept, not dropped; raise "
                "--max-length to keep more)",
                what,
                truncated,
                len(ids_all),
                max_length,
            )
        if fallbacks:
            logger.warning(
                "%s: for %d multi-turn chat(s) the chat template does not render earlier turns as a prefix of the "
                "whole conversation; only their final assistant turn is trained",
                what,
                fallbacks,
            )
        return cls(ids_all, labels_all, sources, truncated)


# --------------------------------------------------------------------------------------
# Packing and batches
# --------------------------------------------------------------------------------------


def pack_examples(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group example indices into rows of at most ``max_length`` tokens (best-fit decreasing).

    Longest example first, each goes into the row with the least room that still fits it,
    or opens a new row. Deterministic; every index appears exactly once. The plain loop
    (first-fit, quadratic) it replaces::

        for i in sorted(range(n), key=lambda i: -lengths[i]):
            row = next((r for r in rows if used[r] + lengths[i] <= max_length), None)
            ...
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for i in order:
        if lengths[i] > max_length:
            raise ValueError(f"example {i} has {lengths[i]} tokens, more than max_length={max_length}; truncate first")
        pos = bisect.bisect_left(free, (lengths[i], -1))
        if pos == len(free):
            rows.append([i])
            room, row = max_length - lengths[i], len(rows) - 1
        else:
            room, row = free.pop(pos)
            rows[row].append(i)
            room -= lengths[i]
        bisect.insort(free, (room, row))
    return rows


@dataclass
class SFTBatch:
    """A batch of B rows, right-padded to T tokens.

    input_ids, labels (-100 = not a target), attention_mask (1 = real token): ``(B, T)``.
    Packed rows also carry ``position_ids (B, T)`` (restarting at 0 for each example) and
    ``seq_ids (B, T)`` (the example's slot within its row, -1 on padding); else both None.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor | None = None
    seq_ids: torch.Tensor | None = None

    def to(self, device) -> SFTBatch:
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return SFTBatch(
            self.input_ids.to(device),
            self.labels.to(device),
            self.attention_mask.to(device),
            mv(self.position_ids),
            mv(self.seq_ids),
        )


def collate(data: EncodedSFT, rows: Sequence[Sequence[int]], pad_id: int, packed: bool = False) -> SFTBatch:
    """Concatenate each row's examples and right-pad; ``packed`` adds position and sequence ids."""
    seqs = [[t for i in row for t in data.input_ids[i]] for row in rows]
    T = max(len(s) for s in seqs)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long) if packed else None
    seq_ids = torch.full((B, T), -1, dtype=torch.long) if packed else None
    for b, row in enumerate(rows):
        start = 0
        for slot, i in enumerate(row):
            n = data.length(i)
            input_ids[b, start : start + n] = torch.tensor(data.input_ids[i])
            labels[b, start : start + n] = torch.tensor(data.labels[i])
            attention_mask[b, start : start + n] = 1
            if packed:
                position_ids[b, start : start + n] = torch.arange(n)  # type: ignore[index]
                seq_ids[b, start : start + n] = slot  # type: ignore[index]
            start += n
    return SFTBatch(input_ids, labels, attention_mask, position_ids, seq_ids)


def block_causal_mask(seq_ids: torch.Tensor) -> torch.Tensor:
    """Which keys each query may attend to in packed rows. seq_ids (B, T) -> (B, 1, T, T) bool.

    ``True`` where key ``j`` is at or before query ``i`` in the same example. Padding
    (``seq_ids == -1``) attends only to itself, so no softmax row is empty (an all-masked
    row gives NaN, whose gradient would poison the weights even though the loss ignores it).
    """
    T = seq_ids.shape[1]
    same = seq_ids[:, :, None] == seq_ids[:, None, :]  # (B, T, T)
    causal = torch.ones((T, T), dtype=torch.bool, device=seq_ids.device).tril()
    real = (seq_ids >= 0)[:, :, None]  # (B, T, 1)
    eye = torch.eye(T, dtype=torch.bool, device=seq_ids.device)
    return ((same & causal & real) | eye)[:, None]  # (B, 1, T, T)

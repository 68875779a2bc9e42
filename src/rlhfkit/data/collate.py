"""From examples to padded tensors: encode each unique text once, batch lists by length.

A rank list of K responses is one training example and costs K sequences, not the
K(K-1) that expanding it into pairs costs: the batch carries the unique texts
``(N, T)`` and an index ``text_index (B, K)`` from list slots into them; losses gather
the N scores into the ``(B, K)`` list layout.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from rlhfkit.data.types import PreferenceExample

logger = logging.getLogger(__name__)

Encoder = Callable[[str, str], "tuple[dict[str, list[int]], int, bool]"]


@dataclass
class EncodedPreferences:
    """Examples with every unique (prompt, response) tokenised once.

    ``texts[i]`` are the features of unique text i; ``lists[j]`` are the text indices of
    example j's responses (same order as ``examples[j].responses``). ``n_truncated`` counts
    unique texts longer than ``max_length`` (cut, kept); ``n_empty_responses`` unique texts
    whose response is ``""`` (encoded as the prompt and the end token alone: ``[CLS] prompt
    [SEP] [SEP]`` for an encoder, ``prompt EOS`` for a decoder).
    """

    examples: list[PreferenceExample]
    texts: list[dict[str, list[int]]]
    prompt_lengths: list[int]
    response_lengths: list[int]  # in tokens, for the length diagnostics
    lists: list[list[int]]
    n_truncated: int
    n_empty_responses: int = 0

    @classmethod
    def build(
        cls, examples: Sequence[PreferenceExample], encode: Encoder, max_length: int, what: str = "data"
    ) -> EncodedPreferences:
        index: dict[tuple[str, str], int] = {}
        texts, prompt_lengths, response_lengths, lists = [], [], [], []
        truncated = empty = 0
        for ex in examples:
            row = []
            for resp in ex.responses:
                key = (ex.prompt, resp)
                if key not in index:
                    feats, n_prompt, was_cut = encode(ex.prompt, resp)
                    index[key] = len(texts)
                    texts.append(feats)
                    prompt_lengths.append(n_prompt)
                    response_lengths.append(len(feats["input_ids"]) - n_prompt)
                    truncated += int(was_cut)
                    empty += int(resp == "")
                row.append(index[key])
            lists.append(row)
        if truncated:
            # Never silently: the user sees how much was cut, and nothing is dropped.
            logger.warning(
                "%s: %d of %d unique texts are longer than max_length=%d and were truncated "
                "(kept, not dropped; raise --max-length to keep more)",
                what,
                truncated,
                len(texts),
                max_length,
            )
        if empty:
            # Legitimate (HH-RLHF has them), but worth knowing about.
            logger.warning(
                "%s: %d of %d unique texts have an empty response, scored as the prompt and the end token alone",
                what,
                empty,
                len(texts),
            )
        return cls(list(examples), texts, prompt_lengths, response_lengths, lists, truncated, empty)

    def __len__(self) -> int:
        return len(self.examples)

    def list_length(self, j: int) -> int:
        """Longest sequence in list j, for length grouping."""
        return max(len(self.texts[t]["input_ids"]) for t in self.lists[j])


@dataclass
class RankBatch:
    """One batch of B lists over N unique texts.

    input_ids, attention_mask (N, T) [token_type_ids (N, T)]; prompt_lengths (N,);
    text_index (B, K) index into N, -1 on padded slots; list_mask (B, K) 1 = real slot;
    ranks (B, K) 0 = best; margins (B,) or None; choice (B,) or None; labels (B,) or None;
    text_ids (N,) which text of the :class:`EncodedPreferences` each row is (to look up
    per-text values computed once, such as DPO's reference log-probabilities).
    """

    inputs: dict[str, torch.Tensor]
    prompt_lengths: torch.Tensor
    response_lengths: torch.Tensor
    text_index: torch.Tensor
    list_mask: torch.Tensor
    ranks: torch.Tensor
    margins: torch.Tensor | None
    choice: torch.Tensor | None
    labels: torch.Tensor | None
    list_ids: list[int]
    text_ids: torch.Tensor | None = None

    @property
    def n_lists(self) -> int:
        return self.text_index.shape[0]

    def to(self, device) -> RankBatch:
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return RankBatch(
            {k: v.to(device) for k, v in self.inputs.items()},
            mv(self.prompt_lengths),
            mv(self.response_lengths),
            mv(self.text_index),
            mv(self.list_mask),
            mv(self.ranks),
            mv(self.margins),
            mv(self.choice),
            mv(self.labels),
            self.list_ids,
            mv(self.text_ids),
        )

    def gather_lists(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores (N,) of the unique texts -> scores (B, K) in the list layout (0 on padded slots)."""
        return scores[self.text_index.clamp(min=0)] * self.list_mask.to(scores.dtype)


def collate(data: EncodedPreferences, list_ids: Sequence[int], pad: Callable) -> RankBatch:
    """Pad the unique texts of ``list_ids`` once each; build the (B, K) index into them."""
    local: dict[int, int] = {}
    for j in list_ids:
        for t in data.lists[j]:
            local.setdefault(t, len(local))
    uniq = list(local)
    k = max(len(data.lists[j]) for j in list_ids)
    b = len(list_ids)
    text_index = torch.full((b, k), -1, dtype=torch.long)
    ranks = torch.zeros((b, k), dtype=torch.long)
    for row, j in enumerate(list_ids):
        ex = data.examples[j]
        for col, t in enumerate(data.lists[j]):
            text_index[row, col] = local[t]
            ranks[row, col] = ex.ranks[col]
    exs = [data.examples[j] for j in list_ids]
    margins = torch.tensor([e.margin or 0.0 for e in exs]) if any(e.margin is not None for e in exs) else None
    choice = torch.tensor([e.choice for e in exs]) if all(e.choice is not None for e in exs) else None
    labels = torch.tensor([float(e.label) for e in exs]) if all(e.label is not None for e in exs) else None
    return RankBatch(
        inputs=pad([data.texts[t] for t in uniq]),
        prompt_lengths=torch.tensor([data.prompt_lengths[t] for t in uniq]),
        response_lengths=torch.tensor([data.response_lengths[t] for t in uniq]),
        text_index=text_index,
        list_mask=(text_index >= 0).long(),
        ranks=ranks,
        margins=margins,
        choice=choice,
        labels=labels,
        list_ids=list(list_ids),
        text_ids=torch.tensor(uniq, dtype=torch.long),
    )


def plan_batches(
    lengths: Sequence[int], effective_batch: int, seed: int, epoch: int, shuffle: bool = True, group_size: int = 64
) -> list[list[int]]:
    """Split list indices into effective batches of similar length, in a seeded order.

    Shuffle with (seed, epoch), cut into mega-chunks of ``group_size`` effective batches,
    sort each chunk by length, cut into effective batches, shuffle the batches. Every list
    appears exactly once; the last batch may be smaller. The plan depends only on the
    effective batch size, so 1 process x batch 2b and 2 processes x batch b (or batch 8 x
    accumulation 1 and batch 1 x accumulation 8) see the same lists in the same steps.
    """
    order = list(range(len(lengths)))
    rng = random.Random(seed * 1_000_003 + epoch)
    if shuffle:
        rng.shuffle(order)
    chunk = effective_batch * group_size
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: (-lengths[i], i))
        batches.extend(part[i : i + effective_batch] for i in range(0, len(part), effective_batch))
    if shuffle:
        rng.shuffle(batches)
    return batches


def iter_batches(
    lengths: Sequence[int], effective_batch: int, seed: int, n_batches: int, start_epoch: int = 0, start_batch: int = 0
) -> Iterator[tuple[int, int, int, list[int]]]:
    """``(epoch, batch index, batches in the epoch, ids)`` of the next ``n_batches`` effective
    batches from ``(start_epoch, start_batch)`` on, epoch after epoch (:func:`plan_batches`)."""
    epoch, first = start_epoch, start_batch
    while n_batches > 0:
        plan = plan_batches(lengths, effective_batch, seed, epoch)
        for b in range(first, min(len(plan), first + n_batches)):
            yield epoch, b, len(plan), plan[b]
        n_batches -= max(0, len(plan) - first)
        epoch, first = epoch + 1, 0


def process_micro_batches(
    batch: Sequence[int], world_size: int, accumulation: int, rank: int
) -> list[tuple[list[int], bool]]:
    """This process's micro-batches of one step as ``(ids, live)``: an empty slot (fewer rows
    than slots) becomes ``([batch[0]], False)``, which must take part in the gradient
    all-reduce with zero weight."""
    return [
        (ids, True) if ids else ([batch[0]], False)
        for ids in split_effective_batch(batch, world_size, accumulation, rank)
    ]


def split_effective_batch(batch: Sequence[int], world_size: int, accumulation: int, rank: int) -> list[list[int]]:
    """The micro-batches of one process for one optimizer step.

    Lists are dealt round-robin over ``world_size * accumulation`` slots so every slot gets
    a near-equal share; process ``rank`` takes slots ``a * world_size + rank``. A slot can be
    empty only when the batch has fewer lists than slots (the caller weights by counts).
    """
    slots = world_size * accumulation
    per_slot: list[list[int]] = [[] for _ in range(slots)]
    # Contiguous blocks (not round-robin) keep each micro-batch's lengths similar.
    base, extra = divmod(len(batch), slots)
    start = 0
    for s in range(slots):
        size = base + (1 if s < extra else 0)
        per_slot[s] = list(batch[start : start + size])
        start += size
    return [per_slot[a * world_size + rank] for a in range(accumulation)]

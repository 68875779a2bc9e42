"""Instruction data for supervised fine-tuning: read, tokenise with a loss mask, pack, collate.

Formats (JSON Lines, one object per line). Each bad line raises one
:class:`~rlhfkit.data.types.DataFormatError` naming the file, the line and what to fix;
nothing is dropped silently.

- ``{"prompt": str, "response": str}``; a missing ``prompt`` reads as ``""``.
- ``{"messages": [{"role": str, "content": str}, ...]}``: a chat ending with an assistant turn.

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

**Packing.** :func:`pack_examples` puts whole examples into rows of at most ``max_length``
tokens (best-fit decreasing). :func:`collate` gives a packed row ``position_ids`` that
restart at 0 for each example and ``seq_ids`` from which :func:`block_causal_mask` builds a
4D block-diagonal causal mask, so no token attends across an example boundary: a packed
row gives each example the same per-token losses as running it alone (tested).
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from rlhfkit.data.readers import (  # one JSONL reader: the same line errors for every data file
    _iter_jsonl,
    _show,
    split_train_eval,
)
from rlhfkit.data.types import DataFormatError
from rlhfkit.errors import MissingFileError
from rlhfkit.sft.losses import IGNORE_INDEX

logger = logging.getLogger(__name__)


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


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def read_sft_data(path: str | Path) -> list[SFTExample]:
    """Read a JSONL file of ``{"prompt", "response"}`` and/or ``{"messages"}`` rows.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        DataFormatError: a line is malformed (file, line number, what to fix), or the file
            holds no examples.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"instruction data file {str(path)!r} does not exist (or is not a file)")
    examples = [_parse_row(row, str(path), n) for n, row in _iter_jsonl(path)]
    if not examples:
        raise DataFormatError(str(path), None, "contains no examples; check that this is the right file")
    return examples


_EXPECTED = 'a JSON object {"prompt": str, "response": str} or {"messages": [{"role": str, "content": str}, ...]}'


def _parse_row(row: Any, source: str, line: int) -> SFTExample:
    def bad(problem: str) -> DataFormatError:
        return DataFormatError(source, line, problem)

    if not isinstance(row, dict):
        raise bad(f"is {_show(row)}; expected {_EXPECTED}")
    where = f"{source}:{line}"
    if row.get("messages") is not None:
        if row.get("response") is not None:
            raise bad("has both 'messages' and 'response'; give either a chat ('messages') or a prompt/response pair")
        return _parse_messages(row["messages"], bad, where)
    if "response" not in row or row["response"] is None:
        raise bad(f"has no 'response' (keys: {', '.join(sorted(map(str, row))) or 'none'}); expected {_EXPECTED}")
    response, prompt = row["response"], row.get("prompt")
    if not isinstance(response, str):
        raise bad(f"'response' must be a string, got {_show(response)}")
    if not response.strip():
        raise bad("'response' is empty or only whitespace; every example needs a reply to learn from")
    if prompt is not None and not isinstance(prompt, str):
        raise bad(f"'prompt' must be a string, got {_show(prompt)}")
    return SFTExample(prompt=prompt or "", response=response, source=where)


def _parse_messages(messages: Any, bad, where: str) -> SFTExample:
    if not isinstance(messages, list) or not messages:
        raise bad(f"'messages' must be a non-empty list of {{\"role\": str, \"content\": str}}, got {_show(messages)}")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise bad(f"messages[{i}] must be an object {{\"role\": str, \"content\": str}}, got {_show(m)}")
        if m["role"] == "assistant" and not m["content"].strip():
            raise bad(f"messages[{i}] is an empty assistant turn; every assistant turn needs text to learn from")
    if messages[-1]["role"] != "assistant":
        raise bad(
            f"'messages' ends with a {messages[-1]['role']!r} turn; the last turn must be the assistant reply to learn "
            "(drop trailing turns, or move the row to the prompt file of PPO)"
        )
    users = [m["content"] for m in messages[:-1] if m["role"] == "user"]
    clean = tuple({"role": m["role"], "content": m["content"]} for m in messages)
    return SFTExample(prompt=users[-1] if users else "", response=messages[-1]["content"], messages=clean, source=where)


def split_examples(examples: Sequence[SFTExample], eval_fraction: float, seed: int) -> tuple[list[SFTExample], list[SFTExample]]:
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


def _render(tokenizer: Any, messages: Sequence[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def _cut_after_eos(reply: str, eos_text: str | None) -> str:
    """The reply through its end-of-turn token (the newline after it is template text, not a target)."""
    k = reply.rfind(eos_text) if eos_text else -1
    return reply[: k + len(eos_text)] if k >= 0 else reply.rstrip()  # type: ignore[arg-type]


def chat_segments(tokenizer: Any, messages: Sequence[dict[str, str]], assistant_turns: str = "all") -> tuple[list[tuple[str, bool]], bool]:
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
        reply = _cut_after_eos(through[len(before):], eos)
        segments += [(before[len(done):], False), (reply, True)]
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
    return [(before, False), (_cut_after_eos(whole[len(before):], eos), True)], False


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
    ) -> "EncodedSFT":
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
                "--max-length to keep more)", what, truncated, len(ids_all), max_length,
            )
        if fallbacks:
            logger.warning(
                "%s: for %d multi-turn chat(s) the chat template does not render earlier turns as a prefix of the "
                "whole conversation; only their final assistant turn is trained", what, fallbacks,
            )
        return cls(ids_all, labels_all, sources, truncated)


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
            raise DataFormatError(path or example.source, int(line) if line.isdigit() else None,
                                  f"the chat template cannot render this row: {e}") from None
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

    def to(self, device) -> "SFTBatch":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return SFTBatch(self.input_ids.to(device), self.labels.to(device), self.attention_mask.to(device),
                        mv(self.position_ids), mv(self.seq_ids))


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

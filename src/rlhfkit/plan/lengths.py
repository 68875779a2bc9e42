"""The run's real token lengths, for ``rlhfkit plan --prompts`` (rl) and ``--train`` (sft, rm, dpo).

Without data the plan counts every sequence at its maximum (``--max-prompt-length``,
``--max-length``). With the run's file it reads the texts, renders them as the trainer would
(the chat template by rlhfkit's one rule, :func:`~rlhfkit.models.tokenizers.use_chat_template`),
tokenizes them with the model's tokenizer and plans with the **longest** one, cut at the
configured maximum, as the trainer cuts it.

Why the longest and not a percentile: every trainer pads a batch to its longest row (the
rollout's prompts are left-padded to the batch's longest, ``sampling.encode_queries``; SFT,
reward-model and DPO batches are padded to their longest), so the batch that holds the longest
text is as large as if all its rows were that long, and the peak is that batch's, not a typical
one's. The median and 95th percentile are printed beside it, to show how far a long tail moves it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rlhfkit.errors import UserError


@dataclass(frozen=True)
class MeasuredLengths:
    """Token lengths of a run's texts, as the plan uses and prints them."""

    option: str  # "--prompts" or "--train"
    path: str
    what: str  # "prompts" or "sequences"
    count: int
    p50: int
    p95: int
    longest: int  # after the cut at `limit`
    limit: int  # --max-prompt-length or --max-length
    over_limit: int  # texts longer than `limit` before the cut
    list_size: int | None = None  # --train (rm/dpo): the most responses one list holds

    def describe(self) -> str:
        cut = f", {self.over_limit} cut at {self.limit}" if self.over_limit else ""
        cut += f"; lists of up to {self.list_size} responses" if self.list_size else ""
        return (
            f"{self.count} {self.what} of {self.option} {self.path}: median {self.p50}, p95 {self.p95}, longest "
            f"{self.longest} tokens{cut}; planned at the longest (a batch pads to its longest)"
        )


def percentile(values: Sequence[int], q: float) -> int:
    """The nearest-rank ``q``-th percentile (``0 < q <= 100``) of ``values``: the smallest value
    that at least ``q`` percent of them do not exceed."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summarise(
    lengths: Sequence[int], limit: int, *, option: str, path: str, what: str, list_size: int | None = None
) -> MeasuredLengths:
    """:class:`MeasuredLengths` of raw ``lengths`` (before any cut), each cut at ``limit``."""
    if not lengths:
        raise UserError(f"{option} {path}: no {what} in the file; give the file the run will read")
    cut = [min(n, limit) for n in lengths]
    return MeasuredLengths(
        option=option,
        path=path,
        what=what,
        count=len(lengths),
        p50=percentile(cut, 50),
        p95=percentile(cut, 95),
        longest=max(cut),
        limit=limit,
        over_limit=sum(n > limit for n in lengths),
        list_size=list_size,
    )


def prompt_lengths(tokenizer: Any, path: str, chat: bool) -> list[int]:
    """Tokens of each prompt of ``path`` as the rollout encodes it (``sampling.encode_queries``:
    rendered by ``sampling.render_prompt``, special tokens added only without the chat template),
    before the cut at ``--max-prompt-length``."""
    from rlhfkit.data.prompts import read_prompts
    from rlhfkit.sampling import render_prompt

    prompts = read_prompts(path, option="--prompts")
    texts = [render_prompt(tokenizer, p, chat) for p in prompts]
    return [len(tokenizer(t, add_special_tokens=not chat)["input_ids"]) for t in texts]


def preference_lengths(
    tokenizer: Any, path: str, chat: bool, encoder: bool, prompt_column: bool = False
) -> tuple[list[int], int]:
    """Tokens of every (prompt, response) of the preference file ``path`` as rm/dpo read it,
    before the cut at ``--max-length``, and the most responses one list holds. A decoder reads the prompt and response as a user and an
    assistant turn ending with EOS (``data.examples.encode_response``, what DPO runs; a decoder
    reward model reads the same turns), an encoder (BERT) the pair as two segments."""
    from rlhfkit.data.examples import encode_response
    from rlhfkit.data.readers import read_preferences

    examples = read_preferences(path, prompt_column=prompt_column, allow_ties=True)
    lengths = []
    for ex in examples:
        for response in ex.responses:
            if encoder:
                ids = tokenizer(ex.prompt, response)["input_ids"] if ex.prompt else tokenizer(response)["input_ids"]
            else:
                ids = encode_response(tokenizer, ex.prompt, response, chat=chat, max_length=10**9)[0]["input_ids"]
            lengths.append(len(ids))
    return lengths, max(len(ex.responses) for ex in examples)


def instruction_lengths(tokenizer: Any, path: str, chat: bool) -> list[int]:
    """Tokens of each example of the SFT file ``path`` as ``rlhfkit sft`` encodes it
    (``data.examples.encode_example``: prompt and reply, or the whole chat, with the reply's EOS),
    before the cut at ``--max-length``. Unpacked: with ``--packing`` a row holds up to
    ``--max-length`` tokens whatever the examples' lengths, so plan that run at ``--max-length``."""
    from rlhfkit.data.examples import encode_example
    from rlhfkit.data.instructions import read_sft_data

    return [len(encode_example(tokenizer, ex, max_length=10**9, chat_template=chat)[0]) for ex in read_sft_data(path)]

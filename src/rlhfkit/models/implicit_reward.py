"""A DPO policy read as a reward model: its implicit reward ``beta * (log pi(y|x) - log pi_ref(y|x))``.

DPO trains the policy so that this quantity ranks responses as the data does (Rafailov et
al. 2023, arXiv:2305.18290, eq. 5), so a DPO run can be evaluated and used like a reward
model: ``rlhfkit rm eval --model DPO_RUN`` and ``rlhfkit score --model DPO_RUN`` detect the
``rlhfkit_dpo.json`` that ``rlhfkit dpo`` writes beside each export (the reference model,
``beta``, the chat-template choice and the length limit) and score with
:class:`ImplicitReward`. A (prompt, response) is read exactly as in training
(:func:`rlhfkit.data.examples.encode_response`). It sits beside
:class:`~rlhfkit.models.reward.RewardModel` so that ``rm`` uses it without importing ``dpo``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rlhfkit.data.collate import EncodedPreferences
from rlhfkit.data.examples import encode_response, pad_right
from rlhfkit.data.types import PreferenceExample
from rlhfkit.errors import UserError
from rlhfkit.evaluation.scores import score_texts
from rlhfkit.models.hub import resolve_model, resolve_run_folder
from rlhfkit.models.logprobs import SequenceLogprobs
from rlhfkit.models.policy import load_policy

__all__ = ["DPO_INFO", "ImplicitReward", "is_dpo_model", "read_dpo_info"]

DPO_INFO = "rlhfkit_dpo.json"
"""Written beside every export of ``rlhfkit dpo``: ``reference``, ``beta``, ``loss``, ``chat_template``, ``max_length``."""


class ImplicitReward(nn.Module):
    """``beta * (log pi(y|x) - log pi_ref(y|x))`` of a DPO policy and its reference.

    Same interface as :class:`rlhfkit.models.reward.RewardModel` where ``rm eval`` and
    ``score`` use it: ``encode``, ``pad``, ``forward(**padded) -> (N,)`` and ``score``.
    """

    def __init__(
        self, policy: nn.Module, reference: nn.Module, tokenizer: Any, *, beta: float, chat: bool, max_length: int
    ):
        super().__init__()
        self.policy, self.reference = SequenceLogprobs(policy), SequenceLogprobs(reference)
        self.tokenizer, self.beta, self.chat, self.max_length = tokenizer, beta, chat, max_length

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, *, device: Any = None, max_length: int | None = None, option: str | None = "--model"
    ) -> ImplicitReward:
        """Load a DPO export (a run folder picks ``best/``) and the reference its ``rlhfkit_dpo.json`` names.
        ``option``: the flag that named the export, for the error about a folder that is not a loadable model."""
        path = resolve_model(name_or_path, option)
        info = read_dpo_info(path)
        policy, tokenizer = load_policy(path, device=device, option=option)
        reference, ref_tokenizer = load_policy(
            info["reference"], device=device, option=f"the reference named in {Path(path) / DPO_INFO}:"
        )
        if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise UserError(
                f"{path}: the reference {info['reference']} named in {DPO_INFO} has a different tokenizer; "
                f"the implicit reward compares both models on the same tokens. Fix 'reference' in {DPO_INFO}."
            )
        return cls(
            policy,
            reference,
            tokenizer,
            beta=float(info["beta"]),
            chat=bool(info["chat_template"]),
            max_length=max_length or int(info["max_length"]),
        )

    def forward(self, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor) -> Tensor:
        """Implicit rewards ``(N,)`` of right-padded sequences ``(N, T)``."""
        return self.beta * (
            self.policy(input_ids, attention_mask, response_mask)
            - self.reference(input_ids, attention_mask, response_mask)
        )

    def encode(self, prompt: str, response: str) -> tuple[dict[str, list[int]], int, bool]:
        return encode_response(self.tokenizer, prompt, response, chat=self.chat, max_length=self.max_length)

    def pad(self, features: Sequence[dict[str, list[int]]]) -> dict[str, Tensor]:
        return pad_right(self.tokenizer.pad_token_id, features)

    @torch.no_grad()
    def score(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        *,
        batch_size: int = 32,
        whiten: bool = False,
        eps: float = 1e-8,
    ) -> Tensor:
        """Implicit rewards ``(N,)`` of N (prompt, response) pairs (``whiten``: batch mean 0, std 1)."""
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses; pass one prompt per response")
        examples = [PreferenceExample(p, (r,), (0,)) for p, r in zip(prompts, responses)]
        data = EncodedPreferences.build(examples, self.encode, self.max_length, what="texts to score")
        per_text = score_texts(
            self, data, self.pad, batch_size, next(self.parameters()).device
        )  # each unique text once
        scores = per_text[torch.tensor([row[0] for row in data.lists])]  # (N,)
        if whiten:
            scores = (scores - scores.mean()) / (scores.std(unbiased=False) + eps)
        return scores


def is_dpo_model(name_or_path: str) -> bool:
    """Whether ``name_or_path`` (a folder, or a run folder's export) was written by ``rlhfkit dpo``."""
    return (Path(resolve_run_folder(str(Path(str(name_or_path)).expanduser()))) / DPO_INFO).is_file()


def read_dpo_info(path: str | Path) -> dict[str, Any]:
    f = Path(path) / DPO_INFO
    if not f.is_file():
        raise UserError(f"{path} has no {DPO_INFO}: it is not a model exported by 'rlhfkit dpo'")
    info = json.loads(f.read_text(encoding="utf-8"))
    missing = [k for k in ("reference", "beta", "chat_template", "max_length") if k not in info]
    if missing:
        raise UserError(f"{f} lacks {', '.join(missing)}; it was not written by this version of 'rlhfkit dpo'")
    return info

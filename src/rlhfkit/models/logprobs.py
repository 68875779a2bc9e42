"""Log-probabilities of response tokens under a causal LM: what PPO, DPO and their evaluations read.

Layout: ``input_ids = [prompt_ids | response_ids]`` of shape ``(B, P + N)``, the logits
predicting response token ``t`` read at position ``P - 1 + t`` (the state before the token is
chosen). Only the positions that predict response tokens go through the LM head
(``logits_to_keep``), and position ids come from the attention mask, so left padding shifts
nothing. :func:`response_logits` is the one forward pass; :func:`policy_logprobs` (the
rollout's reference and old log-probs, the KL of ``ppo-eval`` and ``dpo``) and
:class:`SequenceLogprobs` (``log pi(y | x)`` of whole responses, for DPO and its implicit
reward) are built on it.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from rlhfkit.models.packing import PackedBatch, packed_kwargs
from rlhfkit.models.policy import forward_accepts
from rlhfkit.ops import logprobs_from_logits, masked_sum, tempered

__all__ = ["position_ids_from_mask", "response_positions", "response_logits", "policy_logprobs", "SequenceLogprobs"]


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """``(B, T)`` positions counting real tokens only: left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_positions(packed: PackedBatch, total_length: int, n_response: int) -> Tensor:
    """``(B, N)``: where, in the packed row, the state predicting response token ``t`` of each
    row sits (padded column ``P - 1 + t``); 0 where that column is padding (masked later)."""
    p = total_length - n_response
    return packed.index[:, p - 1 : p - 1 + n_response].clamp(min=0)


def response_logits(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    n_response: int,
    output_hidden: bool = False,
    packed: PackedBatch | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Logits ``(B, N, V)`` predicting the last ``N`` tokens, and optionally the last hidden state ``(B, N, H)``.

    Only the positions that predict response tokens go through the LM head
    (``logits_to_keep``): the prompt positions' ``(B, P, V)`` logits are never built. With
    ``packed`` (:func:`rlhfkit.models.packing.pack` of the same batch, the model switched
    by :func:`~rlhfkit.models.packing.use_packed_attention`) the model runs on the packed
    row: no pad tokens, a shared prefix once.

    Args:
        model: a Hugging Face causal LM (possibly wrapped by peft).
        input_ids: ``(B, P + N)``, queries left-padded then responses right-padded.
        attention_mask: ``(B, P + N)``, 1 = real token.
        n_response: ``N``.
    """
    if packed is not None:
        keep = response_positions(packed, input_ids.shape[1], n_response)  # (B, N)
        out = model(
            **packed_kwargs(packed), logits_to_keep=keep.flatten(), output_hidden_states=output_hidden, use_cache=False
        )
        logits = out.logits[0].view(*keep.shape, -1)  # (B, N, V)
        hidden = out.hidden_states[-1][0, keep.flatten()].view(*keep.shape, -1) if output_hidden else None  # (B, N, H)
        return logits, hidden
    kwargs = dict(logits_to_keep=n_response + 1) if forward_accepts(model, "logits_to_keep") else {}
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        output_hidden_states=output_hidden,
        use_cache=False,
        **kwargs,
    )
    logits = out.logits[:, -n_response - 1 : -1]  # (B, N, V): position P-1+t predicts token t
    hidden = out.hidden_states[-1][:, -n_response - 1 : -1] if output_hidden else None  # (B, N, H)
    return logits, hidden


def policy_logprobs(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_ids: Tensor,
    temperature: float,
    packed: PackedBatch | None = None,
) -> Tensor:
    """Log-probs ``(M, N)`` of ``response_ids`` under a plain causal LM (the reference, or eval)."""
    logits, _ = response_logits(model, input_ids, attention_mask, response_ids.shape[1], packed=packed)
    return logprobs_from_logits(tempered(logits, temperature), response_ids)


class SequenceLogprobs(nn.Module):
    """``log pi(y | x)``: a causal LM's log-probability of each sequence's response tokens.

    ``forward(input_ids, attention_mask, response_mask)``, each ``(N, T)`` right-padded
    (:func:`rlhfkit.data.examples.pad_right`), returns ``(N,)`` float32: the sum over the tokens
    where ``response_mask`` is 1 of ``log softmax(logits at t - 1)[token t]``. Only the
    positions from the batch's earliest response token on go through the LM head
    (:func:`response_logits`): prompt logits are never built.
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor) -> Tensor:
        # One small host sync: where the response tokens start decides how many logits to build.
        first = max(1, int(response_mask.argmax(dim=1).min()))  # token 0 is never a target
        n = input_ids.shape[1] - first
        logits, _ = response_logits(
            self.policy, input_ids, attention_mask, n
        )  # (N, n, V): position first-1+t predicts token first+t
        logprobs = logprobs_from_logits(logits, input_ids[:, first:])  # (N, n)
        return masked_sum(logprobs.float(), response_mask[:, first:], dim=1)  # (N,)

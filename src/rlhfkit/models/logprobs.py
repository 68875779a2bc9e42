"""Log-probabilities of response tokens under a causal LM: what PPO, DPO and their evaluations read.

Layout: ``input_ids = [prompt_ids | response_ids]`` of shape ``(B, P + N)``, the logits
predicting response token ``t`` read at position ``P - 1 + t`` (the state before the token is
chosen). Only the positions that predict response tokens go through the LM head
(``logits_to_keep``), and position ids come from the attention mask, so left padding shifts
nothing. :func:`response_logits` is the one forward pass; :func:`policy_logprobs` (the
rollout's reference and old log-probs, the KL of ``ppo-eval`` and ``dpo``) and
:class:`SequenceLogprobs` (``log pi(y | x)`` of whole responses, for DPO and its implicit
reward) are built on it. :func:`response_hidden` is the same pass stopped at the last hidden
states, for :func:`rlhfkit.models.chunked_logprobs.logprobs_from_hidden` (``rl
--logprob-chunk-size``), with :func:`lm_head_weights` the head's weight it reads.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from rlhfkit.errors import UserError
from rlhfkit.models.chunked_logprobs import logprobs_from_hidden
from rlhfkit.models.packing import PackedBatch, packed_kwargs
from rlhfkit.models.policy import forward_accepts
from rlhfkit.ops import logprobs_from_logits, masked_sum, tempered

__all__ = [
    "position_ids_from_mask",
    "response_positions",
    "response_logits",
    "response_hidden",
    "lm_head_weights",
    "policy_logprobs",
    "SequenceLogprobs",
]


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


def response_hidden(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, n_response: int, packed: PackedBatch | None = None
) -> Tensor:
    """The last hidden states ``(B, N, H)`` (after the final norm) predicting the last ``N`` tokens.

    The same forward pass as :func:`response_logits`, through the model's own ``forward`` (so
    DDP, peft and autocast see an ordinary call), but with one position's logits only
    (``logits_to_keep``): the response logits are left to
    :func:`rlhfkit.models.chunked_logprobs.logprobs_from_hidden`, a chunk at a time.
    """
    if packed is not None:
        keep = response_positions(packed, input_ids.shape[1], n_response)  # (B, N)
        out = model(
            **packed_kwargs(packed), logits_to_keep=keep.new_zeros(1), output_hidden_states=True, use_cache=False
        )
        return out.hidden_states[-1][0, keep.flatten()].view(*keep.shape, -1)  # (B, N, H)
    kwargs = dict(logits_to_keep=1) if forward_accepts(model, "logits_to_keep") else {}
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        output_hidden_states=True,
        use_cache=False,
        **kwargs,
    )
    return out.hidden_states[-1][:, -n_response - 1 : -1]  # (B, N, H): position P-1+t predicts token t


def lm_head_weights(model: nn.Module, option: str = "--logprob-chunk-size") -> tuple[Tensor, Tensor | None]:
    """``(weight (V, H), bias (V,) or None)`` of a causal LM's output layer (a tied embedding's
    weight is the same tensor), looking through DDP and peft wrappers.

    Raises :class:`UserError` naming ``option`` when the head is not an ``nn.Linear`` (LoRA on
    the LM head itself) or its weight is sharded (FSDP2 gathers it only inside the model's
    own forward pass): log-probs from hidden states cannot read it there.
    """
    inner = getattr(model, "module", model)  # under DistributedDataParallel
    head = inner.get_output_embeddings()
    if not isinstance(head, nn.Linear):  # nn.Linear and its subclasses (cpu_linear.OneDNNLinear); not peft's LoRA layer
        raise UserError(
            f"{option}: the model's output layer is a {type(head).__module__}.{type(head).__qualname__}, not a plain "
            "torch.nn.Linear (LoRA on lm_head?); "
            f"log-probs from hidden states need its weight as one matrix. Pass {option} 0, or leave lm_head out of "
            "--lora-target."
        )
    if hasattr(head.weight, "placements"):  # a DTensor: FSDP2's shard
        raise UserError(
            f"{option}: the LM head's weight is sharded (FSDP2), and it is gathered only inside the model's forward "
            f"pass; pass {option} 0 under fsdp2."
        )
    return head.weight, head.bias


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
    (:func:`response_logits`): prompt logits are never built. With ``chunk_size`` (``dpo
    --logprob-chunk-size``) not even those: the pass stops at the hidden states
    (:func:`response_hidden`) and :func:`~rlhfkit.models.chunked_logprobs.logprobs_from_hidden`
    builds ``chunk_size`` tokens' logits at a time, again in the backward pass.
    """

    def __init__(self, policy: nn.Module, chunk_size: int = 0):
        super().__init__()
        self.policy = policy
        self.chunk_size = chunk_size

    def forward(self, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor) -> Tensor:
        # One small host sync: where the response tokens start decides how many logits to build.
        first = max(1, int(response_mask.argmax(dim=1).min()))  # token 0 is never a target
        n = input_ids.shape[1] - first
        labels = input_ids[:, first:]  # (N, n)
        if self.chunk_size:
            hidden = response_hidden(self.policy, input_ids, attention_mask, n)  # (N, n, H)
            weight, bias = lm_head_weights(self.policy)
            logprobs, _ = logprobs_from_hidden(hidden, weight, labels, bias=bias, chunk_size=self.chunk_size)
        else:
            logits, _ = response_logits(
                self.policy, input_ids, attention_mask, n
            )  # (N, n, V): position first-1+t predicts token first+t
            logprobs = logprobs_from_logits(logits, labels)  # (N, n)
        return masked_sum(logprobs.float(), response_mask[:, first:], dim=1)  # (N,)

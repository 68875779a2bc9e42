"""Held-out evaluation of a DPO policy.

- On held-out lists, the implicit reward ``beta * (log pi - log pi_ref)`` of every response
  scored by the reward-model metrics (:func:`rlhfkit.evaluation.scores.evaluate_scores`:
  pairwise and list-exact accuracy, Kendall tau, accuracy by rank gap, chosen and rejected
  means), the loss, and the log-probability margins: ``logps_margin`` is the mean over
  ordered pairs of ``log pi(y_w) - log pi(y_l)`` and ``ref_logps_margin`` the same under the
  reference, so one sees whether DPO raised the better responses or only lowered the
  worse (``logps_chosen``/``logps_rejected``: mean log-probability of the best-ranked
  responses and of the others).
- On held-out prompts, the KL to the reference: one response per prompt sampled from the
  policy (temperature 1, a fixed seed, so successive evaluations see comparable samples),
  ``KL(pi || pi_ref) ~ mean over responses of sum_t [log pi - log pi_ref]`` (the k1
  estimator on the policy's own samples: unbiased, http://joschu.net/blog/kl-approx.html),
  in nats per response, with its standard error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from rlhfkit.data.collate import EncodedPreferences, collate
from rlhfkit.data.examples import Pad
from rlhfkit.data.prompts import Prompt
from rlhfkit.dpo.losses import best_mask, list_losses, pair_margins
from rlhfkit.evaluation.scores import evaluate_scores, score_texts
from rlhfkit.models.logprobs import policy_logprobs
from rlhfkit.ops import masked_mean, masked_sum
from rlhfkit.sampling import SamplingSettings, iter_samples

__all__ = ["evaluate_lists", "sampled_kl", "kl_prompts"]


@torch.no_grad()
def evaluate_lists(
    model: nn.Module,
    data: EncodedPreferences,
    ref_logprobs: Tensor,
    pad: Pad,
    *,
    loss: str,
    beta: float,
    batch_size: int,
    device: Any,
) -> tuple[dict[str, Any], Tensor]:
    """Metrics on held-out lists (module docstring) and the implicit rewards ``(n_texts,)``.

    ``model`` maps padded sequences to ``log pi`` (:class:`~rlhfkit.models.logprobs.SequenceLogprobs`);
    ``ref_logprobs (n_texts,)`` are the reference's, computed once before training.
    """
    logprobs = score_texts(model, data, pad, batch_size, device)  # (n_texts,), each unique text once
    rewards = beta * (logprobs - ref_logprobs)  # implicit rewards, arXiv:2305.18290 eq. 5
    metrics = evaluate_scores(data, rewards)
    batch = collate(data, list(range(len(data))), lambda features: {})  # every list, (B, K) layout
    lp, ref = batch.gather_lists(logprobs[batch.text_ids]), batch.gather_lists(ref_logprobs[batch.text_ids])  # (B, K)
    lengths = batch.gather_lists(batch.response_lengths.float())  # (B, K)
    metrics["loss"] = list_losses(loss, lp, ref, batch.ranks, batch.list_mask, beta, lengths).mean().item()
    best = best_mask(batch.ranks, batch.list_mask)  # (B, K)
    metrics["logps_chosen"] = masked_mean(lp, best).item()
    metrics["logps_rejected"] = masked_mean(lp, batch.list_mask.bool() & ~best).item()
    for key, values in (("logps_margin", lp), ("ref_logps_margin", ref), ("reward_margin", beta * (lp - ref))):
        total, pairs = pair_margins(values, batch.ranks, batch.list_mask)
        metrics[key] = (total / pairs.clamp(min=1)).item()
    return metrics, rewards


def kl_prompts(prompts: Sequence[str], n: int, chat: bool) -> list[Prompt]:
    """The first ``n`` distinct held-out prompts (without the chat template, only non-empty ones:
    an empty plain prompt gives the first response token no position to be predicted from)."""
    distinct = [p for p in dict.fromkeys(prompts) if chat or p.strip()]
    return [Prompt(p) for p in distinct[:n]]


@torch.no_grad()
def sampled_kl(
    policy: nn.Module,
    reference: Callable[[], AbstractContextManager[nn.Module]],
    tokenizer: Any,
    prompts: Sequence[Prompt],
    settings: SamplingSettings,
    *,
    chat: bool,
    batch_size: int,
    seed: int,
) -> dict[str, float]:
    """``{"kl", "kl_std_error", "kl_response_tokens"}`` on one sample of the policy per prompt (module docstring).

    ``reference()`` enters the reference policy (the LoRA policy with its adapter disabled,
    or a model loaded for this call); it is entered once, after sampling.
    """
    device = next(policy.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        samples = list(iter_samples(policy, tokenizer, prompts, 1, settings, chat=chat, batch_size=batch_size))

    def logprobs(model: nn.Module) -> Tensor:  # (M,) log pi(y|x) of every sample's response tokens
        return torch.cat(
            [
                masked_sum(
                    policy_logprobs(
                        model,
                        torch.cat([s.query_ids, s.response_ids], 1),
                        torch.cat([s.query_mask, s.response_mask], 1),
                        s.response_ids,
                        1.0,
                    ).float(),
                    s.response_mask,
                    dim=1,
                )
                for s in samples
            ]
        )

    own = logprobs(policy)
    with reference() as ref_model:
        kl = (own - logprobs(ref_model)).cpu()  # k1 per response, http://joschu.net/blog/kl-approx.html
    n = len(kl)
    return {
        "kl": kl.mean().item(),
        "kl_std_error": kl.std().item() / math.sqrt(n) if n > 1 else float("nan"),
        "kl_response_tokens": sum(int(s.response_mask.sum()) for s in samples) / max(n, 1),
    }

"""``rlhfkit rl`` (and ``rlhfkit ppo``): fine-tune a policy online against a reward source,
leashed by KL to the reference. One trainer, four algorithms that differ only in the
advantage step and in whether a critic exists (``--algo``):

- ``ppo``: a critic (a separate model, or a value head on the actor) and GAE;
- ``rloo``: K samples per prompt, each against the mean of the other K - 1 (arXiv:2402.14740);
- ``grpo``: K samples per prompt, scores normalised within the group, the KL as a k3 loss
  term or a reward penalty (arXiv:2402.03300); ``--no-scale-rewards --loss-aggregation
  token`` is Dr. GRPO (arXiv:2503.20783);
- ``reinforce++``: the token-level KL penalty in the reward, returns whitened over the
  global batch (arXiv:2501.03262).

One update, top to bottom (the loop in :func:`train_rl` reads in this order):

1. rollout: ``B`` prompts, each sampled ``K`` times -> ``M = B * K`` responses ->
   ``old_logprobs`` (from the sampling pass), ``ref_logprobs``, ``old_values`` (PPO)
   ``(M, N)`` and ``scores`` ``(M,)`` (:mod:`rlhfkit.rl.rollout`), on packed rows; with
   ``--dynamic-sampling`` (DAPO) equal-score groups are dropped and more prompts sampled
   (:func:`refill_informative`);
2. scores: running whitening or scaling, a penalty for responses cut without EOS, DAPO's soft
   overlong penalty, clipping;
3. rewards and advantages for ``--algo`` (:func:`compute_advantages`);
4. ``ppo_epochs`` passes of shuffled minibatches, each one
   :func:`~rlhfkit.training.step.train_step` per network (:func:`network_steps`): the clipped
   surrogate (:mod:`rlhfkit.rl.losses`), and for PPO the value loss, each network with its
   own optimizer, learning rate and gradient clipping;
5. the KL controller moves ``kl_coef``; metrics, samples, checkpoint.

Micro-batch losses are weighted by their share of the minibatch's real tokens (or of its
sequences, with ``--loss-aggregation sequence``), so the gradient is the minibatch's
whatever ``grad_accum`` is.

Every random choice is either the global RNG (sampling), saved in the checkpoint, or a
generator seeded by ``(seed, step)`` (prompt order, dynamic sampling's extra prompts, minibatch
order), so ``--resume``
continues exactly the run that stopped.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch

from rlhfkit.checkpoint import export_pretrained
from rlhfkit.config import ConfigError, opt, require
from rlhfkit.data.prompts import read_prompts
from rlhfkit.defaults import (
    BATCH_SIZE,
    EXPORT,
    MINI_BATCH_SIZE,
    RL_ALGORITHMS,
    RL_LORA_DROPOUT,
    SNAPSHOTS,
    samples_per_prompt,
)
from rlhfkit.errors import RunStopped
from rlhfkit.models.chunked_logprobs import logprobs_from_hidden
from rlhfkit.models.cpu_linear import apply_cpu_matmul
from rlhfkit.models.hub import resolve_model
from rlhfkit.models.logprobs import lm_head_weights, response_hidden, response_logits
from rlhfkit.models.lora import with_lora
from rlhfkit.models.packing import packing_unsupported, use_packed_attention
from rlhfkit.models.policy import load_policy
from rlhfkit.models.policy_info import POLICY_INFO
from rlhfkit.models.snapshots import save_adapter, snapshot_name
from rlhfkit.models.tokenizers import use_chat_template
from rlhfkit.ops import logprobs_from_logits, masked_mean, masked_sum, tempered
from rlhfkit.rl import micro_batch
from rlhfkit.rl.advantages import (
    broadcast_to_tokens,
    compute_gae,
    discounted_returns,
    equal_score_groups,
    grpo_advantages,
    rloo_advantages,
)
from rlhfkit.rl.critic import ActorCritic, load_critic
from rlhfkit.rl.kl import AdaptiveKLController, FixedKLController, kl_estimate
from rlhfkit.rl.losses import (
    entropy_bonus,
    explained_variance,
    kl_loss,
    policy_loss,
    value_loss,
)
from rlhfkit.rl.reward_sources import RewardModelSource, RewardSourceOptions
from rlhfkit.rl.rewards import RunningMoments, compute_rewards, overlong_penalty
from rlhfkit.rl.rollout import Rollout, concat_rollouts, make_rollout, pack_rows
from rlhfkit.sampling import SamplingOptions
from rlhfkit.tracking import plot_curves, read_metrics
from rlhfkit.training.cadence import Cadence
from rlhfkit.training.distributed import settle_roots, shard_frozen
from rlhfkit.training.optim import make_optimizer
from rlhfkit.training.options import LoraOptions, OptimOptions, RunOptions
from rlhfkit.training.run import Run, TrainState, start_run
from rlhfkit.training.step import train_step

logger = logging.getLogger(__name__)

__all__ = ["RLConfig", "PPOConfig", "ALGORITHMS", "train_rl", "train_ppo"]

ALGORITHMS = RL_ALGORITHMS

PPO_HINT = "Lower --lr or --critic-lr, or check the reward scale (try --score-norm whiten)."


@dataclass(kw_only=True)
class RLConfig(SamplingOptions, RewardSourceOptions, RunOptions, OptimOptions, LoraOptions):
    """Fine-tune a language model online against a reward source, with a KL penalty to the reference:
    PPO with a critic, or the critic-free RLOO, GRPO and REINFORCE++."""

    algo: Literal[ALGORITHMS] = opt(
        "ppo",
        "ppo (a critic, GAE), rloo (leave-one-out baseline), grpo (group-normalised "  # type: ignore[valid-type]
        "scores) or reinforce++ (token-level KL, globally whitened returns)",
    )
    samples_per_prompt: int | None = opt(
        None, "responses sampled per prompt, the group of rloo/grpo (default: 1 for ppo, 4 otherwise)", ge=1
    )
    kl_penalty: Literal["auto", "reward", "loss", "none"] = opt(
        "auto",
        "where the KL to the reference enters: a per-token penalty in "
        "the reward, a k3 term in the loss, or none (no KL term and no reference model held, as DAPO); "
        "auto: loss for grpo, reward otherwise",
    )
    reference: str | None = opt(
        None,
        "the frozen model the KL term compares with: alias, folder or hub id, resolved like --policy, with the "
        "policy's tokenizer (default: the starting --policy). InstructGPT-style rounds: --policy LAST_RUN/final "
        "continues from the last round while --reference SFT_MODEL keeps the KL anchored to the SFT model",
    )
    scale_rewards: bool = opt(
        True,
        "grpo: divide group-centred scores by the group's std (--no-scale-rewards with "
        "--loss-aggregation token is Dr. GRPO)",
    )
    loss_aggregation: Literal["token", "sequence"] | None = opt(
        None,
        "policy loss over a minibatch: mean over every real "
        "token, or over sequences of each one's token mean "
        "(default: sequence for grpo, token otherwise)",
    )
    dynamic_sampling: bool = opt(
        False,
        "rloo/grpo: drop the prompts whose K scores are all equal (no learning signal) and sample more prompts "
        "until the batch has --batch-size informative ones, at most --max-resample-batches more rollouts "
        "(DAPO's dynamic sampling, arXiv:2503.14476 sec. 3.2)",
    )
    max_resample_batches: int | None = opt(
        None,
        "dynamic sampling: at most this many extra rollouts of --batch-size prompts per update; then the batch is "
        "filled with equal-score groups (advantage 0), as without dynamic sampling (default: 3)",
        ge=1,
    )
    max_steps: int = opt(100, "updates in the run (one rollout batch and its optimisation each)", ge=1, was=("steps",))
    batch_size: int = opt(
        BATCH_SIZE["rl"],
        "prompts per rollout, per process (a rollout has batch_size x samples_per_prompt responses)",
        ge=1,
    )
    mini_batch_size: int = opt(MINI_BATCH_SIZE, "rollout rows (responses) per optimizer step", ge=1)
    micro_batch_size: str | None = opt(
        None,
        "rows per forward and backward pass: N (sets --grad-accum to --mini-batch-size / N), or auto: the largest "
        "that fits the device's free memory by rlhfkit plan's estimate (logged; see docs/planning.md)",
    )
    ppo_epochs: int = opt(4, "passes over each rollout batch", ge=1)
    temperature: float = opt(1.0, "sampling temperature (log-probs are taken at the same temperature)", gt=0)
    score_norm: Literal["none", "scale", "whiten"] = opt(
        "none", "normalise scores by running statistics: divide by the std, or also subtract the mean"
    )
    score_clip: float | None = opt(None, "clip (normalised) scores to [-c, c]", gt=0)
    missing_eos_penalty: float | None = opt(
        None, "subtract this from the score of responses cut at max_new_tokens without EOS"
    )
    kl_coef: float | None = opt(
        None,
        "KL penalty coefficient beta (initial value with --adaptive-kl) (default: 0.05; 0 with --kl-penalty none)",
        ge=0,
    )
    kl_estimator: Literal["k1", "k2", "k3"] = opt(
        "k1", "per-token KL estimator in the reward (http://joschu.net/blog/kl-approx.html)"
    )
    adaptive_kl: bool = opt(False, "adapt kl_coef toward --kl-target (Ziegler et al. 2019)")
    kl_target: float = opt(6.0, "adaptive KL: target KL per response, in nats", gt=0)
    kl_horizon: float = opt(10000, "adaptive KL: horizon in episodes", gt=0)
    max_kl: float | None = opt(None, "stop the run when the mean KL per response exceeds this (nats)", gt=0)
    gamma: float = opt(1.0, "GAE discount", ge=0, le=1)
    lam: float = opt(0.95, "GAE lambda", ge=0, le=1)
    whiten_advantages: bool = opt(True, "ppo: whiten advantages over the real tokens of the rollout (all processes)")
    clip_eps: float = opt(0.2, "PPO ratio clip range: the ratio is clipped to [1 - eps, 1 + eps]", gt=0)
    clip_eps_high: float | None = opt(
        None,
        "upper clip range: the ratio is clipped to [1 - clip_eps, 1 + clip_eps_high] (DAPO's clip-higher, "
        "arXiv:2503.14476 sec. 3.1, e.g. 0.28 with --clip-eps 0.2) (default: --clip-eps)",
        gt=0,
    )
    mask_truncated: bool = opt(
        False,
        "responses cut at --max-new-tokens without EOS contribute nothing to the policy loss (DAPO's "
        "overlong filtering, arXiv:2503.14476 sec. 3.4)",
    )
    overlong_buffer: int | None = opt(
        None,
        "soft overlong penalty: the last L tokens before --max-new-tokens cost a penalty growing linearly "
        "to --overlong-penalty at --max-new-tokens (DAPO eq. 13, arXiv:2503.14476 sec. 3.4)",
        ge=1,
    )
    overlong_penalty: float | None = opt(
        None, "soft overlong penalty at --max-new-tokens, in score units (default: 1.0; needs --overlong-buffer)", ge=0
    )
    vf_clip: float | None = opt(0.2, "value clip range (none = unclipped value loss)", gt=0)
    vf_coef: float = opt(0.1, "weight of the value loss", ge=0)
    entropy_coef: float = opt(0.0, "weight of the entropy bonus", ge=0)
    logprob_chunk_size: int = opt(
        0,
        "the update's log-probs and entropy from the last hidden states, this many response tokens' logits "
        "at a time, recomputed in the backward pass (no (rows, tokens, vocab) logits kept); 0: build the "
        "logits at once (faster; see docs/scaling.md). Not under fsdp2",
        ge=0,
    )
    lr: float = opt(1e-5, "actor learning rate", gt=0)
    critic_lr: float | None = opt(None, "critic (or value head) learning rate (default: --lr)", gt=0)
    warmup_ratio: float = opt(0.0, "share of the updates spent warming the learning rate up", ge=0, lt=1)
    packing: bool = opt(
        True,
        "run the scoring and training passes on packed rows: no pad tokens, and the opening "
        "tokens every prompt shares (a chat template's system prompt) computed once",
    )
    rollout_logprobs: Literal["sampling", "forward"] = opt(
        "sampling",
        "where the rollout's old log-probs come from: the sampling pass itself (no extra forward pass; "
        "with top-k/top-p filters a forward pass is used anyway) or a forward pass over the finished responses",
    )
    critic: str = opt(
        "auto",
        "value-head, reward-model (InstructGPT), policy, or a model folder; auto: reward-model when "
        "it shares the policy's tokenizer, else value-head",
    )
    lora_dropout: float = opt(
        RL_LORA_DROPOUT, "LoRA dropout (0 keeps log-probs of the rollout and the update equal)", ge=0, lt=1
    )
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass to save memory")
    frozen_models: Literal["shard", "replicate"] = opt(
        "shard",
        "under FSDP2, the frozen reference and reward models: shard them like the trained networks (1/N of "
        "their weights per process) or replicate them (a full copy per process: no gathering per block, faster "
        "for small models)",
    )
    save_every: int = opt(
        25, "write a resumable checkpoint every N updates (and after the last, unless --no-final-checkpoint)", ge=1
    )
    save_policy_every: int | None = opt(
        None,
        "write the policy to OUTPUT/snapshots/update-N/ after every N updates (with --lora only the adapter), "
        "for a curve over the run; the last update is final/ (default: none)",
        ge=1,
    )
    log_every: int = opt(1, "log metrics every N updates", ge=1)
    sample_every: int = opt(10, "print a few generations with their scores every N updates (0 = never)", ge=0)
    n_samples: int = opt(3, "generations printed each time", ge=0)

    @property
    def uses_reference(self) -> bool:
        """Whether the KL to the reference policy enters the objective. Without it (``--kl-penalty
        none``, or ``--kl-coef 0`` and no --adaptive-kl) no reference is held or run, and no KL is
        logged: there is nothing to compare with."""
        return self.kl_penalty != "none" and (self.kl_coef > 0 or self.adaptive_kl)

    def validate(self) -> None:
        super().validate()
        if self.samples_per_prompt is None:
            self.samples_per_prompt = samples_per_prompt(self.algo)
        if self.kl_penalty == "auto":
            self.kl_penalty = "loss" if self.algo == "grpo" else "reward"
        if self.loss_aggregation is None:
            self.loss_aggregation = "sequence" if self.algo == "grpo" else "token"
        if self.kl_penalty == "none":  # DAPO, arXiv:2503.14476 sec. 2.3: no KL term, no reference model
            require(
                self.reference is None,
                f"--reference {self.reference} names the model of the KL term, and --kl-penalty none drops that term "
                "(no reference is loaded); remove --reference, or choose --kl-penalty reward or loss to keep the KL "
                "leash to it",
            )
            require(
                not self.kl_coef and not self.adaptive_kl,
                f"--kl-penalty none drops the KL term and the reference model, so it cannot take "
                f"{'--adaptive-kl' if self.adaptive_kl else f'--kl-coef {self.kl_coef}'}; remove that option, or "
                "choose --kl-penalty reward or loss to keep the KL leash",
            )
            if self.max_kl is not None:
                logger.warning("--max-kl %g is ignored: --kl-penalty none computes no KL", self.max_kl)
            self.kl_coef = 0.0
        elif self.kl_coef is None:
            self.kl_coef = 0.05
        if self.reference is not None and not self.uses_reference:
            logger.warning(
                "--reference %s is ignored: --kl-coef 0 without --adaptive-kl has no KL term, so no reference is "
                "loaded; give --kl-coef > 0 to keep the KL leash to it",
                self.reference,
            )
        require(
            self.overlong_penalty is None or self.overlong_buffer is not None,
            f"--overlong-penalty {self.overlong_penalty} needs --overlong-buffer L: the penalty grows over the last L "
            "tokens before --max-new-tokens (e.g. --overlong-buffer "
            f"{max(1, self.max_new_tokens // 4)})",
        )
        if self.overlong_buffer is not None:
            require(
                self.overlong_buffer <= self.max_new_tokens,
                f"option --overlong-buffer ({self.overlong_buffer}) must be at most --max-new-tokens "
                f"({self.max_new_tokens}): the penalty runs over the last L tokens a response can have; e.g. "
                f"--overlong-buffer {max(1, self.max_new_tokens // 4)}",
            )
            if self.overlong_penalty is None:
                self.overlong_penalty = 1.0
        require(
            self.algo not in ("rloo", "grpo") or self.samples_per_prompt >= 2,
            f"--algo {self.algo} compares the samples of a prompt with each other: it needs --samples-per-prompt 2 or "
            f"more (got {self.samples_per_prompt})",
        )
        require(
            self.algo != "ppo" or self.kl_penalty != "loss",
            "--algo ppo takes the KL as a reward penalty (or none); --kl-penalty loss is for the critic-free algorithms",
        )
        require(
            not self.dynamic_sampling or self.algo in ("rloo", "grpo"),
            f"--dynamic-sampling drops the prompts whose K samples all scored the same, which only rloo and grpo "
            f"compare; --algo {self.algo} learns from every response: remove --dynamic-sampling or use --algo grpo",
        )
        if self.save_policy_every is not None and self.save_policy_every >= self.max_steps:
            logger.warning(
                "--save-policy-every %d writes no snapshot: the run has %d updates and the last is final/; "
                "e.g. --save-policy-every %d",
                self.save_policy_every,
                self.max_steps,
                max(1, self.max_steps // 4),
            )
        if self.max_resample_batches is not None and not self.dynamic_sampling:
            logger.warning("--max-resample-batches %d is ignored without --dynamic-sampling", self.max_resample_batches)
        elif self.max_resample_batches is None:
            self.max_resample_batches = 3
        rows = self.batch_size * self.samples_per_prompt
        require(
            self.mini_batch_size <= rows and rows % self.mini_batch_size == 0,
            f"option --mini-batch-size ({self.mini_batch_size}) must divide the rollout's {rows} responses (--batch-size "
            f"x --samples-per-prompt) so each epoch sees every response once; e.g. --mini-batch-size "
            f"{math.gcd(rows, self.mini_batch_size)}",
        )
        if self.micro_batch_size is not None:
            self._micro_batch()
        require(
            self.mini_batch_size % self.grad_accum == 0,
            f"option --grad-accum ({self.grad_accum}) must divide --mini-batch-size ({self.mini_batch_size}): each "
            "optimizer step splits its minibatch into grad_accum equal micro-batches",
        )
        if self.algo != "ppo" and self.critic != "auto":
            logger.warning("--critic %s is ignored: --algo %s builds no critic", self.critic, self.algo)
        if self.top_k or self.top_p < 1:
            logger.warning(
                "top_k=%d top_p=%g: PPO's log-probs do not model these filters, so the ratio is off; "
                "keep them off for training",
                self.top_k,
                self.top_p,
            )

    def _micro_batch(self) -> None:
        """``--micro-batch-size``: ``auto`` (chosen once the models are loaded) or N, which sets ``grad_accum``."""
        value = str(self.micro_batch_size).strip().lower()
        self.micro_batch_size = value
        if value == "auto":
            require(
                self.grad_accum == 1,
                f"--micro-batch-size auto chooses --grad-accum itself; remove --grad-accum {self.grad_accum}, or give "
                "--micro-batch-size N",
            )
            return
        require(
            value.isdigit() and int(value) >= 1,
            f"--micro-batch-size {self.micro_batch_size}: give a number of rows (e.g. 4) or auto",
        )
        rows = int(value)
        require(
            self.mini_batch_size % rows == 0,
            f"--micro-batch-size {rows} must divide --mini-batch-size ({self.mini_batch_size}): each optimizer step "
            f"splits its minibatch into equal micro-batches; e.g. --micro-batch-size {math.gcd(rows, self.mini_batch_size)}",
        )
        require(
            self.grad_accum in (1, self.mini_batch_size // rows),
            f"--micro-batch-size {rows} with --mini-batch-size {self.mini_batch_size} means --grad-accum "
            f"{self.mini_batch_size // rows}, and --grad-accum {self.grad_accum} was given; give one of the two",
        )
        self.grad_accum = self.mini_batch_size // rows


@dataclass(kw_only=True)
class PPOConfig(RLConfig):
    """Fine-tune a language model with PPO against a reward model, with a KL penalty to the reference
    (``rlhfkit rl --algo ppo``)."""

    def validate(self) -> None:
        require(self.algo == "ppo", f"rlhfkit ppo runs PPO; for --algo {self.algo} use rlhfkit rl --algo {self.algo}")
        super().validate()


# ------------------------------------------------------------------ building blocks
def load_models(cfg: RLConfig, device):
    """(tokenizer, ActorCritic, frozen reference (None without a KL term, and with LoRA when the reference is the
    starting policy: the actor with its adapter off), reward source, the critic kind used, packing on)."""
    actor, tokenizer = load_policy(cfg.policy)
    apply_cpu_matmul(cfg.cpu_matmul, device, actor)  # before the reference copy and LoRA: all inherit these
    packing = cfg.packing and packing_unsupported(actor) is None
    if cfg.packing and not packing:
        logger.warning("--packing is off for %s: %s", cfg.policy, packing_unsupported(actor))
    if packing:
        use_packed_attention(actor)
    if cfg.gradient_checkpointing:
        actor.gradient_checkpointing_enable()
    ref_model = None
    if cfg.uses_reference and separate_reference(cfg):
        ref_model = load_reference(cfg, tokenizer, device, packing)
    if cfg.lora:
        actor = with_lora(actor, cfg, "CAUSAL_LM")
    elif cfg.uses_reference and ref_model is None:
        ref_model = copy.deepcopy(actor).to(device).eval().requires_grad_(False)
    reward = cfg.load_reward(device, cfg.cpu_matmul)
    if cfg.algo != "ppo":  # critic-free: no value network is built or held
        model = ActorCritic(actor, None, value_head=False)
        return tokenizer, model.eval(), ref_model, reward, "none", packing
    critic_spec = cfg.critic
    if critic_spec == "auto":
        shares = (
            isinstance(reward, RewardModelSource)
            and reward.model.meta.kind == "decoder"
            and reward.model.tokenizer.get_vocab() == tokenizer.get_vocab()
        )
        critic_spec = "reward-model" if shares else "value-head"
    critic = load_critic(
        critic_spec, tokenizer, reward=cfg.reward if isinstance(reward, RewardModelSource) else None, policy=cfg.policy
    )
    apply_cpu_matmul(cfg.cpu_matmul, device, critic)
    if critic is not None and packing:
        if packing_unsupported(critic.model) is not None:
            raise ConfigError(
                f"--packing: the critic {critic_spec} cannot run packed batches "
                f"({packing_unsupported(critic.model)}); pass --no-packing"
            )
        use_packed_attention(critic.model)
    model = ActorCritic(actor, critic)
    model.eval()  # no dropout anywhere: rollout and update must see the same policy
    return tokenizer, model, ref_model, reward, critic_spec, packing


def _local(name: str) -> str:
    """A resolved model name as one spelling: the real path of a local folder, a hub id as it is."""
    return str(Path(name).resolve()) if Path(name).exists() else name


def separate_reference(cfg: RLConfig) -> bool:
    """Whether ``--reference`` names another model than ``--policy`` (both resolved: an alias, a run
    folder's export, a symlink). ``False`` keeps the one-model path: a copy of the starting policy,
    or with LoRA the actor with its adapter off."""
    if cfg.reference is None:
        return False
    return _local(resolve_model(cfg.reference, "--reference")) != _local(resolve_model(cfg.policy, "--policy"))


def load_reference(cfg: RLConfig, tokenizer, device, packing: bool):
    """The frozen ``--reference`` policy, loaded like ``--policy`` (fp32, the same pad-token fix and
    matmul kernel, packed attention when the run packs). The KL term compares log-probs of the
    same token ids, so its tokenizer must be the policy's."""
    ref_model, ref_tokenizer = load_policy(cfg.reference, option="--reference")
    if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            f"--reference {cfg.reference} has another tokenizer than --policy {cfg.policy} "
            f"({len(ref_tokenizer)} vs {len(tokenizer)} tokens, or the same size with other ids): the KL term "
            "compares both models' log-probs of the same token ids. Give a reference trained from the same base "
            "model as the policy (e.g. the SFT model the policy came from)"
        )
    apply_cpu_matmul(cfg.cpu_matmul, device, ref_model)
    if packing:
        if packing_unsupported(ref_model) is not None:
            raise ConfigError(
                f"--packing: the reference {cfg.reference} cannot run packed batches "
                f"({packing_unsupported(ref_model)}); pass --no-packing"
            )
        use_packed_attention(ref_model)
    return ref_model.to(device).eval().requires_grad_(False)


def prompt_indices(n_prompts: int, batch_size: int, step: int, seed: int, rank: int, world: int) -> list[int]:
    """The prompts of update ``step`` on this process: consecutive slices of seeded epoch permutations."""
    start = (step * world + rank) * batch_size
    out, perms = [], {}
    for k in range(start, start + batch_size):
        epoch, pos = divmod(k, n_prompts)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perms[epoch][pos]))
    return out


EXTRA_PROMPTS_SEED = 1_000_000_007  # the stream of dynamic sampling's extra prompts, apart from the steps' own


def refill_informative(cfg: RLConfig, r: Rollout, sample_more: Callable[[int], Rollout], agree: Callable):
    """DAPO's dynamic sampling (arXiv:2503.14476 sec. 3.2, eq. 11): drop the groups of ``r`` whose
    K scores are all equal and call ``sample_more(round)`` (``round`` = 0, 1, ...) for another
    rollout of ``--batch-size`` prompts until ``--batch-size`` groups are informative, at most
    ``--max-resample-batches`` times. ``agree(short)`` returns whether any process is still short
    (every process samples the same number of times). Returns ``(rollout, stats)``: ``--batch-size``
    groups, the informative first, then, when the cap is reached, equal-score groups (advantage 0,
    as without dynamic sampling) so the batch keeps its shape; stats as floats."""
    k, want = cfg.samples_per_prompt, cfg.batch_size
    pool, rounds = [r], 0
    informative = (~equal_score_groups(r.scores, k)).tolist()  # (G,) per group of the pool
    while agree(sum(informative) < want) and rounds < cfg.max_resample_batches:
        extra = sample_more(rounds)
        pool.append(extra)
        informative += (~equal_score_groups(extra.scores, k)).tolist()
        rounds += 1
    groups = [g for g, ok in enumerate(informative) if ok][:want]
    groups += [g for g, ok in enumerate(informative) if not ok][: want - len(groups)]
    whole = concat_rollouts(pool) if len(pool) > 1 else r
    batch = whole.select([g * k + i for g in groups for i in range(k)])
    stats = {
        "rl/extra_rollouts": float(rounds * want * k),  # responses sampled beyond the step's own
        "rl/dropped_groups": float(len(informative) - sum(informative)),  # equal-score groups seen
        "rl/informative_groups": float(min(sum(informative), want)),  # of --batch-size trained on
    }
    return batch, stats


def any_process(run: Run, flag: bool) -> bool:
    """Whether ``flag`` holds on any process (one all-reduce), so every process takes the same branch."""
    return run.accelerator.reduce(torch.tensor(float(flag), device=run.device), reduction="sum").item() > 0


def normalise_scores(cfg: RLConfig, scores, ended, stats: RunningMoments, lengths=None):
    """Scores (M,) -> the scores that enter the reward: running whitening or scaling, EOS penalty,
    DAPO's soft overlong penalty (``lengths`` (M,), the response lengths in tokens)."""
    if cfg.score_norm == "whiten":
        scores = (scores - stats.mean) / stats.std
    elif cfg.score_norm == "scale":
        scores = scores / stats.std
    if cfg.missing_eos_penalty:
        scores = scores - cfg.missing_eos_penalty * (~ended).to(scores.dtype)
    if cfg.overlong_buffer is not None:  # arXiv:2503.14476 eq. 13, before the group's normalisation
        penalty = overlong_penalty(lengths, cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty)
        scores = scores + penalty.to(scores.dtype)
    return scores


def export_policy(
    run: Run,
    first: NetworkStep,
    model: ActorCritic,
    tokenizer,
    cfg: RLConfig,
    chat: bool,
    point: dict[str, Any],
    target: Path | None = None,
    adapter_only: bool = False,
) -> Path:
    """The actor as a plain HF checkpoint (LoRA merged) at ``target`` (default ``OUTPUT/final``),
    with how it was trained beside it (:data:`POLICY_INFO`) and ``point``, where in the run it
    stands (``update`` and that update's KL and score). ``adapter_only``: a LoRA actor's adapter
    alone (:func:`~rlhfkit.models.snapshots.save_adapter`). Collective when sharded: the actor's
    weights are gathered first on every process (from the ActorCritic when a value head shares
    its optimizer step); only the main process writes."""
    target = run.out / EXPORT if target is None else target
    state_dict = run.full_state_dict(first.net)
    if state_dict is not None and model.value_head is not None:  # keys of the ActorCritic: keep the actor's
        state_dict = {k.removeprefix("actor."): v for k, v in state_dict.items() if k.startswith("actor.")}
    info = {
        "reference": cfg.reference or cfg.policy,  # the KL term's model: rlhfkit eval's default baseline
        "policy": cfg.policy,  # the starting policy: the base a LoRA snapshot's adapter goes on
        "temperature": cfg.temperature,
        "chat_template": chat,
        "max_new_tokens": cfg.max_new_tokens,
        "reward": cfg.reward,
        **point,
    }
    if not run.main:
        return target
    files = {POLICY_INFO: json.dumps(info, indent=2)}
    if adapter_only:
        return save_adapter(model.actor, target, files, state_dict)
    return export_pretrained(model.actor, tokenizer, target, files, state_dict)


def run_point(step: int, row: dict[str, float]) -> dict[str, Any]:
    """Where a policy stands in its run, for its info file: the update, and that update's KL and score."""
    point: dict[str, Any] = {"update": step}
    for key in ("rl/kl", "rl/kl_k3", "rl/score_mean"):
        if key in row:
            point[key] = row[key]
    return point


def save_snapshot(
    run: Run, steps: list[NetworkStep], model: ActorCritic, tokenizer, cfg: RLConfig, chat: bool, step: int, row
) -> None:
    """``--save-policy-every``: after update ``step`` (a multiple of it, not the last: that is
    ``final/``), the policy at ``OUTPUT/snapshots/update-N`` (with ``--lora`` the adapter alone),
    written atomically by the final export's code. Collective when sharded (every process calls
    it). A snapshot already there is left as is: a resumed run redoes the updates after its
    checkpoint, and the run killed after writing this one wrote the same weights. Snapshots are
    not in the checkpoint."""
    if not cfg.save_policy_every or step % cfg.save_policy_every or step >= cfg.max_steps:
        return
    target = run.out / SNAPSHOTS / snapshot_name(step, cfg.max_steps)
    if any_process(run, run.main and target.is_dir()):  # the main process's folder decides for all
        return
    export_policy(run, steps[0], model, tokenizer, cfg, chat, run_point(step, row), target, adapter_only=cfg.lora)


@dataclass
class UpdateBatch:
    """What every minibatch loss of one update reads: the rollout, its ``advantages`` and
    ``returns`` ``(M, N)``, and ``kl_coef``, the KL coefficient in force for this update (the
    adaptive controller's current value, not the initial ``--kl-coef``)."""

    rollout: Rollout
    advantages: torch.Tensor
    returns: torch.Tensor
    kl_coef: float


def _packed(r: Rollout, micro):
    """Rows ``micro`` of the rollout, packed (``--packing``), or None."""
    return pack_rows(r.query_mask[micro], r.input_ids[micro], r.attention_mask[micro]) if r.packed else None


def loss_mask(cfg: RLConfig, r: Rollout):
    """``(M, N)`` the tokens the actor's loss reads: the response mask, less the rows of responses
    cut without EOS with ``--mask-truncated`` (DAPO's overlong filtering, arXiv:2503.14476 sec. 3.4).
    The KL statistics keep reading ``r.response_mask``."""
    if not cfg.mask_truncated:
        return r.response_mask
    return r.response_mask * r.ended.unsqueeze(1).to(r.response_mask.dtype)  # (M, N)


def _share(mask, minibatch, micro, per: str):
    """The weight of micro-batch rows ``micro`` within ``minibatch``, from ``mask (M, N)``: its share
    of the real tokens (``per="token"``) or of the sequences with a real token, so the micro-batch
    losses sum to the minibatch's loss whatever ``grad_accum`` is (0 for a micro-batch of empty rows)."""
    if per == "token":
        return mask[micro].sum() / mask[minibatch].sum().clamp(min=1)
    rows = mask.bool().any(dim=1)  # (M,) rows that count
    return rows[micro].sum().float() / rows[minibatch].sum().clamp(min=1).float()


def policy_objective(cfg: RLConfig, logits, batch: UpdateBatch, micro):
    """The actor's loss on rollout rows ``micro`` from their tempered response logits ``(m, N, V)``,
    and its stats (:func:`policy_objective_from_logprobs`)."""
    mask = loss_mask(cfg, batch.rollout)[micro]  # (m, N)
    logprobs = logprobs_from_logits(logits, batch.rollout.response_ids[micro]).float()  # (m, N)
    if cfg.entropy_coef > 0:
        entropy = entropy_bonus(logits, mask)
    else:
        with torch.no_grad():  # for the log only: no (m, N, V) softmax kept for the backward pass
            entropy = entropy_bonus(logits.detach(), mask)
    return policy_objective_from_logprobs(cfg, logprobs, entropy, batch, micro)


def chunked_token_stats(cfg: RLConfig, actor, hidden, batch: UpdateBatch, micro):
    """``(logprobs (m, N), entropy)`` from the actor's last hidden states ``(m, N, H)`` a chunk of
    ``--logprob-chunk-size`` tokens at a time (:func:`~rlhfkit.models.chunked_logprobs.logprobs_from_hidden`):
    the same numbers as :func:`policy_objective`'s, without the ``(m, N, V)`` logits."""
    weight, bias = lm_head_weights(actor)
    token_logprobs, token_entropy = logprobs_from_hidden(
        hidden,
        weight,
        batch.rollout.response_ids[micro],
        bias=bias,
        temperature=cfg.temperature,  # the distribution the tokens were sampled from
        chunk_size=cfg.logprob_chunk_size,
        with_entropy=True,
    )
    mask = loss_mask(cfg, batch.rollout)[micro]  # (m, N)
    if cfg.entropy_coef == 0:
        token_entropy = token_entropy.detach()  # for the log only
    return token_logprobs, masked_mean(token_entropy, mask)  # per-token mean entropy, as entropy_bonus


def policy_objective_from_logprobs(cfg: RLConfig, logprobs, entropy, batch: UpdateBatch, micro):
    """The actor's loss on rollout rows ``micro`` from their log-probs ``(m, N)`` and mean entropy,
    and its stats: the clipped surrogate aggregated by ``--loss-aggregation``, minus the entropy
    bonus, plus (``--kl-penalty loss``) ``batch.kl_coef`` times the k3 KL term. The one place
    the policy loss is put together, for the actor alone and for the actor with a value head."""
    r, mask = batch.rollout, loss_mask(cfg, batch.rollout)[micro]  # (m, N)
    pg_loss, pg_stats = policy_loss(
        logprobs,
        r.old_logprobs[micro],
        batch.advantages[micro],
        mask,
        cfg.clip_eps,
        cfg.loss_aggregation,
        clip_eps_high=cfg.clip_eps_high,
    )
    loss = pg_loss - cfg.entropy_coef * entropy if cfg.entropy_coef > 0 else pg_loss  # PPO eq. 9's entropy term
    stats = {
        "rl/policy_loss": pg_loss,
        "rl/entropy": entropy,
        "rl/clipfrac": pg_stats["clipfrac"],
        "rl/approx_kl": pg_stats["approx_kl"],
    }
    if cfg.kl_penalty == "loss":  # GRPO, arXiv:2402.03300 eq. 3: + beta * KL(pi || pi_ref) in the objective
        kl_term = kl_loss(logprobs, r.ref_logprobs[micro], mask, cfg.loss_aggregation)
        loss = loss + batch.kl_coef * kl_term
        stats["rl/kl_loss"] = kl_term
    return loss, stats


def actor_micro_loss(cfg: RLConfig, actor, batch: UpdateBatch, minibatch, micro):
    """The actor's loss (:func:`policy_objective`) on rollout rows ``micro``, weighted by their
    share of the minibatch, and its stats."""
    r = batch.rollout
    weight = _share(loss_mask(cfg, r), minibatch, micro, cfg.loss_aggregation)
    if cfg.logprob_chunk_size:
        hidden = response_hidden(
            actor, r.input_ids[micro], r.attention_mask[micro], r.response_mask.shape[1], packed=_packed(r, micro)
        )  # (m, N, H)
        loss, stats = policy_objective_from_logprobs(
            cfg, *chunked_token_stats(cfg, actor, hidden, batch, micro), batch, micro
        )
        return loss * weight, {k: v.detach().float() * weight.detach() for k, v in stats.items()}
    logits, _ = response_logits(
        actor, r.input_ids[micro], r.attention_mask[micro], r.response_mask.shape[1], packed=_packed(r, micro)
    )
    logits = tempered(logits, cfg.temperature)  # (m, N, V): the distribution the tokens were sampled from
    loss, stats = policy_objective(cfg, logits, batch, micro)
    return loss * weight, {k: v.detach().float() * weight.detach() for k, v in stats.items()}


def critic_micro_loss(cfg: RLConfig, critic, batch: UpdateBatch, minibatch, micro):
    """``vf_coef`` times the clipped value loss on rollout rows ``micro``, weighted by their share of the tokens."""
    r = batch.rollout
    mask = r.response_mask[micro]
    weight = _share(r.response_mask, minibatch, micro, "token")
    values = critic(r.input_ids[micro], r.attention_mask[micro], mask.shape[1], packed=_packed(r, micro))  # (m, N)
    vf_loss, vf_stats = value_loss(values.float(), r.old_values[micro], batch.returns[micro], mask, cfg.vf_clip)
    stats = {"rl/value_loss": vf_loss, "rl/vf_clipfrac": vf_stats["vf_clipfrac"]}
    return cfg.vf_coef * vf_loss * weight, {k: v.detach().float() * weight.detach() for k, v in stats.items()}


def joint_micro_loss(cfg: RLConfig, actor_critic, batch: UpdateBatch, minibatch, micro):
    """A value head shares the actor's forward pass: one loss, ``actor + vf_coef * value``, the
    actor's part (:func:`policy_objective`) weighted by its share of ``--loss-aggregation``'s unit
    and the value loss by its share of the tokens, exactly as with a separate critic."""
    r = batch.rollout
    mask = r.response_mask[micro]
    if cfg.logprob_chunk_size:  # the actor's hidden states, its log-probs a chunk at a time
        hidden, values = actor_critic(
            r.input_ids[micro], r.attention_mask[micro], mask.shape[1], packed=_packed(r, micro), hidden_only=True
        )
        inner = getattr(actor_critic, "module", actor_critic)  # under DDP
        token_stats = chunked_token_stats(cfg, inner.actor, hidden, batch, micro)
        pg_part, stats = policy_objective_from_logprobs(cfg, *token_stats, batch, micro)
    else:
        logits, values = actor_critic(
            r.input_ids[micro], r.attention_mask[micro], mask.shape[1], cfg.temperature, packed=_packed(r, micro)
        )
        pg_part, stats = policy_objective(cfg, logits, batch, micro)
    vf_loss, vf_stats = value_loss(values.float(), r.old_values[micro], batch.returns[micro], mask, cfg.vf_clip)
    pg_weight = _share(loss_mask(cfg, r), minibatch, micro, cfg.loss_aggregation)
    vf_weight = _share(r.response_mask, minibatch, micro, "token")
    loss = pg_part * pg_weight + cfg.vf_coef * vf_loss * vf_weight
    out = {k: v.detach().float() * pg_weight.detach() for k, v in stats.items()}
    out.update(
        {
            "rl/value_loss": vf_loss.detach().float() * vf_weight.detach(),
            "rl/vf_clipfrac": vf_stats["vf_clipfrac"].float() * vf_weight.detach(),
        }
    )
    return loss, out


@dataclass
class NetworkStep:
    """One network's optimizer step on a minibatch: its prepared module, optimizer, micro-batch
    loss (one of the ``*_micro_loss`` functions) and the parameter groups clipped each on its
    own norm (None: the whole network)."""

    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable
    clip_groups: list | None = None


def network_steps(nets, optimizers, model: ActorCritic) -> list[NetworkStep]:
    """What each minibatch steps: a value head's joint loss (actor and head clipped apart), or
    the actor and a separate critic each on its own loss and optimizer (the gradients of the
    summed loss, as no parameter is shared, with one network's activations alive at a time),
    or the actor alone (critic-free)."""
    if model.value_head is not None:
        return [
            NetworkStep(nets[0], optimizers[0], joint_micro_loss, [model.actor_parameters(), model.critic_parameters()])
        ]
    steps = [NetworkStep(nets[0], optimizers[0], actor_micro_loss)]
    if model.critic is not None:
        steps.append(NetworkStep(nets[1], optimizers[1], critic_micro_loss))
    return steps


def optimise(cfg: RLConfig, run: Run, steps: list[NetworkStep], batch: UpdateBatch, step: int) -> dict[str, float]:
    """``ppo_epochs`` passes over the rollout in shuffled minibatches, each one optimizer step
    per network (:func:`network_steps`); returns the mean losses and stats. Minibatch order
    comes from a generator seeded by ``(seed, step, epoch)``."""
    r = batch.rollout
    M = r.response_mask.shape[0]
    totals: dict[str, torch.Tensor] = {}
    n_minibatches = 0
    for epoch in range(cfg.ppo_epochs):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 101 + epoch)
        b_inds = torch.randperm(M, generator=gen).to(r.response_mask.device)
        for start in range(0, M, cfg.mini_batch_size):
            minibatch = b_inds[start : start + cfg.mini_batch_size]
            micro = list(minibatch.split(cfg.mini_batch_size // cfg.grad_accum))
            for net_step in steps:
                _, stats = train_step(
                    run,
                    net_step.net,
                    net_step.optimizer,
                    micro,
                    partial(net_step.loss, cfg, net_step.net, batch, minibatch),
                    max_grad_norm=cfg.max_grad_norm,
                    where=f"update {step + 1} (PPO epoch {epoch + 1})",
                    clip_groups=net_step.clip_groups,
                    hint=PPO_HINT,
                )
                for s in stats:
                    for k, v in s.items():
                        totals[k] = totals.get(k, 0) + v
            n_minibatches += 1
    return {k: v / n_minibatches for k, v in totals.items()}


def check_kl(cfg: RLConfig, run: Run, kl_mean: torch.Tensor, step: int) -> None:
    """Stop before the update when the KL is not finite or past ``--max-kl``."""
    finite = torch.isfinite(kl_mean).item()
    if not finite or (cfg.max_kl is not None and kl_mean.item() > cfg.max_kl):
        raise RunStopped(
            f"update {step + 1}: mean KL to the reference is {kl_mean.item():.4g} nats per response"
            + (f", past --max-kl {cfg.max_kl}" if finite else "")
            + f". Nothing from this update was saved; {run.stop_note()}. "
            "Lower --lr, raise --kl-coef (or use --adaptive-kl), or check the reward for exploits."
        )


def global_whiten(x, mask, accelerator):
    """Whiten ``x (M, N)`` over the real tokens of every process (REINFORCE++'s global batch
    normalisation, arXiv:2501.03262, sec. 3): one all-reduce of the sums."""
    real = mask.bool()
    stats = torch.stack([masked_sum(x, real), masked_sum(x * x, real), real.sum().to(x.dtype)]).double()
    total, square, count = accelerator.reduce(stats, reduction="sum").tolist()
    mean = total / max(count, 1.0)
    var = max(square / max(count, 1.0) - mean * mean, 0.0) * count / max(count - 1.0, 1.0)  # unbiased
    return torch.where(real, (x - mean) / math.sqrt(var + 1e-8), torch.zeros((), dtype=x.dtype, device=x.device))


def compute_advantages(cfg: RLConfig, r: Rollout, scores, kl_coef: float, accelerator):
    """``(advantages, returns, rewards, kl)``, each ``(M, N)``, for ``--algo``.

    Every algorithm starts from the same per-token rewards: the score at the last real token
    and, with ``--kl-penalty reward``, ``-kl_coef * KL`` at every token (InstructGPT eq. 2).
    ``ppo``: GAE with the critic's values, whitened over the global batch. ``reinforce++``: the
    return of every token, whitened over the global batch. ``rloo`` and ``grpo``: each
    response's total reward against its prompt's other samples, the same advantage on
    every token of the response.
    """
    mask = r.response_mask
    penalty = kl_coef if cfg.kl_penalty == "reward" else 0.0
    rewards, kl = compute_rewards(
        scores, r.old_logprobs, r.ref_logprobs, mask, penalty, cfg.kl_estimator, cfg.score_clip
    )
    if cfg.algo == "ppo":
        advantages, returns = compute_gae(r.old_values, rewards, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:  # over the whole batch, every process's share of it
            advantages = global_whiten(advantages, mask, accelerator)
        return advantages, returns, rewards, kl
    if cfg.algo == "reinforce++":
        returns = discounted_returns(rewards, mask, cfg.gamma)
        return global_whiten(returns, mask, accelerator), returns, rewards, kl
    totals = masked_sum(rewards, mask, dim=1)  # (M,) the score, minus the summed KL penalty
    estimate = rloo_advantages if cfg.algo == "rloo" else partial(grpo_advantages, scale=cfg.scale_rewards)
    advantages = broadcast_to_tokens(estimate(totals, cfg.samples_per_prompt), mask)
    return advantages, advantages, rewards, kl


def update_metrics(cfg: RLConfig, r: Rollout, rewards, kl_per_seq, returns, losses: dict) -> dict[str, torch.Tensor]:
    """This process's per-update means (reduced over processes by the caller)."""
    mask = r.response_mask
    row = {
        "rl/score_mean": r.scores.mean(),
        "rl/reward_mean": masked_sum(rewards, mask, dim=1).mean(),  # score minus KL penalty, per response
        "rl/response_length": mask.sum(1).float().mean(),
        "rl/eos_fraction": r.ended.float().mean(),
        **losses,
    }
    if cfg.uses_reference:
        row["rl/kl"] = kl_per_seq.mean()
        row["rl/kl_k3"] = masked_sum(kl_estimate(r.old_logprobs, r.ref_logprobs, "k3"), mask, dim=1).mean()
    if cfg.algo == "ppo":
        row["rl/explained_variance"] = explained_variance(r.old_values, returns, mask).nan_to_num(0.0)
    if cfg.samples_per_prompt > 1:  # groups whose K scores are all equal carry no learning signal for rloo/grpo
        row["rl/equal_score_groups"] = equal_score_groups(r.scores, cfg.samples_per_prompt).float().mean()
    return row


def build_networks(cfg: RLConfig, run: Run, model: ActorCritic):
    """Optimizers, schedules and the prepared (under DDP wrapped) networks: ``(steps, schedulers, model)``.
    A separate critic gets its own optimizer; a value head shares the actor's, in its own group."""
    critic_lr = cfg.critic_lr if cfg.critic_lr is not None else cfg.lr
    if model.critic is not None:  # one prepare call per network: FSDP2 shards one model per call
        actor_opt, actor_sched = make_optimizer(cfg, model.actor_parameters(), cfg.max_steps)
        critic_opt, critic_sched = make_optimizer(
            cfg, [{"params": model.critic_parameters(), "lr": critic_lr}], cfg.max_steps
        )
        actor, actor_opt = run.accelerator.prepare(model.actor, actor_opt)
        critic, critic_opt = run.accelerator.prepare(model.critic, critic_opt)
        settle_roots(model)
        return network_steps((actor, critic), (actor_opt, critic_opt), model), (actor_sched, critic_sched), model
    groups = [{"params": model.actor_parameters(), "lr": cfg.lr}]
    if model.value_head is not None:
        groups.append({"params": model.critic_parameters(), "lr": critic_lr})
        optimizer, scheduler = make_optimizer(cfg, groups, cfg.max_steps)
        wrapped, optimizer = run.accelerator.prepare(model, optimizer)
        settle_roots(wrapped)
        return network_steps((wrapped,), (optimizer,), model), (scheduler,), run.accelerator.unwrap_model(wrapped)
    optimizer, scheduler = make_optimizer(cfg, groups, cfg.max_steps)  # critic-free: the actor alone
    actor, optimizer = run.accelerator.prepare(model.actor, optimizer)
    settle_roots(model)
    return network_steps((actor,), (optimizer,), model), (scheduler,), model


# ---------------------------------------------------------------------- the loop
def train_rl(cfg: RLConfig) -> dict[str, Any]:
    """Run ``--algo``; returns the last update's metrics plus ``final`` (the exported folder, if finished)."""
    run = start_run(cfg, cfg.algo)
    require(
        not (cfg.logprob_chunk_size and run.sharded),
        f"--logprob-chunk-size {cfg.logprob_chunk_size} reads the LM head's weight outside the model's forward pass, "
        "where FSDP2 keeps it sharded; pass --logprob-chunk-size 0 under fsdp2 (DDP and one process are fine)",
    )
    prompts = read_prompts(cfg.prompts)
    if cfg.batch_size * run.world > len(prompts):
        logger.warning(
            "--batch-size %d%s is more than the %d prompt(s) in %s: each rollout samples some prompts more than once "
            "(as if --samples-per-prompt were larger). Give more prompts, or --batch-size %d or less",
            cfg.batch_size,
            f" x {run.world} processes" if run.world > 1 else "",
            len(prompts),
            cfg.prompts,
            max(1, len(prompts) // run.world),
        )
    tokenizer, model, ref_model, reward, critic_spec, packing = load_models(cfg, run.device)
    frozen = [m for m in (ref_model, getattr(reward, "model", None)) if isinstance(m, torch.nn.Module)]
    if run.sharded and cfg.frozen_models == "shard":
        for m in frozen:
            shard_frozen(m, run.accelerator)
    chat = use_chat_template(tokenizer, cfg.chat_template, cfg.policy)
    settings, k = cfg.settings(), cfg.samples_per_prompt
    kl_ctl = (
        AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        if cfg.adaptive_kl
        else FixedKLController(cfg.kl_coef)
    )
    score_stats = RunningMoments()
    steps, schedulers, model = build_networks(cfg, run, model)
    for obj in (*schedulers, kl_ctl, score_stats):
        run.accelerator.register_for_checkpointing(obj)
    state = run.begin(TrainState(), cfg.max_steps, unit="update")
    if cfg.micro_batch_size == "auto":
        choice = micro_batch.choose(
            cfg,
            run,
            tokenizer=tokenizer,
            prompts=prompts,
            chat=chat,
            critic_spec=critic_spec,
            reward_folder=cfg.reward if isinstance(reward, RewardModelSource) else None,
            models=(model, ref_model, getattr(reward, "model", None)),
        )
        cfg.grad_accum = choice.grad_accum
    run.write(
        f"{cfg.algo}: {len(prompts)} prompts, {k} sample(s) per prompt, policy {cfg.policy}{' (LoRA)' if cfg.lora else ''}, "
        f"reward {reward!r}, critic {critic_spec}, chat template {'on' if chat else 'off'}"
        + (f", KL reference {cfg.reference}" if cfg.uses_reference and cfg.reference is not None else "")
        + (
            f", frozen models {'sharded' if cfg.frozen_models == 'shard' else 'replicated'}"
            if run.sharded and frozen
            else ""
        )
        + (
            ""
            if cfg.uses_reference
            else f"; {'--kl-penalty none' if cfg.kl_penalty == 'none' else '--kl-coef 0'}: no reference policy "
            "held or run, no KL logged"
        )
    )
    cadence, row = Cadence(cfg.max_steps, cfg.log_every, cfg.save_every, stop_after=cfg.stop_after_steps), {}

    def rollout_of(indices: list[int]) -> Rollout:
        """The prompts ``indices``, each sampled ``k`` times, and everything the update needs about them."""
        with run.accelerator.autocast():
            return make_rollout(
                model,
                ref_model,
                reward,
                tokenizer,
                [prompts[i] for i in indices for _ in range(k)],
                settings,
                chat,
                cfg.rollout_logprobs == "sampling",
                packing,
                reference=cfg.uses_reference,
            )

    while state.step < cadence.stop_at:
        step, t_start = state.step, time.perf_counter()
        # 1. rollout: batch_size prompts, each sampled k times ---------------------------
        r = rollout_of(prompt_indices(len(prompts), cfg.batch_size, step, cfg.seed, run.rank, run.world))
        resampled = {}
        if cfg.dynamic_sampling:  # extra prompts from their own (seed, step, round) stream: resume stays exact
            r, resampled = refill_informative(
                cfg,
                r,
                lambda round_, step=step: rollout_of(
                    prompt_indices(
                        len(prompts),
                        cfg.batch_size,
                        step * cfg.max_resample_batches + round_,
                        cfg.seed + EXTRA_PROMPTS_SEED,
                        run.rank,
                        run.world,
                    )
                ),
                partial(any_process, run),
            )
        t_rollout = time.perf_counter() - t_start
        M, kl_coef = len(r), kl_ctl.kl_coef

        # 2-4. scores -> rewards -> advantages ------------------------------------------
        score_stats.update(run.accelerator.gather(r.scores))
        scores = normalise_scores(cfg, r.scores, r.ended, score_stats, r.response_mask.sum(1))  # (M,)
        advantages, returns, rewards, kl = compute_advantages(cfg, r, scores, kl_coef, run.accelerator)  # (M, N) each
        kl_per_seq = masked_sum(kl, r.response_mask, dim=1)  # (M,) KL summed over each response
        kl_mean = run.accelerator.reduce(kl_per_seq.mean(), reduction="mean")
        check_kl(cfg, run, kl_mean, step)

        # 5. epochs over shuffled minibatches --------------------------------------------
        t_optimise = time.perf_counter()
        losses = optimise(cfg, run, steps, UpdateBatch(r, advantages, returns, kl_coef), step)
        t_optimise = time.perf_counter() - t_optimise
        for scheduler in schedulers:
            scheduler.step()
        kl_ctl.update(kl_mean.item(), n_steps=M * run.world)  # arXiv:1909.08593 sec. 2.2, per batch
        state.step, state.episodes = state.step + 1, state.episodes + M * run.world

        # 6. metrics, samples, checkpoint ------------------------------------------------
        dt = time.perf_counter() - t_start
        local = update_metrics(cfg, r, rewards, kl_per_seq, returns, losses)
        row = dict(
            zip(
                local,
                run.accelerator.reduce(torch.stack([v.float() for v in local.values()]), reduction="mean").tolist(),
            )
        )
        all_scores = run.accelerator.gather(r.scores)
        row.update(
            {
                "rl/score_std": all_scores.std().item() if all_scores.numel() > 1 else 0.0,
                "rl/kl_coef": kl_coef,
                "rl/tokens_per_s": row["rl/response_length"] * M * run.world / dt,
                "rl/episodes_per_s": M * run.world / dt,
                "rl/lr": schedulers[0].get_last_lr()[0],
                "rl/critic_lr": schedulers[-1].get_last_lr()[-1],
                "time/rollout_s": t_rollout,
                "time/optimise_s": t_optimise,
                "time/update_s": dt,
                "rl/episodes": state.episodes,
                **resampled,  # per process
            }
        )
        run.progress.set_postfix(
            score=f"{row['rl/score_mean']:.3f}",
            kl=f"{row.get('rl/kl', 0.0):.3f}",
            ep_s=f"{row['rl/episodes_per_s']:.1f}",
        )
        if cfg.sample_every and cfg.n_samples and state.step % cfg.sample_every == 0:
            run.write(samples_text(state.step, r, cfg.n_samples))
        # before the checkpoint: a run stopped here resumes after this update and would not write it
        save_snapshot(run, steps, model, tokenizer, cfg, chat, state.step, row)
        cadence.after_step(run, state, log=partial(run.log.log, state.step, row))

    finished = run.finish(state, cfg.max_steps)
    result = dict(row)
    if finished:
        result["final"] = str(export_policy(run, steps[0], model, tokenizer, cfg, chat, run_point(state.step, row)))
    if run.main:
        plot_curves(
            read_metrics(run.out / "metrics.jsonl"),
            [
                ("score", ["rl/score_mean", "rl/reward_mean"]),
                ("KL to reference", ["rl/kl", "rl/kl_k3"]),
                ("kl_coef", ["rl/kl_coef"]),
                ("losses", ["rl/policy_loss", "rl/value_loss", "rl/kl_loss"]),
                ("entropy", ["rl/entropy"]),
                ("response length", ["rl/response_length"]),
            ],
            run.out / "curves.png",
            title=f"{cfg.algo}: {cfg.policy} vs {cfg.reward}",
        )
    run.accelerator.wait_for_everyone()
    return result


def train_ppo(cfg: RLConfig) -> dict[str, Any]:
    """``rlhfkit ppo``: :func:`train_rl` with ``--algo ppo``."""
    return train_rl(cfg)


def samples_text(step: int, r: Rollout, n: int) -> str:
    lines = [f"--- update {step}: samples ---"]
    for i in range(min(n, len(r))):
        lines.append(f"[score {r.scores[i].item():+.3f}] {_short(r.prompts[i])!r} -> {_short(r.responses[i])!r}")
    return "\n".join(lines)


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."

"""``rlhfkit ppo``: fine-tune a policy with PPO against a reward source, leashed by KL.

One update, top to bottom (the loop in :func:`train_ppo` reads in this order):

1. rollout: ``M`` prompts -> sampled responses -> ``old_logprobs``, ``ref_logprobs``,
   ``values`` ``(M, N)`` and ``scores`` ``(M,)`` (:mod:`rlhfkit.ppo.rollout`);
2. scores: running whitening or scaling, a penalty for responses cut without EOS, clipping;
3. rewards: ``-kl_coef * KL`` per token plus the score at the last real token
   (:func:`rlhfkit.ppo.rewards.compute_rewards`);
4. advantages and returns by GAE (:func:`rlhfkit.ppo.advantages.compute_gae`), advantages
   whitened over real tokens;
5. ``ppo_epochs`` passes of shuffled minibatches, each one optimizer step over
   ``grad_accum`` micro-batches: ``loss = policy_loss + vf_coef * value_loss -
   entropy_coef * entropy`` (:mod:`rlhfkit.ppo.losses`), grad norms clipped separately for
   actor and critic, which have their own learning rates;
6. the KL controller moves ``kl_coef``; metrics, samples, checkpoint.

Micro-batch losses are weighted by their share of the minibatch's real tokens, so the
gradient is the per-token mean over the minibatch whatever ``grad_accum`` is.

Every random choice is either the global RNG (sampling), saved in the checkpoint, or a
generator seeded by ``(seed, step)`` (prompt order, minibatch order), so ``--resume``
continues exactly the run that stopped.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rlhfkit.config import ConfigError
from rlhfkit.training.options import CPU_MATMUL_HELP

logger = logging.getLogger(__name__)

__all__ = ["PPOConfig", "PPOStopped", "train_ppo"]

POLICY_INFO = "rlhfkit_ppo.json"  # written beside the exported policy: reference, sampling settings


@dataclass
class PPOConfig:
    """Fine-tune a language model with PPO against a reward model, with a KL penalty to the reference."""

    policy: str = field(default="smollm2-135m", metadata={"help": "policy to fine-tune (and the reference): alias, folder or hub id"})
    reward: str = field(default="", metadata={"help": "reward: an rlhfkit reward-model folder, a HF sequence classifier, or module:function"})
    prompts: str = field(default="", metadata={"help": "prompts: text file (one per line) or JSONL with 'prompt' or 'messages'"})
    output: str = field(default="", metadata={"help": "run folder: policy/, checkpoint/, metrics.jsonl, curves.png"})
    steps: int = field(default=100, metadata={"help": "PPO updates (one rollout batch and its optimisation each)"})
    batch_size: int = field(default=16, metadata={"help": "prompts per rollout, per process"})
    mini_batch_size: int = field(default=8, metadata={"help": "rollout rows per optimizer step"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step (mini_batch_size / grad_accum rows each)"})
    ppo_epochs: int = field(default=4, metadata={"help": "passes over each rollout batch"})
    max_new_tokens: int = field(default=32, metadata={"help": "response length limit"})
    max_prompt_length: int = field(default=256, metadata={"help": "prompt tokens kept (longer prompts keep their end)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (log-probs are taken at the same temperature)"})
    top_k: int = field(default=0, metadata={"help": "top-k sampling filter, 0 = off (log-probs ignore it: keep off for PPO)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling filter, 1 = off (log-probs ignore it: keep off for PPO)"})
    chat_template: bool = field(default=False, metadata={"help": "render prompts with the policy's chat template ('messages' rows always are)"})
    reward_label: str | None = field(default=None, metadata={"help": "classifier rewards: label name or index to read (default: the last)"})
    reward_transform: Literal["logit", "logit-diff", "prob", "logprob"] = field(default="logit", metadata={"help": "classifier rewards: score from the label's logits"})
    reward_text: Literal["prompt+response", "response"] = field(default="prompt+response", metadata={"help": "classifier rewards: the text it reads"})
    reward_batch_size: int = field(default=32, metadata={"help": "texts per reward-model forward pass"})
    score_norm: Literal["none", "scale", "whiten"] = field(default="none", metadata={"help": "normalise scores by running statistics: divide by the std, or also subtract the mean"})
    score_clip: float | None = field(default=None, metadata={"help": "clip (normalised) scores to [-c, c]"})
    missing_eos_penalty: float | None = field(default=None, metadata={"help": "subtract this from the score of responses cut at max_new_tokens without EOS"})
    kl_coef: float = field(default=0.05, metadata={"help": "KL penalty coefficient beta (initial value with --adaptive-kl)"})
    kl_estimator: Literal["k1", "k2", "k3"] = field(default="k1", metadata={"help": "per-token KL estimator in the reward (http://joschu.net/blog/kl-approx.html)"})
    adaptive_kl: bool = field(default=False, metadata={"help": "adapt kl_coef toward --kl-target (Ziegler et al. 2019)"})
    kl_target: float = field(default=6.0, metadata={"help": "adaptive KL: target KL per response, in nats"})
    kl_horizon: float = field(default=10000, metadata={"help": "adaptive KL: horizon in episodes"})
    max_kl: float | None = field(default=None, metadata={"help": "stop the run when the mean KL per response exceeds this (nats)"})
    gamma: float = field(default=1.0, metadata={"help": "GAE discount"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    whiten_advantages: bool = field(default=True, metadata={"help": "whiten advantages over the real tokens of each rollout"})
    clip_eps: float = field(default=0.2, metadata={"help": "PPO ratio clip range"})
    vf_clip: float | None = field(default=0.2, metadata={"help": "value clip range (none = unclipped value loss)"})
    vf_coef: float = field(default=0.1, metadata={"help": "weight of the value loss"})
    entropy_coef: float = field(default=0.0, metadata={"help": "weight of the entropy bonus"})
    lr: float = field(default=1e-5, metadata={"help": "actor learning rate"})
    critic_lr: float | None = field(default=None, metadata={"help": "critic (or value head) learning rate (default: --lr)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    scheduler: Literal["linear", "cosine", "constant"] = field(default="linear", metadata={"help": "learning-rate schedule over the updates"})
    warmup_steps: int = field(default=0, metadata={"help": "updates of linear learning-rate warm-up"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient-norm clipping, per model (0 = off)"})
    critic: str = field(default="auto", metadata={"help": "value-head, reward-model (InstructGPT), policy, or a model folder; auto: reward-model when it shares the policy's tokenizer, else value-head"})
    lora: bool = field(default=False, metadata={"help": "train LoRA adapters on the actor; the reference is the same weights with the adapter off"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (0 keeps log-probs of the rollout and the update equal)"})
    lora_target: list[str] | None = field(default=None, metadata={"help": "module names for LoRA (default: peft's choice for the architecture)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in the backward pass to save memory"})
    save_every: int = field(default=25, metadata={"help": "write a resumable checkpoint every N updates (and at the end)"})
    sample_every: int = field(default=10, metadata={"help": "print a few generations with their scores every N updates (0 = never)"})
    n_samples: int = field(default=3, metadata={"help": "generations printed each time"})
    stop_after_steps: int | None = field(default=None, metadata={"help": "stop after this update with a checkpoint, to continue later with --resume"})
    seed: int = field(default=42, metadata={"help": "random seed (prompt order, sampling, minibatch order)"})
    resume: bool = field(default=False, metadata={"help": "continue from OUTPUT/checkpoint exactly where it stopped"})
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = field(default="auto", metadata={"help": "auto: bf16 on CUDA, fp32 on CPU"})
    cpu: bool = field(default=False, metadata={"help": "run on the CPU even if a GPU is present"})
    cpu_matmul: Literal["auto", "onednn", "torch"] = field(default="auto", metadata={"help": CPU_MATMUL_HELP})
    tensorboard: bool = field(default=True, metadata={"help": "also write TensorBoard event files"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self):
        for name, what in (("reward", "--reward RM_DIR | CLASSIFIER | module:function"), ("prompts", "--prompts FILE"), ("output", "--output DIR")):
            if not getattr(self, name):
                raise ConfigError(f"option '{name}' is required ({what})")
        for name in ("steps", "batch_size", "mini_batch_size", "grad_accum", "ppo_epochs", "max_new_tokens",
                     "max_prompt_length", "reward_batch_size", "save_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"option '{name}' must be >= 1, got {getattr(self, name)}")
        if self.mini_batch_size > self.batch_size or self.batch_size % self.mini_batch_size:
            raise ConfigError(
                f"option 'mini_batch_size' ({self.mini_batch_size}) must divide 'batch_size' ({self.batch_size}) so each "
                "PPO epoch sees every rollout row once; e.g. --mini-batch-size "
                f"{math.gcd(self.batch_size, self.mini_batch_size)}"
            )
        if self.mini_batch_size % self.grad_accum:
            raise ConfigError(
                f"option 'grad_accum' ({self.grad_accum}) must divide 'mini_batch_size' ({self.mini_batch_size}): each "
                "optimizer step splits its minibatch into grad_accum equal micro-batches"
            )
        if not self.temperature > 0:
            raise ConfigError(f"option 'temperature' must be > 0 for PPO (it samples), got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={self.top_k}, top_p={self.top_p}")
        if self.top_k or self.top_p < 1:
            logger.warning("top_k=%d top_p=%g: PPO's log-probs do not model these filters, so the ratio is off; "
                           "keep them off for training", self.top_k, self.top_p)
        if self.kl_coef < 0 or not math.isfinite(self.kl_coef):
            raise ConfigError(f"option 'kl_coef' must be a finite number >= 0, got {self.kl_coef}")
        if self.adaptive_kl and not (self.kl_coef > 0 and self.kl_target > 0 and self.kl_horizon > 0):
            raise ConfigError("--adaptive-kl needs kl_coef, kl_target and kl_horizon all > 0 "
                              f"(got {self.kl_coef}, {self.kl_target}, {self.kl_horizon})")
        if self.max_kl is not None and not self.max_kl > 0:
            raise ConfigError(f"option 'max_kl' must be > 0, got {self.max_kl}")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError(f"options 'gamma' and 'lam' must be in [0, 1], got {self.gamma}, {self.lam}")
        for name in ("clip_eps", "vf_clip", "score_clip"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ConfigError(f"option '{name}' must be > 0 (or none), got {v}")
        for name in ("lr", "critic_lr"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ConfigError(f"option '{name}' must be a positive number, got {v}")
        if self.vf_coef < 0 or self.entropy_coef < 0:
            raise ConfigError(f"options 'vf_coef' and 'entropy_coef' must be >= 0, got {self.vf_coef}, {self.entropy_coef}")
        if self.warmup_steps < 0 or self.sample_every < 0 or self.n_samples < 0:
            raise ConfigError("options 'warmup_steps', 'sample_every' and 'n_samples' must be >= 0")
        if self.stop_after_steps is not None and self.stop_after_steps < 1:
            raise ConfigError(f"option 'stop_after_steps' must be >= 1, got {self.stop_after_steps}")


class PPOStopped(RuntimeError):
    """The run stopped itself (non-finite loss, KL past ``max_kl``); the last checkpoint is intact."""


# ------------------------------------------------------------------ building blocks
def _load_models(cfg: PPOConfig, device):
    """(tokenizer, ActorCritic, frozen reference or None with LoRA, reward source, the critic kind used)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhfkit.models.cpu_linear import apply_cpu_matmul
    from rlhfkit.models.hub import resolve_model
    from rlhfkit.models.tokenizers import ensure_distinct_pad
    from rlhfkit.ppo.critic import ActorCritic, load_critic
    from rlhfkit.ppo.reward_sources import RewardModelSource, RewardOptions, load_reward_source

    path = resolve_model(cfg.policy)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    actor = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ensure_distinct_pad(tokenizer, actor)
    apply_cpu_matmul(cfg.cpu_matmul, device, actor)  # before the reference copy and LoRA: both inherit it
    if cfg.gradient_checkpointing:
        actor.gradient_checkpointing_enable()
    ref_model = None
    if cfg.lora:
        from peft import LoraConfig, TaskType, get_peft_model

        actor = get_peft_model(actor, LoraConfig(
            task_type=TaskType.CAUSAL_LM, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target or None,
        ))
    else:
        ref_model = copy.deepcopy(actor).to(device).eval().requires_grad_(False)

    options = RewardOptions(label=cfg.reward_label, transform=cfg.reward_transform, text=cfg.reward_text,
                            batch_size=cfg.reward_batch_size, device=device, cpu_matmul=cfg.cpu_matmul)
    reward = load_reward_source(cfg.reward, options)
    critic_spec = cfg.critic
    if critic_spec == "auto":
        shares = (isinstance(reward, RewardModelSource) and reward.model.meta.kind == "decoder"
                  and reward.model.tokenizer.get_vocab() == tokenizer.get_vocab())
        critic_spec = "reward-model" if shares else "value-head"
        logger.info("--critic auto: using %s", critic_spec)
    critic = load_critic(critic_spec, tokenizer, reward=cfg.reward if isinstance(reward, RewardModelSource) else None,
                         policy=cfg.policy)
    apply_cpu_matmul(cfg.cpu_matmul, device, critic)
    model = ActorCritic(actor, critic)
    model.eval()  # no dropout anywhere: rollout and update must see the same policy
    return tokenizer, model, ref_model, reward, critic_spec


def _prompt_indices(n_prompts: int, batch_size: int, step: int, seed: int, rank: int, world: int) -> list[int]:
    """The prompts of update ``step`` on this process: consecutive slices of seeded epoch permutations."""
    import torch

    start = (step * world + rank) * batch_size
    out, perms = [], {}
    for k in range(start, start + batch_size):
        epoch, pos = divmod(k, n_prompts)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perms[epoch][pos]))
    return out


def _normalise_scores(cfg: PPOConfig, scores, ended, stats):
    """Scores (M,) -> the scores that enter the reward: running whitening or scaling, EOS penalty."""
    if cfg.score_norm == "whiten":
        scores = (scores - stats.mean) / stats.std
    elif cfg.score_norm == "scale":
        scores = scores / stats.std
    if cfg.missing_eos_penalty:
        scores = scores - cfg.missing_eos_penalty * (~ended).to(scores.dtype)
    return scores


def _export_policy(model, tokenizer, cfg: PPOConfig, out: Path) -> Path:
    """The actor as a plain HF checkpoint (LoRA merged) at ``out/policy``, atomically."""
    import json
    import shutil
    import tempfile

    from rlhfkit.checkpoint import replace_dir

    actor = model.actor
    if hasattr(actor, "merge_and_unload"):
        actor = copy.deepcopy(actor).merge_and_unload()
    tmp = Path(tempfile.mkdtemp(prefix=".policy.tmp-", dir=out))
    try:
        actor.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info = {"reference": cfg.policy, "temperature": cfg.temperature, "chat_template": cfg.chat_template,
                "max_new_tokens": cfg.max_new_tokens, "reward": cfg.reward}
        (tmp / POLICY_INFO).write_text(json.dumps(info, indent=2))
        replace_dir(tmp, out / "policy")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "policy"


def _optimise(cfg: PPOConfig, accelerator, nets, optimizer, params, r, advantages, returns, step: int, where: str):
    """``ppo_epochs`` passes over the rollout in shuffled minibatches; returns the mean losses and stats.

    Each minibatch is one optimizer step over ``grad_accum`` micro-batches, each weighted by
    its share of the minibatch's real tokens (so the gradient is the per-token mean over the
    minibatch). Minibatch order comes from a generator seeded by ``(seed, step, epoch)``.

    Args:
        nets: ``(actor_critic,)``, the prepared :class:`~rlhfkit.ppo.critic.ActorCritic` with a
            value head, or ``(actor, critic)`` prepared separately when the critic is its own
            model. Then each micro-batch runs the actor's forward and backward before the
            critic's: the gradients are the same as from the summed loss (no parameter is
            shared), but only one network's activations are alive at a time.
        r: the :class:`~rlhfkit.ppo.rollout.Rollout`; ``advantages`` and ``returns`` are ``(M, N)``.
        params: (actor parameters, critic parameters), gradient-clipped separately.
    """
    import torch

    from rlhfkit.ops import logprobs_from_logits
    from rlhfkit.ppo.critic import response_logits
    from rlhfkit.ppo.losses import entropy_bonus, policy_loss, value_loss

    mask = r.response_mask  # (M, N)
    M, N = mask.shape
    input_ids, attention_mask = r.input_ids, r.attention_mask  # (M, P + N)
    micro = cfg.mini_batch_size // cfg.grad_accum
    names = ("ppo/policy_loss", "ppo/value_loss", "ppo/entropy", "ppo/clipfrac", "ppo/approx_kl", "ppo/vf_clipfrac")
    totals = torch.zeros(len(names), device=mask.device)
    n_opt_steps = 0

    def actor_terms(logits, mc):
        """(loss to minimise, policy loss, its stats, entropy) of the actor on rows ``mc``."""
        logprobs = logprobs_from_logits(logits, r.response_ids[mc])  # (m, N)
        pg_loss, pg_stats = policy_loss(logprobs.float(), r.old_logprobs[mc], advantages[mc], mask[mc], cfg.clip_eps)
        if cfg.entropy_coef > 0:
            entropy = entropy_bonus(logits, mask[mc])
            return pg_loss - cfg.entropy_coef * entropy, pg_loss, pg_stats, entropy
        with torch.no_grad():  # for the log only: no (m, N, V) softmax kept for the backward pass
            entropy = entropy_bonus(logits.detach(), mask[mc])
        return pg_loss, pg_loss, pg_stats, entropy

    def backward(loss, weight, epoch, pg_loss, vf_loss, entropy):
        # One host sync per backward, on purpose: a nan must stop us before
        # optimizer.step() writes it into the weights.
        if not torch.isfinite(loss).item():
            show = lambda t: "not computed" if t is None else f"{t.item():.4g}"  # noqa: E731
            raise PPOStopped(
                f"non-finite loss at update {step + 1} (PPO epoch {epoch + 1}): policy_loss {show(pg_loss)}, "
                f"value_loss {show(vf_loss)}, entropy {show(entropy)}. Nothing from this update was saved; {where}. "
                "Lower --lr or --critic-lr, or check the reward scale (try --score-norm whiten)."
            )
        accelerator.backward(loss * weight)

    for epoch in range(cfg.ppo_epochs):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 101 + epoch)
        b_inds = torch.randperm(M, generator=gen).to(mask.device)
        for start in range(0, M, cfg.mini_batch_size):
            mb_inds = b_inds[start:start + cfg.mini_batch_size]
            mb_tokens = mask[mb_inds].sum().clamp(min=1)
            chunks = mb_inds.split(micro)
            for a, mc in enumerate(chunks):
                weight = mask[mc].sum() / mb_tokens  # share of the minibatch's real tokens
                with contextlib.ExitStack() as stack:
                    if a < len(chunks) - 1:  # gradients are all-reduced on the last micro-batch only
                        for net in nets:
                            stack.enter_context(accelerator.no_sync(net))
                    stack.enter_context(accelerator.autocast())
                    if len(nets) == 1:  # value head: one forward gives logits and values
                        logits, values = nets[0](input_ids[mc], attention_mask[mc], N, cfg.temperature)  # (m, N, V), (m, N)
                        a_loss, pg_loss, pg_stats, entropy = actor_terms(logits, mc)
                        vf_loss, vf_stats = value_loss(values.float(), r.values[mc], returns[mc], mask[mc], cfg.vf_clip)
                        backward(a_loss + cfg.vf_coef * vf_loss, weight, epoch, pg_loss, vf_loss, entropy)
                    else:  # separate critic: actor forward+backward, then critic forward+backward
                        logits, _ = response_logits(nets[0], input_ids[mc], attention_mask[mc], N)
                        a_loss, pg_loss, pg_stats, entropy = actor_terms(logits / cfg.temperature, mc)
                        backward(a_loss, weight, epoch, pg_loss, None, entropy)
                        del logits, a_loss
                        values = nets[1](input_ids[mc], attention_mask[mc], N)  # (m, N)
                        vf_loss, vf_stats = value_loss(values.float(), r.values[mc], returns[mc], mask[mc], cfg.vf_clip)
                        backward(cfg.vf_coef * vf_loss, weight, epoch, pg_loss, vf_loss, entropy)
                totals += weight.detach() * torch.stack([
                    pg_loss.detach(), vf_loss.detach(), entropy.detach(), pg_stats["clipfrac"],
                    pg_stats["approx_kl"], vf_stats["vf_clipfrac"]]).float()
            if cfg.max_grad_norm > 0:  # each network clipped on its own scale
                for group in params:
                    accelerator.clip_grad_norm_(group, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            n_opt_steps += 1
    return dict(zip(names, totals / n_opt_steps))


# ---------------------------------------------------------------------- the loop
def train_ppo(cfg: PPOConfig) -> dict[str, Any]:
    """Run PPO; returns the last update's metrics plus ``policy`` (the exported folder, if finished)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from rlhfkit.checkpoint import load_checkpoint, save_checkpoint
    from rlhfkit.training import make_adamw, start_run
    from rlhfkit.ops import masked_sum, masked_whiten
    from rlhfkit.ppo.advantages import compute_gae
    from rlhfkit.ppo.kl import AdaptiveKLController, FixedKLController, kl_estimate
    from rlhfkit.ppo.losses import explained_variance
    from rlhfkit.ppo.rewards import RunningMoments, compute_rewards
    from rlhfkit.ppo.rollout import GenerationSettings, make_rollout, read_prompts
    from rlhfkit.tracking import MetricsLogger, plot_curves, read_metrics

    out = Path(cfg.output)
    accelerator, ckpt = start_run(cfg)
    main, world, rank, device = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index, accelerator.device

    prompts = read_prompts(cfg.prompts)
    tokenizer, model, ref_model, reward, critic_spec = _load_models(cfg, device)
    if main:
        logger.warning("ppo: %d prompts, policy %s%s, reward %r, critic %s", len(prompts), cfg.policy,
                       " (LoRA)" if cfg.lora else "", reward, critic_spec)
    settings = GenerationSettings(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, cfg.max_prompt_length, cfg.chat_template)

    critic_lr = cfg.critic_lr if cfg.critic_lr is not None else cfg.lr
    actor_params, critic_params = model.actor_parameters(), model.critic_parameters()
    optimizer = make_adamw([{"params": actor_params, "lr": cfg.lr}, {"params": critic_params, "lr": critic_lr}], cfg.weight_decay)
    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
              else FixedKLController(cfg.kl_coef))
    score_stats = RunningMoments()
    if model.critic is not None:  # two networks, prepared (and under DDP wrapped) one by one
        actor, critic, optimizer = accelerator.prepare(model.actor, model.critic, optimizer)
        nets = (actor, critic)
    else:
        wrapped, optimizer = accelerator.prepare(model, optimizer)
        nets = (wrapped,)
        model = accelerator.unwrap_model(wrapped)
    for obj in (scheduler, kl_ctl, score_stats):
        accelerator.register_for_checkpointing(obj)

    state = {"step": 0, "episodes": 0}
    if ckpt is not None:
        state = load_checkpoint(accelerator, ckpt)
        if main:
            logger.warning("resuming from %s at update %d", ckpt, state["step"])
    log = MetricsLogger(out, enabled=main, resume_step=state["step"] if ckpt else None, tensorboard=cfg.tensorboard)
    stop_at = min(cfg.steps, cfg.stop_after_steps or cfg.steps)
    progress = tqdm(total=cfg.steps, initial=state["step"], disable=not (main and cfg.progress), desc="ppo", dynamic_ncols=True)
    row: dict[str, Any] = {}

    while state["step"] < stop_at:
        step = state["step"]
        t_start = time.perf_counter()
        # 1. rollout ---------------------------------------------------------------
        batch = [prompts[i] for i in _prompt_indices(len(prompts), cfg.batch_size, step, cfg.seed, rank, world)]
        with accelerator.autocast():
            r = make_rollout(model, ref_model, reward, tokenizer, batch, settings)
        t_rollout = time.perf_counter() - t_start
        mask = r.response_mask  # (M, N)
        M = mask.shape[0]
        kl_coef = kl_ctl.kl_coef

        # 2-4. scores -> rewards -> advantages ------------------------------------------
        score_stats.update(accelerator.gather(r.scores))
        scores = _normalise_scores(cfg, r.scores, r.ended, score_stats)  # (M,)
        rewards, kl = compute_rewards(scores, r.old_logprobs, r.ref_logprobs, mask, kl_coef, cfg.kl_estimator, cfg.score_clip)
        kl_per_seq = masked_sum(kl, mask, dim=1)  # (M,) KL summed over each response
        kl_mean = accelerator.reduce(kl_per_seq.mean(), reduction="mean")
        if not torch.isfinite(kl_mean).item() or (cfg.max_kl is not None and kl_mean.item() > cfg.max_kl):
            raise PPOStopped(
                f"update {step + 1}: mean KL to the reference is {kl_mean.item():.4g} nats per response"
                + (f", past --max-kl {cfg.max_kl}" if torch.isfinite(kl_mean).item() else "")
                + f". Nothing from this update was saved; the last good checkpoint in {out / 'checkpoint'} is intact. "
                "Lower --lr, raise --kl-coef (or use --adaptive-kl), or check the reward for exploits."
            )
        advantages, returns = compute_gae(r.values, rewards, mask, cfg.gamma, cfg.lam)  # (M, N) each
        if cfg.whiten_advantages and int(mask.sum()) > 1:
            advantages = masked_whiten(advantages, mask)

        # 5. PPO epochs over shuffled minibatches ------------------------------------------
        losses = _optimise(cfg, accelerator, nets, optimizer, (actor_params, critic_params), r, advantages, returns,
                           step, where=f"the last good checkpoint in {out / 'checkpoint'} is intact")
        scheduler.step()
        kl_ctl.update(kl_mean.item(), n_steps=M * world)  # arXiv:1909.08593 sec. 2.2, per batch
        state["step"] += 1
        state["episodes"] += M * world

        # 6. metrics, samples, checkpoint ------------------------------------------------
        dt = time.perf_counter() - t_start
        local = {
            "ppo/score_mean": r.scores.mean(),
            "ppo/reward_mean": masked_sum(rewards, mask, dim=1).mean(),  # score minus KL penalty, per response
            "ppo/kl": kl_per_seq.mean(),
            "ppo/kl_k3": masked_sum(kl_estimate(r.old_logprobs, r.ref_logprobs, "k3"), mask, dim=1).mean(),
            "ppo/explained_variance": explained_variance(r.values, returns, mask).nan_to_num(0.0),
            "ppo/response_length": mask.sum(1).float().mean(),
            "ppo/eos_fraction": r.ended.float().mean(),
            **losses,
        }
        reduced = accelerator.reduce(torch.stack([v.float() for v in local.values()]), reduction="mean").tolist()
        row = dict(zip(local, reduced))
        all_scores = accelerator.gather(r.scores)
        row.update({
            "ppo/score_std": all_scores.std().item() if all_scores.numel() > 1 else 0.0,
            "ppo/kl_coef": kl_coef,
            "ppo/tokens_per_s": row["ppo/response_length"] * M * world / max(dt, 1e-9),
            "ppo/episodes_per_s": M * world / max(dt, 1e-9),
            "ppo/lr": scheduler.get_last_lr()[0], "ppo/critic_lr": scheduler.get_last_lr()[1],
            "time/rollout_s": t_rollout, "time/update_s": dt, "ppo/episodes": state["episodes"],
        })
        log.log(state["step"], row)
        progress.update(1)
        progress.set_postfix(score=f"{row['ppo/score_mean']:.3f}", kl=f"{row['ppo/kl']:.3f}", ep_s=f"{row['ppo/episodes_per_s']:.1f}")
        if main and cfg.sample_every and cfg.n_samples and state["step"] % cfg.sample_every == 0:
            progress.write(_samples_text(state["step"], r, cfg.n_samples))
        if state["step"] % cfg.save_every == 0 and state["step"] != stop_at:
            save_checkpoint(accelerator, out, state)
    progress.close()

    save_checkpoint(accelerator, out, state)
    finished = state["step"] >= cfg.steps
    result = dict(row)
    if main:
        log.close()
        if finished:
            result["policy"] = str(_export_policy(model, tokenizer, cfg, out))
        plot_curves(
            read_metrics(out / "metrics.jsonl"),
            [("score", ["ppo/score_mean", "ppo/reward_mean"]), ("KL to reference", ["ppo/kl", "ppo/kl_k3"]),
             ("kl_coef", ["ppo/kl_coef"]), ("losses", ["ppo/policy_loss", "ppo/value_loss"]),
             ("entropy", ["ppo/entropy"]), ("response length", ["ppo/response_length"])],
            out / "curves.png", title=f"PPO: {cfg.policy} vs {cfg.reward}",
        )
        if not finished:
            logger.warning("stopped at update %d of %d; continue with --resume", state["step"], cfg.steps)
    accelerator.wait_for_everyone()
    return result


def _samples_text(step: int, r, n: int) -> str:
    lines = [f"--- update {step}: samples ---"]
    for i in range(min(n, len(r))):
        lines.append(f"[score {r.scores[i].item():+.3f}] {_short(r.prompts[i])!r} -> {_short(r.responses[i])!r}")
    return "\n".join(lines)


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."



os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

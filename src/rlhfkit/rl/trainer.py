"""``rlhfkit ppo``: fine-tune a policy with PPO against a reward source, leashed by KL.

One update, top to bottom (the loop in :func:`train_ppo` reads in this order):

1. rollout: ``M`` prompts -> sampled responses -> ``old_logprobs``, ``ref_logprobs``,
   ``old_values`` ``(M, N)`` and ``scores`` ``(M,)`` (:mod:`rlhfkit.rl.rollout`);
2. scores: running whitening or scaling, a penalty for responses cut without EOS, clipping;
3. rewards: ``-kl_coef * KL`` per token plus the score at the last real token
   (:func:`rlhfkit.rl.rewards.compute_rewards`);
4. advantages and returns by GAE (:func:`rlhfkit.rl.advantages.compute_gae`), advantages
   whitened over real tokens;
5. ``ppo_epochs`` passes of shuffled minibatches, each one
   :func:`~rlhfkit.training.step.train_step` per network: the actor's
   ``policy_loss - entropy_coef * entropy`` and a separate critic's ``vf_coef * value_loss``
   (or, with a value head, one step on their sum), each network with its own optimizer,
   learning rate and gradient clipping (:mod:`rlhfkit.rl.losses`);
6. the KL controller moves ``kl_coef``; metrics, samples, checkpoint.

Micro-batch losses are weighted by their share of the minibatch's real tokens, so the
gradient is the per-token mean over the minibatch whatever ``grad_accum`` is.

Every random choice is either the global RNG (sampling), saved in the checkpoint, or a
generator seeded by ``(seed, step)`` (prompt order, minibatch order), so ``--resume``
continues exactly the run that stopped.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch

from rlhfkit.checkpoint import export_pretrained
from rlhfkit.config import ConfigError, opt, require
from rlhfkit.data.prompts import read_prompts
from rlhfkit.errors import RunStopped
from rlhfkit.models.cpu_linear import apply_cpu_matmul
from rlhfkit.models.lora import with_lora
from rlhfkit.models.packing import packing_unsupported, use_packed_attention
from rlhfkit.models.policy import load_policy
from rlhfkit.models.tokenizers import use_chat_template
from rlhfkit.ops import logprobs_from_logits, masked_sum, masked_whiten
from rlhfkit.rl.advantages import compute_gae
from rlhfkit.rl.critic import ActorCritic, load_critic, response_logits
from rlhfkit.rl.kl import AdaptiveKLController, FixedKLController, kl_estimate
from rlhfkit.rl.losses import (
    entropy_bonus,
    explained_variance,
    policy_loss,
    value_loss,
)
from rlhfkit.rl.reward_sources import RewardModelSource, RewardSourceOptions
from rlhfkit.rl.rewards import RunningMoments, compute_rewards
from rlhfkit.rl.rollout import Rollout, make_rollout, pack_rows
from rlhfkit.sampling import SamplingOptions
from rlhfkit.tracking import plot_curves, read_metrics
from rlhfkit.training.cadence import Cadence
from rlhfkit.training.optim import make_optimizer
from rlhfkit.training.options import LoraOptions, OptimOptions, RunOptions
from rlhfkit.training.run import Run, TrainState, start_run
from rlhfkit.training.step import train_step

logger = logging.getLogger(__name__)

__all__ = ["PPOConfig", "train_ppo"]

POLICY_INFO = "rlhfkit_ppo.json"  # written beside the exported policy: reference, sampling settings
PPO_HINT = "Lower --lr or --critic-lr, or check the reward scale (try --score-norm whiten)."


@dataclass(kw_only=True)
class PPOConfig(SamplingOptions, RewardSourceOptions, RunOptions, OptimOptions, LoraOptions):
    """Fine-tune a language model with PPO against a reward model, with a KL penalty to the reference."""

    steps: int = opt(100, "PPO updates (one rollout batch and its optimisation each)", ge=1)
    batch_size: int = opt(16, "prompts per rollout, per process", ge=1)
    mini_batch_size: int = opt(8, "rollout rows per optimizer step", ge=1)
    ppo_epochs: int = opt(4, "passes over each rollout batch", ge=1)
    temperature: float = opt(1.0, "sampling temperature (log-probs are taken at the same temperature)", gt=0)
    score_norm: Literal["none", "scale", "whiten"] = opt("none", "normalise scores by running statistics: divide by the std, or also subtract the mean")
    score_clip: float | None = opt(None, "clip (normalised) scores to [-c, c]", gt=0)
    missing_eos_penalty: float | None = opt(None, "subtract this from the score of responses cut at max_new_tokens without EOS")
    kl_coef: float = opt(0.05, "KL penalty coefficient beta (initial value with --adaptive-kl)", ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = opt("k1", "per-token KL estimator in the reward (http://joschu.net/blog/kl-approx.html)")
    adaptive_kl: bool = opt(False, "adapt kl_coef toward --kl-target (Ziegler et al. 2019)")
    kl_target: float = opt(6.0, "adaptive KL: target KL per response, in nats", gt=0)
    kl_horizon: float = opt(10000, "adaptive KL: horizon in episodes", gt=0)
    max_kl: float | None = opt(None, "stop the run when the mean KL per response exceeds this (nats)", gt=0)
    gamma: float = opt(1.0, "GAE discount", ge=0, le=1)
    lam: float = opt(0.95, "GAE lambda", ge=0, le=1)
    whiten_advantages: bool = opt(True, "whiten advantages over the real tokens of each rollout")
    clip_eps: float = opt(0.2, "PPO ratio clip range", gt=0)
    vf_clip: float | None = opt(0.2, "value clip range (none = unclipped value loss)", gt=0)
    vf_coef: float = opt(0.1, "weight of the value loss", ge=0)
    entropy_coef: float = opt(0.0, "weight of the entropy bonus", ge=0)
    lr: float = opt(1e-5, "actor learning rate", gt=0)
    critic_lr: float | None = opt(None, "critic (or value head) learning rate (default: --lr)", gt=0)
    warmup_ratio: float = opt(0.0, "share of the updates spent warming the learning rate up", ge=0, lt=1)
    packing: bool = opt(True, "run the scoring and training passes on packed rows: no pad tokens, and the opening "
                              "tokens every prompt shares (a chat template's system prompt) computed once")
    rollout_logprobs: Literal["sampling", "forward"] = opt(
        "sampling", "where the rollout's old log-probs come from: the sampling pass itself (no extra forward pass; "
                    "with top-k/top-p filters a forward pass is used anyway) or a forward pass over the finished responses")
    critic: str = opt("auto", "value-head, reward-model (InstructGPT), policy, or a model folder; auto: reward-model when "
                              "it shares the policy's tokenizer, else value-head")
    lora_dropout: float = opt(0.0, "LoRA dropout (0 keeps log-probs of the rollout and the update equal)", ge=0, lt=1)
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass to save memory")
    save_every: int = opt(25, "write a resumable checkpoint every N updates (and at the end)", ge=1)
    log_every: int = opt(1, "log metrics every N updates", ge=1)
    sample_every: int = opt(10, "print a few generations with their scores every N updates (0 = never)", ge=0)
    n_samples: int = opt(3, "generations printed each time", ge=0)

    def validate(self) -> None:
        super().validate()
        require(self.mini_batch_size <= self.batch_size and self.batch_size % self.mini_batch_size == 0,
                f"option --mini-batch-size ({self.mini_batch_size}) must divide --batch-size ({self.batch_size}) so each PPO "
                f"epoch sees every rollout row once; e.g. --mini-batch-size {math.gcd(self.batch_size, self.mini_batch_size)}")
        require(self.mini_batch_size % self.grad_accum == 0,
                f"option --grad-accum ({self.grad_accum}) must divide --mini-batch-size ({self.mini_batch_size}): each "
                "optimizer step splits its minibatch into grad_accum equal micro-batches")
        if self.top_k or self.top_p < 1:
            logger.warning("top_k=%d top_p=%g: PPO's log-probs do not model these filters, so the ratio is off; "
                           "keep them off for training", self.top_k, self.top_p)


# ------------------------------------------------------------------ building blocks
def load_models(cfg: PPOConfig, device):
    """(tokenizer, ActorCritic, frozen reference or None with LoRA, reward source, the critic kind used, packing on)."""
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
    if cfg.lora:
        actor = with_lora(actor, cfg, "CAUSAL_LM")
    else:
        ref_model = copy.deepcopy(actor).to(device).eval().requires_grad_(False)
    reward = cfg.load_reward(device, cfg.cpu_matmul)
    critic_spec = cfg.critic
    if critic_spec == "auto":
        shares = (isinstance(reward, RewardModelSource) and reward.model.meta.kind == "decoder"
                  and reward.model.tokenizer.get_vocab() == tokenizer.get_vocab())
        critic_spec = "reward-model" if shares else "value-head"
    critic = load_critic(critic_spec, tokenizer, reward=cfg.reward if isinstance(reward, RewardModelSource) else None,
                         policy=cfg.policy)
    apply_cpu_matmul(cfg.cpu_matmul, device, critic)
    if critic is not None and packing:
        if packing_unsupported(critic.model) is not None:
            raise ConfigError(f"--packing: the critic {critic_spec} cannot run packed batches "
                              f"({packing_unsupported(critic.model)}); pass --no-packing")
        use_packed_attention(critic.model)
    model = ActorCritic(actor, critic)
    model.eval()  # no dropout anywhere: rollout and update must see the same policy
    return tokenizer, model, ref_model, reward, critic_spec, packing


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


def normalise_scores(cfg: PPOConfig, scores, ended, stats: RunningMoments):
    """Scores (M,) -> the scores that enter the reward: running whitening or scaling, EOS penalty."""
    if cfg.score_norm == "whiten":
        scores = (scores - stats.mean) / stats.std
    elif cfg.score_norm == "scale":
        scores = scores / stats.std
    if cfg.missing_eos_penalty:
        scores = scores - cfg.missing_eos_penalty * (~ended).to(scores.dtype)
    return scores


def export_policy(model: ActorCritic, tokenizer, cfg: PPOConfig, chat: bool, out: Path) -> Path:
    """The actor as a plain HF checkpoint (LoRA merged) at ``out/policy``, with how it was trained beside it."""
    info = {"reference": cfg.policy, "temperature": cfg.temperature, "chat_template": chat,
            "max_new_tokens": cfg.max_new_tokens, "reward": cfg.reward}
    return export_pretrained(model.actor, tokenizer, out / "policy", {POLICY_INFO: json.dumps(info, indent=2)})


def _packed(cfg: PPOConfig, r: Rollout, micro):
    """Rows ``micro`` of the rollout, packed (``--packing``), or None."""
    return pack_rows(r.query_mask[micro], r.input_ids[micro], r.attention_mask[micro]) if r.packed else None


def actor_micro_loss(cfg: PPOConfig, actor, r: Rollout, advantages, mb_tokens, micro):
    """The actor's loss on rollout rows ``micro`` (weighted by their share of the minibatch's tokens) and its stats."""
    mask = r.response_mask[micro]  # (m, N)
    weight = mask.sum() / mb_tokens
    logits, _ = response_logits(actor, r.input_ids[micro], r.attention_mask[micro], mask.shape[1], packed=_packed(cfg, r, micro))
    logits = logits / cfg.temperature  # (m, N, V): the distribution the tokens were sampled from
    logprobs = logprobs_from_logits(logits, r.response_ids[micro])  # (m, N)
    pg_loss, pg_stats = policy_loss(logprobs.float(), r.old_logprobs[micro], advantages[micro], mask, cfg.clip_eps)
    if cfg.entropy_coef > 0:
        entropy = entropy_bonus(logits, mask)
        loss = pg_loss - cfg.entropy_coef * entropy
    else:
        with torch.no_grad():  # for the log only: no (m, N, V) softmax kept for the backward pass
            entropy = entropy_bonus(logits.detach(), mask)
        loss = pg_loss
    stats = {"ppo/policy_loss": pg_loss, "ppo/entropy": entropy, "ppo/clipfrac": pg_stats["clipfrac"], "ppo/approx_kl": pg_stats["approx_kl"]}
    return loss * weight, {k: v.detach().float() * weight.detach() for k, v in stats.items()}


def critic_micro_loss(cfg: PPOConfig, critic, r: Rollout, returns, mb_tokens, micro):
    """``vf_coef`` times the clipped value loss on rollout rows ``micro``, weighted like the actor's."""
    mask = r.response_mask[micro]
    weight = mask.sum() / mb_tokens
    values = critic(r.input_ids[micro], r.attention_mask[micro], mask.shape[1], packed=_packed(cfg, r, micro))  # (m, N)
    vf_loss, vf_stats = value_loss(values.float(), r.old_values[micro], returns[micro], mask, cfg.vf_clip)
    stats = {"ppo/value_loss": vf_loss, "ppo/vf_clipfrac": vf_stats["vf_clipfrac"]}
    return cfg.vf_coef * vf_loss * weight, {k: v.detach().float() * weight.detach() for k, v in stats.items()}


def joint_micro_loss(cfg: PPOConfig, actor_critic, r: Rollout, advantages, returns, mb_tokens, micro):
    """A value head shares the actor's forward pass: one loss, ``actor + vf_coef * value``."""
    mask = r.response_mask[micro]
    weight = mask.sum() / mb_tokens
    logits, values = actor_critic(r.input_ids[micro], r.attention_mask[micro], mask.shape[1], cfg.temperature,
                                  packed=_packed(cfg, r, micro))
    logprobs = logprobs_from_logits(logits, r.response_ids[micro])
    pg_loss, pg_stats = policy_loss(logprobs.float(), r.old_logprobs[micro], advantages[micro], mask, cfg.clip_eps)
    entropy = entropy_bonus(logits if cfg.entropy_coef > 0 else logits.detach(), mask)
    vf_loss, vf_stats = value_loss(values.float(), r.old_values[micro], returns[micro], mask, cfg.vf_clip)
    loss = pg_loss - cfg.entropy_coef * entropy + cfg.vf_coef * vf_loss
    stats = {"ppo/policy_loss": pg_loss, "ppo/entropy": entropy, "ppo/clipfrac": pg_stats["clipfrac"],
             "ppo/approx_kl": pg_stats["approx_kl"], "ppo/value_loss": vf_loss, "ppo/vf_clipfrac": vf_stats["vf_clipfrac"]}
    return loss * weight, {k: v.detach().float() * weight.detach() for k, v in stats.items()}


def optimise(cfg: PPOConfig, run: Run, nets, optimizers, r: Rollout, advantages, returns, step: int) -> dict[str, float]:
    """``ppo_epochs`` passes over the rollout in shuffled minibatches; returns the mean losses and stats.

    ``nets``/``optimizers``: ``(actor_critic,)`` with a value head (one step on the joint
    loss, actor and head clipped separately), or ``(actor, critic)``, each stepped on its own
    loss with its own optimizer: the gradients are those of the summed loss (no parameter is
    shared), but only one network's activations are alive at a time. Minibatch order comes
    from a generator seeded by ``(seed, step, epoch)``.
    """
    mask = r.response_mask  # (M, N)
    M = mask.shape[0]
    totals: dict[str, torch.Tensor] = {}
    n_minibatches = 0
    for epoch in range(cfg.ppo_epochs):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 101 + epoch)
        b_inds = torch.randperm(M, generator=gen).to(mask.device)
        for start in range(0, M, cfg.mini_batch_size):
            mb_inds = b_inds[start:start + cfg.mini_batch_size]
            mb_tokens = mask[mb_inds].sum().clamp(min=1)
            micro = list(mb_inds.split(cfg.mini_batch_size // cfg.grad_accum))
            where = f"update {step + 1} (PPO epoch {epoch + 1})"
            if len(nets) == 1:
                actor_critic = run.accelerator.unwrap_model(nets[0])
                groups = [actor_critic.actor_parameters(), actor_critic.critic_parameters()]  # each clipped on its own scale
                loss_fns = [(nets[0], optimizers[0], partial(joint_micro_loss, cfg, nets[0], r, advantages, returns, mb_tokens), groups)]
            else:
                loss_fns = [(nets[0], optimizers[0], partial(actor_micro_loss, cfg, nets[0], r, advantages, mb_tokens), None),
                            (nets[1], optimizers[1], partial(critic_micro_loss, cfg, nets[1], r, returns, mb_tokens), None)]
            for net, optimizer, loss_fn, groups in loss_fns:
                _, stats = train_step(run, net, optimizer, micro, loss_fn, max_grad_norm=cfg.max_grad_norm, where=where,
                                      clip_groups=groups, hint=PPO_HINT)
                for s in stats:
                    for k, v in s.items():
                        totals[k] = totals.get(k, 0) + v
            n_minibatches += 1
    return {k: v / n_minibatches for k, v in totals.items()}


def check_kl(cfg: PPOConfig, run: Run, kl_mean: torch.Tensor, step: int) -> None:
    """Stop before the update when the KL is not finite or past ``--max-kl``."""
    finite = torch.isfinite(kl_mean).item()
    if not finite or (cfg.max_kl is not None and kl_mean.item() > cfg.max_kl):
        raise RunStopped(
            f"update {step + 1}: mean KL to the reference is {kl_mean.item():.4g} nats per response"
            + (f", past --max-kl {cfg.max_kl}" if finite else "")
            + f". Nothing from this update was saved; {run.stop_note()}. "
            "Lower --lr, raise --kl-coef (or use --adaptive-kl), or check the reward for exploits.")


def update_metrics(r: Rollout, rewards, kl_per_seq, returns, losses: dict) -> dict[str, torch.Tensor]:
    """This process's per-update means (reduced over processes by the caller)."""
    mask = r.response_mask
    return {
        "ppo/score_mean": r.scores.mean(),
        "ppo/reward_mean": masked_sum(rewards, mask, dim=1).mean(),  # score minus KL penalty, per response
        "ppo/kl": kl_per_seq.mean(),
        "ppo/kl_k3": masked_sum(kl_estimate(r.old_logprobs, r.ref_logprobs, "k3"), mask, dim=1).mean(),
        "ppo/explained_variance": explained_variance(r.old_values, returns, mask).nan_to_num(0.0),
        "ppo/response_length": mask.sum(1).float().mean(),
        "ppo/eos_fraction": r.ended.float().mean(),
        **losses,
    }


# ---------------------------------------------------------------------- the loop
def train_ppo(cfg: PPOConfig) -> dict[str, Any]:
    """Run PPO; returns the last update's metrics plus ``policy`` (the exported folder, if finished)."""
    run = start_run(cfg, "ppo")
    prompts = read_prompts(cfg.prompts)
    tokenizer, model, ref_model, reward, critic_spec, packing = load_models(cfg, run.device)
    chat = use_chat_template(tokenizer, cfg.chat_template, cfg.policy)
    settings = cfg.settings()

    critic_lr = cfg.critic_lr if cfg.critic_lr is not None else cfg.lr
    kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl else FixedKLController(cfg.kl_coef)
    score_stats = RunningMoments()
    if model.critic is not None:  # two networks, each with its optimizer (and under DDP wrapped) on its own
        actor_opt, actor_sched = make_optimizer(cfg, model.actor_parameters(), cfg.steps)
        critic_opt, critic_sched = make_optimizer(cfg, [{"params": model.critic_parameters(), "lr": critic_lr}], cfg.steps)
        actor, critic, actor_opt, critic_opt = run.accelerator.prepare(model.actor, model.critic, actor_opt, critic_opt)
        nets, optimizers, schedulers = (actor, critic), (actor_opt, critic_opt), (actor_sched, critic_sched)
    else:
        optimizer, scheduler = make_optimizer(cfg, [{"params": model.actor_parameters(), "lr": cfg.lr},
                                                    {"params": model.critic_parameters(), "lr": critic_lr}], cfg.steps)
        wrapped, optimizer = run.accelerator.prepare(model, optimizer)
        nets, optimizers, schedulers = (wrapped,), (optimizer,), (scheduler,)
        model = run.accelerator.unwrap_model(wrapped)
    for obj in (*schedulers, kl_ctl, score_stats):
        run.accelerator.register_for_checkpointing(obj)
    state = run.begin(TrainState(), cfg.steps, unit="update")
    run.write(f"ppo: {len(prompts)} prompts, policy {cfg.policy}{' (LoRA)' if cfg.lora else ''}, reward {reward!r}, "
              f"critic {critic_spec}, chat template {'on' if chat else 'off'}")
    cadence, row = Cadence(cfg.steps, cfg.log_every, cfg.save_every, stop_after=cfg.stop_after_steps), {}

    while state.step < cadence.stop_at:
        step, t_start = state.step, time.perf_counter()
        # 1. rollout ---------------------------------------------------------------
        batch = [prompts[i] for i in prompt_indices(len(prompts), cfg.batch_size, step, cfg.seed, run.rank, run.world)]
        with run.accelerator.autocast():
            r = make_rollout(model, ref_model, reward, tokenizer, batch, settings, chat, cfg.rollout_logprobs == "sampling",
                             packing)
        t_rollout = time.perf_counter() - t_start
        mask, M, kl_coef = r.response_mask, len(r), kl_ctl.kl_coef  # mask (M, N)

        # 2-4. scores -> rewards -> advantages ------------------------------------------
        score_stats.update(run.accelerator.gather(r.scores))
        scores = normalise_scores(cfg, r.scores, r.ended, score_stats)  # (M,)
        rewards, kl = compute_rewards(scores, r.old_logprobs, r.ref_logprobs, mask, kl_coef, cfg.kl_estimator, cfg.score_clip)
        kl_per_seq = masked_sum(kl, mask, dim=1)  # (M,) KL summed over each response
        kl_mean = run.accelerator.reduce(kl_per_seq.mean(), reduction="mean")
        check_kl(cfg, run, kl_mean, step)
        advantages, returns = compute_gae(r.old_values, rewards, mask, cfg.gamma, cfg.lam)  # (M, N) each
        if cfg.whiten_advantages and int(mask.sum()) > 1:
            advantages = masked_whiten(advantages, mask)

        # 5. PPO epochs over shuffled minibatches ------------------------------------------
        t_optimise = time.perf_counter()
        losses = optimise(cfg, run, nets, optimizers, r, advantages, returns, step)
        t_optimise = time.perf_counter() - t_optimise
        for scheduler in schedulers:
            scheduler.step()
        kl_ctl.update(kl_mean.item(), n_steps=M * run.world)  # arXiv:1909.08593 sec. 2.2, per batch
        state.step, state.episodes = state.step + 1, state.episodes + M * run.world

        # 6. metrics, samples, checkpoint ------------------------------------------------
        dt = time.perf_counter() - t_start
        local = update_metrics(r, rewards, kl_per_seq, returns, losses)
        row = dict(zip(local, run.accelerator.reduce(torch.stack([v.float() for v in local.values()]), reduction="mean").tolist()))
        all_scores = run.accelerator.gather(r.scores)
        row.update({
            "ppo/score_std": all_scores.std().item() if all_scores.numel() > 1 else 0.0, "ppo/kl_coef": kl_coef,
            "ppo/tokens_per_s": row["ppo/response_length"] * M * run.world / dt, "ppo/episodes_per_s": M * run.world / dt,
            "ppo/lr": schedulers[0].get_last_lr()[0], "ppo/critic_lr": schedulers[-1].get_last_lr()[-1],
            "time/rollout_s": t_rollout, "time/optimise_s": t_optimise, "time/update_s": dt, "ppo/episodes": state.episodes,
        })
        run.progress.set_postfix(score=f"{row['ppo/score_mean']:.3f}", kl=f"{row['ppo/kl']:.3f}", ep_s=f"{row['ppo/episodes_per_s']:.1f}")
        if cfg.sample_every and cfg.n_samples and state.step % cfg.sample_every == 0:
            run.write(samples_text(state.step, r, cfg.n_samples))
        cadence.after_step(run, state, log=partial(run.log.log, state.step, row))

    run.save(state)
    finished = run.close(state, cfg.steps)
    result = dict(row)
    if run.main:
        if finished:
            result["policy"] = str(export_policy(model, tokenizer, cfg, chat, run.out))
        plot_curves(read_metrics(run.out / "metrics.jsonl"),
                    [("score", ["ppo/score_mean", "ppo/reward_mean"]), ("KL to reference", ["ppo/kl", "ppo/kl_k3"]),
                     ("kl_coef", ["ppo/kl_coef"]), ("losses", ["ppo/policy_loss", "ppo/value_loss"]),
                     ("entropy", ["ppo/entropy"]), ("response length", ["ppo/response_length"])],
                    run.out / "curves.png", title=f"PPO: {cfg.policy} vs {cfg.reward}")
    run.accelerator.wait_for_everyone()
    return result


def samples_text(step: int, r: Rollout, n: int) -> str:
    lines = [f"--- update {step}: samples ---"]
    for i in range(min(n, len(r))):
        lines.append(f"[score {r.scores[i].item():+.3f}] {_short(r.prompts[i])!r} -> {_short(r.responses[i])!r}")
    return "\n".join(lines)


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."

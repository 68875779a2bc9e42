"""``rlhfkit dpo``: direct preference optimisation of a causal LM, straight from rank lists.

The loop, top to bottom (:func:`train_dpo`): read and check the data (the readers and
errors of ``rm train``: rank lists, pairs, HH dialogues, n-choose-1, ranked JSONL) -> load
the policy (no dropout, LoRA) -> encode each unique (prompt, response) once
(:func:`rlhfkit.data.examples.encode_response`) -> the reference log-probabilities of every text in one batched
no-grad pass before the first step (read back from the run folder on ``--resume``) ->
length-grouped effective batches -> one :func:`~rlhfkit.training.step.train_step` per
batch (this process's micro-batches: ``log pi`` of the batch's unique texts, per-list loss
of :mod:`rlhfkit.dpo.losses`) -> log, evaluate (best model kept by held-out implicit-reward
accuracy), checkpoint on the shared :class:`~rlhfkit.training.cadence.Cadence` -> final
evaluation, ``final/`` and ``best/`` as plain Hugging Face causal-LM folders, plots.

**Cost.** A list of ``K`` responses is ``K`` policy sequences per step, not the
``2 * C(K, 2)`` of expanding it into pairs: the batch holds each unique text once and the
losses gather its log-probability into every pair (or ranking) it takes part in.

**The reference without a second model.** The reference is the policy as loaded
(``--policy``). Its log-probability of every training and held-out text is computed once,
before training, with the policy itself (with ``--lora``: the policy with its adapter
disabled), and kept in ``OUTPUT/reference_logprobs.safetensors``; ``--resume`` reads them
back (or recomputes them before the checkpoint is restored, if the file is missing or the
data changed). So no second model is held while training. Only the evaluation's KL on
sampled responses needs the reference on new text: with ``--lora`` the adapter is switched
off for it, otherwise ``--policy`` is loaded for the evaluation and freed after it.

**Exactness.** Lists weigh as their ``PreferenceExample.weight`` says (1 unless the data
gives a ``"weight"``) however a step is split: each micro-batch loss is
``sum(w_i * per-list loss_i) * world_size / sum(w over the step's lists)``
(:func:`rlhfkit.losses.weighted_list_sum`), as in ``rm train``; with every weight 1 that is
the plain mean over lists (tests check batch 4 x accumulation 1 equals batch 1 x
accumulation 4, and a list of weight 2 equals the list twice).

**Several processes.** Every process computes the whole reference pass (under FSDP2 each
forward needs all of them); under FSDP2 every process also evaluates and the exports gather
the shards first, as in ``sft`` (a test checks 2 sharded processes match one).

**Exports.** ``final/`` and ``best/`` are plain causal-LM folders (LoRA merged) with
``rlhfkit_dpo.json`` beside the weights, naming the reference and ``beta``, so ``rlhfkit rm
eval`` and ``rlhfkit score`` can read the run as a reward model
(:class:`~rlhfkit.models.implicit_reward.ImplicitReward`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from rlhfkit import losses as L
from rlhfkit.checkpoint import export_pretrained
from rlhfkit.config import opt, require, to_dict
from rlhfkit.data.collate import EncodedPreferences, collate, iter_batches, process_micro_batches
from rlhfkit.data.examples import Pad, pad_right, policy_encoder
from rlhfkit.data.options import PreferenceDataOptions, read_train_eval
from rlhfkit.data.readers import describe
from rlhfkit.defaults import BATCH_SIZE, EVAL_BATCH_SIZE, EXPORT, MAX_LENGTH
from rlhfkit.dpo.evaluate import evaluate_lists, kl_prompts, sampled_kl
from rlhfkit.dpo.losses import DPOLossName, best_mask, implicit_rewards, list_losses, pair_margins
from rlhfkit.errors import UserError
from rlhfkit.evaluation.scores import score_texts
from rlhfkit.models.cpu_linear import apply_cpu_matmul
from rlhfkit.models.hub import resolve_run_folder
from rlhfkit.models.implicit_reward import DPO_INFO
from rlhfkit.models.logprobs import SequenceLogprobs
from rlhfkit.models.lora import with_lora
from rlhfkit.models.policy import load_policy
from rlhfkit.models.tokenizers import use_chat_template
from rlhfkit.ops import masked_sum
from rlhfkit.sampling import SamplingSettings
from rlhfkit.tracking import plot_curves, read_metrics
from rlhfkit.training.cadence import Cadence, MetricsWindow
from rlhfkit.training.optim import disable_dropout, make_optimizer
from rlhfkit.training.options import LoraOptions, OptimOptions, RunOptions
from rlhfkit.training.run import Run, TrainState, improved, start_run
from rlhfkit.training.step import train_step

logger = logging.getLogger(__name__)

__all__ = ["DPOConfig", "train_dpo", "REFERENCE_FILE"]

REFERENCE_FILE = "reference_logprobs.safetensors"
REFERENCE_LOGPROB_SLACK = 1e-4  # a sum of log-softmax values is <= 0; this much is rounding, more is damage


@dataclass(kw_only=True)
class DPOConfig(RunOptions, OptimOptions, LoraOptions, PreferenceDataOptions):
    """Direct preference optimisation of a causal LM from rank lists, pairs, dialogues or n-choose-1 choices."""

    policy: str = opt(
        "smollm2-135m", "causal LM to train, and the reference it is pulled towards: alias, local folder or hub id"
    )
    loss: DPOLossName = opt(
        "dpo",
        "dpo: every ranked pair of a list (Rafailov et al. 2023); ipo: Azar et al. 2023; "
        "listwise: Plackett-Luce over the whole ranking (DPO's appendix A.3; equals dpo at K=2)",
    )
    beta: float = opt(
        0.1,
        "how hard the policy is held to the reference (IPO's tau); implicit reward = beta * (log pi - log pi_ref)",
        gt=0,
    )
    lr: float = opt(
        1e-6, "peak learning rate (TRL's DPO default for full fine-tuning; LoRA usually wants ~5e-6 to 5e-5)", gt=0
    )
    epochs: float = opt(1.0, "passes over the training lists (fractions allowed)", gt=0)
    max_steps: int | None = opt(None, "optimizer steps in the schedule (overrides --epochs)", ge=1)
    batch_size: int = opt(
        BATCH_SIZE["dpo"], "lists per process per micro-batch (a list of K responses is K sequences)", ge=1
    )
    max_length: int = opt(
        MAX_LENGTH["dpo"], "tokens per (prompt, response); longer texts are truncated and counted, never dropped", ge=8
    )
    chat_template: bool | None = opt(
        None,
        "read (prompt, response) through the chat template, as a user and an assistant "
        "turn (default: when the tokenizer has one), else prompt + response + EOS",
    )
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass to save memory")
    logprob_chunk_size: int = opt(
        0,
        "log pi(y|x) from the last hidden states, this many tokens' logits at a time, recomputed in the backward "
        "pass (no (sequences, tokens, vocab) logits kept); 0: build the logits at once. Not under fsdp2",
        ge=0,
    )
    eval_every: int = opt(100, "evaluate every N optimizer steps (and at the end)", ge=1)
    eval_batch_size: int = opt(
        EVAL_BATCH_SIZE["dpo"], "sequences per forward pass of the reference pass and of evaluation", ge=1
    )
    eval_kl_prompts: int = opt(
        16, "held-out prompts sampled at each evaluation for the KL to the reference (0 = none)", ge=0
    )
    eval_max_new_tokens: int = opt(64, "response length limit of those samples", ge=1)


# ------------------------------------------------------------------ building blocks
def load_data(cfg: DPOConfig):
    """(train examples, eval examples), read as ``rm train`` reads them; every list must hold a comparison."""
    train, evals = read_train_eval(cfg, cfg.seed)
    for examples, where in ((train, cfg.train), (evals, cfg.eval or cfg.train)):
        single = next((ex for ex in examples if ex.k < 2), None)
        if single is not None:
            raise UserError(
                f"{single.source or where}: DPO learns from comparisons, and this row has one scored response; "
                "give rank lists, pairs, HH dialogues or n-choose-1 rows (a reward model trains on scores: rm train)"
            )
    return train, evals


def build_policy(cfg: DPOConfig, device):
    """(tokenizer, policy): fp32 weights, pad != EOS, no dropout, matmul kernel, checkpointing, LoRA."""
    policy, tokenizer = load_policy(cfg.policy)
    require(
        tokenizer.eos_token_id is not None, f"the tokenizer of {cfg.policy} has no EOS token, so responses cannot end"
    )
    # Dropout off (TRL's DPO default): the reference pass before training then gives exactly
    # the policy's log-probabilities at step 0, and the loss starts at log 2.
    disable_dropout(policy)
    apply_cpu_matmul(cfg.cpu_matmul, device, policy)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora:
        policy = with_lora(policy, cfg, "CAUSAL_LM")
    return tokenizer, policy


@contextlib.contextmanager
def adapter_disabled(policy: nn.Module) -> Iterator[None]:
    """With LoRA, the policy's adapter switched off (the reference); otherwise nothing changes."""
    with policy.disable_adapter() if hasattr(policy, "disable_adapter") else contextlib.nullcontext():
        yield


@contextlib.contextmanager
def reference_policy(cfg: DPOConfig, policy: nn.Module, device) -> Iterator[nn.Module]:
    """The reference for new text during training: the LoRA policy with its adapter disabled,
    or ``--policy`` loaded for this use only (freed when the block ends)."""
    if cfg.lora:
        with adapter_disabled(policy):
            yield policy
        return
    reference, _ = load_policy(cfg.policy, device=device)
    apply_cpu_matmul(cfg.cpu_matmul, device, reference)
    try:
        yield reference
    finally:
        del reference


def fingerprint(data: EncodedPreferences | None) -> str:
    """A hash of every text's tokens and response mask: the cached log-probs belong to exactly these."""
    text = json.dumps([[t["input_ids"], t["response_mask"]] for t in data.texts]) if data is not None else ""
    return hashlib.sha256(text.encode()).hexdigest()


def reference_logprobs(
    run: Run, cfg: DPOConfig, model: SequenceLogprobs, data: dict[str, EncodedPreferences | None], pad: Pad
) -> dict[str, Tensor]:
    """``{"train": (n_texts,), "eval": (n_texts,)}``: ``log pi_ref`` of every text, float32 on the CPU.

    On ``--resume`` read from ``OUTPUT/reference_logprobs.safetensors`` when it passes
    :func:`check_reference_cache`; else (with a warning naming the file and what is wrong) one
    batched no-grad pass of the policy as loaded (it runs before :meth:`Run.begin` restores a
    checkpoint, so the weights are still the reference's), its adapter disabled under LoRA,
    with the training's autocast. Writes nothing.
    """
    path = run.out / REFERENCE_FILE
    if run.resume_from is not None and path.is_file():
        cached, problem = read_reference_cache(path, data)
        if cached is not None:
            return cached
        logger.warning("%s %s; recomputing the reference log-probs", path, problem)
    out = {}
    with adapter_disabled(model.policy), run.accelerator.autocast():
        for name, d in data.items():
            out[name] = score_texts(model, d, pad, cfg.eval_batch_size, run.device) if d is not None else torch.zeros(0)
    return out


def tensor_checksum(logprobs: dict[str, Tensor]) -> str:
    """sha256 of the tensors' bytes, in name order: recorded in the cache's metadata when it is written."""
    digest = hashlib.sha256()
    for name in sorted(logprobs):
        digest.update(name.encode())
        digest.update(logprobs[name].detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def read_reference_cache(
    path: Path, data: dict[str, EncodedPreferences | None]
) -> tuple[dict[str, Tensor] | None, str]:
    """The cached log-probs of ``data``, or None and what is wrong with the file. Checked: it
    reads as safetensors; its fingerprints match the data (the same texts, tokens and
    --max-length); one float32 tensor per split of one value per text; the checksum written
    with it; every value finite and <= 0 (a log-probability above 0 is impossible)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if any(meta.get(name) != fingerprint(d) for name, d in data.items()):
                return None, "was computed for other data or --max-length"
            if set(f.keys()) != set(data):
                return None, f"is damaged (tensors {sorted(f.keys())}, expected {sorted(data)})"
            cached = {name: f.get_tensor(name) for name in data}
    except Exception as e:  # safetensors raises its own SafetensorError (truncated, empty, garbage) or OSError
        return None, f"is damaged ({type(e).__name__}: {str(e)[:200]})"
    for name, d in data.items():
        n = len(d.texts) if d is not None else 0
        t = cached[name]
        if t.dtype != torch.float32 or tuple(t.shape) != (n,):
            return None, f"is damaged ({name}: {t.dtype} {tuple(t.shape)}, expected float32 ({n},), one per text)"
    if meta.get("checksum") != tensor_checksum(cached):
        return None, "is damaged (its values do not match the checksum written with them)"
    for name, t in cached.items():
        if not bool(torch.isfinite(t).all()) or bool((t > REFERENCE_LOGPROB_SLACK).any()):
            return None, f"is damaged ({name}: values that are not finite or above 0, impossible for a log-probability)"
    return cached, ""


def save_reference_logprobs(
    path: Path, logprobs: dict[str, Tensor], data: dict[str, EncodedPreferences | None]
) -> None:
    """Write the cache atomically, with the data's fingerprints and the tensors' checksum as metadata."""
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.to(torch.float32).contiguous() for k, v in logprobs.items()}
    save_file(
        tensors,
        str(tmp),
        metadata={**{k: fingerprint(d) for k, d in data.items()}, "checksum": tensor_checksum(tensors)},
    )
    os.replace(tmp, path)


def micro_loss(
    model,
    data: EncodedPreferences,
    ref_logprobs: Tensor,
    pad: Pad,
    loss: str,
    beta: float,
    device,
    scale: float,
    micro: tuple[list[int], bool],
):
    """One micro-batch: ``log pi`` of its unique texts once, per-list loss. Returns (weighted loss, stats).

    ``scale`` is ``world_size / (total weight of the step's lists)`` (:func:`rlhfkit.losses.weighted_list_sum`)."""
    list_ids, live = micro
    batch = collate(data, list_ids, pad).to(device)
    logprobs = batch.gather_lists(model(**batch.inputs))  # (B, K) float32
    ref = batch.gather_lists(ref_logprobs[batch.text_ids])  # (B, K)
    lengths = batch.gather_lists(batch.response_lengths.float())  # (B, K)
    per_list = list_losses(loss, logprobs, ref, batch.ranks, batch.list_mask, beta, lengths)  # (B,)
    weights = torch.tensor([data.examples[j].weight for j in list_ids], device=per_list.device)  # (B,)
    rewards = implicit_rewards(logprobs.detach(), ref, batch.list_mask, beta)  # (B, K)
    correct, pairs = L.pairwise_accuracy(rewards, batch.ranks, batch.list_mask)
    margin, _ = pair_margins(rewards, batch.ranks, batch.list_mask)
    best = best_mask(batch.ranks, batch.list_mask)  # (B, K)
    rest = batch.list_mask.bool() & ~best
    stats = {
        "loss": (per_list.detach() * weights).sum(),  # weighted: train/loss is the weighted mean
        "weight": weights.sum(),
        "lists": len(list_ids),
        "correct": correct,
        "pairs": pairs,
        "margin": margin,
        "logps_chosen": masked_sum(logprobs.detach(), best),
        "chosen": best.sum(),
        "logps_rejected": masked_sum(logprobs.detach(), rest),
        "rejected": rest.sum(),
        "tokens": batch.inputs["attention_mask"].sum(),
    }  # the real tokens of the unique texts forwarded
    stats = {
        k: v * live for k, v in stats.items()
    }  # a filler micro-batch still joins the all-reduce, and counts nothing
    return L.weighted_list_sum(per_list, weights, scale if live else 0.0), stats


def evaluate_and_keep_best(
    run: Run,
    model: SequenceLogprobs,
    tokenizer,
    eval_data,
    ref_eval: Tensor,
    pad: Pad,
    prompts,
    chat: bool,
    cfg: DPOConfig,
    state: TrainState,
) -> dict[str, Any]:
    """Evaluate (on every process when sharded), log, export ``best/`` when held-out implicit-reward accuracy improved."""
    metrics: dict[str, Any] = {}
    if run.evaluates() and eval_data is not None:
        was_training = model.training
        model.eval()
        with run.accelerator.autocast():
            metrics, _ = evaluate_lists(
                model,
                eval_data,
                ref_eval,
                pad,
                loss=cfg.loss,
                beta=cfg.beta,
                batch_size=cfg.eval_batch_size,
                device=run.device,
            )
            if prompts:
                settings = SamplingSettings(max_new_tokens=cfg.eval_max_new_tokens, max_prompt_length=cfg.max_length)
                metrics.update(
                    sampled_kl(
                        model.policy,
                        partial(reference_policy, cfg, model.policy, run.device),
                        tokenizer,
                        prompts,
                        settings,
                        chat=chat,
                        batch_size=cfg.eval_batch_size,
                        seed=cfg.seed,
                    )
                )
        model.train(was_training)
        if improved(state, metrics["pairwise_accuracy"], higher_is_better=True):
            export(run, model, tokenizer, cfg, chat, run.out / "best")
        if run.main:
            run.log.log(state.step, {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
            run.write(
                f"step {state.step}: eval implicit-reward accuracy {metrics['pairwise_accuracy']:.4f}  list_exact "
                f"{metrics['list_exact_accuracy']:.4f}  loss {metrics['loss']:.4f}  logps margin {metrics['logps_margin']:+.3f} "
                f"(reference {metrics['ref_logps_margin']:+.3f})"
                + (f"  KL {metrics['kl']:.3f}" if "kl" in metrics else "")
            )
    run.accelerator.wait_for_everyone()
    return metrics


def reference_name(policy: str) -> str:
    """How ``rlhfkit_dpo.json`` names the reference: a local folder as an absolute path, an alias or hub id as given."""
    local = Path(resolve_run_folder(str(Path(policy).expanduser())))
    return str(local.resolve()) if local.is_dir() else policy


def export(run: Run, model: SequenceLogprobs, tokenizer, cfg: DPOConfig, chat: bool, target: Path) -> None:
    """``target`` as a plain HF causal LM with ``rlhfkit_dpo.json`` beside it (collective when
    sharded: the weights are gathered first)."""
    state_dict = run.full_state_dict(model)
    if not run.main:
        return
    if state_dict is not None:  # gathered from the wrapper: its keys start with 'policy.'
        state_dict = {k.removeprefix("policy."): v for k, v in state_dict.items()}
    info = {
        "reference": reference_name(cfg.policy),
        "beta": cfg.beta,
        "loss": cfg.loss,
        "chat_template": chat,
        "max_length": cfg.max_length,
    }
    export_pretrained(
        model.policy,
        tokenizer,
        target,
        {
            DPO_INFO: json.dumps(info, indent=2),
            "training_config.yaml": yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True),
        },
        state_dict=state_dict,
    )


def log_train(
    run: Run, window: MetricsWindow, state: TrainState, scheduler, grad_norm, n_batches: int, result: dict
) -> None:
    """Log the window's training metrics, and keep them in ``result`` (what :func:`train_dpo` returns)."""
    sums, seconds = window.flush(run.accelerator)
    row = {
        "train/loss": sums["loss"] / (sums["weight"] or 1.0),
        "train/accuracy": sums["correct"] / max(sums["pairs"], 1),
        "train/reward_margin": sums["margin"] / max(sums["pairs"], 1),
        "train/logps_chosen": sums["logps_chosen"] / max(sums["chosen"], 1),
        "train/logps_rejected": sums["logps_rejected"] / max(sums["rejected"], 1),
        "train/lists_per_s": sums["lists"] / seconds,
        "train/tokens_per_s": sums["tokens"] / seconds,
        "train/lr": scheduler.get_last_lr()[0],
        "train/epoch": state.epoch + state.batch_in_epoch / n_batches,
    }
    if grad_norm is not None:
        row["train/grad_norm"] = float(grad_norm)
    run.log.log(state.step, row)
    run.progress.set_postfix(
        loss=f"{row['train/loss']:.4f}", acc=f"{row['train/accuracy']:.3f}", lists_s=f"{row['train/lists_per_s']:.1f}"
    )
    result.update(row)


# ---------------------------------------------------------------------- the loop
def train_dpo(cfg: DPOConfig) -> dict[str, Any]:
    """Run the whole training. Returns the last logged ``train/*`` and ``eval/*`` metrics plus
    ``step``, ``finished``, ``best_step`` and, when finished, the ``final`` and ``best`` folders."""
    run = start_run(cfg, "dpo")
    require(
        not (cfg.logprob_chunk_size and run.sharded),
        f"--logprob-chunk-size {cfg.logprob_chunk_size} reads the LM head's weight outside the model's forward pass, "
        "where FSDP2 keeps it sharded; pass --logprob-chunk-size 0 under fsdp2 (DDP and one process are fine)",
    )
    train_ex, eval_ex = load_data(cfg)
    tokenizer, policy = build_policy(cfg, run.device)
    chat = use_chat_template(tokenizer, cfg.chat_template, cfg.policy)
    encode, pad = policy_encoder(tokenizer, chat, cfg.max_length), partial(pad_right, tokenizer.pad_token_id)
    train_data = EncodedPreferences.build(train_ex, encode, cfg.max_length, what=cfg.train)
    eval_data = (
        EncodedPreferences.build(eval_ex, encode, cfg.max_length, what=cfg.eval or "eval split") if eval_ex else None
    )
    require(len(train_data) >= run.world, f"{len(train_data)} training lists cannot feed {run.world} processes")
    effective = cfg.batch_size * cfg.grad_accum * run.world
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * math.ceil(len(train_data) / effective)))

    model = SequenceLogprobs(policy, chunk_size=cfg.logprob_chunk_size)
    optimizer, scheduler = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad], total_steps)
    wrapped, optimizer = run.accelerator.prepare(model, optimizer)
    run.accelerator.register_for_checkpointing(scheduler)
    model = run.accelerator.unwrap_model(wrapped)
    texts = {"train": train_data, "eval": eval_data}
    ref = reference_logprobs(run, cfg, model, texts, pad)  # before begin(): the weights are still the reference's
    state = run.begin(TrainState(), total_steps)
    if run.main:
        save_reference_logprobs(run.out / REFERENCE_FILE, ref, texts)
    ref_train = ref["train"].to(run.device)
    info = describe(train_ex)
    run.write(
        f"dpo: {info['n_lists']} lists, {info['n_pairs']} pairs, {len(train_data.texts)} unique texts "
        f"({train_data.n_truncated} truncated at --max-length {cfg.max_length}); eval: {len(eval_ex)} lists; "
        f"loss {cfg.loss}, beta {cfg.beta}"
    )
    prompts = kl_prompts([ex.prompt for ex in eval_ex], cfg.eval_kl_prompts, chat)

    cadence = Cadence(total_steps, cfg.log_every, cfg.save_every, cfg.eval_every, cfg.stop_after_steps)
    window, result = MetricsWindow(), {}
    evaluate = partial(
        evaluate_and_keep_best, run, model, tokenizer, eval_data, ref["eval"], pad, prompts, chat, cfg, state
    )
    lengths = [train_data.list_length(j) for j in range(len(train_data))]
    wrapped.train()
    for epoch, b, n_batches, step_ids in iter_batches(
        lengths, effective, cfg.seed, cadence.stop_at - state.step, state.epoch, state.batch_in_epoch
    ):
        micro = process_micro_batches(step_ids, run.world, cfg.grad_accum, run.rank)
        scale = run.world / sum(train_data.examples[j].weight for j in step_ids)  # world / the step's total weight
        loss_fn = partial(micro_loss, wrapped, train_data, ref_train, pad, cfg.loss, cfg.beta, run.device, scale)
        grad_norm, stats = train_step(
            run,
            wrapped,
            optimizer,
            micro,
            loss_fn,
            max_grad_norm=cfg.max_grad_norm,
            scheduler=scheduler,
            where=f"step {state.step + 1} (epoch {epoch}, batch {b})",
            describe=lambda m: f"lists from {[train_data.examples[j].source for j in m[0]][:4]}",
        )
        cadence.step_done(
            run,
            state,
            epoch,
            b,
            stats,
            window,
            evaluate=evaluate,
            log=partial(log_train, run, window, state, scheduler, grad_norm, n_batches, result),
        )

    if state.step > 0:
        result.update({f"eval/{k}": v for k, v in evaluate().items() if isinstance(v, (int, float))})
    finished = run.finish(state, total_steps)
    if finished:
        export(run, model, tokenizer, cfg, chat, run.out / EXPORT)
        if eval_data is None:
            export(
                run, model, tokenizer, cfg, chat, run.out / "best"
            )  # nothing to select by: the final model is the best we know
    if run.main:
        plot_curves(
            read_metrics(run.out / "metrics.jsonl"),
            [
                ("loss", ["train/loss", "eval/loss"]),
                ("implicit-reward accuracy", ["train/accuracy", "eval/pairwise_accuracy", "eval/list_exact_accuracy"]),
                ("log-prob margin (better - worse)", ["eval/logps_margin", "eval/ref_logps_margin"]),
                ("KL to the reference (nats)", ["eval/kl"]),
            ],
            run.out / "curves.png",
            title=f"DPO ({cfg.loss}, beta {cfg.beta}): {cfg.policy}" + (" (LoRA)" if cfg.lora else ""),
        )
        if any(k.startswith("eval/") for k in result):
            (run.out / "eval_report.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    run.accelerator.wait_for_everyone()
    result.update(step=state.step, finished=finished, best_step=state.best_step)
    if finished:
        result.update(final=str(run.out / EXPORT), best=str(run.out / "best"))
    return result

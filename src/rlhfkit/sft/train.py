"""``rlhfkit sft``: supervised fine-tuning of a causal LM on instruction data.

The loop, top to bottom (:func:`train_sft`): read and tokenise the data (loss only on
response tokens, see :mod:`rlhfkit.sft.data`) -> optionally pack short examples into rows
-> load the policy (a pad token distinct from EOS, LoRA) -> plan length-grouped effective
batches -> one :func:`~rlhfkit.training.step.train_step` per batch (forward, per-token
NLL) -> log, evaluate (loss, perplexity; best model kept), checkpoint on the shared
:class:`~rlhfkit.training.cadence.Cadence` -> ``final/`` and ``best/`` as plain Hugging
Face causal-LM folders, ``curves.png`` and a few greedy samples in ``samples.jsonl``.

The loss is the mean NLL over every response token of the optimizer step, exactly,
however the step is split: the plan fixes which rows a step holds, so the step's token
count ``n`` is known before its first forward pass, and each micro-batch contributes
``sum(token NLL) * world_size / n``. Accumulation sums and DDP averages over processes, so
the gradient is that of the step's token mean (a test checks batch 4 x accumulation 1
equals batch 1 x accumulation 4). Long and short examples therefore weigh by their tokens,
as in one big batch.

Packing (``--packing``) uses a 4D block-diagonal causal mask and per-example position ids,
so packed rows never attend across examples (tested: same per-token losses as separate
runs). It needs the ``sdpa`` or ``eager`` attention implementation; flash-attention
variants do not take 4D masks and are refused with a clear error.
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from rlhfkit.checkpoint import export_pretrained
from rlhfkit.config import ConfigError, opt, require, to_dict
from rlhfkit.data.collate import iter_batches, process_micro_batches
from rlhfkit.data.examples import IGNORE_INDEX
from rlhfkit.data.instructions import read_sft_data
from rlhfkit.data.prompts import Prompt
from rlhfkit.defaults import BATCH_SIZE, EVAL_BATCH_SIZE, EXPORT, MAX_LENGTH
from rlhfkit.models.chunked_logprobs import logprobs_from_hidden
from rlhfkit.models.cpu_linear import apply_cpu_matmul
from rlhfkit.models.logprobs import lm_head_weights
from rlhfkit.models.lora import with_lora
from rlhfkit.models.policy import forward_accepts, load_policy
from rlhfkit.models.tokenizers import use_chat_template
from rlhfkit.ops import masked_sum
from rlhfkit.sampling import SamplingSettings, sample_texts
from rlhfkit.sft.data import (
    EncodedSFT,
    block_causal_mask,
    collate,
    pack_examples,
    split_examples,
)
from rlhfkit.sft.losses import sft_loss, token_nll
from rlhfkit.tracking import plot_curves, read_metrics
from rlhfkit.training.cadence import Cadence, MetricsWindow
from rlhfkit.training.optim import make_optimizer
from rlhfkit.training.options import LoraOptions, OptimOptions, RunOptions
from rlhfkit.training.run import Run, TrainState, improved, start_run
from rlhfkit.training.step import train_step

logger = logging.getLogger(__name__)

__all__ = ["SFTConfig", "train_sft", "model_token_nll", "evaluate_sft"]

SAMPLE_MAX_NEW_TOKENS = 64
SUPPORTED_PACKING_ATTENTION = ("sdpa", "eager")


@dataclass(kw_only=True)
class SFTConfig(RunOptions, OptimOptions, LoraOptions):
    """Supervised fine-tuning of a causal language model on prompt/response or chat data."""

    train: str = opt(help='training data: JSONL of {"prompt", "response"} or {"messages": [...]} rows')
    policy: str = opt(
        "smollm2-135m", "causal LM to fine-tune: alias (smollm2-135m), local folder or hub id", was=("model",)
    )
    eval: str | None = opt(None, "held-out data file in the same format (default: --eval-fraction of --train, or none)")
    eval_fraction: float | None = opt(None, "hold out this seeded random share of --train for evaluation", gt=0, lt=1)
    chat_template: bool | None = opt(
        None,
        "render prompt/response rows as a user and an assistant turn with the chat "
        "template (default: when the tokenizer has one); 'messages' rows always use it",
    )
    assistant_turns: Literal["all", "last"] = opt("all", "chat rows: train on every assistant turn, or only the last")
    epochs: float = opt(1.0, "passes over the training data (fractions allowed)", gt=0)
    max_steps: int | None = opt(None, "optimizer steps in the schedule (overrides --epochs)", ge=1)
    batch_size: int = opt(BATCH_SIZE["sft"], "rows (examples, or packed rows) per process per micro-batch", ge=1)
    lr: float = opt(2e-5, "peak learning rate (LoRA usually wants ~1e-4 to 3e-4)", gt=0)
    warmup_ratio: float = opt(0.03, "share of the optimizer steps spent warming the learning rate up", ge=0, lt=1)
    scheduler: Literal["linear", "cosine", "constant"] = opt("cosine", "learning-rate schedule after warm-up")
    max_length: int = opt(
        MAX_LENGTH["sft"],
        "tokens per example (and per packed row); longer examples are truncated and counted, never dropped",
        ge=8,
    )
    packing: bool = opt(False, "pack short examples into rows of max_length tokens, with no attention across examples")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass to save memory")
    logprob_chunk_size: int = opt(
        0,
        "the loss from the last hidden states, this many target tokens' logits at a time, recomputed in the "
        "backward pass (no (rows, tokens, vocab) logits kept, none built for prompt tokens); 0: the model's "
        "logits at once. Not under fsdp2",
        ge=0,
    )
    eval_every: int = opt(100, "evaluate every N optimizer steps (and before the first and after the last)", ge=1)
    eval_batch_size: int = opt(EVAL_BATCH_SIZE["sft"], "examples per evaluation forward pass", ge=1)
    n_samples: int = opt(
        4,
        f"greedy samples (up to {SAMPLE_MAX_NEW_TOKENS} tokens) for the first N eval prompts, "
        "written to samples.jsonl at the end (0 = none)",
        ge=0,
    )

    def validate(self) -> None:
        super().validate()
        require(
            not (self.eval and self.eval_fraction is not None),
            "give either --eval FILE or --eval-fraction (a split of --train), not both",
        )


# ------------------------------------------------------------------ building blocks
def model_token_nll(model, batch, attn_implementation: str = "sdpa", chunk_size: int = 0):
    """Forward ``batch`` (an :class:`~rlhfkit.sft.data.SFTBatch`) -> ``(nll, response_mask)``, both ``(B, T-1)``.

    Packed rows get a 4D block-diagonal causal mask (bool for sdpa, additive for eager) and
    their restarting position ids, so every example sees only itself. With ``chunk_size``
    (``--logprob-chunk-size``) the forward pass stops at the last hidden states and only the
    target tokens' logits are built, ``chunk_size`` at a time (:func:`hidden_token_nll`).
    """
    if batch.seq_ids is None:
        inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    else:
        allowed = block_causal_mask(batch.seq_ids)  # (B, 1, T, T)
        if attn_implementation == "eager":  # eager adds the mask to the scores
            mask = torch.zeros(allowed.shape, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(torch.float32).min
            )
        elif attn_implementation == "sdpa":
            mask = allowed
        else:
            raise ConfigError(f"--packing needs sdpa or eager attention; this model uses {attn_implementation!r}")
        inputs = dict(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids)
    if chunk_size:
        return hidden_token_nll(model, inputs, batch.labels, chunk_size)
    return token_nll(model(**inputs).logits, batch.labels)  # logits (B, T, V)


def hidden_token_nll(model, inputs: dict, labels: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~rlhfkit.sft.losses.token_nll`'s ``(nll, response_mask)``, both ``(B, T-1)``, from the
    last hidden states: the model's forward pass builds one position's logits (``logits_to_keep``),
    and :func:`~rlhfkit.models.chunked_logprobs.logprobs_from_hidden` the target tokens' logits,
    ``chunk_size`` rows at a time (prompt, header and padding positions never reach the LM head)."""
    keep = dict(logits_to_keep=1) if forward_accepts(model, "logits_to_keep") else {}
    out = model(**inputs, output_hidden_states=True, **keep)
    hidden = out.hidden_states[-1][:, :-1]  # (B, T-1, H): position t predicts token t + 1
    targets = labels[:, 1:]  # (B, T-1)
    response_mask = targets != IGNORE_INDEX
    weight, bias = lm_head_weights(model)
    logprobs, _ = logprobs_from_hidden(
        hidden[response_mask], weight, targets[response_mask], bias=bias, chunk_size=chunk_size
    )  # (R,) over the R target tokens
    nll = torch.zeros(response_mask.shape, dtype=logprobs.dtype, device=logprobs.device).masked_scatter(
        response_mask, -logprobs
    )
    return nll, response_mask


@torch.no_grad()
def evaluate_sft(
    model, data: EncodedSFT, pad_id: int, batch_size: int, device, autocast=None, chunk_size: int = 0
) -> dict[str, float]:
    """Token-mean NLL of every response token in ``data`` (unpacked, length-sorted batches) and its perplexity."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(data)), key=lambda i: -data.length(i))
    total, count = torch.zeros((), dtype=torch.float64), 0
    for start in range(0, len(order), batch_size):
        batch = collate(data, [[i] for i in order[start : start + batch_size]], pad_id).to(device)
        with autocast() if autocast is not None else nullcontext():
            nll, mask = model_token_nll(model, batch, chunk_size=chunk_size)
        total += masked_sum(nll.double(), mask).cpu()
        count += int(mask.sum())
    model.train(was_training)
    loss = (total / max(count, 1)).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count, "examples": len(data)}


def load_data(cfg: SFTConfig):
    """(train examples, eval examples)."""
    train = read_sft_data(cfg.train)
    evals = read_sft_data(cfg.eval) if cfg.eval else []
    if cfg.eval_fraction is not None:
        try:
            train, evals = split_examples(train, cfg.eval_fraction, cfg.seed)
        except ValueError as e:
            raise ConfigError(f"--eval-fraction: {e}") from None
    return train, evals


def check_chat_rows(cfg: SFTConfig, tokenizer, *example_sets) -> None:
    """A chat (``messages``) row is rendered by the tokenizer's chat template: refuse one before
    anything is written when the tokenizer has none."""
    if getattr(tokenizer, "chat_template", None):
        return
    for option, examples in zip(("--train", "--eval"), example_sets):
        chat_row = next((ex for ex in examples if ex.messages is not None), None)
        if chat_row is not None:
            raise ConfigError(
                f"{option}: {chat_row.source} is a chat ('messages') row, but the tokenizer of {cfg.policy} has no chat "
                "template to render it. Use a --policy whose tokenizer has one, or write the rows as "
                '{"prompt": ..., "response": ...} (trained as plain text with --no-chat-template)'
            )


def build_policy(cfg: SFTConfig, device):
    """(tokenizer, model, attention implementation): fp32 weights, pad != EOS, matmul kernel, LoRA."""
    model, tokenizer = load_policy(cfg.policy)
    require(
        tokenizer.eos_token_id is not None,
        f"the tokenizer of {cfg.policy} has no EOS token, so replies cannot be taught to end",
    )
    apply_cpu_matmul(cfg.cpu_matmul, device, model)
    attn = getattr(model.config, "_attn_implementation", None) or "eager"
    require(
        not cfg.packing or attn in SUPPORTED_PACKING_ATTENTION,
        f"--packing builds a 4D block-diagonal attention mask, which the {attn!r} attention of {cfg.policy} does not "
        "take; use sdpa or eager attention, or turn --packing off",
    )
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora:
        model = with_lora(model, cfg, "CAUSAL_LM")
    return tokenizer, model, attn


def micro_loss(
    model,
    data: EncodedSFT,
    rows,
    pad_id: int,
    packed: bool,
    attn: str,
    device,
    n_step_tokens: int,
    world: int,
    chunk_size: int,
    micro,
):
    """One micro-batch: the NLL of its response tokens over ``n_step_tokens``, the whole step's.
    DDP averages over processes, so ``* world`` makes the sum over processes the step's token mean."""
    row_ids, live = micro
    batch = collate(data, [rows[r] for r in row_ids], pad_id, packed=packed).to(device)
    nll, mask = model_token_nll(model, batch, attn, chunk_size)  # (B, T-1) each
    n_targets = sum(data.n_targets(i) for r in row_ids for i in rows[r])  # known up front: no device sync
    stats = {
        "nll": nll.detach().double().sum() * live,
        "tokens": n_targets * live,
        "seen": sum(data.length(i) for r in row_ids for i in rows[r]) * live,
    }
    return sft_loss(nll, mask, n_step_tokens) * (world if live else 0.0), stats


def evaluate_and_keep_best(
    run: Run, model, tokenizer, eval_data, cfg: SFTConfig, state: TrainState
) -> dict[str, float]:
    """Evaluate (on every process when sharded), log, export ``best/`` when the loss improved."""
    metrics: dict[str, float] = {}
    if run.evaluates() and eval_data is not None:
        metrics = evaluate_sft(
            model,
            eval_data,
            tokenizer.pad_token_id,
            cfg.eval_batch_size,
            run.device,
            run.accelerator.autocast,
            cfg.logprob_chunk_size,
        )
        if run.main:
            run.log.log(state.step, {f"eval/{k}": v for k, v in metrics.items()})
            run.write(f"step {state.step}: eval loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.2f}")
        if state.step > 0 and improved(state, metrics["loss"], higher_is_better=False):
            export(run, model, tokenizer, cfg, run.out / "best")
    run.accelerator.wait_for_everyone()
    return metrics


def export(run: Run, model, tokenizer, cfg: SFTConfig, target: Path) -> None:
    """``target`` as a plain HF causal LM (collective when sharded: the weights are gathered first)."""
    state_dict = run.full_state_dict(model)
    if run.main:
        export_pretrained(
            model,
            tokenizer,
            target,
            {"training_config.yaml": yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)},
            state_dict=state_dict,
        )


def log_train(
    run: Run, window: MetricsWindow, state: TrainState, scheduler, grad_norm, n_batches: int, result: dict
) -> None:
    """Log the window's training metrics, and keep them in ``result`` (what :func:`train_sft` returns)."""
    sums, seconds = window.flush(run.accelerator)
    row = {
        "train/loss": sums["nll"] / max(sums["tokens"], 1),
        "train/tokens_per_s": sums["seen"] / seconds,  # all real tokens
        "train/lr": scheduler.get_last_lr()[0],
        "train/epoch": state.epoch + state.batch_in_epoch / n_batches,
    }
    if grad_norm is not None:
        row["train/grad_norm"] = float(grad_norm)
    run.log.log(state.step, row)
    run.progress.set_postfix(loss=f"{row['train/loss']:.4f}", tok_s=f"{row['train/tokens_per_s']:.0f}")
    result.update(row)


# ---------------------------------------------------------------------- the loop
def train_sft(cfg: SFTConfig) -> dict[str, Any]:
    """Run the whole fine-tuning. Returns the last logged ``train/*`` and ``eval/*`` metrics
    plus ``step``, ``finished`` and, when finished, the ``final`` and ``best`` model folders."""
    run = start_run(cfg, "sft")
    require(
        not (cfg.logprob_chunk_size and run.sharded),
        f"--logprob-chunk-size {cfg.logprob_chunk_size} reads the LM head's weight outside the model's forward pass, "
        "where FSDP2 keeps it sharded; pass --logprob-chunk-size 0 under fsdp2 (DDP and one process are fine)",
    )
    train_ex, eval_ex = load_data(cfg)
    tokenizer, model, attn = build_policy(cfg, run.device)
    chat = use_chat_template(tokenizer, cfg.chat_template, cfg.policy)
    check_chat_rows(cfg, tokenizer, train_ex, eval_ex)
    encode = dict(max_length=cfg.max_length, chat_template=chat, assistant_turns=cfg.assistant_turns)
    train_data = EncodedSFT.build(train_ex, tokenizer, what=cfg.train, **encode)
    eval_data = EncodedSFT.build(eval_ex, tokenizer, what=cfg.eval or "eval split", **encode) if eval_ex else None
    empty = [train_data.sources[i] for i in range(len(train_data)) if train_data.n_targets(i) == 0]
    require(
        not empty,
        f"{len(empty)} training example(s) have no response token left to learn, e.g. {empty[:1]}; raise --max-length",
    )
    rows = (
        pack_examples([train_data.length(i) for i in range(len(train_data))], cfg.max_length)
        if cfg.packing
        else [[i] for i in range(len(train_data))]
    )
    row_lengths = [sum(train_data.length(i) for i in r) for r in rows]
    row_targets = [sum(train_data.n_targets(i) for i in r) for r in rows]
    require(len(rows) >= run.world, f"{len(rows)} training rows cannot feed {run.world} processes")
    effective = cfg.batch_size * cfg.grad_accum * run.world
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * math.ceil(len(rows) / effective)))

    optimizer, scheduler = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad], total_steps)
    wrapped, optimizer = run.accelerator.prepare(model, optimizer)
    run.accelerator.register_for_checkpointing(scheduler)
    model = run.accelerator.unwrap_model(wrapped)
    state = run.begin(TrainState(), total_steps)
    run.write(
        f"sft: {len(train_data)} train examples ({sum(row_lengths)} tokens, {sum(row_targets)} response tokens, "
        f"{train_data.n_truncated} truncated at --max-length), {len(eval_ex)} eval examples"
        + (
            f"; packed into {len(rows)} rows, {sum(row_lengths) / (len(rows) * cfg.max_length):.0%} full"
            if cfg.packing
            else ""
        )
    )
    if run.resume_from is None:
        evaluate_and_keep_best(run, model, tokenizer, eval_data, cfg, state)  # the starting point of the eval curve

    cadence = Cadence(total_steps, cfg.log_every, cfg.save_every, cfg.eval_every, cfg.stop_after_steps)
    window, result = MetricsWindow(), {}
    wrapped.train()
    for epoch, b, n_batches, step_rows in iter_batches(
        row_lengths, effective, cfg.seed, cadence.stop_at - state.step, state.epoch, state.batch_in_epoch
    ):
        n_step_tokens = sum(row_targets[r] for r in step_rows)  # the step's response tokens, known up front
        micro = process_micro_batches(step_rows, run.world, cfg.grad_accum, run.rank)
        loss_fn = partial(
            micro_loss,
            wrapped,
            train_data,
            rows,
            tokenizer.pad_token_id,
            cfg.packing,
            attn,
            run.device,
            n_step_tokens,
            run.world,
            cfg.logprob_chunk_size,
        )
        grad_norm, stats = train_step(
            run,
            wrapped,
            optimizer,
            micro,
            loss_fn,
            max_grad_norm=cfg.max_grad_norm,
            scheduler=scheduler,
            where=f"step {state.step + 1} (epoch {epoch}, batch {b})",
            describe=lambda m: f"examples from {[train_data.sources[i] for r in m[0] for i in rows[r]][:4]}",
        )
        cadence.step_done(
            run,
            state,
            epoch,
            b,
            stats,
            window,
            log=partial(log_train, run, window, state, scheduler, grad_norm, n_batches, result),
            evaluate=partial(evaluate_and_keep_best, run, model, tokenizer, eval_data, cfg, state),
        )

    if state.step > 0:
        result.update(
            {f"eval/{k}": v for k, v in evaluate_and_keep_best(run, model, tokenizer, eval_data, cfg, state).items()}
        )
    finished = run.finish(state, total_steps)
    if finished:
        export(run, model, tokenizer, cfg, run.out / EXPORT)
        if eval_data is None:
            export(
                run, model, tokenizer, cfg, run.out / "best"
            )  # nothing to select by: the final model is the best we know
        if cfg.n_samples and run.evaluates():  # greedy: every process of a sharded run writes the same replies
            write_samples(
                model, tokenizer, (eval_ex or train_ex)[: cfg.n_samples], chat, run.out / "samples.jsonl", run.main
            )
    if run.main:
        plot_curves(
            read_metrics(run.out / "metrics.jsonl"),
            [
                ("loss (response tokens)", ["train/loss", "eval/loss"]),
                ("eval perplexity", ["eval/perplexity"]),
                ("learning rate", ["train/lr"]),
            ],
            run.out / "curves.png",
            title=f"SFT: {cfg.policy}" + (" (LoRA)" if cfg.lora else "") + (", packed" if cfg.packing else ""),
        )
    run.accelerator.wait_for_everyone()
    result.update(step=state.step, finished=finished, best_step=state.best_step)
    if finished:
        result.update(final=str(run.out / EXPORT), best=str(run.out / "best"))
    return result


def write_samples(model, tokenizer, examples, chat: bool, path: Path, write: bool = True) -> None:
    """Greedy replies to a few prompts beside their references, one JSON object per line."""
    was_training = model.training
    model.eval()
    prompts = [Prompt(ex.prompt, tuple(ex.chat()[:-1]) if ex.messages is not None else None) for ex in examples]
    replies = sample_texts(
        model,
        tokenizer,
        prompts,
        1,
        SamplingSettings(max_new_tokens=SAMPLE_MAX_NEW_TOKENS, temperature=0.0),
        chat=chat,
        batch_size=1,
    )
    model.train(was_training)
    rows = [
        {"prompt": ex.prompt, "reference": ex.response, "generated": r[0], "source": ex.source}
        for ex, r in zip(examples, replies)
    ]
    if write:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")

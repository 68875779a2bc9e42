"""``rlhfkit sft``: supervised fine-tuning of a causal LM on instruction data.

The loop, top to bottom: read and tokenise the data (loss only on response tokens, see
:mod:`rlhfkit.sft.data`) -> optionally pack short examples into rows -> load the model (a
pad token distinct from EOS, LoRA) -> plan length-grouped effective batches -> for each
optimizer step, each process runs its micro-batches (forward, per-token NLL) -> clip, step,
log -> evaluate every N steps (loss, perplexity; best model kept) -> atomic checkpoint for
``--resume``. At the end: ``final/`` (and ``best/``) as plain Hugging Face causal-LM
folders, ``curves.png`` and a few greedy samples in ``samples.jsonl``.

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

from contextlib import nullcontext

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rlhfkit.config import ConfigError
from rlhfkit.training.options import CPU_MATMUL_HELP
from rlhfkit.training import NonFiniteLossError

logger = logging.getLogger(__name__)

__all__ = ["SFTConfig", "NonFiniteLossError", "train_sft", "model_token_nll", "evaluate_sft"]

SAMPLE_MAX_NEW_TOKENS = 64
SUPPORTED_PACKING_ATTENTION = ("sdpa", "eager")


@dataclass
class SFTConfig:
    """Supervised fine-tuning of a causal language model on prompt/response or chat data."""

    train: str = field(default="", metadata={"help": 'training data: JSONL of {"prompt", "response"} or {"messages": [...]} rows'})
    output: str = field(default="", metadata={"help": "run folder: final/ and best/ models, checkpoint/, metrics, curves.png, samples.jsonl"})
    model: str = field(default="smollm2-135m", metadata={"help": "causal LM to fine-tune: alias (smollm2-135m), local folder or hub id"})
    eval: str | None = field(default=None, metadata={"help": "held-out data file in the same format (default: --eval-fraction of --train, or none)"})
    eval_fraction: float | None = field(default=None, metadata={"help": "hold out this seeded random share of --train for evaluation"})
    chat_template: bool = field(default=True, metadata={"help": "prompt/response rows: render as a user and an assistant turn with the tokenizer's chat template (--no-chat-template: prompt + response + EOS); 'messages' rows always use it"})
    assistant_turns: Literal["all", "last"] = field(default="all", metadata={"help": "chat rows: train on every assistant turn, or only the last"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the training data (fractions allowed)"})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps in the schedule (overrides --epochs)"})
    stop_after_steps: int | None = field(default=None, metadata={"help": "stop after this global step with a checkpoint, to continue later with --resume"})
    batch_size: int = field(default=8, metadata={"help": "rows (examples, or packed rows) per process per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=2e-5, metadata={"help": "peak learning rate (LoRA usually wants ~1e-4 to 3e-4)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "share of steps spent warming up the learning rate"})
    scheduler: Literal["linear", "cosine", "constant"] = field(default="cosine", metadata={"help": "learning-rate schedule after warm-up"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient-norm clipping (0 = off)"})
    max_length: int = field(default=512, metadata={"help": "tokens per example (and per packed row); longer examples are truncated and counted, never dropped"})
    packing: bool = field(default=False, metadata={"help": "pack short examples into rows of max_length tokens, with no attention across examples"})
    lora: bool = field(default=False, metadata={"help": "train LoRA adapters (merged into the saved model) instead of all weights"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target: list[str] | None = field(default=None, metadata={"help": "module names for LoRA (default: peft's choice for the architecture)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in the backward pass to save memory"})
    eval_every: int = field(default=100, metadata={"help": "evaluate every N optimizer steps (and before the first and after the last)"})
    save_every: int = field(default=100, metadata={"help": "write a resumable checkpoint every N steps (and at the end)"})
    log_every: int = field(default=10, metadata={"help": "log training metrics every N steps"})
    eval_batch_size: int = field(default=16, metadata={"help": "examples per evaluation forward pass"})
    n_samples: int = field(default=4, metadata={"help": f"greedy samples (up to {SAMPLE_MAX_NEW_TOKENS} tokens) for the first N eval prompts, written to samples.jsonl at the end (0 = none)"})
    seed: int = field(default=42, metadata={"help": "random seed (data order, initialisation, dropout)"})
    resume: bool = field(default=False, metadata={"help": "continue from OUTPUT/checkpoint exactly where it stopped"})
    mixed_precision: Literal["auto", "no", "bf16"] = field(default="auto", metadata={"help": "auto: bf16 on CUDA, fp32 on CPU"})
    cpu: bool = field(default=False, metadata={"help": "run on the CPU even if a GPU is present"})
    cpu_matmul: Literal["auto", "onednn", "torch"] = field(default="auto", metadata={"help": CPU_MATMUL_HELP})
    tensorboard: bool = field(default=True, metadata={"help": "also write TensorBoard event files"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self):
        if not self.train:
            raise ConfigError("option 'train' is required: the instruction data file (--train FILE.jsonl)")
        if not self.output:
            raise ConfigError("option 'output' is required: the run folder to write (--output DIR)")
        for name in ("batch_size", "grad_accum", "eval_every", "save_every", "log_every", "eval_batch_size", "lora_r"):
            if getattr(self, name) < 1:
                raise ConfigError(f"option '{name}' must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"option 'lr' must be a positive number, got {self.lr}")
        if self.max_steps is None and not self.epochs > 0:
            raise ConfigError(f"option 'epochs' must be > 0, got {self.epochs}")
        for name in ("max_steps", "stop_after_steps"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"option '{name}' must be >= 1, got {v}")
        if self.eval and self.eval_fraction is not None:
            raise ConfigError("give either --eval FILE or --eval-fraction (a split of --train), not both")
        if self.eval_fraction is not None and not 0 < self.eval_fraction < 1:
            raise ConfigError(f"option 'eval_fraction' must be between 0 and 1, got {self.eval_fraction}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"option 'warmup_ratio' must be in [0, 1), got {self.warmup_ratio}")
        if self.max_length < 8:
            raise ConfigError(f"option 'max_length' must be at least 8, got {self.max_length}")
        if self.weight_decay < 0 or self.max_grad_norm < 0 or not 0 <= self.lora_dropout < 1:
            raise ConfigError("options 'weight_decay' and 'max_grad_norm' must be >= 0 and 'lora_dropout' in [0, 1), got "
                              f"{self.weight_decay}, {self.max_grad_norm}, {self.lora_dropout}")
        if self.n_samples < 0:
            raise ConfigError(f"option 'n_samples' must be >= 0, got {self.n_samples}")
        if not self.lora and (self.lora_r, self.lora_alpha, self.lora_dropout, self.lora_target) != (16, 32, 0.05, None):
            logger.warning("the LoRA options (lora_r, lora_alpha, lora_dropout, lora_target) are ignored without --lora")




# ------------------------------------------------------------------ building blocks
def model_token_nll(model, batch, attn_implementation: str = "sdpa"):
    """Forward ``batch`` (an :class:`~rlhfkit.sft.data.SFTBatch`) -> ``(nll, response_mask)``, both ``(B, T-1)``.

    Packed rows get a 4D block-diagonal causal mask (bool for sdpa, additive for eager) and
    their restarting position ids, so every example sees only itself.
    """
    import torch

    from rlhfkit.sft.data import block_causal_mask
    from rlhfkit.sft.losses import token_nll

    if batch.seq_ids is None:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, T, V)
    else:
        allowed = block_causal_mask(batch.seq_ids)  # (B, 1, T, T)
        if attn_implementation == "eager":  # eager adds the mask to the scores
            mask = torch.zeros(allowed.shape, device=allowed.device).masked_fill(~allowed, torch.finfo(torch.float32).min)
        elif attn_implementation == "sdpa":
            mask = allowed
        else:
            raise ConfigError(f"--packing needs sdpa or eager attention; this model uses {attn_implementation!r}")
        logits = model(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids).logits
    return token_nll(logits, batch.labels)


def evaluate_sft(model, data, pad_id: int, batch_size: int, device, autocast=None) -> dict[str, float]:
    """Token-mean NLL of every response token in ``data`` (unpacked, length-sorted batches) and its perplexity."""
    import torch

    from rlhfkit.ops import masked_sum
    from rlhfkit.sft.data import collate

    was_training = model.training
    model.eval()
    order = sorted(range(len(data)), key=lambda i: -data.length(i))
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = collate(data, [[i] for i in order[start : start + batch_size]], pad_id).to(device)
            with autocast() if autocast is not None else nullcontext():
                nll, mask = model_token_nll(model, batch)
            total += masked_sum(nll.double(), mask).cpu()
            count += int(mask.sum())
    model.train(was_training)
    loss = (total / max(count, 1)).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count, "examples": len(data)}


def _load_data(cfg: SFTConfig):
    from rlhfkit.sft.data import read_sft_data, split_examples

    train = read_sft_data(cfg.train)
    evals = []
    if cfg.eval:
        evals = read_sft_data(cfg.eval)
    elif cfg.eval_fraction is not None:
        try:
            train, evals = split_examples(train, cfg.eval_fraction, cfg.seed)
        except ValueError as e:
            raise ConfigError(f"--eval-fraction: {e}") from None
    return train, evals


def _load_model(cfg: SFTConfig):
    """(tokenizer, model): fp32 weights, a pad token distinct from EOS, LoRA adapters if asked."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhfkit.models.hub import resolve_model
    from rlhfkit.models.tokenizers import ensure_distinct_pad

    path = resolve_model(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ensure_distinct_pad(tokenizer, model)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"the tokenizer of {cfg.model} has no EOS token, so replies cannot be taught to end")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora:
        from peft import LoraConfig, TaskType, get_peft_model

        model = get_peft_model(model, LoraConfig(
            task_type=TaskType.CAUSAL_LM, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target or None,
        ))
    return tokenizer, model


def _export(model, tokenizer, cfg: SFTConfig, target: Path) -> None:
    """A plain HF causal-LM folder (LoRA merged, safetensors, tokenizer with its pad token) at ``target``, atomically."""
    import copy
    import shutil
    import tempfile

    import yaml

    from rlhfkit.config import to_dict
    from rlhfkit.checkpoint import replace_dir

    if hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "training_config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8")
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------- the loop
def train_sft(cfg: SFTConfig) -> dict[str, Any]:
    """Run the whole fine-tuning. Returns the last logged ``train/*`` and ``eval/*`` metrics
    plus ``step``, ``finished`` and, when finished, the ``final`` and ``best`` model folders."""
    import torch
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from rlhfkit.checkpoint import load_checkpoint, save_checkpoint
    from rlhfkit.models.cpu_linear import apply_cpu_matmul
    from rlhfkit.training import guarded_step, make_adamw, start_run
    from rlhfkit.data.collate import plan_batches, split_effective_batch
    from rlhfkit.sft.data import EncodedSFT, collate, pack_examples
    from rlhfkit.sft.losses import sft_loss
    from rlhfkit.tracking import MetricsLogger, plot_curves, read_metrics

    out = Path(cfg.output)
    accelerator, ckpt = start_run(cfg)
    main = accelerator.is_main_process
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device

    # 1. data and model ---------------------------------------------------------------
    train_ex, eval_ex = _load_data(cfg)
    tokenizer, model = _load_model(cfg)
    apply_cpu_matmul(cfg.cpu_matmul, device, model)
    if not tokenizer.chat_template and (cfg.chat_template or any(e.messages for e in train_ex + eval_ex)):
        raise ConfigError(
            f"the tokenizer of {cfg.model} has no chat template, but --chat-template is on or a row has 'messages'; "
            "pass --no-chat-template and give prompt/response rows"
        )
    attn_impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if cfg.packing and attn_impl not in SUPPORTED_PACKING_ATTENTION:
        raise ConfigError(
            f"--packing builds a 4D block-diagonal attention mask, which the {attn_impl!r} attention of {cfg.model} "
            f"does not take; use sdpa or eager attention, or turn --packing off"
        )
    encode = dict(max_length=cfg.max_length, chat_template=cfg.chat_template, assistant_turns=cfg.assistant_turns)
    train_data = EncodedSFT.build(train_ex, tokenizer, what=cfg.train, **encode)
    eval_data = EncodedSFT.build(eval_ex, tokenizer, what=cfg.eval or "eval split", **encode) if eval_ex else None
    empty = [train_data.sources[i] for i in range(len(train_data)) if train_data.n_targets(i) == 0]
    if empty:
        raise ConfigError(f"{len(empty)} training example(s) have no response token left to learn, e.g. {empty[0]}; raise --max-length")
    if cfg.packing:
        rows = pack_examples([train_data.length(i) for i in range(len(train_data))], cfg.max_length)
    else:
        rows = [[i] for i in range(len(train_data))]
    row_lengths = [sum(train_data.length(i) for i in r) for r in rows]
    row_targets = [sum(train_data.n_targets(i) for i in r) for r in rows]
    if main:
        n_tok = sum(row_lengths)
        logger.warning(
            "sft: %d train examples (%d tokens, %d response tokens), %d eval examples; %s; processes: %d (%s)",
            len(train_data), n_tok, sum(row_targets), len(eval_ex),
            f"packed into {len(rows)} rows, {n_tok / (len(rows) * cfg.max_length):.0%} full" if cfg.packing else "no packing",
            world, accelerator.distributed_type,
        )

    effective = cfg.batch_size * cfg.grad_accum * world
    if len(rows) < world:
        raise ConfigError(f"{len(rows)} training rows cannot feed {world} processes")
    steps_per_epoch = math.ceil(len(rows) / effective)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

    # 2. optimizer, schedule, state ------------------------------------------------------
    optimizer = make_adamw([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps), num_training_steps=total_steps)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    unwrapped = accelerator.unwrap_model(wrapped)
    pad_id = tokenizer.pad_token_id

    state: dict[str, Any] = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_eval_loss": None, "best_step": None}
    if ckpt is not None:
        state = load_checkpoint(accelerator, ckpt)
        if main:
            logger.warning("resuming from %s at step %d (epoch %d, batch %d)", ckpt, state["step"], state["epoch"], state["batch_in_epoch"])
    log = MetricsLogger(out, enabled=main, resume_step=state["step"] if ckpt else None, tensorboard=cfg.tensorboard)
    result: dict[str, Any] = {}

    def run_eval(step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if main and eval_data is not None:
            t0 = time.time()
            metrics = evaluate_sft(unwrapped, eval_data, pad_id, cfg.eval_batch_size, device, accelerator.autocast)
            metrics["seconds"] = round(time.time() - t0, 2)
            log.log(step, {f"eval/{k}": v for k, v in metrics.items()})
            result.update({f"eval/{k}": v for k, v in metrics.items()})
            if step > 0 and (state["best_eval_loss"] is None or metrics["loss"] < state["best_eval_loss"]):
                state["best_eval_loss"], state["best_step"] = metrics["loss"], step
                _export(unwrapped, tokenizer, cfg, out / "best")
        accelerator.wait_for_everyone()
        return metrics

    if ckpt is None and eval_data is not None:
        m = run_eval(0)  # the starting point of the eval curve
        if m:
            logger.warning("step 0: eval loss %.4f, perplexity %.2f", m["loss"], m["perplexity"])

    # 3. the loop ------------------------------------------------------------------------
    progress = tqdm(total=total_steps, initial=state["step"], disable=not (main and cfg.progress), desc="sft", dynamic_ncols=True)
    wrapped.train()
    window = {"nll": torch.zeros((), dtype=torch.float64), "tokens": 0, "seen": 0}
    t_window = time.time()
    last_eval_step = -1
    stop_at = min(total_steps, cfg.stop_after_steps or total_steps)

    while state["step"] < stop_at:
        plan = plan_batches(row_lengths, effective, cfg.seed, state["epoch"])
        for b_idx in range(state["batch_in_epoch"], len(plan)):
            if state["step"] >= stop_at:
                break
            eff = plan[b_idx]
            n_step_tokens = sum(row_targets[r] for r in eff)  # the whole step's response tokens, known up front
            micro = split_effective_batch(eff, world, cfg.grad_accum, rank)
            for a, row_ids in enumerate(micro):
                live = bool(row_ids)
                if not live:  # fewer rows than slots: take part in the all-reduce with zero weight
                    row_ids = [eff[0]]
                batch = collate(train_data, [rows[r] for r in row_ids], pad_id, packed=cfg.packing).to(device)
                sync = a == len(micro) - 1
                with (accelerator.no_sync(wrapped) if not sync else nullcontext()):
                    with accelerator.autocast():
                        nll, mask = model_token_nll(wrapped, batch, attn_impl)  # (B, T-1) each
                        # DDP averages over processes, so * world makes the sum the step's token mean.
                        loss = sft_loss(nll, mask, n_step_tokens) * (world if live else 0.0)
                    # One host sync per micro-batch, on purpose: a NaN must stop us before
                    # optimizer.step() writes it into the weights.
                    if not torch.isfinite(loss).item():
                        sources = [train_data.sources[i] for r in row_ids for i in rows[r]]
                        raise NonFiniteLossError(
                            f"non-finite loss ({loss.item()}) at step {state['step'] + 1} (epoch {state['epoch']}, batch {b_idx}, "
                            f"micro-batch {a}), examples from {sources[:4]}. Nothing was saved from this step; the last good "
                            f"checkpoint in {out / 'checkpoint'} is intact. Lower --lr, keep --max-grad-norm on, or check these rows."
                        )
                    accelerator.backward(loss)
                if live:
                    window["nll"] += nll.detach().double().sum().cpu()
                    window["tokens"] += sum(row_targets[r] for r in row_ids)  # known up front: no device sync
                    window["seen"] += sum(row_lengths[r] for r in row_ids)
            grad_norm = guarded_step(
                accelerator, wrapped, optimizer, scheduler, cfg.max_grad_norm,
                where=f"step {state['step'] + 1} (epoch {state['epoch']}, batch {b_idx}); the last good checkpoint in {out / 'checkpoint'} is intact",
            )
            state["step"] += 1
            state["batch_in_epoch"] = b_idx + 1
            progress.update(1)

            if state["step"] % cfg.log_every == 0 or state["step"] == stop_at:
                stats = torch.tensor([window["nll"].item(), window["tokens"], window["seen"]], dtype=torch.float64)
                stats = accelerator.reduce(stats.to(device), reduction="sum").cpu()
                dt = time.time() - t_window
                row = {
                    "train/loss": (stats[0] / stats[1].clamp(min=1)).item(),
                    "train/tokens_per_s": stats[2].item() / max(dt, 1e-9),  # all real tokens, prompts included
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/epoch": state["epoch"] + state["batch_in_epoch"] / len(plan),
                }
                if grad_norm is not None:
                    row["train/grad_norm"] = float(grad_norm)
                log.log(state["step"], row)
                result.update(row)
                progress.set_postfix(loss=f"{row['train/loss']:.4f}", tok_s=f"{row['train/tokens_per_s']:.0f}")
                window = {"nll": torch.zeros((), dtype=torch.float64), "tokens": 0, "seen": 0}
                t_window = time.time()
            if state["step"] % cfg.eval_every == 0 and state["step"] != stop_at:
                m = run_eval(state["step"])
                last_eval_step = state["step"]
                if m:
                    progress.write(f"step {state['step']}: eval loss {m['loss']:.4f}, perplexity {m['perplexity']:.2f}")
                t_window = time.time()
            if state["step"] % cfg.save_every == 0 and state["step"] != stop_at:
                save_checkpoint(accelerator, out, state)
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    progress.close()

    # 4. the end -----------------------------------------------------------------------
    finished = state["step"] >= total_steps
    if last_eval_step != state["step"] and state["step"] > 0:
        m = run_eval(state["step"])
        if m:
            logger.warning("step %d: eval loss %.4f, perplexity %.2f", state["step"], m["loss"], m["perplexity"])
    save_checkpoint(accelerator, out, state)
    if finished:
        result.update(final=str(out / "final"), best=str(out / "best"))
    if finished and main:
        _export(unwrapped, tokenizer, cfg, out / "final")
        if eval_data is None:
            _export(unwrapped, tokenizer, cfg, out / "best")  # nothing to select by: the final model is the best we know
        if cfg.n_samples:
            _write_samples(unwrapped, tokenizer, (eval_ex or train_ex)[: cfg.n_samples], cfg, out / "samples.jsonl", device)
    if main:
        log.close()
        plot_curves(
            read_metrics(out / "metrics.jsonl"),
            [("loss (response tokens)", ["train/loss", "eval/loss"]), ("eval perplexity", ["eval/perplexity"]), ("learning rate", ["train/lr"])],
            out / "curves.png",
            title=f"SFT: {cfg.model}" + (" (LoRA)" if cfg.lora else "") + (", packed" if cfg.packing else ""),
        )
        if not finished:
            logger.warning("stopped at step %d of %d; continue with --resume", state["step"], total_steps)
    accelerator.wait_for_everyone()
    result.update(step=state["step"], finished=finished, best_step=state["best_step"])
    return result


def _write_samples(model, tokenizer, examples, cfg: SFTConfig, path: Path, device) -> None:
    """Greedy replies to a few prompts beside their references, one JSON object per line."""
    import json

    import torch

    from rlhfkit.sft.data import prompt_text

    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    rows = []
    try:
        for ex in examples:
            chat = ex.messages is not None or cfg.chat_template
            enc = tokenizer(prompt_text(tokenizer, ex, cfg.chat_template), return_tensors="pt", add_special_tokens=not chat).to(device)
            with torch.no_grad():
                new = model.generate(**enc, max_new_tokens=SAMPLE_MAX_NEW_TOKENS, do_sample=False,
                                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)[0, enc["input_ids"].shape[1]:]
            rows.append({"prompt": ex.prompt, "reference": ex.response, "generated": tokenizer.decode(new, skip_special_tokens=True),
                         "source": ex.source})
    finally:
        model.train(was_training)
        tokenizer.padding_side = side
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")



os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

"""``rlhfkit rm train``: train a reward model on preference lists.

The loop, top to bottom (:func:`train_reward_model`): read and check the data -> build the
model (LoRA, frozen layers) -> encode each unique text once -> the head's start (random, or
``--head-init probe``: :mod:`rlhfkit.rm.probe`) -> plan length-grouped
effective batches -> one :func:`~rlhfkit.training.step.train_step` per batch (this
process's micro-batches: score the unique texts, per-list loss) -> log, evaluate (best
model kept), checkpoint on the shared :class:`~rlhfkit.training.cadence.Cadence` -> final
evaluation, ``final/`` and ``best/`` exports, plots.

The weighting of lists is exact across processes and accumulation: each micro-batch loss
is ``sum(w_i * per-list loss_i) * world_size / sum(w over the step's lists)``
(:func:`rlhfkit.losses.weighted_list_sum`, ``w`` the lists' ``PreferenceExample.weight``, 1
unless the data says otherwise); DDP averages over processes and accumulation sums, so the
gradient is the weighted mean over all lists of the step whatever the split (tests check 2
processes x b equals 1 x 2b, 8 x 1 equals 1 x 8, and the same with weights). With every
weight 1 it is the plain mean over lists, bit for bit.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from rlhfkit import losses as L
from rlhfkit.config import ConfigError, opt, require, to_dict
from rlhfkit.data.collate import EncodedPreferences, collate, iter_batches, process_micro_batches
from rlhfkit.data.options import PreferenceDataOptions, read_train_eval
from rlhfkit.data.readers import describe
from rlhfkit.defaults import BATCH_SIZE, EVAL_BATCH_SIZE, EXPORT, MAX_LENGTH
from rlhfkit.models.cpu_linear import apply_cpu_matmul
from rlhfkit.models.hub import resolve_model
from rlhfkit.models.lora import with_lora
from rlhfkit.models.reward import META_FILE, RewardModel
from rlhfkit.models.tokenizers import use_chat_template
from rlhfkit.rm.evaluate import evaluate, plot_score_histograms
from rlhfkit.rm.objective import LossName, check_loss_fits_data, list_losses
from rlhfkit.rm.probe import init_head_from_probe
from rlhfkit.tracking import plot_curves, read_metrics
from rlhfkit.training.cadence import Cadence, MetricsWindow
from rlhfkit.training.optim import disable_dropout, make_optimizer
from rlhfkit.training.options import LoraOptions, OptimOptions, RunOptions
from rlhfkit.training.run import Run, TrainState, improved, start_run
from rlhfkit.training.step import train_step

logger = logging.getLogger(__name__)

__all__ = ["RMTrainConfig", "train_reward_model"]


@dataclass(kw_only=True)
class RMTrainConfig(RunOptions, OptimOptions, LoraOptions, PreferenceDataOptions):
    """Train a reward model from rank lists, pairs, choices or scalar labels."""

    model: str = opt("minilm-l6", "backbone: alias (minilm-l6, smollm2-135m), local folder or hub id")
    init_from: str | None = opt(
        None,
        "warm start: continue training the reward model in this folder (written by rlhfkit rm train: the run "
        "folder, or its final/ or best/), its backbone, its trained head and how it reads texts (pooling, text "
        "format) kept; --model is not read and --head-init does not apply (default: a new head on --model)",
    )
    loss: LossName = opt("pairwise", "training objective (docs/reward-models.md lists them)")
    epochs: float = opt(1.0, "passes over the training lists (fractions allowed)", gt=0)
    max_steps: int | None = opt(None, "optimizer steps in the schedule (overrides --epochs)", ge=1)
    batch_size: int = opt(
        BATCH_SIZE["rm"],
        "lists per process per micro-batch (2 lists of K=4 = 12 pairs per step: in one epoch, "
        "more and smaller steps reach a higher held-out accuracy than 8 lists per step)",
        ge=1,
    )
    lr: float = opt(5e-5, "peak learning rate of the backbone", gt=0)
    head_lr: float | None = opt(
        1e-3,
        "learning rate of the scalar head (and an encoder's pooler): a random head barely moves at "
        "the backbone's rate (none: --lr, the rate to use after --head-init probe)",
        gt=0,
    )
    head_init: Literal["random", "probe"] = opt(
        "random",
        "random: the architecture's random head; probe: start the head from a "
        "linear probe fit to the training pairs on the frozen backbone (one forward "
        "pass over the texts), then fine-tune everything (LP-FT; with --head-lr none)",
    )
    probe_l2: float = opt(
        4.0, "--head-init probe: L2 strength, relative to the features' mean squared pairwise difference", gt=0
    )
    probe_max_texts: int = opt(
        20_000, "--head-init probe: encode at most this many unique training texts (whole lists, drawn at random)", ge=2
    )
    max_length: int = opt(
        MAX_LENGTH["rm"], "tokens per (prompt, response); longer texts are truncated and counted, never dropped", ge=8
    )
    pooling: Literal["auto", "cls", "mean", "last"] = opt(
        "auto", "encoders: auto (the architecture's head), cls or mean; decoders read the last token"
    )
    chat_template: bool | None = opt(
        None,
        "decoders: read (prompt, response) through the chat template, as a user and an "
        "assistant turn (default: when the tokenizer has one), else prompt+response+EOS",
    )
    freeze_layers: int = opt(0, "freeze the embeddings and this many lowest transformer layers", ge=0)
    disable_dropout: bool = opt(
        True, "set every dropout probability to 0 (as TRL does): same scores in training and use"
    )
    eval_every: int = opt(100, "evaluate every N optimizer steps (and at the end)", ge=1)
    eval_batch_size: int = opt(EVAL_BATCH_SIZE["rm"], "texts per evaluation forward pass", ge=1)


# ------------------------------------------------------------------ building blocks
def load_data(cfg: RMTrainConfig):
    """(train examples, eval examples): read, split, and checked against the loss."""
    train, evals = read_train_eval(cfg, cfg.seed)
    check_loss_fits_data(cfg.loss, train, cfg.train)
    if evals:
        check_loss_fits_data(cfg.loss, evals, cfg.eval or cfg.train)
    return train, evals


def warm_start(cfg: RMTrainConfig) -> str | None:
    """The trained reward model (its folder) this run continues: ``--init-from``, or a ``--model`` that
    is one (a folder with :data:`~rlhfkit.models.reward.META_FILE`); None for a new head on ``--model``."""
    if cfg.init_from is None:
        path = resolve_model(cfg.model, "--model")
        return path if (Path(path) / META_FILE).is_file() else None
    path = resolve_model(cfg.init_from, "--init-from")
    if not (Path(path) / META_FILE).is_file():
        raise ConfigError(
            f"--init-from {cfg.init_from} is not a reward model: {path} has no {META_FILE}, the file rlhfkit rm train "
            "writes beside the weights and the trained head. Give the folder of an earlier rm train run (or its "
            "final/ or best/); to put a new head on this model's backbone, pass it as --model instead"
        )
    return path


def build_model(cfg: RMTrainConfig, device) -> RewardModel:
    """The reward model to train: backbone (and head, for a warm start), no dropout, matmul kernel,
    frozen layers, LoRA."""
    warm = warm_start(cfg)
    if cfg.init_from is not None and cfg.model not in (
        RMTrainConfig.__dataclass_fields__["model"].default,
        cfg.init_from,
    ):
        logger.warning("--model %s is not read: --init-from %s brings its own backbone", cfg.model, cfg.init_from)
    source = warm or cfg.model
    rm = RewardModel.from_pretrained(
        source,
        pooling=None if cfg.pooling == "auto" else cfg.pooling,
        max_length=cfg.max_length,
        option="--init-from" if cfg.init_from is not None else "--model",
    )
    if rm.meta.kind == "decoder" and (warm is None or cfg.chat_template is not None):
        # the one chat-template rule (encoders read the pair as two segments); a warm start keeps its own
        text_format = "chat" if use_chat_template(rm.tokenizer, cfg.chat_template, source) else "plain"
        if warm is not None and text_format != rm.meta.text_format:
            logger.warning(
                "%s was trained reading %s text; %s makes it read %s text from now on",
                warm,
                rm.meta.text_format,
                "--chat-template" if cfg.chat_template else "--no-chat-template",
                text_format,
            )
        rm.meta.text_format = text_format
    if cfg.loss == "token-pairwise" and rm.meta.kind != "decoder":
        raise ConfigError(f"--loss token-pairwise needs a decoder backbone; {cfg.model} is an encoder")
    if rm.meta.kind == "encoder" and rm.meta.pooling != "auto":
        logger.warning(
            "pooling=%s: AutoModelForSequenceClassification will not reproduce these scores (use auto for interop)",
            rm.meta.pooling,
        )
    if cfg.disable_dropout:
        disable_dropout(rm)
    apply_cpu_matmul(cfg.cpu_matmul, device, rm)
    if cfg.freeze_layers:
        freeze_lower_layers(rm.hf_model, cfg.freeze_layers)
    if cfg.lora:
        rm.model = with_lora(
            rm.model, cfg, "SEQ_CLS", modules_to_save=["score" if rm.meta.kind == "decoder" else "classifier"]
        )
        for name, p in rm.model.named_parameters():  # BERT's pooler is part of the head: train it too
            if ".pooler." in name:
                p.requires_grad_(True)
    return rm


def freeze_lower_layers(hf, n: int) -> None:
    """Freeze the embeddings and the ``n`` lowest transformer layers of a HF model."""
    base = getattr(hf, hf.base_model_prefix)
    layers = _find_layers(base)
    require(n <= len(layers), f"--freeze-layers {n} but the model has {len(layers)} layers")
    frozen = [
        base.get_input_embeddings(),
        getattr(base, "embeddings", None),
        *layers[:n],
    ]  # BERT: position/type embeddings too
    for module in filter(None, frozen):
        module.requires_grad_(False)


def _find_layers(base):
    for path in ("layers", "encoder.layer", "h", "layer", "block"):
        obj = base
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return list(obj)
    raise ConfigError("--freeze-layers: could not find the transformer layers of this architecture")


def start_head(run: Run, rm: RewardModel, data: EncodedPreferences, cfg: RMTrainConfig) -> str:
    """``--head-init probe``: the head from a linear probe on the frozen backbone (every process
    fits the same one). Not when resuming (the checkpoint has the head), nor for a warm start (the
    trained head is kept), nor for the scalar-label losses, whose objective is not the pairs'.
    Returns the line for the run's log."""
    if run.resume_from is not None:
        return "head: from the checkpoint"
    warm = warm_start(cfg)
    if warm is not None:
        if cfg.head_init == "probe":
            logger.warning(
                "--head-init probe is ignored: %s is a trained reward model, and its head is kept (a warm start); "
                "to fit a new probe head, pass its backbone as --model",
                warm,
            )
        return f"head: the trained head of {warm} (warm start)"
    if cfg.head_init == "random":
        return "head: the architecture's random start (--head-init random)"
    if cfg.loss in ("binary", "mse"):
        return f"head: random start (--head-init probe fits pairs; --loss {cfg.loss} trains on scalar labels)"
    t0 = time.perf_counter()
    rm.to(run.device)  # before accelerate's prepare, which would move it there anyway
    fit = init_head_from_probe(
        rm,
        data,
        rm.pad,
        l2=cfg.probe_l2,
        max_texts=cfg.probe_max_texts,
        batch_size=cfg.eval_batch_size,
        device=run.device,
        seed=cfg.seed,
    )
    if fit is None:
        return "head: random start (nothing for the probe to fit; see the warning above)"
    return (
        f"head: linear probe on the frozen backbone, {fit.pairs} pairs of {fit.texts} texts, train pairwise accuracy "
        f"{fit.train_accuracy:.4f}, |w| {fit.weight_norm:.3f}, {fit.newton_steps} Newton steps, {time.perf_counter() - t0:.1f} s"
    )


def param_groups(rm: RewardModel, cfg: RMTrainConfig) -> list[dict]:
    """The body at ``--lr`` and the new head (and BERT's pooler) at ``--head-lr``."""
    head_names = ("score.", "classifier.", ".pooler.")
    head, body = [], []
    for n, p in rm.named_parameters():
        if p.requires_grad:
            (head if any(h in n for h in head_names) else body).append(p)
    return ([{"params": body, "lr": cfg.lr}] if body else []) + [{"params": head, "lr": cfg.head_lr or cfg.lr}]


def micro_loss(model, data: EncodedPreferences, pad, loss: str, device, scale: float, micro: tuple[list[int], bool]):
    """One micro-batch: score its unique texts once, per-list losses. Returns (weighted loss, stats).

    ``scale`` is ``world_size / (total weight of the step's lists)``: the returned loss is this
    micro-batch's share of the step's weighted mean (:func:`rlhfkit.losses.weighted_list_sum`)."""
    list_ids, live = micro
    batch = collate(data, list_ids, pad).to(device)
    if loss == "token-pairwise":
        scores, token_scores = model(**batch.inputs, return_token_scores=True)
        token_scores = token_scores.float()
    else:
        scores, token_scores = model(**batch.inputs), None
    per_list = list_losses(loss, batch, scores.float(), token_scores)  # (B,)
    weights = torch.tensor([data.examples[j].weight for j in list_ids], device=per_list.device)  # (B,)
    scale = scale if live else 0.0  # a filler micro-batch still joins the all-reduce
    stats = {
        "loss": (per_list.detach() * weights).sum() * live,  # weighted: train/loss is the weighted mean
        "weight": weights.sum() * live,
        "lists": len(list_ids) * live,
        "tokens": batch.inputs["attention_mask"].sum() * live,
    }  # the real tokens of the unique texts scored
    if batch.labels is None:
        correct, pairs = L.pairwise_accuracy(batch.gather_lists(scores.detach().float()), batch.ranks, batch.list_mask)
        stats.update(correct=correct * live, pairs=pairs * live)
    return L.weighted_list_sum(per_list, weights, scale), stats


def step_weight(data: EncodedPreferences, step_ids: list[int]) -> float:
    """The total weight of an optimizer step's lists (their count when every weight is 1)."""
    return sum(data.examples[j].weight for j in step_ids)


def evaluate_and_keep_best(
    run: Run, model, rm: RewardModel, eval_data, cfg: RMTrainConfig, state: TrainState
) -> dict[str, Any]:
    """Evaluate (on every process when sharded), log, export ``best/`` when it improved, plot the score histograms."""
    metrics: dict[str, Any] = {}
    if run.evaluates() and eval_data is not None:
        # the unwrapped model: no DDP collectives on a main-process-only pass (under FSDP2 it is the sharded module itself)
        metrics, scores = evaluate(
            rm, eval_data, rm.pad, batch_size=cfg.eval_batch_size, device=run.device, loss=cfg.loss
        )
        key = "pairwise_accuracy" if "pairwise_accuracy" in metrics else "mse"
        if improved(state, metrics[key], higher_is_better=key == "pairwise_accuracy"):
            export(run, model, rm, cfg, run.out / "best")
        if run.main:
            run.log.log(state.step, {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
            plot_score_histograms(eval_data, scores, run.out / "eval_scores.png")
            run.write(_eval_line(state.step, metrics))
    run.accelerator.wait_for_everyone()
    return metrics


def export(run: Run, model, rm: RewardModel, cfg: RMTrainConfig, target: Path) -> None:
    """``target`` as a plain HF reward model (collective when sharded: the weights are gathered first)."""
    state_dict = run.full_state_dict(model)
    if run.main:
        rm.save_pretrained(
            target,
            extra_files={"training_config.yaml": yaml.safe_dump(to_dict(cfg), allow_unicode=True)},
            state_dict=state_dict,
        )


def log_train(run: Run, window: MetricsWindow, state: TrainState, scheduler, grad_norm, n_batches: int) -> None:
    sums, seconds = window.flush(run.accelerator)
    row = {
        "train/loss": sums["loss"] / (sums["weight"] or 1.0),
        "train/lists_per_s": sums["lists"] / seconds,
        "train/tokens_per_s": sums["tokens"] / seconds,
        "train/lr": scheduler.get_last_lr()[0],
        "train/epoch": state.epoch + state.batch_in_epoch / n_batches,
    }
    if sums.get("pairs"):
        row["train/accuracy"] = sums["correct"] / sums["pairs"]
    if grad_norm is not None:
        row["train/grad_norm"] = float(grad_norm)
    run.log.log(state.step, row)
    run.progress.set_postfix(
        loss=f"{row['train/loss']:.4f}",
        acc=f"{row.get('train/accuracy', float('nan')):.3f}",
        lists_s=f"{row['train/lists_per_s']:.1f}",
    )


# ---------------------------------------------------------------------- the loop
def train_reward_model(cfg: RMTrainConfig) -> dict[str, Any]:
    """Run the whole training; returns the final evaluation metrics (empty without eval data)."""
    run = start_run(cfg, "rm train")
    train_ex, eval_ex = load_data(cfg)
    rm = build_model(cfg, run.device)
    train_data = EncodedPreferences.build(train_ex, rm.encode, cfg.max_length, what=cfg.train)
    eval_data = (
        EncodedPreferences.build(eval_ex, rm.encode, cfg.max_length, what=cfg.eval or "eval split") if eval_ex else None
    )
    require(len(train_data) >= run.world, f"{len(train_data)} training lists cannot feed {run.world} processes")
    effective = cfg.batch_size * cfg.grad_accum * run.world
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * math.ceil(len(train_data) / effective)))

    head_line = start_head(run, rm, train_data, cfg)
    optimizer, scheduler = make_optimizer(cfg, param_groups(rm, cfg), total_steps)
    model, optimizer = run.accelerator.prepare(rm, optimizer)
    run.accelerator.register_for_checkpointing(scheduler)
    rm = run.accelerator.unwrap_model(model)
    state = run.begin(TrainState(), total_steps)
    info = describe(train_ex)
    run.write(
        f"train: {info['n_lists']} lists, {info['n_pairs']} pairs, {len(train_data.texts)} unique texts "
        f"({train_data.n_truncated} truncated at --max-length {cfg.max_length}); eval: {len(eval_ex)} lists"
    )
    if any(ex.weight != 1.0 for ex in train_ex):
        w = [ex.weight for ex in train_ex]
        run.write(
            f"list weights: {min(w):.3g}..{max(w):.3g}, mean {sum(w) / len(w):.3g} (the loss is their weighted mean)"
        )
    run.write(head_line)

    cadence = Cadence(total_steps, cfg.log_every, cfg.save_every, cfg.eval_every, cfg.stop_after_steps)
    window = MetricsWindow()
    lengths = [train_data.list_length(j) for j in range(len(train_data))]
    model.train()
    for epoch, b, n_batches, step_ids in iter_batches(
        lengths, effective, cfg.seed, cadence.stop_at - state.step, state.epoch, state.batch_in_epoch
    ):
        micro = process_micro_batches(step_ids, run.world, cfg.grad_accum, run.rank)
        grad_norm, stats = train_step(
            run,
            model,
            optimizer,
            micro,
            partial(
                micro_loss,
                model,
                train_data,
                rm.pad,
                cfg.loss,
                run.device,
                run.world / step_weight(train_data, step_ids),
            ),
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
            log=partial(log_train, run, window, state, scheduler, grad_norm, n_batches),
            evaluate=partial(evaluate_and_keep_best, run, model, rm, eval_data, cfg, state),
        )

    final = evaluate_and_keep_best(run, model, rm, eval_data, cfg, state)
    if run.finish(state, total_steps):
        export(run, model, rm, cfg, run.out / EXPORT)
        if eval_data is None:
            export(run, model, rm, cfg, run.out / "best")  # nothing to select by: the final model is the best we know
    if run.main:
        plot_curves(
            read_metrics(run.out / "metrics.jsonl"),
            [
                ("loss", ["train/loss", "eval/loss"]),
                ("pairwise accuracy", ["train/accuracy", "eval/pairwise_accuracy", "eval/list_exact_accuracy"]),
            ],
            run.out / "curves.png",
            title=f"reward model: {cfg.model}, loss {cfg.loss}",
        )
        if final:
            (run.out / "eval_report.json").write_text(json.dumps(final, indent=2, ensure_ascii=False))
    run.accelerator.wait_for_everyone()
    return final


def _eval_line(step: int, m: dict[str, Any]) -> str:
    if "pairwise_accuracy" in m:
        return (
            f"step {step}: eval pairwise_accuracy {m['pairwise_accuracy']:.4f}  list_exact {m['list_exact_accuracy']:.4f}  "
            f"kendall_tau {m['kendall_tau']:.4f}  1st-vs-2nd {m['accuracy_first_vs_second']:.3f}  1st-vs-last {m['accuracy_first_vs_last']:.3f}  "
            f"length_corr {m['length_corr']:+.2f}"
        )
    return f"step {step}: eval mse {m['mse']:.4f}"

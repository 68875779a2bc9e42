"""``rlhfkit rm train``: train a reward model on preference lists.

The loop, top to bottom: load and validate data -> build the model (LoRA, frozen layers) ->
plan length-grouped effective batches -> for each optimizer step, each process runs its
micro-batches (encode each unique text once, score, per-list loss) -> clip, step, log ->
evaluate every N steps (diagnostics, best model kept) -> atomic checkpoint for
``--resume``.

Equal weighting of lists is exact across processes and accumulation: each micro-batch
loss is ``sum(per-list losses) * world_size / lists_in_step``; DDP averages over processes
and accumulation sums, so the gradient is the mean over all lists of the step whatever
the split (tests check 2 processes x b equals 1 x 2b, and 8 x 1 equals 1 x 8).
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


@dataclass
class RMTrainConfig:
    """Train a reward model from rank lists, pairs, choices or scalar labels."""

    train: str = field(default="", metadata={"help": "training data: .tsv rank lists, .jsonl, .json or .parquet"})
    output: str = field(default="", metadata={"help": "run folder: best/ and last/ models, checkpoint/, metrics, plots"})
    model: str = field(default="minilm-l6", metadata={"help": "backbone: alias (minilm-l6, smollm2-135m), local folder or hub id"})
    eval: str | None = field(default=None, metadata={"help": "held-out data file (default: the split below)"})
    n_train: int | None = field(default=None, metadata={"help": "train on the first N lists of --train and evaluate on the rest"})
    eval_fraction: float | None = field(default=None, metadata={"help": "hold out this seeded random share of --train for evaluation"})
    format: str = field(default="auto", metadata={"help": "data format: auto, ranklist-tsv, pairs, hh, ranked, choice, scored"})
    prompt_column: bool = field(default=False, metadata={"help": "rank-list TSV: the first column is the prompt"})
    allow_ties: bool = field(default=False, metadata={"help": "accept equal ranks in JSONL 'ranks' fields"})
    loss: str = field(default="pairwise", metadata={"help": "pairwise, logexp, margin, listwise, plackett-luce, token-pairwise, binary, mse"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the training lists (fractions allowed)"})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps in the schedule (overrides --epochs)"})
    stop_after_steps: int | None = field(default=None, metadata={"help": "stop after this global step with a checkpoint, to continue later with --resume"})
    batch_size: int = field(default=8, metadata={"help": "lists per process per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=2e-5, metadata={"help": "peak learning rate"})
    head_lr: float | None = field(default=None, metadata={"help": "learning rate of the new scalar head (default: --lr)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "share of steps spent warming up the learning rate"})
    scheduler: Literal["linear", "cosine", "constant"] = field(default="linear", metadata={"help": "learning-rate schedule after warm-up"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient-norm clipping (0 = off)"})
    max_length: int = field(default=256, metadata={"help": "tokens per (prompt, response); longer texts are truncated and counted, never dropped"})
    pooling: str = field(default="auto", metadata={"help": "encoders: auto (the architecture's head), cls or mean; decoders read the last token"})
    text_format: Literal["plain", "chat"] = field(default="plain", metadata={"help": "decoders: prompt+response+EOS, or the chat template"})
    lora: bool = field(default=False, metadata={"help": "train LoRA adapters (merged into the saved model) instead of all weights"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target: list[str] | None = field(default=None, metadata={"help": "module names for LoRA (default: peft's choice for the architecture)"})
    freeze_layers: int = field(default=0, metadata={"help": "freeze the embeddings and this many lowest transformer layers"})
    disable_dropout: bool = field(default=True, metadata={"help": "set every dropout probability to 0 (as TRL does): same scores in training and use"})
    eval_every: int = field(default=100, metadata={"help": "evaluate every N optimizer steps (and at the end)"})
    save_every: int = field(default=100, metadata={"help": "write a resumable checkpoint every N steps"})
    log_every: int = field(default=10, metadata={"help": "log training metrics every N steps"})
    eval_batch_size: int = field(default=64, metadata={"help": "texts per evaluation forward pass"})
    seed: int = field(default=42, metadata={"help": "random seed (data order, initialisation, dropout)"})
    resume: bool = field(default=False, metadata={"help": "continue from OUTPUT/checkpoint exactly where it stopped"})
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = field(default="auto", metadata={"help": "auto: bf16 on CUDA, fp32 on CPU"})
    cpu: bool = field(default=False, metadata={"help": "run on the CPU even if a GPU is present"})
    cpu_matmul: Literal["auto", "onednn", "torch"] = field(default="auto", metadata={"help": CPU_MATMUL_HELP})
    tensorboard: bool = field(default=True, metadata={"help": "also write TensorBoard event files"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self):
        from rlhfkit.rm.objective import canonical_loss_name

        if not self.train:
            raise ConfigError("option 'train' is required: the training data file (--train FILE)")
        if not self.output:
            raise ConfigError("option 'output' is required: the run folder to write (--output DIR)")
        try:
            self.loss = canonical_loss_name(self.loss)
        except ValueError as e:
            raise ConfigError(f"option 'loss': {e}") from None
        for name in ("batch_size", "grad_accum", "eval_every", "save_every", "log_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"option '{name}' must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ConfigError(f"option 'lr' must be a positive number, got {self.lr}")
        if self.epochs <= 0 and self.max_steps is None:
            raise ConfigError(f"option 'epochs' must be > 0, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"option 'max_steps' must be >= 1, got {self.max_steps}")
        if self.n_train is not None and self.eval_fraction is not None:
            raise ConfigError("options 'n_train' and 'eval_fraction' both split --train; give one")
        if self.eval_fraction is not None and not 0 < self.eval_fraction < 1:
            raise ConfigError(f"option 'eval_fraction' must be between 0 and 1, got {self.eval_fraction}")
        if self.eval and (self.n_train is not None or self.eval_fraction is not None):
            raise ConfigError("give either --eval FILE or a split of --train (--n-train / --eval-fraction), not both")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"option 'warmup_ratio' must be in [0, 1), got {self.warmup_ratio}")
        if self.pooling not in ("auto", "cls", "mean", "last"):
            raise ConfigError(f"option 'pooling' got {self.pooling!r}; choose auto, cls or mean")
        if self.max_length < 8:
            raise ConfigError(f"option 'max_length' must be at least 8, got {self.max_length}")




def _load_data(cfg: RMTrainConfig):
    from rlhfkit.data.readers import read_preferences, split_train_eval
    from rlhfkit.rm.objective import check_loss_fits_data

    kw = dict(format=cfg.format, prompt_column=cfg.prompt_column, allow_ties=cfg.allow_ties)
    train = read_preferences(cfg.train, **kw)
    evals = []
    if cfg.eval:
        evals = read_preferences(cfg.eval, **kw)
    elif cfg.n_train is not None:
        if cfg.n_train >= len(train):
            raise ConfigError(f"--n-train {cfg.n_train} leaves no evaluation lists: {cfg.train} has {len(train)}")
        train, evals = split_train_eval(train, n_train=cfg.n_train)
    elif cfg.eval_fraction is not None:
        train, evals = split_train_eval(train, eval_fraction=cfg.eval_fraction, seed=cfg.seed)
    check_loss_fits_data(cfg.loss, train, cfg.train)
    if evals:
        check_loss_fits_data(cfg.loss, evals, cfg.eval or cfg.train)
    return train, evals


def _apply_lora_and_freezing(rm, cfg: RMTrainConfig) -> None:
    """Freeze the lower layers and/or wrap the classifier in LoRA adapters (in place)."""
    hf = rm.model
    if cfg.freeze_layers:
        base = getattr(hf, hf.base_model_prefix)
        layers = _find_layers(base)
        if cfg.freeze_layers > len(layers):
            raise ConfigError(f"--freeze-layers {cfg.freeze_layers} but the model has {len(layers)} layers")
        for p in base.get_input_embeddings().parameters():
            p.requires_grad_(False)
        emb = getattr(base, "embeddings", None)  # BERT: position and type embeddings too
        if emb is not None:
            for p in emb.parameters():
                p.requires_grad_(False)
        for layer in layers[: cfg.freeze_layers]:
            for p in layer.parameters():
                p.requires_grad_(False)
    if cfg.lora:
        from peft import LoraConfig, TaskType, get_peft_model

        head = "score" if rm.meta.kind == "decoder" else "classifier"
        lcfg = LoraConfig(
            task_type=TaskType.SEQ_CLS, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target or None, modules_to_save=[head],
        )
        rm.model = get_peft_model(hf, lcfg)
        if rm.meta.kind == "encoder":  # BERT's pooler is part of the head: train it too
            for n, p in rm.model.named_parameters():
                if ".pooler." in n:
                    p.requires_grad_(True)


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


def _param_groups(rm, cfg: RMTrainConfig):
    head_names = ("score.", "classifier.", ".pooler.")
    head, body = [], []
    for n, p in rm.named_parameters():
        if p.requires_grad:
            (head if any(h in n for h in head_names) else body).append(p)
    groups = [{"params": body, "lr": cfg.lr}] if body else []
    groups.append({"params": head, "lr": cfg.head_lr or cfg.lr})
    return groups


def train_reward_model(cfg: RMTrainConfig) -> dict[str, Any]:
    """Run the whole training; returns the final evaluation metrics (empty without eval data)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from rlhfkit.checkpoint import load_checkpoint, save_checkpoint
    from rlhfkit.training import disable_dropout, guarded_step, make_adamw, start_run
    from rlhfkit.data.collate import EncodedPreferences, collate, plan_batches, split_effective_batch
    from rlhfkit.data.readers import describe
    from rlhfkit.models.cpu_linear import apply_cpu_matmul
    from rlhfkit.models.reward import RewardModel
    from rlhfkit.rm.evaluate import evaluate
    from rlhfkit.rm.objective import list_losses
    from rlhfkit.tracking import MetricsLogger, plot_curves, read_metrics

    out = Path(cfg.output)
    accelerator, ckpt = start_run(cfg)
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index

    train_ex, eval_ex = _load_data(cfg)
    rm = RewardModel.from_pretrained(
        cfg.model, pooling=None if cfg.pooling == "auto" else cfg.pooling, text_format=cfg.text_format, max_length=cfg.max_length
    )
    if cfg.loss == "token-pairwise" and rm.meta.kind != "decoder":
        raise ConfigError(f"loss 'token-pairwise' needs a decoder backbone; {cfg.model} is an encoder")
    if main and rm.meta.kind == "encoder" and rm.meta.pooling != "auto":
        logger.warning("pooling=%s: AutoModelForSequenceClassification will not reproduce these scores (use auto for interop)", rm.meta.pooling)
    if cfg.disable_dropout:
        disable_dropout(rm)
    apply_cpu_matmul(cfg.cpu_matmul, accelerator.device, rm)
    _apply_lora_and_freezing(rm, cfg)
    train_data = EncodedPreferences.build(train_ex, rm.encode, cfg.max_length, what=cfg.train)
    eval_data = EncodedPreferences.build(eval_ex, rm.encode, cfg.max_length, what=cfg.eval or "eval split") if eval_ex else None
    if main:
        info = describe(train_ex)
        logger.warning(
            "train: %d lists, %d pairs, %d unique texts; eval: %d lists; processes: %d (%s)",
            info["n_lists"], info["n_pairs"], len(train_data.texts), len(eval_ex), world, accelerator.distributed_type,
        )

    effective = cfg.batch_size * cfg.grad_accum * world
    if len(train_data) < world:
        raise ConfigError(f"{len(train_data)} training lists cannot feed {world} processes")
    lengths = [train_data.list_length(j) for j in range(len(train_data))]
    steps_per_epoch = math.ceil(len(train_data) / effective)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

    optimizer = make_adamw(_param_groups(rm, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(
        cfg.scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps), num_training_steps=total_steps
    )
    model, optimizer = accelerator.prepare(rm, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    unwrapped = accelerator.unwrap_model(model)
    pad = unwrapped.pad

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_metric": None, "best_step": None}
    if ckpt is not None:
        state = load_checkpoint(accelerator, ckpt)
        if main:
            logger.warning("resuming from %s at step %d (epoch %d, batch %d)", ckpt, state["step"], state["epoch"], state["batch_in_epoch"])
    log = MetricsLogger(out, enabled=main, resume_step=state["step"] if ckpt else None, tensorboard=cfg.tensorboard)

    def export(name: str) -> None:
        if main:
            import yaml
            unwrapped.save_pretrained(out / name, extra_files={"training_config.yaml": yaml.safe_dump(vars(cfg), allow_unicode=True)})

    def run_eval(step: int) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        if main and eval_data is not None:
            metrics, scores = evaluate(unwrapped, eval_data, pad, batch_size=cfg.eval_batch_size, device=accelerator.device, loss=cfg.loss)
            metrics["eval_seconds"] = round(time.time() - t_eval, 2)
            key = "pairwise_accuracy" if "pairwise_accuracy" in metrics else "mse"
            sign = 1 if key == "pairwise_accuracy" else -1
            log.log(step, {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
            better = state["best_metric"] is None or sign * metrics[key] > sign * state["best_metric"]
            if better:
                state["best_metric"], state["best_step"] = metrics[key], step
                export("best")
            _plot_scores(eval_data, scores, out / "eval_scores.png")
        accelerator.wait_for_everyone()
        return metrics

    progress = tqdm(total=total_steps, initial=state["step"], disable=not (main and cfg.progress), desc="rm train", dynamic_ncols=True)
    model.train()
    window = {"loss": torch.zeros(()), "correct": torch.zeros((), dtype=torch.long), "pairs": torch.zeros((), dtype=torch.long), "lists": 0}
    t_window = time.time()
    t_eval = time.time()
    last_eval_step = -1
    stop_at = min(total_steps, cfg.stop_after_steps or total_steps)

    while state["step"] < stop_at:
        plan = plan_batches(lengths, effective, cfg.seed, state["epoch"])
        for b_idx in range(state["batch_in_epoch"], len(plan)):
            if state["step"] >= stop_at:
                break
            eff = plan[b_idx]
            micro = split_effective_batch(eff, world, cfg.grad_accum, rank)
            for a, list_ids in enumerate(micro):
                weight = world / len(eff)  # DDP averages over processes: this makes it a mean over lists
                if not list_ids:  # fewer lists than slots: take part in the all-reduce with zero weight
                    list_ids, weight = [eff[0]], 0.0
                batch = collate(train_data, list_ids, pad).to(accelerator.device)
                sync = a == len(micro) - 1
                ctx = accelerator.no_sync(model) if not sync else nullcontext()
                with ctx:
                    with accelerator.autocast():
                        if cfg.loss == "token-pairwise":
                            scores, token_rewards = model(**batch.inputs, return_token_rewards=True)
                        else:
                            scores, token_rewards = model(**batch.inputs), None
                        per_list = list_losses(cfg.loss, batch, scores.float(), None if token_rewards is None else token_rewards.float())
                    loss = per_list.sum() * weight
                    # One host sync per micro-batch, on purpose: a NaN must stop us before
                    # optimizer.step() writes it into the weights.
                    if not torch.isfinite(loss).item():
                        raise NonFiniteLossError(
                            f"non-finite loss ({loss.item()}) at step {state['step'] + 1} (epoch {state['epoch']}, batch {b_idx}, "
                            f"micro-batch {a}), lists from {[train_data.examples[j].source for j in list_ids][:4]}. "
                            f"Nothing was saved from this step; the last good checkpoint in {out / 'checkpoint'} is intact. "
                            "Lower --lr, keep --max-grad-norm on, or check these rows."
                        )
                    accelerator.backward(loss)
                if weight:
                    window["loss"] += per_list.detach().sum().cpu()
                    window["lists"] += len(list_ids)
                    if batch.labels is None:
                        c, n = _acc(batch, scores.detach().float())
                        window["correct"] += c.cpu()
                        window["pairs"] += n.cpu()
            grad_norm = guarded_step(
                accelerator, model, optimizer, scheduler, cfg.max_grad_norm,
                where=f"step {state['step'] + 1} (epoch {state['epoch']}, batch {b_idx}); the last good checkpoint in {out / 'checkpoint'} is intact",
            )
            state["step"] += 1
            state["batch_in_epoch"] = b_idx + 1
            progress.update(1)

            if state["step"] % cfg.log_every == 0 or state["step"] == stop_at:
                stats = torch.stack([window["loss"].double(), window["correct"].double(), window["pairs"].double(), torch.tensor(float(window["lists"]), dtype=torch.float64)])
                stats = accelerator.reduce(stats.to(accelerator.device), reduction="sum").cpu()
                dt = time.time() - t_window
                row = {
                    "train/loss": (stats[0] / stats[3].clamp(min=1)).item(),
                    "train/lists_per_s": stats[3].item() / max(dt, 1e-9),
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/epoch": state["epoch"] + state["batch_in_epoch"] / len(plan),
                }
                if stats[2] > 0:
                    row["train/accuracy"] = (stats[1] / stats[2]).item()
                if grad_norm is not None:
                    row["train/grad_norm"] = float(grad_norm)
                log.log(state["step"], row)
                progress.set_postfix(loss=f"{row['train/loss']:.4f}", acc=f"{row.get('train/accuracy', float('nan')):.3f}", lists_s=f"{row['train/lists_per_s']:.1f}")
                window = {"loss": torch.zeros(()), "correct": torch.zeros((), dtype=torch.long), "pairs": torch.zeros((), dtype=torch.long), "lists": 0}
                t_window = time.time()
            if state["step"] % cfg.eval_every == 0 and state["step"] != stop_at:
                t_eval = time.time()
                m = run_eval(state["step"])
                last_eval_step = state["step"]
                if m and main:
                    progress.write(_eval_line(state["step"], m))
                t_window = time.time()
            if state["step"] % cfg.save_every == 0 and state["step"] != stop_at:
                save_checkpoint(accelerator, out, state)
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    progress.close()

    finished = state["step"] >= total_steps
    final: dict[str, Any] = {}
    if last_eval_step != state["step"]:
        t_eval = time.time()
        final = run_eval(state["step"])
        if final and main:
            logger.warning(_eval_line(state["step"], final))
    save_checkpoint(accelerator, out, state)
    if finished:
        export("last")
        if eval_data is None:
            export("best")  # nothing to select by: the last model is the best we know
    if main:
        log.close()
        plot_curves(
            read_metrics(out / "metrics.jsonl"),
            [("loss", ["train/loss", "eval/loss"]), ("pairwise accuracy", ["train/accuracy", "eval/pairwise_accuracy", "eval/list_exact_accuracy"])],
            out / "curves.png",
            title=f"reward model: {cfg.model}, loss {cfg.loss}",
        )
        if final:
            import json

            (out / "eval_report.json").write_text(json.dumps(final, indent=2, ensure_ascii=False))
        if not finished:
            logger.warning("stopped at step %d of %d; continue with --resume", state["step"], total_steps)
    accelerator.wait_for_everyone()
    return final


def _acc(batch, scores):
    from rlhfkit import losses as L

    return L.pairwise_accuracy(batch.gather_lists(scores), batch.ranks, batch.list_mask)


def _eval_line(step: int, m: dict[str, Any]) -> str:
    if "pairwise_accuracy" in m:
        return (
            f"step {step}: eval pairwise_accuracy {m['pairwise_accuracy']:.4f}  list_exact {m['list_exact_accuracy']:.4f}  "
            f"kendall_tau {m['kendall_tau']:.4f}  1st-vs-2nd {m['accuracy_first_vs_second']:.3f}  1st-vs-last {m['accuracy_first_vs_last']:.3f}  "
            f"length_corr {m['length_corr']:+.2f}"
        )
    return f"step {step}: eval mse {m['mse']:.4f}"


def _plot_scores(data, scores, path: Path) -> None:
    """Histogram of chosen (rank 0) vs rejected scores on the eval set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if max(ex.k for ex in data.examples) < 2:
        return
    chosen, rejected = [], []
    for j, ex in enumerate(data.examples):
        best = min(ex.ranks)
        for pos, t in enumerate(data.lists[j]):
            (chosen if ex.ranks[pos] == best else rejected).append(float(scores[t]))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(rejected, bins=40, alpha=0.6, label="rejected (rank > 0)")
    ax.hist(chosen, bins=40, alpha=0.6, label="chosen (rank 0)")
    ax.set_xlabel("reward score")
    ax.set_title("held-out score distributions")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)



os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

"""rlhfkit's reward-model trainer against TRL's ``RewardTrainer``, on the same rank lists.

    .venv-bench/bin/python benchmarks/rm_vs_trl.py            # defaults below, ~15 min on 2 cores
    .venv-bench/bin/python benchmarks/rm_vs_trl.py --n-train 16 --n-eval 16 --seeds 1   # smoke run

One invocation trains both sides one after the other, each in its own subprocess (the
script re-invokes itself with ``--side ours|trl``), ``--seeds`` times (default 3: one run's
held-out accuracy moves by about +-0.01 with the seed alone, as much as the differences
measured), then prints lists/second for both, the throughput ratio (ours / TRL), each side's
peak RSS and both held-out accuracies (means over the seeds), and writes
``benchmarks/results/rm_vs_trl.json``. TRL is not a dependency of rlhfkit: it lives in
``.venv-bench`` (see ``benchmarks/README.md`` and ``bench_common.INSTALL``).

Fairness rules (what both sides share):

- Backbone: ``--backbone`` (default ``minilm-l6``, the embedded all-MiniLM-L6-v2), loaded as
  ``AutoModelForSequenceClassification(num_labels=1)`` in fp32 on both sides.
- Data: the first ``--n-train`` lists of ``--data`` (K=4 reviews, best first), held-out
  lists ``--eval-start`` .. ``+--n-eval``. rlhfkit trains on the lists (each text encoded
  once: 4 sequences per list); TRL trains on every list expanded into its C(K,2) ordered
  (chosen, rejected) pairs (12 sequences per list).
- Length: every text is PRE-TRUNCATED (at a token boundary, with the backbone's tokenizer)
  so that it fits ``--max-length`` tokens *with* the special/EOS tokens either side adds.
  TRL's ``RewardTrainer`` silently drops pairs longer than ``max_length``; the TRL side
  asserts its train dataset still has every pair after TRL's preprocessing, and that its
  token ids equal rlhfkit's, text for text.
- Optimisation: same learning rate, linear schedule with the same number of warm-up steps
  (``int(warmup_ratio * steps)``, computed once and handed to both), AdamW with weight decay
  0, gradient clipping at 1.0, 1 epoch, the same seed, and the same lists per optimizer
  step: rlhfkit ``--batch-size`` lists, TRL the C(K,2) pairs of as many lists
  (``per_device_train_batch_size = batch_size * C(K,2)``, i.e. 48 pairs for 8 lists of 4;
  ``--trl-grad-accum`` splits that into micro-batches if memory demands, same pairs per
  step). Both objectives are the mean of -log sigmoid(r_w - r_l) over the step's pairs.
- Each side at its best on a CPU: fp32 (TRL ``bf16=False``; rlhfkit ``mixed_precision=no``),
  no gradient checkpointing (asserted for TRL), no evaluation or checkpoints during
  training, logging once at the end, no progress bar, no TensorBoard /
  ``report_to="none"``, data-loader workers 0.
- Dropout (``--dropout``): ``off`` by default on both sides. TRL's ``RewardTrainer`` sets
  every dropout module to p=0 (``disable_dropout=True``, its default); rlhfkit has no such
  switch and trains with the backbone's dropout (MiniLM: 0.1), which also costs time (about
  13% of a MiniLM forward+backward on one CPU thread) and, here, accuracy. So by default
  both sides load a copy of the backbone whose config sets every dropout probability to 0
  (weights symlinked). ``on``: both with the backbone's dropout; ``defaults``: each side's
  default.
- Threads (``--threads``, default 1 per side): on the shared 2-core machine, two OpenMP
  threads stall at every barrier while other jobs run, and step times vary several-fold
  (plain AdamW's 200 small kernels per step suffer most); one thread is faster there and
  stable. ``--threads 0`` uses PyTorch's default (one per core).
- Left as each library ships it: both use fused AdamW; TRL samples pairs at random
  (``--trl-group-by-length`` gives it transformers' ``LengthGroupedSampler``), rlhfkit always
  batches lists of similar length; rlhfkit runs its fp32 Linear layers through oneDNN on
  the CPU (``rlhfkit.models.cpu_linear``; same fp32 arithmetic, ~2.2x faster matmuls on
  this AMD CPU) where TRL has PyTorch's default BLAS. ``--ours-cpu-matmul torch`` gives
  rlhfkit PyTorch's default too, to tell the kernel's share from the trainer's.
- Evaluation: the same code scores both saved models: ``RewardModel.from_pretrained(dir)``
  then ``rlhfkit.rm.evaluate.evaluate`` on the same pre-truncated held-out lists
  (pairwise accuracy over all ordered pairs, list-exact accuracy over whole lists). The
  report adds a 95% bootstrap interval for each accuracy difference, resampling the held-out
  lists (paired: the same lists for both sides) and each side's runs: on a few hundred lists,
  and with the seed moving a run by about a point, a difference of a point can be noise.

What is timed. The headline "training loop" is measured identically on both sides by two
global PyTorch hooks: from the first ``nn.Module`` forward call to the end of the last
``optimizer.step()`` (the forward hook removes itself after the first call, so it costs
nothing afterwards; the step hook also counts optimizer steps, which must match). That
excludes model loading, tokenisation, saving and evaluation on both sides. Also reported,
for transparency: ``time.perf_counter`` around the whole call of each side, namely
``trainer.train()`` for TRL (after the trainer was built: model load and tokenisation are
in its constructor) and ``train_reward_model(cfg)`` for rlhfkit (which also loads the
model, tokenises, writes a resumable checkpoint, exports the model twice and draws its
curves, so it is not comparable as is). Peak RSS is the child process's ``VmHWM`` at the
last optimizer step (``bench_common.LoopClock``): loading and training, not the saving and
evaluating after it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: find bench_common
from bench_common import (  # noqa: E402
    INSTALL,
    ComparisonArgs,
    compare,
    interval_caption,
    per_list_counts,
    runs_line,
    steps_per_run,
    timed,
    truncate_text,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "sentiment_ranklists.tsv"
DEFAULT_OUTPUT = REPO / "benchmarks" / "results" / "rm_vs_trl.json"


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class Args(ComparisonArgs):
    """Benchmark rlhfkit's reward-model training against TRL's RewardTrainer on the same rank lists."""

    backbone: str = field(
        default="minilm-l6",
        metadata={"help": "backbone for both sides: minilm-l6, smollm2-135m or a checkpoint folder"},
    )
    data: str = field(default=str(DEFAULT_DATA), metadata={"help": "rank-list TSV (one list per line, best first)"})
    n_eval: int = field(
        default=482,
        metadata={
            "help": "evaluate on N held-out lists starting at --eval-start (482: lines 2001-2482, all the lists after the first 2,000)"
        },
    )
    eval_start: int = field(
        default=2000, metadata={"help": "0-based index of the first held-out list (2000 = line 2001)"}
    )
    seeds: int = field(
        default=3,
        metadata={
            "help": "train each side this many times, with seeds --seed, --seed+1, ...: the table shows the means "
            "over the runs, and the accuracy interval resamples the runs as well as the held-out lists "
            "(one run's accuracy moves by about +-0.01 with the seed alone)"
        },
    )
    batch_size: int | None = field(
        default=None, metadata={"help": "rlhfkit: lists per optimizer step (default: rlhfkit's rm train default)"}
    )
    lr: float | None = field(
        default=None, metadata={"help": "peak learning rate, both sides (rlhfkit: of the backbone); default: rlhfkit's"}
    )
    head_lr: float | None = field(
        default=None,
        metadata={
            "help": "rlhfkit: learning rate of the new scalar head (default: rlhfkit's); TRL has one for all weights"
        },
    )
    head_init: Literal["probe", "random"] | None = field(
        default=None,
        metadata={"help": "rlhfkit: the head's start, a linear probe or random (default: rlhfkit's); TRL's is random"},
    )
    warmup_ratio: float | None = field(
        default=None,
        metadata={"help": "share of each side's optimizer steps spent warming up, both sides (default: rlhfkit's)"},
    )
    scheduler: Literal["linear", "cosine", "constant"] | None = field(
        default=None, metadata={"help": "learning-rate schedule after warm-up, both sides (default: rlhfkit's)"}
    )
    trl_pairs_per_step: int | None = field(
        default=None,
        metadata={
            "help": "TRL: pairs per optimizer step (default: the C(K,2) pairs of --batch-size lists, the same lists per step; 8 is TRL's own default)"
        },
    )
    trl_lr: float | None = field(
        default=None, metadata={"help": "TRL: peak learning rate (default: --lr; TRL's own default is 1e-4)"}
    )
    trl_warmup_ratio: float | None = field(
        default=None,
        metadata={"help": "TRL: share of its steps warming up (default: --warmup-ratio; TRL's own default is 0)"},
    )
    trl_scheduler: Literal["linear", "cosine", "constant"] | None = field(
        default=None, metadata={"help": "TRL: schedule (default: --scheduler)"}
    )
    trl_defaults: bool = field(
        default=False,
        metadata={
            "help": "TRL at RewardConfig's own defaults for every --trl-* option not given: pairs per step (8), learning rate (1e-4), warm-up (0), schedule (linear)"
        },
    )
    trl_grad_accum: int = field(
        default=1, metadata={"help": "TRL only: split each step's pairs into this many micro-batches (memory)"}
    )
    dropout: Literal["off", "on", "defaults"] = field(
        default="off",
        metadata={
            "help": "off: both sides without dropout (a copy of the backbone with its dropout set to 0; TRL's default); on: both with the backbone's dropout; defaults: each side's default (TRL off, rlhfkit on)"
        },
    )
    trl_group_by_length: bool = field(
        default=False,
        metadata={"help": "give TRL transformers' LengthGroupedSampler (rlhfkit always groups by length)"},
    )
    ours_cpu_matmul: Literal["auto", "torch"] = field(
        default="auto",
        metadata={
            "help": "rlhfkit's fp32 Linear matmuls: auto (its default on the CPU, oneDNN) or torch (PyTorch's default BLAS, as TRL)"
        },
    )
    output: str = field(default=str(DEFAULT_OUTPUT), metadata={"help": "JSON result file"})

    at_least_one: ClassVar[tuple[str, ...]] = ComparisonArgs.at_least_one + ("trl_grad_accum",)

    def __post_init__(self):
        from rlhfkit.config import ConfigError
        from rlhfkit.rm.train import RMTrainConfig

        # Unset optimisation options take rlhfkit's own defaults, so the benchmark runs what
        # `rlhfkit rm train` runs (a head_lr of None there means "the same as lr").
        ours = {f.name: f.default for f in fields(RMTrainConfig)}
        for name in ("batch_size", "lr", "warmup_ratio", "scheduler"):
            if getattr(self, name) is None:
                setattr(self, name, ours[name])
        if self.head_lr is None:
            self.head_lr = ours["head_lr"] or self.lr
        self.head_init = self.head_init or ours["head_init"]
        if self.trl_defaults:
            self.apply_trl_defaults()
        self.trl_lr = self.lr if self.trl_lr is None else self.trl_lr
        self.trl_warmup_ratio = self.warmup_ratio if self.trl_warmup_ratio is None else self.trl_warmup_ratio
        self.trl_scheduler = self.trl_scheduler or self.scheduler
        if self.trl_pairs_per_step is not None and self.trl_pairs_per_step < 1:
            raise ConfigError(f"option 'trl_pairs_per_step' must be >= 1, got {self.trl_pairs_per_step}")
        super().__post_init__()

    def apply_trl_defaults(self) -> None:
        """Fill the unset --trl-* options from TRL's RewardConfig, as a TRL user would run it."""
        if importlib.util.find_spec("trl") is None:
            return  # compare() prints how to install it
        from trl import RewardConfig

        trl = {f.name: f.default for f in fields(RewardConfig)}
        if trl["warmup_steps"] != 0 or trl["lr_scheduler_type"] not in ("linear", "cosine", "constant"):
            raise SystemExit(
                f"--trl-defaults: RewardConfig's warm-up {trl['warmup_steps']!r} or schedule "
                f"{trl['lr_scheduler_type']!r} is new to this script; pass the --trl-* options"
            )
        self.trl_pairs_per_step = self.trl_pairs_per_step or trl["per_device_train_batch_size"]
        self.trl_lr = self.trl_lr or trl["learning_rate"]
        self.trl_warmup_ratio = 0.0 if self.trl_warmup_ratio is None else self.trl_warmup_ratio
        self.trl_scheduler = self.trl_scheduler or str(trl["lr_scheduler_type"])


def trl_pairs_per_step(args: Args, pairs_per_list: int) -> int:
    """TRL's pairs per optimizer step: --trl-pairs-per-step, else those of --batch-size lists."""
    return args.trl_pairs_per_step or args.batch_size * pairs_per_list


# --------------------------------------------------------------------------------------
# Shared by both sides
# --------------------------------------------------------------------------------------


def evaluate_saved(model_dir: Path, eval_path: Path, max_length: int, batch_size: int) -> dict[str, Any]:
    """Held-out metrics of a saved reward model: the same code for both sides."""
    from rlhfkit.data.collate import EncodedPreferences
    from rlhfkit.data.readers import read_preferences
    from rlhfkit.models.reward import RewardModel
    from rlhfkit.rm.evaluate import evaluate

    rm = RewardModel.from_pretrained(model_dir, max_length=max_length)
    data = EncodedPreferences.build(read_preferences(eval_path), rm.encode, max_length, what=str(eval_path))
    assert data.n_truncated == 0, f"{data.n_truncated} held-out texts were cut again: the pre-truncation did not fit"
    metrics, scores = evaluate(rm, data, rm.pad, batch_size=batch_size)
    keep = (
        "pairwise_accuracy",
        "list_exact_accuracy",
        "kendall_tau",
        "n_lists",
        "n_pairs",
        "accuracy_first_vs_last",
        "length_corr",
    )
    out = {k: metrics[k] for k in keep}
    out.update(per_list_counts(data, scores, out["pairwise_accuracy"]))  # for the paired bootstrap in the report
    return out


# --------------------------------------------------------------------------------------
# The two sides (each in its own subprocess)
# --------------------------------------------------------------------------------------


def run_ours(args: Args, work: Path) -> dict[str, Any]:
    from rlhfkit.rm.train import RMTrainConfig, train_reward_model

    prepared = json.loads((work / "prepared.json").read_text())
    never = 10**9
    cfg = RMTrainConfig(
        train=str(work / "train.tsv"),
        output=str(work / "ours"),
        model=prepared["backbone_path"],
        loss="pairwise",
        epochs=float(args.epochs),
        batch_size=args.batch_size,
        grad_accum=1,
        lr=args.lr,
        head_lr=args.head_lr,
        head_init=args.head_init,
        weight_decay=0.0,
        warmup_ratio=args.warmup_ratio,
        scheduler=args.scheduler,
        max_grad_norm=1.0,
        max_length=args.max_length,
        seed=args.seed,
        mixed_precision="no",
        cpu_matmul=args.ours_cpu_matmul,
        report_to="none",
        progress=False,
        log_every=never,
        eval_every=never,
        save_every=never,
    )
    measured, _ = timed(partial(train_reward_model, cfg))
    return measured | {"sequences_per_step": args.batch_size * prepared["k"], "model_dir": str(work / "ours" / "final")}


def run_trl(args: Args, work: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from rlhfkit.data.readers import read_preferences

    examples = read_preferences(work / "train.tsv")
    expected_ids = json.loads((work / "train_token_ids.json").read_text())  # rlhfkit's ids, per list
    chosen, rejected, ids_c, ids_r = [], [], [], []
    for ex, list_ids in zip(examples, expected_ids):
        for a, b in ex.ordered_pairs():
            chosen.append(ex.responses[a])
            rejected.append(ex.responses[b])
            ids_c.append(list_ids[a])
            ids_r.append(list_ids[b])
    pairs_per_list = len(chosen) // len(examples)

    model_path = json.loads((work / "prepared.json").read_text())["backbone_path"]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.eos_token is not None:
        # TRL's own path: it appends the EOS string and tokenises.
        columns = {"chosen": chosen, "rejected": rejected}
    else:
        # BERT-style tokenizers have no EOS and TRL's add_eos step fails on None, so give TRL
        # its documented pre-tokenised columns, made exactly as its tokenize step would.
        columns = {
            "chosen_ids": [tokenizer(t)["input_ids"] for t in chosen],
            "rejected_ids": [tokenizer(t)["input_ids"] for t in rejected],
        }
    remove_unused = True
    if args.trl_group_by_length:
        columns["length"] = [max(len(c), len(r)) for c, r in zip(ids_c, ids_r)]
        remove_unused = False  # the Trainer would drop 'length' before the sampler reads it
    dataset = Dataset.from_dict(columns)

    pairs_per_step = trl_pairs_per_step(args, pairs_per_list)
    steps = steps_per_run(len(chosen), pairs_per_step, args.epochs)
    if pairs_per_step % args.trl_grad_accum:
        raise SystemExit(f"--trl-grad-accum {args.trl_grad_accum} does not divide the {pairs_per_step} pairs of a step")
    config = RewardConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=pairs_per_step // args.trl_grad_accum,
        gradient_accumulation_steps=args.trl_grad_accum,
        num_train_epochs=args.epochs,
        learning_rate=args.trl_lr,
        lr_scheduler_type=args.trl_scheduler,
        warmup_steps=int(args.trl_warmup_ratio * steps),
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=args.seed,
        data_seed=args.seed,
        bf16=False,
        fp16=False,
        activation_checkpointing=False,
        max_length=args.max_length,
        disable_dropout=args.dropout != "on",
        model_init_kwargs={"dtype": torch.float32},
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=10**9,
        report_to="none",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        disable_tqdm=True,
        remove_unused_columns=remove_unused,
        train_sampling_strategy="group_by_length" if args.trl_group_by_length else "random",
    )
    trainer = RewardTrainer(model=model_path, args=config, train_dataset=dataset, processing_class=tokenizer)

    # TRL filters out pairs longer than max_length without a word: none may be missing.
    got = trainer.train_dataset
    assert len(got) == len(chosen), f"TRL kept {len(got)} of {len(chosen)} pairs after preprocessing"
    mismatched = sum(c != ec or r != er for c, r, ec, er in zip(got["chosen_ids"], got["rejected_ids"], ids_c, ids_r))
    assert mismatched == 0, f"{mismatched} of {len(chosen)} TRL pairs are tokenised differently from rlhfkit's texts"

    measured, _ = timed(trainer.train)
    assert not trainer.model.is_activation_checkpointing, "TRL trained with gradient checkpointing on"
    trainer.save_model(str(work / "trl" / "model"))
    return measured | {
        "sequences_per_step": 2 * pairs_per_step,
        "pairs_per_step": pairs_per_step,
        "pairs": len(chosen),
        "model_dir": str(work / "trl" / "model"),
        "trl_disable_dropout": args.dropout != "on",
        "trl_group_by_length": args.trl_group_by_length,
    }


def run_side(args: Args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    result = run_ours(args, work) if args.side == "ours" else run_trl(args, work)
    prepared = json.loads((work / "prepared.json").read_text())
    n_lists = prepared["train_lists"]
    if args.side == "ours":
        expected_steps = steps_per_run(n_lists, args.batch_size, args.epochs)  # accumulation does not change it
    else:
        pairs_per_list = prepared["train_pairs"] // n_lists
        expected_steps = steps_per_run(prepared["train_pairs"], trl_pairs_per_step(args, pairs_per_list), args.epochs)
    if result["steps"] != expected_steps:
        raise SystemExit(f"{args.side}: {result['steps']} optimizer steps, expected {expected_steps}")
    result["lists_per_s"] = n_lists * args.epochs / result["loop_s"]
    result["eval"] = evaluate_saved(Path(result["model_dir"]), work / "eval.tsv", args.max_length, args.eval_batch_size)
    result["torch_threads"] = torch.get_num_threads()
    (work / f"{args.side}.json").write_text(json.dumps(result, indent=2))
    return 0


# --------------------------------------------------------------------------------------
# The parent: prepare the data once, run both sides, report
# --------------------------------------------------------------------------------------


def backbone_without_dropout(path: Path, work: Path) -> tuple[Path, dict[str, float]]:
    """A copy of checkpoint ``path`` whose config sets every dropout probability to 0.

    The weights are symlinked, only ``config.json`` is rewritten. This is what TRL's
    ``disable_dropout=True`` does to the modules, done in a way rlhfkit reads too.
    """
    config = json.loads((path / "config.json").read_text())
    zeroed = {
        k: v
        for k, v in config.items()
        if ("dropout" in k.lower() or k.endswith("pdrop")) and type(v) in (int, float) and v > 0
    }
    if not zeroed:
        return path, {}
    dst = work / "backbone"
    dst.mkdir()
    for f in path.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f.resolve())
    (dst / "config.json").write_text(json.dumps({**config, **{k: 0.0 for k in zeroed}}, indent=2))
    return dst, zeroed


def prepare_data(args: Args, work: Path) -> dict[str, Any]:
    """Pre-truncate train and held-out lists, write them as TSV, record rlhfkit's token ids.

    Also fixes the backbone both sides load (``--dropout off``: a dropout-free copy) and
    writes WORK/prepared.json for the two sides.
    """
    from transformers.utils import logging as hf_logging

    from rlhfkit.data.readers import read_preferences
    from rlhfkit.data.types import PreferenceExample
    from rlhfkit.data.writers import write_preferences
    from rlhfkit.models.hub import resolve_model
    from rlhfkit.models.reward import RewardModel

    hf_logging.set_verbosity_error()  # the new head's "MISSING" load report is expected
    hf_logging.disable_progress_bar()

    examples = read_preferences(args.data)
    if args.eval_start + args.n_eval > len(examples):
        raise SystemExit(
            f"{args.data} has {len(examples)} lists; --eval-start {args.eval_start} + --n-eval {args.n_eval} needs more"
        )
    train, held_out = examples[: args.n_train], examples[args.eval_start : args.eval_start + args.n_eval]
    ks = {ex.k for ex in train}
    if len(ks) != 1 or any(ex.prompt for ex in train + held_out):
        raise SystemExit(
            f"{args.data}: the benchmark needs prompt-free lists of one size K (found K in {sorted(ks)}), "
            "so that a step of B lists is exactly B * C(K,2) pairs for TRL"
        )

    # Resolving here converts a GGUF alias to the cache once, outside the timings.
    backbone = Path(resolve_model(args.backbone))
    zeroed: dict[str, float] = {}
    if args.dropout == "off":
        backbone, zeroed = backbone_without_dropout(backbone, work)
    rm = RewardModel.from_pretrained(backbone, max_length=args.max_length)
    tok = rm.tokenizer
    if not getattr(tok, "is_fast", False):
        raise SystemExit(f"{args.backbone}: pre-truncation needs a fast tokenizer (token offsets)")
    probe = "a"
    overhead = len(rm.encode("", probe)[0]["input_ids"]) - len(tok(probe, add_special_tokens=False)["input_ids"])
    budget = args.max_length - overhead  # room left after [CLS]/[SEP] or EOS

    n_cut = 0

    def cut(part: list[PreferenceExample]) -> list[PreferenceExample]:
        nonlocal n_cut
        out = []
        for ex in part:
            texts = tuple(truncate_text(tok, t, budget) for t in ex.responses)
            n_cut += sum(a != b for a, b in zip(texts, ex.responses))
            if len(set(texts)) != len(texts):
                raise SystemExit(
                    f"{ex.source}: two texts are equal after truncation to {args.max_length} tokens; raise --max-length"
                )
            out.append(PreferenceExample(prompt="", responses=texts, ranks=ex.ranks, source=ex.source))
        return out

    train, held_out = cut(train), cut(held_out)
    write_preferences(work / "train.tsv", train, "ranklist-tsv", prompt_column=False)
    write_preferences(work / "eval.tsv", held_out, "ranklist-tsv", prompt_column=False)
    token_ids = []
    for ex in train:
        row = []
        for t in ex.responses:
            feats, _, was_cut = rm.encode("", t)
            assert not was_cut and len(feats["input_ids"]) <= args.max_length
            row.append(feats["input_ids"])
        token_ids.append(row)
    (work / "train_token_ids.json").write_text(json.dumps(token_ids))
    k = ks.pop()
    prepared = {
        "backbone_path": str(backbone),
        "dropout_zeroed": zeroed,
        "k": k,
        "train_lists": len(train),
        "train_pairs": len(train) * k * (k - 1) // 2,
        "eval_lists": len(held_out),
        "texts_pre_truncated": n_cut,
        "texts_total": (len(train) + len(held_out)) * k,
    }
    (work / "prepared.json").write_text(json.dumps(prepared, indent=2))
    return prepared


def report(
    args: Args,
    data: dict[str, Any],
    ours: dict[str, Any],
    trl: dict[str, Any],
    env: dict[str, Any],
    ci: dict[str, list[float]],
) -> str:
    ratio = ours["lists_per_s"] / trl["lists_per_s"]
    oe, te = ours["eval"], trl["eval"]
    diff = oe["pairwise_accuracy"] - te["pairwise_accuracy"]
    lo, hi = ci["pairwise_accuracy"]
    if ratio < 2.5:
        verdict = f"NOT met: {ratio:.2f}x"
    elif diff >= 0:
        verdict = f"met: {ratio:.2f}x at {diff:+.4f} pairwise accuracy"
    elif hi >= 0:
        verdict = (
            f"throughput met ({ratio:.2f}x); pairwise accuracy {diff:+.4f}, lower but not distinguishable "
            f"from TRL's (the 95% interval of the difference includes 0)"
        )
    else:
        verdict = f"NOT met: {ratio:.2f}x but pairwise accuracy {diff:+.4f} (95% CI excludes 0)"
    rows = [
        ("lists/s (training loop)", f"{ours['lists_per_s']:.2f}", f"{trl['lists_per_s']:.2f}", f"**{ratio:.2f}x**"),
        (
            "training loop (s)",
            f"{ours['loop_s']:.1f}",
            f"{trl['loop_s']:.1f}",
            f"{trl['loop_s'] / ours['loop_s']:.2f}x less",
        ),
        ("sequences per step", f"{ours['sequences_per_step']}", f"{trl['sequences_per_step']}", ""),
        (
            "peak RSS, load + train (MiB)",
            f"{ours['peak_rss_mib']:.0f}",
            f"{trl['peak_rss_mib']:.0f}",
            f"{ours['peak_rss_mib'] / trl['peak_rss_mib']:.2f}",
        ),
        (
            "held-out pairwise accuracy",
            f"{oe['pairwise_accuracy']:.4f}",
            f"{te['pairwise_accuracy']:.4f}",
            f"{diff:+.4f} [{lo:+.3f}, {hi:+.3f}]",
        ),
        (
            "held-out list-exact accuracy",
            f"{oe['list_exact_accuracy']:.4f}",
            f"{te['list_exact_accuracy']:.4f}",
            f"{oe['list_exact_accuracy'] - te['list_exact_accuracy']:+.4f} [{ci['list_exact_accuracy'][0]:+.3f}, {ci['list_exact_accuracy'][1]:+.3f}]",
        ),
        ("whole call (s): train_reward_model / trainer.train", f"{ours['call_s']:.1f}", f"{trl['call_s']:.1f}", ""),
    ]
    lines = [
        f"Reward model, {args.backbone}: {data['train_lists']} lists of K={data['k']} ({data['train_pairs']} pairs for TRL), "
        f"{args.epochs} epoch(s), max length {args.max_length} ({data['texts_pre_truncated']} of {data['texts_total']} texts "
        f"pre-truncated), held-out {data['eval_lists']} lists.",
        f"rlhfkit: {ours['steps']} steps of {args.batch_size} lists, lr {args.lr:g}, head lr {args.head_lr:g} from a {args.head_init} start, {args.scheduler} "
        f"schedule, warm-up {args.warmup_ratio:g} of the steps. TRL: {trl['steps']} steps of {trl['pairs_per_step']} pairs, "
        f"lr {args.trl_lr:g}, {args.trl_scheduler} schedule, warm-up {args.trl_warmup_ratio:g} of the steps"
        + (" (--trl-defaults)." if args.trl_defaults else "."),
        f"CPU: {env['cpu']}{' ' + str(env['isa_caps']) if env['isa_caps'] else ''}, {env['cpus']} cores, torch threads {ours['torch_threads']}, load average at start {env['loadavg']}; "
        f"torch {env['versions']['torch']}, transformers {env['versions']['transformers']}, trl {env['versions']['trl']}. "
        f"Order: {args.order}. rlhfkit's --cpu-matmul: {args.ours_cpu_matmul}. Dropout: {args.dropout}"
        + (f" (zeroed {', '.join(data['dropout_zeroed'])})." if data["dropout_zeroed"] else "."),
        "",
        "| | rlhfkit | TRL RewardTrainer | ours vs TRL |",
        "| --- | ---: | ---: | ---: |",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows],
        "",
        *runs_line(args, ours, trl),
        interval_caption(args),
        f"Target (>= 2.5x TRL's lists/s at equal or better pairwise accuracy): {verdict}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return compare(
        __file__,
        argv,
        Args,
        run_side=run_side,
        prepare=prepare_data,
        report=report,
        labels={"ours": "rlhfkit", "trl": "TRL RewardTrainer"},
        install=INSTALL,
    )


if __name__ == "__main__":
    sys.exit(main())

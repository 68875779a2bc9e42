"""rlhfkit's DPO trainer against TRL's ``DPOTrainer``, on the same K = 4 rank lists.

    .venv-bench/bin/python benchmarks/dpo_vs_trl.py                               # defaults below
    .venv-bench/bin/python benchmarks/dpo_vs_trl.py --n-train 16 --n-eval 16      # smoke run

One invocation trains both sides one after the other, each in its own subprocess (the
script re-invokes itself with ``--side ours|trl``), then prints lists/second for both, the
throughput ratio (ours / TRL), each side's peak RSS and both held-out implicit-reward
accuracies with a paired-bootstrap interval, and writes ``benchmarks/results/dpo_vs_trl.json``.
TRL is not a dependency of rlhfkit: it lives in ``.venv-bench`` (``benchmarks/README.md``).

Fairness rules (what both sides share):

- Policy: ``--policy`` (default ``smollm2-135m``, the embedded SmolLM2-135M-Instruct), fp32,
  dropout off (TRL's ``disable_dropout`` default; rlhfkit always), the same seed. It is also
  the reference on both sides.
- Data: the first ``--n-train`` lists of ``--data`` (default the shipped
  ``examples/reviews_ranklists.tsv``: a prompt and K = 4 reviews, best first), held out
  ``--eval-start`` .. ``+ --n-eval``. rlhfkit trains on the lists (``loss dpo``: every one of
  the C(4,2) = 6 ordered pairs of a list, each text encoded once: 4 sequences per list);
  TRL on every list expanded into its 6 (prompt, chosen, rejected) rows (12 sequences per
  list). Both objectives are the mean of ``-log sigmoid(beta * (h_w - h_l))`` over the
  step's pairs.
- Text: plain (no chat template: TRL's non-conversational path), the prompt followed by a
  newline, then the response and EOS. Every response is PRE-TRUNCATED at a token boundary
  so that prompt + response + EOS fits ``--max-length``: TRL cuts longer sequences (and
  drops rows whose prompt alone fills it) without a word. The TRL side asserts that it kept
  every row and that its prompt + completion token ids equal rlhfkit's, text for text.
- Optimisation: the same ``beta``, learning rate, linear schedule with the same warm-up
  steps, AdamW without weight decay, clipping at 1.0, 1 epoch, and the same pairs per
  optimizer step: rlhfkit ``--batch-size`` lists, TRL their pairs
  (``per_device_train_batch_size = batch_size * 6``).
- Reference: computed once before training on both sides, with no second model held
  (rlhfkit's cached reference pass; TRL ``precompute_ref_log_probs=True``, its documented
  memory-saving mode, with a batch of the same number of sequences), and timed on both
  sides: the clock starts at the first forward pass, which is the reference pass's.
- Each side at its best on a CPU: fp32, no gradient checkpointing (TRL's DPO default is
  on: turned off and asserted), no evaluation or checkpoints during training, logging once,
  no progress bar or TensorBoard, data-loader workers 0, one PyTorch thread per side by
  default (``--threads``; see ``rm_vs_trl.py``). Left as each library ships it: TRL samples
  rows at random, rlhfkit batches lists of similar length; rlhfkit's CPU matmul kernel
  choice (``--ours-cpu-matmul torch`` gives it PyTorch's default, as TRL).
- Evaluation: the same code for both saved policies: the implicit reward
  ``beta * (log pi - log pi_ref)`` (:class:`rlhfkit.models.implicit_reward.ImplicitReward`) of every
  held-out response, scored by ``rlhfkit.rm.evaluate.evaluate`` (pairwise accuracy over the
  ordered pairs, list-exact accuracy over whole lists), with a 95% paired bootstrap over
  held-out lists for each difference.

What is timed: ``LoopClock`` (``bench_common``), from the first ``nn.Module`` forward to the
end of the last ``optimizer.step()``, identically on both sides; the optimizer steps must
match. Peak RSS is the child's ``VmHWM`` at the last optimizer step (loading, the reference
pass and training; not the saving after it).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
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
DEFAULT_DATA = REPO / "examples" / "reviews_ranklists.tsv"
DEFAULT_OUTPUT = REPO / "benchmarks" / "results" / "dpo_vs_trl.json"
NEVER = 10**9


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class Args(ComparisonArgs):
    """Benchmark rlhfkit's DPO against TRL's DPOTrainer on the same rank lists."""

    policy: str = field(
        default="smollm2-135m", metadata={"help": "policy (and reference) for both sides: alias or checkpoint folder"}
    )
    data: str = field(
        default=str(DEFAULT_DATA),
        metadata={"help": "rank-list TSV with a prompt column (one list per line, best first)"},
    )
    max_length: int = field(
        default=64, metadata={"help": "tokens per prompt + response + EOS (responses are pre-truncated to fit)"}
    )
    beta: float = field(default=0.1, metadata={"help": "DPO beta, both sides"})
    lr: float = field(
        default=5e-6,
        metadata={"help": "peak learning rate, both sides (5x TRL's default: one short epoch must move the policy)"},
    )
    ref_batch_size: int = field(
        default=48, metadata={"help": "sequences per forward pass of the reference pass, both sides"}
    )
    eval_batch_size: int = field(default=32, metadata={"help": "sequences per forward pass when evaluating"})
    ours_cpu_matmul: Literal["auto", "torch"] = field(
        default="auto",
        metadata={"help": "rlhfkit's fp32 Linear matmuls: auto (its default) or torch (PyTorch's default, as TRL)"},
    )
    output: str = field(default=str(DEFAULT_OUTPUT), metadata={"help": "JSON result file"})

    at_least_one: ClassVar[tuple[str, ...]] = ComparisonArgs.at_least_one + ("ref_batch_size",)

    def __post_init__(self):
        super().__post_init__()
        if self.beta <= 0:
            from rlhfkit.config import ConfigError

            raise ConfigError(f"option 'beta' must be > 0, got {self.beta}")


# --------------------------------------------------------------------------------------
# The two sides (each in its own subprocess)
# --------------------------------------------------------------------------------------


def run_ours(args: Args, work: Path) -> dict[str, Any]:
    from rlhfkit.dpo.train import DPOConfig, train_dpo

    prepared = json.loads((work / "prepared.json").read_text())
    cfg = DPOConfig(
        policy=prepared["policy_path"],
        train=str(work / "train.jsonl"),
        output=str(work / "ours"),
        loss="dpo",
        beta=args.beta,
        epochs=float(args.epochs),
        batch_size=args.batch_size,
        grad_accum=1,
        lr=args.lr,
        weight_decay=0.0,
        warmup_ratio=args.warmup_ratio,
        scheduler="linear",
        max_grad_norm=1.0,
        max_length=args.max_length,
        chat_template=False,
        seed=args.seed,
        mixed_precision="no",
        cpu_matmul=args.ours_cpu_matmul,
        report_to="none",
        progress=False,
        log_every=NEVER,
        eval_every=NEVER,
        save_every=NEVER,
        eval_batch_size=args.ref_batch_size,
        eval_kl_prompts=0,
    )
    measured, _ = timed(partial(train_dpo, cfg))
    return measured | {"sequences_per_step": args.batch_size * prepared["k"], "model_dir": str(work / "ours" / "final")}


def run_trl(args: Args, work: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer
    from trl import DPOConfig

    from rlhfkit.data.readers import read_preferences

    prepared = json.loads((work / "prepared.json").read_text())
    examples = read_preferences(work / "train.jsonl")
    expected = json.loads((work / "train_token_ids.json").read_text())  # rlhfkit's ids, per list
    rows: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": []}
    ids_c, ids_r = [], []
    for ex, list_ids in zip(examples, expected):
        for a, b in ex.ordered_pairs():
            rows["prompt"].append(ex.prompt)
            rows["chosen"].append(ex.responses[a])
            rows["rejected"].append(ex.responses[b])
            ids_c.append(list_ids[a])
            ids_r.append(list_ids[b])
    pairs_per_list = len(ids_c) // len(examples)
    steps = steps_per_run(len(examples), args.batch_size, args.epochs)
    pairs_per_step = args.batch_size * pairs_per_list
    config = DPOConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=pairs_per_step,
        gradient_accumulation_steps=1,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=int(args.warmup_ratio * steps),
        weight_decay=0.0,
        max_grad_norm=1.0,
        seed=args.seed,
        data_seed=args.seed,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        activation_checkpointing=False,
        max_length=args.max_length,
        beta=args.beta,
        loss_type=["sigmoid"],
        disable_dropout=True,
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=args.ref_batch_size // 2,
        model_init_kwargs={"dtype": torch.float32},
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=NEVER,
        report_to="none",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        disable_tqdm=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(prepared["policy_path"])
    # Timed from TRL's constructor on: its reference pass runs there, and rlhfkit's is timed too.
    measured, trainer = timed(partial(built_and_trained, prepared["policy_path"], config, rows, tokenizer))

    # TRL cuts long sequences and drops rows whose prompt fills max_length without a word: none may be touched.
    got = trainer.train_dataset
    assert len(got) == len(ids_c), f"TRL kept {len(got)} of {len(ids_c)} pairs after preprocessing"
    mismatched = sum(
        p + c != ec or p + r != er or len(p + c) > args.max_length or len(p + r) > args.max_length
        for p, c, r, ec, er in zip(got["prompt_ids"], got["chosen_ids"], got["rejected_ids"], ids_c, ids_r)
    )
    assert mismatched == 0, (
        f"{mismatched} of {len(ids_c)} TRL rows are tokenised differently from rlhfkit's texts, or too long"
    )
    assert trainer.ref_model is None, "TRL held a second model"
    assert not trainer.model.is_activation_checkpointing, "TRL trained with gradient checkpointing on"
    trainer.save_model(str(work / "trl" / "model"))
    return measured | {
        "sequences_per_step": 2 * pairs_per_step,
        "pairs": len(ids_c),
        "model_dir": str(work / "trl" / "model"),
    }


def built_and_trained(policy_path: str, config, rows: dict[str, list[str]], tokenizer):
    """TRL's DPOTrainer built (tokenisation, the reference pass) and trained: TRL's timed call."""
    from datasets import Dataset
    from trl import DPOTrainer

    trainer = DPOTrainer(
        model=policy_path, args=config, train_dataset=Dataset.from_dict(rows), processing_class=tokenizer
    )
    trainer.train()
    return trainer


def evaluate_saved(model_dir: Path, reference: str, eval_path: Path, args: Args) -> dict[str, Any]:
    """Held-out implicit-reward metrics of a saved policy: the same code for both sides."""
    from rlhfkit.data.collate import EncodedPreferences
    from rlhfkit.data.readers import read_preferences
    from rlhfkit.models.implicit_reward import ImplicitReward
    from rlhfkit.models.policy import load_policy
    from rlhfkit.rm.evaluate import evaluate

    policy, tokenizer = load_policy(str(model_dir))
    scorer = ImplicitReward(
        policy, load_policy(reference)[0], tokenizer, beta=args.beta, chat=False, max_length=args.max_length
    )
    data = EncodedPreferences.build(read_preferences(eval_path), scorer.encode, args.max_length, what=str(eval_path))
    assert data.n_truncated == 0, f"{data.n_truncated} held-out texts were cut: the pre-truncation did not fit"
    metrics, scores = evaluate(scorer, data, scorer.pad, batch_size=args.eval_batch_size)
    out = {
        k: metrics[k]
        for k in ("pairwise_accuracy", "list_exact_accuracy", "kendall_tau", "n_lists", "n_pairs", "margin_mean")
    }
    out.update(per_list_counts(data, scores, out["pairwise_accuracy"]))
    return out


def run_side(args: Args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    result = run_ours(args, work) if args.side == "ours" else run_trl(args, work)
    prepared = json.loads((work / "prepared.json").read_text())
    expected_steps = steps_per_run(prepared["train_lists"], args.batch_size, args.epochs)
    if result["steps"] != expected_steps:
        raise SystemExit(f"{args.side}: {result['steps']} optimizer steps, expected {expected_steps}")
    result["lists_per_s"] = prepared["train_lists"] * args.epochs / result["loop_s"]
    result["eval"] = evaluate_saved(Path(result["model_dir"]), prepared["policy_path"], work / "eval.jsonl", args)
    result["torch_threads"] = torch.get_num_threads()
    (work / f"{args.side}.json").write_text(json.dumps(result, indent=2))
    return 0


# --------------------------------------------------------------------------------------
# The parent: prepare the data once, run both sides, report
# --------------------------------------------------------------------------------------


def prepare_data(args: Args, work: Path) -> dict[str, Any]:
    """Pre-truncated train and held-out lists as ranked JSONL (prompt + newline), and rlhfkit's token ids."""
    from rlhfkit.data.examples import policy_encoder
    from rlhfkit.data.readers import read_preferences
    from rlhfkit.data.types import PreferenceExample
    from rlhfkit.models.hub import resolve_model
    from rlhfkit.models.policy import load_policy

    examples = read_preferences(args.data, prompt_column=True)
    if args.eval_start + args.n_eval > len(examples):
        raise SystemExit(
            f"{args.data} has {len(examples)} lists; --eval-start {args.eval_start} + --n-eval {args.n_eval} needs more"
        )
    train, held_out = examples[: args.n_train], examples[args.eval_start : args.eval_start + args.n_eval]
    ks = {ex.k for ex in train}
    if len(ks) != 1 or any(ex.has_ties for ex in train):
        raise SystemExit(
            f"{args.data}: the benchmark needs strict lists of one size K (found K in {sorted(ks)}), so that a step "
            "of B lists is exactly B * C(K,2) pairs for TRL"
        )
    policy_path = resolve_model(args.policy)  # converts a GGUF alias once, outside the timings
    _, tok = load_policy(policy_path)
    encode = policy_encoder(tok, False, args.max_length)
    n_cut = 0

    def cut(part: list[PreferenceExample]) -> list[PreferenceExample]:
        nonlocal n_cut
        out = []
        for ex in part:
            prompt = ex.prompt + "\n"
            budget = args.max_length - len(tok(prompt)["input_ids"]) - 1  # room for the response before EOS
            texts = tuple(truncate_text(tok, t, budget) for t in ex.responses)
            n_cut += sum(a != b for a, b in zip(texts, ex.responses))
            if len(set(texts)) != len(texts):
                raise SystemExit(
                    f"{ex.source}: two responses are equal after truncation to {args.max_length} tokens; raise --max-length"
                )
            out.append(PreferenceExample(prompt=prompt, responses=texts, ranks=ex.ranks, source=ex.source))
        return out

    train, held_out = cut(train), cut(held_out)
    for name, part in (("train", train), ("eval", held_out)):
        (work / f"{name}.jsonl").write_text(
            "".join(json.dumps({"prompt": ex.prompt, "responses": list(ex.responses)}) + "\n" for ex in part)
        )
    token_ids = []
    for ex in train:
        row = []
        for t in ex.responses:
            feats, _, was_cut = encode(ex.prompt, t)
            assert not was_cut and len(feats["input_ids"]) <= args.max_length
            row.append(feats["input_ids"])
        token_ids.append(row)
    (work / "train_token_ids.json").write_text(json.dumps(token_ids))
    k = ks.pop()
    prepared = {
        "policy_path": str(policy_path),
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
    memory_ok = ours["peak_rss_mib"] <= trl["peak_rss_mib"]
    if ratio < 3:
        verdict = f"NOT met: {ratio:.2f}x"
    elif not memory_ok:
        verdict = f"NOT met: {ratio:.2f}x but more peak memory than TRL"
    elif diff >= 0 or hi >= 0:
        verdict = f"met: {ratio:.2f}x, pairwise accuracy {diff:+.4f} (95% CI [{lo:+.3f}, {hi:+.3f}])"
    else:
        verdict = f"NOT met: {ratio:.2f}x but pairwise accuracy {diff:+.4f} (95% CI excludes 0)"
    ex_lo, ex_hi = ci["list_exact_accuracy"]
    table = [
        (
            "lists/s (reference pass + training loop)",
            f"{ours['lists_per_s']:.2f}",
            f"{trl['lists_per_s']:.2f}",
            f"**{ratio:.2f}x**",
        ),
        ("loop (s)", f"{ours['loop_s']:.1f}", f"{trl['loop_s']:.1f}", f"{trl['loop_s'] / ours['loop_s']:.2f}x less"),
        ("sequences per step", f"{ours['sequences_per_step']}", f"{trl['sequences_per_step']}", ""),
        (
            "peak RSS, load + train (MiB)",
            f"{ours['peak_rss_mib']:.0f}",
            f"{trl['peak_rss_mib']:.0f}",
            f"{ours['peak_rss_mib'] / trl['peak_rss_mib']:.2f}",
        ),
        (
            "held-out implicit-reward pairwise accuracy",
            f"{oe['pairwise_accuracy']:.4f}",
            f"{te['pairwise_accuracy']:.4f}",
            f"{diff:+.4f} [{lo:+.3f}, {hi:+.3f}]",
        ),
        (
            "held-out list-exact accuracy",
            f"{oe['list_exact_accuracy']:.4f}",
            f"{te['list_exact_accuracy']:.4f}",
            f"{oe['list_exact_accuracy'] - te['list_exact_accuracy']:+.4f} [{ex_lo:+.3f}, {ex_hi:+.3f}]",
        ),
        ("whole call (s): train_dpo / DPOTrainer(...) + train()", f"{ours['call_s']:.1f}", f"{trl['call_s']:.1f}", ""),
    ]
    return "\n".join(
        [
            f"DPO, {args.policy}: {data['train_lists']} lists of K={data['k']} ({data['train_pairs']} pairs for TRL), {args.epochs} epoch(s), "
            f"{ours['steps']} steps of {args.batch_size} lists, beta {args.beta:g}, lr {args.lr:g}, max length {args.max_length} "
            f"({data['texts_pre_truncated']} of {data['texts_total']} texts pre-truncated), held-out {data['eval_lists']} lists.",
            f"CPU: {env['cpu']}{' ' + str(env['isa_caps']) if env['isa_caps'] else ''}, {env['cpus']} cores, torch threads {ours['torch_threads']}, load average at start {env['loadavg']}; torch "
            f"{env['versions']['torch']}, transformers {env['versions']['transformers']}, trl {env['versions']['trl']}. Order: {args.order}. "
            f"rlhfkit's --cpu-matmul: {args.ours_cpu_matmul}.",
            "",
            "| | rlhfkit | TRL DPOTrainer | ours vs TRL |",
            "| --- | ---: | ---: | ---: |",
            *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in table],
            "",
            *runs_line(args, ours, trl),
            interval_caption(args),
            f"Target (>= 3x TRL's lists/s, equal or better held-out accuracy, no more peak memory): {verdict}.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    return compare(
        __file__,
        argv,
        Args,
        run_side=run_side,
        prepare=prepare_data,
        report=report,
        labels={"ours": "rlhfkit", "trl": "TRL DPOTrainer"},
        install=INSTALL,
    )


if __name__ == "__main__":
    sys.exit(main())

"""rlhfkit's PPO against TRL's ``PPOTrainer`` (``trl.experimental.ppo``), same setting, one run.

    .venv-bench/bin/python benchmarks/ppo_vs_trl.py                  # defaults below, ~8 min on 2 cores
    .venv-bench/bin/python benchmarks/ppo_vs_trl.py --policy PATH --steps 2 --max-new-tokens 8   # smoke run

One invocation runs both sides one after the other, each in its own subprocess (the script
re-invokes itself with ``--side ours|trl``), then prints seconds per PPO update, episodes per
second, each side's peak RSS and the ratios, and writes ``benchmarks/results/ppo_vs_trl.json``.
TRL is not an rlhfkit dependency: it lives in ``.venv-bench`` (see ``INSTALL`` below).

What both sides share:

- Models, fp32, no gradient checkpointing, dropout off: the policy ``--policy`` (default the
  embedded SmolLM2-135M-Instruct) and a frozen copy as the reference; one reward model folder
  that also initialises the critic (InstructGPT; rlhfkit ``--critic reward-model``, TRL's
  ``value_model``). Without ``--reward`` the parent writes an untrained reward model on the
  policy's backbone with a seeded head: its scores mean nothing, but the computation is the
  real one. TRL feeds the policy's token ids to the reward model, so it must share the
  policy's tokenizer; rlhfkit decodes and re-encodes the text (its design), which it pays for.
- Prompts: the first ``--n-prompts`` lines of ``--prompts``, rendered with the policy's chat
  template and tokenised once by rlhfkit; TRL receives exactly those token ids.
- One update = a rollout of ``--batch-size`` prompts, sampling at temperature 1 (top-k and
  top-p off) up to ``--max-new-tokens`` and stopping at EOS, then ``--ppo-epochs`` epochs of
  one optimizer step each over the whole batch in ``--grad-accum`` micro-batches (TRL:
  ``per_device_train_batch_size = batch / accum``, ``num_mini_batches = 1``).
- Same objective settings: k1 KL in the reward with ``--kl-coef``, clip 0.2, value clip 0.2,
  ``vf_coef`` 0.1, gamma 1, lambda 0.95, whitened advantages, AdamW with the same learning rate
  and a linear schedule, no gradient clipping (TRL's PPO has none), no entropy bonus.
- No checkpoints, evaluation, sample printing, progress bars or TensorBoard during the loop.

What differs, and the runs that show how much each difference is worth:

- Matmul kernels. rlhfkit's default on the CPU (``--cpu-matmul auto``) runs its fp32 Linear
  layers through oneDNN; TRL uses PyTorch's default (MKL). Same fp32 arithmetic, and on this
  AMD CPU oneDNN is ~2.2x faster (``rlhfkit.models.cpu_linear``). The run
  ``reward-model:torch`` is rlhfkit with PyTorch's default matmuls, as TRL has them; with
  ``--trl-cpu-matmul onednn`` TRL's four models get rlhfkit's oneDNN Linear instead (not a
  TRL setting: for comparison only).
- Trainer work. With a separate critic rlhfkit runs the actor's forward and backward, then
  the critic's (TRL: one forward through both, one backward of the summed loss): same
  gradients, only one network's activations alive at a time. rlhfkit computes LM-head
  logits for the response positions only; TRL takes the rollout log-probs from ``generate``
  while rlhfkit recomputes them in one batched forward.

What is timed: from the first ``nn.Module`` forward (the first generate call) to the end of
the last ``optimizer.step()``, by global PyTorch hooks, identically on both sides; model
loading and saving are outside. "Seconds per update" leaves out the first update (one-time
lazy imports and allocations on both sides) when there are at least two. Peak RSS is the
child process's ``VmHWM`` at the last optimizer step (loading and the loop, not the saving
after it). CPU seconds (the process's own user + system time) are reported beside wall
seconds: on a shared machine the wall clock also measures the neighbours. The torch thread count is ``--threads`` on
both sides (1 by default: on a small shared machine more threads oversubscribe the cores).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: find bench_common
from bench_common import INSTALL, LoopClock, begin, run_child, set_threads  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PROMPTS = REPO / "examples" / "review_prompts.txt"
DEFAULT_OUTPUT = REPO / "benchmarks" / "results" / "ppo_vs_trl.json"


FALLBACK_PROMPTS = [
    "What do you think of the suitcase?",
    "Review the blender you bought last month.",
    "How was the hotel?",
    "Write a short review of the film.",
    "What did you like about the restaurant?",
    "Describe the bike light.",
    "Review the headphones.",
    "How was the service at the cafe?",
]

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class Args:
    """Benchmark rlhfkit's PPO against TRL's PPOTrainer on the same models, prompts and settings."""

    policy: str = field(
        default="smollm2-135m", metadata={"help": "policy (and reference) for both sides: alias or folder"}
    )
    reward: str | None = field(
        default=None,
        metadata={"help": "reward-model folder on the policy's tokenizer (default: an untrained one, written here)"},
    )
    prompts: str = field(default=str(DEFAULT_PROMPTS), metadata={"help": "prompt file, one per line"})
    n_prompts: int = field(default=64, metadata={"help": "use the first N prompts"})
    steps: int = field(default=4, metadata={"help": "PPO updates"})
    batch_size: int = field(default=8, metadata={"help": "prompts per rollout"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    ppo_epochs: int = field(default=2, metadata={"help": "optimizer steps per update (one per epoch over the batch)"})
    max_new_tokens: int = field(default=24, metadata={"help": "response length limit"})
    lr: float = field(default=1e-6, metadata={"help": "learning rate, actor and critic, both sides"})
    kl_coef: float = field(default=0.05, metadata={"help": "KL coefficient (k1 estimator), both sides"})
    ours_runs: list[str] = field(
        default_factory=lambda: ["reward-model", "reward-model:torch", "value-head"],
        metadata={
            "help": "rlhfkit runs, each CRITIC[:CPU_MATMUL]: critic reward-model (like TRL's value model) or value-head (rlhfkit's shared-backbone head); cpu_matmul auto (rlhfkit's default, oneDNN on the CPU) or torch (PyTorch's default BLAS, as TRL)"
        },
    )
    trl_cpu_matmul: Literal["torch", "onednn"] = field(
        default="torch",
        metadata={
            "help": "TRL's matmuls: torch (its own, the default) or onednn (rlhfkit's oneDNN Linear swapped into TRL's four models, to separate kernel from trainer)"
        },
    )
    threads: int = field(default=1, metadata={"help": "torch threads on both sides"})
    seed: int = field(default=42, metadata={"help": "seed for both sides"})
    order: str = field(default="ours,trl", metadata={"help": "which side runs first: ours,trl or trl,ours"})
    output: str = field(default=str(DEFAULT_OUTPUT), metadata={"help": "JSON result file"})
    work_dir: str | None = field(
        default=None, metadata={"help": "keep models, prompts and logs here (default: a temporary folder)"}
    )
    side: Literal["ours", "trl"] | None = field(
        default=None, metadata={"help": "internal: run one side in this process"}
    )
    run: str = field(default="reward-model", metadata={"help": "internal: the CRITIC[:CPU_MATMUL] of this rlhfkit run"})

    def __post_init__(self):
        from rlhfkit.config import ConfigError

        for name in ("n_prompts", "steps", "batch_size", "grad_accum", "ppo_epochs", "max_new_tokens", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"option '{name}' must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"--grad-accum {self.grad_accum} must divide --batch-size {self.batch_size}")
        if sorted(self.order.split(",")) != ["ours", "trl"]:
            raise ConfigError(f"option 'order' got {self.order!r}; use ours,trl or trl,ours")
        bad = [r for r in self.ours_runs if r not in LABELS]
        if bad or not self.ours_runs:
            raise ConfigError(f"option 'ours_runs' got {self.ours_runs}; use any of {', '.join(LABELS)}")


# --------------------------------------------------------------------------------------
# The two sides (each in its own subprocess)
# --------------------------------------------------------------------------------------


def run_ours(args: Args, work: Path) -> dict[str, Any]:
    from rlhfkit.rl.trainer import PPOConfig, train_ppo
    from rlhfkit.tracking import read_metrics

    never = 10**9
    critic, _, cpu_matmul = args.run.partition(":")
    name = run_name("ours", args.run)
    shutil.rmtree(work / name, ignore_errors=True)  # a kept --work-dir from an earlier run
    cfg = PPOConfig(
        policy=args.policy,
        reward=str(work / "rm"),
        prompts=str(work / "prompts.txt"),
        output=str(work / name),
        critic=critic,
        cpu_matmul=cpu_matmul or "auto",
        chat_template=True,
        max_steps=args.steps,
        batch_size=args.batch_size,
        mini_batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        ppo_epochs=args.ppo_epochs,
        max_new_tokens=args.max_new_tokens,
        max_prompt_length=10**6,
        temperature=1.0,
        kl_coef=args.kl_coef,
        kl_estimator="k1",
        clip_eps=0.2,
        vf_clip=0.2,
        vf_coef=0.1,
        entropy_coef=0.0,
        gamma=1.0,
        lam=0.95,
        whiten_advantages=True,
        lr=args.lr,
        critic_lr=args.lr,
        scheduler="linear",
        max_grad_norm=0.0,
        seed=args.seed,
        threads=args.threads,
        mixed_precision="no",
        cpu=True,
        report_to="none",
        progress=False,
        sample_every=0,
        save_every=never,
    )
    clock = LoopClock()
    clock.install()
    train_ppo(cfg)
    clock.remove()
    rows = read_metrics(work / name / "metrics.jsonl")
    # A separate critic has its own optimizer: each minibatch is two optimizer.step() calls (actor, then critic).
    steps_per_update = args.ppo_epochs * (2 if critic == "reward-model" else 1)
    return {
        **clock.summary(steps_per_update),
        "response_length": sum(r["rl/response_length"] for r in rows) / len(rows),
        "score_mean": [r["rl/score_mean"] for r in rows],
        "kl": [r["rl/kl"] for r in rows],
    }


def run_trl(args: Args, work: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from rlhfkit.models.hub import resolve_model
    from rlhfkit.models.tokenizers import ensure_distinct_pad

    query_ids = json.loads((work / "query_ids.json").read_text())  # rlhfkit's own prompt encoding
    path = resolve_model(args.policy)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"  # TRL generates from its collator's batches
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ensure_distinct_pad(tokenizer, policy)
    value_model = AutoModelForSequenceClassification.from_pretrained(work / "rm", num_labels=1, dtype=torch.float32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(work / "rm", num_labels=1, dtype=torch.float32)
    dataset = Dataset.from_dict({"input_ids": query_ids})
    config = PPOConfig(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=args.batch_size // args.grad_accum,
        gradient_accumulation_steps=args.grad_accum,
        num_mini_batches=1,
        num_ppo_epochs=args.ppo_epochs,
        total_episodes=args.steps * args.batch_size,
        local_rollout_forward_batch_size=args.batch_size,
        response_length=args.max_new_tokens,
        stop_token="eos",
        temperature=1.0,
        kl_coef=args.kl_coef,
        kl_estimator="k1",
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=0.1,
        gamma=1.0,
        lam=0.95,
        whiten_rewards=False,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        num_sample_generations=0,
        seed=args.seed,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        logging_steps=10**9,
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=True,
    )
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=None,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=dataset,
        eval_dataset=dataset,
    )
    if args.trl_cpu_matmul == "onednn":  # not TRL's own: rlhfkit's kernel in TRL's models, for comparison only
        from rlhfkit.models.cpu_linear import use_onednn_linear

        for m in (trainer.model, trainer.ref_model, trainer.reward_model):
            use_onednn_linear(m)
    lengths: list[float] = []
    real_generate = trainer.model.policy.generate if hasattr(trainer.model, "policy") else None

    def counting_generate(*a, **kw):  # mean response length, comparable with rlhfkit's (EOS included)
        out = real_generate(*a, **kw)
        seqs = out.sequences if hasattr(out, "sequences") else out
        resp = seqs[:, kw["input_ids"].shape[1] :] if "input_ids" in kw else seqs
        is_eos = resp == tokenizer.eos_token_id
        n = resp.shape[1]
        first = torch.where(
            is_eos.any(1), is_eos.long().argmax(1) + 1, torch.full_like(is_eos[:, 0], n, dtype=torch.long)
        )
        lengths.append(first.float().mean().item())
        return out

    if real_generate is not None:
        trainer.model.policy.generate = counting_generate
    clock = LoopClock()
    clock.install()
    trainer.train()
    clock.remove()
    return {**clock.summary(args.ppo_epochs), "response_length": sum(lengths) / len(lengths) if lengths else None}


def run_side(args: Args) -> int:
    import torch

    set_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    work = Path(args.work_dir)
    result = run_ours(args, work) if args.side == "ours" else run_trl(args, work)
    name = run_name(args.side, args.run)
    if result["updates"] != args.steps:
        raise SystemExit(f"{args.side}: {result['updates']} updates, expected {args.steps}")
    result["episodes_per_s"] = args.batch_size / result["s_per_update"]
    result["episodes_per_cpu_s"] = args.batch_size / result["cpu_s_per_update"]
    result["episodes_per_s_incl_first"] = args.batch_size * args.steps / result["loop_s"]
    result["torch_threads"] = torch.get_num_threads()
    (work / f"{name}.json").write_text(json.dumps(result, indent=2))
    return 0


# --------------------------------------------------------------------------------------
# The parent: prepare models and prompts once, run both sides, report
# --------------------------------------------------------------------------------------


def prepare(args: Args, work: Path) -> dict[str, Any]:
    """Prompts (text and rlhfkit's token ids) and the reward-model folder both sides read."""
    import torch
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from rlhfkit.data.prompts import Prompt
    from rlhfkit.models.hub import resolve_model
    from rlhfkit.models.reward import RewardModel
    from rlhfkit.models.tokenizers import ensure_distinct_pad
    from rlhfkit.sampling import encode_queries, render_prompt

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    src = Path(args.prompts)
    lines = (
        [line for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
        if src.is_file()
        else FALLBACK_PROMPTS
    )
    lines = lines[: args.n_prompts]
    if len(lines) < args.batch_size:
        raise SystemExit(f"{len(lines)} prompts cannot fill a batch of {args.batch_size}")
    (work / "prompts.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")

    path = resolve_model(args.policy)  # converts a GGUF alias to the cache once, outside the timings
    tok = AutoTokenizer.from_pretrained(path)
    ensure_distinct_pad(tok)
    texts = [render_prompt(tok, Prompt(line), chat=True) for line in lines]
    ids, mask = encode_queries(tok, texts, 10**6, chat=True)
    query_ids = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    (work / "query_ids.json").write_text(json.dumps(query_ids))

    if args.reward:
        shutil.copytree(args.reward, work / "rm")
    else:
        torch.manual_seed(args.seed)
        RewardModel.from_pretrained(path).save_pretrained(work / "rm")
    rm = RewardModel.from_pretrained(work / "rm")
    if rm.tokenizer.get_vocab() != tok.get_vocab():
        raise SystemExit(
            f"--reward {args.reward}: TRL feeds the policy's token ids to the reward model, so it must share the policy's tokenizer"
        )
    return {
        "prompts": len(lines),
        "prompt_source": str(src) if src.is_file() else "built-in",
        "mean_prompt_tokens": sum(map(len, query_ids)) / len(query_ids),
        "reward": args.reward or "untrained (seeded head)",
    }


def run_name(side: str, run: str | None) -> str:
    return f"ours-{run.replace(':', '-')}" if side == "ours" else "trl"


LABELS = {
    "reward-model": "rlhfkit, critic from the RM",
    "reward-model:torch": "rlhfkit, critic from the RM, --cpu-matmul torch",
    "value-head": "rlhfkit, value head",
    "value-head:torch": "rlhfkit, value head, --cpu-matmul torch",
    "reward-model:auto": "rlhfkit, critic from the RM",
    "value-head:auto": "rlhfkit, value head",
}


TRL_LABEL = {"torch": "TRL PPOTrainer", "onednn": "TRL PPOTrainer + rlhfkit's oneDNN Linear"}


def report(
    args: Args, data: dict[str, Any], ours: dict[str, dict[str, Any]], trl: dict[str, Any], env: dict[str, Any]
) -> str:
    """A markdown table: one column per rlhfkit run, TRL, and each run's ratio to TRL."""
    runs = list(ours.items())  # [(run, result)]
    length = lambda r: f"{r['response_length']:.1f}" if r.get("response_length") is not None else "?"  # noqa: E731
    metrics = [
        (
            "seconds per update (after the first)",
            lambda r: f"{r['s_per_update']:.2f}",
            lambda r: f"{trl['s_per_update'] / r['s_per_update']:.2f}x less",
        ),
        (
            "episodes/s",
            lambda r: f"{r['episodes_per_s']:.3f}",
            lambda r: f"**{r['episodes_per_s'] / trl['episodes_per_s']:.2f}x**",
        ),
        (
            "CPU seconds per update (after the first)",
            lambda r: f"{r['cpu_s_per_update']:.2f}",
            lambda r: f"{trl['cpu_s_per_update'] / r['cpu_s_per_update']:.2f}x less",
        ),
        (
            "episodes per CPU second",
            lambda r: f"{r['episodes_per_cpu_s']:.3f}",
            lambda r: f"**{r['episodes_per_cpu_s'] / trl['episodes_per_cpu_s']:.2f}x**",
        ),
        (
            "episodes/s incl. the first update",
            lambda r: f"{r['episodes_per_s_incl_first']:.3f}",
            lambda r: f"{r['episodes_per_s_incl_first'] / trl['episodes_per_s_incl_first']:.2f}x",
        ),
        (
            "peak RSS, load + loop (MiB)",
            lambda r: f"{r['peak_rss_mib']:.0f}",
            lambda r: f"{r['peak_rss_mib'] / trl['peak_rss_mib']:.2f}",
        ),
        ("mean response length (tokens)", length, lambda r: ""),
        ("optimizer steps", lambda r: f"{r['optimizer_steps']}", lambda r: ""),
    ]
    head = [LABELS[c] for c, _ in runs] + [TRL_LABEL[args.trl_cpu_matmul]] + [f"{LABELS[c]} vs TRL" for c, _ in runs]
    lines = [
        f"PPO, policy {args.policy}, reward model {data['reward']} (also the critic's init where the critic is a separate model): "
        f"{args.steps} updates of {args.batch_size} prompts ({data['prompts']} prompts, {data['mean_prompt_tokens']:.0f} tokens on "
        f"average with the chat template), up to {args.max_new_tokens} new tokens, {args.ppo_epochs} PPO epochs of one optimizer "
        f"step ({args.grad_accum} micro-batch(es)), lr {args.lr:g}, kl_coef {args.kl_coef:g}, fp32.",
        f"CPU: {env['cpu']}{' ' + str(env['isa_caps']) if env['isa_caps'] else ''}, {env['cpus']} cores, torch threads {trl['torch_threads']}, load average at start {env['loadavg']}; "
        f"torch {env['versions']['torch']}, transformers {env['versions']['transformers']}, trl {env['versions']['trl']}. "
        f"Order: {args.order}.",
        "",
        "| | " + " | ".join(head) + " |",
        "| --- |" + " ---: |" * len(head),
    ]
    for name, value, ratio in metrics:
        lines.append(
            f"| {name} | " + " | ".join([value(r) for _, r in runs] + [value(trl)] + [ratio(r) for _, r in runs]) + " |"
        )
    lines.append("")
    for critic, r in runs:
        wall = r["episodes_per_s"] / trl["episodes_per_s"]
        cpu = r["episodes_per_cpu_s"] / trl["episodes_per_cpu_s"]
        # With the same matmul kernel as TRL (':torch') the gain can only be less work: >= 1.3x at <= 0.8x memory;
        # otherwise the original target, >= 1.5x at no more memory.
        speed, memory = (1.3, 0.8) if critic.endswith(":torch") and args.trl_cpu_matmul == "torch" else (1.5, 1.0)
        mem_ok = r["peak_rss_mib"] <= memory * trl["peak_rss_mib"]
        verdict = lambda x, speed=speed, mem_ok=mem_ok: "met" if x >= speed and mem_ok else "NOT met"  # noqa: E731
        lines.append(
            f"Target (>= {speed}x TRL's episodes/s at <= {memory}x its peak memory), {LABELS[critic]}: "
            f"{verdict(wall)} on wall time ({wall:.2f}x), {verdict(cpu)} on CPU time ({cpu:.2f}x); memory {r['peak_rss_mib'] / trl['peak_rss_mib']:.2f}x."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from rlhfkit.config import parse_args

    args = parse_args(Args, argv, prog="ppo_vs_trl.py")
    if args.side:
        return run_side(args)
    started = begin(args, "ppo_vs_trl", INSTALL)
    if started is None:
        return 2
    work, keep, env = started

    t0 = time.perf_counter()
    print(f"preparing prompts and the reward model in {work} ...", flush=True)
    data = prepare(args, work)
    ours: dict[str, dict[str, Any]] = {}
    trl: dict[str, Any] = {}
    runs = [("ours", c) for c in args.ours_runs] + [("trl", None)]
    if args.order.startswith("trl"):
        runs = runs[-1:] + runs[:-1]
    for i, (side, critic) in enumerate(runs, 1):
        name = LABELS[critic] if side == "ours" else TRL_LABEL[args.trl_cpu_matmul]
        print(f"[{i}/{len(runs)}] {name}: {args.steps} PPO updates (log in {work}) ...", flush=True)
        r = run_child(__file__, work, run_name(side, critic), ["--side", side] + (["--run", critic] if critic else []))
        if side == "ours":
            ours[critic] = r
        else:
            trl = r
        print(
            f"      {r['s_per_update']:.2f} s/update, {r['episodes_per_s']:.3f} episodes/s, peak RSS {r['peak_rss_mib']:.0f} MiB",
            flush=True,
        )

    table = report(args, data, ours, trl, env)
    print()
    print(table)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": " ".join(
            [Path(sys.executable).name, "benchmarks/ppo_vs_trl.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "args": {k: v for k, v in vars(args).items() if k not in ("side", "work_dir", "run")},
        "data": data,
        "env": env,
        "ours": ours,
        "trl": trl,
        "episodes_per_s_ratio": {c: r["episodes_per_s"] / trl["episodes_per_s"] for c, r in ours.items()},
        "peak_rss_ratio": {c: r["peak_rss_mib"] / trl["peak_rss_mib"] for c, r in ours.items()},
        "total_s": time.perf_counter() - t0,
        "table_markdown": table,
    }
    out.write_text(json.dumps(record, indent=2))
    print(f"\nwrote {out}")
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

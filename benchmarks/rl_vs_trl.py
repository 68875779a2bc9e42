"""rlhfkit's critic-free online RL (GRPO, RLOO) against TRL's ``GRPOTrainer`` and ``RLOOTrainer``.

    .venv-bench/bin/python benchmarks/rl_vs_trl.py          # defaults below: 5 runs
    .venv-bench/bin/python benchmarks/rl_vs_trl.py --steps 2 --batch-size 2 --n-prompts 2 --max-new-tokens 4   # smoke run

One invocation runs every row of ``--runs`` one after the other, each in its own subprocess
(the script re-invokes itself with ``--side ours|trl --run RUN``), prints a markdown table
(seconds per update, episodes per second, each rlhfkit row's ratio to the TRL run of the same
algorithm, peak RSS and its ratio, the matmul kernel, each side's mean score per update) and
writes ``benchmarks/results/rl_vs_trl.json``. TRL is not an rlhfkit dependency: it lives in
``.venv-bench`` (``benchmarks/README.md``).

Rows (``--runs``; each rlhfkit row is compared with the TRL row of its algorithm):

- ``ours-grpo``: rlhfkit ``--algo grpo`` with its default ``--cpu-matmul auto`` (the faster of
  oneDNN and PyTorch's default, measured once per machine; the row names the one it took);
- ``ours-grpo:torch``: the same with PyTorch's default matmuls, the kernel TRL runs: the
  like-for-like row;
- ``trl-grpo``: TRL ``GRPOTrainer``;
- ``ours-rloo:torch``, ``trl-rloo``: the same for RLOO.

One update, both sides: a rollout of ``B = --batch-size`` prompts, each sampled ``K =
--samples-per-prompt`` times with Hugging Face ``generate`` (``M = B * K`` responses, up to
``--max-new-tokens`` each, stopping at EOS), scored by one reward function, then
``--ppo-epochs`` passes over the ``M`` responses in minibatches of ``m = --mini-batch-size``
responses, one optimizer step each, split into ``a = --grad-accum`` micro-batches.

How the settings map (rlhfkit ``RLConfig`` <-> TRL ``GRPOConfig`` / ``RLOOConfig``, TRL 1.12):

====================================  =================================================
rlhfkit                               TRL
====================================  =================================================
``samples_per_prompt = K``            ``num_generations = K``
``batch_size = B`` (prompts)          ``generation_batch_size = B * K`` (completions), via
                                      ``steps_per_generation = B * K * a / m``
``mini_batch_size = m`` (responses)   ``per_device_train_batch_size = m / a``
``grad_accum = a``                    ``gradient_accumulation_steps = a``
``ppo_epochs``                        ``num_iterations``
``steps`` (updates)                   ``max_steps = steps * ppo_epochs * B * K / m``
                                      (TRL counts optimizer steps)
``max_new_tokens``                    ``max_completion_length``
``temperature 1, top_k 0, top_p 1``   ``temperature 1, top_k 0, top_p 1`` (``min_p`` None)
``kl_coef`` (beta)                    ``beta``
``clip_eps 0.2``                      ``epsilon 0.2`` (``epsilon_high`` = ``epsilon``)
``lr``, ``scheduler``, warm-up 0      ``learning_rate``, ``lr_scheduler_type``, ``warmup_steps 0``
AdamW (fused), weight decay 0         ``optim="adamw_torch_fused"``, ``weight_decay 0``
``max_grad_norm``                     ``max_grad_norm``
``mixed_precision no``, ``cpu``       ``bf16 False``, ``fp16 False``, ``use_cpu True``
no gradient checkpointing             ``activation_checkpointing False`` (transformers 5's name for
                                      ``gradient_checkpointing``, which TRL defaults to True)
no dropout (``model.eval()``)         ``disable_dropout True`` (SmolLM2 has none anyway)
``seed``                              ``seed``
GRPO: ``--kl-penalty loss`` (k3 in    GRPO: ``beta > 0`` adds k3 to the per-token loss;
the loss, its default)                ``use_bias_correction_kl False`` (TRL's default True
                                      multiplies the k3 term by the ratio; rlhfkit does not)
GRPO: ``loss_aggregation sequence``   GRPO: ``loss_type="grpo"`` (mean over sequences of each
                                      one's token mean); ``token``: ``"bnpo"`` when ``a = 1``
                                      (token mean of the minibatch, exact), else ``"dapo"``
                                      (exact when ``m = B * K``). Not ``"dr_grpo"``: it divides
                                      by ``max_completion_length``, not by the tokens
GRPO: ``scale_rewards`` (group std,   GRPO: ``scale_rewards="group"`` (``"none"`` with
+1e-4)                                ``--no-scale-rewards``); TRL's default ``"dapo"`` loss
                                      is not used
RLOO: ``--kl-penalty reward``, k1     RLOO: ``beta`` times the summed k1 KL subtracted from
(its default): score - beta * sum KL  the reward; ``normalize_advantages False``
====================================  =================================================

The learning-rate schedule: rlhfkit steps it once per update, TRL once per optimizer step,
so ``--scheduler linear`` is the same on both sides only when an update is one optimizer step
(``m = B * K``, ``ppo_epochs 1``: the default); ``constant`` (the default) is the same always.

What both sides share:

- The policy ``--policy`` (default SmolLM2-135M-Instruct, rlhfkit's ``smollm2-135m``): TRL gets
  the folder :func:`rlhfkit.models.hub.resolve_model` converted it to, and loads policy and
  reference with ``dtype=float32``; rlhfkit loads the same folder (reference: a frozen copy).
- Prompts: the first ``--n-prompts`` distinct lines of ``--prompts``, rendered with the
  policy's chat template by rlhfkit (:func:`rlhfkit.sampling.render_prompt`). TRL receives
  exactly those strings as plain-text prompts (so it applies no template of its own) and
  tokenises them with ``processing_class(text=...)``; the TRL child asserts that this gives,
  prompt for prompt, the token ids rlhfkit's :func:`~rlhfkit.sampling.encode_queries` gives.
  With ``--n-prompts`` equal to ``--batch-size`` (the default) every update samples every
  prompt on both sides, so the two see the same prompts in every update (in another order).
- The reward: one function of ``benchmarks/rl_rewards.py`` (``--reward-fn``), passed to rlhfkit
  as ``--reward benchmarks/rl_rewards.py:NAME`` and to TRL as a reward function. Both hand it
  the response decoded without special tokens.
- Stopping: both stop a response at the tokenizer's EOS (SmolLM2: ``<|im_end|>``; rlhfkit also
  stops at any other EOS id of the generation config: none here) and count EOS as a response
  token; pad is ``<|endoftext|>`` on both sides.
- Threads: ``--threads`` PyTorch threads per side (``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` set
  for the child too), default 1.
- Generation with Hugging Face ``generate`` on both sides: TRL without vLLM, continuous
  batching or Liger kernels (``use_liger_kernel`` is Triton, i.e. GPU, code; off).
- No checkpoints, evaluation, sample printing, progress bars or TensorBoard during the loop;
  TRL logs once (``logging_steps`` past the end), rlhfkit writes its per-update metrics line.

What differs, and cannot be made equal:

- Rollout log-probs. rlhfkit records the sampled tokens' log-probs while ``generate`` samples
  (``--rollout-logprobs sampling``, its default); TRL GRPO needs none on-policy (one optimizer
  step per rollout) and otherwise runs a forward pass for them; TRL RLOO always runs that
  forward pass. ``--ours-rollout-logprobs forward`` gives rlhfkit the extra pass too.
- Packed rows. rlhfkit's scoring and training passes run on packed rows (``--packing``): no
  pad tokens, and the K samples of a prompt share that prompt, computed once. TRL pads.
- The RLOO objective. TRL's ``RLOOTrainer`` clips a sequence-level ratio and averages the
  per-sequence losses (the log-probs summed over each response); rlhfkit's RLOO uses the
  per-token clipped surrogate averaged over tokens. Same advantages, same passes over the
  data, different gradient scale (TRL's is about the response length times larger).
- Matmul kernel: named per row. TRL runs PyTorch's default; rlhfkit's default (``auto``) may
  take oneDNN; the ``:torch`` rows use PyTorch's default like TRL.
- Sampling randomness and prompt order differ (each library's own RNG use), so responses,
  lengths and scores differ run to run; the table shows the mean response length per row.

What is timed: from the first ``nn.Module`` forward (the first ``generate``) to the end of the
last ``optimizer.step()``, by global PyTorch hooks, identically on both sides
(:class:`bench_common.LoopClock`); loading, trainer construction, saving and exporting are
outside. "Seconds per update" leaves the first update out when there are at least two.
Peak RSS is the child process's ``VmHWM`` at the last optimizer step (loading plus the loop).
CPU seconds (the process's user + system time) are reported beside wall seconds: on a busy
machine the wall clock also measures the neighbours.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: find bench_common, rl_rewards
from bench_common import INSTALL, LoopClock, begin, run_child, set_threads, thread_env  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PROMPTS = REPO / "examples" / "review_prompts.txt"
DEFAULT_OUTPUT = REPO / "benchmarks" / "results" / "rl_vs_trl.json"
REWARDS_FILE = Path(__file__).resolve().parent / "rl_rewards.py"


ALGOS = ("grpo", "rloo")
KERNELS = ("auto", "onednn", "torch")
DEFAULT_RUNS = ["ours-grpo", "ours-grpo:torch", "trl-grpo", "ours-rloo:torch", "trl-rloo"]

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class Args:
    """Benchmark rlhfkit's GRPO and RLOO against TRL's GRPOTrainer and RLOOTrainer on the same policy, prompts and settings."""

    policy: str = field(
        default="smollm2-135m", metadata={"help": "policy (and reference) for both sides: alias or folder"}
    )
    prompts: str = field(default=str(DEFAULT_PROMPTS), metadata={"help": "prompt file, one per line"})
    n_prompts: int = field(
        default=8,
        metadata={
            "help": "use the first N distinct prompts (= --batch-size: every update sees all of them on both sides)"
        },
    )
    reward_fn: Literal["lowercase_share", "positive_words"] = field(
        default="lowercase_share", metadata={"help": "the reward, a function in benchmarks/rl_rewards.py"}
    )
    runs: list[str] = field(
        default_factory=lambda: list(DEFAULT_RUNS),
        metadata={
            "help": "rows, in this order: ours-ALGO[:KERNEL] (KERNEL auto, onednn or torch: rlhfkit's --cpu-matmul) or trl-ALGO, ALGO grpo or rloo"
        },
    )
    steps: int = field(
        default=4,
        metadata={"help": "updates (rollout + optimisation); the first is left out of the per-update figures"},
    )
    batch_size: int = field(default=8, metadata={"help": "prompts per rollout"})
    samples_per_prompt: int = field(default=4, metadata={"help": "K, responses per prompt (the group)"})
    mini_batch_size: int | None = field(
        default=None, metadata={"help": "responses per optimizer step (default: the whole rollout, batch_size x K)"}
    )
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    ppo_epochs: int = field(default=1, metadata={"help": "passes over each rollout (TRL: num_iterations)"})
    max_new_tokens: int = field(default=24, metadata={"help": "response length limit (TRL: max_completion_length)"})
    lr: float = field(default=1e-5, metadata={"help": "learning rate, both sides"})
    scheduler: Literal["constant", "linear"] = field(
        default="constant",
        metadata={
            "help": "learning-rate schedule, both sides (linear matches only with one optimizer step per update)"
        },
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient-norm clipping, both sides (0 = off)"})
    kl_coef: float = field(
        default=0.05,
        metadata={"help": "KL coefficient beta, both sides (GRPO: k3 in the loss; RLOO: k1 in the reward)"},
    )
    loss_aggregation: Literal["sequence", "token"] = field(
        default="sequence",
        metadata={"help": "GRPO loss aggregation: sequence (TRL loss_type grpo) or token (TRL bnpo/dapo)"},
    )
    scale_rewards: bool = field(
        default=True,
        metadata={"help": "GRPO: divide group-centred scores by the group std (TRL scale_rewards group/none)"},
    )
    ours_rollout_logprobs: Literal["sampling", "forward"] = field(
        default="sampling",
        metadata={
            "help": "rlhfkit's --rollout-logprobs: from the sampling pass (its default) or a forward pass (as TRL RLOO)"
        },
    )
    ours_packing: bool = field(default=True, metadata={"help": "rlhfkit's --packing (its default: on)"})
    threads: int = field(default=1, metadata={"help": "torch threads per side"})
    seed: int = field(default=42, metadata={"help": "seed for both sides"})
    output: str = field(default=str(DEFAULT_OUTPUT), metadata={"help": "JSON result file"})
    work_dir: str | None = field(
        default=None, metadata={"help": "keep prompts, run folders and logs here (default: a temporary folder)"}
    )
    side: Literal["ours", "trl"] | None = field(
        default=None, metadata={"help": "internal: run one side in this process"}
    )
    run: str | None = field(default=None, metadata={"help": "internal: the row this process runs"})

    def __post_init__(self):
        from rlhfkit.config import ConfigError

        for name in ("n_prompts", "steps", "batch_size", "grad_accum", "ppo_epochs", "max_new_tokens", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"option '{name}' must be >= 1, got {getattr(self, name)}")
        if self.samples_per_prompt < 2:
            raise ConfigError(
                f"option 'samples_per_prompt' must be >= 2 (GRPO and RLOO compare a prompt's samples), got {self.samples_per_prompt}"
            )
        rows = self.batch_size * self.samples_per_prompt
        if self.mini_batch_size is None:
            self.mini_batch_size = rows
        if self.mini_batch_size < 1 or rows % self.mini_batch_size:
            raise ConfigError(
                f"--mini-batch-size {self.mini_batch_size} must divide the rollout's {rows} responses (--batch-size x --samples-per-prompt)"
            )
        if self.mini_batch_size % self.grad_accum:
            raise ConfigError(f"--grad-accum {self.grad_accum} must divide --mini-batch-size {self.mini_batch_size}")
        if self.n_prompts < self.batch_size:
            raise ConfigError(
                f"--n-prompts {self.n_prompts} cannot fill a rollout of --batch-size {self.batch_size} prompts"
            )
        bad = [r for r in self.runs if parse_run(r) is None]
        if bad or not self.runs or len(set(self.runs)) != len(self.runs):
            raise ConfigError(
                f"option 'runs' got {self.runs}; give distinct rows ours-ALGO[:KERNEL] or trl-ALGO "
                f"(ALGO in {', '.join(ALGOS)}, KERNEL in {', '.join(KERNELS)}), e.g. {','.join(DEFAULT_RUNS)}"
            )
        missing = sorted({f"trl-{parse_run(r)[1]}" for r in self.runs if r.startswith("ours-")} - set(self.runs))
        if missing:
            raise ConfigError(
                f"option 'runs': add {', '.join(missing)}: each rlhfkit row is compared with the TRL row of its algorithm"
            )

    @property
    def responses_per_update(self) -> int:
        return self.batch_size * self.samples_per_prompt

    @property
    def steps_per_update(self) -> int:
        """Optimizer steps per update, both sides."""
        return self.ppo_epochs * self.responses_per_update // self.mini_batch_size


def parse_run(run: str) -> tuple[str, str, str] | None:
    """``ours-grpo:torch`` -> ``("ours", "grpo", "torch")``; ``trl-rloo`` -> ``("trl", "rloo", "torch")``; else None."""
    name, _, kernel = run.partition(":")
    side, _, algo = name.partition("-")
    if side not in ("ours", "trl") or algo not in ALGOS:
        return None
    if side == "trl":
        return None if kernel else (side, algo, "torch")
    kernel = kernel or "auto"
    return (side, algo, kernel) if kernel in KERNELS else None


def run_label(run: str) -> str:
    side, algo, kernel = parse_run(run)
    if side == "trl":
        return f"TRL {'GRPOTrainer' if algo == 'grpo' else 'RLOOTrainer'}"
    return f"rlhfkit {algo.upper()}" + ("" if kernel == "auto" else f", --cpu-matmul {kernel}")


def kernel_name(kernel: str) -> str:
    """What a ``torch``/``onednn`` fp32 Linear runs on this machine, in words."""
    import torch

    if kernel == "onednn":
        return "oneDNN (rlhfkit OneDNNLinear)"
    return f"PyTorch default ({'MKL' if torch.backends.mkl.is_available() else 'BLAS'} sgemm)"


def trl_loss_type(args: Args) -> str:
    """TRL GRPO's ``loss_type`` that reduces the loss as rlhfkit's ``--loss-aggregation`` does (module docstring)."""
    if args.loss_aggregation == "sequence":
        return "grpo"
    return "bnpo" if args.grad_accum == 1 else "dapo"


# --------------------------------------------------------------------------------------
# The two sides (each in its own subprocess)
# --------------------------------------------------------------------------------------


def run_ours(args: Args, work: Path, algo: str, kernel: str) -> dict[str, Any]:
    import rlhfkit.rl.trainer as rl_trainer
    from rlhfkit.rl.trainer import RLConfig, train_rl
    from rlhfkit.tracking import read_metrics

    never = 10**9
    name = run_dir(args.run)
    shutil.rmtree(work / name, ignore_errors=True)  # a kept --work-dir from an earlier run
    cfg = RLConfig(
        algo=algo,
        policy=args.policy,
        reward=f"{REWARDS_FILE}:{args.reward_fn}",
        prompts=str(work / "prompts.txt"),
        output=str(work / name),
        chat_template=True,
        samples_per_prompt=args.samples_per_prompt,
        max_steps=args.steps,
        batch_size=args.batch_size,
        mini_batch_size=args.mini_batch_size,
        grad_accum=args.grad_accum,
        ppo_epochs=args.ppo_epochs,
        max_new_tokens=args.max_new_tokens,
        max_prompt_length=10**6,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        kl_coef=args.kl_coef,
        kl_estimator="k1",
        clip_eps=0.2,
        entropy_coef=0.0,
        loss_aggregation=args.loss_aggregation if algo == "grpo" else None,
        scale_rewards=args.scale_rewards,
        lr=args.lr,
        scheduler=args.scheduler,
        warmup_ratio=0.0,
        weight_decay=0.0,
        max_grad_norm=args.max_grad_norm,
        packing=args.ours_packing,
        rollout_logprobs=args.ours_rollout_logprobs,
        cpu_matmul=kernel,
        threads=args.threads,
        seed=args.seed,
        mixed_precision="no",
        cpu=True,
        report_to="none",
        progress=False,
        sample_every=0,
        save_every=never,
        log_every=1,
    )
    # Record which kernel --cpu-matmul picked (auto measures): wrap the trainer's call, change nothing.
    decisions = []
    real_apply = rl_trainer.apply_cpu_matmul

    def recording_apply(choice, device, *models):
        decision = real_apply(choice, device, *models)
        decisions.append(decision.kernel if decision is not None else "torch")
        return decision

    rl_trainer.apply_cpu_matmul = recording_apply
    clock = LoopClock()
    clock.install()
    try:
        train_rl(cfg)
    finally:
        clock.remove()
        rl_trainer.apply_cpu_matmul = real_apply
    rows = read_metrics(work / name / "metrics.jsonl")
    return {
        **clock.summary(args.steps_per_update),
        "kernel": decisions[0] if decisions else "torch",
        "score_mean": [r["rl/score_mean"] for r in rows],
        "response_length": [r["rl/response_length"] for r in rows],
        "kl": [r["rl/kl"] for r in rows],
        "settings": {
            "algo": algo,
            "kl_penalty": cfg.kl_penalty,
            "loss_aggregation": cfg.loss_aggregation,
            "packing": cfg.packing,
            "rollout_logprobs": cfg.rollout_logprobs,
            "cpu_matmul": kernel,
        },
    }


def run_trl(args: Args, work: Path, algo: str) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from rl_rewards import REWARDS, for_trl
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from rlhfkit.models.hub import resolve_model

    prompts = json.loads((work / "prompts.json").read_text())  # rlhfkit's rendering and token ids
    path = resolve_model(args.policy)
    tokenizer = AutoTokenizer.from_pretrained(path)
    # TRL tokenises a plain-text prompt with processing_class(text=...): it must give rlhfkit's ids.
    got = tokenizer(text=prompts["texts"])["input_ids"]
    differ = [i for i, (a, b) in enumerate(zip(got, prompts["ids"])) if a != b]
    assert not differ, (
        f"TRL's tokens for prompt {differ[0]} differ from rlhfkit's: {got[differ[0]]} vs {prompts['ids'][differ[0]]}"
    )

    calls: list[dict[str, float]] = []

    def on_call(scores, completion_ids):  # one call per rollout: all B * K completions
        lengths = [len(c) for c in completion_ids]  # tokens up to and including EOS, as rlhfkit counts
        calls.append({"score_mean": sum(scores) / len(scores), "response_length": sum(lengths) / len(lengths)})

    per_device = args.mini_batch_size // args.grad_accum
    common = dict(
        output_dir=str(work / run_dir(args.run)),
        num_generations=args.samples_per_prompt,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=args.grad_accum,
        steps_per_generation=args.responses_per_update // per_device,
        num_iterations=args.ppo_epochs,
        max_steps=args.steps * args.steps_per_update,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        min_p=None,
        repetition_penalty=1.0,
        beta=args.kl_coef,
        epsilon=0.2,
        learning_rate=args.lr,
        lr_scheduler_type=args.scheduler,
        warmup_steps=0,
        weight_decay=0.0,
        optim="adamw_torch_fused",
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        data_seed=args.seed,
        bf16=False,
        fp16=False,
        use_cpu=True,
        activation_checkpointing=False,
        disable_dropout=True,
        use_liger_kernel=False,
        use_vllm=False,
        model_init_kwargs={"dtype": "float32"},
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        logging_strategy="steps",
        logging_steps=10**9,
        log_completions=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
    )
    if algo == "grpo":
        config = GRPOConfig(
            **common,
            loss_type=trl_loss_type(args),
            scale_rewards="group" if args.scale_rewards else "none",
            use_bias_correction_kl=False,
            importance_sampling_level="token",
            mask_truncated_completions=False,
        )
        trainer_cls = GRPOTrainer
    else:
        config = RLOOConfig(**common, normalize_advantages=False, mask_truncated_completions=False)
        trainer_cls = RLOOTrainer
    assert config.generation_batch_size == args.responses_per_update, (
        config.generation_batch_size,
        args.responses_per_update,
    )
    trainer = trainer_cls(
        model=path,
        reward_funcs=for_trl(REWARDS[args.reward_fn], on_call),
        args=config,
        train_dataset=Dataset.from_dict({"prompt": prompts["texts"]}),
        processing_class=tokenizer,
    )
    assert all(m.dtype == torch.float32 for m in (trainer.model, trainer.ref_model) if m is not None), (
        "TRL loaded a model in low precision"
    )
    assert not trainer.model.is_activation_checkpointing, "TRL would train with gradient checkpointing"
    clock = LoopClock()
    clock.install()
    try:
        trainer.train()
    finally:
        clock.remove()
    return {
        **clock.summary(args.steps_per_update),
        "kernel": "torch",
        "score_mean": [c["score_mean"] for c in calls],
        "response_length": [c["response_length"] for c in calls],
        "settings": {
            "algo": algo,
            "loss_type": getattr(config, "loss_type", "rloo (sequence-level)"),
            "per_device_train_batch_size": per_device,
            "gradient_accumulation_steps": args.grad_accum,
            "steps_per_generation": config.steps_per_generation,
            "generation_batch_size": config.generation_batch_size,
            "num_generations": config.num_generations,
            "num_iterations": config.num_iterations,
            "max_steps": config.max_steps,
            "beta": config.beta,
            "optim": str(config.optim),
            "lr_scheduler_type": str(config.lr_scheduler_type),
        },
    }


def run_side(args: Args) -> int:
    import torch

    set_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    work = Path(args.work_dir)
    side, algo, kernel = parse_run(args.run)
    result = run_ours(args, work, algo, kernel) if side == "ours" else run_trl(args, work, algo)
    if result["updates"] != args.steps or len(result["score_mean"]) != args.steps:
        raise SystemExit(
            f"{args.run}: {result['updates']} updates timed and {len(result['score_mean'])} rollouts "
            f"scored, expected {args.steps}"
        )
    m = args.responses_per_update
    result["episodes_per_s"] = m / result["s_per_update"]
    result["episodes_per_cpu_s"] = m / result["cpu_s_per_update"]
    result["episodes_per_s_incl_first"] = m * args.steps / result["loop_s"]
    result["torch_threads"] = torch.get_num_threads()
    (work / f"{run_dir(args.run)}.json").write_text(json.dumps(result, indent=2))
    return 0


# --------------------------------------------------------------------------------------
# The parent: prepare the prompts once, run every row, report
# --------------------------------------------------------------------------------------


def prepare(args: Args, work: Path) -> dict[str, Any]:
    """The prompt lines rlhfkit reads, and their chat-templated text and token ids, which TRL gets."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from rlhfkit.data.prompts import Prompt
    from rlhfkit.models.hub import resolve_model
    from rlhfkit.models.tokenizers import ensure_distinct_pad
    from rlhfkit.sampling import encode_queries, render_prompt

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    src = Path(args.prompts)
    lines = list(dict.fromkeys(line.strip() for line in src.read_text(encoding="utf-8").splitlines() if line.strip()))
    lines = lines[: args.n_prompts]
    if len(lines) < args.batch_size:
        raise SystemExit(f"{src} has {len(lines)} distinct prompts; a rollout needs --batch-size {args.batch_size}")
    (work / "prompts.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")

    path = resolve_model(args.policy)  # converts a GGUF alias to the cache once, outside the timings
    tok = AutoTokenizer.from_pretrained(path)
    ensure_distinct_pad(tok)  # as rlhfkit's loader does (SmolLM2's pad is already distinct: no change)
    texts = [render_prompt(tok, Prompt(line), chat=True) for line in lines]
    ids, mask = encode_queries(tok, texts, 10**6, chat=True)
    query_ids = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    (work / "prompts.json").write_text(json.dumps({"texts": texts, "ids": query_ids}))
    return {
        "prompts": len(lines),
        "prompt_source": str(src),
        "policy_path": str(path),
        "mean_prompt_tokens": sum(map(len, query_ids)) / len(query_ids),
    }


def run_dir(run: str) -> str:
    return run.replace(":", "-")


def report(args: Args, data: dict[str, Any], results: dict[str, dict[str, Any]], env: dict[str, Any]) -> str:
    """A markdown table, one line per row; each rlhfkit row against the TRL row of its algorithm."""
    from rlhfkit.cpu import cpu_model

    def peer(run: str) -> dict[str, Any] | None:
        side, algo, _ = parse_run(run)
        return results[f"trl-{algo}"] if side == "ours" else None

    def ratio(run: str, key: str, invert: bool = False) -> str:
        t = peer(run)
        if t is None:
            return ""
        r = t[key] / results[run][key] if invert else results[run][key] / t[key]
        return f"{r:.2f}x"

    def scores(r: dict[str, Any]) -> str:
        return " ".join(f"{s:.3f}" for s in r["score_mean"])

    trl_threads = next(iter(results.values()))["torch_threads"]
    head = [
        "row",
        "matmul kernel",
        "s/update",
        "episodes/s",
        "vs TRL",
        "CPU s/update",
        "episodes/CPU s",
        "vs TRL",
        "peak RSS (MiB)",
        "vs TRL",
        "response length",
        "optimizer steps",
        "mean score per update",
    ]
    lines = [
        f"{', '.join(sorted({parse_run(r)[1].upper() for r in args.runs}))}, policy {args.policy}, reward "
        f"{args.reward_fn}: {args.steps} updates of {args.batch_size} prompts x K={args.samples_per_prompt} = "
        f"{args.responses_per_update} responses ({data['prompts']} prompts, {data['mean_prompt_tokens']:.0f} tokens on average "
        f"with the chat template), up to {args.max_new_tokens} new tokens, {args.ppo_epochs} epoch(s) of "
        f"{args.responses_per_update // args.mini_batch_size} optimizer step(s) of {args.mini_batch_size} responses "
        f"({args.grad_accum} micro-batch(es)), lr {args.lr:g} {args.scheduler}, beta {args.kl_coef:g}, GRPO loss "
        f"{args.loss_aggregation} (TRL loss_type {trl_loss_type(args)}), fp32.",
        f"CPU: {cpu_model()}, {env['cpus']} cores, torch threads {trl_threads}, load average at start {env['loadavg']}; "
        f"torch {env['versions']['torch']}, transformers {env['versions']['transformers']}, trl {env['versions']['trl']}. "
        f"Order: {', '.join(args.runs)}. First update left out of the per-update figures.",
        "",
        "| " + " | ".join(head) + " |",
        "| --- | --- |" + " ---: |" * (len(head) - 3) + " --- |",
    ]
    for run in args.runs:
        r = results[run]
        lines.append(
            "| "
            + " | ".join(
                [
                    run_label(run),
                    kernel_name(r["kernel"]),
                    f"{r['s_per_update']:.2f}",
                    f"{r['episodes_per_s']:.2f}",
                    ratio(run, "episodes_per_s"),
                    f"{r['cpu_s_per_update']:.2f}",
                    f"{r['episodes_per_cpu_s']:.2f}",
                    ratio(run, "episodes_per_cpu_s"),
                    f"{r['peak_rss_mib']:.0f}",
                    ratio(run, "peak_rss_mib"),
                    f"{sum(r['response_length']) / len(r['response_length']):.1f}",
                    f"{r['optimizer_steps']}",
                    scores(r),
                ]
            )
            + " |"
        )
    lines.append("")
    for run in args.runs:
        t = peer(run)
        if t is None:
            continue
        r = results[run]
        wall, cpu = r["episodes_per_s"] / t["episodes_per_s"], r["episodes_per_cpu_s"] / t["episodes_per_cpu_s"]
        mem = r["peak_rss_mib"] / t["peak_rss_mib"]
        verdict = lambda x, mem=mem: "met" if x >= 1.5 and mem <= 1.0 else "NOT met"  # noqa: E731
        same = (
            " (same kernel as TRL: like for like)"
            if r["kernel"] == t["kernel"]
            else f" (kernel {r['kernel']} vs TRL's torch)"
        )
        lines.append(
            f"Target (>= 1.5x TRL's episodes/s at no more peak memory), {run_label(run)}{same}: "
            f"{verdict(wall)} on wall time ({wall:.2f}x), {verdict(cpu)} on CPU time ({cpu:.2f}x); memory {mem:.2f}x."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from rlhfkit.config import parse_args

    args = parse_args(Args, argv, prog="rl_vs_trl.py")
    if args.side:
        return run_side(args)
    started = begin(args, "rl_vs_trl", INSTALL)
    if started is None:
        return 2
    work, keep, env = started

    t0 = time.perf_counter()
    print(f"preparing prompts in {work} ...", flush=True)
    data = prepare(args, work)
    results: dict[str, dict[str, Any]] = {}
    threads = thread_env(args.threads)
    for i, run in enumerate(args.runs, 1):
        side = parse_run(run)[0]
        print(
            f"[{i}/{len(args.runs)}] {run_label(run)}: {args.steps} updates (log: {work / run_dir(run)}.log) ...",
            flush=True,
        )
        r = run_child(__file__, work, run_dir(run), ["--side", side, "--run", run], env=threads)
        results[run] = r
        print(
            f"      {r['s_per_update']:.2f} s/update, {r['episodes_per_s']:.2f} episodes/s, peak RSS "
            f"{r['peak_rss_mib']:.0f} MiB, kernel {r['kernel']}",
            flush=True,
        )

    table = report(args, data, results, env)
    print()
    print(table)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    from rlhfkit.cpu import cpu_model

    record = {
        "command": " ".join(
            [
                os.path.relpath(sys.executable, REPO),
                "benchmarks/rl_vs_trl.py",
                *(argv if argv is not None else sys.argv[1:]),
            ]
        ),
        "args": {k: v for k, v in vars(args).items() if k not in ("side", "work_dir", "run")},
        "data": data,
        "env": {**env, "cpu_model": cpu_model()},
        "results": results,
        "episodes_per_s_ratio": {
            run: r["episodes_per_s"] / results[f"trl-{parse_run(run)[1]}"]["episodes_per_s"]
            for run, r in results.items()
            if run.startswith("ours-")
        },
        "peak_rss_ratio": {
            run: r["peak_rss_mib"] / results[f"trl-{parse_run(run)[1]}"]["peak_rss_mib"]
            for run, r in results.items()
            if run.startswith("ours-")
        },
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

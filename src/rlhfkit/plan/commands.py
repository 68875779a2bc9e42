"""``rlhfkit plan``: the memory one device needs for a training run, per configuration (ddp,
fsdp2, fsdp2-offload), and which one fits. Nothing is loaded: a folder's ``config.json`` is
read and the model built on the ``meta`` device (:mod:`rlhfkit.memory.shapes`); the math is
:mod:`rlhfkit.memory.estimate`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from typing import Any, Literal

from rlhfkit.config import Options, opt, require
from rlhfkit.defaults import (
    BATCH_SIZE,
    EVAL_BATCH_SIZE,
    LORA_DROPOUT,
    MAX_LENGTH,
    MAX_NEW_TOKENS,
    MAX_PROMPT_LENGTH,
    MINI_BATCH_SIZE,
    RL_LORA_DROPOUT,
    samples_per_prompt,
)
from rlhfkit.errors import UserError
from rlhfkit.memory.estimate import CONFIGS, GIB, RL_ALGOS, Estimate, Setup, estimate
from rlhfkit.memory.fit import largest_micro_batch
from rlhfkit.memory.shapes import ModelShape, resolve_shape
from rlhfkit.plan.lengths import MeasuredLengths, instruction_lengths, preference_lengths, prompt_lengths, summarise

logger = logging.getLogger(__name__)

ALGOS = ("sft", "rm", "dpo", *RL_ALGOS)
ACCELERATE_FILES = {
    "ddp": "examples/accelerate/ddp.yaml",
    "fsdp2": "examples/accelerate/fsdp2.yaml",
    "fsdp2-offload": "examples/accelerate/fsdp2-offload.yaml",
}
SHARDINGS = ("auto", "ddp", "fsdp2", "fsdp2-offload")
RL_ONLY = ("max_new_tokens", "max_prompt_length", "samples_per_prompt", "mini_batch_size", "reward_model")


@dataclass(kw_only=True)
class PlanConfig(Options):
    """Estimate the memory per device of a training run, and which configuration fits."""

    model: str = opt(
        help="the policy (rm: the reward model's backbone): a model folder, a known name (SmolLM2-135M, "
        "Qwen2.5-7B, Llama-3.1-8B, ...) or a size like 135M, 0.5B, 7B"
    )
    algo: Literal[ALGOS] = opt(help="the trainer: sft, rm (rm train), dpo, or rl's ppo, grpo, rloo, reinforce++")  # type: ignore[valid-type]
    gpus: int = opt(1, "processes, one per GPU (with --device cpu: CPU processes)", ge=1)
    sharding: Literal[SHARDINGS] = opt(  # type: ignore[valid-type]
        "auto", "ddp, fsdp2 or fsdp2-offload (examples/accelerate/*.yaml); auto: all three, and the cheapest that fits"
    )
    device: Literal["cuda", "cpu"] = opt(
        "cuda", "cuda: bf16 autocast over fp32 weights; cpu: fp32, plus the process's baseline RAM"
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = opt(
        "auto", "as the trainers' option: auto is bf16 on cuda, fp32 on cpu"
    )
    device_memory_gb: float | None = opt(
        None,
        "memory of one device in GiB (default: 80 for cuda; for cpu this machine's "
        "RAM, shared by the --gpus processes)",
        gt=0,
    )
    lora: bool = opt(
        False, "train LoRA adapters (peft's default modules) instead of all weights; RL then needs no reference copy"
    )
    lora_r: int = opt(16, "LoRA rank", ge=1)
    lora_dropout: float | None = opt(
        None, f"LoRA dropout (default: the trainer's: {RL_LORA_DROPOUT} for rl, {LORA_DROPOUT} otherwise)", ge=0, lt=1
    )
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass (sft, dpo, rl)")
    batch_size: int | None = opt(
        None,
        f"per process: sft rows ({BATCH_SIZE['sft']}), rm/dpo lists ({BATCH_SIZE['rm']}/"
        f"{BATCH_SIZE['dpo']}), rl prompts per rollout ({BATCH_SIZE['rl']})",
        ge=1,
    )
    list_size: int | None = opt(
        None, "rm/dpo: responses per list (default: the longest list of --train, else 2: pairs)", ge=2
    )
    max_length: int | None = opt(
        None, f"sft/rm/dpo: tokens per sequence ({MAX_LENGTH['sft']}/{MAX_LENGTH['rm']}/{MAX_LENGTH['dpo']})", ge=8
    )
    grad_accum: int = opt(1, "micro-batches per optimizer step (rl: splits --mini-batch-size)", ge=1)
    max_prompt_length: int | None = opt(None, f"rl: prompt tokens ({MAX_PROMPT_LENGTH})", ge=1)
    max_new_tokens: int | None = opt(None, f"rl: response tokens ({MAX_NEW_TOKENS})", ge=1)
    samples_per_prompt: int | None = opt(
        None,
        f"rl: responses per prompt ({samples_per_prompt('ppo')} for ppo, {samples_per_prompt('grpo')} otherwise)",
        ge=1,
    )
    mini_batch_size: int | None = opt(None, f"rl: rollout rows per optimizer step ({MINI_BATCH_SIZE})", ge=1)
    reward_model: str | None = opt(
        None, "rl: the reward model (a folder, known name or size; default: a Python reward function, no model)"
    )
    critic: Literal["auto", "value-head", "reward-model"] = opt(
        "auto",
        "ppo: value-head, or a separate critic from the "
        "reward model; auto: reward-model when --reward-model is a decoder",
    )
    frozen_models: Literal["shard", "replicate"] = opt(
        "shard", "rl under fsdp2: the reference and reward model sharded (rl's default) or a full copy per process"
    )
    eval_batch_size: int = opt(
        0,
        "count an evaluation pass of this many sequences (the trainers use sft "
        f"{EVAL_BATCH_SIZE['sft']}, rm {EVAL_BATCH_SIZE['rm']}, dpo {EVAL_BATCH_SIZE['dpo']} "
        "when the run has eval data); 0: none",
        ge=0,
    )
    prompts: str | None = opt(
        None,
        "rl: the run's prompt file: plan with its longest prompt in tokens (rendered and tokenized as rl does, cut "
        "at --max-prompt-length) instead of --max-prompt-length",
    )
    train: str | None = opt(
        None,
        "sft/rm/dpo: the run's training file: plan with its longest sequence in tokens (cut at --max-length) "
        "instead of --max-length, and (rm/dpo) its longest list as --list-size (sft with --packing fills rows to "
        "--max-length: leave --train out)",
    )
    prompt_column: bool = opt(False, "rm/dpo --train: the rank-list TSV's first column is the prompt (as theirs)")
    tokenizer: str | None = opt(
        None, "with --prompts/--train: the model whose tokenizer counts the tokens (default: --model)"
    )
    chat_template: bool | None = opt(
        None,
        "with --prompts/--train: render with the tokenizer's chat template (default: when it has one, as the trainers do)",
    )
    json: bool = opt(False, "print one JSON object instead of the table")

    def validate(self) -> None:
        super().validate()
        rl = self.algo in RL_ALGOS
        if (self.tokenizer is not None or self.chat_template is not None) and (self.train or self.prompts) is None:
            logger.warning("--tokenizer and --chat-template are ignored without --prompts (rl) or --train (rm, dpo)")
        require(
            not (self.device == "cpu" and self.sharding == "fsdp2-offload"),
            "--sharding fsdp2-offload moves sharded state from a GPU to the CPU; with --device cpu there is nothing to "
            "offload to: use ddp or fsdp2",
        )
        if not rl:
            given = [f"--{k.replace('_', '-')}" for k in RL_ONLY if getattr(self, k) is not None]
            if self.critic != "auto":
                given.append("--critic")
            if self.prompts is not None:
                given.append("--prompts")
            if given:
                logger.warning("%s: ignored for --algo %s (options of rl)", ", ".join(given), self.algo)
        else:
            if self.train is not None:
                logger.warning("--train is ignored for --algo %s: give its prompt file as --prompts", self.algo)
            if self.max_length is not None:
                logger.warning(
                    "--max-length is ignored for --algo %s: its rows are --max-prompt-length + --max-new-tokens",
                    self.algo,
                )
            rows = (self.batch_size or BATCH_SIZE["rl"]) * self.k
            mini = self.mini_batch_size or MINI_BATCH_SIZE
            require(
                mini <= rows and rows % mini == 0 and mini % self.grad_accum == 0,
                f"--mini-batch-size {mini} must divide the rollout's {rows} rows (--batch-size x --samples-per-prompt) "
                f"and be a multiple of --grad-accum {self.grad_accum}, as rlhfkit rl requires",
            )
            if self.algo != "ppo" and self.critic != "auto":
                logger.warning("--critic is ignored: --algo %s builds no critic", self.algo)
            require(
                not (self.algo == "ppo" and self.critic == "reward-model" and self.reward_model is None),
                "--critic reward-model starts the critic from the reward model: give --reward-model too",
            )

    @property
    def k(self) -> int:
        return self.samples_per_prompt or samples_per_prompt(self.algo)


def _memory_total_gib() -> float:
    """This machine's RAM (MemTotal), in GiB."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / GIB


def measure_lengths(cfg: PlanConfig, policy: ModelShape) -> MeasuredLengths | None:
    """The token lengths of ``--prompts`` (rl) or ``--train`` (sft, rm, dpo), or None without a file:
    tokenized with ``--tokenizer`` (default ``--model``), which must be a model folder or an alias."""
    rl = cfg.algo in RL_ALGOS
    path = cfg.prompts if rl else cfg.train
    if path is None:
        return None
    option = "--prompts" if rl else "--train"
    from rlhfkit.models.tokenizers import use_chat_template

    tokenizer = _load_tokenizer(cfg.tokenizer or cfg.model, option, "--tokenizer" if cfg.tokenizer else "--model")
    chat = use_chat_template(tokenizer, cfg.chat_template, cfg.tokenizer or cfg.model)
    if rl:
        limit = cfg.max_prompt_length or MAX_PROMPT_LENGTH
        return summarise(prompt_lengths(tokenizer, path, chat), limit, option=option, path=path, what="prompts")
    limit = cfg.max_length or MAX_LENGTH.get(cfg.algo, MAX_LENGTH["sft"])
    if cfg.algo == "sft":
        try:
            lengths = instruction_lengths(tokenizer, path, chat)
        except (UserError, ValueError) as e:
            raise UserError(f"{option}: {e}") from None
        return summarise(lengths, limit, option=option, path=path, what="sequences")
    try:
        lengths, list_size = preference_lengths(
            tokenizer, path, chat, encoder=policy.kind == "encoder", prompt_column=cfg.prompt_column
        )
    except UserError as e:
        raise UserError(f"{option}: {e}") from None
    return summarise(lengths, limit, option=option, path=path, what="sequences", list_size=list_size)


def _load_tokenizer(name: str, option: str, source: str) -> Any:
    """The tokenizer of a model folder or alias (or a hub id in the local cache)."""
    from transformers import AutoTokenizer

    from rlhfkit.models.hub import resolve_model

    try:
        return AutoTokenizer.from_pretrained(resolve_model(name, source))
    except (UserError, OSError, ValueError):
        raise UserError(
            f"{option} needs a tokenizer to count tokens, and {source} {name} gives none (a size or a published name "
            "gives plan a shape only; a hub id needs its files in the local cache); pass --tokenizer with a model "
            "folder or alias (e.g. smollm2-135m) whose tokenizer the run uses"
        ) from None


def make_setup(cfg: PlanConfig, reward: ModelShape | None, lengths: MeasuredLengths | None = None) -> Setup:
    """The trainer's settings, with its defaults where an option was not given, and the measured
    longest prompt (rl) or sequence (sft/rm/dpo) in place of the maximum when ``lengths`` is given."""
    rl = cfg.algo in RL_ALGOS
    bf16 = cfg.device == "cuda" and cfg.mixed_precision != "no"
    critic = "none"
    if cfg.algo == "ppo":
        critic = (
            cfg.critic
            if cfg.critic != "auto"
            else ("reward-model" if reward is not None and reward.kind == "decoder" else "value-head")
        )
    return Setup(
        algo=cfg.algo,
        gpus=cfg.gpus,
        device=cfg.device,
        bf16=bf16,
        lora=cfg.lora,
        lora_r=cfg.lora_r,
        lora_dropout=cfg.lora_dropout if cfg.lora_dropout is not None else (RL_LORA_DROPOUT if rl else LORA_DROPOUT),
        gradient_checkpointing=cfg.gradient_checkpointing,
        batch_size=cfg.batch_size or BATCH_SIZE["rl" if rl else cfg.algo],
        list_size=cfg.list_size or (lengths.list_size if lengths and lengths.list_size else 2),
        max_length=(lengths.longest if lengths and not rl else None)
        or cfg.max_length
        or MAX_LENGTH.get(cfg.algo, MAX_LENGTH["sft"]),
        prompt_length=(lengths.longest if lengths and rl else None) or cfg.max_prompt_length or MAX_PROMPT_LENGTH,
        new_tokens=cfg.max_new_tokens or MAX_NEW_TOKENS,
        samples_per_prompt=cfg.k,
        mini_batch_size=cfg.mini_batch_size or MINI_BATCH_SIZE,
        grad_accum=cfg.grad_accum,
        eval_batch_size=cfg.eval_batch_size,
        critic=critic,
        frozen_models=cfg.frozen_models,
    )


def _fits(e: Estimate, setup: Setup, memory_gib: float) -> bool:
    """CUDA: one device each; CPU: the processes share the machine's RAM."""
    need = e.peak * (setup.gpus if setup.device == "cpu" else 1)
    return need <= memory_gib * GIB


def _configs(setup: Setup, sharding: str) -> list[str]:
    names = [c for c in CONFIGS if not (setup.device == "cpu" and c == "fsdp2-offload")]
    return names if sharding == "auto" else [sharding]


def _gib(x: float) -> float:
    return round(x / GIB, 4)


def _summary(e: Estimate, setup: Setup, memory_gib: float) -> dict[str, Any]:
    return {
        "per_device_gb": _gib(sum(e.breakdown.values())),
        "peak_phase": e.peak_phase,
        "fits": _fits(e, setup, memory_gib),
        "host_gb": _gib(e.host),
        "breakdown": {k: _gib(v) for k, v in e.breakdown.items()},
        "phases": {name: _gib(total) for name, total in e.totals.items()},
    }


def _changes(
    cfg: PlanConfig, setup: Setup, policy: ModelShape, reward: ModelShape | None, memory_gib: float
) -> list[str]:
    """When nothing fits: which single change would make some configuration fit."""
    tries = []
    if not setup.lora:
        tries.append(("--lora", replace(setup, lora=True)))
    if not setup.gradient_checkpointing and setup.algo != "rm":
        tries.append(("--gradient-checkpointing", replace(setup, gradient_checkpointing=True)))
    if setup.rl:
        if setup.mini_batch_size // setup.grad_accum > 1:
            tries.append((f"--grad-accum {setup.grad_accum * 2}", replace(setup, grad_accum=setup.grad_accum * 2)))
        if setup.batch_size > 1:
            tries.append(
                (
                    f"--batch-size {setup.batch_size // 2}",
                    replace(
                        setup,
                        batch_size=setup.batch_size // 2,
                        mini_batch_size=min(setup.mini_batch_size, setup.batch_size // 2 * setup.samples_per_prompt),
                    ),
                )
            )
    elif setup.batch_size > 1:
        tries.append(
            (
                f"--batch-size {setup.batch_size // 2} --grad-accum {setup.grad_accum * 2}",
                replace(setup, batch_size=setup.batch_size // 2, grad_accum=setup.grad_accum * 2),
            )
        )
    tries.append((f"--gpus {setup.gpus * 2}", replace(setup, gpus=setup.gpus * 2)))
    found = []
    for flag, changed in tries:
        for config in _configs(changed, cfg.sharding):
            e = estimate(changed, policy, config, reward)
            if _fits(e, changed, memory_gib):
                found.append(f"{flag} ({config}: {e.peak / GIB:.2f} GiB)")
                break
    return found


def run_plan(cfg: PlanConfig) -> dict[str, Any]:
    """The plan as one JSON-ready object (``per_device_gb``: the chosen, or recommended, configuration's total)."""
    policy = resolve_shape(cfg.model, "--model")
    if policy.kind == "encoder" and cfg.algo != "rm":
        logger.warning(
            "--model %s is an encoder (BERT-shaped): it cannot be a policy, which writes text token by token, so --algo %s "
            "cannot train it. The estimate below is for a model of its size; plan --algo rm to train it as a reward "
            "model, or give a decoder (a causal LM) as the policy",
            cfg.model,
            cfg.algo,
        )
    reward = resolve_shape(cfg.reward_model, "--reward-model") if cfg.reward_model and cfg.algo in RL_ALGOS else None
    require(
        not cfg.lora or policy.lora_params > 0,
        f"--lora: peft has no default LoRA modules for {policy.name}; plan "
        "without --lora, or give a model folder of a supported architecture",
    )
    lengths = measure_lengths(cfg, policy)
    setup = make_setup(cfg, reward, lengths)
    memory_gib = cfg.device_memory_gb or (80.0 if cfg.device == "cuda" else _memory_total_gib())
    estimates = {c: estimate(setup, policy, c, reward) for c in _configs(setup, cfg.sharding)}
    summaries = {c: _summary(e, setup, memory_gib) for c, e in estimates.items()}
    fitting = [c for c in estimates if summaries[c]["fits"]]
    recommended = fitting[0] if fitting else None
    chosen = (
        cfg.sharding if cfg.sharding != "auto" else (recommended or min(estimates, key=lambda c: estimates[c].peak))
    )
    notes = list(dict.fromkeys(n for e in estimates.values() for n in e.notes))
    if policy.approx:
        notes.insert(0, f"--model {cfg.model}: {policy.source}; the estimate is an approximation")
    if setup.gpus == 1 and "ddp" in estimates:
        notes.append("ddp with 1 process: a plain single process (no DDP buckets)")
    if not setup.rl and not setup.eval_batch_size:
        notes.append("no evaluation pass counted (--eval-batch-size N counts one)")
    result = {
        "model": {
            "name": policy.name,
            "params": policy.params,
            "hidden": policy.hidden,
            "layers": policy.layers,
            "heads": policy.heads,
            "kv_heads": policy.kv_heads,
            "intermediate": policy.intermediate,
            "vocab": policy.vocab,
            "tied_embeddings": policy.tied,
            "source": policy.source,
            "approximate": policy.approx,
        },
        "reward_model": None
        if reward is None
        else {"name": reward.name, "params": reward.params, "approximate": reward.approx},
        "algo": cfg.algo,
        "gpus": setup.gpus,
        "device": setup.device,
        "precision": "bf16 autocast" if setup.bf16 else "fp32",
        "settings": {k: v for k, v in setup.__dict__.items() if k not in ("algo", "gpus", "device", "bf16")},
        "lengths": None if lengths is None else {**lengths.__dict__, "used": lengths.longest},
        "device_memory_gb": memory_gib,
        "config": chosen,
        **summaries[chosen],
        "configs": summaries,
        "recommended": recommended,
        "accelerate_config": ACCELERATE_FILES.get(chosen),
        "notes": notes,
    }
    if recommended is None:
        result["changes_that_fit"] = _changes(cfg, setup, policy, reward, memory_gib)
    if setup.rl:  # what rl --micro-batch-size auto would take with this much memory: the first configuration it fits
        for config in [recommended] if recommended else list(estimates):
            fit = largest_micro_batch(setup, policy, config, memory_gib * GIB, reward)
            if fit.fits:
                result["micro_batch"] = {"config": config, "rows": fit.rows, "grad_accum": fit.grad_accum}
                break
    return result


ROW_NAMES = {
    "weights": "weights (trained, fp32)",
    "gradients": "gradients",
    "optimizer": "AdamW state",
    "ddp_buckets": "DDP gradient buckets",
    "autocast_copies": "bf16 weight copies",
    "gathered": "FSDP2 gathered",
    "frozen_models": "frozen models",
    "activations": "activations",
    "logits": "logits",
    "kv_cache": "KV cache",
    "runtime": "runtime (process/context)",
}


def format_plan(result: dict[str, Any]) -> str:
    """The table: components at each configuration's peak phase, the phases' totals, fits or not."""
    m, s = result["model"], result["settings"]
    what = f"{m['params'] / 1e6:,.1f}M parameters" if m["params"] < 1e9 else f"{m['params'] / 1e9:,.2f}B parameters"
    if result["algo"] in RL_ALGOS:
        batch = (
            f"{s['batch_size']} prompts x {s['samples_per_prompt']} samples, {s['prompt_length']} + {s['new_tokens']} "
            f"tokens; update micro-batch {s['mini_batch_size'] // s['grad_accum']} rows"
        )
    elif result["algo"] == "sft":
        batch = f"{s['batch_size']} rows x {s['max_length']} tokens"
    else:
        batch = f"{s['batch_size']} lists x {s['list_size']} responses x {s['max_length']} tokens"
    lines = [
        f"rlhfkit plan: {result['algo']} on {m['name']} ({what}{', approximate shape' if m['approximate'] else ''}), "
        f"{result['gpus']} x {result['device']}, {result['precision']}, "
        f"{'LoRA r=' + str(s['lora_r']) if s['lora'] else 'full fine-tuning'}",
        f"per process: {batch}",
        "lengths: "
        + (
            MeasuredLengths(**{k: v for k, v in result["lengths"].items() if k != "used"}).describe()
            if result.get("lengths")
            else "every sequence at its maximum (--prompts/--train FILE: the run's real lengths)"
        ),
        "",
    ]
    configs = result["configs"]
    width = 2 + max(10, *(len(c) for c in configs))
    lines.append(f"{'GiB per device':28s}" + "".join(f"{c:>{width}s}" for c in configs))
    for key, label in ROW_NAMES.items():
        values = [configs[c]["breakdown"][key] for c in configs]
        if any(values):
            lines.append(f"{label:28s}" + "".join(f"{v:>{width}.2f}" for v in values))
    phases = list(next(iter(configs.values()))["phases"])
    lines.append("-" * (28 + width * len(configs)))
    for phase in phases:
        lines.append(f"{phase + ' phase':28s}" + "".join(f"{configs[c]['phases'][phase]:>{width}.2f}" for c in configs))
    lines.append(
        f"{'peak phase (shown above)':28s}" + "".join(f"{configs[c]['peak_phase']:>{width}s}" for c in configs)
    )
    lines.append(f"{'total per device':28s}" + "".join(f"{configs[c]['per_device_gb']:>{width}.2f}" for c in configs))
    if any(configs[c]["host_gb"] for c in configs):
        lines.append(
            f"{'+ CPU RAM per process':28s}" + "".join(f"{configs[c]['host_gb']:>{width}.2f}" for c in configs)
        )
    room = f"{result['device_memory_gb']:.0f} GiB" + (
        f" / {result['gpus']} processes" if result["device"] == "cpu" else ""
    )
    lines.append(
        f"{'fits in ' + room:28s}" + "".join(f"{'yes' if configs[c]['fits'] else 'no':>{width}s}" for c in configs)
    )
    lines.append(
        "(each column at its peak phase; backward: the start of the backward pass, all activations and logits "
        "alive; step: the optimizer step, all gradients)"
    )
    lines.append("")
    if result["recommended"]:
        lines.append(
            f"-> {result['recommended']} fits: accelerate launch --config_file {ACCELERATE_FILES[result['recommended']]} "
            f"--num_processes {result['gpus']} -m rlhfkit.cli ..."
        )
    else:
        changes = result.get("changes_that_fit") or []
        lines.append(
            "-> nothing fits"
            + (
                ": " + "; ".join(changes) + " would"
                if changes
                else "; try --lora, --gradient-checkpointing, a smaller batch or more GPUs"
            )
        )
    mb = result.get("micro_batch")
    if mb:
        now = s["mini_batch_size"] // s["grad_accum"]
        lines.append(
            f"-> update micro-batch under {mb['config']}: the largest that fits is {mb['rows']} rows (planned above: "
            f"{now}); --micro-batch-size {mb['rows']}, or rl --micro-batch-size auto to choose it from the device's "
            "free memory"
        )
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def print_plan(result: dict[str, Any], as_json: bool) -> None:
    print(json.dumps(result, indent=2) if as_json else format_plan(result))

"""``rl --micro-batch-size auto``: the largest micro-batch that fits the device's free memory.

Once the run's models are loaded, the budget is what the device has free plus what those models
already hold (their parameters), times :data:`MARGIN` for what the estimate does not count. The
run's setup as ``rlhfkit plan`` would build it (the policy's and reward model's shapes, the
critic, LoRA, the rollout's shape, the longest prompt of ``--prompts`` in tokens, the precision
and the sharding) goes to :func:`rlhfkit.memory.fit.largest_micro_batch`. The free memory comes
from accelerate's ``get_max_memory`` (a GPU's free memory, or the machine's available RAM), the
same call on every device.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from rlhfkit.errors import UserError
from rlhfkit.memory.estimate import GIB, Setup
from rlhfkit.memory.fit import MicroBatchChoice, largest_micro_batch
from rlhfkit.memory.shapes import resolve_shape
from rlhfkit.sampling import render_prompt

logger = logging.getLogger(__name__)

MARGIN = 0.9  # of the budget: allocator fragmentation, buffers and temporaries the estimate does not count
PLANNED_CRITICS = ("value-head", "reward-model")


def free_bytes(device: torch.device) -> float:
    """Free memory of ``device`` in bytes (accelerate's ``get_max_memory``: a GPU's free memory,
    the machine's available RAM for the CPU)."""
    from accelerate.utils import get_max_memory

    free = get_max_memory()
    key: Any = "cpu" if device.type == "cpu" else (device.index or 0)
    if key not in free:
        raise UserError(f"--micro-batch-size auto: cannot read the free memory of {device}; give --micro-batch-size N")
    return float(free[key])


def held_bytes(*modules: Any) -> float:
    """Bytes of the parameters and buffers of ``modules`` (None and non-modules skipped), each tensor once."""
    seen, total = set(), 0
    for m in modules:
        if not isinstance(m, torch.nn.Module):
            continue
        for t in (*m.parameters(), *m.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return float(total)


def longest_prompt(tokenizer: Any, prompts: list, chat: bool, limit: int) -> int:
    """Tokens of the longest prompt as the rollout encodes it, cut at ``--max-prompt-length``."""
    return min(
        limit,
        max(
            len(tokenizer(render_prompt(tokenizer, p, chat), add_special_tokens=not chat)["input_ids"]) for p in prompts
        ),
    )


def choose(
    cfg: Any,
    run: Any,
    *,
    tokenizer: Any,
    prompts: list,
    chat: bool,
    critic_spec: str,
    reward_folder: str | None,
    models: tuple,
) -> MicroBatchChoice:
    """The micro-batch for ``cfg`` (an :class:`~rlhfkit.rl.trainer.RLConfig` with ``--micro-batch-size
    auto``) on ``run``'s device, with ``models`` (actor, critic, reference, reward model) loaded."""
    if cfg.algo == "ppo" and critic_spec not in PLANNED_CRITICS:
        raise UserError(
            f"--micro-batch-size auto plans the critics {' and '.join(PLANNED_CRITICS)}; with --critic {critic_spec} "
            "give --micro-batch-size N (rows per forward pass)"
        )
    policy = resolve_shape(cfg.policy, "--policy")
    reward = resolve_shape(reward_folder, "--reward") if reward_folder and Path(reward_folder).is_dir() else None
    setup = Setup(
        algo=cfg.algo,
        gpus=run.world,
        device=run.device.type,
        bf16=run.device.type == "cuda" and run.accelerator.mixed_precision == "bf16",
        lora=cfg.lora,
        lora_r=cfg.lora_r,
        lora_dropout=cfg.lora_dropout,
        gradient_checkpointing=cfg.gradient_checkpointing,
        batch_size=cfg.batch_size,
        prompt_length=longest_prompt(tokenizer, prompts, chat, cfg.max_prompt_length),
        new_tokens=cfg.max_new_tokens,
        samples_per_prompt=cfg.samples_per_prompt,
        mini_batch_size=cfg.mini_batch_size,
        critic=critic_spec if cfg.algo == "ppo" else "none",
        frozen_models=cfg.frozen_models,
    )
    # on the CPU every process holds its own copy of the models in the one machine's RAM
    held = held_bytes(*models) * (run.world if run.device.type == "cpu" else 1)
    budget = MARGIN * (free_bytes(run.device) + held)
    choice = largest_micro_batch(setup, policy, "fsdp2" if run.sharded else "ddp", budget, reward)
    if run.world > 1:  # every process must split its minibatch alike: the main process's reading decides
        from accelerate.utils import broadcast_object_list

        choice = broadcast_object_list([choice])[0]
    tried = ", ".join(f"{rows}: {need / GIB:.2f}" for rows, need in choice.tried)
    if choice.fits:
        run.write(
            f"--micro-batch-size auto: {choice.rows} rows (--grad-accum {choice.grad_accum}); plan: peak "
            f"{choice.peak / GIB:.2f} GiB ({choice.peak_phase}) of a {budget / GIB:.2f} GiB budget on {run.device} "
            f"(GiB by rows tried: {tried})"
        )
    else:
        logger.warning(
            "--micro-batch-size auto: even 1 row per micro-batch needs %.2f GiB (%s) by the plan, more than the %.2f GiB "
            "budget on %s; running with 1 row. If it runs out of memory: --lora, --gradient-checkpointing, a smaller "
            "--batch-size or --max-new-tokens (rlhfkit plan shows each one's effect)",
            choice.peak / GIB,
            choice.peak_phase,
            budget / GIB,
            run.device,
        )
    return choice

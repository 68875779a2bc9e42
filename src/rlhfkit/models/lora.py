"""LoRA adapters (peft) on any model, from the shared ``--lora-*`` options."""

from __future__ import annotations

from typing import Any

from peft import LoraConfig, TaskType, get_peft_model
from torch import nn


def with_lora(model: nn.Module, opts: Any, task: str, modules_to_save: list[str] | None = None) -> nn.Module:
    """``model`` wrapped in LoRA adapters (``opts``: a config with rlhfkit's ``lora_*`` fields,
    :class:`rlhfkit.training.options.LoraOptions`) (``task``: ``CAUSAL_LM`` or ``SEQ_CLS``); only the
    adapters and ``modules_to_save`` train. Saving merges them (``export_pretrained``)."""
    config = LoraConfig(
        task_type=getattr(TaskType, task),
        r=opts.lora_r,
        lora_alpha=opts.lora_alpha,
        lora_dropout=opts.lora_dropout,
        target_modules=opts.lora_target or None,
        modules_to_save=modules_to_save,
    )
    return get_peft_model(model, config)

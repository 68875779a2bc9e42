"""Atomic training checkpoints for ``--resume``.

``save_checkpoint`` writes everything (model, optimizer, registered schedulers and
controllers, every process's RNG) to ``checkpoint.tmp``, then ``trainer_state.json`` (the
step and data position) last, and only then swaps it in for ``checkpoint``. A folder is
complete exactly when it holds ``trainer_state.json``: it is written last and deleted first
when a folder is thrown away, so a crash at any moment leaves at least one complete
checkpoint among ``checkpoint``, ``checkpoint.tmp`` and ``checkpoint.old``, and
:func:`find_checkpoint` takes the newest complete one.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"


def discard_dir(path: Path) -> None:
    """Remove a folder, its ``trainer_state.json`` first: a half-deleted checkpoint never looks complete."""
    (path / STATE_FILE).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def replace_dir(new: Path, target: Path) -> None:
    """Swap ``new`` into ``target``: old moved aside, new renamed in, old removed.

    At every instant either the old or the new folder is complete at ``target`` or at
    ``target.old`` (which readers fall back to).
    """
    old = target.with_name(target.name + ".old")
    if old.exists():
        discard_dir(old)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    if old.exists():
        discard_dir(old)


def export_pretrained(
    model: Any, tokenizer: Any, target: str | Path, files: dict[str, str] | None = None, state_dict: dict | None = None
) -> Path:
    """A plain Hugging Face folder at ``target``, written atomically: a LoRA model is merged
    into a copy first, weights as safetensors, the tokenizer and any extra text ``files``.

    ``state_dict``: the full weights gathered from a sharded (FSDP) ``model``, whose own
    parameters are only this process's shards: they go into an unsharded copy built from
    the model's config (with its LoRA adapters, then merged) before saving.
    """
    target = Path(target)
    if state_dict is not None:
        model = _unsharded_copy(model, state_dict)
    if hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _unsharded_copy(model: Any, state_dict: dict) -> Any:
    """A plain (unsharded, CPU) model of ``model``'s architecture holding ``state_dict``."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    auto = (
        AutoModelForSequenceClassification
        if "ForSequenceClassification" in type(base).__name__
        else AutoModelForCausalLM
    )
    plain = auto.from_config(base.config, dtype=next(iter(state_dict.values())).dtype)
    if hasattr(model, "peft_config"):
        plain = get_peft_model(plain, model.peft_config["default"])
    plain.load_state_dict(state_dict, strict=True)
    return plain.eval()


def find_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run folder (see the module docstring), or None."""
    out = Path(out_dir)
    complete = [
        out / name for name in ("checkpoint", "checkpoint.tmp", "checkpoint.old") if (out / name / STATE_FILE).is_file()
    ]
    if not complete:
        return None
    return max(complete, key=lambda p: json.loads((p / STATE_FILE).read_text()).get("step", 0))


def save_checkpoint(accelerator, out_dir: str | Path, state: dict[str, Any]) -> Path:
    """Collective: every process must call it (each saves its own RNG state)."""
    out = Path(out_dir)
    tmp = out / "checkpoint.tmp"
    if accelerator.is_main_process:
        discard_dir(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        replace_dir(tmp, out / "checkpoint")
    accelerator.wait_for_everyone()
    return out / "checkpoint"


def load_checkpoint(accelerator, path: Path) -> dict[str, Any]:
    """Restore what ``save_checkpoint`` wrote; returns the trainer state."""
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())

"""Atomic training checkpoints for ``--resume``.

``save_checkpoint`` writes everything (model, optimizer, registered schedulers and
controllers, every process's RNG, and a ``trainer_state.json`` with the data position) to
``checkpoint.tmp`` and only then swaps it in for ``checkpoint``: a crash at any moment
leaves the previous complete checkpoint in place (or at ``checkpoint.old``, which
``find_checkpoint`` falls back to).
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


def replace_dir(new: Path, target: Path) -> None:
    """Swap ``new`` into ``target``: old moved aside, new renamed in, old removed.

    At every instant either the old or the new folder is complete at ``target`` or at
    ``target.old`` (which readers fall back to).
    """
    old = target.with_name(target.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    if old.exists():
        shutil.rmtree(old)


def export_pretrained(model: Any, tokenizer: Any, target: str | Path, files: dict[str, str] | None = None) -> Path:
    """A plain Hugging Face folder at ``target``, written atomically: a LoRA model is merged
    into a copy first, weights as safetensors, the tokenizer and any extra text ``files``."""
    target = Path(target)
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


def find_checkpoint(out_dir: str | Path) -> Path | None:
    out = Path(out_dir)
    for name in ("checkpoint", "checkpoint.old"):
        if (out / name / STATE_FILE).is_file():
            return out / name
    return None


def save_checkpoint(accelerator, out_dir: str | Path, state: dict[str, Any]) -> Path:
    """Collective: every process must call it (each saves its own RNG state)."""
    out = Path(out_dir)
    tmp = out / "checkpoint.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
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


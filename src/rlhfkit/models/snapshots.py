"""Policy snapshots of an online-RL run (``rlhfkit rl --save-policy-every N``): write one, list them, load one.

A run folder holds ``snapshots/update-000N/`` for N, 2N, ... (zero-padded to the width of
``--max-steps``) and the finished policy in ``final/``. Each folder carries the info file of the
final export (``rlhfkit_ppo.json``: the reference, the sampling settings, the reward) with
``"update"`` and that update's ``"rl/kl"`` and ``"rl/score_mean"`` from ``metrics.jsonl``, so a
curve over the run (score against KL) needs no other file.

Two kinds of snapshot:

- without ``--lora``: the whole policy, a plain Hugging Face folder like ``final/``;
- with ``--lora``: only the adapter (``adapter_config.json``, ``adapter_model.safetensors``, the
  info file): megabytes, not the model. The adapter sits on the policy the run started from,
  the info's ``"policy"`` (also the run's ``"reference"`` unless ``rl --reference`` named
  another model), so :func:`load_snapshot` loads it with
  :func:`~rlhfkit.models.policy.load_policy` (the same pad-token fix the run applied) and
  merges the adapter into it. The tokenizer is that starting policy's.

This module sits on the ``models/`` floor so that an evaluation can read a run's snapshots
without importing the training loop.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhfkit.checkpoint import replace_dir
from rlhfkit.defaults import SNAPSHOTS
from rlhfkit.models.policy_info import POLICY_INFO as INFO

__all__ = [
    "SNAPSHOTS",
    "Snapshot",
    "list_snapshots",
    "load_snapshot",
    "save_adapter",
    "snapshot_name",
]

ADAPTER_CONFIG = "adapter_config.json"
_NAME = re.compile(r"^update-(\d+)$")


@dataclass(frozen=True)
class Snapshot:
    """One point of a run: the policy after ``update`` updates, at ``path``, with its ``info``
    (the folder's ``rlhfkit_ppo.json``)."""

    update: int
    path: Path
    info: dict[str, Any]

    @property
    def is_adapter(self) -> bool:
        """Whether ``path`` holds only a LoRA adapter (a ``--lora`` run's snapshot), not a whole model."""
        return (self.path / ADAPTER_CONFIG).is_file()

    @property
    def base(self) -> str | None:
        """The model a LoRA adapter goes on: the run's starting policy, ``"policy"`` in the info (runs
        written before it was recorded had it as their ``"reference"``) (None for a whole model)."""
        return (self.info.get("policy") or self.info.get("reference")) if self.is_adapter else None


def snapshot_name(update: int, max_steps: int) -> str:
    """``update-000N``, zero-padded to the width of ``max_steps`` so names sort as numbers."""
    return f"update-{update:0{len(str(max_steps))}d}"


def list_snapshots(run_folder: str | Path, final: bool = True) -> list[Snapshot]:
    """The snapshots of ``run_folder`` in update order, and (``final=True``) its ``final/`` policy
    as the last point when its info records its update (runs from before snapshots existed do not).
    Half-written folders (``.update-N.tmp-*``) are not listed."""
    run = Path(run_folder)
    found = []
    folder = run / SNAPSHOTS
    for path in folder.iterdir() if folder.is_dir() else []:
        match = _NAME.match(path.name)
        if match and path.is_dir():
            found.append(Snapshot(int(match.group(1)), path, _read_info(path)))
    found.sort(key=lambda s: s.update)
    if final and (run / "final" / INFO).is_file():
        info = _read_info(run / "final")
        if isinstance(info.get("update"), int) and (not found or info["update"] > found[-1].update):
            found.append(Snapshot(info["update"], run / "final", info))
    return found


def _read_info(path: Path) -> dict[str, Any]:
    f = path / INFO
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}


def load_snapshot(snapshot: Snapshot, **kwargs: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of ``snapshot``, as :func:`~rlhfkit.models.policy.load_policy` gives
    them (``kwargs`` go to it). A LoRA snapshot is merged into its base, :attr:`Snapshot.base`
    (a relative path there is relative to where the run was started)."""
    from rlhfkit.models.policy import load_policy

    if not snapshot.is_adapter:
        return load_policy(str(snapshot.path), option=None, **kwargs)
    if not snapshot.base:
        raise ValueError(
            f"{snapshot.path / INFO} names no 'policy' (nor 'reference'): the base model of the adapter is unknown"
        )
    from peft import PeftModel

    model, tokenizer = load_policy(snapshot.base, option=None, **kwargs)
    model = PeftModel.from_pretrained(model, str(snapshot.path)).merge_and_unload()
    return model.eval(), tokenizer


def save_adapter(model: Any, target: str | Path, files: dict[str, str], state_dict: dict | None = None) -> Path:
    """Only the LoRA adapter of the peft ``model`` at ``target``, with the text ``files``, written
    atomically like :func:`~rlhfkit.checkpoint.export_pretrained` (a temporary folder beside
    ``target``, swapped in whole). ``state_dict``: the full weights gathered from a sharded model
    (peft keeps the adapter's part of it)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        extra = {} if state_dict is None else {"state_dict": state_dict}
        model.save_pretrained(tmp, safe_serialization=True, **extra)
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target

"""Atomic training checkpoints for ``--resume``.

``save_checkpoint`` writes everything (model, optimizer, registered schedulers and
controllers, every process's RNG) to ``checkpoint.tmp``, then ``trainer_state.json`` (the
step and data position) last, and only then swaps it in for ``checkpoint``. A folder is
complete exactly when it holds ``trainer_state.json``: it is written last and deleted first
when a folder is thrown away, so a crash at any moment leaves at least one complete
checkpoint among ``checkpoint``, ``checkpoint.tmp`` and ``checkpoint.old``, and
:func:`find_checkpoint` takes the newest complete one.

Before ``trainer_state.json`` comes ``manifest.json``: the size and sha256 of every other file.
``--resume`` checks each file against it before loading anything, so a truncated, emptied,
overwritten or deleted file is an exit-2 message naming it (:func:`verify_checkpoint`), never a
loader's traceback or, for the RNG state, a silently different run. A full disk while writing is
one line naming the file, with the previous checkpoint intact (:func:`save_checkpoint`).
What survives what: docs/run-folders.md.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from rlhfkit.defaults import SNAPSHOTS
from rlhfkit.errors import RunStopped, UserError

STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"  # size and sha256 of every other file, written just before STATE_FILE
CHECKPOINT_NAMES = ("checkpoint", "checkpoint.tmp", "checkpoint.old")


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
    except BaseException as e:
        file = _file_being_written(e, tmp) if isinstance(e, Exception) else tmp
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and _is_disk_full(e, target.parent):
            raise _no_space(file, e, target.parent, "export") from None
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
    """The newest complete checkpoint of a run folder (see the module docstring), or None.

    A folder whose ``trainer_state.json`` cannot be read counts as the newest: resuming from
    it then fails naming that file, instead of silently going back to an older checkpoint.
    """
    complete = complete_checkpoints(out_dir)
    if not complete:
        return None
    return max(complete, key=lambda p: _step_or_none(p) if _step_or_none(p) is not None else math.inf)


def complete_checkpoints(out_dir: str | Path) -> list[Path]:
    """The folders among ``checkpoint``, ``checkpoint.tmp`` and ``checkpoint.old`` that hold a ``trainer_state.json``."""
    out = Path(out_dir)
    return [out / name for name in CHECKPOINT_NAMES if (out / name / STATE_FILE).is_file()]


def missing_checkpoint(out_dir: str | Path) -> str:
    """Why ``out_dir`` has no complete checkpoint, for the ``--resume`` error."""
    folder = Path(out_dir) / "checkpoint"
    if folder.is_dir():
        return (
            f"{folder / STATE_FILE} is missing, so {folder} is incomplete (written by a run killed while saving it, "
            f"or a damaged copy): start over with a new --output"
        )
    return f"expected {folder}"


def _step_or_none(folder: Path) -> int | None:
    try:
        return int(read_state(folder)["step"])
    except (UserError, OSError, ValueError, TypeError):
        return None


def read_state(folder: Path) -> dict[str, Any]:
    """``folder/trainer_state.json``; a file that is not the JSON object ``save_checkpoint`` wrote is a damaged checkpoint."""
    path = folder / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise damaged(folder, STATE_FILE, f"cannot be read ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise damaged(folder, STATE_FILE, "is not the trainer state the checkpoint wrote (no integer 'step')")
    return state


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """``folder/manifest.json``: the size and sha256 of every file of the checkpoint but the
    trainer state (written after it) and itself. Hashing is cheap next to writing: sha256 of a
    540 MB file (SmolLM2-135M's weights) takes 0.3 s on this project's AMD EPYC (docs/run-folders.md)."""
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in (STATE_FILE, MANIFEST)
    }
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def damaged(folder: Path, file: str, what: str, hint: str = "") -> UserError:
    """The one message for a checkpoint that cannot be resumed: the file, what is wrong, what to do."""
    older = []
    for other in complete_checkpoints(folder.parent):
        step = _step_or_none(other) if other != folder else None
        if step is not None:
            older.append(f"{other} (step {step})")
    what_to_do = f"start over with a new --output, or delete {folder} and run again without --resume"
    if older:
        what_to_do = (
            f"another complete checkpoint is kept in {', '.join(older)}: delete {folder} and run again with "
            f"--resume to continue from it (the steps after it are trained again), or {what_to_do}"
        )
    what_to_do = what_to_do if hint else what_to_do[0].upper() + what_to_do[1:]
    return UserError(f"{folder / file} {what}: the checkpoint is damaged and cannot be resumed. {hint}{what_to_do}")


def verify_checkpoint(folder: Path, process_index: int = 0) -> list[str]:
    """Check every file of ``folder`` against its ``manifest.json`` before anything is loaded;
    raise :class:`UserError` naming the first damaged file. Returns warnings (a deleted RNG
    state). A checkpoint written before manifests existed is checked by reading each file.

    The RNG state of this process (``random_states_N.pkl``) matters only for an exact resume:
    damaged, it is refused all the same (a resume that silently continues with other random
    numbers is the silent difference this check exists to prevent) and the message says how
    to accept an inexact resume: delete the file, which is then a loud warning.
    """
    rng_file = f"random_states_{process_index}.pkl"
    rng_hint = (
        f"To resume anyway with fresh random numbers (not the run an uninterrupted one would have been), "
        f"delete {folder / rng_file} and run again; or "
    )
    warnings = []
    if not (folder / rng_file).is_file():
        warnings.append(
            f"{folder / rng_file} is missing: the run resumes with fresh random numbers, so it will NOT end "
            f"where the uninterrupted run would have (data order and sampling differ from here on)"
        )
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        _probe_files(folder, rng_file, rng_hint)
        return warnings
    try:
        files = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
        files = {str(name): (int(v["size"]), str(v["sha256"])) for name, v in files.items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise damaged(folder, MANIFEST, f"cannot be read ({type(e).__name__}: {e})") from None
    for name, (size, sha) in files.items():
        path = folder / name
        hint = rng_hint if name == rng_file else ""
        if name.startswith("random_states_") and name != rng_file:
            continue  # another process's: that process checks it
        if not path.is_file():
            if name == rng_file:
                continue  # warned above
            raise damaged(folder, name, "is missing")
        actual = path.stat().st_size
        if actual != size:
            raise damaged(
                folder, name, f"is {actual} bytes but was written with {size} (truncated or overwritten)", hint
            )
        if _sha256(path) != sha:
            raise damaged(folder, name, "does not match the checksum written with it (its bytes changed)", hint)
    return warnings


def _probe_files(folder: Path, rng_file: str, rng_hint: str) -> None:
    """Without a manifest: read each file the way accelerate will, naming the first that fails."""
    import torch
    from safetensors import safe_open

    if not any(p.name.startswith(("model", "pytorch_model")) for p in folder.iterdir()):  # FSDP: a folder
        raise damaged(folder, "model.safetensors", "is missing")
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name not in (STATE_FILE, MANIFEST)):
        if path.name.startswith("random_states_") and path.name != rng_file:
            continue
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        f.get_tensor(key)
            elif path.suffix in (".bin", ".pkl", ".pt"):
                torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # any failure to read a file is that file's damage
            raise damaged(
                folder, path.name, f"cannot be read ({type(e).__name__})", rng_hint if path.name == rng_file else ""
            ) from None


def save_checkpoint(accelerator, out_dir: str | Path, state: dict[str, Any]) -> Path:
    """Collective: every process must call it (each saves its own RNG state).

    A full disk or a file-size limit while writing raises :class:`RunStopped` (one line, no
    traceback) after removing the partial ``checkpoint.tmp``; the previous checkpoint is
    untouched. Exit 1, not 2: like a non-finite loss it stops the run with its last good
    checkpoint intact, and the fix (free space, ``--resume``) changes no option or file of the user's.
    """
    out = Path(out_dir)
    tmp = out / "checkpoint.tmp"
    try:
        if accelerator.is_main_process:
            discard_dir(tmp)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_manifest(tmp)
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
            replace_dir(tmp, out / "checkpoint")
    except Exception as e:
        if not _is_disk_full(e, out):
            raise
        file = _file_being_written(e, tmp)
        discard_dir(tmp)
        raise _no_space(file, e, out, "checkpoint") from None
    accelerator.wait_for_everyone()
    return out / "checkpoint"


def _no_space(file: Path, error: Exception, out: Path, what: str) -> RunStopped:
    """The one line for a full disk: the file, that the partial write is gone, the intact checkpoint, what to do."""
    previous = find_checkpoint(out)
    step = _step_or_none(previous) if previous is not None else None
    kept = (
        f"the last checkpoint in {previous} (step {step}) is intact: free some space and continue with --resume"
        if step is not None
        else "no checkpoint had been written yet: free some space and start the run again"
    )
    return RunStopped(
        f"no space left on the device (or over the file-size limit) writing {file} ({type(error).__name__}: "
        f"{str(error)[:120]}); the partial {what} was removed and {kept}"
    )


DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
# torch's and safetensors' writers often report a failed write without an errno
DISK_FULL_TEXT = ("No space left", "File too large", "Disk quota", "file write failed", "os error 28", "os error 27")


def _is_disk_full(error: BaseException | None, out: Path) -> bool:
    """Whether a failed checkpoint write ran out of room: the error says so (errno or text), or
    the disk is nearly full, or the process has a file-size limit (torch's writer then fails with
    a bare 'unexpected pos' and no errno)."""
    first = error
    while error is not None:
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        if any(text in str(error) for text in DISK_FULL_TEXT):
            return True
        error = error.__cause__ or error.__context__
    if not isinstance(first, (OSError, RuntimeError)) and "Safetensor" not in type(first).__name__:
        return False
    try:
        import resource

        limited = resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY
    except (ImportError, OSError, ValueError):  # not on this platform
        limited = False
    return limited or shutil.disk_usage(out).free < (1 << 20)


def _file_being_written(error: BaseException, tmp: Path) -> Path:
    """The file a failed write was writing: the error's own; the weights for safetensors (which
    deletes its partial file); else the newest file of ``tmp``."""
    if isinstance(error, OSError) and error.filename:
        return Path(error.filename)
    if "Safetensor" in type(error).__name__:
        return tmp / "model.safetensors"
    files = [p for p in tmp.rglob("*") if p.is_file()] if tmp.is_dir() else []
    return max(files, key=lambda p: p.stat().st_mtime_ns) if files else tmp


def load_checkpoint(accelerator, path: Path) -> tuple[dict[str, Any], list[str]]:
    """Restore what ``save_checkpoint`` wrote, after checking it (:func:`verify_checkpoint`);
    returns the trainer state and the warnings to show. A damaged file is a :class:`UserError`
    naming it, never a loader's traceback."""
    state = read_state(path)
    warnings = verify_checkpoint(path, accelerator.process_index)
    try:
        accelerator.load_state(str(path))
    except Exception as e:  # the files are the ones written: they do not fit this run's model or optimizer
        raise UserError(
            f"{path} could not be loaded into this run ({type(e).__name__}: {str(e)[:300]}); was it written "
            f"with other options (--policy, --lora, the optimizer's)? Resume with the options of config.yaml, "
            f"or start over with a new --output"
        ) from None
    return state, warnings


TEMP_EXPORT = re.compile(r"^\.(final|best|last|policy|checkpoint|update-\d+)\.tmp-[A-Za-z0-9_]+$")


def remove_stale_temp(out_dir: str | Path) -> list[Path]:
    """Remove what a killed run left half-written in its folder: the temporary export folders
    of :func:`export_pretrained` (``.final.tmp-XXXX``, model-sized; ``snapshots/.update-N.tmp-XXXX``)
    and a half-written reference cache. Only rlhfkit's own temporary names; call it only while
    this run owns the folder."""
    out = Path(out_dir)
    removed = []
    folders = [f for f in (out, out / SNAPSHOTS) if f.is_dir()]
    for path in [p for f in folders for p in sorted(f.iterdir())]:
        if path.is_dir() and TEMP_EXPORT.match(path.name):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        elif path.is_file() and path.name.endswith(".safetensors.tmp"):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed

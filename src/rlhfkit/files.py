"""Reading the user's files and checking where output goes, with errors that name the file.

Every command reads text through :func:`read_text` (UTF-8, a leading byte-order mark
dropped, undecodable bytes reported with the file and the position) and checks each output
path with :func:`check_output_dir` or :func:`check_output_file` before it does any work.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from rlhfkit.errors import MissingFileError, UserError


def read_text(path: str | Path, option: str) -> str:
    """The UTF-8 text of ``path`` (BOM dropped); ``option`` names the flag for error messages."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; give a file")
    if not path.is_file():
        raise MissingFileError(f"{option} {path} does not exist (or is not a file)")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{option} {path} cannot be read: {e.strerror}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(
            f"{option} {path} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); "
            "save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _can_write_in(folder: Path) -> bool:
    """Probe by making (and removing) a temporary folder: permission bits alone say nothing
    for root, or on a read-only file system."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".rlhfkit-probe-", dir=folder))
    except OSError:
        return False
    return True


def _writable_parent(path: Path, option: str) -> None:
    existing = path.absolute().parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(
            f"{option} {path}: {existing} is a file, so no folder can be made under it; choose another path"
        )
    if not _can_write_in(existing):
        raise UserError(f"{option} {path}: {existing} is not writable; choose a folder you can write to")


def check_output_dir(path: str | Path, option: str = "--output") -> Path:
    """Refuse an output folder that is a file or cannot be created/written; creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} is a file; give a folder (it is created if missing)")
    if path.is_dir():
        if not _can_write_in(path):
            raise UserError(f"{option} {path} is not writable; choose a folder you can write to")
        return path
    _writable_parent(path, option)
    return path


def check_output_file(path: str | Path, option: str = "--output") -> Path:
    """Refuse an output file path that is a folder or cannot be written; creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{option} {path} is not writable; choose another file")
    _writable_parent(path, option)
    return path

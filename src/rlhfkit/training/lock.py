"""One writer per run folder: ``OUTPUT/run.lock``.

Two processes training into one folder interleave their checkpoints and log the same steps
twice. The first writer holds ``run.lock``; a second one is refused before it writes anything
(exit 2, naming the holder: PID, host, start time, command).

How liveness is known: the holder keeps the file open with an exclusive ``flock``. The kernel
drops a flock when its process ends, however it ends (kill -9 included), so on a local disk
"is the lock held" is exact and needs no guess from PIDs. The file's JSON (pid, host, process
start time, command) is for the message, and for the cases flock cannot decide:

- the flock is free but the file names a live process on this host with the same start
  time: the file system does not honour flock; the process is taken as the holder (refused);
- the flock is free and the process is dead, or its PID now belongs to a process started at
  another time (PID reuse): a stale lock, taken over with a warning naming the old PID;
- the file names another host: on NFS, flock is emulated with byte-range locks that other
  clients may or may not see (``local_lock=`` mount options, NFSv3 without lockd, lease
  expiry after a client dies), and a PID on another machine cannot be checked from here, so
  the folder is refused, and the message says how to remove the lock if its run is known dead.

Where ``flock`` is missing (no ``fcntl``) or refused by the file system (ENOLCK, EOPNOTSUPP),
the PID check alone decides, as above (and two processes starting in the same instant could
both pass). Why not an ``O_CREAT | O_EXCL`` file alone: it is atomic, but a run killed with -9
leaves it behind, and only the PID guess would say whether it is stale.

A run releases its lock in ``Run.close``; a run that raised releases it through the CLI's
error path, at process exit (``atexit``), or when the next run in the same process asks for
the same folder (a process trains one run at a time, so a lock it still holds there is left
over from a run that raised).
"""

from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rlhfkit.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: the PID check alone
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
_HELD: dict[Path, RunLock] = {}  # folder (resolved) -> the lock this process holds on it
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF}


@dataclass(frozen=True)
class Holder:
    """Who a lock file names."""

    pid: int
    host: str
    started: float  # the process's start time, seconds since the epoch (tells PID reuse apart)
    command: str = ""

    @classmethod
    def me(cls) -> Holder:
        return cls(os.getpid(), socket.gethostname(), _start_time(os.getpid()) or 0.0, " ".join(sys.argv))

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        try:
            data = json.loads(text)
            return cls(int(data["pid"]), str(data["host"]), float(data["started"]), str(data.get("command", "")))
        except (ValueError, KeyError, TypeError):
            return None

    def dump(self) -> str:
        started_at = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.started))
        return json.dumps({**vars(self), "started_at": started_at}, indent=1) + "\n"

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.started))
        return f"PID {self.pid} on {self.host} (started at {when})"  # the command is in the file

    def local(self) -> bool:
        return self.host == socket.gethostname()

    def alive(self) -> bool:
        """This host only: the PID runs and is the process that wrote the file (same start time)."""
        started = _start_time(self.pid)
        return started is not None and abs(started - self.started) < 1.0


def _start_time(pid: int) -> float | None:
    """When process ``pid`` started, or None if there is none (a zombie counts as none)."""
    import psutil  # accelerate's dependency

    try:
        process = psutil.Process(pid)
        return None if process.status() == psutil.STATUS_ZOMBIE else process.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _refusal(folder: Path, holder: Holder | None) -> str:
    lock = folder / LOCK_FILE
    if holder is None:
        return (
            f"{folder} is in use by another process (its {lock} is being written); wait for it to finish or "
            "stop it, or choose another --output"
        )
    message = f"{folder} is in use by {holder.describe()}; wait for it to finish or stop it, or choose another --output"
    if not holder.local():
        message += (
            f". {holder.host} is another machine, so rlhfkit cannot check that the process is still running; "
            f"if you know it has ended, delete {lock}"
        )
    return message


def _try_flock(fd: int) -> bool | None:
    """Take an exclusive flock on ``fd`` without waiting: True, False (held elsewhere), or None
    (no flock here: the PID check alone decides)."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        if e.errno in _UNSUPPORTED:
            return None
        raise


def _flock_held(fd: int, tries: int = 20) -> bool | None:
    """Whether another open file holds the flock, asked a few times over ~0.2 s: a process that
    only checks (:func:`check`) holds it for microseconds, a writer for the whole run."""
    for _ in range(tries):
        got = _try_flock(fd)
        if got is not False:
            return None if got is None else False
        time.sleep(0.01)
    return True


def _read(fd: int) -> Holder | None:
    os.lseek(fd, 0, os.SEEK_SET)
    return Holder.parse(os.read(fd, 65536).decode("utf-8", "replace"))


def _judge(folder: Path, fd: int) -> tuple[str | None, Holder | None]:
    """(a refusal message or None, the stale holder to warn about or None) for the lock file
    open on ``fd``; leaves our flock on ``fd`` if it was free."""
    held = _flock_held(fd)
    holder = _read(fd)
    if held:
        if holder is None:  # the holder is between taking the flock and writing its JSON
            time.sleep(0.2)
            holder = _read(fd)
        return _refusal(folder, holder), None
    if holder is None:  # empty or unreadable: nobody's
        return None, None
    if not holder.local():
        return _refusal(folder, holder), None
    if holder.alive():  # the flock was free, yet the writer runs: flock is not honoured here
        return _refusal(folder, holder), None
    return None, holder


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` is still the file open on ``fd``."""
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def check(folder: Path) -> str | None:
    """Why ``folder`` cannot be written by this process now (its holder), or None; writes nothing."""
    held = _HELD.get(folder.resolve())
    if held is not None:
        return None  # ours: an earlier run of this process that raised (taken over by :meth:`RunLock.take`)
    path = folder / LOCK_FILE
    try:  # read-write, though nothing is written: NFS emulates an exclusive flock with a write lock
        fd = os.open(path, os.O_RDWR) if os.access(path, os.W_OK) else os.open(path, os.O_RDONLY)
    except OSError:  # no lock file (or no folder yet); an unwritable one fails when the run takes it
        return None
    try:
        return _judge(folder, fd)[0]
    finally:
        os.close(fd)  # drops the flock _judge may have taken


class RunLock:
    """The lock this process holds on one run folder (module docstring)."""

    def __init__(self, folder: Path, fd: int):
        self.folder, self.fd = folder, fd
        self.path, self.key = folder / LOCK_FILE, folder.resolve()

    @classmethod
    def take(cls, folder: Path | str) -> RunLock:
        """Make ``folder`` if needed and lock it, or raise :class:`UserError` naming the holder."""
        folder = Path(folder)
        key = folder.resolve()
        if key in _HELD:  # an earlier run of this process raised before it closed: hand its lock over
            _HELD[key].release()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOCK_FILE
        for _ in range(10):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                refusal, stale = _judge(folder, fd)
                if refusal is not None:
                    raise UserError(refusal)
                # the holder we waited on may have removed the file and another process made a
                # new one: our flock counts only on the file the path names now
                if not _names(path, fd):
                    os.close(fd)
                    continue
            except BaseException:
                os.close(fd)
                raise
            if stale is not None:
                logger.warning(
                    "%s: taking over the lock of PID %d on %s, which is no longer running%s",
                    folder,
                    stale.pid,
                    stale.host,
                    "" if _start_time(stale.pid) is None else " (its PID now belongs to another process)",
                )
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, Holder.me().dump().encode("utf-8"))
            os.fsync(fd)
            lock = cls(folder, fd)
            _HELD[key] = lock
            return lock
        raise UserError(f"{folder}: could not lock {path}; it keeps being replaced by another process")

    def release(self) -> None:
        """Remove the lock file and drop the flock (in that order: a process that opens the file
        in between finds it gone from the folder and retries on the new one). Idempotent."""
        if self.fd < 0:
            return
        try:
            if _names(self.path, self.fd):
                self.path.unlink()
        except OSError:
            pass  # the folder went (a pipeline stage started afresh): nothing to remove
        os.close(self.fd)
        self.fd = -1
        _HELD.pop(self.key, None)


def release_all() -> None:
    """Release every lock this process holds (the CLI's error path, and process exit)."""
    for lock in list(_HELD.values()):
        lock.release()


atexit.register(release_all)

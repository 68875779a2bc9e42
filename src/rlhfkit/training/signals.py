"""Pre-emption: SIGTERM (a scheduler) and SIGINT (Ctrl-C) end a run at the end of a step.

While a run trains (from ``Run.begin`` to ``Run.close``), the first signal only sets a flag.
The training core reads it after every optimizer step (:meth:`Cadence.after_step
<rlhfkit.training.cadence.Cadence.after_step>`), agreed by every process; the run then
writes a checkpoint, closes and raises :class:`Interrupted`, which the CLI turns into exit
143 (SIGTERM) or 130 (SIGINT) and the resume hint. A second signal stops at once, as before
(nothing saved since the last checkpoint). Before ``Run.begin`` nothing has been written, so
the first signal stops at once too.

Handlers are installed by ``start_run`` in the main thread only (Python runs signal handlers
there; elsewhere the process keeps its own) and the previous ones are restored in
``Run.close``, when a signal stops the run, or, for a run that raised, by the CLI's error path
and the next run of the process. This module imports nothing heavy: the CLI imports it.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_INSTALLED: list[StopSignals] = []


class Interrupted(KeyboardInterrupt):
    """A run stopped by ``signum``; ``what`` says where and what it left, the message adds how
    to continue. A KeyboardInterrupt, so no ``except Exception`` on the way swallows it."""

    def __init__(self, what: str, signum: int, hint: str = "continue with --resume"):
        super().__init__(f"{what}; {hint}")
        self.what, self.signum = what, signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT


class StopSignals:
    """One run's handlers. ``received``: the first signal while ``deferred`` (None if none);
    ``note()``: what the run leaves behind, for the message of an immediate stop."""

    def __init__(self, note: Callable[[], str]):
        self.received: int | None = None
        self.deferred = False  # set by Run.begin: from then on the first signal waits for the step
        self.note = note
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        restore_all()  # a run of this process that raised before it closed
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        _INSTALLED.append(self)

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        if self in _INSTALLED:
            _INSTALLED.remove(self)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.deferred and self.received is None:
            self.received = signum
            logger.warning(
                "%s received: finishing this step, then writing a checkpoint (send it again to stop at once)", name
            )
            return
        self.restore()  # a third signal gets the process's own handling (SIGTERM: killed)
        when = "at once (a second signal)" if self.received is not None else "before training began"
        raise Interrupted(f"stopped by {name} {when}; {self.note()}", signum)


def restore_all() -> None:
    """Restore the handlers of every run that did not close (the CLI's error path)."""
    for handlers in list(_INSTALLED):
        handlers.restore()

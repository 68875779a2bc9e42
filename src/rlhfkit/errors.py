"""The two ways a command fails, reported the same way by every entry point.

- :class:`UserError`: something the user fixes (an option, a file, a line of data). The
  command prints one paragraph naming the option or file and the fix, and exits with 2. No
  traceback, and nothing is written: configs and data are checked before a run folder exists.
- :class:`RunStopped`: the run stopped itself before harm was done (a non-finite loss or
  gradient, a KL past ``--max-kl``). Exit 1; the last good checkpoint is intact.

:func:`rlhfkit.cli.run_command` maps both to their exit codes.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem the user fixes; the message names the option or file, the value, and what to do."""


class ConfigError(UserError):
    """A bad configuration value; the message names the option and how to fix it. ``option``:
    the config field a message about one value names (as ``option --flag``), so that a value
    read from a YAML file can be named by its key instead (:func:`rlhfkit.config.from_dict`)."""

    def __init__(self, message: str, option: str | None = None):
        super().__init__(message)
        self.option = option


class MissingFileError(UserError, FileNotFoundError):
    """An input file that does not exist; the message names the option or the kind of file."""


class RunStopped(RuntimeError):
    """The run stopped itself before writing a bad step into the weights; the message says why,
    at which step, and where the last good checkpoint is."""

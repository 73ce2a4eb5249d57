"""What pvae tells a user when something goes wrong: the errors that name a setting, and words for the
operating system's.

A :class:`ConfigError` names the setting it is about by its key (``num_particles``, ``fit.lr``), so
that the command line can name the flag the user typed instead (``--particles``) and a config file's
reader the file. Errors gather *notes* on their way up (which checkpoint a failed run keeps, how to
resume it); :func:`message` joins them into the one line the command line prints.
"""

import errno
import signal
from typing import Optional


class ConfigError(ValueError):
    """A setting with a bad value: ``key`` names it, ``problem`` says what is wrong and what to do,
    ``where`` (optional) is the file it was read from."""

    def __init__(self, key: str, problem: str, where: Optional[str] = None):
        self.key, self.problem, self.where = key, problem, where
        super().__init__(f"{where}: {key} {problem}" if where else f"{key} {problem}")

    def within(self, where: str, section: str = "") -> "ConfigError":
        """The same error, read from the file ``where`` under ``section`` (``fit``, ``run``)."""
        return ConfigError(f"{section}.{self.key}" if section else self.key, self.problem, where)


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM (``signum``). ``resumable``: it stopped between two steps, where
    its state is whole and can be saved; a second signal stops at once, and nothing is saved then.
    ``complete``: the fit had done its last step."""

    def __init__(self, signum: int, where: str = "", resumable: bool = False, complete: bool = False):
        self.signum, self.resumable, self.complete = signum, resumable, complete
        super().__init__(f"interrupted by {signal.Signals(signum).name}" + (f" {where}" if where else ""))

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by the signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


def add_note(error: BaseException, note: str) -> None:
    """``error.add_note(note)`` on every Python this package supports (3.10 lacks the method)."""
    error.__notes__ = [*getattr(error, "__notes__", []), note]


def message(error: BaseException) -> str:
    """The error's text and its notes on one line."""
    text = os_error_text(error) if isinstance(error, OSError) else str(error)
    if not text:
        text = type(error).__name__
    return "; ".join([text, *getattr(error, "__notes__", [])])


# the conditions a user can act on, in words; other errors keep the system's own text
_OS_WORDS = {
    errno.ENOSPC: "the disk is full (no space left on the device)",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder, not a file",
}
_OS_ADVICE = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EROFS: "write elsewhere",
    errno.EACCES: "write elsewhere or change the folder's permissions",
    errno.EPERM: "write elsewhere or change the folder's permissions",
}


def os_error_text(error: OSError) -> str:
    """``runs/x/checkpoint.pt: the disk is full (...): free some space or write elsewhere``."""
    words = _OS_WORDS.get(error.errno)
    if words is None:
        return str(error)
    advice = f": {_OS_ADVICE[error.errno]}" if error.errno in _OS_ADVICE else ""
    return f"{error.filename}: {words}{advice}" if error.filename else f"{words}{advice}"

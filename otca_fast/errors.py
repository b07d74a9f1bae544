"""The package's own exceptions: the error that ends a training run, and those of checkpoints."""

from __future__ import annotations

import errno

__all__ = ["TrainingError", "CheckpointError", "CheckpointFileMissing", "CheckpointWriteError", "disk_full_errno"]


class TrainingError(RuntimeError):
    """Training stopped on a failure that the message locates (step, timestep, reward, prompt).

    ``all_ranks``: every rank raised it at the same point (a failure they agreed on), so the job can be
    torn down in order and the message is printed once."""

    all_ranks = False


class CheckpointError(OSError):
    """A checkpoint that cannot be used or written. The message names the file and what is wrong with it
    (missing, unreadable, truncated, holding NaN/Inf, no space left to write it)."""


class CheckpointFileMissing(CheckpointError, FileNotFoundError):
    """A file that a checkpoint needs (or lists) is not there."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (non-finite values, a full disk); the checkpoints written before are
    intact. ``errno`` is ENOSPC or EDQUOT for a full disk or quota."""


DISK_FULL = {errno.ENOSPC: ("No space left on device", "no space left on device"),
              errno.EDQUOT: ("Disk quota exceeded", "disk quota exceeded")}


def disk_full_errno(error: BaseException) -> int | None:
    """ENOSPC or EDQUOT when ``error`` (or what caused it) is a full disk or quota, else None. Also reads the
    messages of libraries that do not raise an OSError (safetensors: "... (os error 28)"; DCP's
    CheckpointException carries the failures of every rank as text)."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            return e.errno
        text = str(e).lower()
        for code, (message, _) in DISK_FULL.items():
            if message.lower() in text or f"os error {code})" in text:
                return code
        e = e.__cause__ or e.__context__
    return None

"""One run per output directory: ``run.output_dir/run.lock``, held for the run's life.

Two runs writing into one directory interleave every line of ``metrics.jsonl`` and every checkpoint,
and ``--overwrite`` of a directory that a live run is training in deletes its checkpoints under it. So
a run takes the lock before it reads or writes anything there, and a second run fails at once with a
:class:`RunLockError` naming the holder (process id, host, start time, command line).

The lock is ``flock(2)`` on the lock file, which the kernel releases when the holding process dies,
however it dies (``kill -9`` included): a lock left by a dead process is not held, and the next run
takes it over, saying whose it was. The file holds the holder's description (JSON) and is deleted when
the lock is released. ``flock`` is honoured across hosts by NFSv4 and by Lustre mounted with ``flock``;
on a filesystem without it the lock falls back to the description alone: a holder on this host is
alive if its process is, one on another host cannot be checked and is reported (delete the file once
that run has ended).

This module imports nothing heavy: a launcher script can check a directory cheaply.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["LOCK_NAME", "RunLock", "RunLockError", "acquire", "holder"]

LOCK_NAME = "run.lock"
# flock() unsupported by the filesystem (some FUSE and old NFS mounts)
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunLockError(RuntimeError):
    """``run.output_dir`` is in use by another run (the message names it)."""


def _describe(info: dict[str, Any]) -> str:
    parts = [f"pid {info.get('pid', '?')} on host {info.get('host', '?')}"]
    if info.get("started"):
        parts.append(f"started {info['started']}")
    if info.get("command"):
        parts.append(f"command: {info['command']}")
    return ", ".join(parts)


def _read(fd: int) -> dict[str, Any] | None:
    try:
        data = os.pread(fd, 1 << 16, 0)
        info = json.loads(data.decode()) if data.strip() else None
    except (OSError, ValueError):
        return {"pid": "?", "host": "?", "command": "(unreadable lock file)"}
    return info if isinstance(info, dict) else None


def holder(output_dir: str | Path) -> dict[str, Any] | None:
    """The description in ``output_dir/run.lock`` (None when there is none): whose lock it is or was."""
    try:
        fd = os.open(Path(output_dir) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None
    try:
        return _read(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class RunLock:
    """The held lock of one run (:func:`acquire`); :meth:`release` (or process exit) frees it."""

    def __init__(self, path: Path, fd: int, info: dict[str, Any]):
        self.path, self._fd, self.info = path, fd, info

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Delete the lock file (if it is still ours) and unlock. Idempotent."""
        if self._fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(output_dir: str | Path, *, note: str | None = None,
            warn: Callable[[str], None] | None = None) -> RunLock:
    """Lock ``output_dir`` (created if needed) for this process; raises :class:`RunLockError` naming the
    holder when another live run holds it. A lock left by a dead process is taken over, reported through
    ``warn``. ``note`` is added to the description (e.g. the torchrun world size)."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_NAME
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]])[:500]}
    if note:
        info["note"] = note
    for _ in range(20):  # retried only while another process deletes the file under us
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            previous = _read(fd)
            os.close(fd)
            raise RunLockError(_in_use(root, path, previous)) from None
        except OSError as e:
            if e.errno not in _NO_FLOCK:
                os.close(fd)
                raise
            _check_without_flock(root, path, fd)
        # the releasing run deletes the file: the one we locked must still be the one at `path`
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        previous = _read(fd)
        if previous and warn is not None:
            warn(f"{path}: took over the lock of a run that is no longer running ({_describe(previous)})")
        data = json.dumps(info).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        return RunLock(path, fd, info)
    raise RunLockError(f"{path}: could not take the lock (the file kept being replaced by another process)")


def _in_use(root: Path, path: Path, info: dict[str, Any] | None) -> str:
    who = _describe(info) if info else "a process that has not written its description yet"
    return (f"run.output_dir {root} is in use by another run ({who}); wait for it to finish or stop it, or choose "
            f"another run.output_dir (lock file: {path})")


def _check_without_flock(root: Path, path: Path, fd: int) -> None:
    """The fallback on a filesystem without flock: judge the recorded holder by its process."""
    previous = _read(fd)
    if not previous or previous.get("pid") == os.getpid() and previous.get("host") == socket.gethostname():
        return
    if previous.get("host") != socket.gethostname():
        os.close(fd)
        raise RunLockError(_in_use(root, path, previous) + " - this filesystem does not support flock, so a run on "
                           "another host cannot be checked: delete the lock file once that run has ended")
    if isinstance(previous.get("pid"), int) and _alive(previous["pid"]):
        os.close(fd)
        raise RunLockError(_in_use(root, path, previous))

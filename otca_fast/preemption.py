"""Preemption: on SIGTERM or SIGUSR1, stop at the next safe point, checkpoint, exit with :data:`EXIT_STOPPED`.

A preempted job gets SIGTERM from Kubernetes or SLURM (and SIGUSR1 from SLURM's ``--signal=USR1@<s>``
ahead of its time limit), then SIGKILL after a grace period. Python's default is to die at once, losing
every step since the last checkpoint. While :meth:`StopSignals.installed` is active the signal only
records a request; the training loop polls it at its *stop points* and raises :class:`StopRequested`
there, where the state is consistent:

* between steps, and inside a step before its first optimizer update (every denoising step of the
  rollout, while waiting for the rewards, every forward/backward of the first update): the step is
  abandoned and the state from before it is checkpointed (its RNG and prompt state were captured at
  its start, so the resumed run repeats it exactly);
* once a step has updated the weights it is finished first (the rest of its updates), then checkpointed;
* during an evaluation (every denoising step): the evaluation is abandoned, nothing of it is recorded,
  and the resumed run evaluates again.

The trainer then raises :class:`TrainingStopped`, and ``python -m otca_fast.train`` exits with 75
(``EX_TEMPFAIL``: try again, with ``--resume``). A second signal while stopping is reported and ignored
(the checkpoint is being written). Under ``torchrun`` every rank polls the request together (an
all-reduce at each stop point), so all ranks stop at the same point and checkpoint collectively.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["EXIT_STOPPED", "STOP_SIGNALS", "StopRequested", "StopSignals", "TrainingStopped"]

EXIT_STOPPED = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, retry (with --resume)
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


class StopRequested(Exception):
    """Raised at a stop point after a stop signal. ``local``: raised where the ranks are not in step (while
    waiting for this rank's rewards), to be agreed on by every rank before it stops them."""

    def __init__(self, signal_name: str, *, local: bool = False):
        super().__init__(f"stop requested by {signal_name}")
        self.signal_name, self.local = signal_name, local


class TrainingStopped(Exception):
    """Training stopped on a signal after checkpointing; the message says when and where the checkpoint is."""

    def __init__(self, message: str, *, signal_name: str, step: int, checkpoint: Path | None):
        super().__init__(message)
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


def announce_on_stderr(message: str) -> None:
    """What a run says when a stop signal arrives: plain stderr (it is called from a signal handler, where the
    console's lock may be held)."""
    sys.stderr.write(f"otca-train: {message}\n")
    sys.stderr.flush()


class StopSignals:
    """The stop requests of one run: which stop signal arrived first (``requested``), if any."""

    def __init__(self, announce: Callable[[str], None] | None = None):
        self.requested: str | None = None
        self._announce = announce

    def request(self, signal_name: str) -> None:
        """Record a stop request (what the signal handler does; callable directly, e.g. by a test)."""
        if self.requested is None:
            self.requested = signal_name
            self._say(f"got {signal_name}: stopping at the next safe point, then checkpointing")
        else:
            self._say(f"got {signal_name} again: already stopping (the checkpoint is on its way)")

    def _say(self, message: str) -> None:
        if self._announce is not None:
            self._announce(message)

    def _handle(self, signum: int, frame) -> None:
        self.request(signal.Signals(signum).name)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignals]:
        """Handle the stop signals for the duration, then put the previous handlers back. Outside the main
        thread (where Python cannot install handlers) nothing is installed."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {}
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

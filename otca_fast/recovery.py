"""What a run checkpoints when it ends early, and what it says about it.

* a **stop signal** (SIGTERM / SIGUSR1, :mod:`otca_fast.preemption`): the state to resume from is checkpointed
  (the step under way is abandoned if it had not updated the weights yet) → :class:`TrainingStopped`;
* a **failure** in a step (a reward that raises, a NaN): the last good state, captured before the step, is
  checkpointed, unless the step had already updated the weights (a checkpoint would mix the two states);
* a checkpoint **write that fails** (a full disk, non-finite weights) → :class:`TrainingError` naming the latest
  intact checkpoint.

On several ranks every rank gets to each of these together, so every checkpoint is written collectively.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from otca_fast import checkpoint as ckpt
from otca_fast.errors import TrainingError
from otca_fast.preemption import StopRequested, TrainingStopped

__all__ = ["Recovery"]

State = dict[str, Any]


class Recovery:
    """``write(step, state)`` checkpoints the run's weights with ``state`` (the run's own checkpoint writer);
    ``current()`` is the run's training state now."""

    def __init__(self, output_dir: Path, write: Callable[[int, State], Path], current: Callable[[], State], *,
                 all_ranks: bool):
        self.output_dir, self._write, self._current, self._all_ranks = output_dir, write, current, all_ranks

    def save_or_stop(self, step: int, state: State) -> Path:
        """Write a checkpoint; a write that fails stops training with a :class:`TrainingError` naming the latest
        checkpoint that is intact."""
        try:
            return self._write(step, state)
        except ckpt.CheckpointWriteError as e:
            latest = ckpt.latest_checkpoint(self.output_dir)
            error = TrainingError(f"step {step}: {e} (latest checkpoint: {latest if latest is not None else 'none'})")
            error.all_ranks = self._all_ranks  # agreed on by every rank (distributed.agree)
            raise error from e

    def after_failure(self, step: int, good_state: State | None, *, updated: bool) -> str:
        """Checkpoint the last good state after a failure in ``step``; says where (for the message).

        ``good_state``: the state captured before the step (None for an evaluation after a completed step,
        whose current training state is sound); ``updated``: the step had already updated the weights."""
        latest = ckpt.latest_checkpoint(self.output_dir)
        try:
            if good_state is None:
                current = self._current()
                return f"; the state after step {step} is checkpointed in {self._write(int(current['step']), current)}"
            if updated:
                # the weights are no longer those of the state captured before the step; do not write a
                # checkpoint that mixes the two
                return (f"; the weights were already updated in step {step}, so no new checkpoint is written "
                        f"(latest: {latest if latest is not None else 'none'})")
            if step > 0:
                path = self._write(step - 1, good_state)
                return f"; the last good state (step {step - 1}) is checkpointed in {path}"
        except ckpt.CheckpointWriteError as e:
            return f"; the last good state could not be checkpointed: {e} (latest: {latest or 'none'})"
        return ""

    def stopped(self, stop: StopRequested, before_step: State | None, *, evaluating: int | None) -> TrainingStopped:
        """Checkpoint the state to resume from after a stop signal (unless that very state is checkpointed
        already); the exception that ends the run. ``before_step``: the state before a step that was under way
        (it is abandoned), else None (the current state); ``evaluating``: the step of an evaluation under way."""
        state = before_step if before_step is not None else self._current()
        step = int(state["step"])
        if before_step is not None:
            what = f"during step {step + 1} (abandoned: it had not updated the weights; it runs again on resume)"
        elif evaluating is not None:
            what = f"during the evaluation at step {step} (abandoned: it runs again on resume)"
        else:
            what = f"after step {step}"
        latest = ckpt.latest_checkpoint(self.output_dir)
        # the checkpoint of this very state may be written already (at the step's end, or the one resumed from)
        path = latest if latest is not None and latest.name == f"step_{step:08d}" else self.save_or_stop(step, state)
        return TrainingStopped(f"stopped by {stop.signal_name} {what}; the state after step {step} is checkpointed "
                               f"in {path}; continue with --resume", signal_name=stop.signal_name, step=step,
                               checkpoint=path)

"""Keeping several ranks in step: failures exchanged before each collective, FSDP's idle passes, gradient sync.

A single process needs none of this: every method then reduces to the plain operation (``run(fn)`` is
``fn()``, a held error is raised at once, nothing is reduced). The trainer calls it at these points, so that
its loop shows only the math:

* :meth:`Lockstep.stop_point` — a stop signal (SIGTERM / SIGUSR1) is honoured by every rank at the same point;
* :meth:`Lockstep.run` — rank-local work (a rollout, the credit inputs, an evaluation); a failure on one rank
  is announced to all before the next collective, so every rank stops at the same point;
* :meth:`Lockstep.pairs` / :meth:`Lockstep.needs_idle_pass` — the (sample, step) pairs of an optimizer update
  on *all* ranks (the loss normaliser) and whether this rank must run a zero-weighted pass to keep FSDP's
  forward/backward collectives in step with ranks that train a slot it has no pair in;
* :meth:`Lockstep.hold` / :meth:`Lockstep.finish_update` — a non-finite loss is held until the update's end,
  announced, and the gradients averaged (DDP; FSDP reduced them in backward);
* :meth:`Lockstep.reduce_stats` — the step's loss statistics over the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from otca_fast import distributed
from otca_fast.errors import TrainingError
from otca_fast.preemption import StopRequested, StopSignals

__all__ = ["Lockstep"]


class Lockstep:
    """The ranks of one job in step. ``signals`` are this rank's stop signals; ``may_stop()`` says whether it
    may stop now (not once the step has updated the weights: it is finished first)."""

    def __init__(self, dist: distributed.DistContext, signals: StopSignals, may_stop: Callable[[], bool]):
        self.dist = dist
        self._signals, self._may_stop = signals, may_stop
        self._forwards_done = True
        self._held_reward_error: BaseException | None = None
        self.held: BaseException | None = None  # a non-finite loss in the current optimizer update
        self._per_rank: torch.Tensor | None = None

    @property
    def fsdp(self) -> bool:
        """FSDP forwards and backwards are collectives: every rank must run the same ones (the strategy is
        resolved when the model is prepared, so it is read here each time)."""
        return self.dist.strategy == "fsdp"

    # --- stop points ------------------------------------------------------------------------------------

    def stop_point(self) -> None:
        """Raise :class:`StopRequested` if a stop signal arrived, on any rank (an all-reduce, so every rank stops
        at this same point); never once the step has updated the weights (it is finished first, the checkpoint
        then taken at its end)."""
        if not self._may_stop():
            return
        if distributed.any_rank(self.dist, self._signals.requested is not None):
            raise StopRequested(self._signals.requested or "a stop signal to another rank")

    def poll_stop(self) -> None:
        """The stop point while waiting for this rank's rewards: ranks are not in step there, so on several ranks
        the request is agreed on by :meth:`run` before anyone stops."""
        if self._signals.requested is not None and self._may_stop():
            raise StopRequested(self._signals.requested, local=self.dist.enabled)

    # --- rank-local work ------------------------------------------------------------------------------

    def run(self, fn, *, forwards: bool = False):
        """``fn()``; on several ranks an exception is held, and every rank then calls
        ``distributed.check_errors`` before its next collective, so a failure on one rank (a reward that raises,
        a NaN) stops every rank at the same point with a :class:`distributed.RankFailure` naming it.

        Under FSDP every forward is itself a collective: a failure before ``fn``'s forwards are all done
        (``forwards``, until :meth:`raise_held`) cannot be announced in step with the others, so it is recorded
        in the rendezvous store and this rank stops (the others end on their broken collective or the
        process-group timeout)."""
        if not self.dist.enabled:
            return fn()
        self._forwards_done = not (forwards and self.fsdp)
        error, out, stop = None, None, False
        try:
            out = fn()
        except distributed.RankFailure:
            raise
        except StopRequested as e:
            if not e.local:  # a stop point every rank passed together: all raise it here
                raise
            stop = True  # this rank stopped waiting for its rewards: the ranks agree below
        except Exception as e:  # noqa: BLE001 - held, then raised on every rank by check_errors
            if not self._forwards_done:
                raise TrainingError(distributed.fatal_message(self.dist, e)) from e
            error = e
        # also a stop point: the same all-reduce carries every rank's stop request
        stop = stop or (self._signals.requested is not None and self._may_stop())
        if distributed.check_errors(self.dist, error, stop=stop):
            raise StopRequested(self._signals.requested or "a stop signal to another rank")
        return out

    def scorer(self, score, columns: int):
        """``score`` as a reward function. Several ranks: a failure is held (NaN scores of ``columns`` objectives
        are returned, so the rollout finishes its forwards) and raised by :meth:`raise_held`."""
        if not self.dist.enabled:
            return score

        def held(frames, prompts, **kwargs):
            try:
                return score(frames, prompts, **kwargs)
            except Exception as e:  # noqa: BLE001 - re-raised by raise_held
                if self._held_reward_error is None:
                    self._held_reward_error = e
                return torch.full((frames.shape[0], columns), float("nan"))

        return held

    def raise_held(self) -> None:
        """The end of a rank-local pass's forwards: raise a reward failure :meth:`scorer` held."""
        self._forwards_done = True
        if self._held_reward_error is not None:
            error, self._held_reward_error = self._held_reward_error, None
            raise error

    # --- the update ---------------------------------------------------------------------------------------

    def begin_step(self, valid: torch.Tensor) -> None:
        """``valid [N, M]``: the trained pairs of the whole batch (every rank's equal share of the rows)."""
        self._per_rank = valid.view(self.dist.world_size, -1, valid.shape[1])  # [W, N/W, M]
        self.held = None

    def pairs(self, chunks: list[slice]) -> int:
        """The pairs an optimizer update over this rank's ``chunks`` (local rows) trains on all ranks."""
        return sum(int(self._per_rank[:, rows].sum()) for rows in chunks)

    def needs_idle_pass(self, rows: slice, j: int) -> bool:
        """FSDP: whether some rank trains slot ``(rows, j)``, so a rank with no pair there runs an idle pass."""
        return self.fsdp and bool(self._per_rank[:, rows, j].any())

    def hold(self, error: BaseException, output: torch.Tensor) -> None:
        """A non-finite loss: a single process raises it; several ranks hold it until :meth:`finish_update`
        (FSDP still runs the backward of ``output``, zero-weighted, to stay in step)."""
        if not self.dist.enabled:
            raise error
        self.held = error
        if self.fsdp:
            (output.float().sum() * 0.0).backward()

    def finish_update(self, params: list[torch.nn.Parameter]) -> None:
        """Before the optimizer step: announce a held failure to every rank, then average the gradients."""
        if self.dist.enabled:
            distributed.check_errors(self.dist, self.held)
            distributed.sync_gradients(self.dist, params)  # ddp; fsdp reduced them in backward

    def reduce_stats(self, sums: dict[str, float], pairs: int, ratio_dev_max: float) -> tuple[dict[str, float],
                                                                                              int, float]:
        """The step's statistics over the whole batch (sums and pair counts added, the deviation's maximum)."""
        if not self.dist.enabled:
            return sums, pairs, ratio_dev_max
        keys = list(sums)
        total = distributed.all_reduce(self.dist, torch.tensor([sums[key] for key in keys] + [pairs],
                                                               dtype=torch.float64))
        sums = {key: float(total[i]) for i, key in enumerate(keys)}
        ratio_dev_max = float(distributed.all_reduce(self.dist, torch.tensor([ratio_dev_max], dtype=torch.float64),
                                                     "max")[0])
        return sums, int(total[-1]), ratio_dev_max

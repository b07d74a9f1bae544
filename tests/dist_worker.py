"""Helpers that tests/test_distributed.py runs inside ``torchrun`` workers (not a test module).

* ``python -m torch.distributed.run ... tests/dist_worker.py DUMP CONFIG [--set ...]`` runs the
  trainer's CLI (``otca_fast.train.main``) and saves what every rank computed — the advantages
  ``A [N, T]`` of every step and the rank's own rows — to ``DUMP/rank{R}.pt``.
  With ``OTCA_TEST_BREAK_ROLLOUT=R:S`` a rollout forward raises on rank R from step S on (a failure
  that cannot be held until a check point under FSDP). With ``OTCA_TEST_SIGTERM_AT=S`` rank 0 sends
  SIGTERM to torchrun (its parent) as step S's rollout starts: torchrun forwards it to every worker,
  as when a scheduler preempts the job. With ``OTCA_TEST_UNEVEN_PAIRS=1`` samples 0, 5 and 6 drop their
  second trained step (a scheme whose samples train different numbers of steps: on 2 ranks with one sample
  per chunk, a rank then has no pair at a (chunk, step) slot the other rank trains). The exit status of
  every rank goes to ``DUMP/exit{R}.txt``.
* ``dist_worker:Pixel`` / ``OtherPixel``: one pixel's value as a reward (no 8-bit rounding), for the 1-vs-2-process
  equality tests.
* ``dist_worker:FailOnRank`` is a user reward (``package.module:callable``) that raises on one rank
  from one step on: the failing-rank test.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch


class Pixel:
    """The value of one pixel of the decoded clip: a reward without 8-bit rounding or float sums, whose
    spread within a group is large (for the 1-vs-2-process equality tests)."""

    def __init__(self, frame: int = 0, channel: int = 0, y: int = 8, x: int = 8):
        self.at = (frame, channel, y, x)

    def __call__(self, frames, prompts):
        f, c, y, x = self.at
        return frames[:, f, c, y, x].float()


class OtherPixel(Pixel):
    """A second objective: another pixel, of another channel and frame."""

    def __init__(self, frame: int = -1, channel: int = 1, y: int = 4, x: int = 11):
        super().__init__(frame, channel, y, x)


class FailOnRank:
    """Brightness, except that it raises on rank ``rank`` from its ``fail_at``-th call on."""

    def __init__(self, rank: int = 1, fail_at: int = 2):
        from otca_fast.rewards import build_reward

        self.fn = build_reward("brightness").fn
        self.rank, self.fail_at, self.calls = rank, fail_at, 0

    def __call__(self, frames, prompts):
        import torch.distributed as dist

        self.calls += 1
        me = dist.get_rank() if dist.is_initialized() else 0
        if me == self.rank and self.calls >= self.fail_at:
            raise RuntimeError(f"simulated reward outage on rank {me}")
        return self.fn(frames, prompts)


def main() -> int:
    from otca_fast import train
    from otca_fast.trainer import Trainer

    dump = Path(sys.argv[1])
    dump.mkdir(parents=True, exist_ok=True)
    seen: list[dict] = []
    real = Trainer.compute_credit

    def recording(self, step, rollout, group_ids):
        credit = real(self, step, rollout, group_ids)
        seen.append({"step": step, "A": credit.advantages.clone(), "rows": (rollout.rows.start, rollout.rows.stop),
                     "rewards": credit.rewards.clone(), "world_size": self.dist.world_size,
                     "strategy": self.dist.strategy})
        return credit

    Trainer.compute_credit = recording
    idle = [0]
    real_idle = Trainer._idle_pass

    def counting(self, *args, **kwargs):
        idle[0] += 1
        return real_idle(self, *args, **kwargs)

    Trainer._idle_pass = counting
    brk = os.environ.get("OTCA_TEST_BREAK_ROLLOUT")  # "RANK:STEP": a rollout forward raises there
    if brk:
        import otca_fast.trainer as trainer_module

        rank, at = (int(v) for v in brk.split(":"))
        real_sample = trainer_module.sample_trajectories

        class Broken:
            def __init__(self, backbone):
                self._backbone = backbone

            def __getattr__(self, name):
                return getattr(self._backbone, name)

            def velocity(self, *args, **kwargs):
                raise RuntimeError(f"simulated device fault in a rollout forward on rank {rank}")

        def breaking(backbone, *args, step=0, **kwargs):
            me = int(os.environ.get("RANK", "0"))
            if me == rank and step >= at:
                backbone = Broken(backbone)
            return real_sample(backbone, *args, step=step, **kwargs)

        trainer_module.sample_trajectories = breaking
    if os.environ.get("OTCA_TEST_UNEVEN_PAIRS"):
        real_choose = Trainer.choose_timesteps

        def uneven(self, sde_mask, credit):
            steps = real_choose(self, sde_mask, credit)
            assert steps.index.shape[1] >= 2, "OTCA_TEST_UNEVEN_PAIRS needs 2 trained steps per sample"
            steps.valid = steps.valid.clone()
            steps.valid[[0, 5, 6], 1] = False
            return steps

        Trainer.choose_timesteps = uneven
    sigterm_at = os.environ.get("OTCA_TEST_SIGTERM_AT")
    if sigterm_at:
        import signal

        real_rollout = Trainer.rollout

        def preempted(self, step, prompts):
            if step == int(sigterm_at) and self.dist.rank == 0:
                os.kill(os.getppid(), signal.SIGTERM)
            return real_rollout(self, step, prompts)

        Trainer.rollout = preempted
    code = train.main(sys.argv[2:])
    (dump / f"exit{os.environ.get('RANK', '0')}.txt").write_text(str(code))
    for record in seen:
        record["idle_passes"] = idle[0]  # FSDP lockstep passes of this rank over the whole run
    torch.save(seen, dump / f"rank{os.environ.get('RANK', '0')}.pt")
    return code


if __name__ == "__main__":
    sys.exit(main())

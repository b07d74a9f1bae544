"""``run.output_dir``: one run per directory, how a run starts or continues there, and its logs.

A new run needs a directory without checkpoints (or ``--overwrite``, which deletes only the trainer's own
outputs); ``--resume`` needs a checkpoint. The leftovers of a killed checkpoint write are removed first, and on
resume nothing the abandoned steps wrote after the checkpoint is trusted: their evaluations, clips, plots and
log lines go.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from otca_fast import checkpoint as ckpt
from otca_fast import distributed, report, runlock
from otca_fast.config import Config, ConfigError
from otca_fast.evaluation import Evaluation
from otca_fast.wandb_log import ID_FILE as WANDB_ID_FILE

__all__ = ["lock", "prepare", "open_logs", "base_evaluation", "evaluation_file"]


def lock(output_dir: Path, dist: distributed.DistContext, warn: Callable[[str], None]) -> runlock.RunLock | None:
    """Rank 0 locks ``output_dir`` for the run's life; if another run holds it, every rank fails."""
    held, error = None, None
    if dist.is_main:
        try:
            held = runlock.acquire(output_dir, warn=warn,
                                   note=f"torchrun, {dist.world_size} ranks" if dist.enabled else None)
        except runlock.RunLockError as e:
            error = e
    distributed.agree(dist, error, runlock.RunLockError)
    return held


def prepare(output_dir: Path, dist: distributed.DistContext, *, resume: bool, overwrite: bool,
            warn: Callable[[str], None]) -> None:
    """Check that a run may start (or continue) in ``output_dir``; ``overwrite`` deletes an earlier run's outputs."""
    if dist.is_main:
        for done in ckpt.remove_stale_temporaries(output_dir):
            warn(f"{output_dir / ckpt.CHECKPOINT_SUBDIR}: {done}")
    found = ckpt.checkpoint_dirs(output_dir)
    if resume and not found:
        raise FileNotFoundError(f"--resume: no checkpoint in {output_dir / ckpt.CHECKPOINT_SUBDIR} "
                                f"(run without --resume to start a new run)")
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other (continue a run, or start it over)")
    if not resume and found:
        if not overwrite:
            raise FileExistsError(f"run.output_dir {output_dir} already holds a run (latest checkpoint: "
                                  f"{found[-1][1].name}); pass --resume to continue it, --overwrite to start it "
                                  f"over, or choose another run.output_dir")
        if dist.is_main:  # only the trainer's own outputs
            for name in (ckpt.CHECKPOINT_SUBDIR, "tb", "report"):
                shutil.rmtree(output_dir / name, ignore_errors=True)
            for name in ("metrics.jsonl", "config.yaml", WANDB_ID_FILE):  # a new wandb run (offline runs stay)
                (output_dir / name).unlink(missing_ok=True)
    distributed.barrier(dist)


def open_logs(cfg: Config, dist: distributed.DistContext, *, resumed_at: int | None, rerun_evaluation: bool,
              warn: Callable[[str], None]) -> report.MetricsLog | distributed.NullMetrics:
    """``config.yaml``, ``report/`` and the metrics log (rank 0's; other ranks log nothing).

    ``resumed_at``: the step a resumed run continues from (the report files of later steps are removed);
    ``rerun_evaluation``: that step's evaluation runs again, so its logged ``eval/`` lines are dropped."""
    if not dist.is_main:
        return distributed.NullMetrics()
    output_dir = Path(cfg.run.output_dir)
    report_dir = output_dir / "report"
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(cfg.to_yaml())
    report_dir.mkdir(exist_ok=True)
    if resumed_at is not None:
        removed = report.discard_report_files_after(report_dir, resumed_at)
        if removed:
            warn(f"{report_dir}: removed {len(removed)} file(s) of the steps after the checkpoint (step {resumed_at})"
                 f": {', '.join(f.name for f in removed[:4])}{', ...' if len(removed) > 4 else ''}")
    at = resumed_at
    return report.MetricsLog(
        output_dir, tensorboard=cfg.run.tensorboard, resume_step=resumed_at, wandb=cfg.run.wandb,
        run_config=cfg.model_dump(mode="json"), warn=warn,
        drop=(lambda r: r.get("step") == at and any(k.startswith("eval/") for k in r)) if rerun_evaluation else None)


def base_evaluation(output_dir: Path, *, resumed_at: int | None, evaluates: bool,
                    warn: Callable[[str], None]) -> Evaluation | None:
    """A resumed run's first evaluation (the base model's), which every later one is compared with, clip for
    clip; None for a new run (its first evaluation is still to come)."""
    base_file = evaluation_file(output_dir, 0)
    if resumed_at is not None and base_file.is_file():
        return Evaluation.load(base_file)
    if resumed_at and evaluates:
        warn(f"{base_file} is missing: the evaluations of this run are compared with the next one instead of the "
             f"base model's")
    return None


def evaluation_file(output_dir: Path, step: int) -> Path:
    """The per-clip record of the evaluation at ``step``; its presence says the evaluation completed."""
    return Path(output_dir) / "report" / "eval" / f"step_{step:06d}.json"

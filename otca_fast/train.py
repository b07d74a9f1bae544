"""The command line: ``python -m otca_fast.train CONFIG [--set key.path=value ...] [--resume | --auto-resume |
--overwrite]``.

Also installed as the console script ``otca-train``. With no CONFIG it runs the embedded default,
``configs/tiny_video.yaml`` of the source tree (a tiny model that trains on a laptop CPU).

Exit status: 0 on success; 1 when training stops on an error (a failing reward, a non-finite
loss, a checkpoint that cannot be written; the message says where, and a checkpoint of the last good
state is written first when it can be); 2 for a bad command line or config, an ``--resume`` without a
valid checkpoint, or a ``run.output_dir`` in use by another run; 75 when stopped by SIGTERM or SIGUSR1
(preemption: the state is checkpointed, continue with ``--resume``); 130 when interrupted (Ctrl-C: no new
checkpoint; the message says which one to resume from, if any).

Under ``torchrun --nproc_per_node N -m otca_fast.train CONFIG`` every rank runs this same command
(``otca_fast.distributed``); rank 0 prints. A failure on one rank stops every rank with exit status 1
and a message naming the rank and the cause ("rank 1: reward ... failed ...").
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from otca_fast.preemption import EXIT_STOPPED

__all__ = ["main", "build_parser", "default_config_path"]

EXIT_OK, EXIT_TRAINING_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
__all__ += ["EXIT_OK", "EXIT_TRAINING_ERROR", "EXIT_USAGE", "EXIT_STOPPED", "EXIT_INTERRUPTED"]


def default_config_path() -> Path | None:
    """``configs/tiny_video.yaml`` next to the package in a source checkout, if it is there."""
    p = Path(__file__).resolve().parent.parent / "configs" / "tiny_video.yaml"
    return p if p.is_file() else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otca-train",
        description="GRPO post-training of flow-matching image/video generators with structured credit (OTCA).",
        epilog="example: python -m otca_fast.train configs/tiny_video.yaml --set train.max_steps=20 "
               "--set run.output_dir=runs/try1",
    )
    parser.add_argument("config", nargs="?", default=None,
                        help="YAML config (default: configs/tiny_video.yaml of the source tree)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a config value (YAML-parsed), e.g. --set train.max_steps=100; repeatable")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in run.output_dir")
    parser.add_argument("--auto-resume", action="store_true",
                        help="resume if run.output_dir holds a checkpoint, else start a new run: one command for a job "
                             "that a scheduler may preempt and requeue")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in a run.output_dir that already holds a run (deletes its checkpoints, "
                             "metrics, tb/ and report/)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (defaults filled in) and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from rich.console import Console

    from otca_fast import distributed

    # under torchrun every rank runs this: usage errors are printed once, by rank 0
    err = Console(stderr=True, quiet=distributed.env_rank() != 0)
    config_path = args.config
    if config_path is None:
        default = default_config_path()
        if default is None:
            parser.print_usage(sys.stderr)
            err.print("otca-train: error: give a CONFIG (no configs/tiny_video.yaml next to the package to default to)",
                      highlight=False, soft_wrap=True)
            return EXIT_USAGE
        config_path = default
        err.print(f"no CONFIG given: using the embedded default {default}", highlight=False)

    from otca_fast.config import ConfigError, load_config

    try:
        cfg = load_config(config_path, args.overrides)
    except ConfigError as e:
        err.print(f"otca-train: {e}", highlight=False, markup=False, soft_wrap=True)
        return EXIT_USAGE
    if args.print_config:
        sys.stdout.write(cfg.to_yaml())
        return EXIT_OK

    from otca_fast.checkpoint import CheckpointError
    from otca_fast.preemption import TrainingStopped
    from otca_fast.runlock import RunLockError
    from otca_fast.trainer import Trainer, TrainingError

    try:
        ctx = distributed.setup(cfg.run.device, cfg.distributed.timeout_s)  # a single process: no-op
    except (ConfigError, ValueError) as e:
        err.print(f"otca-train: {e}", highlight=False, markup=False, soft_wrap=True)
        return EXIT_USAGE
    resume = args.resume
    if args.auto_resume:
        if args.resume or args.overwrite:
            err.print("otca-train: --auto-resume decides between --resume and a new run itself: give it alone",
                      highlight=False)
            distributed.shutdown(ctx)
            return EXIT_USAGE
        from otca_fast.checkpoint import checkpoint_dirs

        resume = bool(checkpoint_dirs(cfg.run.output_dir))
    try:
        trainer = Trainer(cfg, resume=resume, overwrite=args.overwrite, console=err, dist=ctx)
    except (ConfigError, FileExistsError, FileNotFoundError, CheckpointError, RunLockError) as e:
        err.print(f"otca-train: {e}", highlight=False, markup=False, soft_wrap=True)
        distributed.shutdown(ctx)
        return EXIT_USAGE
    except KeyboardInterrupt:  # the half-built trainer has released what it held
        err.print("otca-train: interrupted while setting up the run; nothing was trained", highlight=False)
        return EXIT_INTERRUPTED
    clean = True  # every rank is still in step (the process group can be torn down in order)
    previous_sigint = None
    try:
        trainer.train()
    except TrainingStopped as e:  # SIGTERM / SIGUSR1: every rank checkpointed together
        err.print(f"otca-train: {e}", highlight=False, markup=False, soft_wrap=True)
        return EXIT_STOPPED
    except TrainingError as e:
        # a failure announced to every rank (RankFailure, or agreed on) is printed once, by rank 0; a rank's
        # own unannounced failure by that rank
        announced = isinstance(e.__cause__, distributed.RankFailure) or e.all_ranks
        loud = Console(stderr=True) if not announced else err
        clean = announced or not ctx.enabled
        loud.print(f"otca-train: training stopped: {e}", highlight=False, markup=False, soft_wrap=True)
        return EXIT_TRAINING_ERROR
    except KeyboardInterrupt:
        previous_sigint = _exit_on_a_second_interrupt()
        err.print(f"otca-train: interrupted {_where(trainer)}; {_resume_advice(cfg.run.output_dir)}",
                  highlight=False, markup=False, soft_wrap=True)
        clean = not ctx.enabled
        return EXIT_INTERRUPTED
    except Exception as e:
        if not ctx.enabled:
            raise
        # several ranks: this rank's own unexpected failure (left in the rendezvous store for the others),
        # or its collective broken because another rank failed (named from the store)
        clean = False
        if distributed.recorded_failure(ctx) is None:
            import traceback

            traceback.print_exc()  # this rank's own failure: its traceback too
        Console(stderr=True).print(f"otca-train: training stopped: {distributed.fatal_message(ctx, e)}",
                                   highlight=False, markup=False, soft_wrap=True)
        return EXIT_TRAINING_ERROR
    finally:
        trainer.close()
        if clean:
            distributed.shutdown(ctx)
        if previous_sigint is not None:
            signal.signal(signal.SIGINT, previous_sigint)
    return EXIT_OK


def _exit_on_a_second_interrupt():
    """After the first Ctrl-C the run is being torn down (logs closed, the lock released); a second one
    exits at once (status 130) instead of raising a KeyboardInterrupt traceback out of the clean-up.
    Returns the handler to put back afterwards (None outside the main thread, where nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def now(signum, frame):
        sys.stderr.write("otca-train: interrupted again: exiting now\n")
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)

    return signal.signal(signal.SIGINT, now) or signal.default_int_handler


def _where(trainer) -> str:
    if trainer._evaluating is not None:
        return f"during the evaluation at step {trainer._evaluating}"
    return f"during step {trainer.step + 1}"


def _resume_advice(output_dir) -> str:
    """What to do next, true to what is on disk: resume from a checkpoint, or start again without one."""
    from otca_fast.checkpoint import latest_checkpoint

    latest = latest_checkpoint(output_dir)
    if latest is None:
        return ("no checkpoint was written yet, so there is nothing to resume: run the same command again (without "
                "--resume) to start over")
    return f"the last checkpoint is {latest} (continue with --resume)"


if __name__ == "__main__":
    sys.exit(main())

"""The command line: ``python -m otca_fast.train CONFIG [--set key.path=value ...] [--resume | --overwrite]``.

Also installed as the console script ``otca-train``. With no CONFIG it runs the embedded default,
``configs/tiny_video.yaml`` of the source tree (a tiny model that trains on a laptop CPU).

Exit status: 0 on success; 1 when training stops on an error (a failing reward, a non-finite
loss; the message says where, and a checkpoint of the last good state is written first); 2 for a
bad command line or config; 130 when interrupted (Ctrl-C; resume from the last checkpoint).

Under ``torchrun --nproc_per_node N -m otca_fast.train CONFIG`` every rank runs this same command
(``otca_fast.distributed``); rank 0 prints. A failure on one rank stops every rank with exit status 1
and a message naming the rank and the cause ("rank 1: reward ... failed ...").
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "build_parser", "default_config_path"]

EXIT_OK, EXIT_TRAINING_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


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

    from otca_fast.trainer import Trainer, TrainingError

    try:
        ctx = distributed.setup(cfg.run.device, cfg.distributed.timeout_s)  # a single process: no-op
    except (ConfigError, ValueError) as e:
        err.print(f"otca-train: {e}", highlight=False, markup=False, soft_wrap=True)
        return EXIT_USAGE
    try:
        trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite, console=err, dist=ctx)
    except (ConfigError, FileExistsError, FileNotFoundError) as e:
        err.print(f"otca-train: {e}", highlight=False, markup=False, soft_wrap=True)
        distributed.shutdown(ctx)
        return EXIT_USAGE
    clean = True  # every rank is still in step (the process group can be torn down in order)
    try:
        trainer.train()
    except TrainingError as e:
        # a failure announced to every rank (RankFailure) is printed once, by rank 0; a rank's own
        # unannounced failure by that rank
        loud = Console(stderr=True) if not isinstance(e.__cause__, distributed.RankFailure) else err
        clean = isinstance(e.__cause__, distributed.RankFailure) or not ctx.enabled
        loud.print(f"otca-train: training stopped: {e}", highlight=False, markup=False, soft_wrap=True)
        return EXIT_TRAINING_ERROR
    except KeyboardInterrupt:
        err.print(f"otca-train: interrupted during step {trainer.step + 1}; the last checkpoint is in "
                  f"{cfg.run.output_dir}/checkpoints (continue with --resume)", highlight=False, markup=False,
                  soft_wrap=True)
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
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

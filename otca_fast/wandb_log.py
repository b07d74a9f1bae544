"""Weights & Biases beside TensorBoard (``run.wandb`` of the config): the same scalars, the report images
and the evaluation clips, through :class:`otca_fast.report.MetricsLog`.

``mode: offline`` writes the run under ``$WANDB_DIR/wandb`` (else ``<output_dir>/wandb``) for a later
``wandb sync``; ``online`` needs ``wandb login`` (or ``WANDB_API_KEY``); ``disabled`` (the default) never
imports wandb. The wandb run id is kept in ``<output_dir>/wandb_id``, so ``--resume`` continues the same
wandb run (wandb keeps the first value logged for a step: the steps replayed after a resume are the
interrupted run's, which on a CPU are bit-identical anyway).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["WandbLog", "ID_FILE"]

ID_FILE = "wandb_id"


class WandbLog:
    """One wandb run of a training run (rank 0)."""

    def __init__(self, cfg, *, output_dir: str | Path, config: dict[str, Any], resume: bool) -> None:
        from otca_fast.config import ConfigError

        try:
            import wandb
        except ImportError:
            raise ConfigError(f"run.wandb.mode: {cfg.mode!r} needs the wandb package: pip install "
                              f"'otca_fast[wandb]' (or set run.wandb.mode: disabled)") from None
        self._wandb = wandb
        out = Path(output_dir)
        id_file = out / ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None   # None: a new id
        root = Path(os.environ.get("WANDB_DIR") or out)
        root.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, tags=list(cfg.tags),
                              config=config, name=out.name, id=run_id, resume="allow", dir=str(root))
        id_file.write_text(self.run.id + "\n")

    def log(self, step: int, record: dict[str, Any]) -> None:
        """The numeric values of a metrics record (lists and flags stay in metrics.jsonl, as for TensorBoard)."""
        scalars = {k: v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if scalars:
            self.run.log(scalars, step=step)

    def log_image(self, tag: str, path: str | Path, step: int) -> None:
        self.run.log({tag: self._wandb.Image(str(path))}, step=step)

    def log_clip(self, tag: str, paths: list[Path], step: int, fps: int) -> None:
        """A clip written by :func:`otca_fast.report.save_clip`: its MP4 as a wandb video (a PNG: an image)."""
        by_suffix = {Path(p).suffix: Path(p) for p in paths}
        if ".mp4" in by_suffix:
            self.run.log({tag: self._wandb.Video(str(by_suffix[".mp4"]), fps=fps, format="mp4")}, step=step)
        elif ".gif" in by_suffix:
            self.run.log({tag: self._wandb.Video(str(by_suffix[".gif"]), fps=fps, format="gif")}, step=step)
        elif ".png" in by_suffix:
            self.log_image(tag, by_suffix[".png"], step)

    def close(self) -> None:
        self.run.finish()

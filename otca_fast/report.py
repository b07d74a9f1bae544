"""What a run shows and leaves behind: metrics.jsonl, TensorBoard, PNG plots, clips, progress, summary.

* :class:`MetricsLog` — one JSON line per step in ``metrics.jsonl`` (flushed, so ``tail -f`` works)
  and the same scalars in TensorBoard (``tb/``) and, with ``run.wandb``, in Weights & Biases (with the
  report images and the clips; :mod:`otca_fast.wandb_log`). On resume the lines past the checkpoint and
  a torn last line are dropped with a warning (a missing log is recreated, saying what was lost),
  TensorBoard's ``purge_step`` hides the orphaned events and :func:`discard_report_files_after` deletes
  the report files of the abandoned steps.
* :func:`plot_rewards` / :func:`plot_training` — matplotlib PNGs under ``report/``.
* :func:`save_clip` — GIF and MP4 (imageio + ffmpeg) of a clip ``[F, C, H, W]`` in [0, 1]; PNG for images.
* :class:`RunProgress` — rich progress bars with ETA (terminal) or one plain line per step (logs).
* :func:`summary_table` — the rich table printed at the end of a run.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "MetricsLog", "read_metrics", "truncate_metrics", "discard_report_files_after", "plot_rewards", "plot_training",
    "save_clip", "RunProgress", "summary_table", "reward_record", "peak_memory_gb", "summary_line", "write_plots",
    "print_summary", "banner",
]


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    return value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (an absent file reads as no records)."""
    p = Path(path)
    if not p.is_file():
        return []
    records, bad = _parse_metrics(p)
    if bad:
        raise ValueError(f"{p}:{bad[0]}: not a JSON line (a run resumed with --resume drops a torn line)")
    return records


def _parse_metrics(p: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """The records of ``p`` and the numbers of the lines that are not a JSON object (a torn write)."""
    records, bad = [], []
    for i, line in enumerate(p.read_text(errors="replace").splitlines()):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict):
                records.append(record)
            else:
                bad.append(i + 1)
    return records, bad


def _step(record: dict[str, Any]) -> int:
    return int(record.get("step", 0))


def truncate_metrics(path: str | Path, last_step: int,
                     drop: Callable[[dict[str, Any]], bool] | None = None) -> list[str]:
    """Drop the records after ``last_step`` (a resumed run rewrites them), the lines that are not JSON (what a
    full disk or a power loss leaves) and those for which ``drop(record)`` is true; returns a warning for
    each kind of loss, including records of steps up to ``last_step`` that are missing."""
    p = Path(path)
    if not p.is_file():
        return [f"{p} is missing: the records of steps 0..{last_step} are lost (TensorBoard's tb/ may still hold "
                f"their scalars); the log restarts at step {last_step + 1}"]
    text = p.read_text(errors="replace")
    records, bad = _parse_metrics(p)
    warnings = []
    if bad:
        torn = "its last line is torn" if bad == [len(text.splitlines())] else \
            f"line(s) {', '.join(map(str, bad[:5]))}{', ...' if len(bad) > 5 else ''} are not JSON"
        warnings.append(f"{p}: {torn} (an interrupted write); dropped")
    keep = [r for r in records if _step(r) <= last_step and not (drop is not None and drop(r))]
    past = [_step(r) for r in records if _step(r) > last_step]
    if past:
        warnings.append(f"{p}: dropped {len(past)} record(s) past the checkpoint (steps {min(past)}..{max(past)}); "
                        f"the resumed run writes them again")
    last = max((_step(r) for r in keep), default=0)
    if last < last_step:
        warnings.append(f"{p}: ends at step {last} but the checkpoint is at step {last_step}: the records of "
                        f"steps {last + 1}..{last_step} are lost")
    if bad or len(keep) != len(records) or not text.endswith("\n"):  # (a line cut before its newline too)
        tmp = p.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        tmp.replace(p)
    return warnings


def discard_report_files_after(report_dir: str | Path, step: int) -> list[Path]:
    """Delete what the report holds of the steps after ``step`` (``report/eval/step_*.json``,
    ``report/clips/step_*``, ``report/credit_step_*.png``): a run resumed from the checkpoint of ``step``
    abandons those steps and must trust nothing of theirs. Returns the deleted files."""
    root = Path(report_dir)
    if not root.is_dir():
        return []
    removed = []
    for f in sorted(root.rglob("*")):
        m = re.match(r"^(?:credit_)?step_(\d+)", f.name)
        if m and f.is_file() and int(m.group(1)) > step:
            f.unlink()
            removed.append(f)
    return removed


class MetricsLog:
    """Append-only metrics: ``metrics.jsonl`` plus TensorBoard scalars, and wandb when ``wandb`` (a
    ``run.wandb`` config section) is not disabled; ``run_config`` is the run's config for wandb.

    ``resume_step``: continue the log of a run resumed from the checkpoint of that step (records after it
    and torn lines are dropped, each loss reported to ``warn``); ``drop`` drops more records (the trainer's
    evaluation at the resume step, when it runs it again)."""

    def __init__(self, output_dir: str | Path, *, tensorboard: bool = True, resume_step: int | None = None,
                 wandb=None, run_config: dict[str, Any] | None = None, warn: Callable[[str], None] | None = None,
                 drop: Callable[[dict[str, Any]], bool] | None = None):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        if resume_step is None:
            self.path.write_text("")
        else:
            for message in truncate_metrics(self.path, resume_step, drop):
                if warn is not None:
                    warn(message)
        self._file = open(self.path, "a")  # noqa: SIM115 - lives as long as the run
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events of steps >= it, left by the interrupted run, are ignored on load
            self._tb = SummaryWriter(log_dir=str(self.dir / "tb"),
                                     purge_step=None if resume_step is None else resume_step + 1)
        self._wandb = None
        if wandb is not None and wandb.mode != "disabled":
            from otca_fast.wandb_log import WandbLog

            self._wandb = WandbLog(wandb, output_dir=self.dir, config=run_config or {},
                                   resume=resume_step is not None)

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, global_step=step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(step, record)
        return record

    def add_image_file(self, tag: str, path: str | Path, step: int) -> None:
        """A report image (a PNG under ``report/``) for wandb."""
        if self._wandb is not None:
            self._wandb.log_image(tag, path, step)

    def add_clip(self, tag: str, paths: Sequence[Path], step: int, *, fps: int) -> None:
        """A clip written by :func:`save_clip` for wandb."""
        if self._wandb is not None:
            self._wandb.log_clip(tag, list(paths), step, fps)

    def add_image(self, tag: str, image_hwc: np.ndarray, step: int) -> None:
        if self._tb is not None:
            self._tb.add_image(tag, image_hwc, global_step=step, dataformats="HWC")

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------------

def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas, without pyplot (no global state, safe in any thread)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _save(fig, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(out)  # a reader (a browser refreshing report/) never sees half a PNG
    return out


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(int(r["step"]))
            ys.append(float(v))
    return xs, ys


def plot_rewards(records: Sequence[dict[str, Any]], reward_names: Sequence[str], path: str | Path, *,
                 metric_keys: Sequence[str] = ()) -> Path:
    """One panel per objective: the training reward mean (± std when logged) and the evaluation mean; then
    one panel per eval metric (``metric/<name>[/<part>]``, never trained on). An evaluation at which a trained
    reward rose while a metric fell (``eval/hacking_metrics``) is marked with a red cross on that metric's
    panel and a dotted red line on every reward panel."""
    n = max(1, len(reward_names) + len(metric_keys))
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = _figure(4.2 * cols, 3.0 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    alarms = [(int(r["step"]), r["eval/hacking_metrics"]) for r in records if r.get("eval/hacking_metrics")]
    for ax, name in zip(axes, reward_names):
        xs, ys = _series(records, f"reward/{name}")
        if xs:
            ax.plot(xs, ys, color="tab:blue", label="train (rollout mean)")
            sx, sd = _series(records, f"reward_std/{name}")
            if len(sx) == len(xs):
                lo = np.asarray(ys) - np.asarray(sd)
                hi = np.asarray(ys) + np.asarray(sd)
                ax.fill_between(xs, lo, hi, color="tab:blue", alpha=0.15, linewidth=0)
        ex, ey = _series(records, f"eval/reward/{name}")
        if ex:
            ax.plot(ex, ey, "o-", color="tab:orange", label="eval (EMA, ODE)")
        for i, (step, _) in enumerate(alarms):
            ax.axvline(step, color="tab:red", linestyle=":", linewidth=1,
                       label="a metric fell while a reward rose" if i == 0 else None)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax, key in zip(axes[len(reward_names):], metric_keys):
        name = key.removeprefix("metric/")
        ex, ey = _series(records, f"eval/{key}")
        if ex:
            ax.plot(ex, ey, "s-", color="tab:green", label="eval metric (never trained on)")
            at = dict(zip(ex, ey))
            marked = [(step, at[step]) for step, fell in alarms if name in fell and step in at]
            if marked:
                ax.plot(*zip(*marked), "x", color="tab:red", markersize=10, markeredgewidth=2,
                        label="fell while a reward rose")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in axes[n:]:
        ax.axis("off")
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.15, top=0.9, wspace=0.3, hspace=0.5)
    return _save(fig, path)


_TRAINING_PANELS = (("loss", "loss"), ("kl", "KL to reference"), ("approx_kl", "approx KL"),
                    ("clip_frac", "clip fraction"), ("grad_norm", "grad norm"), ("ratio_mean", "ratio mean"),
                    ("zero_std_ratio", "zero-std group ratio"), ("samples_per_s", "samples / s"))


def plot_training(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Loss, KL, clip fraction, gradient norm, ratio, zero-std ratio and throughput against the step."""
    fig = _figure(16, 6)
    axes = fig.subplots(2, 4)
    for ax, (key, title) in zip(axes.flat, _TRAINING_PANELS):
        xs, ys = _series(records, key)
        if xs:
            ax.plot(xs, ys, color="tab:green")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.09, top=0.93, wspace=0.3, hspace=0.45)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------
# clips
# ------------------------------------------------------------------------------------------------

def _to_uint8(frames: torch.Tensor) -> np.ndarray:
    if not isinstance(frames, torch.Tensor) or frames.dim() != 4 or frames.shape[1] not in (1, 3):
        raise ValueError(f"frames: expected a [F, C, H, W] tensor with C = 1 or 3, got "
                         f"{tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__}")
    if not torch.isfinite(frames).all():
        raise ValueError("frames: expected finite values in [0, 1], got NaN/Inf")
    x = (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return x


def save_clip(frames: torch.Tensor, stem: str | Path, *, fps: int = 8) -> list[Path]:
    """Write a clip ``[F, C, H, W]`` in [0, 1] as ``stem.gif`` and ``stem.mp4`` (``stem.png`` when F = 1)."""
    import imageio.v3 as iio

    x = _to_uint8(frames)
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    if x.shape[0] == 1:
        out = stem.with_suffix(".png")
        iio.imwrite(out, x[0])
        return [out]
    gif, mp4 = stem.with_suffix(".gif"), stem.with_suffix(".mp4")
    iio.imwrite(gif, x, duration=1000.0 / fps, loop=0)
    # libx264 with yuv420p needs even sides: pad by edge replication rather than let ffmpeg rescale
    h, w = x.shape[1], x.shape[2]
    if h % 2 or w % 2:
        x = np.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    # macro_block_size=1: keep the size (imageio-ffmpeg would otherwise rescale to multiples of 16)
    iio.imwrite(mp4, x, fps=fps, macro_block_size=1)
    return [gif, mp4]


# ------------------------------------------------------------------------------------------------
# progress and summary
# ------------------------------------------------------------------------------------------------

class RunProgress:
    """Progress with ETA: rich bars on a terminal (``rich``), one line per step (``plain``), or none.

    Bars: ``train`` over the run's steps, and one per phase of the current step (``rollout``,
    ``update``) that is reset every step.
    """

    def __init__(self, mode: str, *, total_steps: int, start_step: int = 0, log_every: int = 1, console=None):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        if mode == "auto":
            mode = "rich" if self.console.is_terminal else "plain"
        if mode not in ("rich", "plain", "none"):
            raise ValueError(f"mode: expected 'auto', 'rich', 'plain' or 'none', got {mode!r}")
        self.mode = mode
        self.total = total_steps
        self.start_step = start_step
        self.log_every = log_every
        self._t0 = time.perf_counter()
        self._progress = None
        self._tasks: dict[str, Any] = {}
        if mode == "rich":
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(TextColumn("[bold]{task.description:<8}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                      console=self.console)
            self._progress.start()
            self._tasks["train"] = self._progress.add_task("train", total=total_steps, completed=start_step)

    def phase(self, name: str, total: int) -> None:
        """Start (or restart) the bar of a phase of the current step."""
        if self._progress is None:
            return
        if name in self._tasks:
            self._progress.reset(self._tasks[name], total=total)
        else:
            self._tasks[name] = self._progress.add_task(name, total=total)

    def advance(self, name: str, amount: int = 1) -> None:
        if self._progress is not None and name in self._tasks:
            self._progress.advance(self._tasks[name], amount)

    def step_done(self, step: int, summary: str) -> None:
        """Advance the run bar; every ``log_every`` steps (and at the last) print ``summary``: above the
        live bars in rich mode, as a line with elapsed time and ETA in plain mode."""
        if self._progress is not None:
            self._progress.update(self._tasks["train"], completed=step)
        if self.mode == "none" or not (step % self.log_every == 0 or step == self.total):
            return
        if self._progress is not None:
            self._progress.console.print(f"step {step}/{self.total}  {summary}", highlight=False, markup=False,
                                         soft_wrap=True)
            return
        done = step - self.start_step
        elapsed = time.perf_counter() - self._t0
        eta = elapsed / max(done, 1) * (self.total - step)
        self.console.print(f"step {step}/{self.total}  {summary}  [elapsed {_hms(elapsed)}, eta {_hms(eta)}]",
                           highlight=False, markup=False, soft_wrap=True)

    def print(self, message: str) -> None:
        if self.mode != "none":
            self.console.print(message, highlight=False, markup=False, soft_wrap=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def summary_table(records: Sequence[dict[str, Any]], reward_names: Sequence[str], *, title: str = "run summary",
                  metric_keys: Sequence[str] = (), changes: dict[str, Any] | None = None):
    """A rich Table: per objective the first and last training reward and the first/last evaluation, then
    each eval metric. ``changes`` (``{key: stats.Interval}`` of the last evaluation against the first) adds
    the interval of each evaluated change, and says which are beyond the noise."""
    from rich.table import Table

    changes = changes or {}
    table = Table(title=title)
    columns = ["metric", "first", "last", "change"]
    level = next(iter(changes.values())).level if changes else None
    if changes:
        columns.append(f"{round(100 * level)}% interval (over prompts)")
    for col in columns:
        table.add_column(col, justify="left" if col == "metric" else "right")

    def row(label: str, key: str, change_key: str | None = None) -> None:
        _, ys = _series(records, key)
        if not ys:
            return
        cells = [label, f"{ys[0]:.4g}", f"{ys[-1]:.4g}", f"{ys[-1] - ys[0]:+.4g}"]
        if changes:
            c = changes.get(change_key) if change_key else None
            verdict = "" if c is None else (" rose" if c.above_zero else " fell" if c.below_zero else " (noise)")
            cells.append("" if c is None else f"[{c.lo:+.4f}, {c.hi:+.4f}]{verdict}")
        table.add_row(*cells)

    for name in reward_names:
        row(f"reward/{name}", f"reward/{name}")
        row(f"eval/reward/{name}", f"eval/reward/{name}", f"reward/{name}")
    for key in metric_keys:
        row(f"eval/{key}", f"eval/{key}", key)
    for key in ("reward/total", "loss", "kl", "clip_frac", "grad_norm", "samples_per_s", "peak_memory_gb"):
        row(key, key)
    return table


# ------------------------------------------------------------------------------------------------
# a training step's record
# ------------------------------------------------------------------------------------------------

def reward_record(rewards: torch.Tensor, reward_names: Sequence[str], weights: Sequence[float],
                  group_ids: torch.Tensor) -> dict[str, float]:
    """The rewards ``[N, K]`` of a step's batch: per objective the mean and spread, the weighted total, and the
    share of groups (``group_ids [N]``, 0..P−1) that carry no GRPO signal."""
    record: dict[str, float] = {}
    for k, name in enumerate(reward_names):
        record[f"reward/{name}"] = float(rewards[:, k].mean())
        record[f"reward_std/{name}"] = float(rewards[:, k].std(unbiased=False))
    w = torch.tensor(list(weights), dtype=torch.float32)
    record["reward/total"] = float((rewards * w).sum(1).mean())
    # a group whose every objective has zero spread carries no GRPO signal (Flow-GRPO logs it)
    groups = int(group_ids.max()) + 1
    spread = torch.stack([rewards[group_ids == g].std(0, unbiased=False) for g in range(groups)])
    record["zero_std_ratio"] = float((spread.amax(1) <= 1e-8).float().mean())
    return record


def peak_memory_gb(device: torch.device) -> float:
    """The step's peak memory: CUDA's allocator peak, or on the CPU the process's peak resident set."""
    import resource
    import sys

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def banner(c, *, device, reward_names: Sequence[str], trainable_params: int, output_dir: Path, resumed_at: int,
           dist) -> str:
    """The line a run (config ``c``) starts with: what trains on what, with which credit and rewards, and where."""
    return (f"otca_fast: {c.model.family} on {device} | {c.train.finetune} ({trainable_params:,} trainable) | "
            f"credit {c.credit.scheme} | rewards {', '.join(reward_names)} | "
            f"{c.sample.prompts_per_step}x{c.sample.group_size} samples/step, {c.sample.num_steps} steps | "
            f"output {output_dir}" + (f" | resumed at step {resumed_at}" if resumed_at else "")
            + (f" | {dist.world_size} ranks ({dist.strategy})" if dist.enabled else ""))


def summary_line(record: dict[str, Any], reward_names: Sequence[str]) -> str:
    """One line per step for the progress display."""
    parts = [f"{name}={record[f'reward/{name}']:.4g}" for name in reward_names]
    parts += [f"loss={record['loss']:.3g}", f"kl={record['kl']:.2g}", f"clip={record['clip_frac']:.2f}",
              f"{record['samples_per_s']:.2f} samples/s"]
    return " ".join(parts)


def write_plots(metrics: MetricsLog, report_dir: Path, step: int, reward_names: Sequence[str], *,
                metric_keys: Sequence[str], credit_info: dict[str, Any] | None, scheme: str) -> None:
    """``report/rewards.png`` (rewards beside the eval-only metrics), ``training.png`` and the credit heatmaps of
    the latest step, each also logged as an image."""
    records = read_metrics(metrics.path)
    images = {"report/rewards": plot_rewards(records, reward_names, report_dir / "rewards.png",
                                             metric_keys=list(metric_keys)),
              "report/training": plot_training(records, report_dir / "training.png")}
    if credit_info is not None:
        from otca_fast.credit import plot_credit

        images["report/credit"] = plot_credit(credit_info, report_dir / f"credit_step_{step:06d}.png",
                                              objective_names=list(reward_names),
                                              title=f"credit at step {step} ({scheme})")
    for tag, path in images.items():
        metrics.add_image_file(tag, path, step)


def print_summary(console, metrics_path: Path, reward_names: Sequence[str], *, title: str,
                  metric_keys: Sequence[str], changes: dict[str, Any]) -> None:
    """The run's summary table on ``console`` (a rich Console)."""
    from rich.console import Console

    table = summary_table(read_metrics(metrics_path), reward_names, title=title, metric_keys=list(metric_keys),
                          changes=changes)
    # a log file or pipe: wide enough that metric names and intervals are not cut
    out = console if console.is_terminal else Console(file=console.file, width=160)
    out.print(table)

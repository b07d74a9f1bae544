"""``plot_credit``: a PNG of where the credit went, for the run report.

Three panels from a ``build_advantages`` info dict:

1. credit over (objective x timestep): mean over samples of c[n, k] · w[n, t(, k)] — the share of
   the advantage that objective k puts on step t (for ``otca_timing`` the timing differs per row);
2. the step credit w averaged over samples and objectives, with its 10–90% band over samples;
3. the objective mix c[n, k] of every sample (MOCA moves it per sample, the baselines do not).

Matplotlib is imported when the function is called (the credit math does not need it) and only
through its object API with the Agg canvas, so it never touches a GUI backend or pyplot state.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch


def _info_tensor(info: Mapping[str, Any], key: str) -> torch.Tensor:
    if key not in info:
        raise ValueError(f"info: expected the key {key!r} (the info dict of build_advantages), got keys "
                         f"{sorted(info)}")
    value = info[key]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"info[{key!r}]: expected a torch.Tensor, got {type(value).__name__}")
    return value.detach().to("cpu", torch.float64)


def plot_credit(info: Mapping[str, Any], path: str | os.PathLike[str], *,
                objective_names: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Write the credit heatmaps of ``info`` (from :func:`build_advantages`) to the PNG ``path``.

    Needs ``info["w"]`` ``[N, T]`` or ``[N, T, K]`` and ``info["c"]`` ``[N, K]``. ``objective_names``
    label the K objectives (default ``R0 … R{K-1}``). The file is written to a temporary name in
    the same folder and renamed, so a reader never sees half a PNG. Returns the path.
    """
    if not isinstance(info, Mapping):
        raise TypeError(f"info: expected the info dict of build_advantages, got {type(info).__name__}")
    w = _info_tensor(info, "w")
    c = _info_tensor(info, "c")
    if c.dim() != 2:
        raise ValueError(f"info['c']: expected [N, K], got shape {tuple(c.shape)}")
    n, k = c.shape
    if w.dim() not in (2, 3) or w.shape[0] != n or (w.dim() == 3 and w.shape[2] != k):
        raise ValueError(f"info['w']: expected [{n}, T] or [{n}, T, {k}] (N and K of info['c']), got "
                         f"{tuple(w.shape)}")
    names = [f"R{i}" for i in range(k)] if objective_names is None else [str(s) for s in objective_names]
    if len(names) != k:
        raise ValueError(f"objective_names: expected {k} names (one per objective), got {len(names)}")
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise ValueError(f"path: expected a .png file name, got {str(out)!r}")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    w3 = w if w.dim() == 3 else w[:, :, None].expand(-1, -1, k)
    per_objective = (w3 * c[:, None, :]).mean(0).T.numpy()  # [K, T]
    step = w3.mean(2)  # [N, T]
    steps = w.shape[1]
    size = (max(7.0, 0.35 * steps + 3.0), 3.2 + 0.35 * k + min(6.0, 0.12 * n))
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 2, width_ratios=[3, 1], height_ratios=[1, 1])

    ax = fig.add_subplot(grid[0, 0])
    im = ax.imshow(per_objective, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("denoising step t (noise → data)")
    ax.set_title("credit c·w per objective and step (mean over samples)")
    fig.colorbar(im, ax=ax, shrink=0.9)

    ax = fig.add_subplot(grid[1, 0])
    t = torch.arange(steps).numpy()
    ax.fill_between(t, step.quantile(0.1, dim=0).numpy(), step.quantile(0.9, dim=0).numpy(), alpha=0.3,
                    label="10–90% of samples")
    ax.plot(t, step.mean(0).numpy(), marker="o", label="mean")
    ax.set_xlabel("denoising step t (noise → data)")
    ax.set_ylabel("step credit w")
    ax.set_xlim(-0.5, steps - 0.5)
    ax.legend(loc="best", fontsize="small")

    ax = fig.add_subplot(grid[:, 1])
    im = ax.imshow(c.numpy(), aspect="auto", cmap="magma", vmin=0.0, vmax=max(1.0, float(c.max())),
                   interpolation="nearest")
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_ylabel("sample")
    ax.set_title("objective mix c")
    fig.colorbar(im, ax=ax, shrink=0.9)
    scheme = info.get("scheme")
    fig.suptitle(title if title is not None else f"credit: {scheme}" if scheme else "credit")

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".png", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png", dpi=110)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out

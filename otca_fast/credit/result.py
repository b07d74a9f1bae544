"""A training step's credit as the trainer hands it from phase to phase, and the scalars it logs about it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Credit", "credit_summary"]


@dataclass
class Credit:
    """What the credit phase hands on: the advantages of the whole batch and how they were made.

    ``advantages [N, T]`` (float32, CPU): which step and which objective earned each sample's reward (the
    scheme's output of ``build_advantages``); ``info``: its info dict (``train_mask``, the chosen ``index`` of
    credit-guided selection, ``w``, ``c``, ...); ``rewards [N, K]``: every rank's rewards, gathered."""

    advantages: torch.Tensor
    info: dict[str, Any]
    rewards: torch.Tensor


def credit_summary(A: torch.Tensor, info: dict[str, Any], valid: torch.Tensor,
                   objective_names: Sequence[str]) -> dict[str, Any]:
    """``credit/…`` metrics of the advantages ``A [N, T]``, the info dict of ``build_advantages`` and the
    trained-pair mask ``valid [N, M]``."""
    out: dict[str, Any] = {}
    absA = A.abs()
    per_step = absA.mean(0)
    half = max(1, per_step.numel() // 2)
    out["credit/adv_abs_mean"] = float(absA.mean())
    out["credit/adv_std"] = float(A.std(unbiased=False))
    # share of |A| on the first (high-noise) half of the steps
    out["credit/early_share"] = float(per_step[:half].sum() / per_step.sum().clamp_min(1e-12))
    out["credit/step_profile"] = [round(float(v), 6) for v in per_step]  # mean |A[:, t]| (jsonl only)
    out["credit/trained_steps_per_sample"] = float(valid.sum(1).float().mean())
    w = info.get("w")
    if isinstance(w, torch.Tensor):
        w = w.detach().float().cpu()
        row = w.sum(1) if w.dim() == 2 else w.sum(1).mean(-1)
        peak = w.amax(1) if w.dim() == 2 else w.amax(1).mean(-1)
        # 1/T = uniform credit; 1 = all of a sample's credit on one step
        out["credit/w_peak_share"] = float((peak / row.clamp_min(1e-12)).mean())
    c = info.get("c")
    if isinstance(c, torch.Tensor) and c.dim() == 2 and c.shape[1] == len(objective_names):
        for k, name in enumerate(objective_names):
            out[f"credit/c/{name}"] = float(c[:, k].float().mean())  # the objective mix (MOCA)
    cos = info.get("cosines")
    if isinstance(cos, torch.Tensor):
        out["credit/cos_first_state"] = float(cos[:, 0].float().mean())
    return out

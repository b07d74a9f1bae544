"""Credit-guided timestep selection (beyond the paper): train the steps that carry the credit.

A GRPO update backpropagates through the transformer once per trained (sample, step). When the
credit w[n, t] is concentrated on a few steps, most of those backward passes multiply a gradient
by a small number. :func:`select_timesteps` picks M = ⌈fraction·T⌉ steps per sample instead:

* ``mode="topk"`` — the M steps of highest credit (ties: the earlier step). Deterministic, and
  biased by design: the low-credit steps are dropped, ``weight`` is 1.
* ``mode="importance"`` — M distinct steps drawn with inclusion probability π_t ∝ w_t (capped at
  1: a step with more than 1/M of the row's credit is always taken and the rest of the budget is
  shared out again), by randomised systematic PPS sampling: shuffle the steps, lay the π_t end to
  end on [0, M), and take the steps hit by the points u, u+1, …, u+M−1 for one u ~ U[0, 1). Every
  interval is at most 1 long, so no step is hit twice, exactly M are hit, and step t is hit with
  probability exactly π_t. With ``weight`` = 1/π_t (Horvitz–Thompson),

      E[ Σ_m weight[n, m] · f(index[n, m]) ] = Σ_t π_t · f(t) / π_t = Σ_t f(t)

  for any f that vanishes where w does (the policy-gradient terms A[n, t]·∇log π do, when w is
  |A| or the TCD credit). So a run that trains only the selected steps, weighted, follows the full
  gradient in expectation while skipping (1 − fraction) of the backward passes.
"""

from __future__ import annotations

import math

import torch

from otca_fast import checks
from otca_fast.credit.config import SELECT_MODES


def _inclusion_probabilities(w: torch.Tensor, m: int) -> torch.Tensor:
    """π ``[N, T]`` with Σ_t π_t = M, π_t ≤ 1 and π ∝ w off the capped steps (all-zero rows: uniform)."""
    n, t = w.shape
    w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))
    capped = torch.zeros_like(w, dtype=torch.bool)
    pi = torch.zeros_like(w)
    # Each round caps every step whose share of the remaining budget reaches 1; at most T rounds
    # (one step per round at the very least), usually one or two.
    for _ in range(t):
        free = ~capped
        budget = m - capped.sum(1, keepdim=True).to(w.dtype)
        mass = torch.where(free, w, torch.zeros_like(w)).sum(1, keepdim=True)
        # rows whose uncapped steps have no credit left share the budget equally among them
        base = torch.where(mass > 0, torch.where(free, w, torch.zeros_like(w)), free.to(w.dtype))
        base_sum = base.sum(1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
        pi = torch.where(capped, torch.ones_like(w), budget * base / base_sum)
        newly = free & (pi >= 1.0)
        if not bool(newly.any()):
            break
        capped |= newly
    return pi.clamp(0.0, 1.0)


def select_timesteps(w: torch.Tensor, fraction: float, *, mode: str = "importance",
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The M = ⌈fraction·T⌉ steps to train per sample: ``(index [N, M] long, weight [N, M])``.

    ``w`` ``[N, T]`` non-negative credit (TCD weights, or |A[n, t]|). ``mode="topk"``: the M
    largest (ties → earlier step), weight 1. ``mode="importance"``: M distinct steps drawn with
    inclusion probability π_t ∝ w_t (capped at 1; a row of zeros is sampled uniformly), weight
    1/π_t, so Σ_m weight·f(index) is an unbiased estimate of Σ_t f(t) for any f that is 0 where w
    is (see the module docstring). Indices are sorted by step within a row. Deterministic given
    ``generator`` (on any device); weights are float32 (float64 for float64 w).
    """
    checks.float_tensor("w", w, dim=2)
    checks.raise_if_not_finite("w", w)
    if bool((w < 0).any()):
        n, t = (int(i) for i in (w < 0).nonzero()[0])
        raise ValueError(f"w: expected non-negative credit, got {float(w[n, t])} at [{n}, {t}]")
    frac = checks.fraction("fraction", fraction)
    checks.choice("mode", mode, SELECT_MODES)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    n, t = w.shape
    # ceil with a guard so that fraction·T = 12.000000000000002 does not become 13
    m = min(t, max(1, math.ceil(frac * t - 1e-9)))
    cd = checks.compute_dtype(w.dtype)
    if mode == "topk":
        order = torch.sort(w.to(cd), dim=1, descending=True, stable=True).indices[:, :m]
        index = order.sort(1).values
        return index, torch.ones(n, m, dtype=cd, device=w.device)

    pi = _inclusion_probabilities(w.to(torch.float64), m)
    # random numbers come from the generator's device (a CPU generator drives CUDA credit too)
    rng_device = generator.device if generator is not None else w.device
    draws = torch.rand(n, t, generator=generator, device=rng_device, dtype=torch.float64)
    perm = draws.argsort(1).to(w.device)
    pi_perm = pi.gather(1, perm)
    edges = pi_perm.cumsum(1)
    # make the last edge exactly M so the M points u + i (u in (0, 1)) all fall inside [0, M)
    edges = edges / edges[:, -1:] * m
    u = torch.rand(n, 1, generator=generator, device=rng_device, dtype=torch.float64).to(w.device)
    u = u.clamp(1e-12, 1.0 - 1e-12)
    points = u + torch.arange(m, device=w.device, dtype=torch.float64)[None, :]
    hit = torch.searchsorted(edges, points, right=True).clamp_max(t - 1)
    # intervals are <= 1 long, so hits are strictly increasing; the cummax guards the
    # measure-zero case of a point landing on a rounded edge
    steps = torch.arange(m, device=w.device)[None, :]
    hit = (torch.cummax(hit - steps, dim=1).values + steps).clamp_max(t - 1)
    index = perm.gather(1, hit)
    index = index.sort(1).values
    weight = (1.0 / pi.gather(1, index)).to(cd)
    return index, weight

"""Objective-aware timing (beyond the paper): a separate step credit for every objective.

The paper's abstract promises credit that is both timestep- and objective-aware, but the
reconstructed OTCA shares one w[n, t] across the objectives. Here each objective k gets its own
timing from how its reward evolves along the trajectory. With R_k evaluated on the predicted clean
sample x̂0_j of every state j (``step_rewards[n, j, k]``, the last entry on the final sample):

    g_{j,k} = R_k(x̂0_{j+1}) − R_k(x̂0_j)                  (gain of the step j → j+1)
    p_{j,k} = max(g_{j,k}, 0) / Σ_t max(g_{t,k}, 0)        (its share of the objective's progress)
    w̃_{j,k} = p_{j,k} + ε,    w_{·,k} normalised over j (mean 1 or sum 1), per (n, k).

Dividing by the total positive progress first makes the result independent of each reward's
scale and offset (a positive affine change of R_k cancels), so ε means the same for a reward in [0, 1]
and one in [0, 100], and the same as in TCD, whose cosine gains also total about 1. An objective
that never improves along the trajectory (all gains ≤ 0) has no timing signal and gets equal
credit at every step. A motion reward that is settled by the coarse layout then credits the early
steps, a detail reward the late ones.

Cost. x̂0_j = x_j − σ_j·v_j is free (the rollout already has v_j), but scoring it means a VAE
decode plus the reward per state. The trainer therefore scores only the rewards marked cheap,
at the states :func:`evaluation_states` lists (every ``every`` states and always the last), and
:func:`interpolate_step_rewards` fills the rest linearly: ⌈T/every⌉ extra decodes and cheap-reward
calls per sample (state T is the final sample, already decoded and scored). A reward that is not
scored per step can be passed as its final value at every state: its gains are then 0 and its
timing uniform.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from otca_fast import checks
from otca_fast.credit.config import NORMALIZE


def objective_timing_credit(step_rewards: torch.Tensor, *, eps: float = 1e-3,
                            normalize: str = "mean") -> torch.Tensor:
    """Per-objective step credit w ``[N, T, K]`` from ``step_rewards`` ``[N, T+1, K]``.

    ``step_rewards[n, j, k]``: reward k of sample n on the predicted clean sample of state j
    (noise → data; the last state is the final sample). ``w[n, t, k]`` credits the transition
    t → t+1 for objective k: its share of the objective's positive reward progress, plus ``eps``,
    normalised over t to mean 1 (``normalize="mean"``) or sum 1 (``"sum"``). Float32 (float64 in,
    float64 out).
    """
    checks.float_tensor("step_rewards", step_rewards, dim=3)
    if step_rewards.shape[1] < 2:
        raise ValueError(f"step_rewards: expected [N, T+1, K] with T >= 1, got shape "
                         f"{tuple(step_rewards.shape)}")
    checks.raise_if_not_finite("step_rewards", step_rewards)
    eps = checks.finite_number("eps", eps)
    if eps <= 0:
        raise ValueError(f"eps: expected a value > 0 (the floor that keeps every step trainable), got {eps}")
    checks.choice("normalize", normalize, NORMALIZE)
    r = step_rewards.to(checks.compute_dtype(step_rewards.dtype))
    gain = (r[:, 1:] - r[:, :-1]).clamp_min(0.0)
    total = gain.sum(1, keepdim=True)
    share = torch.where(total > 0, gain / torch.where(total > 0, total, torch.ones_like(total)),
                        torch.zeros_like(gain))
    w = share + eps
    w = w / w.sum(1, keepdim=True)
    return w * gain.shape[1] if normalize == "mean" else w


def evaluation_states(num_steps: int, every: int) -> list[int]:
    """States at which the trainer scores the cheap rewards on x̂0: 0, every, 2·every, …, and T."""
    checks.int_at_least("num_steps", num_steps, 1)
    checks.int_at_least("every", every, 1)
    states = list(range(0, num_steps, every))
    return states + [num_steps]


def interpolate_step_rewards(values: torch.Tensor, states: Sequence[int] | torch.Tensor,
                             num_steps: int) -> torch.Tensor:
    """Linear interpolation of rewards scored at ``states`` to every state: ``[N, T+1, K]``.

    ``values`` ``[N, M, K]`` are the rewards at the M strictly increasing ``states``, which must
    start at 0 and end at ``num_steps`` (as :func:`evaluation_states` returns).
    """
    checks.float_tensor("values", values, dim=3)
    checks.raise_if_not_finite("values", values)
    st = torch.as_tensor(states, dtype=torch.long).flatten().cpu()
    checks.int_at_least("num_steps", num_steps, 1)
    if st.numel() != values.shape[1]:
        raise ValueError(f"states: expected {values.shape[1]} states (one per column of values), got "
                         f"{st.numel()}")
    if st.numel() < 2 or int(st[0]) != 0 or int(st[-1]) != num_steps or not bool((st[1:] > st[:-1]).all()):
        raise ValueError(f"states: expected strictly increasing states from 0 to num_steps = {num_steps}, "
                         f"got {st.tolist()}")
    cd = checks.compute_dtype(values.dtype)
    t = torch.arange(num_steps + 1)
    seg = (torch.searchsorted(st, t, right=True) - 1).clamp(0, st.numel() - 2)
    lo, hi = st[seg], st[seg + 1]
    frac = ((t - lo).to(cd) / (hi - lo).to(cd)).to(values.device)
    seg = seg.to(values.device)
    v = values.to(cd)
    return v[:, seg] * (1.0 - frac)[None, :, None] + v[:, seg + 1] * frac[None, :, None]

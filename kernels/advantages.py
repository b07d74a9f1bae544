"""Group-normalised advantages and credit-weighted advantages in one Triton launch.

One program per GRPO group. The host sorts the samples by group (``order``, ``group_start``) so a
program gathers its members, z-scores each objective across the group (population std, or the
whole batch's std for ``std="global"``), and then, in the same program:

* ``MODE_NONE``     — writes clip(ẑ) ``[N, K]``;
* ``MODE_NORM_SUM`` — writes clip(Σ_k w_k ẑ_k) ``[N]``;
* ``MODE_SUM_NORM`` — z-scores the weighted raw sum Σ_k w_k R_k (Flow-GRPO) and writes ``[N]``;
* ``MODE_CREDIT``   — a = clip(ẑ), the objective mix c (given, uniform, or MOCA's min-norm mix
  computed right here, see ``otca_fast.reference.min_norm_objective_weights`` for the proof) and
  the timestep credit w: A[n, t] = Σ_k c[n, k]·w[n, t(, k)]·a[n, k], written ``[N, T]``.

A group whose values are all equal gets exactly 0 (never NaN). Work is O(N·K) per group plus
O(N·K) for global statistics, tiny next to the model.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from otca_fast.kernels.layout import C_GIVEN, C_MOCA, C_UNIFORM, MODE_CREDIT, MODE_NONE, MODE_NORM_SUM, MODE_SUM_NORM

# the same numbers as compile-time constants for use inside the kernels
_MODE_NONE = tl.constexpr(MODE_NONE)
_MODE_NORM_SUM = tl.constexpr(MODE_NORM_SUM)
_MODE_SUM_NORM = tl.constexpr(MODE_SUM_NORM)
_C_GIVEN = tl.constexpr(C_GIVEN)
_C_MOCA = tl.constexpr(C_MOCA)


@triton.jit
def _load_values(r_ptr, w_ptr, rows, rmask, kidx, kmask, K, MIX_FIRST: tl.constexpr):
    """Rewards of ``rows`` as a [BLOCK_N, BLOCK_K] tile; with MIX_FIRST column 0 holds Σ_k w_k R_k."""
    vals = tl.load(r_ptr + rows[:, None] * K + kidx[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
    if MIX_FIRST:
        w = tl.load(w_ptr + kidx, mask=kmask, other=0.0)
        mixed = tl.sum(vals * w[None, :], axis=1)
        vals = tl.where(kidx[None, :] == 0, mixed[:, None], 0.0)
    return vals


@triton.jit
def _global_std(r_ptr, w_ptr, N, K, kidx, kmask, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                MIX_FIRST: tl.constexpr):
    """Population std of every column over the whole batch (two passes: mean, then variance)."""
    ksum = tl.zeros([BLOCK_K], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        rmask = rows < N
        v = _load_values(r_ptr, w_ptr, rows, rmask, kidx, kmask, K, MIX_FIRST)
        ksum += tl.sum(tl.where(rmask[:, None], v, 0.0), axis=0)
    mean = ksum / N
    ksq = ksum * 0.0
    for start in range(0, N, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        rmask = rows < N
        v = _load_values(r_ptr, w_ptr, rows, rmask, kidx, kmask, K, MIX_FIRST)
        c = tl.where(rmask[:, None], v - mean[None, :], 0.0)
        ksq += tl.sum(c * c, axis=0)
    return tl.sqrt(ksq / N)


@triton.jit
def _min_norm_mix(a, kmask, K, BLOCK_K: tl.constexpr):
    """Exact argmin over the simplex of (Σ_k c_k a_k)², closest to uniform among ties (per row)."""
    kidx = tl.arange(0, BLOCK_K)
    big = 3.0e38
    a = tl.where(kmask[None, :], a, 0.0)
    mean_a = tl.sum(a, axis=1) / K
    flip = tl.where(mean_a < 0, -1.0, 1.0)
    b = a * flip[:, None]
    bmin = tl.min(tl.where(kmask[None, :], b, big), axis=1)
    on_face = tl.where(kmask[None, :] & (b == bmin[:, None]), 1.0, 0.0)
    face = on_face / tl.sum(on_face, axis=1)[:, None]
    scale = tl.maximum(tl.max(tl.where(kmask[None, :], tl.abs(b), 0.0), axis=1), 1.1754943508222875e-38)
    best_v = tl.zeros_like(mean_a) + big
    best_theta = tl.zeros_like(mean_a)
    best_rho = tl.zeros_like(mean_a)
    for j in tl.static_range(BLOCK_K):
        # candidate support: the lower set S_j = {k : b_k ≤ b_j}
        bj = tl.sum(tl.where(kidx[None, :] == j, b, 0.0), axis=1)
        in_set = kmask[None, :] & (b <= bj[:, None])
        cnt = tl.sum(tl.where(in_set, 1.0, 0.0), axis=1)
        s1 = tl.sum(tl.where(in_set, b, 0.0), axis=1)
        s2 = tl.sum(tl.where(in_set, b * b, 0.0), axis=1)
        den = cnt * s2 - s1 * s1
        valid = (den > 0) & (s1 > 0) & (j < K)
        safe_den = tl.where(valid, den, 1.0)
        theta = s2 / safe_den
        rho = s1 / safe_den
        thresh = theta / tl.where(valid, rho, 1.0)
        max_in = tl.max(tl.where(in_set, b, -big), axis=1)
        min_out = tl.min(tl.where(in_set | (kidx[None, :] >= K), big, b), axis=1)
        viol = (tl.maximum(max_in - thresh, 0.0) + tl.maximum(thresh - min_out, 0.0)) / scale
        viol = tl.where(valid, viol, big)
        better = viol < best_v
        best_v = tl.where(better, viol, best_v)
        best_theta = tl.where(better, theta, best_theta)
        best_rho = tl.where(better, rho, best_rho)
    mix = tl.where(kmask[None, :], tl.maximum(best_theta[:, None] - best_rho[:, None] * b, 0.0), 0.0)
    mix = mix / tl.maximum(tl.sum(mix, axis=1), 1.1754943508222875e-38)[:, None]
    c = tl.where((bmin < 0)[:, None], mix, face)
    return tl.where((mean_a == 0)[:, None] & kmask[None, :], 1.0 / K, c)


@triton.jit
def _group_advantage_kernel(
    r_ptr, order_ptr, group_start_ptr, w_ptr, c_ptr, t_ptr, out_ptr,
    N, K, T, eps, clip_max, exploration,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
    MODE: tl.constexpr, GLOBAL_STD: tl.constexpr, C_MODE: tl.constexpr, W_PER_K: tl.constexpr,
):
    g = tl.program_id(0)
    start = tl.load(group_start_ptr + g)
    count = tl.load(group_start_ptr + g + 1) - start
    nidx = tl.arange(0, BLOCK_N)
    rmask = nidx < count
    rows = tl.load(order_ptr + start + nidx, mask=rmask, other=0)
    kidx = tl.arange(0, BLOCK_K)
    mix_first: tl.constexpr = MODE == _MODE_SUM_NORM
    if mix_first:
        kmask_stat = kidx < 1
    else:
        kmask_stat = kidx < K
    kmask = kidx < K
    vals = _load_values(r_ptr, w_ptr, rows, rmask, kidx, kmask, K, mix_first)
    m2 = rmask[:, None] & kmask_stat[None, :]
    cnt = count.to(tl.float32)
    mean = tl.sum(tl.where(m2, vals, 0.0), axis=0) / cnt
    centred = tl.where(m2, vals - mean[None, :], 0.0)
    if GLOBAL_STD:
        std = _global_std(r_ptr, w_ptr, N, K, kidx, kmask, BLOCK_N, BLOCK_K, mix_first)
    else:
        std = tl.sqrt(tl.sum(centred * centred, axis=0) / cnt)
    vmax = tl.max(tl.where(m2, vals, -3.0e38), axis=0)
    vmin = tl.min(tl.where(m2, vals, 3.0e38), axis=0)
    z = tl.where((vmax == vmin)[None, :], 0.0, centred / (std[None, :] + eps))

    if MODE == _MODE_NONE:
        out = tl.minimum(tl.maximum(z, -clip_max), clip_max)
        tl.store(out_ptr + rows[:, None] * K + kidx[None, :], out, mask=m2)
    elif MODE == _MODE_NORM_SUM:
        w = tl.load(w_ptr + kidx, mask=kmask, other=0.0)
        adv = tl.sum(z * w[None, :], axis=1)
        tl.store(out_ptr + rows, tl.minimum(tl.maximum(adv, -clip_max), clip_max), mask=rmask)
    elif MODE == _MODE_SUM_NORM:
        adv = tl.sum(tl.where(kidx[None, :] == 0, z, 0.0), axis=1)
        tl.store(out_ptr + rows, tl.minimum(tl.maximum(adv, -clip_max), clip_max), mask=rmask)
    else:
        a = tl.minimum(tl.maximum(z, -clip_max), clip_max)
        if C_MODE == _C_GIVEN:
            c = tl.load(c_ptr + rows[:, None] * K + kidx[None, :], mask=m2, other=0.0)
        elif C_MODE == _C_MOCA:
            c = (1.0 - exploration) * _min_norm_mix(a, kmask, K, BLOCK_K) + exploration / K
        else:
            c = tl.where(kmask[None, :], 1.0 / K, 0.0)
        ca = tl.where(m2, c * a, 0.0)
        tidx0 = tl.arange(0, BLOCK_T)
        for t0 in range(0, T, BLOCK_T):
            tidx = t0 + tidx0
            tmask = tidx < T
            mt = rmask[:, None] & tmask[None, :]
            if W_PER_K:
                m3 = mt[:, :, None] & kmask[None, None, :]
                w3 = tl.load(t_ptr + rows[:, None, None] * (T * K) + tidx[None, :, None] * K + kidx[None, None, :],
                             mask=m3, other=0.0)
                adv_t = tl.sum(w3 * ca[:, None, :], axis=2)
            else:
                w2 = tl.load(t_ptr + rows[:, None] * T + tidx[None, :], mask=mt, other=0.0)
                adv_t = w2 * tl.sum(ca, axis=1)[:, None]
            tl.store(out_ptr + rows[:, None] * T + tidx[None, :], adv_t, mask=mt)


def _group_layout(group_ids: torch.Tensor):
    """Members sorted by group, group boundaries and the largest group size."""
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True).to(torch.int32)
    group_start = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=group_ids.device)
    group_start[1:] = torch.cumsum(counts, 0)
    return order, group_start, int(counts.max())


def group_advantage_launch(rewards: torch.Tensor, group_ids: torch.Tensor, *, mode: int,
                           weights: torch.Tensor | None = None, std: str = "group", eps: float = 1e-4,
                           clip_max: float = 5.0, timestep_credit: torch.Tensor | None = None,
                           objective_credit: torch.Tensor | None = None, c_mode: int = C_UNIFORM,
                           exploration: float = 0.1) -> torch.Tensor:
    """Launch one program per group. ``rewards`` float32 contiguous ``[N, K]``."""
    n, k = rewards.shape
    order, group_start, max_group = _group_layout(group_ids)
    dev = rewards.device
    block_n = max(2, triton.next_power_of_2(max_group))
    if std == "global":
        block_n = max(block_n, min(1024, triton.next_power_of_2(n)))
    block_k = max(2, triton.next_power_of_2(k))
    w = weights if weights is not None else rewards
    t = timestep_credit if timestep_credit is not None else rewards
    c = objective_credit if objective_credit is not None else rewards
    steps = 1
    w_per_k = False
    if mode == MODE_NONE:
        out = torch.empty(n, k, dtype=torch.float32, device=dev)
    elif mode == MODE_CREDIT:
        steps = timestep_credit.shape[1]
        w_per_k = timestep_credit.dim() == 3
        out = torch.empty(n, steps, dtype=torch.float32, device=dev)
    else:
        out = torch.empty(n, dtype=torch.float32, device=dev)
    block_t = max(2, min(triton.next_power_of_2(steps), max(2, 4096 // (block_n * (block_k if w_per_k else 1)))))
    _group_advantage_kernel[(group_start.numel() - 1,)](
        rewards, order, group_start, w, c, t, out, n, k, steps, float(eps), float(clip_max), float(exploration),
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_T=block_t, MODE=mode, GLOBAL_STD=std == "global",
        C_MODE=c_mode, W_PER_K=w_per_k,
    )
    return out

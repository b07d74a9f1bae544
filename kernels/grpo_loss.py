"""Triton kernel for the per-row part of the clipped GRPO loss.

The latent-sized work (log-prob partial sums, the KL partial sums, the gradient) is done by
``sde_step.py``'s kernels; this one turns per-row log-probs into the loss in a single program so
that the mean over rows has a fixed summation order (bitwise reproducible):

    r = exp(logp − logp_old);   L_b = −min(r·A, clip(r, 1−ε, 1+ε)·A) + β_KL·γ·β²·Σ(v−v_ref)²/D

and writes the two per-row coefficients the backward kernel needs,

    c1_b = ∂L/∂logp_b · 2γβ / (B·D),   ∂L/∂logp_b = −A·r where r·A ≤ clip(r)·A, else 0
    c2_b = β_KL · 2γβ² / (B·D)

(the PPO rule: the gradient flows only through the unclipped branch when it is the minimum).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _grpo_rows_kernel(logp_ptr, old_ptr, adv_ptr, gamma_ptr, beta_ptr, partial_kl_ptr,
                      loss_ptr, ratio_ptr, clipped_ptr, approx_kl_ptr, kl_ptr, c1_ptr, c2_ptr,
                      B, D, tiles_per_row, clip_range, kl_beta,
                      BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, HAS_REF: tl.constexpr):
    total = tl.zeros([BLOCK_B], dtype=tl.float32)
    inv_bd = 1.0 / (B * D)
    for start in range(0, B, BLOCK_B):
        rows = start + tl.arange(0, BLOCK_B)
        rmask = rows < B
        logp = tl.load(logp_ptr + rows, mask=rmask, other=0.0)
        old = tl.load(old_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        adv = tl.load(adv_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        gamma = tl.load(gamma_ptr + rows, mask=rmask, other=0.0)
        beta = tl.load(beta_ptr + rows, mask=rmask, other=0.0)
        ratio = tl.exp(logp - old)
        unclipped = ratio * adv
        clipped = tl.minimum(tl.maximum(ratio, 1.0 - clip_range), 1.0 + clip_range) * adv
        row_loss = -tl.minimum(unclipped, clipped)
        dloss_dlogp = tl.where(unclipped <= clipped, -adv * ratio, 0.0)
        if HAS_REF:
            acc = tl.zeros([BLOCK_B, BLOCK_T], dtype=tl.float32)
            for t0 in range(0, tiles_per_row, BLOCK_T):
                tidx = t0 + tl.arange(0, BLOCK_T)
                m2 = rmask[:, None] & (tidx[None, :] < tiles_per_row)
                acc += tl.load(partial_kl_ptr + rows[:, None] * tiles_per_row + tidx[None, :], mask=m2, other=0.0)
            kl = gamma * beta * beta * tl.sum(acc, axis=1) / D
            row_loss += kl_beta * kl
            tl.store(c2_ptr + rows, kl_beta * 2.0 * gamma * beta * beta * inv_bd, mask=rmask)
        else:
            kl = tl.zeros([BLOCK_B], dtype=tl.float32)
        tl.store(ratio_ptr + rows, ratio, mask=rmask)
        tl.store(clipped_ptr + rows, (tl.abs(ratio - 1.0) > clip_range).to(tl.int8), mask=rmask)
        tl.store(approx_kl_ptr + rows, 0.5 * (logp - old) * (logp - old), mask=rmask)
        tl.store(kl_ptr + rows, kl, mask=rmask)
        tl.store(c1_ptr + rows, dloss_dlogp * 2.0 * gamma * beta * inv_bd, mask=rmask)
        total += tl.where(rmask, row_loss, 0.0)
    tl.store(loss_ptr, tl.sum(total, axis=0) / B)


def grpo_rows(logp: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
              gamma: torch.Tensor, beta: torch.Tensor, partial_kl: torch.Tensor | None, d: int,
              clip_range: float, kl_beta: float):
    """Returns ``(loss 0-d, stats dict, c1 [B], c2 [B] | None)``; all float32 on logp's device."""
    b = logp.shape[0]
    dev = logp.device
    loss = torch.empty((), dtype=torch.float32, device=dev)
    ratio = torch.empty(b, dtype=torch.float32, device=dev)
    clipped = torch.empty(b, dtype=torch.int8, device=dev)
    approx_kl = torch.empty_like(ratio)
    kl = torch.empty_like(ratio)
    c1 = torch.empty_like(ratio)
    c2 = torch.empty_like(ratio) if partial_kl is not None else c1
    tiles = partial_kl.shape[1] if partial_kl is not None else 1
    block_b = min(64, triton.next_power_of_2(b))
    block_t = min(max(1024 // block_b, 16), triton.next_power_of_2(tiles))
    _grpo_rows_kernel[(1,)](
        logp, old_log_prob, advantages, gamma, beta,
        partial_kl if partial_kl is not None else logp,
        loss, ratio, clipped, approx_kl, kl, c1, c2, b, d, tiles, float(clip_range), float(kl_beta),
        BLOCK_B=block_b, BLOCK_T=block_t, HAS_REF=partial_kl is not None,
    )
    stats = {"log_prob": logp, "ratio": ratio, "clipped": clipped.bool(), "approx_kl": approx_kl, "kl": kl}
    return loss, stats, c1, (c2 if partial_kl is not None else None)

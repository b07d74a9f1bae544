"""Triton kernel for the per-row part of the clipped GRPO loss.

The latent-sized work (log-prob partial sums, the KL partial sums, the gradient) is done by
``sde_step.py``'s kernels; this one, one program per row, turns the row's partial sums into its
log-prob — through ``row_logprob``, the very function the rollout's finalize uses, so an on-policy
ratio is exactly 1 — and then into the row's loss (the caller takes the mean with torch):

    r = exp(logp − logp_old);   L_b = −min(r·A, clip(r, 1−ε, 1+ε)·A) + β_KL·γ·β²·Σ(v−v_ref)²/D

It also writes the two per-row coefficients the backward kernel needs,

    c1_b = ∂L_b/∂logp_b · 2γβ / D,   ∂L_b/∂logp_b = −A·r where r·A ≤ clip(r)·A, else 0
    c2_b = β_KL · 2γβ² / D

(the PPO rule: the gradient flows only through the unclipped branch when it is the minimum).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from otca_fast.kernels.sde_step import finalize_block, row_logprob, row_sum

# rows of the [7, B] float32 output table
LOG_PROB, ROW_LOSS, RATIO, APPROX_KL, KL, C1, C2 = range(7)
_BETA, _GAMMA = tl.constexpr(1), tl.constexpr(3)


@triton.jit
def _grpo_finalize_kernel(partial_ptr, coef_ptr, old_ptr, adv_ptr, out_ptr, clipped_ptr,
                          B, D, tiles_per_row, clip_range, kl_beta,
                          BLOCK_T: tl.constexpr, HAS_REF: tl.constexpr):
    row = tl.program_id(0)
    logp = row_logprob(partial_ptr, coef_ptr, row, B, tiles_per_row, 1.0 / D, 1.0, BLOCK_T)
    old = tl.load(old_ptr + row).to(tl.float32)
    adv = tl.load(adv_ptr + row).to(tl.float32)
    gamma = tl.load(coef_ptr + _GAMMA * B + row)
    beta = tl.load(coef_ptr + _BETA * B + row)
    ratio = tl.exp(logp - old)
    unclipped = ratio * adv
    clipped = tl.minimum(tl.maximum(ratio, 1.0 - clip_range), 1.0 + clip_range) * adv
    row_loss = -tl.minimum(unclipped, clipped)
    dloss_dlogp = tl.where(unclipped <= clipped, -adv * ratio, 0.0)
    kl = 0.0
    if HAS_REF:
        kl = gamma * beta * beta * row_sum(partial_ptr + B * tiles_per_row, row, tiles_per_row, BLOCK_T) / D
        row_loss += kl_beta * kl
        tl.store(out_ptr + 6 * B + row, kl_beta * 2.0 * gamma * beta * beta / D)
    tl.store(out_ptr + 0 * B + row, logp)
    tl.store(out_ptr + 1 * B + row, row_loss)
    tl.store(out_ptr + 2 * B + row, ratio)
    tl.store(out_ptr + 3 * B + row, 0.5 * (logp - old) * (logp - old))
    tl.store(out_ptr + 4 * B + row, kl)
    tl.store(out_ptr + 5 * B + row, dloss_dlogp * 2.0 * gamma * beta / D)
    tl.store(clipped_ptr + row, (tl.abs(ratio - 1.0) > clip_range).to(tl.int8))


def grpo_finalize(partials: torch.Tensor, coef: torch.Tensor, old_log_prob: torch.Tensor,
                  advantages: torch.Tensor, d: int, clip_range: float, kl_beta: float):
    """Returns ``(table [7, B] float32, clipped [B] bool)``; table rows are LOG_PROB ... C2."""
    n_sums, b, tiles = partials.shape
    table = torch.empty(7, b, dtype=torch.float32, device=partials.device)
    clipped = torch.empty(b, dtype=torch.int8, device=partials.device)
    _grpo_finalize_kernel[(b,)](
        partials, coef, old_log_prob, advantages, table, clipped, b, d, tiles, float(clip_range), float(kl_beta),
        BLOCK_T=finalize_block(tiles), HAS_REF=n_sums == 2, num_warps=4,
        enable_fp_fusion=False,  # the log-prob must round exactly as the rollout's finalize does
    )
    return table, clipped.view(torch.bool)

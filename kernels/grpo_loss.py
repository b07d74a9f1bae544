"""Triton kernel for the fused clipped GRPO loss of one denoising step (forward).

One launch, one pass over (x, v, x'[, v_ref]): every tile stores its partial sums Σ(x'−μ)² (and
Σ(v−v_ref)² for the KL term) through ``sde_step.tile_partials``; the last tile of each row to
finish turns the row's partials into its log-prob — through ``row_logprob``, the very function the
rollout uses, so an on-policy ratio is exactly 1 — and then into the row's loss (the caller takes
the mean with torch):

    r = exp(logp − logp_old);   L_b = −min(r·A, clip(r, 1−ε, 1+ε)·A) + β_KL·γ·β²·Σ(v−v_ref)²/D

It also writes the two per-row coefficients the backward kernel (``sde_step._step_backward_kernel``)
needs,

    c1_b = ∂L_b/∂logp_b · 2γβ / D,   ∂L_b/∂logp_b = −A·r where r·A ≤ clip(r)·A, else 0
    c2_b = β_KL · 2γβ² / D

(the PPO rule: the gradient flows only through the unclipped branch when it is the minimum).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from otca_fast.kernels import sde_step
from otca_fast.kernels.layout import APPROX_KL, BETA, C1, C2, GAMMA, GRPO_TABLE_ROWS, KL, LOG_PROB, RATIO, ROW_LOSS
from otca_fast.kernels.sde_step import last_tile_of_row, row_logprob, row_sum, tile_partials

# the rows of the coefficient table it reads and of the [7, B] float32 table it writes (kernels/layout.py)
_BETA, _GAMMA = tl.constexpr(BETA), tl.constexpr(GAMMA)
_LOG_PROB, _ROW_LOSS, _RATIO, _APPROX_KL, _KL, _C1, _C2 = (
    tl.constexpr(i) for i in (LOG_PROB, ROW_LOSS, RATIO, APPROX_KL, KL, C1, C2))


@triton.jit
def _grpo_forward_kernel(x_ptr, v_ptr, xp_ptr, vref_ptr, coef_ptr, old_ptr, adv_ptr,
                         partial_ptr, counter_ptr, out_ptr, clipped_ptr,
                         B, D, tiles_per_row, clip_range, kl_beta,
                         BLOCK: tl.constexpr, BLOCK_T: tl.constexpr, HAS_REF: tl.constexpr):
    pid = tl.program_id(0)
    row = pid // tiles_per_row
    tile = pid % tiles_per_row
    tile_partials(x_ptr, v_ptr, xp_ptr, x_ptr, vref_ptr, x_ptr, x_ptr, coef_ptr, partial_ptr,
                  pid, row, tile, B, D, tiles_per_row, BLOCK, False, HAS_REF)
    if last_tile_of_row(counter_ptr, row, tiles_per_row):
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
            tl.store(out_ptr + _C2 * B + row, kl_beta * 2.0 * gamma * beta * beta / D)
        tl.store(out_ptr + _LOG_PROB * B + row, logp)
        tl.store(out_ptr + _ROW_LOSS * B + row, row_loss)
        tl.store(out_ptr + _RATIO * B + row, ratio)
        tl.store(out_ptr + _APPROX_KL * B + row, 0.5 * (logp - old) * (logp - old))
        tl.store(out_ptr + _KL * B + row, kl)
        tl.store(out_ptr + _C1 * B + row, dloss_dlogp * 2.0 * gamma * beta / D)
        tl.store(clipped_ptr + row, (tl.abs(ratio - 1.0) > clip_range).to(tl.int8))
        tl.store(counter_ptr + row, 0)


def grpo_forward(x: torch.Tensor, v: torch.Tensor, xp: torch.Tensor, vref: torch.Tensor | None, coef: torch.Tensor,
                 old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float, kl_beta: float):
    """One launch. Returns ``(table [7, B] float32, clipped [B] bool)``; table rows are LOG_PROB ... C2
    (``kernels/layout.py``)."""
    b, d = x.shape
    block = sde_step.block_size(d)
    tiles = triton.cdiv(d, block)
    partials = torch.empty((2 if vref is not None else 1) * b * tiles, dtype=torch.float32, device=x.device)
    table = torch.empty(GRPO_TABLE_ROWS, b, dtype=torch.float32, device=x.device)
    clipped = torch.empty(b, dtype=torch.int8, device=x.device)
    _grpo_forward_kernel[(b * tiles,)](
        x, v, xp, vref if vref is not None else x, coef, old_log_prob, advantages, partials,
        sde_step.row_counters(b, x.device), table, clipped, b, d, tiles, float(clip_range), float(kl_beta),
        BLOCK=block, BLOCK_T=sde_step.finalize_block(tiles), HAS_REF=vref is not None,
        num_warps=sde_step.num_warps_for(block),
        enable_fp_fusion=False,  # the log-prob must round exactly as the rollout's does
    )
    return table, clipped.view(torch.bool)

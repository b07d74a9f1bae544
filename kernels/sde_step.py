"""Fused Triton kernels for the per-step Gaussian policy of flow-matching GRPO.

Every dynamics has the mean μ = α·x + β·v and the log-prob −γ·mean_D (x' − μ)² + c0 with per-sample
scalars (``otca_fast.reference.step_coefficients``), so three kernels serve all of them:

* ``_step_partial_kernel``  — one pass over (x, v[, x' | ε][, v_ref]) per tile: the tile's Σ(x' − μ)²
  (and Σ(v − v_ref)² for the KL term); in *sample* mode it also draws x' = μ + std·ε, rounds it to
  the storage dtype, stores x' and μ, and takes the residual of the *rounded* x' — the value the
  training pass will read back, which is why rollout and training log-probs agree bit for bit.
* ``_logprob_finalize_kernel`` — per row, the deterministic sum of its tile partials → log-prob
  (``row_logprob``, which the GRPO loss kernel shares, so rollout and training reduce identically).
  No atomics: the reduction order is fixed, so the same inputs give the same bits every time.
* ``_step_backward_kernel`` — ∂/∂v of (upstream · log-prob [+ KL]) recomputing μ from x and v:
  grad = g·(c1·(x' − μ) + c2·(v − v_ref)), with ∂logp/∂v = 2γβ(x' − μ)/D. Nothing latent-sized is
  stored between forward and backward.

Bitwise reproducibility between the rollout and the training pass is a contract (ratio = 1 on
policy), so the forward kernels are compiled with ``enable_fp_fusion=False``: the compiler may not
contract a·b + c into an FMA in one kernel variant and not in another.

Grids are 1-D over (row, tile) pairs: a Wan 480p latent has 2.1M elements per sample, more tiles
than a 2-D grid's second dimension allows. Every access is masked (any D, not only multiples of
the block); loads are cast to float32 at once (the interpreter cannot do bf16 arithmetic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Largest tile (elements per program). 4096 elements x 3 inputs keeps every SM busy with 16-byte
# loads at the sizes we target; tests lower it to force many tiles and ragged edges.
MAX_BLOCK = 4096
FINALIZE_BLOCK = 256


def block_size(d: int) -> int:
    return max(16, min(MAX_BLOCK, triton.next_power_of_2(d)))


# rows of the per-sample coefficient table ``coef [5, B]`` (see ``otca_fast.ops``)
ALPHA, BETA, STD, GAMMA, CONST = 0, 1, 2, 3, 4
_ALPHA, _BETA, _STD, _GAMMA, _CONST = (tl.constexpr(i) for i in range(5))


def num_warps_for(block: int) -> int:
    return 8 if block >= 4096 else 4


def finalize_block(tiles: int) -> int:
    return max(2, min(FINALIZE_BLOCK, triton.next_power_of_2(tiles)))


@triton.jit
def _step_partial_kernel(
    x_ptr, v_ptr, xp_ptr, noise_ptr, vref_ptr,      # inputs (unused ones are dummies)
    xp_out_ptr, mean_out_ptr,                       # outputs of sample mode
    coef_ptr,                                       # [5, B] per-row scalars (alpha, beta, std, gamma, const)
    partial_ptr,                                    # [1 or 2, B * tiles] partial sums: Σ(x'−μ)², Σ(v−v_ref)²
    B, D, tiles_per_row,
    BLOCK: tl.constexpr, SAMPLE: tl.constexpr, HAS_REF: tl.constexpr,
):
    pid = tl.program_id(0)
    row = pid // tiles_per_row
    tile = pid % tiles_per_row
    offs = tile * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    base = row.to(tl.int64) * D
    alpha = tl.load(coef_ptr + _ALPHA * B + row)
    beta = tl.load(coef_ptr + _BETA * B + row)
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    mu = alpha * x + beta * v
    if SAMPLE:
        std = tl.load(coef_ptr + _STD * B + row)
        eps = tl.load(noise_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        xp_stored = (mu + std * eps).to(xp_out_ptr.dtype.element_ty)
        tl.store(xp_out_ptr + base + offs, xp_stored, mask=mask)
        tl.store(mean_out_ptr + base + offs, mu.to(mean_out_ptr.dtype.element_ty), mask=mask)
        xp = xp_stored.to(tl.float32)
    else:
        xp = tl.load(xp_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    resid = tl.where(mask, xp - mu, 0.0)
    tl.store(partial_ptr + pid, tl.sum(resid * resid, axis=0))
    if HAS_REF:
        vref = tl.load(vref_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        dv = tl.where(mask, v - vref, 0.0)
        tl.store(partial_ptr + B * tiles_per_row + pid, tl.sum(dv * dv, axis=0))


@triton.jit
def row_sum(partial_ptr, row, tiles_per_row, BLOCK_T: tl.constexpr):
    """Σ over one row's tile partials, in a fixed order."""
    acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    for start in range(0, tiles_per_row, BLOCK_T):
        idx = start + tl.arange(0, BLOCK_T)
        acc += tl.load(partial_ptr + row * tiles_per_row + idx, mask=idx < tiles_per_row, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def row_logprob(partial_ptr, coef_ptr, row, B, tiles_per_row, resid_scale, const_scale, BLOCK_T: tl.constexpr):
    """log p = −γ·Σ(x'−μ)²·resid_scale + c0·const_scale  (mean: 1/D and 1; sum: 1 and D)."""
    sq = row_sum(partial_ptr, row, tiles_per_row, BLOCK_T)
    gamma = tl.load(coef_ptr + _GAMMA * B + row)
    const = tl.load(coef_ptr + _CONST * B + row)
    return -gamma * sq * resid_scale + const * const_scale


@triton.jit
def _logprob_finalize_kernel(partial_ptr, coef_ptr, out_ptr, B, tiles_per_row, resid_scale, const_scale,
                             BLOCK_T: tl.constexpr):
    row = tl.program_id(0)
    tl.store(out_ptr + row, row_logprob(partial_ptr, coef_ptr, row, B, tiles_per_row, resid_scale, const_scale,
                                        BLOCK_T))


@triton.jit
def _step_backward_kernel(x_ptr, v_ptr, xp_ptr, vref_ptr, grad_ptr, coef_ptr, c12_ptr, upstream_ptr,
                          B, D, tiles_per_row,
                          BLOCK: tl.constexpr, HAS_REF: tl.constexpr, UPSTREAM_PER_ROW: tl.constexpr):
    # grad_v = g·(c1·(x' − μ) + c2·(v − v_ref)), μ recomputed from x and v
    pid = tl.program_id(0)
    row = pid // tiles_per_row
    tile = pid % tiles_per_row
    offs = tile * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    base = row.to(tl.int64) * D
    if UPSTREAM_PER_ROW:
        g = tl.load(upstream_ptr + row)
    else:
        g = tl.load(upstream_ptr)
    alpha = tl.load(coef_ptr + _ALPHA * B + row)
    beta = tl.load(coef_ptr + _BETA * B + row)
    c1 = tl.load(c12_ptr + row) * g
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(xp_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    grad = c1 * (xp - (alpha * x + beta * v))
    if HAS_REF:
        c2 = tl.load(c12_ptr + B + row) * g
        vref = tl.load(vref_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        grad += c2 * (v - vref)
    tl.store(grad_ptr + base + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# launchers (shapes are validated by otca_fast.ops; tensors here are contiguous [B, D] views and
# ``coef`` the contiguous float32 [5, B] table of alpha, beta, std, gamma, const)
# ---------------------------------------------------------------------------------------------

def step_partials(x: torch.Tensor, v: torch.Tensor, coef: torch.Tensor, *, xp: torch.Tensor | None = None,
                  noise: torch.Tensor | None = None, vref: torch.Tensor | None = None):
    """Per-(row, tile) partial sums ``[1 or 2, B, tiles]``; sample mode (``noise`` given) also returns (x', μ)."""
    b, d = x.shape
    block = block_size(d)
    tiles = triton.cdiv(d, block)
    partials = torch.empty(2 if vref is not None else 1, b, tiles, dtype=torch.float32, device=x.device)
    sample = noise is not None
    xp_out = torch.empty_like(x) if sample else x
    mean_out = torch.empty_like(x) if sample else x
    _step_partial_kernel[(b * tiles,)](
        x, v, xp if xp is not None else x, noise if sample else x, vref if vref is not None else x,
        xp_out, mean_out, coef, partials, b, d, tiles,
        BLOCK=block, SAMPLE=sample, HAS_REF=vref is not None, num_warps=num_warps_for(block),
        enable_fp_fusion=False,  # no FMA contraction: sample mode and log-prob mode must round alike
    )
    return partials, (xp_out if sample else None), (mean_out if sample else None)


def logprob_scales(d: int, reduction: str) -> tuple[float, float]:
    return (1.0 / d, 1.0) if reduction == "mean" else (1.0, float(d))


def finalize_logprob(partials: torch.Tensor, coef: torch.Tensor, d: int, reduction: str) -> torch.Tensor:
    _, b, tiles = partials.shape
    out = torch.empty(b, dtype=torch.float32, device=partials.device)
    resid_scale, const_scale = logprob_scales(d, reduction)
    _logprob_finalize_kernel[(b,)](partials, coef, out, b, tiles, resid_scale, const_scale,
                                   BLOCK_T=finalize_block(tiles), num_warps=4, enable_fp_fusion=False)
    return out


def step_backward(x: torch.Tensor, v: torch.Tensor, xp: torch.Tensor, coef: torch.Tensor, c12: torch.Tensor,
                  upstream: torch.Tensor, *, vref: torch.Tensor | None = None) -> torch.Tensor:
    """grad_v = g·(c1·(x' − μ) + c2·(v − v_ref)); ``c12`` is ``[1 or 2, B]``, ``upstream`` ``[B]`` or 0-d."""
    b, d = x.shape
    block = block_size(d)
    tiles = triton.cdiv(d, block)
    grad = torch.empty_like(v)
    if upstream.dtype != torch.float32:
        upstream = upstream.float()
    per_row = upstream.dim() == 1 and upstream.stride(0) != 0
    if upstream.dim() == 1 and not per_row:
        upstream = upstream[:1]  # the gradient of a mean is one value broadcast over the rows
    elif per_row:
        upstream = upstream.contiguous()
    _step_backward_kernel[(b * tiles,)](
        x, v, xp, vref if vref is not None else x, grad, coef, c12, upstream, b, d, tiles,
        BLOCK=block, HAS_REF=vref is not None, UPSTREAM_PER_ROW=per_row, num_warps=num_warps_for(block),
    )
    return grad

"""Fused Triton kernels for the per-step Gaussian policy of flow-matching GRPO.

Every dynamics has the mean μ = α·x + β·v and the log-prob −γ·mean_D (x' − μ)² + c0 with per-sample
scalars (``otca_fast.reference.step_coefficients``), so three kernels serve all of them:

* ``_step_partial_kernel``  — one pass over (x, v[, x' | ε][, v_ref]) per tile: the tile's Σ(x' − μ)²
  (and Σ(v − v_ref)² for the KL term); in *sample* mode it also draws x' = μ + std·ε, rounds it to
  the storage dtype, stores x' and μ, and takes the residual of the *rounded* x' — the value the
  training pass will read back, which is why rollout and training log-probs agree bit for bit.
* ``_logprob_finalize_kernel`` — per row, the deterministic sum of its tile partials → log-prob.
  No atomics: the reduction order is fixed, so the same inputs give the same bits every time.
* ``_step_backward_kernel`` — ∂/∂v of (upstream · log-prob [+ KL]) recomputing μ from x and v:
  grad = g·(c1·(x' − μ) + c2·(v − v_ref)), with ∂logp/∂v = 2γβ(x' − μ)/D. Nothing latent-sized is
  stored between forward and backward.

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


def num_warps_for(block: int) -> int:
    return 8 if block >= 4096 else 4


@triton.jit
def _step_partial_kernel(
    x_ptr, v_ptr, xp_ptr, noise_ptr, vref_ptr,      # inputs (unused ones are dummies)
    xp_out_ptr, mean_out_ptr,                       # outputs of sample mode
    alpha_ptr, beta_ptr, std_ptr,                   # per-row scalars [B]
    partial_sq_ptr, partial_kl_ptr,                 # per-(row, tile) partial sums [B * tiles]
    D, tiles_per_row,
    BLOCK: tl.constexpr, SAMPLE: tl.constexpr, HAS_REF: tl.constexpr,
):
    pid = tl.program_id(0)
    row = pid // tiles_per_row
    tile = pid % tiles_per_row
    offs = tile * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    base = row.to(tl.int64) * D
    alpha = tl.load(alpha_ptr + row)
    beta = tl.load(beta_ptr + row)
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    mu = alpha * x + beta * v
    if SAMPLE:
        std = tl.load(std_ptr + row)
        eps = tl.load(noise_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        xp_stored = (mu + std * eps).to(xp_out_ptr.dtype.element_ty)
        tl.store(xp_out_ptr + base + offs, xp_stored, mask=mask)
        tl.store(mean_out_ptr + base + offs, mu.to(mean_out_ptr.dtype.element_ty), mask=mask)
        xp = xp_stored.to(tl.float32)
    else:
        xp = tl.load(xp_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    resid = tl.where(mask, xp - mu, 0.0)
    tl.store(partial_sq_ptr + pid, tl.sum(resid * resid, axis=0))
    if HAS_REF:
        vref = tl.load(vref_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        dv = tl.where(mask, v - vref, 0.0)
        tl.store(partial_kl_ptr + pid, tl.sum(dv * dv, axis=0))


@triton.jit
def _logprob_finalize_kernel(partial_sq_ptr, gamma_ptr, const_ptr, out_ptr, tiles_per_row,
                             resid_scale, const_scale, BLOCK_T: tl.constexpr):
    # log p = −γ·Σ(x'−μ)²·resid_scale + c0·const_scale  (mean: 1/D and 1; sum: 1 and D)
    row = tl.program_id(0)
    acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    for start in range(0, tiles_per_row, BLOCK_T):
        idx = start + tl.arange(0, BLOCK_T)
        acc += tl.load(partial_sq_ptr + row * tiles_per_row + idx, mask=idx < tiles_per_row, other=0.0)
    sq = tl.sum(acc, axis=0)
    gamma = tl.load(gamma_ptr + row)
    const = tl.load(const_ptr + row)
    tl.store(out_ptr + row, -gamma * sq * resid_scale + const * const_scale)


@triton.jit
def _step_backward_kernel(x_ptr, v_ptr, xp_ptr, vref_ptr, grad_ptr,
                          alpha_ptr, beta_ptr, c1_ptr, c2_ptr, upstream_ptr,
                          D, tiles_per_row,
                          BLOCK: tl.constexpr, HAS_REF: tl.constexpr, UPSTREAM_PER_ROW: tl.constexpr):
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
    alpha = tl.load(alpha_ptr + row)
    beta = tl.load(beta_ptr + row)
    c1 = tl.load(c1_ptr + row) * g
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(xp_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    grad = c1 * (xp - (alpha * x + beta * v))
    if HAS_REF:
        c2 = tl.load(c2_ptr + row) * g
        vref = tl.load(vref_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        grad += c2 * (v - vref)
    tl.store(grad_ptr + base + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# launchers (shapes are validated by otca_fast.ops; tensors here are contiguous [B, D] views)
# ---------------------------------------------------------------------------------------------

def step_partials(x: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, *,
                  xp: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                  std: torch.Tensor | None = None, vref: torch.Tensor | None = None):
    """Per-(row, tile) partial sums. Sample mode (``noise`` given) also returns (x', μ).

    Returns ``(partial_sq [B, tiles], partial_kl [B, tiles] | None, xp_out | None, mean_out | None)``.
    """
    b, d = x.shape
    block = block_size(d)
    tiles = triton.cdiv(d, block)
    partial_sq = torch.empty(b, tiles, dtype=torch.float32, device=x.device)
    partial_kl = torch.empty_like(partial_sq) if vref is not None else partial_sq
    sample = noise is not None
    xp_out = torch.empty_like(x) if sample else x
    mean_out = torch.empty_like(x) if sample else x
    _step_partial_kernel[(b * tiles,)](
        x, v, xp if xp is not None else x, noise if sample else x, vref if vref is not None else x,
        xp_out, mean_out, alpha, beta, std if std is not None else alpha,
        partial_sq, partial_kl, d, tiles,
        BLOCK=block, SAMPLE=sample, HAS_REF=vref is not None, num_warps=num_warps_for(block),
    )
    return (partial_sq, partial_kl if vref is not None else None,
            xp_out if sample else None, mean_out if sample else None)


def finalize_logprob(partial_sq: torch.Tensor, gamma: torch.Tensor, const: torch.Tensor, d: int,
                     reduction: str) -> torch.Tensor:
    b, tiles = partial_sq.shape
    out = torch.empty(b, dtype=torch.float32, device=partial_sq.device)
    resid_scale, const_scale = (1.0 / d, 1.0) if reduction == "mean" else (1.0, float(d))
    block_t = min(FINALIZE_BLOCK, triton.next_power_of_2(tiles))
    _logprob_finalize_kernel[(b,)](partial_sq, gamma, const, out, tiles, resid_scale, const_scale,
                                   BLOCK_T=block_t)
    return out


def step_backward(x: torch.Tensor, v: torch.Tensor, xp: torch.Tensor, alpha: torch.Tensor,
                  beta: torch.Tensor, c1: torch.Tensor, upstream: torch.Tensor, *,
                  vref: torch.Tensor | None = None, c2: torch.Tensor | None = None) -> torch.Tensor:
    """grad_v = g·(c1·(x' − μ) + c2·(v − v_ref)); ``upstream`` is ``[B]`` or a 0-d tensor."""
    b, d = x.shape
    block = block_size(d)
    tiles = triton.cdiv(d, block)
    grad = torch.empty_like(v)
    upstream = upstream.to(torch.float32).contiguous()
    _step_backward_kernel[(b * tiles,)](
        x, v, xp, vref if vref is not None else x, grad, alpha, beta, c1,
        c2 if c2 is not None else c1, upstream, d, tiles,
        BLOCK=block, HAS_REF=vref is not None, UPSTREAM_PER_ROW=upstream.dim() == 1,
        num_warps=num_warps_for(block),
    )
    return grad

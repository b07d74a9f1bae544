"""Fused Triton kernels for the per-step Gaussian policy of flow-matching GRPO.

Every dynamics has the mean μ = α·x + β·v and the log-prob −γ·mean_D (x' − μ)² + c0 with per-sample
scalars (``otca_fast.reference.step_coefficients``), so two kernels serve all of them:

* ``_step_forward_kernel`` — one pass over (x, v, x' | ε): each tile stores its Σ(x' − μ)²
  (``tile_partials``); the last tile of each row to finish sums the row's partials in a fixed order
  and writes the log-prob (``row_logprob``) — one launch, deterministic, no float atomics. In
  *sample* mode it also draws x' = μ + std·ε, rounds it to the storage dtype, stores x' and μ, and
  takes the residual of the *rounded* x' — the value the training pass will read back, which is
  why rollout and training log-probs agree bit for bit. ``grpo_loss.py``'s kernel is built from the
  same two functions.
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

from otca_fast.kernels.layout import ALPHA, BETA, CONST, GAMMA, STD

# Largest tile (elements per program). 4096 elements x 3 inputs keeps every SM busy with 16-byte
# loads at the sizes we target; tests lower it to force many tiles and ragged edges.
MAX_BLOCK = 4096
FINALIZE_BLOCK = 256


def block_size(d: int) -> int:
    return max(16, min(MAX_BLOCK, triton.next_power_of_2(d)))


# rows of the per-sample coefficient table ``coef [5, B]`` (see ``otca_fast.ops``)
_ALPHA, _BETA, _STD, _GAMMA, _CONST = (tl.constexpr(i) for i in (ALPHA, BETA, STD, GAMMA, CONST))


def num_warps_for(block: int) -> int:
    return 8 if block >= 4096 else 4


def finalize_block(tiles: int) -> int:
    return max(2, min(FINALIZE_BLOCK, triton.next_power_of_2(tiles)))


@triton.jit
def tile_partials(x_ptr, v_ptr, xp_ptr, noise_ptr, vref_ptr, xp_out_ptr, mean_out_ptr, coef_ptr, partial_ptr,
                  pid, row, tile, B, D, tiles_per_row,
                  BLOCK: tl.constexpr, SAMPLE: tl.constexpr, HAS_REF: tl.constexpr):
    """One tile: store Σ(x'−μ)² (and Σ(v−v_ref)²) of its elements; in sample mode draw and store x', μ."""
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
def last_tile_of_row(counter_ptr, row, tiles_per_row):
    """True in exactly one program per row: the one that finishes last.

    The acquire-release atomic orders every tile's partial-sum store before the last tile reads them
    (the threadfence-reduction pattern), so the row is finalised inside the same launch; the last
    tile then resets the counter, leaving the zeroed buffer ready for the next launch.
    """
    done = tl.atomic_add(counter_ptr + row, 1, sem="acq_rel")
    is_last = done == tiles_per_row - 1
    return is_last


@triton.jit
def row_sum(partial_ptr, row, tiles_per_row, BLOCK_T: tl.constexpr):
    """Σ over one row's tile partials, in a fixed order (``.cg``: read past the SM's L1, where other
    programs' partials were never cached)."""
    acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    for start in range(0, tiles_per_row, BLOCK_T):
        idx = start + tl.arange(0, BLOCK_T)
        acc += tl.load(partial_ptr + row * tiles_per_row + idx, mask=idx < tiles_per_row, other=0.0,
                       cache_modifier=".cg")
    return tl.sum(acc, axis=0)


@triton.jit
def row_logprob(partial_ptr, coef_ptr, row, B, tiles_per_row, resid_scale, const_scale, BLOCK_T: tl.constexpr):
    """log p = −γ·Σ(x'−μ)²·resid_scale + c0·const_scale  (mean: 1/D and 1; sum: 1 and D)."""
    sq = row_sum(partial_ptr, row, tiles_per_row, BLOCK_T)
    gamma = tl.load(coef_ptr + _GAMMA * B + row)
    const = tl.load(coef_ptr + _CONST * B + row)
    return -gamma * sq * resid_scale + const * const_scale


@triton.jit
def _step_forward_kernel(
    x_ptr, v_ptr, xp_ptr, noise_ptr, xp_out_ptr, mean_out_ptr,
    coef_ptr,              # [5, B] per-row scalars (alpha, beta, std, gamma, const)
    partial_ptr,           # [B * tiles] partial sums Σ(x'−μ)²
    counter_ptr,           # [B] int32 zeros: tiles of the row done so far
    logp_ptr,              # [B] float32 out
    B, D, tiles_per_row, resid_scale, const_scale,
    BLOCK: tl.constexpr, BLOCK_T: tl.constexpr, SAMPLE: tl.constexpr,
):
    pid = tl.program_id(0)
    row = pid // tiles_per_row
    tile = pid % tiles_per_row
    tile_partials(x_ptr, v_ptr, xp_ptr, noise_ptr, x_ptr, xp_out_ptr, mean_out_ptr, coef_ptr, partial_ptr,
                  pid, row, tile, B, D, tiles_per_row, BLOCK, SAMPLE, False)
    if last_tile_of_row(counter_ptr, row, tiles_per_row):
        logp = row_logprob(partial_ptr, coef_ptr, row, B, tiles_per_row, resid_scale, const_scale, BLOCK_T)
        tl.store(logp_ptr + row, logp)
        tl.store(counter_ptr + row, 0)


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

def logprob_scales(d: int, reduction: str) -> tuple[float, float]:
    return (1.0 / d, 1.0) if reduction == "mean" else (1.0, float(d))


_counters: dict[tuple[torch.device, int], torch.Tensor] = {}


def row_counters(b: int, device: torch.device) -> torch.Tensor:
    """A zeroed int32 ``[B]`` buffer for ``last_tile_of_row``; every launch leaves it zeroed again.

    One buffer per device and current stream (kernels on one stream run one after another, so
    they can share it; a launch on another stream gets its own).
    """
    key = (device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    buf = _counters.get(key)
    if buf is None or buf.numel() < b:
        buf = torch.zeros(max(b, 64), dtype=torch.int32, device=device)
        _counters[key] = buf
    return buf


def step_forward(x: torch.Tensor, v: torch.Tensor, coef: torch.Tensor, *, xp: torch.Tensor | None = None,
                 noise: torch.Tensor | None = None, reduction: str = "mean"):
    """One launch: the log-prob ``[B]`` of x' (given, or drawn from ``noise``: then also (x', μ))."""
    b, d = x.shape
    block = block_size(d)
    tiles = triton.cdiv(d, block)
    partials = torch.empty(b * tiles, dtype=torch.float32, device=x.device)
    log_prob = torch.empty(b, dtype=torch.float32, device=x.device)
    sample = noise is not None
    xp_out = torch.empty_like(x) if sample else x
    mean_out = torch.empty_like(x) if sample else x
    resid_scale, const_scale = logprob_scales(d, reduction)
    _step_forward_kernel[(b * tiles,)](
        x, v, xp if xp is not None else x, noise if sample else x, xp_out, mean_out, coef, partials,
        row_counters(b, x.device), log_prob, b, d, tiles, resid_scale, const_scale,
        BLOCK=block, BLOCK_T=finalize_block(tiles), SAMPLE=sample, num_warps=num_warps_for(block),
        enable_fp_fusion=False,  # no FMA contraction: sample mode and log-prob mode must round alike
    )
    return log_prob, (xp_out if sample else None), (mean_out if sample else None)


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

"""TCD's per-state cosine reductions: ⟨x_j, x_final⟩, ‖x_j‖², ‖x_final‖² in one pass over a trajectory.

TCD (``otca_fast.credit.trajectory``) needs s_j = cos(x_j, x_final) for every state j of every
sample. A Wan 480p trajectory is 8 samples x 21 states x 2.1M bf16 elements (700 MB); upcasting it
to float32 first would cost 1.4 GB more and a second pass. This kernel reads each element once.

Grid: 1-D over (sample n, frame f, tile) — not over states. A program loads its tile of the
*final* latent once, then walks the S states of that sample, storing for each state the tile's
partial ⟨x_j, x_final⟩ and ‖x_j‖². So the final latent is read once per trajectory instead of once
per state, and the traffic is exactly (S + 1)·D elements per sample. Partials are written to
``[N, S, F, tiles]`` buffers (plus ``[N, F, tiles]`` for ‖x_final‖²) with no atomics, so the
reduction order is fixed and results are bit-identical run to run; the finalize (a sum over tiles
of a few thousand numbers per sample, then cos = dot / (‖x‖·‖x_final‖) and the mean over frames)
is a tiny torch reduction in float64.

Per-frame mode views a state ``[*before, F, *after]`` as ``[A, F, B]``; frame f of a tile-local
index i is at offset (i // B)·F·B + f·B + i % B, so loads stay contiguous in runs of B (= H·W for a
``[C, F, H, W]`` video latent). Loads are upcast to float32 at once (the interpreter cannot do
bf16 arithmetic; the GPU accumulates in float32 anyway), float64 inputs accumulate in float64.
Every access is masked: any D, not only multiples of the block.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from otca_fast.reference import frame_layout

# Elements per program and state: 4096 bf16 = 8 KB per load keeps an H100 streaming; tests lower
# it (``block=``) to force several tiles and ragged edges on tiny latents.
MAX_BLOCK = 4096


@triton.jit
def _cosine_partial_kernel(
    states_ptr, final_ptr,                  # [N, S, *state] (any strides on N, S), [N, *state]
    dot_ptr, ss_ptr, ff_ptr,                # partials [N, S, F, tiles], [N, S, F, tiles], [N, F, tiles]
    S, F, B, AB, tiles, stride_sn, stride_sj, stride_fn,
    BLOCK: tl.constexpr, PER_FRAME: tl.constexpr, ACC_F64: tl.constexpr,
):
    pid = tl.program_id(0)
    tile = pid % tiles
    nf = pid // tiles
    f = nf % F
    n = nf // F
    i = tile * BLOCK + tl.arange(0, BLOCK)
    mask = i < AB
    if PER_FRAME:
        a = i // B
        off = a.to(tl.int64) * F * B + f.to(tl.int64) * B + (i - a * B).to(tl.int64)
    else:
        off = i.to(tl.int64)
    fin = tl.load(final_ptr + n.to(tl.int64) * stride_fn + off, mask=mask, other=0.0)
    if ACC_F64:
        fin = fin.to(tl.float64)
    else:
        fin = fin.to(tl.float32)
    tl.store(ff_ptr + pid, tl.sum(fin * fin, axis=0))
    # walk the states by pointer increments (64-bit pointers: no int32 overflow at video sizes)
    state_ptrs = states_ptr + n.to(tl.int64) * stride_sn + off
    out = (n.to(tl.int64) * S * F + f) * tiles + tile
    for _ in range(0, S):
        x = tl.load(state_ptrs, mask=mask, other=0.0)
        if ACC_F64:
            x = x.to(tl.float64)
        else:
            x = x.to(tl.float32)
        tl.store(dot_ptr + out, tl.sum(x * fin, axis=0))
        tl.store(ss_ptr + out, tl.sum(x * x, axis=0))
        state_ptrs += stride_sj
        out += F * tiles


def _inner_contiguous(t: torch.Tensor, lead: int) -> bool:
    """Whether every dimension after the first ``lead`` ones is laid out densely (row-major)."""
    expected = 1
    for size, stride in zip(reversed(t.shape[lead:]), reversed(t.stride()[lead:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def trajectory_cosines(states: torch.Tensor, final: torch.Tensor, *, frame_dim: int | None = None,
                       block: int | None = None) -> torch.Tensor:
    """``[N, S + 1]`` cosines, exactly :func:`otca_fast.reference.trajectory_cosines`.

    ``states`` ``[N, S, *state]`` may be a strided view (e.g. ``latents[:, :-1]``): only the
    per-state layout has to be dense, otherwise it is copied (same dtype) first. Shapes, dtypes
    and devices are validated by ``otca_fast.credit``. Returns float32 (float64 for float64 inputs).
    """
    n, s = states.shape[:2]
    if not _inner_contiguous(states, 2):
        states = states.contiguous()
    if not _inner_contiguous(final, 1):
        final = final.contiguous()
    a, f, b = frame_layout(states.shape[2:], frame_dim)
    ab = a * b
    if block is None:
        block = max(16, min(MAX_BLOCK, triton.next_power_of_2(ab)))
    tiles = triton.cdiv(ab, block)
    acc_f64 = torch.float64 in (states.dtype, final.dtype)
    acc = torch.float64 if acc_f64 else torch.float32
    dot = torch.empty(n, s, f, tiles, dtype=acc, device=states.device)
    ss = torch.empty(n, s, f, tiles, dtype=acc, device=states.device)
    ff = torch.empty(n, f, tiles, dtype=acc, device=states.device)
    if n * f * tiles >= 2**31:
        raise ValueError(f"states: {n} samples x {f} frames x {tiles} tiles exceed the 2^31 program grid")
    _cosine_partial_kernel[(n * f * tiles,)](
        states, final, dot, ss, ff, s, f, b, ab, tiles,
        states.stride(0), states.stride(1), final.stride(0),
        BLOCK=block, PER_FRAME=frame_dim is not None, ACC_F64=acc_f64,
        num_warps=8 if block >= 4096 else 4,
    )
    # finalize: sums over tiles in float64 (fixed order: deterministic), then the cosines
    dot_f = dot.double().sum(-1)  # [N, S, F]
    ff_f = ff.double().sum(-1)  # [N, F]
    state_norm = ss.double().sum(-1).sqrt()
    final_norm = ff_f.sqrt()
    tiny = torch.finfo(torch.float64).tiny
    cos = (dot_f / (state_norm * final_norm[:, None, :]).clamp_min(tiny)).mean(-1)
    self_cos = (ff_f / (final_norm * final_norm).clamp_min(tiny)).mean(-1)
    return torch.cat([cos, self_cos[:, None]], dim=1).to(acc)


def bytes_read(states: torch.Tensor, final: torch.Tensor) -> int:
    """Bytes the kernel reads for one call (for GB/s reports): every state once, the final once."""
    n, s = states.shape[:2]
    d = math.prod(states.shape[2:])
    return n * d * (s * states.element_size() + final.element_size())

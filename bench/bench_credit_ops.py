"""Benchmarks of the credit schemes and of TCD's trajectory reduction.

    pytest bench/bench_credit_ops.py --benchmark-only

* ``build_advantages`` for every scheme at N = 64 samples (16 groups of 4), T = 20 steps, K = 3
  rewards. The schemes that read the trajectory (``otca``, ``tcd_only``, ``coca``) get latents
  ``[64, 21, 16, 64, 64]`` bf16 (SD3.5-M 512 px) on a GPU, ``[64, 21, 16, 16, 16]`` float32 on a CPU.
* ``trajectory_credit`` at the Wan2.1 480p/81-frame latent size, 16 x 21 x 60 x 104 (2.1M elements
  per state), T = 20, bf16: N = 8 on a GPU (the Triton kernel); on a CPU N = 1, through the torch
  reference (the only CPU path outside the Triton interpreter, which is a correctness tool, not a
  benchmark target). ``extra_info`` carries the bytes read and the achieved GB/s.

Benchmarks never assert timings; they check only that the results are finite and shaped right.
``bench/gpu_credit_report.py`` prints the GPU table and checks the kernel against the reference.
"""

from __future__ import annotations

import pytest
import torch

from otca_fast import credit
from otca_fast.kernels.trajectory_credit import bytes_read

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
N, T, K, GROUP = 64, 20, 3, 4
IMAGE_LATENT = (16, 64, 64) if CUDA else (16, 16, 16)
LATENT_DTYPE = torch.bfloat16 if CUDA else torch.float32
WAN_480P = (16, 21, 60, 104)
WAN_N = 8 if CUDA else 1


@pytest.fixture(autouse=True)
def _cpu_uses_the_reference(monkeypatch):
    if not CUDA:
        monkeypatch.setenv("OTCA_FAST_BACKEND", "reference")


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def trajectory(n: int, state: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A trajectory noise → end point, built state by state (no float32 copy of the whole thing)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    end = torch.randn(n, *state, device=DEVICE, generator=g)
    noise = torch.randn(n, *state, device=DEVICE, generator=g)
    lat = torch.empty(n, T + 1, *state, device=DEVICE, dtype=dtype)
    for j in range(T + 1):
        t = j / T
        lat[:, j] = ((1 - t) * noise + t * end).to(dtype)
    return lat


@pytest.fixture(scope="module")
def scheme_inputs():
    g = torch.Generator(device=DEVICE).manual_seed(1)
    latents = trajectory(N, IMAGE_LATENT, LATENT_DTYPE)
    x0 = latents[:, -1:].expand(N, T, *IMAGE_LATENT) + 0.1 * torch.randn(
        N, T, *IMAGE_LATENT, device=DEVICE, generator=g).to(LATENT_DTYPE)
    sigmas = torch.linspace(1, 0, T + 1, device=DEVICE)
    return dict(
        rewards=torch.randn(N, K, device=DEVICE, generator=g),
        group_ids=torch.arange(N // GROUP, device=DEVICE).repeat_interleave(GROUP),
        latents=latents,
        x0_preds=x0,
        step_rewards=torch.randn(N, T + 1, K, device=DEVICE, generator=g).cumsum(1),
        sigmas=3 * sigmas / (1 + 2 * sigmas),
    )


@pytest.mark.parametrize("scheme", credit.SCHEMES)
def test_build_advantages(benchmark, scheme, scheme_inputs):
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    benchmark.group = "build_advantages N=64 T=20 K=3"
    benchmark.extra_info.update(device=DEVICE, latent=list(IMAGE_LATENT), latent_dtype=str(LATENT_DTYPE))

    def run():
        adv, _ = credit.build_advantages(scheme, **scheme_inputs, generator=generator, progress=0.5)
        _sync()
        return adv

    adv = benchmark.pedantic(run, rounds=10 if CUDA else 3, warmup_rounds=1)
    assert adv.shape == (N, T) and bool(torch.isfinite(adv).all())


@pytest.mark.parametrize("per_frame", [False, True], ids=["flat", "per_frame"])
def test_trajectory_credit_wan480p(benchmark, per_frame):
    latents = trajectory(WAN_N, WAN_480P, torch.bfloat16, seed=2)
    benchmark.group = f"trajectory_credit Wan 480p N={WAN_N} T=20 bf16"

    def run():
        w = credit.trajectory_credit(latents, per_frame=per_frame)
        _sync()
        return w

    w = benchmark.pedantic(run, rounds=10 if CUDA else 2, warmup_rounds=1)
    assert w.shape == (WAN_N, T) and bool(torch.isfinite(w).all())
    moved = bytes_read(latents[:, :-1], latents[:, -1])
    benchmark.extra_info.update(device=DEVICE, samples=WAN_N, bytes_read=moved,
                                gb_per_s=moved / benchmark.stats.stats.median / 1e9,
                                backend="triton" if CUDA else "torch reference")

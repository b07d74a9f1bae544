"""Where the host time of one fused forward+backward goes (cProfile), for launch-overhead work.

    python bench/profile_overhead.py [--size wan_480p_81f] [--batch 4] [--iters 200]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latent_sizes import GPU_SIZES, sizes  # noqa: E402
from otca_fast import ops  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="sd35m_512")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=200)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = (args.batch, *(GPU_SIZES if device == "cuda" else sizes())[args.size])
    x = torch.randn(shape, device=device, dtype=torch.bfloat16)
    v = torch.randn(shape, device=device, dtype=torch.bfloat16)
    xp, logp, _, _ = ops.sde_step(x, v, 0.7, 0.65)
    adv = torch.randn(args.batch, device=device)
    v.requires_grad_()

    def step():
        v.grad = None
        ops.grpo_step_loss(x, v, xp, logp, adv, 0.7, 0.65, check_finite=False)[0].backward()

    for _ in range(10):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        step()
    host = (time.perf_counter() - t0) / args.iters
    if device == "cuda":
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / args.iters
    print(f"host time per fwd+bwd {host * 1e6:.1f} us, wall incl. drain {wall * 1e6:.1f} us")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.iters):
        step()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    if device == "cuda":
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as kprof:
            for _ in range(20):
                step()
            torch.cuda.synchronize()
        print(kprof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

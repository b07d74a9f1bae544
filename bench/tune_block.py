"""Device time of the fused GRPO step (forward + backward, CUDA-graph replay) per tile size.

    python bench/tune_block.py [--size wan_480p_81f] [--batch 4]

Prints one line per candidate ``MAX_BLOCK`` (elements per program) and warps; the kernels'
default is the fastest measured on an H100 (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_report import SIGMA, SIGMA_NEXT, copy_bandwidth_gbs, graph_ms, make_inputs  # noqa: E402
from latent_sizes import GPU_SIZES  # noqa: E402
from otca_fast import ops  # noqa: E402
from otca_fast.kernels import sde_step as sde_kernels  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="wan_480p_81f")
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    shape = GPU_SIZES[args.size]
    inputs = make_inputs(shape, args.batch)
    numel = args.batch * int(torch.tensor(shape).prod())
    copy_bw = copy_bandwidth_gbs()

    def fused(x, v, xp, old, adv):
        v.grad = None
        ops.grpo_step_loss(x, v, xp, old, adv, SIGMA, SIGMA_NEXT, check_finite=False)[0].backward()

    default_warps = sde_kernels.num_warps_for
    print(f"{args.size} x{args.batch}, copy bandwidth {copy_bw:.0f} GB/s")
    for block in (1024, 2048, 4096, 8192, 16384):
        for warps in (4, 8, 16):
            sde_kernels.MAX_BLOCK = block
            sde_kernels.num_warps_for = lambda _b, w=warps: w
            ms = graph_ms(fused, inputs)
            gbs = 7 * numel * 2 / (ms * 1e-3) / 1e9
            print(f"MAX_BLOCK {block:6d} warps {warps:2d}: {ms * 1e3:7.1f} us  {gbs:6.0f} GB/s  "
                  f"{100 * gbs / copy_bw:4.0f}% of copy")
    sde_kernels.num_warps_for = default_warps
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

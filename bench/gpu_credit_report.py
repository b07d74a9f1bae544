"""The credit schemes and TCD's trajectory kernel on a GPU: one table, and a parity check.

    python bench/gpu_credit_report.py [--json PATH]

1. Parity (exit status 1 on any failure): the Triton cosine kernel against the float64 torch
   reference on odd-sized float64/float32/bf16 latents (flat and per-frame, strided views), at the
   full Wan 480p size in bf16, and ``build_advantages("otca")`` on the Triton backend against the
   reference backend.
2. ``build_advantages`` per scheme at N = 64 (16 groups of 4), T = 20, K = 3 with SD3.5-M 512 px
   latents ``[64, 21, 16, 64, 64]`` bf16: median ms per call (CUDA events, host validation
   included, as the trainer calls it).
3. ``trajectory_credit`` at Wan2.1 480p/81 frames, ``[8, 21, 16, 21, 60, 104]`` bf16 (704 MB), flat
   and per-frame: ms, GB/s (every state read once: N·(T+1)·D·2 bytes), % of the device-to-device
   copy bandwidth, and the extra peak memory, for the Triton kernel and the chunked torch
   reference (which upcasts one state at a time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from otca_fast import credit, reference  # noqa: E402
from otca_fast.kernels import trajectory_credit as kernel  # noqa: E402
from otca_fast.ops import forced_backend as backend

N, T, K, GROUP = 64, 20, 3, 4
IMAGE_LATENT = (16, 64, 64)
WAN_480P = (16, 21, 60, 104)
WAN_N = 8




def median_ms(fn, reps: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def extra_peak_mb(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth_gbs() -> float:
    src = torch.empty(2**28, dtype=torch.float32, device="cuda").normal_()  # 1 GiB
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), reps=10)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def trajectory(n: int, state: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Noise → end point with per-state jitter, built state by state."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    end = torch.randn(n, *state, device="cuda", generator=g)
    noise = torch.randn(n, *state, device="cuda", generator=g)
    lat = torch.empty(n, T + 1, *state, device="cuda", dtype=dtype)
    for j in range(T + 1):
        t = j / T
        jitter = 0.1 * torch.randn(n, *state, device="cuda", generator=g) if j < T else 0.0
        lat[:, j] = ((1 - t) * noise + t * end + jitter).to(dtype)
    return lat


def check(name: str, out: torch.Tensor, ref: torch.Tensor, atol: float, failures: list[str]) -> None:
    err = float((out.double() - ref.double()).abs().max())
    ok = bool(torch.isfinite(out).all()) and err <= atol
    print(f"  {'ok  ' if ok else 'FAIL'} {name:<58} max |diff| {err:.2e} (tolerance {atol:.0e})")
    if not ok:
        failures.append(name)


def parity(failures: list[str]) -> None:
    print("parity: Triton trajectory cosines vs the float64 torch reference")
    g = torch.Generator(device="cuda").manual_seed(3)
    for dtype, atol in ((torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 1e-6)):
        for frame_dim in (None, 1):
            lat = torch.randn(3, 6, 5, 7, 9, 11, device="cuda", generator=g, dtype=torch.float64).to(dtype)
            states = lat[:, 0:5]
            out = kernel.trajectory_cosines(states, lat[:, -1], frame_dim=frame_dim, block=64)
            ref = reference.trajectory_cosines(states.double(), lat[:, -1].double(), frame_dim=frame_dim)
            check(f"odd shape 3x6x5x7x9x11 {str(dtype)[6:]} frame_dim={frame_dim}", out, ref, atol, failures)
    buf = torch.randn(2, 9, 4, 33, device="cuda", generator=g)
    out = kernel.trajectory_cosines(buf[:, 1:8:3], buf[:, -1])
    ref = reference.trajectory_cosines(buf[:, 1:8:3].double(), buf[:, -1].double())
    check("strided states view", out, ref, 1e-6, failures)

    lat = trajectory(WAN_N, WAN_480P, torch.bfloat16, seed=4)
    for per_frame in (False, True):
        fd = 1 if per_frame else None
        out = kernel.trajectory_cosines(lat[:, :-1], lat[:, -1], frame_dim=fd)
        # float64 reference one sample at a time (the whole trajectory in float64 would be 2.8 GB)
        ref = torch.cat([reference.trajectory_cosines(lat[i:i + 1, :-1].double(), lat[i:i + 1, -1].double(),
                                                      frame_dim=fd) for i in range(WAN_N)])
        check(f"Wan 480p bf16 cosines, per_frame={per_frame}", out, ref, 1e-5, failures)
        w = credit.tcd_weights(out.double())
        w_ref = credit.tcd_weights(ref)
        check(f"Wan 480p bf16 TCD credit w, per_frame={per_frame}", w, w_ref, 1e-3, failures)
    del lat
    torch.cuda.empty_cache()


def scheme_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(1)
    latents = trajectory(N, IMAGE_LATENT, torch.bfloat16)
    x0 = (latents[:, -1:].float() + 0.1 * torch.randn(N, T, *IMAGE_LATENT, device="cuda", generator=g))
    sigmas = torch.linspace(1, 0, T + 1, device="cuda")
    return dict(rewards=torch.randn(N, K, device="cuda", generator=g),
                group_ids=torch.arange(N // GROUP, device="cuda").repeat_interleave(GROUP),
                latents=latents, x0_preds=x0.to(torch.bfloat16),
                step_rewards=torch.randn(N, T + 1, K, device="cuda", generator=g).cumsum(1),
                sigmas=3 * sigmas / (1 + 2 * sigmas))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_credit_report.py needs a CUDA GPU", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(0)
    copy_bw = copy_bandwidth_gbs()
    print(f"device: {name}, torch {torch.__version__}, device-to-device copy {copy_bw:.0f} GB/s\n")
    failures: list[str] = []
    parity(failures)

    inputs = scheme_inputs()
    with backend("reference"):
        ref_adv, _ = credit.build_advantages("otca", **inputs)
    tri_adv, _ = credit.build_advantages("otca", **inputs)
    check("build_advantages('otca'): triton vs reference backend", tri_adv, ref_adv, 1e-3, failures)

    results: dict[str, object] = {"device": name, "copy_gbs": copy_bw, "schemes": {}, "trajectory": []}
    print(f"\nbuild_advantages, N={N} T={T} K={K}, latents {list(IMAGE_LATENT)} bf16 (median of 20 calls)")
    print(f"  {'scheme':<12}{'ms':>9}")
    for scheme in credit.SCHEMES:
        gen = torch.Generator(device="cuda").manual_seed(0)
        ms = median_ms(lambda s=scheme, g=gen, kw=inputs: credit.build_advantages(s, **kw, generator=g,
                                                                                  progress=0.5))
        results["schemes"][scheme] = ms
        print(f"  {scheme:<12}{ms:9.3f}")
    del inputs
    torch.cuda.empty_cache()

    lat = trajectory(WAN_N, WAN_480P, torch.bfloat16, seed=5)
    moved = kernel.bytes_read(lat[:, :-1], lat[:, -1])
    print(f"\ntrajectory_credit, Wan 480p {list(WAN_480P)} x N={WAN_N} x {T + 1} states bf16 "
          f"({moved / 1e6:.0f} MB read per call)")
    print(f"  {'mode':<10}{'triton ms':>10}{'GB/s':>7}{'%copy':>6}{'extra MB':>9} | "
          f"{'torch ref ms':>12}{'GB/s':>7}{'extra MB':>9}{'speedup':>8}")
    for per_frame in (False, True):
        def tri(pf=per_frame):
            return credit.trajectory_credit(lat, per_frame=pf)

        def ref(pf=per_frame):
            with backend("reference"):
                return credit.trajectory_credit(lat, per_frame=pf)

        row = {"per_frame": per_frame, "bytes": moved}
        row["triton_ms"], row["triton_extra_mb"] = median_ms(tri), extra_peak_mb(tri)
        row["reference_ms"], row["reference_extra_mb"] = median_ms(ref, reps=5), extra_peak_mb(ref)
        row["triton_gbs"] = moved / (row["triton_ms"] * 1e-3) / 1e9
        row["reference_gbs"] = moved / (row["reference_ms"] * 1e-3) / 1e9
        results["trajectory"].append(row)
        print(f"  {'per-frame' if per_frame else 'flat':<10}{row['triton_ms']:10.3f}{row['triton_gbs']:7.0f}"
              f"{100 * row['triton_gbs'] / copy_bw:6.0f}{row['triton_extra_mb']:9.1f} | "
              f"{row['reference_ms']:12.3f}{row['reference_gbs']:7.0f}{row['reference_extra_mb']:9.1f}"
              f"{row['reference_ms'] / row['triton_ms']:8.2f}")
    print("  GB/s = bytes read (every state once) / median time; %copy = of the device-to-device copy "
          "bandwidth (which counts read + write); extra MB = peak allocated during one call beyond the "
          "inputs")
    if args.json:
        args.json.write_text(json.dumps(results | {"failures": failures}, indent=1))
    if failures:
        print(f"\nERROR: {len(failures)} parity check(s) failed: {failures}", file=sys.stderr)
        return 1
    print("\nall parity checks passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

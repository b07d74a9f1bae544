"""A full GRPO iteration on a GPU with a Wan2.1-T2V-1.3B transformer at 480p: fused ops vs the eager loop.

    python bench/gpu_train_report.py [--frames 33] [--steps 10] [--group 4] [--iters 3] [--json PATH]
    python bench/gpu_train_report.py --smoke        # the same script at toy size (any machine, seconds)
    python bench/gpu_train_report.py --device cpu --height 16 --width 16 --frames 1 --steps 2 --group 2
                                                    # the real 1.3B transformer on CPU at a toy latent

The transformer is built from the published Wan2.1-T2V-1.3B config (``wan21_1_3b_config()``: 30 layers,
12 x 128 heads, ffn 8960, text_dim 4096) with random weights, so nothing is downloaded; the VAE and the
UMT5 text encoder are the tiny random ones of the tests (their cost is not what this measures; the text
encoder keeps the real 4096-wide output and 512-token context the transformer's cross-attention sees).
Latents are the real 480x832 ones (16 x ((F-1)/4+1) x 60 x 104; 33 frames = 14,040 tokens, 81 = 32,760).

One iteration is exactly a training step of ``otca_fast.trainer.Trainer`` (bf16 autocast, LoRA r 32 on
the attention projections, gradient checkpointing, OTCA credit, weight-free rewards): the rollout of a
group of G samples over ``--steps`` denoising steps, decoding and rewards, credit, and the clipped-GRPO
update of every trainable step. The *eager* rows run the same loop with the step math swapped for
Flow-GRPO's formulation (``bench/eager_baseline.py``), as ``bench/bench_train_step.py`` does on CPU.

Printed: seconds per iteration (median), samples/s, the rollout / update split, and the peak GPU memory
of the iteration; one table. Exits non-zero if an iteration produces a non-finite loss.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_train_step import step_ops  # noqa: E402


def build_config(output_dir: Path, args: argparse.Namespace):
    from otca_fast.config import parse_config
    from otca_fast.models import wan21_1_3b_config

    if args.smoke:
        tiny, height, width, frames = True, 32, 32, 5
    else:
        tiny = {"transformer": wan21_1_3b_config(), "text_encoder": {"d_model": 4096}, "max_sequence_length": 512}
        height, width, frames = args.height, args.width, args.frames
    prompts = ["a red ball bouncing on a wooden floor", "a blue kite drifting over a green hill",
               "a yellow taxi driving through rain at night", "a white boat sailing on a calm lake"]
    data = {
        "run": {"output_dir": str(output_dir), "seed": 0, "progress": "none", "tensorboard": False, "plot_every": 0,
                "device": args.device},
        "model": {"family": "wan2.1", "tiny": tiny, "dtype": "bfloat16" if args.device != "cpu" else "float32"},
        "data": {"prompts": prompts},
        "sample": {"height": height, "width": width, "num_frames": frames, "num_steps": args.steps,
                   "group_size": args.group, "prompts_per_step": 1, "batch_size": args.batch_size},
        "credit": {"scheme": "otca", "per_frame": True},
        "rewards": [{"name": "brightness", "weight": 1.0, "options": {}},
                    {"name": "temporal_flicker", "weight": 1.0, "options": {}}],
        "train": {"max_steps": 10_000, "checkpoint_every": 10_000, "lora": {"rank": 32, "alpha": 64.0},
                  "gradient_checkpointing": not args.smoke, "mixed_precision": "auto"},
        "optimizer": {"lr": 1e-4},
        "eval": {"enabled": False},
    }
    return parse_config(data, source="gpu_train_report")


def run(args: argparse.Namespace) -> list[dict]:
    from otca_fast.trainer import Trainer

    cuda = args.device != "cpu"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        trainer = Trainer(build_config(Path(tmp), args))
        build_s = time.perf_counter() - t0
        print(f"built in {build_s:.1f} s: {sum(p.numel() for p in trainer.transformer.parameters()) / 1e9:.2f}e9 "
              f"transformer parameters, latent {tuple(trainer.latent_shape)}, {trainer.num_samples} samples x "
              f"{args.steps} steps per iteration", flush=True)
        step = 0
        try:
            for variant in ("fused", "eager"):
                with step_ops(variant):
                    times, rollout, update, peaks = [], [], [], []
                    for i in range(args.iters + 1):  # the first iteration warms up (allocator, kernels)
                        step += 1
                        if cuda:
                            torch.cuda.synchronize()
                            torch.cuda.reset_peak_memory_stats()
                        t = time.perf_counter()
                        rec = trainer.train_step(step)
                        if cuda:
                            torch.cuda.synchronize()
                        dt = time.perf_counter() - t
                        if not math.isfinite(rec["loss"]):
                            raise SystemExit(f"{variant}: non-finite loss {rec['loss']} at iteration {i}")
                        print(f"  {variant} iteration {i}: {dt:.2f} s (ratio_mean {rec['ratio_mean']:.6f})",
                              flush=True)
                        if i == 0:
                            continue
                        times.append(dt)
                        rollout.append(rec["time/rollout_s"])
                        update.append(rec["time/update_s"])
                        peaks.append(torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"))
                    med = statistics.median(times)
                    rows.append({"variant": variant, "s_per_iter": med, "samples_per_s": trainer.num_samples / med,
                                 "rollout_s": statistics.median(rollout), "update_s": statistics.median(update),
                                 "peak_gb": max(peaks), "iters": args.iters})
        finally:
            trainer.close()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=33, help="video frames (4k+1): 33 -> 9 latent frames, 81 -> 21")
    parser.add_argument("--height", type=int, default=480, help="frame height (multiple of 16)")
    parser.add_argument("--width", type=int, default=832, help="frame width (multiple of 16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda (default when available) or cpu (only sensible with --smoke or tiny sizes)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per rollout")
    parser.add_argument("--group", type=int, default=4, help="samples per prompt (one prompt per iteration)")
    parser.add_argument("--batch-size", type=int, default=1, help="samples per transformer forward")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per variant (after one warm-up)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes, to check the script on any machine")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        parser.error("needs a CUDA device (use --smoke, or --device cpu with tiny --height/--width, on a CPU)")
    device = torch.cuda.get_device_name(0) if args.device != "cpu" else "cpu"
    rows = run(args)
    fused = rows[0]["s_per_iter"]
    print(f"\nGRPO iteration, Wan2.1-1.3B architecture{' (SMOKE: toy size)' if args.smoke else ''}, "
          f"{f'{args.height}x{args.width}x{args.frames}' if not args.smoke else '32x32x5'}, G={args.group}, "
          f"{args.steps} steps, on {device}, torch {torch.__version__}")
    print(f"{'variant':<8} {'s/iter':>8} {'samples/s':>10} {'rollout s':>10} {'update s':>9} {'peak GiB':>9} "
          f"{'vs fused':>9}")
    for r in rows:
        print(f"{r['variant']:<8} {r['s_per_iter']:>8.2f} {r['samples_per_s']:>10.3f} {r['rollout_s']:>10.2f} "
              f"{r['update_s']:>9.2f} {r['peak_gb']:>9.2f} {r['s_per_iter'] / fused:>9.3f}")
    if args.json is not None:
        args.json.write_text(json.dumps({"device": device, "args": {k: str(v) for k, v in vars(args).items()},
                                         "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

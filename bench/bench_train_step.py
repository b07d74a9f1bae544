"""One GRPO iteration of the tiny config: the fused ops against the loop Flow-GRPO writes, in one run.

    pytest bench/bench_train_step.py --benchmark-only          # pytest-benchmark table, both variants
    python bench/bench_train_step.py [--steps 3]               # the same two loops, one printed table

An iteration is exactly what ``python -m otca_fast.train configs/tiny_video.yaml`` does per step:
rollout of the group (``ops.sde_step`` at every denoising step), decode and rewards, OTCA credit,
and the clipped-GRPO update of every trainable step. The *eager* variant runs the same trainer with
the two step ops swapped for Flow-GRPO's formulation (``bench/eager_baseline.py``: its
``sde_step_with_logprob`` for the rollout, and the training log-prob recomputed with it followed by
the eager PPO loss), so the only difference between the two is how the step math is computed.

On a CPU the "fused" ops dispatch to the torch reference (Triton kernels need CUDA; the interpreter
would measure Python), and the tiny transformer dominates the time: the ratio is close to 1 by
construction there. The GPU version at real sizes is ``bench/gpu_train_report.py``. Benchmarks
never assert timings.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eager_baseline import flow_grpo_loss, flow_grpo_sde_step_with_logprob  # noqa: E402
from otca_fast import ops  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_video.yaml"


# ------------------------------------------------------------------------------------------------
# the eager Flow-GRPO step ops, with the signatures of otca_fast.ops
# ------------------------------------------------------------------------------------------------

def eager_sde_step(sample, model_output, sigma, sigma_next, *, dynamics="flow_sde", noise_level=0.7, noise=None,
                   generator=None, sigma_max=None):
    if dynamics != "flow_sde":
        raise ValueError(f"dynamics: the eager Flow-GRPO baseline implements flow_sde only, got {dynamics!r}")
    with torch.no_grad():
        prev, log_prob, mean, std = flow_grpo_sde_step_with_logprob(
            sample, model_output, sigma, sigma_next, sigma_max, noise_level=noise_level, generator=generator)
    return prev.to(sample.dtype), log_prob, mean.to(sample.dtype), std.flatten()


def eager_grpo_step_loss(sample, model_output, prev_sample, old_log_prob, advantages, sigma, sigma_next, *,
                         dynamics="flow_sde", noise_level=0.7, clip_range=1e-4, ref_model_output=None,
                         kl_beta=0.0, sigma_max=None, check_finite=True):
    if dynamics != "flow_sde":
        raise ValueError(f"dynamics: the eager Flow-GRPO baseline implements flow_sde only, got {dynamics!r}")
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=sample.device)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=sample.device)
    loss, log_prob = flow_grpo_loss(sample, model_output, prev_sample, old_log_prob, advantages, sigma, sigma_next,
                                    sigma_max, noise_level=noise_level, clip_range=clip_range,
                                    adv_clip_max=float("inf"), ref_model_output=ref_model_output, beta=kl_beta)
    with torch.no_grad():
        ratio = torch.exp(log_prob.detach() - old_log_prob)
        stats = {"log_prob": log_prob.detach(), "ratio": ratio, "clipped": (ratio - 1).abs() > clip_range,
                 "approx_kl": 0.5 * (log_prob.detach() - old_log_prob) ** 2, "kl": torch.zeros_like(ratio)}
    return loss, stats


@contextlib.contextmanager
def step_ops(variant: str):
    """``fused``: otca_fast.ops as shipped; ``eager``: Flow-GRPO's formulation in the same loop."""
    if variant == "fused":
        yield
        return
    if variant != "eager":
        raise ValueError(f"variant: expected 'fused' or 'eager', got {variant!r}")
    saved = ops.sde_step, ops.grpo_step_loss
    ops.sde_step, ops.grpo_step_loss = eager_sde_step, eager_grpo_step_loss
    try:
        yield
    finally:
        ops.sde_step, ops.grpo_step_loss = saved


# ------------------------------------------------------------------------------------------------
# the trainer under test
# ------------------------------------------------------------------------------------------------

def make_trainer(output_dir: Path, overrides: list[str] = ()):
    from otca_fast.config import load_config
    from otca_fast.trainer import Trainer

    cfg = load_config(TINY, [f"run.output_dir={output_dir}", "run.progress=none", "run.tensorboard=false",
                             "eval.enabled=false", "train.max_steps=1000", *overrides])
    return Trainer(cfg)


class Iterations:
    """Calls ``train_step`` with increasing step numbers (each call is one full GRPO iteration)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.step = 0

    def __call__(self):
        self.step += 1
        return self.trainer.train_step(self.step)


# ------------------------------------------------------------------------------------------------
# pytest-benchmark
# ------------------------------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # the script mode below needs only torch
    pytest = None

if pytest is not None:
    _means: dict[str, float] = {}

    @pytest.fixture(scope="module")
    def iterations(tmp_path_factory):
        trainer = make_trainer(tmp_path_factory.mktemp("bench_train_step"))
        yield Iterations(trainer)
        trainer.close()

    @pytest.mark.parametrize("variant", ["fused", "eager"])
    def test_grpo_iteration(benchmark, iterations, variant):
        benchmark.group = "tiny_video GRPO iteration (rollout + credit + update)"
        with step_ops(variant):
            iterations()  # warm-up: first-call allocations, lazy imports
            record = benchmark.pedantic(iterations, rounds=3, iterations=1)
        _means[variant] = benchmark.stats.stats.mean
        benchmark.extra_info["samples_per_iteration"] = iterations.trainer.num_samples
        benchmark.extra_info["ratio_mean"] = record["ratio_mean"]
        if "fused" in _means and variant == "eager":
            benchmark.extra_info["eager_over_fused"] = _means["eager"] / _means["fused"]
            print(f"\neager / fused time per iteration: {_means['eager'] / _means['fused']:.3f}")


# ------------------------------------------------------------------------------------------------
# script mode: one table
# ------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed iterations per variant (after 1 warm-up)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for configs/tiny_video.yaml (repeatable)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(Path(tmp), args.overrides)
        it = Iterations(trainer)
        try:
            # interleave the variants so that machine noise hits both alike
            times: dict[str, list[float]] = {"fused": [], "eager": []}
            for variant in times:
                with step_ops(variant):
                    it()
            for _ in range(args.steps):
                for variant in times:
                    with step_ops(variant):
                        t0 = time.perf_counter()
                        it()
                        times[variant].append(time.perf_counter() - t0)
        finally:
            trainer.close()
    n = trainer.num_samples
    fused = statistics.median(times["fused"])
    for variant, ts in times.items():
        med = statistics.median(ts)
        rows.append((variant, med, n / med, med / fused))
    print(f"tiny_video GRPO iteration on {trainer.device} ({n} samples, {trainer.cfg.sample.num_steps} steps, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads), median of {args.steps}:")
    print(f"{'variant':<8} {'s/iter':>8} {'samples/s':>10} {'vs fused':>9}")
    for variant, med, sps, ratio in rows:
        print(f"{variant:<8} {med:>8.3f} {sps:>10.2f} {ratio:>9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Forward + backward of the fused GRPO step loss and the rollout step, against the eager
Flow-GRPO-style computation and ``torch.compile`` of the reference, in one run.

    pytest bench/bench_ops.py --benchmark-only --benchmark-group-by=param:size,param:batch

On a GPU it runs at the real latent sizes of SD3.5-M 512 px, FLUX 720 px and Wan2.1 240p/480p
in bf16; on a CPU at reduced sizes in float32 (there the "fused" op dispatches to the torch
reference, so the CPU numbers measure the harness, not the kernels). ``bench/gpu_report.py``
prints the GPU table with GB/s and peak memory.
"""

from __future__ import annotations

import pytest
import torch

from eager_baseline import flow_grpo_loss, flow_grpo_sde_step_with_logprob
from latent_sizes import BATCHES, sizes
from otca_fast import ops, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
SIGMA, SIGMA_NEXT, SIGMA_MAX = 0.7, 0.65, 0.96


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def make_step(shape, batch):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    full = (batch, *shape)
    x = torch.randn(full, device=DEVICE, generator=g).to(DTYPE)
    v = torch.randn(full, device=DEVICE, generator=g).to(DTYPE)
    xp, logp, _, _ = ops.sde_step(x, v, SIGMA, SIGMA_NEXT)
    adv = torch.randn(batch, device=DEVICE, generator=g)
    v_train = (v.float() + 0.01 * torch.randn(full, device=DEVICE, generator=g)).to(DTYPE).requires_grad_()
    return x, v_train, xp, logp, adv


_compiled_loss = None


def compiled_reference_loss(*args, **kwargs):
    global _compiled_loss
    if _compiled_loss is None:
        _compiled_loss = torch.compile(reference.grpo_step_loss, dynamic=False)
    return _compiled_loss(*args, **kwargs)


IMPLEMENTATIONS = ("fused", "eager", "compiled")


def loss_fn(impl: str):
    if impl == "fused":
        return lambda x, v, xp, old, adv: ops.grpo_step_loss(x, v, xp, old, adv, SIGMA, SIGMA_NEXT,
                                                              check_finite=False)[0]
    if impl == "eager":
        return lambda x, v, xp, old, adv: flow_grpo_loss(x, v, xp, old, adv, SIGMA, SIGMA_NEXT, SIGMA_MAX)[0]
    return lambda x, v, xp, old, adv: compiled_reference_loss(x, v, xp, old, adv, SIGMA, SIGMA_NEXT)[0]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("size", list(sizes()))
def test_grpo_step_loss_forward_backward(benchmark, size, batch, impl):
    x, v, xp, old, adv = make_step(sizes()[size], batch)
    fn = loss_fn(impl)

    def step():
        v.grad = None
        fn(x, v, xp, old, adv).backward()
        _sync()

    step()  # warm-up: compilation, autotuning, allocator
    benchmark.extra_info.update(device=DEVICE, dtype=str(DTYPE), shape=[batch, *sizes()[size]])
    benchmark.pedantic(step, rounds=10 if DEVICE == "cpu" else 50, warmup_rounds=1)
    assert v.grad is not None and torch.isfinite(v.grad.float()).all()


@pytest.mark.parametrize("impl", ("fused", "eager"))
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("size", list(sizes()))
def test_rollout_step(benchmark, size, batch, impl):
    x, v, _, _, _ = make_step(sizes()[size], batch)
    v = v.detach()

    def step():
        with torch.no_grad():
            if impl == "fused":
                out = ops.sde_step(x, v, SIGMA, SIGMA_NEXT)
            else:
                out = flow_grpo_sde_step_with_logprob(x, v, SIGMA, SIGMA_NEXT, SIGMA_MAX)
                out = (out[0].to(DTYPE), *out[1:])
        _sync()
        return out

    step()
    benchmark.extra_info.update(device=DEVICE, dtype=str(DTYPE), shape=[batch, *sizes()[size]])
    out = benchmark.pedantic(step, rounds=10 if DEVICE == "cpu" else 50, warmup_rounds=1)
    assert torch.isfinite(out[1]).all()

"""The compiled (non-interpreted) kernels on a real GPU: parity, on-policy identity, large latents.

Skipped, with the reason shown in the summary, on machines without CUDA.
"""

import pytest
import torch

from otca_fast import ops, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def rel_err(out, ref):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(out).all()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def poisoned_like(t):
    return torch.full_like(t, float("nan"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 16, 3, 30, 52), (4, 16, 64, 64), (3, 7, 1001)])
@pytest.mark.parametrize("dynamics", ["flow_sde", "dance_sde", "cps", "ode"])
def test_gpu_parity_and_on_policy(dtype, shape, dynamics):
    assert ops.backend_for(torch.zeros(1, device="cuda")) == "triton"
    b = shape[0]
    x = torch.randn(shape, device="cuda").to(dtype)
    v = torch.randn(shape, device="cuda").to(dtype)
    sigma = torch.rand(b) * 0.8 + 0.15
    sigma_next = sigma - 0.05
    noise = torch.randn(shape, device="cuda")
    xp, logp, mean, std = ops.sde_step(x, v, sigma, sigma_next, dynamics=dynamics, noise=noise)
    # rollout vs training: the same bits
    assert torch.equal(ops.sde_step_logprob(x, v, xp, sigma, sigma_next, dynamics=dynamics), logp)
    adv = torch.randn(b, device="cuda")
    loss, stats = ops.grpo_step_loss(x, v, xp, logp, adv, sigma, sigma_next, dynamics=dynamics,
                                     ref_model_output=v, kl_beta=0.0)
    assert torch.equal(stats["ratio"], torch.ones_like(stats["ratio"]))
    assert torch.equal(loss, -adv.mean())
    # forward + backward against float64 on another sample of the policy (a residual of order std, so
    # the log-prob is O(1) as in training; for ODE, whose std is 0, an unrelated x'), with the
    # ratios kept clear of the clip boundaries
    if dynamics == "ode":
        xp_off = torch.randn(shape, device="cuda").to(dtype)
    else:
        xp_off = ops.sde_step(x, v, sigma, sigma_next, dynamics=dynamics)[0]
    v_new = (v.float() + 0.01 * torch.randn_like(v.float())).to(dtype).requires_grad_()
    ref_v = (v.float() + 0.02 * torch.randn_like(v.float())).to(dtype)
    sig64, sig_next64 = sigma.double().cuda(), sigma_next.double().cuda()
    new_ref = reference.sde_step_logprob(x.double(), v_new.detach().double(), xp_off.double(), sig64, sig_next64,
                                         dynamics=dynamics)
    offsets = torch.tensor([0.0, 3e-2, -3e-2, 2e-3], device="cuda", dtype=torch.float64).repeat(2)[:b]
    old = (new_ref + offsets).float()
    loss, stats = ops.grpo_step_loss(x, v_new, xp_off, old, adv, sigma, sigma_next, dynamics=dynamics,
                                     clip_range=1e-2, ref_model_output=ref_v, kl_beta=0.5)
    # scale the loss as a GradScaler would: per-element gradients are O(1/(B·D)), subnormal in fp16
    grad_scale = float(x[0].numel())
    (loss * grad_scale).backward()
    vr = v_new.detach().double().requires_grad_()
    ref_loss, ref_stats = reference.grpo_step_loss(
        x.double(), vr, xp_off.double(), old.double(), adv.double(), sig64, sig_next64, dynamics=dynamics,
        clip_range=1e-2, ref_model_output=ref_v.double(), kl_beta=0.5)
    (ref_loss * grad_scale).backward()
    assert abs(float(loss.detach()) - float(ref_loss.detach())) <= 2e-5 * max(1.0, abs(float(ref_loss.detach())))
    torch.testing.assert_close(stats["log_prob"].double(), ref_stats["log_prob"], rtol=2e-5, atol=1e-5)
    assert torch.equal(stats["clipped"], ref_stats["clipped"])
    assert rel_err(v_new.grad, vr.grad) < TOL[dtype]
    coef = reference.step_coefficients(sigma.double(), sigma_next.double(), dynamics=dynamics)
    ref_mean = reference.step_mean(x.double().cpu(), v.double().cpu(), coef)
    assert rel_err(mean, ref_mean) < TOL[dtype]


def test_gpu_wan_480p_latent():
    """One Wan2.1 480x832x81 latent (2.1M elements per sample): tiles well past 65,535 in total."""
    shape = (2, 16, 21, 60, 104)
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    xp, logp, _, _ = ops.sde_step(x, v, 0.7, 0.65)
    ref = reference.sde_step_logprob(x.double(), v.double(), xp.double(), 0.7, 0.65)
    torch.testing.assert_close(logp.double(), ref, rtol=1e-5, atol=1e-6)
    vk = v.clone().requires_grad_()
    loss, _ = ops.grpo_step_loss(x, vk, xp, logp, torch.tensor([1.0, -1.0], device="cuda"), 0.7, 0.65)
    loss.backward()
    assert torch.isfinite(vk.grad.float()).all()


def test_gpu_advantages_parity():
    g = torch.Generator().manual_seed(0)
    group_ids = torch.randint(0, 40, (512,), generator=g)
    rewards = torch.randn(512, 3, generator=g)
    w = torch.rand(512, 20, generator=g)
    for std in ("group", "global"):
        out = ops.credit_advantages(rewards.cuda(), group_ids.cuda(), w.cuda(), "moca", std=std)
        ref = reference.credit_advantages(rewards.double(), group_ids, w.double(), "moca", std=std)
        torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=1e-5)
        for aggregate in ("none", "normalize_then_sum", "sum_then_normalize"):
            out = ops.group_advantages(rewards.cuda(), group_ids.cuda(), std=std, aggregate=aggregate)
            ref = reference.group_advantages(rewards.double(), group_ids, std=std, aggregate=aggregate)
            torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=1e-5)

"""Parity of the fused step kernels (log-prob, rollout step, GRPO loss) with the float64 reference."""

import math

import pytest
import torch

from otca_fast import ops, reference
from otca_fast.kernels import sde_step as sde_kernels

pytestmark = pytest.mark.skipif(
    ops.backend_for(torch.zeros(1)) != "triton",
    reason="the kernels run on CPU tensors only under TRITON_INTERPRET=1 (tests/test_ops_gpu.py covers the GPU)")

# relative-error bounds per input dtype (‖out − ref‖ / ‖ref‖ against float64 on the same inputs)
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 3, 5, 7), (3, 301), (2, 4, 3, 9, 11)]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    assert torch.isfinite(out).all(), "output has NaN/Inf (an element was not written?)"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30)) if ref.norm() > 0 else float((out - ref).norm())


@pytest.fixture(params=["default_block", "small_block"])
def block_config(request, monkeypatch):
    """Run every parity test with the production tile and with tiny tiles (many tiles, ragged edges)."""
    if request.param == "small_block":
        monkeypatch.setattr(sde_kernels, "MAX_BLOCK", 32)
        monkeypatch.setattr(sde_kernels, "FINALIZE_BLOCK", 2)
    return request.param


def random_step(shape, dtype, *, per_sample=True, generator=None):
    b = shape[0]
    x = torch.randn(shape, generator=generator).to(dtype)
    v = torch.randn(shape, generator=generator).to(dtype)
    if per_sample:
        sigma = torch.rand(b, generator=generator) * 0.8 + 0.15
        sigma_next = sigma - torch.rand(b, generator=generator) * 0.1 - 0.01
    else:
        sigma, sigma_next = 0.63, 0.55
    return x, v, sigma, sigma_next


def f64(*tensors):
    return [t.double() if isinstance(t, torch.Tensor) else t for t in tensors]


# ----------------------------------------------------------------------------------------------
# the reference against the anchors' own formulas, written the way they write them
# ----------------------------------------------------------------------------------------------

def flow_grpo_step(sample, model_output, prev_sample, sigma, sigma_prev, sigma_max, noise_level=0.7):
    """Flow-GRPO's sde_step_with_logprob ('sde' branch), restated from its published equations."""
    dt = sigma_prev - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
    mean = (sample * (1 + std_dev_t**2 / (2 * sigma) * dt)
            + model_output * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt)
    std = std_dev_t * torch.sqrt(-1 * dt)
    log_prob = (-((prev_sample - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi)))
    return mean, std, log_prob.mean(dim=tuple(range(1, sample.ndim)))


def dance_grpo_step(sample, model_output, prev_sample, sigma, sigma_next, eta):
    dsigma = sigma_next - sigma
    pred_original = sample - sigma * model_output
    delta_t = sigma - sigma_next
    mean = sample + dsigma * model_output
    score = -(sample - pred_original * (1 - sigma)) / sigma**2
    log_term = -0.5 * eta**2 * score
    mean = mean + log_term * dsigma
    std = eta * math.sqrt(delta_t)
    log_prob = -((prev_sample - mean) ** 2) / (2 * std**2) - math.log(std) - math.log(math.sqrt(2 * math.pi))
    return mean, std, log_prob.mean(dim=tuple(range(1, sample.ndim)))


def cps_step(sample, model_output, prev_sample, sigma, sigma_prev, noise_level):
    std = sigma_prev * math.sin(noise_level * math.pi / 2)
    x0 = sample - sigma * model_output
    x1 = sample + model_output * (1 - sigma)
    mean = x0 * (1 - sigma_prev) + x1 * math.sqrt(sigma_prev**2 - std**2)
    return mean, std, -((prev_sample - mean) ** 2).mean(dim=tuple(range(1, sample.ndim)))


@pytest.mark.parametrize("sigma", [1.0, 0.9, 0.35])
def test_reference_matches_flow_grpo_formula(sigma):
    x, v, xp = (torch.randn(2, 4, 6, dtype=torch.float64) for _ in range(3))
    sigma_next, sigma_max = sigma - 0.07, 0.96
    mean, std, logp = flow_grpo_step(x, v, xp, torch.tensor(sigma, dtype=torch.float64),
                                     torch.tensor(sigma_next, dtype=torch.float64),
                                     torch.tensor(sigma_max, dtype=torch.float64))
    ours = reference.sde_step_logprob(x, v, xp, sigma, sigma_next, sigma_max=sigma_max)
    coef = reference.step_coefficients(torch.tensor([sigma], dtype=torch.float64),
                                       torch.tensor([sigma_next], dtype=torch.float64),
                                       sigma_max=torch.tensor([sigma_max], dtype=torch.float64))
    torch.testing.assert_close(ours, logp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reference.step_mean(x, v, coef), mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(coef.std[0], std, rtol=1e-12, atol=1e-12)


def test_reference_matches_dance_grpo_and_cps_formulas():
    x, v, xp = (torch.randn(3, 5, 4, dtype=torch.float64) for _ in range(3))
    _, _, logp = dance_grpo_step(x, v, xp, 0.8, 0.7, 0.3)
    torch.testing.assert_close(reference.sde_step_logprob(x, v, xp, 0.8, 0.7, dynamics="dance_sde", noise_level=0.3),
                               logp, rtol=1e-12, atol=1e-12)
    _, _, logp = cps_step(x, v, xp, 0.8, 0.7, 0.8)
    torch.testing.assert_close(reference.sde_step_logprob(x, v, xp, 0.8, 0.7, dynamics="cps", noise_level=0.8),
                               logp, rtol=1e-12, atol=1e-12)
    ode = -((xp - (x + (0.7 - 0.8) * v)) ** 2).mean(dim=(1, 2))
    torch.testing.assert_close(reference.sde_step_logprob(x, v, xp, 0.8, 0.7, dynamics="ode"), ode,
                               rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# kernels against the reference
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dynamics", reference.DYNAMICS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_logprob_forward_backward_parity(dynamics, dtype, shape, block_config, poison_outputs):
    x, v, sigma, sigma_next = random_step(shape, dtype, per_sample=shape[0] > 1)
    xp = torch.randn(shape).to(dtype)
    for reduction in ("mean", "sum"):
        vk = v.clone().requires_grad_()
        out = ops.sde_step_logprob(x, vk, xp, sigma, sigma_next, dynamics=dynamics, reduction=reduction)
        assert out.dtype == torch.float32 and out.shape == (shape[0],)
        upstream = torch.randn(shape[0])
        out.backward(upstream)
        vr = v.double().requires_grad_()
        ref = reference.sde_step_logprob(*f64(x), vr, *f64(xp, sigma, sigma_next), dynamics=dynamics,
                                         reduction=reduction)
        ref.backward(upstream.double())
        assert rel_err(out, ref) < 1e-5
        assert rel_err(vk.grad, vr.grad) < TOL[dtype]
        assert vk.grad.dtype == dtype


@pytest.mark.parametrize("dynamics", reference.DYNAMICS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sde_step_parity(dynamics, dtype, block_config, poison_outputs):
    shape = (3, 5, 61)
    x, v, sigma, sigma_next = random_step(shape, dtype)
    noise = torch.randn(shape)
    prev, logp, mean, std = ops.sde_step(x, v, sigma, sigma_next, dynamics=dynamics, noise=noise)
    assert prev.dtype == dtype and mean.dtype == dtype and prev.shape == shape
    cd = torch.float64
    coef = reference.step_coefficients(sigma.to(cd), sigma_next.to(cd), dynamics=dynamics)
    ref_mean = reference.step_mean(x.double(), v.double(), coef)
    ref_prev = ref_mean + coef.std.view(-1, 1, 1) * noise.double()
    assert rel_err(mean, ref_mean) < TOL[dtype]
    assert rel_err(prev, ref_prev) < TOL[dtype]
    # the log-prob is that of the *stored* (rounded) sample
    ref_logp = reference.logprob_from_mean(prev.double(), ref_mean, coef)
    # (absolute floor: the ODE "log-prob" of its own sample is 0 up to the rounding of x')
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std.double(), coef.std, rtol=1e-6, atol=0)


@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dynamics", ["flow_sde", "cps"])
def test_grpo_step_loss_parity(with_ref, dtype, dynamics, block_config, poison_outputs):
    shape = (6, 3, 37)
    x, v, sigma, sigma_next = random_step(shape, dtype)
    noise = torch.randn(shape)
    xp, logp, _, _ = ops.sde_step(x, v, sigma, sigma_next, dynamics=dynamics, noise=noise)
    v_new = (v.float() + 0.05 * torch.randn(shape)).to(dtype)  # the policy moved since the rollout
    clip = 1e-3
    # rows pushed inside and outside the trust region on both sides, advantages of both signs
    new_logp = reference.sde_step_logprob(x.double(), v_new.double(), xp.double(), sigma.double(),
                                          sigma_next.double(), dynamics=dynamics).float()
    old = new_logp + torch.tensor([0.0, 3e-3, -3e-3, 2e-4, -5e-3, 5e-3])
    adv = torch.tensor([1.3, -0.7, 2.0, -1.5, 0.4, -2.2])
    ref_v = (v.float() + 0.1 * torch.randn(shape)).to(dtype) if with_ref else None
    beta = 0.3 if with_ref else 0.0
    vk = v_new.clone().requires_grad_()
    loss, stats = ops.grpo_step_loss(x, vk, xp, old, adv, sigma, sigma_next, dynamics=dynamics, clip_range=clip,
                                     ref_model_output=ref_v, kl_beta=beta)
    loss.backward()
    vr = v_new.double().requires_grad_()
    ref_loss, ref_stats = reference.grpo_step_loss(
        x.double(), vr, xp.double(), old.double(), adv.double(), sigma.double(), sigma_next.double(),
        dynamics=dynamics, clip_range=clip, ref_model_output=ref_v.double() if with_ref else None, kl_beta=beta)
    ref_loss.backward()
    assert loss.shape == () and loss.dtype == torch.float32
    assert abs(float(loss.detach()) - float(ref_loss.detach())) <= 1e-5 * max(1.0, abs(float(ref_loss.detach())))
    for name in ("log_prob", "ratio", "approx_kl", "kl"):
        assert stats[name].shape == (6,)
        torch.testing.assert_close(stats[name].double(), ref_stats[name], rtol=2e-5, atol=1e-7)
    assert torch.equal(stats["clipped"], ref_stats["clipped"])
    assert stats["clipped"].any() and not stats["clipped"].all(), "the test must exercise both branches"
    assert rel_err(vk.grad, vr.grad) < TOL[dtype]


# ----------------------------------------------------------------------------------------------
# the on-policy identity: rollout and training share one log-prob computation, bit for bit
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dynamics", reference.DYNAMICS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_on_policy_ratio_is_exactly_one(backend, dynamics, dtype, monkeypatch, block_config):
    monkeypatch.setenv("OTCA_FAST_BACKEND", backend)
    shape = (4, 2, 3, 29)
    x, v, sigma, sigma_next = random_step(shape, dtype)
    gen = torch.Generator().manual_seed(7)
    xp, logp, _, _ = ops.sde_step(x, v, sigma, sigma_next, dynamics=dynamics, generator=gen)
    assert torch.equal(ops.sde_step_logprob(x, v, xp, sigma, sigma_next, dynamics=dynamics), logp)
    adv = torch.randn(4)
    vk = v.clone().requires_grad_()
    ref_v = v.clone()
    loss, stats = ops.grpo_step_loss(x, vk, xp, logp, adv, sigma, sigma_next, dynamics=dynamics,
                                     ref_model_output=ref_v, kl_beta=0.0)
    assert torch.equal(stats["ratio"], torch.ones(4))
    assert torch.equal(loss, -adv.mean())
    assert not stats["clipped"].any()
    assert torch.equal(stats["approx_kl"], torch.zeros(4))
    loss.backward()
    assert torch.isfinite(vk.grad).all()
    if dynamics != "ode":  # an ODE step's own sample has zero residual: its gradient is 0
        assert float(vk.grad.abs().sum()) > 0


def test_sde_step_samples_have_the_stated_mean_and_std():
    """x' − μ over 60k elements: mean 0 and std `std` within 5 standard errors."""
    shape = (2, 3, 100, 100)
    x, v, sigma, sigma_next = random_step(shape, torch.float32)
    gen = torch.Generator().manual_seed(3)
    prev, _, mean, std = ops.sde_step(x, v, sigma, sigma_next, generator=gen)
    for row in range(2):
        z = ((prev[row] - mean[row]) / std[row]).double().flatten()
        n = z.numel()
        assert abs(float(z.mean())) < 5 / math.sqrt(n)
        assert abs(float(z.std()) - 1.0) < 5 * math.sqrt(0.5 / n)
    # and the mean itself is the reference drift
    coef = reference.step_coefficients(sigma.double(), sigma_next.double())
    assert rel_err(mean, reference.step_mean(x.double(), v.double(), coef)) < 1e-6


def test_sde_step_is_deterministic_given_a_generator():
    x, v, sigma, sigma_next = random_step((2, 40), torch.float32)
    a = ops.sde_step(x, v, sigma, sigma_next, generator=torch.Generator().manual_seed(11))
    b = ops.sde_step(x, v, sigma, sigma_next, generator=torch.Generator().manual_seed(11))
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_flow_sde_at_sigma_one_uses_sigma_max():
    x, v = torch.randn(2, 50), torch.randn(2, 50)
    xp = torch.randn(2, 50)
    out = ops.sde_step_logprob(x, v, xp, 1.0, 0.95, sigma_max=0.95)
    _, _, expected = flow_grpo_step(*f64(x, v, xp), torch.tensor(1.0, dtype=torch.float64),
                                    torch.tensor(0.95, dtype=torch.float64), torch.tensor(0.95, dtype=torch.float64))
    assert rel_err(out, expected) < 1e-5
    # per-sample sigmas where only one row sits at sigma = 1
    out2 = ops.sde_step_logprob(x, v, xp, torch.tensor([1.0, 0.5]), torch.tensor([0.95, 0.45]), sigma_max=0.95)
    assert out2[0] == out[0] or rel_err(out2[:1], out[:1]) < 1e-6


def test_backend_selection(monkeypatch):
    t = torch.zeros(2, 3)
    monkeypatch.setenv("OTCA_FAST_BACKEND", "reference")
    assert ops.backend_for(t) == "reference"
    monkeypatch.setenv("OTCA_FAST_BACKEND", "triton")
    assert ops.backend_for(t) == "triton"  # TRITON_INTERPRET=1 in the tests
    monkeypatch.setenv("OTCA_FAST_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="OTCA_FAST_BACKEND"):
        ops.backend_for(t)
    monkeypatch.delenv("OTCA_FAST_BACKEND")
    with ops.forced_backend("reference"):
        assert ops.backend_for(t) == "reference"
    assert "OTCA_FAST_BACKEND" not in __import__("os").environ
    with pytest.raises(ValueError, match="name: expected 'triton', 'reference' or 'auto'"):
        with ops.forced_backend("gpu"):
            pass
    monkeypatch.setenv("OTCA_FAST_BACKEND", "")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ops.backend_for(t) == ("triton" if t.is_cuda else "reference")


def test_reference_gradcheck_float64():
    shape = (2, 3, 4)
    x, v, xp = (torch.randn(shape, dtype=torch.float64) for _ in range(3))
    sigma, sigma_next = torch.tensor([0.7, 0.4], dtype=torch.float64), torch.tensor([0.6, 0.3], dtype=torch.float64)
    v.requires_grad_()
    for dynamics in reference.DYNAMICS:
        assert torch.autograd.gradcheck(
            lambda vv, d=dynamics: reference.sde_step_logprob(x, vv, xp, sigma, sigma_next, dynamics=d), (v,))
    logp = reference.sde_step_logprob(x, v.detach(), xp, sigma, sigma_next)
    old = logp + torch.tensor([0.3, -0.3], dtype=torch.float64)  # ratios far from the clip boundaries
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    ref_v = torch.randn(shape, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda vv: reference.grpo_step_loss(x, vv, xp, old, adv, sigma, sigma_next, clip_range=0.5,
                                            ref_model_output=ref_v, kl_beta=0.2)[0], (v,))


# ------------------------------------------------------------------------------------------------
# one owner for the table layouts and launch modes (kernels/layout.py)
# ------------------------------------------------------------------------------------------------

def test_the_table_rows_and_modes_are_named_once_and_distinct():
    from otca_fast.kernels import layout

    coefficient_rows = [layout.ALPHA, layout.BETA, layout.STD, layout.GAMMA, layout.CONST]
    assert sorted(coefficient_rows) == list(range(layout.COEFFICIENT_ROWS))
    grpo_rows = [layout.LOG_PROB, layout.ROW_LOSS, layout.RATIO, layout.APPROX_KL, layout.KL, layout.C1, layout.C2]
    assert sorted(grpo_rows) == list(range(layout.GRPO_TABLE_ROWS))
    assert layout.C2 == layout.C1 + 1  # the backward reads them as one slice
    assert len({layout.MODE_NONE, layout.MODE_NORM_SUM, layout.MODE_SUM_NORM, layout.MODE_CREDIT}) == 4
    assert len({layout.C_UNIFORM, layout.C_GIVEN, layout.C_MOCA}) == 3
    # the kernels use these very numbers (none of their own)
    from otca_fast.kernels import advantages, grpo_loss

    assert (advantages.MODE_CREDIT, advantages.C_MOCA, grpo_loss.C1) == (layout.MODE_CREDIT, layout.C_MOCA, layout.C1)
    assert (sde_kernels.ALPHA, sde_kernels.STD) == (layout.ALPHA, layout.STD)


@pytest.mark.parametrize("dynamics", ["flow_sde", "dance_sde", "cps"])
def test_the_coefficient_table_read_by_name_is_the_references(dynamics):
    from otca_fast.kernels import layout

    sample = torch.randn(3, 8)
    sigma, sigma_next = torch.tensor([0.9, 0.6, 0.3]), torch.tensor([0.7, 0.4, 0.1])
    table = ops._step_coefficients(sample, sigma, sigma_next, None, dynamics, 0.7)
    expected = reference.step_coefficients(sigma, sigma_next, dynamics=dynamics, noise_level=0.7)
    for field in reference.StepCoefficients._fields:
        assert torch.equal(table[getattr(layout, field.upper())], getattr(expected, field).float()), field


def test_ops_and_the_kernels_index_by_name_only():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    ops_source = (root / "otca_fast" / "ops.py").read_text()
    assert "_kernels()[" not in ops_source
    assert not re.search(r"\b(table|coef)\[\d", ops_source)
    assert not re.search(r"\bmode=\d|c_mode [!=]= \d", ops_source)
    assert not re.search(r"out_ptr \+ \d \* B", (root / "kernels" / "grpo_loss.py").read_text())

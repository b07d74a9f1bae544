"""Every validation error of the ops names the argument and says what was expected and what came."""

import pytest
import torch

from otca_fast import ops


@pytest.fixture
def step():
    x, v, xp = (torch.randn(3, 4, 5) for _ in range(3))
    return x, v, xp


def test_latent_shape_dtype_and_rank_errors(step):
    x, v, xp = step
    with pytest.raises(ValueError, match=r"model_output: expected shape \(3, 4, 5\).*got \(3, 4, 6\)"):
        ops.sde_step_logprob(x, torch.randn(3, 4, 6), xp, 0.5, 0.4)
    with pytest.raises(ValueError, match="prev_sample: expected shape"):
        ops.sde_step_logprob(x, v, xp[:2], 0.5, 0.4)
    with pytest.raises(TypeError, match=r"model_output: expected dtype .*float16.*got float64"):
        ops.sde_step_logprob(x, v.double(), xp, 0.5, 0.4)
    with pytest.raises(TypeError, match=r"sample: expected dtype.*got int64"):
        ops.sde_step(torch.ones(2, 3, dtype=torch.long), v, 0.5, 0.4)
    with pytest.raises(TypeError, match="prev_sample: expected dtype torch.float32"):
        ops.sde_step_logprob(x, v, xp.half(), 0.5, 0.4)
    with pytest.raises(ValueError, match="sample: expected a non-empty"):
        ops.sde_step(torch.randn(4), torch.randn(4), 0.5, 0.4)
    with pytest.raises(TypeError, match="sample: expected a torch.Tensor, got list"):
        ops.sde_step([1.0, 2.0], v, 0.5, 0.4)
    with pytest.raises(ValueError, match="noise: expected shape"):
        ops.sde_step(x, v, 0.5, 0.4, noise=torch.randn(2, 2))
    with pytest.raises(TypeError, match="generator: expected a torch.Generator"):
        ops.sde_step(x, v, 0.5, 0.4, generator=3)


def test_sigma_errors(step):
    x, v, xp = step
    with pytest.raises(ValueError, match=r"sigma_next: expected sigma_next < sigma.*0\.5 >= sigma=0\.5 at index 0"):
        ops.sde_step_logprob(x, v, xp, 0.5, 0.5)
    with pytest.raises(ValueError, match=r"sigma_next: expected sigma_next < sigma.*at index 2"):
        ops.sde_step_logprob(x, v, xp, torch.tensor([0.5, 0.5, 0.3]), torch.tensor([0.4, 0.4, 0.35]))
    with pytest.raises(ValueError, match=r"sigma: expected finite values, got nan at index 1"):
        ops.sde_step_logprob(x, v, xp, torch.tensor([0.5, float("nan"), 0.5]), 0.1)
    with pytest.raises(ValueError, match=r"sigma: expected a float, a 0-d tensor or a \[3\] tensor, got shape \(2,\)"):
        ops.sde_step_logprob(x, v, xp, torch.tensor([0.5, 0.5]), 0.1)
    with pytest.raises(ValueError, match=r"sigma: expected values in \(0, 1\]"):
        ops.sde_step_logprob(x, v, xp, 1.5, 0.1)
    with pytest.raises(ValueError, match="sigma_next: expected values >= 0"):
        ops.sde_step_logprob(x, v, xp, 0.5, -0.1)
    with pytest.raises(TypeError, match="sigma: expected a float"):
        ops.sde_step_logprob(x, v, xp, "0.5", 0.1)
    with pytest.raises(ValueError, match="sigma_max: flow_sde at sigma = 1 needs sigma_max"):
        ops.sde_step(x, v, 1.0, 0.9)
    with pytest.raises(ValueError, match=r"sigma_max: expected values in \(0, 1\)"):
        ops.sde_step(x, v, 1.0, 0.9, sigma_max=1.0)
    # the other dynamics are defined at sigma = 1 without it
    ops.sde_step(x, v, 1.0, 0.9, dynamics="dance_sde")


def test_option_errors(step):
    x, v, xp = step
    with pytest.raises(ValueError, match=r"dynamics: expected one of .*got 'sde'"):
        ops.sde_step_logprob(x, v, xp, 0.5, 0.4, dynamics="sde")
    with pytest.raises(ValueError, match="noise_level: flow_sde is a Gaussian policy and needs noise_level > 0"):
        ops.sde_step_logprob(x, v, xp, 0.5, 0.4, noise_level=0.0)
    with pytest.raises(ValueError, match="noise_level: cps needs"):
        ops.sde_step_logprob(x, v, xp, 0.5, 0.4, dynamics="cps", noise_level=1.5)
    with pytest.raises(TypeError, match="noise_level: expected a finite float"):
        ops.sde_step_logprob(x, v, xp, 0.5, 0.4, noise_level=float("inf"))
    with pytest.raises(ValueError, match="reduction: expected 'mean' or 'sum', got 'max'"):
        ops.sde_step_logprob(x, v, xp, 0.5, 0.4, reduction="max")


def test_grpo_step_loss_errors(step):
    x, v, xp = step
    old, adv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match=r"old_log_prob: expected shape \(3,\).*got \(4,\)"):
        ops.grpo_step_loss(x, v, xp, torch.zeros(4), adv, 0.5, 0.4)
    with pytest.raises(ValueError, match=r"advantages: expected a 1-d tensor, got shape \(3, 2\)"):
        ops.grpo_step_loss(x, v, xp, old, torch.ones(3, 2), 0.5, 0.4)
    with pytest.raises(ValueError, match=r"advantages: expected finite values, got nan at row 1"):
        ops.grpo_step_loss(x, v, xp, old, torch.tensor([1.0, float("nan"), 0.0]), 0.5, 0.4)
    with pytest.raises(ValueError, match=r"old_log_prob: expected finite values, got -inf at row 0"):
        ops.grpo_step_loss(x, v, xp, torch.tensor([float("-inf"), 0.0, 0.0]), adv, 0.5, 0.4)
    with pytest.raises(ValueError, match="clip_range: expected a positive float"):
        ops.grpo_step_loss(x, v, xp, old, adv, 0.5, 0.4, clip_range=0.0)
    with pytest.raises(ValueError, match="kl_beta: expected a float >= 0"):
        ops.grpo_step_loss(x, v, xp, old, adv, 0.5, 0.4, kl_beta=-1.0)
    with pytest.raises(ValueError, match="ref_model_output: kl_beta > 0 needs the reference velocity"):
        ops.grpo_step_loss(x, v, xp, old, adv, 0.5, 0.4, kl_beta=0.1)
    with pytest.raises(ValueError, match="ref_model_output: expected shape"):
        ops.grpo_step_loss(x, v, xp, old, adv, 0.5, 0.4, ref_model_output=torch.randn(3, 5), kl_beta=0.1)


def test_advantage_errors():
    r = torch.randn(4, 2)
    g = torch.tensor([0, 0, 1, 1])
    with pytest.raises(TypeError, match="group_ids: expected an integer tensor.*float32"):
        ops.group_advantages(r, g.float())
    with pytest.raises(ValueError, match=r"group_ids: expected shape \(4,\).*got \(3,\)"):
        ops.group_advantages(r, g[:3])
    with pytest.raises(ValueError, match=r"rewards: expected a non-empty \[N, K\]"):
        ops.group_advantages(torch.randn(4, 2, 2), g)
    with pytest.raises(TypeError, match="rewards: expected dtype"):
        ops.group_advantages(torch.ones(4, 2, dtype=torch.long), g)
    with pytest.raises(ValueError, match="weights: expected 2 values"):
        ops.group_advantages(r, g, weights=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="aggregate: expected one of"):
        ops.group_advantages(r, g, aggregate="sum")
    with pytest.raises(ValueError, match="std: expected 'group' or 'global', got 'batch'"):
        ops.group_advantages(r, g, std="batch")
    with pytest.raises(ValueError, match="eps: expected a positive float"):
        ops.group_advantages(r, g, eps=0.0)
    with pytest.raises(ValueError, match="adv_clip_max: expected a positive float"):
        ops.group_advantages(r, g, adv_clip_max=-1.0)
    with pytest.raises(ValueError, match=r"timestep_credit: expected shape \(4, T\) or \(4, T, 2\), got \(4, 3, 3\)"):
        ops.credit_advantages(r, g, torch.ones(4, 3, 3))
    with pytest.raises(ValueError, match=r"timestep_credit: expected finite values, got nan at index \(1, 2\)"):
        w = torch.ones(4, 3)
        w[1, 2] = float("nan")
        ops.credit_advantages(r, g, w)
    with pytest.raises(ValueError, match=r"objective_credit: expected shape \(4, 2\), got \(4, 3\)"):
        ops.credit_advantages(r, g, torch.ones(4, 3), torch.ones(4, 3))
    with pytest.raises(ValueError, match="objective_credit: expected a .* or 'moca', got 'mgda'"):
        ops.credit_advantages(r, g, torch.ones(4, 3), "mgda")
    with pytest.raises(ValueError, match=r"exploration: expected a float in \[0, 1\]"):
        ops.credit_advantages(r, g, torch.ones(4, 3), "moca", exploration=1.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (device-mismatch errors)")
def test_device_mismatch_errors():
    x = torch.randn(2, 8, device="cuda")
    with pytest.raises(ValueError, match="model_output: expected device cuda"):
        ops.sde_step_logprob(x, torch.randn(2, 8), x, 0.5, 0.4)
    with pytest.raises(ValueError, match="advantages: expected device cuda"):
        ops.grpo_step_loss(x, x, x, torch.zeros(2, device="cuda"), torch.zeros(2), 0.5, 0.4)

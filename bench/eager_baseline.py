"""The eager baseline every benchmark compares against: Flow-GRPO's way of computing a step.

Written the way Flow-GRPO's ``sde_step_with_logprob`` and its PPO loss do it — every operation a
separate pass over the latent, all in float32, autograd storing the temporaries it needs — so that
the benchmarks measure what a user of the Flow-GRPO / DanceGRPO code bases pays today.
"""

from __future__ import annotations

import math

import torch


def flow_grpo_sde_step_with_logprob(sample, model_output, sigma, sigma_prev, sigma_max, *, noise_level=0.7,
                                    prev_sample=None, generator=None):
    """Flow-GRPO's SDE step (``sde_type='sde'``): returns (prev_sample, log_prob, mean, std)."""
    model_output = model_output.float()
    sample = sample.float()
    if prev_sample is not None:
        prev_sample = prev_sample.float()
    # Flow-GRPO indexes scheduler.sigmas, a tensor already on the device; floats are moved here
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=sample.device).view(-1, *[1] * (sample.ndim - 1))
    sigma_prev = torch.as_tensor(sigma_prev, dtype=torch.float32, device=sample.device).view_as(sigma)
    sigma_max = torch.as_tensor(sigma_max, dtype=torch.float32, device=sample.device)
    dt = sigma_prev - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
    prev_sample_mean = (sample * (1 + std_dev_t**2 / (2 * sigma) * dt)
                        + model_output * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt)
    if prev_sample is None:
        noise = torch.randn(model_output.shape, generator=generator, device=model_output.device,
                            dtype=model_output.dtype)
        prev_sample = prev_sample_mean + std_dev_t * torch.sqrt(-1 * dt) * noise
    log_prob = (-((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * ((std_dev_t * torch.sqrt(-1 * dt)) ** 2))
                - torch.log(std_dev_t * torch.sqrt(-1 * dt))
                - math.log(math.sqrt(2 * math.pi)))
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    return prev_sample, log_prob, prev_sample_mean, std_dev_t * torch.sqrt(-1 * dt)


def flow_grpo_loss(sample, model_output, prev_sample, old_log_prob, advantages, sigma, sigma_prev, sigma_max, *,
                   noise_level=0.7, clip_range=1e-4, adv_clip_max=5.0, ref_model_output=None, beta=0.0):
    """Flow-GRPO's training step for one timestep: recompute the log-prob, then the clipped loss + KL."""
    _, log_prob, mean, std = flow_grpo_sde_step_with_logprob(sample, model_output, sigma, sigma_prev, sigma_max,
                                                             noise_level=noise_level, prev_sample=prev_sample)
    advantages = torch.clamp(advantages, -adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped_loss = -advantages * ratio
    clipped_loss = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.mean(torch.maximum(unclipped_loss, clipped_loss))
    if ref_model_output is not None and beta > 0:
        with torch.no_grad():
            _, _, ref_mean, _ = flow_grpo_sde_step_with_logprob(sample, ref_model_output, sigma, sigma_prev,
                                                                sigma_max, noise_level=noise_level,
                                                                prev_sample=prev_sample)
        kl = ((mean - ref_mean) ** 2).mean(dim=tuple(range(1, mean.ndim)), keepdim=True) / (2 * std**2)
        policy_loss = policy_loss + beta * torch.mean(kl)
    return policy_loss, log_prob

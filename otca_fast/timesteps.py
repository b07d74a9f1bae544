"""Which denoising steps are sampled with noise (SDE) and which of them each sample trains.

Two decisions per training step, in this order:

1. :func:`sde_steps` — the SDE steps of the rollout (ODE elsewhere): all, a random fraction, a window, or
   the credit scheme ``window``'s own window (MixGRPO / Flow-GRPO-Fast);
2. :func:`choose_timesteps` — among the trainable SDE steps (:func:`trainable_steps`), the ones each sample
   trains: all, a random fraction (DanceGRPO), a fixed window, or the steps the credit chose
   (``train.timesteps.mode: credit``, selected once, by ``build_advantages``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from otca_fast.rollout import sde_step_mask

__all__ = ["TrainedSteps", "choose_timesteps", "sde_steps", "trainable_steps"]


@dataclass
class TrainedSteps:
    """Each ``[N, M]``: the absolute steps each sample trains, their loss weights, and which entries are real
    (rows may train fewer steps than M, e.g. DanceGRPO's random subset minus the never-trained last step)."""

    index: torch.Tensor
    weight: torch.Tensor
    valid: torch.Tensor


def sde_steps(num_steps: int, sde, scheme: str, credit_config, *, generator: torch.Generator,
              progress: float) -> tuple[torch.Tensor, tuple[int, int] | None]:
    """``(sde_mask [T] bool, window)``: the SDE steps of this step's rollout (``sde`` is the config's
    ``sample.sde``). With the credit scheme ``window`` the credit window *is* the set of SDE steps (ODE
    elsewhere) and ``window`` is its ``(start, stop)``, handed to ``build_advantages``; else ``None``."""
    if scheme == "window":
        from otca_fast.credit import window_steps

        window = window_steps(num_steps, credit_config, generator=generator, progress=progress)
        mask = torch.zeros(num_steps, dtype=torch.bool)
        mask[window[0]:window[1]] = True
        return mask, window
    mask = sde_step_mask(num_steps, sde.mode, fraction=sde.fraction, window_size=sde.window_size,
                         window_range=sde.window_range, generator=generator)
    return mask, None


def trainable_steps(sde_mask: torch.Tensor, *, skip_last: bool) -> torch.Tensor:
    """The SDE steps that may be trained; with ``skip_last`` the last denoising step never is (σ' = 0, where
    the step's Gaussian has no variance and its log-density overflows)."""
    steps = sde_mask.nonzero().flatten()
    if skip_last:
        steps = steps[steps != sde_mask.numel() - 1]
    return steps


def choose_timesteps(timesteps, steps: torch.Tensor, info: dict[str, Any], *, num_samples: int,
                     generator: torch.Generator) -> TrainedSteps:
    """The steps each of ``num_samples`` samples trains (``timesteps`` is the config's ``train.timesteps``).

    The candidates are the trainable steps ``steps`` that the scheme's ``info["train_mask"]`` keeps (``dance``
    and ``window`` choose their own steps; the other schemes keep all), then ``timesteps.mode`` picks among them.
    """
    n, s = num_samples, steps.numel()
    if timesteps.mode == "credit":
        # build_advantages already chose ⌈fraction·S⌉ of the S trainable steps per sample, ∝ |A[n, t]| with
        # Horvitz–Thompson weights 1/π (importance) or the top-k, and folded the weights into A; train exactly
        # those (the weights are in A, so the loss weight here is 1)
        index = info["index"].to("cpu")
        return TrainedSteps(index.contiguous(), torch.ones(index.shape), torch.ones(index.shape, dtype=torch.bool))
    if timesteps.mode == "all":
        allowed = info["train_mask"].to("cpu", torch.bool)[:, steps]
        counts = allowed.sum(1)
        m = max(int(counts.max()), 1) if n else 1
        # stable sort puts each row's allowed steps first, in step order
        local = torch.sort((~allowed).to(torch.int8), dim=1, stable=True).indices[:, :m]
        valid = torch.arange(m)[None, :] < counts[:, None]
        weight = torch.ones(n, m)
    elif timesteps.mode == "fraction":
        # DanceGRPO: a random subset of int(S·fraction) steps per sample, trained in step order
        m = max(1, int(s * timesteps.fraction))
        local = torch.stack([torch.randperm(s, generator=generator)[:m].sort().values for _ in range(n)])
        weight, valid = torch.ones(n, m), torch.ones(n, m, dtype=torch.bool)
    else:  # "window": the same consecutive steps for every sample
        size = timesteps.window_size
        local = torch.arange(timesteps.window_start, timesteps.window_start + size).expand(n, size)
        weight, valid = torch.ones(n, size), torch.ones(n, size, dtype=torch.bool)
    return TrainedSteps(steps[local].contiguous(), weight.float().contiguous(), valid.contiguous())

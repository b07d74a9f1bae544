"""``train.tail_matching``: advantage-weighted flow matching on the ODE tail of a rollout.

GRPO trains the SDE steps only: the ODE steps after the SDE window have no log-probability, yet the LoRA (or
full) weights they share change them too. This term gives the tail a gradient of its own. For sample n with
final clip x0_n (the buffer's last state) and weight w_n (its advantage):

    x = (1 − σ_t)·x0_n + σ_t·ε_n                         (a tail step t and fresh noise ε_n, drawn per sample)
    L_n = mean((v_θ(x, σ_t) − (ε_n − x0_n))²)            (the flow-matching loss, v* = ε − x0)
    term = weight · Σ_n w_n·L_n / (the update's samples)   (a mean over the update, like the GRPO loss)

w_n = the mean of A[n, ·] over the trainable steps, clipped like A; with ``positive_only`` max(w_n, 0): a
reward-weighted regression on the policy's own clips. The draws cover the whole batch in row order, so several
(DDP) ranks draw what one process would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from otca_fast.errors import TrainingError
from otca_fast.rollout import NonFiniteError

__all__ = ["tail_targets", "tail_matching_backward", "check_strategy"]


def check_strategy(strategy: str, weight: float) -> None:
    """FSDP refuses the term: its backward passes are collective, and the rows with weight differ per rank."""
    from otca_fast.config import ConfigError

    if weight > 0 and strategy == "fsdp":
        raise ConfigError("train.tail_matching: not supported with distributed.strategy fsdp (its backward "
                          "passes are collective and the term's rows differ per rank); use ddp, or "
                          "tail_matching.weight: 0")


def tail_targets(advantages: torch.Tensor, sde_mask: torch.Tensor, trainable: torch.Tensor, *, num_steps: int,
                 adv_clip_max: float, positive_only: bool, generator: torch.Generator,
                 latent_shape: Sequence[int]) -> dict[str, torch.Tensor]:
    """What the term needs for the whole batch: ``weight [N]``, the tail's ``steps`` (the ODE steps after the
    last SDE step, σ > 0), each sample's drawn ``step [N]`` and noise ``eps [N, *latent_shape]``."""
    a = advantages[:, trainable].mean(1).clamp(-adv_clip_max, adv_clip_max)
    if positive_only:
        a = a.clamp_min(0.0)
    last_sde = int(sde_mask.nonzero().max()) if bool(sde_mask.any()) else -1
    steps = torch.arange(last_sde + 1, num_steps)  # σ_t > 0 for t < T
    if steps.numel() == 0:
        raise TrainingError("train.tail_matching: the SDE covers every denoising step, so there is no ODE "
                            "tail to train (set sample.sde.mode: fraction or window, or tail_matching.weight: 0)")
    n = advantages.shape[0]
    pick = torch.randint(steps.numel(), (n,), generator=generator, device=generator.device).cpu()
    eps = torch.randn((n, *latent_shape), generator=generator, device=generator.device, dtype=torch.float32)
    return {"weight": a, "steps": steps, "step": steps[pick], "eps": eps}


def tail_matching_backward(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
                           rows: torch.Tensor, tail: dict[str, torch.Tensor], sigmas: torch.Tensor, *,
                           scale: float, step: int, latent_dtype: torch.dtype) -> torch.Tensor:
    """Backward of ``scale · Σ_n w_n·L_n`` for the batch rows ``rows`` (global indices into ``tail``) whose
    final clips are ``x0``; ``velocity(x, σ)`` is the model's. Returns the per-sample losses L_n (detached)."""
    device = x0.device
    x0 = x0.float()
    w = tail["weight"][rows].to(device)
    sigma = sigmas[tail["step"][rows]].to(device=device, dtype=torch.float32)
    eps = tail["eps"][rows.to(tail["eps"].device)].to(device)
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    per_sample = (velocity(((1 - s) * x0 + s * eps).to(latent_dtype), sigma).float()
                  - (eps - x0)).square().flatten(1).mean(1)
    if not bool(torch.isfinite(per_sample).all()):
        bad = rows[~torch.isfinite(per_sample).cpu()].tolist()
        raise NonFiniteError(f"step {step}: the tail-matching loss (train.tail_matching) of samples {bad} is "
                             f"not finite")
    (scale * (w * per_sample).sum()).backward()
    return per_sample.detach()

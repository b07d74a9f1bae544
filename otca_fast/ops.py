"""The public op surface: ``from otca_fast import ops``.

Five ops cover the per-step work of GRPO on flow-matching generators:

* :func:`sde_step`          — one rollout step (sample x' and its log-prob);
* :func:`sde_step_logprob`  — the differentiable log-prob of a stored step;
* :func:`group_advantages`  — GRPO group z-scores of one or several rewards;
* :func:`credit_advantages` — z-scores × objective mix × timestep credit → A[n, t] in one launch;
* :func:`grpo_step_loss`    — log-prob, ratio, clipped surrogate and KL, fused forward and backward.

Each op validates its inputs (errors name the argument and say expected vs got), then dispatches
to the Triton kernels when the tensors live on CUDA (or when ``TRITON_INTERPRET=1`` runs Triton on
the CPU) and to the pure-torch ``otca_fast.reference`` otherwise. ``OTCA_FAST_BACKEND=triton`` or
``=reference`` forces one. This module imports nothing beyond torch until a kernel is needed, so it
can be dropped into any GRPO codebase.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import NamedTuple

import torch

from otca_fast import checks, reference
from otca_fast.kernels import layout

__all__ = [
    "sde_step", "sde_step_logprob", "group_advantages", "credit_advantages", "grpo_step_loss",
    "backend_for", "forced_backend", "DYNAMICS",
]

DYNAMICS = reference.DYNAMICS
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_STEP_DTYPES = _FLOAT_DTYPES
SigmaLike = float | torch.Tensor


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------

@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_for(*tensors: torch.Tensor) -> str:
    """``"triton"`` or ``"reference"`` for an op on these tensors (see the module docstring)."""
    forced = os.environ.get("OTCA_FAST_BACKEND", "").strip().lower()
    on_cuda = any(t.is_cuda for t in tensors)
    if forced == "reference":
        return "reference"
    if forced == "triton":
        if not _triton_available():
            raise RuntimeError("OTCA_FAST_BACKEND=triton but triton is not installed (pip install triton)")
        if not on_cuda and not _interpreting():
            raise RuntimeError("OTCA_FAST_BACKEND=triton needs CUDA tensors, or TRITON_INTERPRET=1 set "
                               "before otca_fast.kernels is imported to run the kernels on the CPU")
        return "triton"
    if forced not in ("", "auto"):
        raise ValueError(f"OTCA_FAST_BACKEND: expected 'triton', 'reference' or 'auto', got {forced!r}")
    if _triton_available() and (on_cuda or _interpreting()):
        return "triton"
    return "reference"


@contextlib.contextmanager
def forced_backend(name: str) -> Iterator[None]:
    """Run the ops on one backend inside a ``with`` block (sets ``OTCA_FAST_BACKEND``, then restores it)."""
    if name not in ("triton", "reference", "auto"):
        raise ValueError(f"name: expected 'triton', 'reference' or 'auto', got {name!r}")
    old = os.environ.get("OTCA_FAST_BACKEND")
    os.environ["OTCA_FAST_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("OTCA_FAST_BACKEND", None)
        else:
            os.environ["OTCA_FAST_BACKEND"] = old


class _KernelModules(NamedTuple):
    sde_step: ModuleType     # kernels/sde_step.py: the step's forward (sample or log-prob) and backward
    grpo_loss: ModuleType    # kernels/grpo_loss.py: the fused clipped-surrogate forward
    advantages: ModuleType   # kernels/advantages.py: group statistics and credit in one launch


def _kernels() -> _KernelModules:
    """The Triton kernel modules, imported on first use (the torch reference backend needs no Triton)."""
    from otca_fast.kernels import advantages, grpo_loss, sde_step
    return _KernelModules(sde_step, grpo_loss, advantages)


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------

def _check_tensor(name: str, value, *, dtypes=None, dim=None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({names}), got {str(value.dtype).replace('torch.', '')}")
    if dim is not None and value.dim() != dim:
        raise ValueError(f"{name}: expected a {dim}-d tensor, got shape {tuple(value.shape)}")
    return value


def _check_latents(sample: torch.Tensor, **others: torch.Tensor | None) -> None:
    _check_tensor("sample", sample, dtypes=_STEP_DTYPES)
    if sample.dim() < 2 or sample.shape[0] == 0 or sample[0].numel() == 0:
        raise ValueError(f"sample: expected a non-empty [B, ...] tensor with at least 2 dims, got shape "
                         f"{tuple(sample.shape)}")
    for name, t in others.items():
        if t is None:
            continue
        _check_tensor(name, t, dtypes=_STEP_DTYPES)
        if t.shape != sample.shape:
            raise ValueError(f"{name}: expected shape {tuple(sample.shape)} (the shape of sample), "
                             f"got {tuple(t.shape)}")
        if t.device != sample.device:
            raise ValueError(f"{name}: expected device {sample.device} (the device of sample), got {t.device}")
        if t.dtype != sample.dtype:
            raise TypeError(f"{name}: expected dtype {sample.dtype} (the dtype of sample), got {t.dtype}")


def _is_plain_float(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _host_vector(name: str, value, batch: int) -> torch.Tensor:
    """A float / 0-d / [B] value as a float64 CPU [B] tensor, checked finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name}: expected a float, a 0-d tensor or a [B] tensor, got {type(value).__name__}")
    t = torch.as_tensor(value).detach()
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected a real number, got dtype {t.dtype}")
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != batch):
        raise ValueError(f"{name}: expected a float, a 0-d tensor or a [{batch}] tensor, got shape {tuple(t.shape)}")
    t = t.to(device="cpu", dtype=torch.float64).expand(batch)
    bad = ~torch.isfinite(t)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}: expected finite values, got {float(t[i])} at index {i}")
    return t


@functools.lru_cache(maxsize=4096)
def _cached_coefficients(sigma: float, sigma_next: float, sigma_max: float | None, batch: int,
                         dynamics: str, noise_level: float, device: torch.device) -> torch.Tensor:
    return _coefficient_table(torch.full((batch,), sigma, dtype=torch.float64),
                              torch.full((batch,), sigma_next, dtype=torch.float64),
                              None if sigma_max is None else torch.full((batch,), sigma_max, dtype=torch.float64),
                              dynamics, noise_level, device)


def _coefficient_table(sig, sig_next, smax, dynamics, noise_level, device) -> torch.Tensor:
    coef = reference.step_coefficients(sig, sig_next, dynamics=dynamics, noise_level=noise_level, sigma_max=smax)
    return torch.stack([c.float() for c in coef]).to(device)  # [5, B]: alpha, beta, std, gamma, const


def _step_coefficients(sample: torch.Tensor, sigma, sigma_next, sigma_max, dynamics: str,
                       noise_level) -> torch.Tensor:
    """Validated per-row scalars: the float32 ``[5, B]`` table (alpha, beta, std, gamma, const) on
    ``sample``'s device that the kernels read (``_as_coefficients`` views it for the reference)."""
    if dynamics not in DYNAMICS:
        raise ValueError(f"dynamics: expected one of {DYNAMICS}, got {dynamics!r}")
    if isinstance(noise_level, bool) or not isinstance(noise_level, (int, float)) or not math.isfinite(noise_level):
        raise TypeError(f"noise_level: expected a finite float, got {noise_level!r}")
    if dynamics in reference.GAUSSIAN_DYNAMICS and noise_level <= 0:
        raise ValueError(f"noise_level: {dynamics} is a Gaussian policy and needs noise_level > 0, got {noise_level}")
    if dynamics == "cps" and not 0 < noise_level <= 1:
        raise ValueError("noise_level: cps needs 0 < noise_level <= 1 (std = sigma_next*sin(a*pi/2)), "
                         f"got {noise_level}")
    batch = sample.shape[0]
    if _is_plain_float(sigma) and _is_plain_float(sigma_next) and (sigma_max is None or _is_plain_float(sigma_max)):
        # hot path (one schedule value for the whole batch): validate with plain floats and reuse the
        # cached device table, so a training step pays no host tensor work and no device sync here
        if 0.0 < sigma <= 1.0 and 0.0 <= sigma_next < sigma and not (
                dynamics == "flow_sde" and sigma == 1.0 and not (sigma_max is not None and 0.0 < sigma_max < 1.0)):
            smax = float(sigma_max) if (dynamics == "flow_sde" and sigma == 1.0) else None
            return _cached_coefficients(float(sigma), float(sigma_next), smax, batch, dynamics,
                                        float(noise_level), sample.device)
    sig = _host_vector("sigma", sigma, batch)
    sig_next = _host_vector("sigma_next", sigma_next, batch)
    if ((sig <= 0) | (sig > 1)).any():
        raise ValueError(f"sigma: expected values in (0, 1] (1 = pure noise), got {sig.tolist()}")
    if (sig_next < 0).any():
        raise ValueError(f"sigma_next: expected values >= 0, got {sig_next.tolist()}")
    if not (sig_next < sig).all():
        i = int((sig_next >= sig).nonzero()[0, 0])
        raise ValueError(f"sigma_next: expected sigma_next < sigma (sigma runs from 1 to 0), got sigma_next="
                         f"{float(sig_next[i])} >= sigma={float(sig[i])} at index {i}")
    smax = None
    if dynamics == "flow_sde" and (sig == 1).any():
        if sigma_max is None:
            raise ValueError("sigma_max: flow_sde at sigma = 1 needs sigma_max (the schedule's second sigma, "
                             "which replaces 1 - sigma in the noise scale as Flow-GRPO does); got None")
        smax = _host_vector("sigma_max", sigma_max, batch)
        if ((smax <= 0) | (smax >= 1)).any():
            raise ValueError(f"sigma_max: expected values in (0, 1), got {smax.tolist()}")
    if sig.unique().numel() == 1 and sig_next.unique().numel() == 1 and (smax is None or smax.unique().numel() == 1):
        table = _cached_coefficients(float(sig[0]), float(sig_next[0]), None if smax is None else float(smax[0]),
                                     batch, dynamics, float(noise_level), sample.device)
    else:
        table = _coefficient_table(sig, sig_next, smax, dynamics, float(noise_level), sample.device)
    return table


def _as_coefficients(table: torch.Tensor) -> reference.StepCoefficients:
    return reference.StepCoefficients(*table.unbind(0))


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).contiguous()


def _check_row_vector(name: str, t, batch: int, device: torch.device) -> torch.Tensor:
    _check_tensor(name, t, dtypes=(torch.float32, torch.float64, torch.float16, torch.bfloat16), dim=1)
    if t.shape[0] != batch:
        raise ValueError(f"{name}: expected shape ({batch},) (one value per row of sample), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device} (the device of sample), got {t.device}")
    return t


# ---------------------------------------------------------------------------------------------
# autograd Functions over the Triton kernels
# ---------------------------------------------------------------------------------------------

class _StepLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, v, xp, coef, reduction):
        log_prob, _, _ = _kernels().sde_step.step_forward(x, v, coef, xp=xp, reduction=reduction)
        # ∂logp/∂v = 2γβ(x' − μ)/D  (mean) or 2γβ(x' − μ)  (sum)
        c1 = coef[layout.GAMMA] * coef[layout.BETA] * (2.0 / x.shape[1] if reduction == "mean" else 2.0)
        ctx.save_for_backward(x, v, xp, coef, c1[None])
        return log_prob

    @staticmethod
    def backward(ctx, grad_log_prob):
        x, v, xp, coef, c1 = ctx.saved_tensors
        grad = _kernels().sde_step.step_backward(x, v, xp, coef, c1, grad_log_prob)
        return None, grad, None, None, None


class _GRPOStepLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, v, xp, vref, old_log_prob, advantages, coef, clip_range, kl_beta):
        table, clipped = _kernels().grpo_loss.grpo_forward(x, v, xp, vref, coef, old_log_prob, advantages,
                                                           clip_range, kl_beta)
        ctx.save_for_backward(x, v, xp, vref if vref is not None else x, coef, table)
        ctx.has_ref = vref is not None
        stats = (table[layout.LOG_PROB], table[layout.RATIO], clipped, table[layout.APPROX_KL], table[layout.KL])
        ctx.mark_non_differentiable(*stats)
        return (table[layout.ROW_LOSS], *stats)

    @staticmethod
    def backward(ctx, grad_row_loss, *unused):
        x, v, xp, vref, coef, table = ctx.saved_tensors
        # the backward's coefficients: c1, and c2 of the KL term when there is a reference
        c12 = table[layout.C1:layout.C2 + 1] if ctx.has_ref else table[layout.C1:layout.C1 + 1]
        grad = _kernels().sde_step.step_backward(x, v, xp, coef, c12, grad_row_loss,
                                                 vref=vref if ctx.has_ref else None)
        return (None, grad) + (None,) * 7


_STAT_NAMES = ("log_prob", "ratio", "clipped", "approx_kl", "kl")


# ---------------------------------------------------------------------------------------------
# public ops
# ---------------------------------------------------------------------------------------------

def sde_step(sample: torch.Tensor, model_output: torch.Tensor, sigma: SigmaLike, sigma_next: SigmaLike, *,
             dynamics: str = "flow_sde", noise_level: float = 0.7, noise: torch.Tensor | None = None,
             generator: torch.Generator | None = None, sigma_max: SigmaLike | None = None):
    """One rollout step σ → σ': ``(prev_sample, log_prob, prev_sample_mean, std)``.

    ``prev_sample`` = μ + std·ε in ``sample``'s dtype; ``log_prob`` ``[B]`` float32 is the
    (element-averaged) log-density of that *stored* ``prev_sample``, so feeding it back into
    :func:`grpo_step_loss` gives a ratio of exactly 1; ``std`` ``[B]`` float32. ``noise`` (``ε``,
    the shape of ``sample``) is drawn from ``generator`` when not given. A rollout op: its outputs
    carry no autograd graph (train through :func:`sde_step_logprob` or :func:`grpo_step_loss`).
    """
    _check_latents(sample, model_output=model_output)
    if noise is not None:
        _check_tensor("noise", noise, dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64))
        if noise.shape != sample.shape or noise.device != sample.device:
            raise ValueError(f"noise: expected shape {tuple(sample.shape)} on {sample.device}, "
                             f"got {tuple(noise.shape)} on {noise.device}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    table = _step_coefficients(sample, sigma, sigma_next, sigma_max, dynamics, noise_level)
    with torch.no_grad():
        if noise is None:
            noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
        if backend_for(sample, model_output) == "reference":
            coef = _as_coefficients(table)
            mean = reference.step_mean(sample, model_output, coef)
            prev = (mean + coef.std.view(-1, *([1] * (sample.dim() - 1))) * noise.float()).to(sample.dtype)
            log_prob = reference.logprob_from_mean(prev, mean, coef, "mean")
            return prev, log_prob, mean.to(sample.dtype), coef.std
        log_prob, prev, mean = _kernels().sde_step.step_forward(_flat(sample), _flat(model_output), table,
                                                                noise=_flat(noise))
        return prev.view(sample.shape), log_prob, mean.view(sample.shape), table[layout.STD]


def sde_step_logprob(sample: torch.Tensor, model_output: torch.Tensor, prev_sample: torch.Tensor,
                     sigma: SigmaLike, sigma_next: SigmaLike, *, dynamics: str = "flow_sde",
                     noise_level: float = 0.7, reduction: str = "mean",
                     sigma_max: SigmaLike | None = None) -> torch.Tensor:
    """log π(prev_sample | sample, model_output), ``[B]`` float32, differentiable in ``model_output``.

    ``reduction="mean"`` averages over the non-batch elements (Flow-GRPO's convention, which the
    tiny PPO clip ranges assume); ``"sum"`` gives the full log-density.
    """
    _check_latents(sample, model_output=model_output, prev_sample=prev_sample)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")
    table = _step_coefficients(sample, sigma, sigma_next, sigma_max, dynamics, noise_level)
    if backend_for(sample, model_output, prev_sample) == "reference":
        coef = _as_coefficients(table)
        return reference.logprob_from_mean(prev_sample, reference.step_mean(sample, model_output, coef), coef,
                                           reduction)
    return _StepLogProb.apply(_flat(sample), _flat(model_output), _flat(prev_sample), table, reduction)


def _check_rewards(rewards, group_ids) -> tuple[torch.Tensor, torch.Tensor]:
    _check_tensor("rewards", rewards, dtypes=(torch.float32, torch.float64, torch.float16, torch.bfloat16))
    if rewards.dim() == 1:
        rewards = rewards[:, None]
    if rewards.dim() != 2 or rewards.shape[0] == 0 or rewards.shape[1] == 0:
        raise ValueError(f"rewards: expected a non-empty [N, K] (or [N]) tensor, got shape {tuple(rewards.shape)}")
    _check_tensor("group_ids", group_ids)
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool or group_ids.is_complex():
        raise TypeError("group_ids: expected an integer tensor (one group label per sample), "
                        f"got dtype {group_ids.dtype}")
    if group_ids.shape != (rewards.shape[0],):
        raise ValueError(f"group_ids: expected shape ({rewards.shape[0]},) (one label per row of rewards), got "
                         f"{tuple(group_ids.shape)}")
    if group_ids.device != rewards.device:
        raise ValueError(f"group_ids: expected device {rewards.device} (the device of rewards), got {group_ids.device}")
    bad = ~torch.isfinite(rewards)
    if bool(bad.any()):
        n, k = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"rewards: expected finite values, got {float(rewards[n, k])} at rewards[{n}, {k}] "
                         f"(sample {n}, objective {k}, group {int(group_ids[n])})")
    return rewards, group_ids


def _check_advantage_options(std: str, eps: float, adv_clip_max: float) -> None:
    if std not in reference.STD_MODES:
        raise ValueError(f"std: expected 'group' or 'global', got {std!r}")
    if not eps > 0:
        raise ValueError(f"eps: expected a positive float, got {eps!r}")
    if not adv_clip_max > 0:
        raise ValueError(f"adv_clip_max: expected a positive float, got {adv_clip_max!r}")


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *,
                     weights: Sequence[float] | torch.Tensor | None = None, std: str = "group",
                     eps: float = 1e-4, adv_clip_max: float = 5.0,
                     aggregate: str = "normalize_then_sum") -> torch.Tensor:
    """GRPO advantages of ``rewards [N, K]`` in the groups ``group_ids [N]`` (any integer labels).

    ``aggregate``: ``normalize_then_sum`` (z-score each objective in its group, then Σ_k w_k ẑ_k,
    ``[N]``), ``sum_then_normalize`` (Flow-GRPO: z-score of Σ_k w_k R_k, ``[N]``) or ``none``
    (``[N, K]``). z = (R − group mean)/(std + eps), population std; ``std="global"`` uses the
    batch std. ``weights`` default to 1/K. Equal rewards in a group (or a one-member group) give 0.
    Returns float32, clipped to ±adv_clip_max.
    """
    rewards, group_ids = _check_rewards(rewards, group_ids)
    _check_advantage_options(std, eps, adv_clip_max)
    modes = {"none": layout.MODE_NONE, "normalize_then_sum": layout.MODE_NORM_SUM,
             "sum_then_normalize": layout.MODE_SUM_NORM}
    if aggregate not in modes:
        raise ValueError(f"aggregate: expected one of {tuple(modes)}, got {aggregate!r}")
    k = rewards.shape[1]
    w = None
    if weights is not None:
        w = torch.as_tensor(weights, dtype=torch.float32).to(rewards.device)
        if w.shape != (k,):
            raise ValueError(f"weights: expected {k} values (one per reward column), got shape {tuple(w.shape)}")
        checks.raise_if_not_finite("weights", w)
    if backend_for(rewards) == "reference":
        return reference.group_advantages(rewards.float(), group_ids, weights=w, std=std, eps=eps,
                                          adv_clip_max=adv_clip_max, aggregate=aggregate).float()
    if w is None:
        w = torch.full((k,), 1.0 / k, dtype=torch.float32, device=rewards.device)
    return _kernels().advantages.group_advantage_launch(
        rewards.float().contiguous(), group_ids, mode=modes[aggregate], weights=w.contiguous(), std=std, eps=eps,
        clip_max=adv_clip_max)


def credit_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, timestep_credit: torch.Tensor,
                      objective_credit: torch.Tensor | str | None = None, *, std: str = "group",
                      eps: float = 1e-4, adv_clip_max: float = 5.0, exploration: float = 0.1) -> torch.Tensor:
    """Credit-weighted advantages ``A[n, t] = Σ_k c[n, k]·w[n, t(, k)]·clip(ẑ_k[n])``, ``[N, T]`` float32.

    ``timestep_credit`` w: ``[N, T]`` or per-objective ``[N, T, K]``. ``objective_credit`` c:
    ``[N, K]``, ``None`` (uniform 1/K) or ``"moca"`` (the exact min-norm mix of the clipped
    per-objective advantages, mixed with ``exploration``/K). On the Triton backend the group
    normalisation, the objective mix and the timestep weighting run in one kernel launch.
    """
    rewards, group_ids = _check_rewards(rewards, group_ids)
    _check_advantage_options(std, eps, adv_clip_max)
    n, k = rewards.shape
    _check_tensor("timestep_credit", timestep_credit, dtypes=(torch.float32, torch.float64, torch.float16,
                                                             torch.bfloat16))
    if timestep_credit.dim() not in (2, 3) or timestep_credit.shape[0] != n or (
            timestep_credit.dim() == 3 and timestep_credit.shape[2] != k) or timestep_credit.shape[1] == 0:
        raise ValueError(f"timestep_credit: expected shape ({n}, T) or ({n}, T, {k}), "
                         f"got {tuple(timestep_credit.shape)}")
    if timestep_credit.device != rewards.device:
        raise ValueError(f"timestep_credit: expected device {rewards.device}, got {timestep_credit.device}")
    checks.raise_if_not_finite("timestep_credit", timestep_credit)
    if not 0.0 <= exploration <= 1.0:
        raise ValueError(f"exploration: expected a float in [0, 1], got {exploration!r}")
    c_mode = layout.C_UNIFORM
    if isinstance(objective_credit, str):
        if objective_credit != "moca":
            raise ValueError(f"objective_credit: expected a [N, K] tensor, None or 'moca', got {objective_credit!r}")
        c_mode = layout.C_MOCA
    elif objective_credit is not None:
        _check_tensor("objective_credit", objective_credit, dtypes=(torch.float32, torch.float64, torch.float16,
                                                                   torch.bfloat16))
        if objective_credit.shape != (n, k):
            raise ValueError(f"objective_credit: expected shape ({n}, {k}), got {tuple(objective_credit.shape)}")
        if objective_credit.device != rewards.device:
            raise ValueError(f"objective_credit: expected device {rewards.device}, got {objective_credit.device}")
        checks.raise_if_not_finite("objective_credit", objective_credit)
        c_mode = layout.C_GIVEN
    if backend_for(rewards) == "reference":
        return reference.credit_advantages(rewards.float(), group_ids, timestep_credit.float(),
                                           objective_credit if c_mode != layout.C_GIVEN else objective_credit.float(),
                                           std=std, eps=eps, adv_clip_max=adv_clip_max,
                                           exploration=exploration).float()
    return _kernels().advantages.group_advantage_launch(
        rewards.float().contiguous(), group_ids, mode=layout.MODE_CREDIT, std=std, eps=eps, clip_max=adv_clip_max,
        timestep_credit=timestep_credit.float().contiguous(),
        objective_credit=objective_credit.float().contiguous() if c_mode == layout.C_GIVEN else None,
        c_mode=c_mode, exploration=exploration)


def grpo_step_loss(sample: torch.Tensor, model_output: torch.Tensor, prev_sample: torch.Tensor,
                   old_log_prob: torch.Tensor, advantages: torch.Tensor, sigma: SigmaLike, sigma_next: SigmaLike,
                   *, dynamics: str = "flow_sde", noise_level: float = 0.7, clip_range: float = 1e-4,
                   ref_model_output: torch.Tensor | None = None, kl_beta: float = 0.0,
                   sigma_max: SigmaLike | None = None, check_finite: bool = True):
    """Fused clipped-GRPO loss of one denoising step: ``(loss, stats)``.

    loss = mean_b [ −min(r·A, clip(r, 1−ε, 1+ε)·A) + kl_beta·KL_b ],  r = exp(logp − old_log_prob),
    KL_b = mean_D (μ_θ − μ_ref)² / (2 std²) (Gaussian dynamics; γ·mean_D(...)² for CPS/ODE) when
    ``ref_model_output`` is given. ``advantages`` and ``old_log_prob`` are ``[B]`` (this step's
    column of A[n, t]). ``stats``: per-row ``log_prob``, ``ratio``, ``clipped`` (bool),
    ``approx_kl`` = ½(logp − old)², ``kl``. The backward writes ∂loss/∂model_output in one pass
    over (x, v, x'[, v_ref]) without storing μ or any latent-sized temporary.

    ``check_finite=False`` skips the NaN/Inf check of ``old_log_prob`` and ``advantages``, which on
    CUDA costs a device sync per call; a hot loop that validates them once per rollout (as the
    trainer does) can turn it off. Non-finite values then show up as a non-finite loss.
    """
    _check_latents(sample, model_output=model_output, prev_sample=prev_sample, ref_model_output=ref_model_output)
    batch = sample.shape[0]
    _check_row_vector("old_log_prob", old_log_prob, batch, sample.device)
    _check_row_vector("advantages", advantages, batch, sample.device)
    if check_finite:
        checks.raise_if_not_finite("old_log_prob", old_log_prob, "row")
        checks.raise_if_not_finite("advantages", advantages, "row")
    if not (isinstance(clip_range, (int, float)) and clip_range > 0):
        raise ValueError(f"clip_range: expected a positive float, got {clip_range!r}")
    if not (isinstance(kl_beta, (int, float)) and kl_beta >= 0):
        raise ValueError(f"kl_beta: expected a float >= 0, got {kl_beta!r}")
    if kl_beta > 0 and ref_model_output is None:
        raise ValueError("ref_model_output: kl_beta > 0 needs the reference velocity, got None")
    table = _step_coefficients(sample, sigma, sigma_next, sigma_max, dynamics, noise_level)
    if backend_for(sample, model_output, prev_sample) == "reference":
        return reference.grpo_loss_from_coefficients(sample, model_output, prev_sample, old_log_prob, advantages,
                                                     _as_coefficients(table), clip_range=clip_range,
                                                     ref_model_output=ref_model_output, kl_beta=kl_beta)
    old_log_prob = old_log_prob if old_log_prob.dtype == torch.float32 else old_log_prob.float()
    advantages = advantages if advantages.dtype == torch.float32 else advantages.float()
    outs = _GRPOStepLoss.apply(
        _flat(sample), _flat(model_output), _flat(prev_sample),
        _flat(ref_model_output.detach()) if ref_model_output is not None else None,
        old_log_prob.contiguous(), advantages.contiguous(), table, float(clip_range), float(kl_beta))
    # the mean over rows is torch's, as in the reference: an on-policy batch gives exactly −mean(A)
    return outs[0].mean(), dict(zip(_STAT_NAMES, outs[1:]))


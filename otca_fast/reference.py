"""Pure-torch reference math: the single source of truth every kernel is tested against.

Everything here is plain, differentiable torch, written so the equations are visible. The fused
Triton kernels in ``otca_fast.kernels`` compute exactly these functions; ``tests/`` compare the two
in float64 on fresh random inputs.

Notation (per sample; shapes ``[B, ...]``): ``x`` = current latent (``sample``), ``v`` = velocity
(``model_output``), ``x'`` = next latent (``prev_sample``), ``sigma`` σ → ``sigma_next`` σ' with
Δ = σ' − σ < 0 (σ runs from 1 = noise to 0 = data).

Every supported dynamics is *affine* in (x, v) for the mean, with per-sample scalars:

    μ = α·x + β·v,          log p(x') = −γ · mean_D (x' − μ)² + c0

(Gaussian dynamics: γ = 1/(2 std²), c0 = −log std − ½ log 2π; the unnormalised CPS/ODE
"log-probs" of Flow-GRPO: γ = 1, c0 = 0). :func:`step_coefficients` computes (α, β, std, γ, c0)
once, from σ, σ' and the noise level; the per-element work is then one fused pass over
(x, v, x'). That is what makes one kernel serve every dynamics.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from otca_fast.checks import compute_dtype  # otca_fast.ops calls it as reference.compute_dtype

DYNAMICS = ("flow_sde", "dance_sde", "cps", "ode")
# dynamics whose log-prob is a normalised Gaussian density (the others are Flow-GRPO's
# unnormalised −mean((x'−μ)²) surrogates, which is why their clip ranges are ~1e-5)
GAUSSIAN_DYNAMICS = ("flow_sde", "dance_sde")
# group advantages divide by the std of each group (GRPO) or of the whole batch (Flow-GRPO's global_std)
STD_MODES = ("group", "global")
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class StepCoefficients(NamedTuple):
    """Per-sample scalars of one denoising step, each ``[B]`` in the compute dtype."""

    alpha: torch.Tensor  # coefficient of x in the mean
    beta: torch.Tensor  # coefficient of v in the mean
    std: torch.Tensor  # std of the step noise (0 for ODE / the last CPS step)
    gamma: torch.Tensor  # weight of the squared residual in the log-prob
    const: torch.Tensor  # per-element constant of the log-prob


def as_batch_vector(value: float | torch.Tensor, batch: int, dtype: torch.dtype,
                    device: torch.device | str) -> torch.Tensor:
    """A Python float, a 0-d tensor or a ``[B]`` tensor as a ``[B]`` tensor."""
    t = torch.as_tensor(value, dtype=dtype, device=device)
    return t.expand(batch) if t.dim() == 0 else t.to(dtype)


def step_coefficients(sigma: torch.Tensor, sigma_next: torch.Tensor, *, dynamics: str = "flow_sde",
                      noise_level: float = 0.7, sigma_max: torch.Tensor | None = None) -> StepCoefficients:
    """(α, β, std, γ, c0) of one step for each sample; ``sigma``/``sigma_next``/``sigma_max`` are ``[B]``.

    The coefficients are evaluated in float64 and cast to the dtype of ``sigma`` so that the
    rollout and the training pass (and the kernel and this reference) use identical scalars.
    """
    out_dtype = sigma.dtype
    s, s_next = sigma.double(), sigma_next.double()
    dt = s_next - s  # Δ < 0
    a = float(noise_level)
    if dynamics == "flow_sde":
        # Flow-GRPO (Liu et al. 2025, eq. 9): the marginal-preserving reverse SDE
        #   dx = [v + s²/(2σ)·(x + (1−σ)v)] dt + s dW,  s = a·sqrt(σ/(1−σ)),
        # Euler–Maruyama: μ = x·(1 + s²Δ/(2σ)) + v·(1 + s²(1−σ)/(2σ))·Δ, std = s·sqrt(−Δ).
        # At σ = 1 the 1−σ in s is replaced by 1−σ₁ (σ₁ = the schedule's second sigma) and μ
        # keeps σ = 1, exactly as Flow-GRPO's sde_step_with_logprob does.
        one_minus = 1.0 - s
        if sigma_max is not None:
            one_minus = torch.where(s == 1.0, 1.0 - sigma_max.double(), one_minus)
        noise_scale = a * torch.sqrt(s / one_minus)
        alpha = 1.0 + noise_scale**2 * dt / (2.0 * s)
        beta = (1.0 + noise_scale**2 * (1.0 - s) / (2.0 * s)) * dt
        std = noise_scale * torch.sqrt(-dt)
    elif dynamics == "dance_sde":
        # DanceGRPO: x̂0 = x − σv, score ŝ = −(x − (1−σ)x̂0)/σ² = −(x + (1−σ)v)/σ,
        # μ = x + Δ·v − ½η²ŝΔ  ⇒  α = 1 + η²Δ/(2σ), β = Δ·(1 + η²(1−σ)/(2σ)), std = η·sqrt(−Δ).
        alpha = 1.0 + a**2 * dt / (2.0 * s)
        beta = dt * (1.0 + a**2 * (1.0 - s) / (2.0 * s))
        std = a * torch.sqrt(-dt)
    elif dynamics == "cps":
        # Coefficients-preserving sampling (arXiv 2509.05952): std = σ'·sin(aπ/2),
        # μ = (1−σ')·(x − σv) + sqrt(σ'² − std²)·(x + (1−σ)v), with sqrt(σ'² − std²) = σ'·cos(aπ/2).
        std = s_next * math.sin(a * math.pi / 2.0)
        keep = s_next * math.cos(a * math.pi / 2.0)
        alpha = (1.0 - s_next) + keep
        beta = -s * (1.0 - s_next) + keep * (1.0 - s)
    elif dynamics == "ode":
        # deterministic Euler step μ = x + Δ·v
        alpha = torch.ones_like(s)
        beta = dt
        std = torch.zeros_like(s)
    else:
        raise ValueError(f"dynamics: expected one of {DYNAMICS}, got {dynamics!r}")
    if dynamics in GAUSSIAN_DYNAMICS:
        gamma = 1.0 / (2.0 * std**2)
        const = -torch.log(std) - _HALF_LOG_2PI
    else:
        # Flow-GRPO's CPS / ODE surrogate: log p = −mean((x' − μ)²), constants dropped
        gamma = torch.ones_like(s)
        const = torch.zeros_like(s)
    return StepCoefficients(*(c.to(out_dtype) for c in (alpha, beta, std, gamma, const)))


def _bcast(per_sample: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return per_sample.view(-1, *([1] * (like.dim() - 1)))


def _coefficients_for(sample: torch.Tensor, sigma, sigma_next, dynamics, noise_level, sigma_max):
    cd = compute_dtype(sample.dtype)
    batch = sample.shape[0]
    sig = as_batch_vector(sigma, batch, cd, sample.device)
    sig_next = as_batch_vector(sigma_next, batch, cd, sample.device)
    smax = None if sigma_max is None else as_batch_vector(sigma_max, batch, cd, sample.device)
    return step_coefficients(sig, sig_next, dynamics=dynamics, noise_level=noise_level, sigma_max=smax)


def step_mean(sample: torch.Tensor, model_output: torch.Tensor, coef: StepCoefficients) -> torch.Tensor:
    """μ = α·x + β·v in the compute dtype."""
    cd = coef.alpha.dtype
    return _bcast(coef.alpha, sample) * sample.to(cd) + _bcast(coef.beta, sample) * model_output.to(cd)


def logprob_from_mean(prev_sample: torch.Tensor, mean: torch.Tensor, coef: StepCoefficients,
                      reduction: str = "mean") -> torch.Tensor:
    """log p(x' | μ) per sample: −γ·Σ(x'−μ)² + D·c0, divided by D for ``reduction="mean"``."""
    cd = coef.alpha.dtype
    sq = (prev_sample.to(cd) - mean).pow(2).flatten(1).sum(1)
    d = prev_sample[0].numel()
    log_prob = -coef.gamma * sq + d * coef.const
    if reduction == "mean":
        return log_prob / d
    if reduction == "sum":
        return log_prob
    raise ValueError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")


def sde_step_logprob(sample: torch.Tensor, model_output: torch.Tensor, prev_sample: torch.Tensor,
                     sigma, sigma_next, *, dynamics: str = "flow_sde", noise_level: float = 0.7,
                     reduction: str = "mean", sigma_max=None) -> torch.Tensor:
    """log π(x' | x, v) of one step, ``[B]`` in float32 (float64 for float64 inputs)."""
    coef = _coefficients_for(sample, sigma, sigma_next, dynamics, noise_level, sigma_max)
    return logprob_from_mean(prev_sample, step_mean(sample, model_output, coef), coef, reduction)


def sde_step(sample: torch.Tensor, model_output: torch.Tensor, sigma, sigma_next, *,
             dynamics: str = "flow_sde", noise_level: float = 0.7, noise: torch.Tensor | None = None,
             generator: torch.Generator | None = None, sigma_max=None, reduction: str = "mean"):
    """One rollout step: ``(prev_sample, log_prob, prev_sample_mean, std)``.

    x' = μ + std·ε is rounded to the input dtype *before* its log-prob is taken, so that the
    training pass, which only sees the stored x', recomputes the very same number (ratio = 1).
    """
    coef = _coefficients_for(sample, sigma, sigma_next, dynamics, noise_level, sigma_max)
    mean = step_mean(sample, model_output, coef)
    if noise is None:
        noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=mean.dtype)
    prev_sample = (mean + _bcast(coef.std, mean) * noise.to(mean.dtype)).to(sample.dtype)
    log_prob = logprob_from_mean(prev_sample, mean, coef, reduction)
    return prev_sample, log_prob, mean.to(sample.dtype), coef.std


# --------------------------------------------------------------------------------------------
# Group advantages and credit
# --------------------------------------------------------------------------------------------

def _group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    labels, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, labels.numel()


def group_zscores(rewards: torch.Tensor, group_ids: torch.Tensor, *, std: str = "group",
                  eps: float = 1e-4) -> torch.Tensor:
    """Per-objective z-scores ``(R − mean_group R) / (std + eps)``, ``[N, K]``.

    Population std (ddof = 0, as Flow-GRPO's numpy). ``std="global"`` divides by the std of the
    whole batch (Flow-GRPO's ``global_std``) but still centres per group. A group whose rewards
    are all equal (including a one-member group) gets exactly 0: it carries no preference.
    """
    if std not in STD_MODES:
        raise ValueError(f"std: expected 'group' or 'global', got {std!r}")
    rewards = rewards.to(compute_dtype(rewards.dtype))
    inverse, num_groups = _group_index(group_ids)
    k = rewards.shape[1]
    count = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device)
    count.index_add_(0, inverse, torch.ones_like(inverse, dtype=rewards.dtype))
    total = torch.zeros(num_groups, k, dtype=rewards.dtype, device=rewards.device).index_add_(0, inverse, rewards)
    mean = (total / count[:, None])[inverse]
    centred = rewards - mean
    if std == "group":
        sq = torch.zeros(num_groups, k, dtype=rewards.dtype, device=rewards.device)
        sq.index_add_(0, inverse, centred**2)
        scale = torch.sqrt(sq / count[:, None])[inverse]
    else:
        scale = rewards.std(0, unbiased=False, keepdim=True).expand_as(rewards)
    index = inverse[:, None].expand_as(rewards)
    gmax = torch.zeros(num_groups, k, dtype=rewards.dtype, device=rewards.device)
    gmin = torch.zeros_like(gmax)
    gmax = gmax.scatter_reduce_(0, index, rewards, "amax", include_self=False)
    gmin = gmin.scatter_reduce_(0, index, rewards, "amin", include_self=False)
    constant = (gmax == gmin)[inverse]
    return torch.where(constant, torch.zeros_like(centred), centred / (scale + eps))


def _normalise_weights(weights, k: int, like: torch.Tensor) -> torch.Tensor:
    if weights is None:
        return torch.full((k,), 1.0 / k, dtype=like.dtype, device=like.device)
    return torch.as_tensor(weights, dtype=like.dtype, device=like.device)


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, weights=None, std: str = "group",
                     eps: float = 1e-4, adv_clip_max: float = 5.0,
                     aggregate: str = "normalize_then_sum") -> torch.Tensor:
    """GRPO advantages from ``rewards [N, K]`` and integer ``group_ids [N]``.

    ``normalize_then_sum``: Σ_k w_k·ẑ_k (each objective z-scored in its group first, so a reward
    with a large raw scale cannot drown the others); ``sum_then_normalize``: Flow-GRPO's
    ``multi_score`` — z-score of Σ_k w_k·R_k; ``none``: the ``[N, K]`` per-objective z-scores.
    ``weights`` default to 1/K. The result is clipped to ±adv_clip_max.
    """
    k = rewards.shape[1]
    w = _normalise_weights(weights, k, rewards.to(compute_dtype(rewards.dtype)))
    if aggregate == "none":
        adv = group_zscores(rewards, group_ids, std=std, eps=eps)
    elif aggregate == "normalize_then_sum":
        adv = group_zscores(rewards, group_ids, std=std, eps=eps) @ w
    elif aggregate == "sum_then_normalize":
        mixed = rewards.to(w.dtype) @ w
        adv = group_zscores(mixed[:, None], group_ids, std=std, eps=eps)[:, 0]
    else:
        raise ValueError("aggregate: expected 'normalize_then_sum', 'sum_then_normalize' or 'none', "
                         f"got {aggregate!r}")
    return adv.clamp(-adv_clip_max, adv_clip_max)


def min_norm_objective_weights(advantages: torch.Tensor) -> torch.Tensor:
    """MOCA's exact min-norm mix: per row, c* = argmin over the simplex of (Σ_k c_k a_k)².

    Why this is exact with no iterative solver. The objective depends on c only through the scalar
    z = aᵀc, and over the simplex z sweeps exactly [min a, max a] (a linear function attains its
    range at the vertices). So the optimal *value* is a 1-D question:
      * all a_k of one sign  → z* = the a_k of smallest magnitude: the optimal set is the face
        spanned by those objectives;
      * signs conflict (min a < 0 < max a) → z* = 0: the optimal set is the slice
        {c ∈ simplex : aᵀc = 0} (every "zero-crossing" mix).
    The optimal set is a convex polytope, so we break ties deterministically by its point closest
    (in L2) to the uniform mix u = 1/K, which is unique (projection onto a convex set):
      * on a face the projection of u is uniform over the face (symmetry);
      * on the slice (after flipping the sign of a so that aᵀu > 0), KKT for
        min ½‖c − u‖² s.t. 1ᵀc = 1, aᵀc = 0, c ≥ 0 gives c_k = max(0, θ − ρ·a_k) with ρ > 0: the
        support is a *lower set* S = {k : a_k < θ/ρ} of the sorted a. For a given S the two
        equality constraints are linear in (θ, ρ):
              θ·n − ρ·S1 = 1,   θ·S1 − ρ·S2 = 0   (n = |S|, S1 = Σ_S a, S2 = Σ_S a²)
          ⇒  θ = S2 / (n·S2 − S1²),  ρ = S1 / (n·S2 − S1²),
        and S is right iff max_S a ≤ θ/ρ ≤ min_{not S} a. There are at most K lower sets, so
        checking them all is exact in O(K²). (We take the candidate with the smallest KKT
        violation, which is the exact one up to rounding at a boundary, where neighbouring
        candidates coincide.)
    For K = 2 with a₁ > 0 > a₂ this is the closed form c = (−a₂, a₁)/(a₁ − a₂).
    Returns ``[N, K]`` in the compute dtype.
    """
    a = advantages.to(compute_dtype(advantages.dtype))
    n, k = a.shape
    uniform = torch.full_like(a, 1.0 / k)
    mean_a = a.mean(1, keepdim=True)
    flip = torch.where(mean_a < 0, -1.0, 1.0).to(a.dtype)
    b = a * flip  # now bᵀu ≥ 0
    bmin = b.min(1, keepdim=True).values

    # same-sign rows (min b ≥ 0): uniform over the objectives with the smallest b
    on_face = (b == bmin).to(a.dtype)
    face = on_face / on_face.sum(1, keepdim=True)

    # conflicting rows: enumerate the K lower sets S_j = {k : b_k ≤ b_j}
    in_set = (b[:, None, :] <= b[:, :, None]).to(a.dtype)  # [N, j, k]
    cnt = in_set.sum(2)
    s1 = (in_set * b[:, None, :]).sum(2)
    s2 = (in_set * b[:, None, :] ** 2).sum(2)
    den = cnt * s2 - s1**2
    valid_den = (den > 0) & (s1 > 0)
    safe_den = torch.where(valid_den, den, torch.ones_like(den))
    theta = s2 / safe_den
    rho = s1 / safe_den
    thresh = theta / torch.where(valid_den, rho, torch.ones_like(rho))  # θ/ρ = S2/S1
    big = torch.finfo(a.dtype).max
    max_in = torch.where(in_set > 0, b[:, None, :], torch.full_like(in_set, -big)).amax(2)
    min_out = torch.where(in_set > 0, torch.full_like(in_set, big), b[:, None, :]).amin(2)
    scale = b.abs().amax(1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    violation = (torch.relu(max_in - thresh) + torch.relu(thresh - min_out)) / scale
    violation = torch.where(valid_den, violation, torch.full_like(violation, big))
    best = violation.argmin(1)
    th = theta.gather(1, best[:, None])
    rh = rho.gather(1, best[:, None])
    slice_mix = torch.clamp(th - rh * b, min=0.0)
    slice_mix = slice_mix / slice_mix.sum(1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)

    conflicting = bmin < 0
    c = torch.where(conflicting, slice_mix, face)
    return torch.where(mean_a == 0, uniform, c)


def moca_weights(advantages: torch.Tensor, exploration: float = 0.1) -> torch.Tensor:
    """c = (1 − λ)·c* + λ/K: the min-norm mix plus uniform exploration."""
    k = advantages.shape[1]
    return (1.0 - exploration) * min_norm_objective_weights(advantages) + exploration / k


def credit_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, timestep_credit: torch.Tensor,
                      objective_credit: torch.Tensor | str | None = None, *, std: str = "group",
                      eps: float = 1e-4, adv_clip_max: float = 5.0, exploration: float = 0.1) -> torch.Tensor:
    """A[n, t] = Σ_k c[n, k] · w[n, t(, k)] · clip(ẑ_k[n]) — the credit-weighted advantage ``[N, T]``.

    ``timestep_credit`` ``w`` is ``[N, T]`` (shared by the objectives) or ``[N, T, K]``
    (per-objective timing); ``objective_credit`` ``c`` is ``[N, K]``, ``None`` (uniform 1/K) or
    ``"moca"`` (min-norm mix of the clipped per-objective advantages, with ``exploration``).
    """
    k = rewards.shape[1]
    zhat = group_zscores(rewards, group_ids, std=std, eps=eps).clamp(-adv_clip_max, adv_clip_max)
    cd = zhat.dtype
    if objective_credit is None:
        c = torch.full_like(zhat, 1.0 / k)
    elif isinstance(objective_credit, str):
        if objective_credit != "moca":
            raise ValueError(f"objective_credit: expected a [N, K] tensor, None or 'moca', got {objective_credit!r}")
        c = moca_weights(zhat, exploration)
    else:
        c = objective_credit.to(cd)
    w = timestep_credit.to(cd)
    if w.dim() == 2:
        return w * (c * zhat).sum(1, keepdim=True)
    return (w * (c * zhat)[:, None, :]).sum(2)


def grpo_step_loss(sample: torch.Tensor, model_output: torch.Tensor, prev_sample: torch.Tensor,
                   old_log_prob: torch.Tensor, advantages: torch.Tensor, sigma, sigma_next, *,
                   dynamics: str = "flow_sde", noise_level: float = 0.7, clip_range: float = 1e-4,
                   ref_model_output: torch.Tensor | None = None, kl_beta: float = 0.0, sigma_max=None):
    """The clipped GRPO surrogate of one step, as Flow-GRPO's training loop computes it.

    r = exp(log π_θ − log π_old);  L_b = −min(r·A, clip(r, 1−ε, 1+ε)·A) + β_KL·KL_b,
    KL_b = γ·mean_D (μ_θ − μ_ref)²  (= mean_D (μ_θ − μ_ref)² / (2 std²) for Gaussian dynamics; the
    same quadratic form as the log-prob for CPS/ODE). Returns ``(mean_b L_b, stats)``.
    """
    coef = _coefficients_for(sample, sigma, sigma_next, dynamics, noise_level, sigma_max)
    return grpo_loss_from_coefficients(sample, model_output, prev_sample, old_log_prob, advantages, coef,
                                       clip_range=clip_range, ref_model_output=ref_model_output, kl_beta=kl_beta)


def grpo_loss_from_coefficients(sample: torch.Tensor, model_output: torch.Tensor, prev_sample: torch.Tensor,
                                old_log_prob: torch.Tensor, advantages: torch.Tensor, coef: StepCoefficients, *,
                                clip_range: float = 1e-4, ref_model_output: torch.Tensor | None = None,
                                kl_beta: float = 0.0):
    """:func:`grpo_step_loss` with the step's coefficients already computed."""
    mean = step_mean(sample, model_output, coef)
    log_prob = logprob_from_mean(prev_sample, mean, coef, "mean")
    cd = log_prob.dtype
    ratio = torch.exp(log_prob - old_log_prob.to(cd))
    adv = advantages.to(cd)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range) * adv
    row_loss = -torch.minimum(unclipped, clipped)
    if ref_model_output is not None:
        ref_mean = step_mean(sample, ref_model_output.detach(), coef)
        kl = coef.gamma * (mean - ref_mean).pow(2).flatten(1).mean(1)
    else:
        kl = torch.zeros_like(log_prob)
    row_loss = row_loss + kl_beta * kl
    with torch.no_grad():
        stats = {
            "log_prob": log_prob.detach(),
            "ratio": ratio.detach(),
            "clipped": (torch.abs(ratio - 1.0) > clip_range).detach(),
            "approx_kl": 0.5 * (log_prob.detach() - old_log_prob.to(cd)) ** 2,
            "kl": kl.detach(),
        }
    return row_loss.mean(), stats


# ============================================================================================
# Trajectory credit (TCD): per-state cosine to the final latent.
# The torch reference of kernels/trajectory_credit.py, used by otca_fast/credit/; the step and
# loss math above does not depend on it, so the SDE ops can be read without it.
# ============================================================================================

def frame_layout(state_shape: tuple[int, ...] | torch.Size, frame_dim: int | None) -> tuple[int, int, int]:
    """``(A, F, B)``: one state viewed as ``[A, F, B]`` with ``F`` frames along ``frame_dim``.

    ``frame_dim=None`` treats the whole flattened state as one "frame": ``(1, 1, D)``. For a
    diffusers video latent ``[C, F, H, W]`` and ``frame_dim=1`` this is ``(C, F, H·W)``: frame f is
    the C contiguous runs of H·W elements at offsets ``c·F·H·W + f·H·W``.
    """
    dims = tuple(int(d) for d in state_shape)
    if frame_dim is None:
        return 1, 1, math.prod(dims)
    return math.prod(dims[:frame_dim]), dims[frame_dim], math.prod(dims[frame_dim + 1:])


def trajectory_cosines(states: torch.Tensor, final: torch.Tensor, *,
                       frame_dim: int | None = None) -> torch.Tensor:
    """Cosines of every state with the final latent, ``[N, S + 1]``.

    ``states`` ``[N, S, *state]``, ``final`` ``[N, *state]``. Column j < S is
    s_j = cos(states[:, j], final) and column S is cos(final, final) (1, or 0 for an all-zero
    final latent), with cos(a, b) = ⟨a, b⟩ / max(‖a‖·‖b‖, tiny) over the flattened state; a zero
    vector has cosine 0 with everything instead of 0/0. With ``frame_dim`` the cosine is taken per
    frame (see :func:`frame_layout`) and averaged over the frames, so a video whose late frames
    converge late is not dominated by its largest-norm frames.

    Computed in float32 (float64 for float64 inputs) one state at a time, so the extra memory is
    one ``[N, D]`` copy, never ``[N, S, D]`` (a Wan 480p trajectory of 8 samples x 21 states is
    1.4 GB as float32).
    """
    cd = compute_dtype(torch.promote_types(states.dtype, final.dtype))
    n, s = states.shape[:2]
    a, f, b = frame_layout(states.shape[2:], frame_dim)
    fin = final.reshape(n, a, f, b).to(cd)
    ff = (fin * fin).sum((1, 3))  # [N, F]
    fnorm = ff.sqrt()
    tiny = torch.finfo(cd).tiny
    out = torch.empty(n, s + 1, dtype=cd, device=states.device)
    for j in range(s):
        x = states[:, j].reshape(n, a, f, b).to(cd)
        dot = (x * fin).sum((1, 3))
        ss = (x * x).sum((1, 3))
        out[:, j] = (dot / (ss.sqrt() * fnorm).clamp_min(tiny)).mean(1)
    out[:, s] = (ff / (fnorm * fnorm).clamp_min(tiny)).mean(1)
    return out

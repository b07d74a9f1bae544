"""``build_advantages``: every credit scheme as one tensor A[n, t] for the trainer.

A GRPO step t of sample n is trained with the clipped surrogate of A[n, t]; a scheme is a way of
filling A from the rewards ``[N, K]`` (and, depending on the scheme, the trajectory, the
predicted clean latents, per-step rewards or the sigma schedule). With ẑ_k[n] the clipped group
z-score of reward k and A_n the static mix of the baselines (Σ_k λ_k ẑ_k, or Flow-GRPO's z-score
of Σ_k λ_k R_k):

=============== ==========================================================================================
``uniform``     Flow-GRPO: A[n, t] = A_n at every step.
``dance``       DanceGRPO: Σ_k coef_k ẑ_k[n] on int(fraction·T) random steps per sample, 0 elsewhere.
``tempflow``    TempFlow-GRPO: A_n · c · std_t, std_t the noise std of step t (c = 2.25 or 1/mean std).
``window``      MixGRPO / Flow-GRPO-Fast: A_n inside a window of SDE steps, 0 outside.
``coca``        CoCA: A_n·(α + (1 − α)·suffix_t) from x̂0 cosine gains, re-standardised per group.
``otca``        OTCA: w[n, t] (TCD) · Σ_k c[n, k] ẑ_k[n] (MOCA: c = (1 − λ)·c* + λ·ω, c* the min-norm mix,
                ω the static objective mix: 1/K, or the normalised reward weights when they differ),
                one fused ``ops.credit_advantages``.
``otca_timing`` OTCA with per-objective timing: Σ_k c[n, k] · w[n, t, k] · ẑ_k[n].
``tcd_only``    Ablation: TCD w with the static objective mix.
``moca_only``   Ablation: MOCA mix with uniform w = 1.
=============== ==========================================================================================

``config.select_fraction`` adds credit-guided timestep selection to every scheme but ``dance`` and
``window`` (which choose their own steps): M = ⌈fraction·S⌉ of the S trainable steps per sample (all T
unless ``trainable`` says otherwise), chosen by |A[n, t]|, the rest set to 0 and the importance weights
folded into A. This is the one place that selects: a trainer trains ``info["index"]`` with
``info["weight"]`` and does not select again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from otca_fast import checks, ops, reference
from otca_fast.credit.config import CreditConfig, as_credit_config
from otca_fast.credit.objective import objective_credit
from otca_fast.credit.selection import select_timesteps
from otca_fast.credit.timing import evaluation_states, interpolate_step_rewards, objective_timing_credit
from otca_fast.credit.trajectory import coca_suffix_credit, state_cosines, tcd_weights

SCHEMES = ("uniform", "dance", "tempflow", "window", "coca", "otca", "otca_timing", "tcd_only", "moca_only")
# schemes whose step choice is part of the method: credit-guided selection would fight it
_OWN_STEP_CHOICE = ("dance", "window")

ConfigLike = CreditConfig | Mapping[str, Any] | Any | None


def window_bounds(num_steps: int, config: ConfigLike = None) -> tuple[int, int]:
    """``[lo, hi)``, the range the ``window`` scheme draws its window in: ``credit.window_range``, or by default
    ``[0, max(window_size, T // 2))`` (the high-noise half, where exploration changes the sample most)."""
    cfg = as_credit_config(config)
    return tuple(cfg.window_range) if cfg.window_range is not None else (0, max(cfg.window_size, num_steps // 2))


def window_steps(num_steps: int, config: ConfigLike = None, *, generator: torch.Generator | None = None,
                 progress: float | None = None) -> tuple[int, int]:
    """The ``window`` scheme's SDE window ``[start, stop)`` for this iteration.

    The trainer needs it *before* the rollout (steps outside the window are sampled with the ODE),
    so it calls this, rolls out, and passes the same pair to ``build_advantages(..., window=)``.
    ``window_schedule``: ``"random"`` — start uniform over the range (Flow-GRPO-Fast; one window
    per batch, drawn from ``generator``); ``"progressive"`` — the window walks from lo to
    hi − size as ``progress`` (training step / max steps, or ``config.progress``) goes 0 → 1
    (MixGRPO's progressive strategy, with its stride set by the run length); ``"fixed"`` — at lo.
    """
    cfg = as_credit_config(config)
    checks.int_at_least("num_steps", num_steps, 1)
    size = cfg.window_size
    if size > num_steps:
        raise ValueError(f"window_size: expected at most T = {num_steps} steps, got {size}")
    lo, hi = window_bounds(num_steps, cfg)
    if hi > num_steps:
        raise ValueError(f"window_range: expected hi <= T = {num_steps}, got {(lo, hi)}")
    positions = hi - size - lo + 1
    if cfg.window_schedule == "fixed":
        return lo, lo + size
    if cfg.window_schedule == "random":
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        device = generator.device if generator is not None else "cpu"
        start = lo + int(torch.randint(positions, (1,), generator=generator, device=device))
        return start, start + size
    p = progress if progress is not None else cfg.progress
    if p is None:
        raise ValueError("progress: window_schedule='progressive' needs the training progress "
                         "(step / max steps) in [0, 1]; pass progress= or set config.progress, got None")
    p = checks.unit_interval("progress", p)
    start = lo + min(int(p * positions), positions - 1)
    return start, start + size


def build_advantages(scheme: str, *, rewards: torch.Tensor, group_ids: torch.Tensor,
                     latents: torch.Tensor | None = None, x0_preds: torch.Tensor | None = None,
                     step_rewards: torch.Tensor | None = None, sigmas: torch.Tensor | None = None,
                     config: ConfigLike = None, generator: torch.Generator | None = None,
                     progress: float | None = None, window: tuple[int, int] | None = None,
                     cosines: torch.Tensor | None = None,
                     trainable: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Per-step advantages ``A [N, T]`` (float32) of ``scheme`` and an ``info`` dict to log and plot.

    ``rewards`` ``[N, K]`` (or ``[N]``), ``group_ids`` ``[N]`` integer group labels. By scheme:
    ``latents`` ``[N, T+1, ...]`` (noise → data) for ``otca``, ``tcd_only``, ``coca`` (final
    latent) and ``otca_timing`` with ``timing_blend > 0``; ``x0_preds`` ``[N, T, ...]`` for ``coca``
    and ``source="x0_pred"``; ``step_rewards`` ``[N, T+1, K]`` — or ``[N, M, K]`` at the M states
    of ``evaluation_states(T, config.timing_every)``, interpolated here — for ``otca_timing``;
    ``sigmas`` ``[T+1]`` or ``[N, T+1]`` for ``tempflow``. T is read from whichever of these is
    given (they must agree), else from ``config.num_steps``.

    ``config``: a :class:`CreditConfig`, a mapping or an object with its fields. ``generator``
    drives ``dance``, ``window`` (random schedule) and importance selection: results are
    deterministic given it. ``progress`` (step / max steps) drives the progressive window;
    ``window=(start, stop)`` fixes the window the rollout used (see :func:`window_steps`).

    ``cosines`` ``[N, T+1]``: the trajectory's state cosines, precomputed with
    :func:`~otca_fast.credit.trajectory.state_cosines` (``source``/``per_frame``/``frame_dim`` of the
    config for ``otca``, ``tcd_only`` and ``otca_timing``; ``source="x0_pred"`` for ``coca``). Given, it
    stands in for ``latents`` and ``x0_preds``: a distributed trainer computes it on the rank that holds
    the trajectories and gathers only these numbers.

    ``trainable`` ``[T]`` (or ``[N, T]``) bool: the steps a trainer can train (e.g. the SDE steps of a
    rollout that is ODE elsewhere, minus the last). The credit then lives on them alone: A is 0
    elsewhere; the normalised step credit of ``otca``, ``tcd_only`` and ``otca_timing`` is renormalised
    over them (mean 1, or sum 1, over the trainable steps, so credit earned on an untrainable step is
    shared out over the trainable ones instead of being lost); ``dance`` draws its steps among them;
    and credit-guided selection picks ⌈fraction·S⌉ of the S trainable steps. Without it every step
    counts as trainable.

    ``info``: ``scheme``; ``num_steps``; ``advantages`` ẑ ``[N, K]`` (clipped per-objective group
    z-scores); ``c`` ``[N, K]`` objective mix; ``w`` ``[N, T]`` or ``[N, T, K]`` step credit;
    ``train_mask`` ``[N, T]`` bool, the steps to train (A is 0 elsewhere); and per scheme
    ``cosines`` ``[N, T+1]``, ``step_rewards`` ``[N, T+1, K]``, ``window``, and with selection
    ``index``/``weight`` ``[N, M]`` (A already includes ``weight``).
    """
    cfg = as_credit_config(config)
    checks.choice("scheme", scheme, SCHEMES)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    if cfg.select_fraction is not None and scheme in _OWN_STEP_CHOICE:
        raise ValueError(f"select_fraction: scheme {scheme!r} chooses its own steps; credit-guided selection "
                         f"applies to {[s for s in SCHEMES if s not in _OWN_STEP_CHOICE]}, got "
                         f"select_fraction={cfg.select_fraction}")
    # validates rewards and group_ids (errors name them) and gives the clipped z-scores ẑ [N, K]
    zhat = ops.group_advantages(rewards, group_ids, std=cfg.std, eps=cfg.adv_eps,
                                adv_clip_max=cfg.adv_clip_max, aggregate="none")
    n, k = zhat.shape
    device = zhat.device
    num_steps = _num_steps(cfg, n, k, device, latents=latents, x0_preds=x0_preds, step_rewards=step_rewards,
                           sigmas=sigmas, cosines=cosines)
    objective_weights = _weights("objective_weights", cfg.objective_weights, k)
    if objective_weights is not None:
        static_c = torch.tensor(objective_weights, dtype=torch.float32, device=device).repeat(n, 1)
    else:
        static_c = torch.full((n, k), 1.0 / k, device=device)
    info: dict[str, Any] = {"scheme": scheme, "num_steps": num_steps, "advantages": zhat}
    allowed = _trainable_mask(trainable, n, num_steps, device)
    train_mask = allowed.clone()

    def static_mix() -> torch.Tensor:
        return ops.group_advantages(rewards, group_ids, weights=objective_weights, std=cfg.std,
                                    eps=cfg.adv_eps, adv_clip_max=cfg.adv_clip_max, aggregate=cfg.aggregate)

    def credit(w: torch.Tensor, c: torch.Tensor | str | None) -> torch.Tensor:
        return ops.credit_advantages(rewards, group_ids, w.float().contiguous(), c, std=cfg.std,
                                     eps=cfg.adv_eps, adv_clip_max=cfg.adv_clip_max,
                                     exploration=cfg.exploration)

    # MOCA's exploration mixes in the static objective mix: 1/K for equal weights (the paper's form, fused
    # in one launch), the normalised reward weights otherwise (so exploration = 1 is the weighted static
    # mix, and reward weights are never silently ignored)
    weighted = objective_weights is not None and len(set(objective_weights)) > 1

    def moca() -> tuple[torch.Tensor | str, torch.Tensor]:
        if not weighted:
            return "moca", objective_credit(zhat, exploration=cfg.exploration)
        mix = (1.0 - cfg.exploration) * objective_credit(zhat, exploration=0.0) + cfg.exploration * static_c
        return mix, mix

    def tcd(name: str) -> torch.Tensor:
        if cosines is not None:
            info["cosines"] = cosines
            return on_trainable(tcd_weights(cosines, eps=cfg.eps, normalize=cfg.normalize))
        if latents is None:
            raise ValueError(f"latents: scheme {name!r} needs the trajectory latents [N, T+1, ...], got None")
        cos = state_cosines(latents, source=cfg.source, x0_preds=x0_preds, per_frame=cfg.per_frame,
                            frame_dim=cfg.frame_dim)
        info["cosines"] = cos
        return on_trainable(tcd_weights(cos, eps=cfg.eps, normalize=cfg.normalize))

    def on_trainable(w: torch.Tensor) -> torch.Tensor:
        return renormalize_on(w, allowed, cfg.normalize) if trainable is not None else w

    if scheme == "uniform":
        w = torch.ones(n, num_steps, device=device)
        adv = static_mix()[:, None] * w
        c = static_c
    elif scheme == "dance":
        coefs = _weights("dance_coefficients", cfg.dance_coefficients, k)
        c = torch.tensor(coefs, dtype=torch.float32, device=device).repeat(n, 1) if coefs else static_c
        # DanceGRPO clips each objective's advantage and mixes the per-objective losses; with the
        # ratio inside the clip range that is exactly the loss of the mixed clipped advantages.
        # info["advantages"] keeps the per-objective ẑ for a trainer that wants separate surrogates.
        mixed = (c * zhat).sum(1)
        # int(fraction·S) random steps among the S trainable ones of each sample
        chosen = (allowed.sum(1) * cfg.dance_fraction).long().clamp_min(1)
        rng_device = generator.device if generator is not None else device
        draws = torch.rand(n, num_steps, generator=generator, device=rng_device).to(device)
        draws = torch.where(allowed, draws, torch.full_like(draws, 2.0))  # untrainable steps sort last
        rank = draws.argsort(1).argsort(1)
        train_mask = (rank < chosen[:, None]) & allowed
        w = train_mask.float()
        adv = mixed[:, None] * w
    elif scheme == "tempflow":
        w = _tempflow_weights(cfg, sigmas, n, num_steps, device)
        adv = static_mix()[:, None] * w
        c = static_c
    elif scheme == "window":
        start, stop = _check_window(window, num_steps) if window is not None else window_steps(
            num_steps, cfg, generator=generator, progress=progress)
        info["window"] = (start, stop)
        steps = torch.arange(num_steps, device=device)
        train_mask = ((steps >= start) & (steps < stop)).expand(n, num_steps).contiguous()
        w = train_mask.float()
        adv = static_mix()[:, None] * w
        c = static_c
    elif scheme == "coca":
        if cosines is None and (x0_preds is None or latents is None):
            raise ValueError("x0_preds: scheme 'coca' scores the predicted clean latents (CoCA); pass "
                             "x0_preds [N, T, ...] and latents [N, T+1, ...] (for the final latent), got "
                             f"x0_preds={'a tensor' if x0_preds is not None else None}, "
                             f"latents={'a tensor' if latents is not None else None}")
        cos = cosines if cosines is not None else state_cosines(
            latents, source="x0_pred", x0_preds=x0_preds, per_frame=cfg.per_frame, frame_dim=cfg.frame_dim)
        info["cosines"] = cos
        suffix = coca_suffix_credit(cos, window=cfg.coca_window)
        w = (cfg.coca_alpha + (1.0 - cfg.coca_alpha) * suffix).float()
        adv = static_mix()[:, None] * w
        if cfg.coca_restandardize:
            # CoCA's update_temporal_rewards: one mean/std over each group's [members x T] block
            flat = reference.group_zscores(adv.reshape(-1, 1), group_ids.repeat_interleave(num_steps),
                                           std=cfg.std, eps=cfg.adv_eps)
            adv = flat.reshape(n, num_steps)
        adv = adv.clamp(-cfg.adv_clip_max, cfg.adv_clip_max)
        c = static_c
    elif scheme == "otca":
        w = tcd("otca")
        mode, c = moca()
        adv = credit(w, mode)
    elif scheme == "otca_timing":
        if step_rewards is None:
            raise ValueError("step_rewards: scheme 'otca_timing' needs per-step rewards [N, T+1, K] (or at "
                             "the states of evaluation_states(T, timing_every)), got None")
        full = _full_step_rewards(step_rewards, num_steps, cfg.timing_every)
        info["step_rewards"] = full
        w = on_trainable(objective_timing_credit(full, eps=cfg.eps, normalize=cfg.normalize))
        if cfg.timing_blend > 0:
            w = (1.0 - cfg.timing_blend) * w + cfg.timing_blend * tcd("otca_timing").to(w.dtype)[:, :, None]
        mode, c = moca()
        adv = credit(w, mode)
    elif scheme == "tcd_only":
        w = tcd("tcd_only")
        adv = credit(w, static_c)
        c = static_c
    else:  # moca_only
        w = torch.ones(n, num_steps, device=device)
        mode, c = moca()
        adv = credit(w, mode)

    adv = (adv.float() * train_mask).contiguous()  # no credit where nothing is trained
    if cfg.select_fraction is not None:
        index, weight = _select_among(adv.abs(), allowed, cfg.select_fraction, cfg.select_mode, generator)
        # clipped to ±adv_clip_max *before* the importance weights (a trainer must not clip A again: that
        # would clip the weighted values and bias the estimate)
        clipped = adv.gather(1, index).clamp(-cfg.adv_clip_max, cfg.adv_clip_max)
        selected = torch.zeros_like(adv).scatter_(1, index, clipped * weight.float())
        train_mask = torch.zeros_like(train_mask).scatter_(1, index, True)
        adv = selected
        info["index"], info["weight"] = index, weight
    checks.raise_if_not_finite("advantages", adv, "[sample, step]")
    info.update(c=c.float(), w=w.float(), train_mask=train_mask)
    return adv, info


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------

def _trainable_mask(trainable: torch.Tensor | None, n: int, num_steps: int, device: torch.device) -> torch.Tensor:
    """``[N, T]`` bool: ``trainable`` (``[T]`` or ``[N, T]``) broadcast, every step when None."""
    if trainable is None:
        return torch.ones(n, num_steps, dtype=torch.bool, device=device)
    if not isinstance(trainable, torch.Tensor):
        raise TypeError(f"trainable: expected a bool tensor [T] or [N, T], got {type(trainable).__name__}")
    if trainable.dtype != torch.bool or tuple(trainable.shape) not in ((num_steps,), (n, num_steps)):
        raise ValueError(f"trainable: expected a bool tensor [T] or [N, T] with T = {num_steps}, N = {n}, got "
                         f"{trainable.dtype} of shape {tuple(trainable.shape)}")
    mask = trainable.to(device).expand(n, num_steps).contiguous()
    empty = ~mask.any(1)
    if bool(empty.any()):
        raise ValueError(f"trainable: sample {int(empty.nonzero()[0, 0])} has no trainable step")
    return mask


def renormalize_on(w: torch.Tensor, allowed: torch.Tensor, normalize: str = "mean") -> torch.Tensor:
    """Step credit ``w`` ``[N, T]`` or ``[N, T, K]`` restricted to the ``allowed`` ``[N, T]`` steps and
    normalised again over them: mean 1 over the allowed steps (``"mean"``) or sum 1 (``"sum"``), 0 elsewhere.
    Credit earned on a step nobody trains is then shared out over the trained ones in proportion, not lost."""
    mask = allowed.to(w.dtype) if w.dim() == 2 else allowed.to(w.dtype).unsqueeze(-1)
    kept = w * mask
    total = kept.sum(1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    scale = mask.sum(1, keepdim=True) if normalize == "mean" else torch.ones_like(total)
    return kept / total * scale


def _select_among(credit: torch.Tensor, allowed: torch.Tensor, fraction: float, mode: str,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`select_timesteps` over each row's allowed steps: ⌈fraction·S⌉ of its S allowed steps
    (absolute step indices, sorted; the same S on every row, as the trainer's masks have)."""
    counts = allowed.sum(1)
    if bool((counts != counts[0]).any()):
        raise ValueError("trainable: credit-guided selection needs the same number of trainable steps on every row")
    s = int(counts[0])
    steps = allowed.nonzero()[:, 1].view(credit.shape[0], s)                   # [N, S] absolute, ascending
    local, weight = select_timesteps(credit.gather(1, steps), fraction, mode=mode, generator=generator)
    return steps.gather(1, local), weight

def _weights(name: str, values: Sequence[float] | None, k: int) -> list[float] | None:
    if values is None:
        return None
    if len(values) != k:
        raise ValueError(f"{name}: expected {k} weights (one per reward column), got {len(values)}: "
                         f"{list(values)}")
    return [float(v) for v in values]


def _num_steps(cfg: CreditConfig, n: int, k: int, device: torch.device,
               **tensors: torch.Tensor | None) -> int:
    """T from the tensors given (they must agree with each other and with config.num_steps)."""
    found: dict[str, int] = {}
    for name, t in tensors.items():
        if t is None:
            continue
        if name == "sigmas":
            checks.float_tensor(name, t)
            if t.dim() not in (1, 2):
                raise ValueError(f"sigmas: expected [T+1] or [N, T+1], got shape {tuple(t.shape)}")
        elif name == "cosines":
            checks.float_tensor(name, t, dim=2)
            checks.raise_if_not_finite(name, t, "[sample, state]")
        else:
            checks.float_tensor(name, t, dim=3 if name == "step_rewards" else None, min_dim=3)
        if t.device != device:
            raise ValueError(f"{name}: expected device {device} (the device of rewards), got {t.device}")
        if (name != "sigmas" or t.dim() == 2) and t.shape[0] != n:
            raise ValueError(f"{name}: expected {n} samples along dim 0 (one per row of rewards), got shape "
                             f"{tuple(t.shape)}")
        if name in ("latents", "cosines"):
            found[name] = t.shape[1] - 1
        elif name == "x0_preds":
            found[name] = t.shape[1]
        elif name == "sigmas":
            found[name] = t.shape[-1] - 1
        elif t.shape[2] != k:
            raise ValueError(f"step_rewards: expected {k} objectives along dim 2 (the columns of rewards), "
                             f"got shape {tuple(t.shape)}")
    if cfg.num_steps is not None:
        found["config.num_steps"] = cfg.num_steps
    if len(set(found.values())) > 1:
        listing = ", ".join(f"{a} -> T = {b}" for a, b in found.items())
        raise ValueError(f"num_steps: the inputs disagree on T: {listing}")
    if found:
        steps = next(iter(found.values()))
    elif tensors.get("step_rewards") is not None:
        steps = tensors["step_rewards"].shape[1] - 1
    else:
        raise ValueError("num_steps: cannot tell T; pass latents, x0_preds, sigmas or step_rewards, or set "
                         "config.num_steps")
    if steps < 1:
        raise ValueError(f"num_steps: expected T >= 1 denoising steps, got {steps} "
                         f"(from {list(found) or 'step_rewards'})")
    return steps


def _full_step_rewards(step_rewards: torch.Tensor, num_steps: int, every: int) -> torch.Tensor:
    """``[N, T+1, K]`` as given, or interpolated from the evaluation states of ``every``."""
    if step_rewards.shape[1] == num_steps + 1:
        return step_rewards
    states = evaluation_states(num_steps, every)
    if step_rewards.shape[1] != len(states):
        raise ValueError(f"step_rewards: expected {num_steps + 1} states (every state) or {len(states)} (the "
                         f"states {states} of timing_every = {every}) along dim 1, got shape "
                         f"{tuple(step_rewards.shape)}")
    return interpolate_step_rewards(step_rewards, states, num_steps)


def _check_window(window: Any, num_steps: int) -> tuple[int, int]:
    if (not isinstance(window, Sequence) or len(window) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) for v in window)):
        raise TypeError(f"window: expected (start, stop) ints, got {window!r}")
    start, stop = window
    if not 0 <= start < stop <= num_steps:
        raise ValueError(f"window: expected 0 <= start < stop <= T = {num_steps}, got {tuple(window)}")
    return start, stop


def _tempflow_weights(cfg: CreditConfig, sigmas: torch.Tensor | None, n: int, num_steps: int,
                      device: torch.device) -> torch.Tensor:
    """c·std_t ``[N, T]`` from the sigma schedule (TempFlow-GRPO's noise-aware weight)."""
    if sigmas is None:
        raise ValueError("sigmas: scheme 'tempflow' weights each step by its noise std; pass the schedule "
                         "[T+1] or [N, T+1], got None")
    if cfg.dynamics == "ode":
        raise ValueError("dynamics: scheme 'tempflow' weights steps by their noise std, which is 0 at every "
                         "step of 'ode'; use flow_sde, dance_sde or cps")
    if cfg.dynamics == "cps" and cfg.noise_level > 1:
        raise ValueError(f"noise_level: cps needs 0 < noise_level <= 1 (std = sigma_next*sin(a*pi/2)), got "
                         f"{cfg.noise_level}")
    checks.raise_if_not_finite("sigmas", sigmas)
    sig = sigmas.to(torch.float64)
    sig = sig.expand(n, num_steps + 1) if sig.dim() == 1 else sig
    if bool((sig[:, 0] > 1).any()) or bool((sig[:, 0] <= 0).any()) or bool((sig[:, -1] < 0).any()):
        raise ValueError(f"sigmas: expected a schedule from sigma <= 1 (noise) down to sigma >= 0, got first "
                         f"{sig[:, 0].tolist()} and last {sig[:, -1].tolist()}")
    if not bool((sig[:, 1:] < sig[:, :-1]).all()):
        raise ValueError(f"sigmas: expected a strictly decreasing schedule (noise -> data), got "
                         f"{sigmas.tolist()}")
    # Flow-GRPO replaces 1 − σ by 1 − σ₁ in the noise scale at σ = 1: σ₁ is each row's second sigma
    coef = reference.step_coefficients(sig[:, :-1].reshape(-1), sig[:, 1:].reshape(-1), dynamics=cfg.dynamics,
                                       noise_level=cfg.noise_level,
                                       sigma_max=sig[:, 1:2].expand(n, num_steps).reshape(-1))
    std = coef.std.view(n, num_steps)
    if cfg.tempflow_norm == "constant":
        w = cfg.tempflow_scale * std
    else:
        mean = std.mean(1, keepdim=True)
        if bool((mean <= 0).any()):
            raise ValueError("tempflow_norm: 'mean' divides by the mean noise std, which is 0 for this "
                             f"schedule and dynamics {cfg.dynamics!r}; use tempflow_norm='constant'")
        w = std / mean
    return w.float().to(device)

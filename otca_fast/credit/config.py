"""``CreditConfig``: every knob of the credit schemes, named, with its default and the reason for it.

A frozen dataclass, so ``otca_fast.credit`` can be used from any GRPO loop; its checks are
:mod:`otca_fast.checks` and its dynamics names :data:`otca_fast.reference.DYNAMICS`. The trainer's
pydantic config mirrors it field for field; :func:`as_credit_config` accepts a ``CreditConfig``, a
plain mapping (unknown keys are an error, so a typo cannot silently fall back to a default) or any
object with these attributes (a pydantic model, a namespace); attributes such an object lacks take
the defaults below.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from otca_fast import checks
from otca_fast.reference import DYNAMICS, STD_MODES

NORMALIZE = ("mean", "sum")
SOURCES = ("latent", "x0_pred")
AGGREGATES = ("normalize_then_sum", "sum_then_normalize")
WINDOW_SCHEDULES = ("random", "progressive", "fixed")
TEMPFLOW_NORMS = ("constant", "mean")
SELECT_MODES = ("importance", "topk")


@dataclasses.dataclass(frozen=True)
class CreditConfig:
    """Options of :func:`otca_fast.credit.build_advantages` (see ``docs/credit.md`` for each reason)."""

    # --- TCD (trajectory-level credit decomposition) ------------------------------------------
    eps: float = 1e-3
    """Floor ε of w̃ = max(gain, 0) + ε: no step ever gets zero credit (cosine gains sum to about 1,
    so 1e-3 is about 2% of an average step's share at T = 20)."""
    normalize: str = "mean"
    """``"mean"``: each row of w averages 1 (learning rates tuned for Flow-GRPO carry over);
    ``"sum"``: each row sums to 1."""
    source: str = "latent"
    """``"latent"``: cosine of the noisy states x_t (the paper's reading); ``"x0_pred"``: of the
    predicted clean latents x̂0 (CoCA's choice; needs ``x0_preds``)."""
    per_frame: bool = False
    """Cosine per video frame, then averaged over frames (video latents only)."""
    frame_dim: int = 1
    """Frame axis within one state (diffusers video latents are ``[C, F, H, W]``: axis 1)."""

    # --- MOCA (multi-objective credit allocation) ---------------------------------------------
    exploration: float = 0.1
    """λ of c = (1 − λ)·c* + λ/K; keeps conflicting samples (where c* gives 0) in the gradient."""

    # --- group advantages, shared by every scheme ----------------------------------------------
    objective_weights: tuple[float, ...] | None = None
    """Static objective weights of the baselines (``uniform``, ``tempflow``, ``window``, ``coca``,
    ``tcd_only``); ``None`` = 1/K each."""
    aggregate: str = "normalize_then_sum"
    """Static mix of the baselines: z-score each reward then weight (MixGRPO, Pref-GRPO) or weight
    the raw rewards then z-score (Flow-GRPO's ``multi_score``)."""
    std: str = "group"
    """z-score denominator: the group's std, or the batch std (Flow-GRPO's ``global_std``)."""
    adv_eps: float = 1e-4
    """δ in (R − mean)/(std + δ) (Flow-GRPO's 1e-4)."""
    adv_clip_max: float = 5.0
    """Advantages are clipped to ±adv_clip_max (Flow-GRPO and DanceGRPO use 5)."""
    num_steps: int | None = None
    """T when no tensor argument carries it (``uniform``/``moca_only`` without latents or sigmas)."""

    # --- dance (DanceGRPO) ------------------------------------------------------------------------
    dance_fraction: float = 0.6
    """Fraction of steps trained per sample: DanceGRPO's ``timestep_fraction`` (int(T·0.6) steps)."""
    dance_coefficients: tuple[float, ...] | None = None
    """Coefficients of the per-objective advantages (DanceGRPO's vq_coef, mq_coef, ...);
    ``None``: ``objective_weights``."""

    # --- window (MixGRPO / Flow-GRPO-Fast) --------------------------------------------------------
    window_size: int = 4
    """Steps in the SDE window (MixGRPO's group_size of 4; Flow-GRPO-Fast uses 1–2)."""
    window_range: tuple[int, int] | None = None
    """``[lo, hi)`` the window moves in; ``None``: ``(0, max(window_size, T // 2))``
    (Flow-GRPO-Fast's ``sde_window_range`` default of the first half)."""
    window_schedule: str = "random"
    """``"random"``: start uniform in the range, one per batch (Flow-GRPO-Fast); ``"progressive"``:
    the window walks from lo to hi − size as training progresses (MixGRPO); ``"fixed"``: at lo."""
    progress: float | None = None
    """Training progress (step / max steps) in [0, 1] for ``window_schedule="progressive"``; the
    ``progress=`` keyword of build_advantages overrides it."""

    # --- tempflow (TempFlow-GRPO) -------------------------------------------------------------------
    dynamics: str = "flow_sde"
    """Dynamics whose per-step noise std weights ``tempflow`` (as in ``otca_fast.ops``)."""
    noise_level: float = 0.7
    """Its noise level (Flow-GRPO's a = 0.7)."""
    tempflow_scale: float = 2.25
    """c in A·c·std_t: TempFlow-GRPO's hand normaliser 2.25."""
    tempflow_norm: str = "constant"
    """``"constant"``: c = tempflow_scale (TempFlow); ``"mean"``: c = 1/mean_t std_t per sample,
    so the weights average 1 like TCD's."""

    # --- coca (CoCA) -----------------------------------------------------------------------------------
    coca_alpha: float = 0.0
    """α in A·(α + (1 − α)·suffix_t): CoCA's ``temporal_alpha`` default 0."""
    coca_window: int = 1
    """Steps averaged per cosine gain (CoCA's ``window_size``, 5 at 50 steps); must divide T."""
    coca_restandardize: bool = True
    """Re-standardise the [group x T] temporal advantages per group, as CoCA does."""

    # --- otca_timing (per-objective timing, beyond the paper) ------------------------------------
    timing_every: int = 1
    """The trainer evaluates the cheap rewards on x̂0 every ``timing_every`` states (and on the
    final sample) and interpolates; ``step_rewards`` may come at those states only."""
    timing_blend: float = 0.0
    """β of w = (1 − β)·w_timing + β·w_TCD (needs latents when > 0); 0 = pure per-objective timing."""

    # --- credit-guided timestep selection (beyond the paper) -------------------------------------
    select_fraction: float | None = None
    """Train only M = ceil(fraction·T) steps per sample chosen by credit (``None``: train all)."""
    select_mode: str = "importance"
    """``"importance"``: sampled ∝ |A| with unbiasing weights; ``"topk"``: the M largest |A|."""

    def __post_init__(self) -> None:
        for name in ("objective_weights", "dance_coefficients", "window_range"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                    raise TypeError(f"{name}: expected a sequence of numbers or None, got {value!r}")
                object.__setattr__(self, name, tuple(value))
        checks.positive("eps", self.eps)
        checks.choice("normalize", self.normalize, NORMALIZE)
        checks.choice("source", self.source, SOURCES)
        checks.boolean("per_frame", self.per_frame)
        checks.integer("frame_dim", self.frame_dim, minimum=0)
        checks.unit_interval("exploration", self.exploration)
        for name in ("objective_weights", "dance_coefficients"):
            value = getattr(self, name)
            if value is not None:
                if len(value) == 0:
                    raise ValueError(f"{name}: expected at least one weight, got an empty sequence")
                for i, v in enumerate(value):
                    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                        raise ValueError(f"{name}: expected finite numbers, got {v!r} at index {i}")
        checks.choice("aggregate", self.aggregate, AGGREGATES)
        checks.choice("std", self.std, STD_MODES)
        checks.positive("adv_eps", self.adv_eps)
        checks.positive("adv_clip_max", self.adv_clip_max)
        if self.num_steps is not None:
            checks.integer("num_steps", self.num_steps, minimum=1)
        checks.fraction("dance_fraction", self.dance_fraction)
        checks.integer("window_size", self.window_size, minimum=1)
        if self.window_range is not None:
            if len(self.window_range) != 2:
                raise ValueError(f"window_range: expected (lo, hi), got {self.window_range!r}")
            lo, hi = self.window_range
            checks.integer("window_range[0]", lo, minimum=0)
            checks.integer("window_range[1]", hi, minimum=1)
            if hi - lo < self.window_size:
                raise ValueError(f"window_range: expected hi - lo >= window_size = {self.window_size}, "
                                 f"got {self.window_range!r}")
        checks.choice("window_schedule", self.window_schedule, WINDOW_SCHEDULES)
        if self.progress is not None:
            checks.unit_interval("progress", self.progress)
        checks.choice("dynamics", self.dynamics, DYNAMICS)
        checks.positive("noise_level", self.noise_level)
        checks.positive("tempflow_scale", self.tempflow_scale)
        checks.choice("tempflow_norm", self.tempflow_norm, TEMPFLOW_NORMS)
        checks.unit_interval("coca_alpha", self.coca_alpha)
        checks.integer("coca_window", self.coca_window, minimum=1)
        checks.boolean("coca_restandardize", self.coca_restandardize)
        checks.integer("timing_every", self.timing_every, minimum=1)
        checks.unit_interval("timing_blend", self.timing_blend)
        if self.select_fraction is not None:
            checks.fraction("select_fraction", self.select_fraction)
        checks.choice("select_mode", self.select_mode, SELECT_MODES)


FIELDS = tuple(f.name for f in dataclasses.fields(CreditConfig))


def as_credit_config(config: CreditConfig | Mapping[str, Any] | Any | None) -> CreditConfig:
    """A :class:`CreditConfig` from a ``CreditConfig``, a mapping, an attribute object or ``None``."""
    if config is None:
        return CreditConfig()
    if isinstance(config, CreditConfig):
        return config
    if isinstance(config, Mapping):
        unknown = sorted(set(config) - set(FIELDS))
        if unknown:
            raise TypeError(f"config: unknown credit option(s) {unknown}; expected a subset of "
                            f"{list(FIELDS)}")
        return CreditConfig(**dict(config))
    values = {name: getattr(config, name) for name in FIELDS if hasattr(config, name)}
    if not values:
        raise TypeError("config: expected a CreditConfig, a mapping or an object with CreditConfig's "
                        f"attributes, got {type(config).__name__} with none of them")
    return CreditConfig(**values)


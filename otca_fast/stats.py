"""Intervals for claims about held-out metrics: percentile bootstrap over prompts.

The unit of resampling is the *prompt*: clips of one prompt share its difficulty, so they are not
independent draws, and the claim a reader cares about is "on prompts like these". A paired comparison
(the same prompts and the same evaluation noise before and after training, or under two credit
schemes) resamples the per-prompt *differences*, which removes the prompt-to-prompt spread from the
interval.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Interval", "bootstrap_mean", "paired_difference", "t_interval"]


@dataclass(frozen=True)
class Interval:
    """A mean with its two-sided bootstrap interval at ``level``."""

    mean: float
    lo: float
    hi: float
    level: float
    n: int

    @property
    def above_zero(self) -> bool:
        """The whole interval is above 0: an increase beyond the noise."""
        return self.lo > 0

    @property
    def below_zero(self) -> bool:
        """The whole interval is below 0: a decrease beyond the noise."""
        return self.hi < 0

    def format(self, digits: int = 3) -> str:
        return f"{self.mean:+.{digits}f} [{self.lo:+.{digits}f}, {self.hi:+.{digits}f}]"

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "level": self.level, "n": self.n}


def bootstrap_mean(values: torch.Tensor, *, level: float = 0.9, resamples: int = 2000,
                   seed: int = 0) -> Interval:
    """Mean of ``values`` ``[P]`` (or ``[P, S]``: S clips per prompt, averaged per prompt first) with a
    percentile bootstrap interval over the P prompts. Deterministic for a given ``seed``."""
    if not isinstance(values, torch.Tensor) or values.dim() not in (1, 2) or values.shape[0] < 1:
        raise ValueError(f"values: expected a [P] or [P, S] tensor with P >= 1, got "
                         f"{tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__}")
    if not 0 < level < 1:
        raise ValueError(f"level: expected a value in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples: expected >= 1, got {resamples}")
    per_prompt = values.double() if values.dim() == 1 else values.double().mean(1)
    if not bool(torch.isfinite(per_prompt).all()):
        raise ValueError("values: contains NaN or Inf")
    p = per_prompt.shape[0]
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(p, (resamples, p), generator=generator)
    means = per_prompt[picks].mean(1)
    tail = (1 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return Interval(float(per_prompt.mean()), lo, hi, level, p)


def paired_difference(after: torch.Tensor, before: torch.Tensor, **kwargs) -> Interval:
    """``after − before`` for the same prompts (rows) and the same evaluation noise, with the interval of
    :func:`bootstrap_mean` over the per-prompt differences."""
    if after.shape != before.shape:
        raise ValueError(f"after / before: expected the same prompts and clips (equal shapes), got "
                         f"{tuple(after.shape)} and {tuple(before.shape)}")
    return bootstrap_mean(after.double() - before.double(), **kwargs)


def t_interval(values, *, level: float = 0.9) -> Interval:
    """Mean of a few independent values (e.g. one per training seed) with its Student-t interval.

    For comparisons across seeds, where the bootstrap of 8 values is too narrow: mean ± t·sd/√n with
    n − 1 degrees of freedom (needs scipy, which the ``dev`` extra installs). One value gives an
    interval of ±inf; n equal values give the sign test's [x, x] when 1 − 2·0.5^n reaches ``level``, else ±inf.
    """
    import math

    from scipy.stats import t as student_t

    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("values: expected at least one value, got none")
    if not all(math.isfinite(x) for x in xs):
        raise ValueError(f"values: expected finite values, got {xs}")
    if not 0 < level < 1:
        raise ValueError(f"level: expected a value in (0, 1), got {level}")
    n = len(xs)
    mean = sum(xs) / n
    if n == 1:
        return Interval(mean, -math.inf, math.inf, level, 1)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    if sd <= 1e-12 * max(1.0, max(abs(x) for x in xs)):  # equal up to float rounding of the differences
        # Every value equal: mean ± t·0 is a point, which "excludes 0" as soon as two seeds of a discrete
        # metric (shares of 48 prompts) happen to agree. Fall back on the distribution-free interval for
        # the median, [min, max] = [x, x], whose coverage is 1 − 2·0.5^n (the sign test): a point only from
        # n = 5 at 90 %; fewer values cannot support the level, so the interval is ±inf, as for one value.
        if 1 - 2 * 0.5 ** n < level:
            return Interval(mean, -math.inf, math.inf, level, n)
        return Interval(mean, mean, mean, level, n)
    half = float(student_t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, level, n)

"""The layouts that ``otca_fast/ops.py`` and the kernels share: which row of a table holds what, and the
launch modes. One owner for each number, named here; the kernels and ``ops.py`` import the names.

Imports no Triton, so ``ops.py`` can name them before it knows which backend runs (the torch reference
needs no Triton at all).
"""

from __future__ import annotations

from otca_fast.reference import StepCoefficients

__all__ = ["ALPHA", "BETA", "STD", "GAMMA", "CONST", "COEFFICIENT_ROWS", "LOG_PROB", "ROW_LOSS", "RATIO",
           "APPROX_KL", "KL", "C1", "C2", "GRPO_TABLE_ROWS", "MODE_NONE", "MODE_NORM_SUM", "MODE_SUM_NORM",
           "MODE_CREDIT", "C_UNIFORM", "C_GIVEN", "C_MOCA"]

# The float32 [5, B] step-coefficient table (ops._step_coefficients writes it, sde_step and grpo_loss read it):
# one row per field of reference.StepCoefficients, in that order, so ops can view it back as the reference's
# StepCoefficients (μ = α·x + β·v, log-prob = −γ·mean (x' − μ)² + const, x' = μ + std·ε).
ALPHA, BETA, STD, GAMMA, CONST = (StepCoefficients._fields.index(f) for f in ("alpha", "beta", "std", "gamma",
                                                                              "const"))
COEFFICIENT_ROWS = len(StepCoefficients._fields)

# The float32 [7, B] table of grpo_loss.grpo_forward: the per-row statistics, then the two coefficients its
# backward needs, grad = g·(c1·(x' − μ) + c2·(v − v_ref)) (c2 only with a KL reference).
LOG_PROB, ROW_LOSS, RATIO, APPROX_KL, KL, C1, C2 = range(7)
GRPO_TABLE_ROWS = 7

# What the one launch of advantages.group_advantage_launch writes: clip(ẑ) [N, K]; clip(Σ_k w_k ẑ_k) [N];
# the z-score of Σ_k w_k R_k [N] (Flow-GRPO); or the credit-weighted A [N, T].
MODE_NONE, MODE_NORM_SUM, MODE_SUM_NORM, MODE_CREDIT = range(4)
# Where MODE_CREDIT takes the objective mix c from: uniform 1/K, a given [N, K], or MOCA's min-norm mix.
C_UNIFORM, C_GIVEN, C_MOCA = range(3)

"""MOCA — multi-objective credit allocation: how much each reward's advantage counts for a sample.

Per sample n with per-objective advantages a = Â[n, :] (the clipped group z-scores of the K
rewards), the policy-gradient contributions of the objectives are collinear: g_k = a_k · v_n with
v_n = Σ_t w_t ∇ ratio_t shared by all k. MGDA's min-norm problem over the simplex Δ,

    c* = argmin_{c ∈ Δ} ‖Σ_k c_k g_k‖² = argmin_{c ∈ Δ} (Σ_k c_k a_k)² · ‖v_n‖²,

is therefore a scalar problem, and c = (1 − λ)·c* + λ/K mixes in exploration.

Why it is exact with no iterative solver (the proof, also in
``otca_fast.reference.min_norm_objective_weights``, whose solver this module calls — there is one
solver in the code base, shared with the fused kernel behind
``ops.credit_advantages(..., objective_credit="moca")``):

1. The objective depends on c only through z = aᵀc, and as c ranges over Δ, z ranges over exactly
   [min_k a_k, max_k a_k] (a linear map attains its extremes at the vertices e_k, and Δ is convex
   so every value in between is attained). Minimising z² over an interval is 1-D:
   * all a_k ≥ 0 (or all ≤ 0): z* = the a_k of smallest |a_k|; the optimal set is the face of Δ
     spanned by the objectives attaining it;
   * signs conflict (min a < 0 < max a): z* = 0; the optimal set is the slice {c ∈ Δ : aᵀc = 0},
     every "zero-crossing" mix, and the min-norm signal of the sample is exactly zero.
2. Ties (the optimal set is a polytope, not a point) are broken deterministically by the optimal
   point closest in L2 to the uniform mix u = 1/K — unique, since it is the projection of u onto
   a convex set. On a face that is the uniform mix over the face. On the slice, KKT gives
   c_k = max(0, θ − ρ·a_k) (with a's sign fixed so aᵀu ≥ 0), whose support is a lower set of the
   sorted a; each of the ≤ K lower sets gives θ, ρ in closed form from 1ᵀc = 1, aᵀc = 0, and
   checking them all is exact in O(K²).
3. K = 2 closed form: a₁, a₂ of one sign → all weight on the smaller |a_k| (half/half if equal);
   a₁ > 0 > a₂ → c = (−a₂, a₁)/(a₁ − a₂), the unique zero-crossing mix (the slice is one point).

So MOCA pushes a sample only as hard as its least-improved objective when the objectives agree,
and gives conflicting samples only the exploration share λ·mean_k a_k.
"""

from __future__ import annotations

import torch

from otca_fast import checks, reference


def objective_credit(advantages: torch.Tensor, *, exploration: float = 0.1) -> torch.Tensor:
    """MOCA's objective mix c ``[N, K]``: exact min-norm mix over the simplex, then exploration.

    ``advantages`` ``[N, K]``: per-sample, per-objective advantages (normally the clipped group
    z-scores, ``ops.group_advantages(..., aggregate="none")``). Per row, c* = argmin over the
    probability simplex of (Σ_k c_k a_k)², the tie broken by the optimal mix closest to uniform
    (see the module docstring for the proof); returns (1 − exploration)·c* + exploration/K, each
    row on the simplex. Float32 (float64 for float64 input).
    """
    checks.float_tensor("advantages", advantages, dim=2)
    checks.raise_if_not_finite("advantages", advantages)
    lam = checks.unit_interval("exploration", exploration)
    return reference.moca_weights(advantages, lam)

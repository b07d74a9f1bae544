"""MOCA's objective mix and the per-objective timing: hand cases, closed forms, brute force, properties."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from otca_fast import reference
from otca_fast.credit import (
    evaluation_states,
    interpolate_step_rewards,
    objective_credit,
    objective_timing_credit,
)

SETTINGS = settings(max_examples=40, derandomize=True, deadline=None)
finite = st.floats(-5, 5, allow_nan=False).map(lambda v: round(v, 3))


def closed_form_two(a1: float, a2: float) -> tuple[float, float]:
    """The K = 2 min-norm mix written out by hand (the tie rule: closest to uniform)."""
    if a1 * a2 < 0:  # conflicting signs: the unique zero-crossing mix c1·a1 + c2·a2 = 0
        return -a2 / (a1 - a2), a1 / (a1 - a2)
    if abs(a1) < abs(a2):
        return 1.0, 0.0
    if abs(a2) < abs(a1):
        return 0.0, 1.0
    return 0.5, 0.5  # equal magnitudes (or one is 0 and so is the other): every mix is optimal


def test_hand_computed_cases():
    a = torch.tensor([[1.0, 2.0], [-1.0, -3.0], [2.0, -1.0], [1.0, 1.0], [0.0, 0.0], [0.0, 3.0],
                      [3.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
    c = objective_credit(a, exploration=0.0)
    expected = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1 / 3, 2 / 3], [0.5, 0.5], [0.5, 0.5], [1.0, 0.0],
                             [0.25, 0.75], [0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(c, expected)
    # exploration mixes in the uniform 1/K: (1 - 0.1)·(1, 0) + 0.1/2
    torch.testing.assert_close(objective_credit(a[:1], exploration=0.1),
                               torch.tensor([[0.95, 0.05]], dtype=torch.float64))


def test_hand_computed_three_objectives():
    # (3, -1, -1): the zero-crossing mixes form a segment; the one closest to uniform is the
    # projection of u onto {1ᵀc = 1, aᵀc = 0}: u − (aᵀu)/‖a − ā‖²·(a − ā) = (1/4, 3/8, 3/8)
    a = torch.tensor([[3.0, -1.0, -1.0], [1.0, 0.0, -1.0], [2.0, 4.0, 2.0]], dtype=torch.float64)
    c = objective_credit(a, exploration=0.0)
    expected = torch.tensor([[0.25, 0.375, 0.375], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.0, 0.5]],
                            dtype=torch.float64)
    torch.testing.assert_close(c, expected)


@SETTINGS
@given(a1=finite, a2=finite)
def test_two_objectives_closed_form_general_solution_and_brute_force(a1, a2):
    a = torch.tensor([[a1, a2]], dtype=torch.float64)
    c = objective_credit(a, exploration=0.0)[0]
    expected = torch.tensor(closed_form_two(a1, a2), dtype=torch.float64)
    torch.testing.assert_close(c, expected, rtol=1e-9, atol=1e-9)
    # brute force over the simplex (c1, 1 − c1): the value is the grid minimum (up to grid spacing)
    grid = torch.linspace(0, 1, 20001, dtype=torch.float64)
    values = (grid * a1 + (1 - grid) * a2) ** 2
    best = float(values.min())
    assert float((c * a[0]).sum() ** 2) <= best + 1e-12
    if abs(abs(a1) - abs(a2)) > 1e-6 or a1 * a2 < 0:  # unique minimiser: the grid finds the same point
        assert abs(float(grid[values.argmin()]) - float(c[0])) <= 1e-4


@SETTINGS
@given(a=st.lists(finite, min_size=3, max_size=5))
def test_general_k_is_optimal_against_a_simplex_grid(a):
    k = len(a)
    adv = torch.tensor([a], dtype=torch.float64)
    c = objective_credit(adv, exploration=0.0)[0]
    assert bool((c >= -1e-12).all()) and abs(float(c.sum()) - 1.0) < 1e-9
    value = float((c * adv[0]).sum() ** 2)
    # random points of the simplex and its vertices never do better
    pts = torch.distributions.Dirichlet(torch.ones(k, dtype=torch.float64)).sample((4000,))
    pts = torch.cat([pts, torch.eye(k, dtype=torch.float64)])
    assert value <= float(((pts @ adv[0]) ** 2).min()) + 1e-12
    # and the value is the 1-D answer: 0 when the signs conflict, min |a_k|² otherwise
    lo, hi = min(a), max(a)
    expected = 0.0 if lo < 0 < hi else min(abs(v) for v in a) ** 2
    assert abs(value - expected) <= 1e-9 * max(1.0, expected)


@SETTINGS
@given(a=st.lists(finite, min_size=2, max_size=5), lam=st.floats(0, 1))
def test_conflicting_signs_and_exploration(a, lam):
    adv = torch.tensor([a], dtype=torch.float64)
    k = len(a)
    c0 = objective_credit(adv, exploration=0.0)
    if min(a) < 0 < max(a):
        assert abs(float((c0 * adv).sum())) <= 1e-9 * max(1.0, max(abs(v) for v in a))
    # exploration = 1 is the plain mean of the advantages
    torch.testing.assert_close((objective_credit(adv, exploration=1.0) * adv).sum(1), adv.mean(1))
    # exploration is a convex mix with the uniform 1/K
    torch.testing.assert_close(objective_credit(adv, exploration=lam), (1 - lam) * c0 + lam / k)


def test_same_solver_as_the_reference_and_the_fused_kernel():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(64, 4, generator=g)
    torch.testing.assert_close(objective_credit(a, exploration=0.2), reference.moca_weights(a, 0.2))


@pytest.mark.parametrize("call, match", [
    (lambda: objective_credit(torch.ones(3)), r"advantages: expected a 2-d tensor"),
    (lambda: objective_credit(torch.ones(3, 2, dtype=torch.long)), r"advantages: expected dtype in"),
    (lambda: objective_credit(torch.tensor([[1.0, float("nan")]])),
     r"advantages: expected finite values, got nan at"),
    (lambda: objective_credit(torch.ones(3, 2), exploration=1.5),
     r"exploration: expected a value in \[0, 1\]"),
    (lambda: objective_credit(torch.ones(3, 2), exploration=None), r"exploration: expected a finite number"),
])
def test_objective_credit_rejects_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


# ---------------------------------------------------------------------------------------------------
# per-objective timing
# ---------------------------------------------------------------------------------------------------

def test_hand_computed_timing():
    # objective 0 is settled by the first step, objective 1 by the last, objective 2 never improves
    sr = torch.tensor([[[0.0, 0.0, 3.0], [1.0, 0.0, 2.0], [1.0, 0.0, 1.0], [1.0, 2.0, 0.0]]],
                      dtype=torch.float64)
    eps = 0.1
    w = objective_timing_credit(sr, eps=eps)
    assert w.shape == (1, 3, 3)
    early = torch.tensor([1 + eps, eps, eps], dtype=torch.float64) / (1 + 3 * eps) * 3
    torch.testing.assert_close(w[0, :, 0], early)
    torch.testing.assert_close(w[0, :, 1], early.flip(0))
    torch.testing.assert_close(w[0, :, 2], torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(objective_timing_credit(sr, eps=eps, normalize="sum"), w / 3)


@SETTINGS
@given(seed=st.integers(0, 2**16), scale=st.floats(0.01, 100), shift=st.floats(-100, 100))
def test_timing_is_invariant_to_affine_reward_changes(seed, scale, shift):
    g = torch.Generator().manual_seed(seed)
    sr = torch.randn(3, 6, 2, generator=g, dtype=torch.float64).cumsum(1)
    w = objective_timing_credit(sr)
    changed = sr.clone()
    changed[..., 1] = changed[..., 1] * scale + shift
    torch.testing.assert_close(objective_timing_credit(changed), w, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(w.mean(1), torch.ones(3, 2, dtype=torch.float64))
    assert bool((w > 0).all())


def test_evaluation_states_and_interpolation():
    assert evaluation_states(5, 2) == [0, 2, 4, 5]
    assert evaluation_states(4, 2) == [0, 2, 4]
    assert evaluation_states(3, 1) == [0, 1, 2, 3]
    assert evaluation_states(3, 10) == [0, 3]
    values = torch.tensor([[[0.0], [2.0], [5.0]]])
    full = interpolate_step_rewards(values, [0, 2, 3], 3)
    torch.testing.assert_close(full, torch.tensor([[[0.0], [1.0], [2.0], [5.0]]]))


@pytest.mark.parametrize("call, match", [
    (lambda: objective_timing_credit(torch.ones(2, 4)), r"step_rewards: expected a 3-d tensor"),
    (lambda: objective_timing_credit(torch.ones(2, 1, 3)),
     r"step_rewards: expected \[N, T\+1, K\] with T >= 1"),
    (lambda: objective_timing_credit(torch.full((1, 3, 1), float("inf"))), r"step_rewards: expected finite"),
    (lambda: objective_timing_credit(torch.ones(1, 3, 1), eps=-1.0), r"eps: expected a value > 0"),
    (lambda: objective_timing_credit(torch.ones(1, 3, 1), normalize="l2"), r"normalize: expected one of"),
    (lambda: evaluation_states(0, 1), r"num_steps: expected an int >= 1"),
    (lambda: evaluation_states(4, 0), r"every: expected an int >= 1"),
    (lambda: interpolate_step_rewards(torch.ones(1, 2, 1), [0, 2, 3], 3),
     r"states: expected 2 states"),
    (lambda: interpolate_step_rewards(torch.ones(1, 2, 1), [1, 3], 3),
     r"states: expected strictly increasing"),
    (lambda: interpolate_step_rewards(torch.ones(1, 2, 1), [0, 2], 3),
     r"states: expected strictly increasing"),
])
def test_timing_rejects_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()

"""Credit-guided timestep selection: top-k by hand, importance sampling unbiased (Monte Carlo), errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from otca_fast.credit import select_timesteps

SETTINGS = settings(max_examples=25, derandomize=True, deadline=None)


def test_topk_by_hand():
    w = torch.tensor([[0.1, 3.0, 0.5, 3.0, 2.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    index, weight = select_timesteps(w, 0.5, mode="topk")  # M = ceil(2.5) = 3
    assert index.tolist() == [[1, 3, 4], [0, 1, 2]]  # ties go to the earlier step
    assert torch.equal(weight, torch.ones(2, 3))


def test_number_of_steps_is_the_ceiling():
    w = torch.rand(2, 20)
    for fraction, m in ((0.6, 12), (0.05, 1), (0.01, 1), (0.51, 11), (1.0, 20)):
        index, _ = select_timesteps(w, fraction, generator=torch.Generator().manual_seed(0))
        assert index.shape == (2, m)


def test_importance_sampling_is_unbiased_monte_carlo():
    # one credit row repeated 20,000 times: each row is an independent draw
    w_row = torch.tensor([0.05, 2.0, 0.0, 0.4, 1.0, 0.3, 6.0, 0.25], dtype=torch.float64)
    f = torch.tensor([1.5, -2.0, 0.0, 3.0, 0.5, -1.0, 2.5, 4.0], dtype=torch.float64)  # 0 where w is 0
    n, t = 20_000, w_row.numel()
    index, weight = select_timesteps(w_row.expand(n, t).contiguous(), 3 / 8,
                                     generator=torch.Generator().manual_seed(7))
    assert index.shape == (n, 3)
    # M distinct steps per row, sorted, never the zero-credit step
    assert bool((index[:, 1:] > index[:, :-1]).all())
    assert not bool((index == 2).any())
    estimates = (weight * f[index]).sum(1)
    mean, sem = float(estimates.mean()), float(estimates.std()) / math.sqrt(n)
    assert abs(mean - float(f.sum())) < 5 * sem, (mean, float(f.sum()), sem)
    # inclusion frequencies match pi = min(1, M·w/Σw) with the cap re-shared: step 6 (6/10 of the mass)
    # is a certainty with weight 1, the rest share the remaining 2 slots in proportion to w
    counts = torch.zeros(t, dtype=torch.float64).index_add_(0, index.flatten(), torch.ones(index.numel(),
                                                                                           dtype=torch.float64))
    rest = w_row.clone()
    rest[6] = 0
    pi = 2 * rest / rest.sum()
    pi[6] = 1.0
    torch.testing.assert_close(counts / n, pi, atol=0.015, rtol=0)  # about 4 standard errors
    assert torch.equal(weight[index == 6], torch.ones_like(weight[index == 6]))
    torch.testing.assert_close(weight, 1.0 / pi[index])


@SETTINGS
@given(seed=st.integers(0, 2**16), t=st.integers(2, 12), fraction=st.floats(0.05, 1.0))
def test_weights_are_horvitz_thompson_and_draws_deterministic(seed, t, fraction):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(3, t, generator=g, dtype=torch.float64) ** 3
    w[0, : t // 2] = 0.0  # a row with zero-credit steps
    w[1] = 0.0  # a row without any credit: sampled uniformly
    a = select_timesteps(w, fraction, generator=torch.Generator().manual_seed(seed))
    b = select_timesteps(w, fraction, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    index, weight = a
    m = index.shape[1]
    assert m == min(t, max(1, math.ceil(fraction * t - 1e-9)))
    assert bool((index[:, 1:] > index[:, :-1]).all())
    assert bool((weight >= 1.0 - 1e-12).all())  # 1/pi with pi <= 1
    # the uniform row: every step has pi = M/T
    torch.testing.assert_close(weight[1], torch.full((m,), t / m, dtype=torch.float64))
    # the inclusion probabilities sum to M, so Σ 1/weight over the sampled steps is at most M
    assert float((1.0 / weight).sum(1).max()) <= m + 1e-9


@pytest.mark.parametrize("call, match", [
    (lambda: select_timesteps(torch.rand(4), 0.5), r"w: expected a 2-d tensor"),
    (lambda: select_timesteps(-torch.rand(2, 4) - 0.1, 0.5), r"w: expected non-negative credit"),
    (lambda: select_timesteps(torch.rand(2, 4), 0.0), r"fraction: expected a value in \(0, 1\]"),
    (lambda: select_timesteps(torch.rand(2, 4), 1.5), r"fraction: expected a value in \(0, 1\]"),
    (lambda: select_timesteps(torch.rand(2, 4), 0.5, mode="random"), r"mode: expected one of"),
    (lambda: select_timesteps(torch.rand(2, 4), 0.5, generator=3), r"generator: expected a torch.Generator"),
    (lambda: select_timesteps(torch.tensor([[1.0, float("nan")]]), 0.5), r"w: expected finite values"),
])
def test_bad_input_is_rejected(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()

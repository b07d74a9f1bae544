"""Group advantages and credit-weighted advantages: kernel vs float64 reference, and the edge cases."""

import numpy as np
import pytest
import torch

from otca_fast import ops, reference

pytestmark = pytest.mark.skipif(
    ops.backend_for(torch.zeros(1)) != "triton",
    reason="the kernels run on CPU tensors only under TRITON_INTERPRET=1 (tests/test_ops_gpu.py covers the GPU)")


def random_groups(n_groups: int, sizes=(1, 2, 3, 5, 8), k: int = 3, seed: int = 0):
    """Rewards in shuffled, non-contiguous groups with arbitrary (negative, large) integer labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randperm(1000, generator=g)[:n_groups] * 7 - 3000
    counts = [sizes[i % len(sizes)] for i in range(n_groups)]
    group_ids = torch.cat([torch.full((c,), int(lab)) for c, lab in zip(counts, labels)])
    perm = torch.randperm(group_ids.numel(), generator=g)
    group_ids = group_ids[perm]
    rewards = torch.randn(group_ids.numel(), k, generator=g) * torch.tensor([1.0, 10.0, 0.1][:k]) + 3.0
    return rewards, group_ids


def flow_grpo_stat_tracker(rewards: np.ndarray, prompts: np.ndarray, global_std: bool) -> np.ndarray:
    """Flow-GRPO's PerPromptStatTracker.update (type 'grpo'), restated in numpy."""
    advantages = np.empty_like(rewards)
    for prompt in np.unique(prompts):
        r = rewards[prompts == prompt]
        mean = np.mean(r, axis=0, keepdims=True)
        std = np.std(rewards, axis=0, keepdims=True) if global_std else np.std(r, axis=0, keepdims=True)
        advantages[prompts == prompt] = (r - mean) / (std + 1e-4)
    return advantages


@pytest.mark.parametrize("aggregate", ["none", "normalize_then_sum", "sum_then_normalize"])
@pytest.mark.parametrize("std", ["group", "global"])
@pytest.mark.parametrize("k", [1, 3])
def test_group_advantages_parity(aggregate, std, k, poison_outputs):
    rewards, group_ids = random_groups(9, k=k, seed=k)
    weights = None if k == 1 else [0.5, 0.2, 0.3]
    out = ops.group_advantages(rewards, group_ids, weights=weights, std=std, aggregate=aggregate, adv_clip_max=2.5)
    ref = reference.group_advantages(rewards.double(), group_ids, weights=weights, std=std, aggregate=aggregate,
                                     adv_clip_max=2.5)
    assert out.dtype == torch.float32
    assert out.shape == ((rewards.shape[0], k) if aggregate == "none" else (rewards.shape[0],))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert out.abs().max() <= 2.5


@pytest.mark.parametrize("global_std", [False, True])
def test_sum_then_normalize_is_flow_grpo(global_std):
    """Flow-GRPO: multi_score's weighted raw sum, then the per-prompt stat tracker."""
    rewards, group_ids = random_groups(6, sizes=(4, 6), k=3, seed=5)
    weights = np.array([0.5, 0.2, 0.3])
    mixed = rewards.double().numpy() @ weights
    expected = flow_grpo_stat_tracker(mixed, group_ids.numpy(), global_std)
    out = ops.group_advantages(rewards, group_ids, weights=weights.tolist(), aggregate="sum_then_normalize",
                               std="global" if global_std else "group", adv_clip_max=1e9)
    np.testing.assert_allclose(out.numpy(), expected, rtol=2e-5, atol=2e-5)


def test_hand_computed_small_case():
    rewards = torch.tensor([[1.0], [2.0], [3.0], [5.0], [5.0]])
    group_ids = torch.tensor([4, 4, 4, 9, 9])
    out = ops.group_advantages(rewards, group_ids)
    std = (2.0 / 3.0) ** 0.5  # population std of (1, 2, 3)
    expected = torch.tensor([-1 / (std + 1e-4), 0.0, 1 / (std + 1e-4), 0.0, 0.0])
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_zero_std_and_singleton_groups_give_exactly_zero(backend, monkeypatch):
    monkeypatch.setenv("OTCA_FAST_BACKEND", backend)
    rewards = torch.tensor([[0.1, 7.0], [0.1, 7.0], [0.1, 7.0], [3.3, 1.0], [2.0, 5.0], [4.0, 5.0]])
    group_ids = torch.tensor([0, 0, 0, 1, 2, 2])
    for std in ("group", "global"):
        for aggregate in ("none", "normalize_then_sum", "sum_then_normalize"):
            out = ops.group_advantages(rewards, group_ids, std=std, aggregate=aggregate)
            assert torch.isfinite(out).all()
            assert (out[:4] == 0).all(), (std, aggregate, out)
        w = torch.rand(6, 5)
        a = ops.credit_advantages(rewards, group_ids, w, "moca", std=std)
        assert torch.isfinite(a).all() and (a[:4] == 0).all()
    # objective 1 of group 2 is constant: that column is 0, objective 0 is not
    z = ops.group_advantages(rewards, group_ids, aggregate="none")
    assert z[4, 1] == 0 and z[5, 1] == 0 and z[4, 0] < 0 < z[5, 0]


def test_nan_reward_is_reported_with_its_position():
    rewards = torch.randn(6, 3)
    rewards[4, 2] = float("nan")
    with pytest.raises(ValueError, match=r"rewards\[4, 2\].*objective 2.*group 7"):
        ops.group_advantages(rewards, torch.tensor([1, 1, 1, 7, 7, 7]))
    rewards[4, 2] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        ops.credit_advantages(rewards, torch.tensor([1, 1, 1, 7, 7, 7]), torch.ones(6, 4))


def test_k1_vector_rewards_and_unsorted_labels_match_sorted():
    rewards, group_ids = random_groups(7, k=1, seed=3)
    out = ops.group_advantages(rewards[:, 0], group_ids)
    order = torch.argsort(group_ids)
    out_sorted = ops.group_advantages(rewards[order], group_ids[order])
    torch.testing.assert_close(out[order], out_sorted)


@pytest.mark.parametrize("c_kind", ["uniform", "given", "moca"])
@pytest.mark.parametrize("per_objective_timing", [False, True])
@pytest.mark.parametrize("std", ["group", "global"])
def test_credit_advantages_parity(c_kind, per_objective_timing, std, poison_outputs):
    rewards, group_ids = random_groups(8, sizes=(3, 4, 6, 1), k=3, seed=11)
    n, t = rewards.shape[0], 7
    w = torch.rand(n, t, 3) if per_objective_timing else torch.rand(n, t)
    c = {"uniform": None, "given": torch.softmax(torch.randn(n, 3), 1), "moca": "moca"}[c_kind]
    out = ops.credit_advantages(rewards, group_ids, w, c, std=std, adv_clip_max=1.5, exploration=0.2)
    ref = reference.credit_advantages(rewards.double(), group_ids, w.double(),
                                      c.double() if isinstance(c, torch.Tensor) else c,
                                      std=std, adv_clip_max=1.5, exploration=0.2)
    assert out.shape == (n, t) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_credit_advantages_uniform_shared_w_is_w_times_normalize_then_sum():
    rewards, group_ids = random_groups(5, sizes=(4,), k=3, seed=2)
    w = torch.rand(rewards.shape[0], 6)
    plain = ops.group_advantages(rewards, group_ids, aggregate="none", adv_clip_max=1e9).mean(1)
    out = ops.credit_advantages(rewards, group_ids, w, None, adv_clip_max=1e9)
    torch.testing.assert_close(out, w * plain[:, None], rtol=1e-5, atol=1e-6)


def test_moca_hand_cases_in_one_launch():
    """Two members per group so each z-score is ±1/(1 + eps/std): easy to reason about by hand."""
    # group 0: objective 0 says sample 0 is better, objective 1 says sample 1 is better (conflict)
    # group 1: both objectives agree that sample 2 is better, objective 1 by a smaller margin
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.5], [0.0, 0.0]])
    group_ids = torch.tensor([0, 0, 1, 1])
    w = torch.ones(4, 3)
    out = ops.credit_advantages(rewards, group_ids, w, "moca", exploration=0.0)
    # conflict: z = (+a, −a) → the zero-crossing mix (½, ½) → A = 0
    torch.testing.assert_close(out[:2], torch.zeros(2, 3), atol=1e-6, rtol=0)
    # agreement: |z| = std/(std + eps) is smaller for objective 1 (std 0.25 < 0.5): all mass goes there
    z = 0.25 / (0.25 + 1e-4)
    torch.testing.assert_close(out[2:], torch.tensor([[z] * 3, [-z] * 3]), rtol=1e-5, atol=1e-6)
    # exploration = 1 is the plain mean of the objectives
    out = ops.credit_advantages(rewards, group_ids, w, "moca", exploration=1.0)
    expected = ops.group_advantages(rewards, group_ids, aggregate="none").mean(1)
    torch.testing.assert_close(out, expected[:, None].expand(4, 3), rtol=1e-6, atol=1e-6)

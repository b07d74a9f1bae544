"""build_advantages: every scheme by hand or against its source's formula, properties, errors, the plot."""

import math
import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from otca_fast import ops
from otca_fast.credit import (
    SCHEMES,
    CreditConfig,
    as_credit_config,
    build_advantages,
    evaluation_states,
    objective_credit,
    objective_timing_credit,
    plot_credit,
    trajectory_credit,
    window_steps,
)
from otca_fast.ops import forced_backend as backend

SETTINGS = settings(max_examples=12, derandomize=True, deadline=None)




def batch(groups=3, size=4, k=3, steps=5, state=(2, 3, 4), seed=0, rewards=None):
    """Rewards on a grid (exact affine maps), trajectories drifting to their end, x̂0, step rewards, sigmas."""
    g = torch.Generator().manual_seed(seed)
    n = groups * size
    if rewards is None:
        rewards = torch.randint(0, 9, (n, k), generator=g).double() / 4
    group_ids = torch.arange(groups).repeat_interleave(size) * 10 - 7
    end = torch.randn(n, *state, generator=g, dtype=torch.float64)
    t = torch.linspace(0, 1, steps + 1, dtype=torch.float64).view(1, -1, *([1] * len(state)))
    latents = (1 - t) * torch.randn(n, 1, *state, generator=g, dtype=torch.float64) + t * end[:, None]
    latents = latents + 0.2 * torch.randn(n, steps + 1, *state, generator=g, dtype=torch.float64)
    latents[:, -1] = end
    jitter = torch.randn(n, steps, *state, generator=g, dtype=torch.float64)
    x0 = end[:, None] + 0.5 * jitter * (1 - t[:, :-1])
    step_rewards = torch.randn(n, steps + 1, k, generator=g, dtype=torch.float64).cumsum(1)
    sigmas = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    sigmas = 3 * sigmas / (1 + 2 * sigmas)  # a shifted schedule (shift 3)
    return dict(rewards=rewards.float(), group_ids=group_ids, latents=latents.float(), x0_preds=x0.float(),
                step_rewards=step_rewards.float(), sigmas=sigmas.float())


def call(scheme, data, seed=0, **config):
    return build_advantages(scheme, **data, config=config, generator=torch.Generator().manual_seed(seed),
                            progress=0.4)


# ---------------------------------------------------------------------------------------------------
# each scheme by hand / against its source
# ---------------------------------------------------------------------------------------------------

def test_uniform_by_hand():
    rewards = torch.tensor([[1.0], [3.0], [0.0], [0.0]])
    adv, info = build_advantages("uniform", rewards=rewards, group_ids=torch.tensor([0, 0, 5, 5]),
                                 config={"num_steps": 3})
    z = 1 / (1 + 1e-4)  # (R - mean) / (std + 1e-4) with mean 2, std 1
    expected = torch.tensor([[-z] * 3, [z] * 3, [0.0] * 3, [0.0] * 3])
    torch.testing.assert_close(adv, expected)
    assert info["train_mask"].all() and info["w"].eq(1).all()
    assert info["num_steps"] == 3 and info["scheme"] == "uniform"


def test_tempflow_by_hand():
    rewards = torch.tensor([[1.0], [3.0]])
    sigmas = torch.tensor([1.0, 0.5, 0.0])
    adv, info = build_advantages("tempflow", rewards=rewards, group_ids=torch.tensor([0, 0]), sigmas=sigmas)
    # flow_sde, a = 0.7: s = a·sqrt(σ/(1 − σ)) with 1 − σ₁ = 0.5 at σ = 1; std = s·sqrt(−Δ)
    std = torch.tensor([0.7 * math.sqrt(1 / 0.5) * math.sqrt(0.5), 0.7 * 1.0 * math.sqrt(0.5)])
    z = 1 / (1 + 1e-4)
    torch.testing.assert_close(info["w"], (2.25 * std).expand(2, 2))
    torch.testing.assert_close(adv, torch.stack([-z * 2.25 * std, z * 2.25 * std]))
    _, info = build_advantages("tempflow", rewards=rewards, group_ids=torch.tensor([0, 0]), sigmas=sigmas,
                               config={"tempflow_norm": "mean"})
    torch.testing.assert_close(info["w"], (std / std.mean()).expand(2, 2))


def test_dance_by_hand():
    data = batch(groups=2, size=3, k=2, steps=5)
    adv, info = call("dance", data, dance_coefficients=(1.0, 0.0))
    z0 = ops.group_advantages(data["rewards"], data["group_ids"], aggregate="none")[:, 0]
    mask = info["train_mask"]
    assert mask.sum(1).eq(3).all()  # int(5 · 0.6) random steps per sample
    torch.testing.assert_close(adv, z0[:, None] * mask.float())
    torch.testing.assert_close(info["c"], torch.tensor([[1.0, 0.0]]).expand(6, 2))
    # the masks differ between samples (a random permutation each)
    assert len({tuple(r.tolist()) for r in mask}) > 1


def test_window_by_hand_and_its_schedules():
    data = batch(groups=2, size=2, k=1, steps=10)
    adv, info = call("window", data, window_size=2)
    start, stop = info["window"]
    assert stop - start == 2 and 0 <= start <= 3  # default range (0, T // 2) = (0, 5)
    a_n = ops.group_advantages(data["rewards"], data["group_ids"])
    expected = torch.zeros(4, 10)
    expected[:, start:stop] = a_n[:, None]
    torch.testing.assert_close(adv, expected)
    adv, info = build_advantages("window", **data, window=(6, 9))
    assert adv[:, :6].eq(0).all() and adv[:, 9:].eq(0).all() and info["train_mask"][:, 6:9].all()
    cfg = {"window_size": 2, "window_range": (0, 6), "window_schedule": "progressive"}
    walk = [window_steps(10, cfg, progress=p) for p in (0.0, 0.3, 0.6, 1.0)]
    assert walk == [(0, 2), (1, 3), (3, 5), (4, 6)]
    assert window_steps(10, {"window_size": 3, "window_schedule": "fixed", "window_range": (2, 8)}) == (2, 5)
    draws = {window_steps(10, {"window_size": 2}, generator=torch.Generator().manual_seed(s))
             for s in range(40)}
    assert draws == {(0, 2), (1, 3), (2, 4), (3, 5)}


def coca_restated(rewards, group_ids, x0, final, alpha, eps):
    """CoCA's train_coca.py + pipeline_with_logprob_coca.py (window 1), restated in numpy."""
    n, steps = x0.shape[:2]
    s = [torch.nn.functional.cosine_similarity(x0[:, j].flatten(1), final.flatten(1), dim=-1)
         for j in range(steps)]
    s = torch.stack(s + [torch.ones(n, dtype=x0.dtype)], 1).numpy()
    gain = s[:, 1:] - s[:, :-1]
    sim_weight = gain / gain.sum(-1, keepdims=True)
    adv = np.empty(n)
    for p in np.unique(group_ids):
        r = rewards[group_ids == p]
        adv[group_ids == p] = (r - r.mean()) / (r.std() + eps)
    adv = np.clip(adv, -5, 5)
    ts_processed, ts_sum = np.zeros_like(sim_weight), np.zeros(n)
    for i in reversed(range(steps)):
        ts_processed[:, i] = sim_weight[:, i] + ts_sum
        ts_sum = ts_processed[:, i]
    temporal = adv[:, None] * (alpha + (1 - alpha) * ts_processed)
    out = np.empty_like(temporal)
    for p in np.unique(group_ids):
        block = temporal[group_ids == p]
        out[group_ids == p] = (block - block.mean()) / (block.std() + eps)
    return np.clip(out, -5, 5)


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_coca_matches_the_coca_code(alpha):
    data = batch(groups=3, size=4, k=1, steps=6)
    for key in ("latents", "x0_preds"):
        data[key] = data[key].double()
    with backend("reference"):
        adv, info = build_advantages("coca", **data, config={"coca_alpha": alpha, "adv_eps": 1e-6})
    expected = coca_restated(data["rewards"][:, 0].double().numpy(), data["group_ids"].numpy(),
                             data["x0_preds"], data["latents"][:, -1], alpha, 1e-6)
    np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert info["cosines"].shape == (12, 7)


def test_otca_is_tcd_times_moca():
    data = batch()
    adv, info = call("otca", data, exploration=0.2)
    w = trajectory_credit(data["latents"])
    zhat = ops.group_advantages(data["rewards"], data["group_ids"], aggregate="none")
    c = objective_credit(zhat, exploration=0.2)
    torch.testing.assert_close(info["w"], w)
    torch.testing.assert_close(info["c"], c)
    torch.testing.assert_close(info["advantages"], zhat)
    torch.testing.assert_close(adv, w * (c * zhat).sum(1, keepdim=True), rtol=1e-5, atol=1e-6)


def test_otca_options_reach_tcd():
    data = batch(state=(2, 3, 4))
    _, info = call("otca", data, source="x0_pred", per_frame=True, frame_dim=1, eps=0.01, normalize="sum")
    w = trajectory_credit(data["latents"], source="x0_pred", x0_preds=data["x0_preds"], per_frame=True,
                          frame_dim=1, eps=0.01, normalize="sum")
    torch.testing.assert_close(info["w"], w)


def test_otca_timing_is_per_objective_and_interpolates():
    data = batch(steps=6)
    adv, info = call("otca_timing", data)
    w3 = objective_timing_credit(data["step_rewards"])
    zhat = ops.group_advantages(data["rewards"], data["group_ids"], aggregate="none")
    c = objective_credit(zhat, exploration=0.1)
    torch.testing.assert_close(info["w"], w3)
    torch.testing.assert_close(adv, (w3 * (c * zhat)[:, None, :]).sum(2), rtol=1e-5, atol=1e-6)
    # step rewards scored every 2 states (0, 2, 4, 6) are interpolated to all 7 first
    states = evaluation_states(6, 2)
    sparse = dict(data, step_rewards=data["step_rewards"][:, states])
    _, info2 = call("otca_timing", sparse, timing_every=2)
    assert info2["step_rewards"].shape == (12, 7, 3)
    torch.testing.assert_close(info2["step_rewards"][:, states], data["step_rewards"][:, states])
    midpoint = (data["step_rewards"][:, 2] + data["step_rewards"][:, 4]) / 2
    torch.testing.assert_close(info2["step_rewards"][:, 3], midpoint)
    # blending with TCD: (1 − β)·w_timing + β·w_TCD
    _, info3 = call("otca_timing", data, timing_blend=0.25)
    tcd = trajectory_credit(data["latents"])
    torch.testing.assert_close(info3["w"], 0.75 * w3 + 0.25 * tcd[:, :, None])


def test_ablations():
    data = batch()
    zhat = ops.group_advantages(data["rewards"], data["group_ids"], aggregate="none")
    adv, info = call("tcd_only", data, objective_weights=(0.5, 0.3, 0.2))
    w = trajectory_credit(data["latents"])
    mix = zhat @ torch.tensor([0.5, 0.3, 0.2])
    torch.testing.assert_close(adv, w * mix[:, None], rtol=1e-5, atol=1e-6)
    adv, info = call("moca_only", data)
    c = objective_credit(zhat, exploration=0.1)
    torch.testing.assert_close(adv, (c * zhat).sum(1, keepdim=True).expand(-1, 5), rtol=1e-5, atol=1e-6)
    assert info["w"].eq(1).all()


def test_triton_and_reference_backends_agree():
    data = batch(groups=2, size=3, steps=4)
    for scheme in ("otca", "otca_timing", "coca", "tcd_only"):
        with backend("reference"):
            ref, _ = call(scheme, data)
        with backend("triton"):
            tri, _ = call(scheme, data)
        torch.testing.assert_close(tri, ref, rtol=1e-5, atol=1e-5)


def test_selection_keeps_m_steps_with_importance_weights():
    data = batch(steps=10)
    full, _ = call("otca", data)
    adv, info = call("otca", data, select_fraction=0.3)
    index, weight = info["index"], info["weight"]
    assert index.shape == (12, 3) and info["train_mask"].sum(1).eq(3).all()
    torch.testing.assert_close(adv.gather(1, index), full.gather(1, index) * weight)
    assert adv.masked_select(~info["train_mask"]).eq(0).all()
    adv_k, info_k = call("otca", data, select_fraction=0.3, select_mode="topk")
    top = full.abs().topk(3, dim=1).indices.sort(1).values
    assert torch.equal(info_k["index"], top)


def test_credit_lives_on_the_trainable_steps():
    """With ``trainable`` (e.g. a rollout that is SDE on its first half only), step credit earned on a step
    that cannot be trained is shared out over the trainable ones instead of being lost: w is renormalised
    over them (mean 1), and A is 0 elsewhere."""
    data = batch(steps=6)
    trainable = torch.tensor([True, True, True, False, False, False])
    for scheme in ("otca", "tcd_only", "otca_timing"):
        full, full_info = call(scheme, data)
        adv, info = build_advantages(scheme, **data, config={}, trainable=trainable)
        w, w_full = info["w"], full_info["w"]
        assert bool((w[:, 3:] == 0).all()) and bool((adv[:, 3:] == 0).all())
        torch.testing.assert_close(w[:, :3].mean(1), torch.ones(w.shape[0], *w.shape[2:]))
        # proportional to the full credit on the trainable steps
        ratio = w[:, :3] / w_full[:, :3]
        torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio))
        assert torch.equal(info["train_mask"], trainable.expand(12, 6))
    # timing credit of an objective that only progressed on untrainable steps still reaches the trained ones
    late = dict(data, step_rewards=torch.cat([torch.zeros(12, 4, 3), torch.ones(12, 3, 3)], 1))
    _, info = build_advantages("otca_timing", **late, config={}, trainable=trainable)
    torch.testing.assert_close(info["w"][:, :3], torch.ones(12, 3, 3))


def test_dance_and_selection_choose_among_the_trainable_steps():
    data = batch(steps=8)
    trainable = torch.tensor([True] * 4 + [False] * 4)
    _, info = build_advantages("dance", **data, config={"dance_fraction": 0.5}, trainable=trainable,
                               generator=torch.Generator().manual_seed(0))
    assert bool(info["train_mask"].sum(1).eq(2).all()) and not bool(info["train_mask"][:, 4:].any())
    for mode in ("importance", "topk"):
        adv, info = build_advantages("otca", **data, config={"select_fraction": 0.5, "select_mode": mode},
                                     trainable=trainable, generator=torch.Generator().manual_seed(0))
        assert info["index"].shape == (12, 2) and bool((info["index"] < 4).all())
        assert bool((adv.gather(1, info["index"]) != 0).all()) and int((adv != 0).sum()) == 24


def test_bad_trainable_masks_are_rejected():
    data = batch(steps=4)
    with pytest.raises(ValueError, match="trainable: expected a bool tensor"):
        build_advantages("uniform", **data, trainable=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="trainable: expected a bool tensor"):
        build_advantages("uniform", **data, trainable=torch.ones(4))
    with pytest.raises(ValueError, match="no trainable step"):
        build_advantages("uniform", **data, trainable=torch.zeros(4, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------
# properties of every scheme
# ---------------------------------------------------------------------------------------------------

@SETTINGS
@given(seed=st.integers(0, 2**16), column=st.integers(0, 2), scale=st.sampled_from([0.25, 0.5, 2.0, 8.0]),
       shift=st.integers(-20, 20))
def test_positive_affine_change_of_one_reward_changes_nothing(seed, column, scale, shift):
    data = batch(seed=seed)
    changed = dict(data)
    changed["rewards"] = data["rewards"].clone()
    changed["rewards"][:, column] = data["rewards"][:, column] * scale + shift
    changed["step_rewards"] = data["step_rewards"].clone()
    changed["step_rewards"][..., column] = data["step_rewards"][..., column] * scale + shift
    with backend("reference"):
        for scheme in SCHEMES:
            a, info_a = call(scheme, data, adv_eps=1e-7)
            b, info_b = call(scheme, changed, adv_eps=1e-7)
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=lambda m, s=scheme: f"{s}: {m}")
            torch.testing.assert_close(info_b["c"], info_a["c"], rtol=1e-4, atol=1e-4)


@SETTINGS
@given(seed=st.integers(0, 2**16), exploration=st.floats(0, 1))
def test_one_objective_reduces_otca_to_w_times_the_plain_advantage(seed, exploration):
    data = batch(k=1, seed=seed)
    with backend("reference"):
        adv, info = call("otca", data, exploration=exploration)
        plain = ops.group_advantages(data["rewards"], data["group_ids"])
        w = trajectory_credit(data["latents"])
    torch.testing.assert_close(info["c"], torch.ones(12, 1))
    torch.testing.assert_close(adv, w * plain[:, None], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_zero_std_groups_and_equal_rewards_are_finite(scheme):
    data = batch(groups=3, size=3)
    rewards = data["rewards"].clone()
    rewards[:3] = 1.5  # group 0: every reward equal (zero std in every objective)
    data["rewards"] = rewards
    adv, info = call(scheme, data)
    assert adv.shape == (9, 5) and adv.dtype == torch.float32 and bool(torch.isfinite(adv).all())
    assert adv[:3].eq(0).all(), scheme
    # every reward of the batch equal: nothing to prefer anywhere
    data["rewards"] = torch.full_like(rewards, 0.7)
    adv, _ = call(scheme, data)
    assert adv.eq(0).all(), scheme
    # one-member groups carry no preference either
    single = dict(data, rewards=torch.randn(9, 3), group_ids=torch.arange(9))
    adv, _ = call(scheme, single)
    assert adv.eq(0).all() and bool(torch.isfinite(adv).all()), scheme


@pytest.mark.parametrize("scheme, extra", [("dance", {}), ("window", {"window_size": 2}),
                                           ("otca", {"select_fraction": 0.4}),
                                           ("uniform", {"select_fraction": 0.4})])
def test_deterministic_given_a_generator(scheme, extra):
    data = batch(steps=8)
    with backend("reference"):
        a, info_a = call(scheme, data, seed=3, **extra)
        b, info_b = call(scheme, data, seed=3, **extra)
        others = [call(scheme, data, seed=s, **extra)[1]["train_mask"] for s in range(4, 12)]
    assert torch.equal(a, b) and torch.equal(info_a["train_mask"], info_b["train_mask"])
    assert any(not torch.equal(m, info_a["train_mask"]) for m in others)


# ---------------------------------------------------------------------------------------------------
# config and errors
# ---------------------------------------------------------------------------------------------------

def test_config_from_dataclass_mapping_and_attribute_object():
    cfg = CreditConfig(eps=0.01, objective_weights=[0.2, 0.8])
    assert cfg.objective_weights == (0.2, 0.8)  # lists become tuples: the config stays hashable
    assert as_credit_config(cfg) is cfg
    assert as_credit_config({"eps": 0.01, "objective_weights": [0.2, 0.8]}) == cfg
    assert as_credit_config(types.SimpleNamespace(eps=0.01, objective_weights=(0.2, 0.8), unrelated=1)) == cfg
    assert as_credit_config(None) == CreditConfig()
    with pytest.raises(TypeError, match=r"config: unknown credit option\(s\) \['epsilon'\]"):
        as_credit_config({"epsilon": 0.1})
    with pytest.raises(TypeError, match=r"config: expected a CreditConfig, a mapping"):
        as_credit_config(3)


@pytest.mark.parametrize("options, match", [
    ({"eps": 0.0}, r"eps: expected a value > 0"),
    ({"normalize": "max"}, r"normalize: expected one of"),
    ({"exploration": 2.0}, r"exploration: expected a value in \[0, 1\]"),
    ({"objective_weights": [1.0, float("nan")]}, r"objective_weights: expected finite numbers"),
    ({"objective_weights": 0.5}, r"objective_weights: expected a sequence"),
    ({"dance_fraction": 0.0}, r"dance_fraction: expected a value in \(0, 1\]"),
    ({"window_size": 0}, r"window_size: expected an int >= 1"),
    ({"window_size": 4, "window_range": (0, 3)}, r"window_range: expected hi - lo >= window_size"),
    ({"window_schedule": "decay"}, r"window_schedule: expected one of"),
    ({"progress": 1.5}, r"progress: expected a value in \[0, 1\]"),
    ({"coca_window": 1.0}, r"coca_window: expected an int"),
    ({"select_fraction": 0.0}, r"select_fraction: expected a value in \(0, 1\]"),
    ({"per_frame": "yes"}, r"per_frame: expected a bool"),
    ({"dynamics": "ddim"}, r"dynamics: expected one of"),
])
def test_bad_config_is_rejected(options, match):
    with pytest.raises((ValueError, TypeError), match=match):
        CreditConfig(**options)


def _drop(data, *keys):
    return {k: v for k, v in data.items() if k not in keys}


@pytest.mark.parametrize("scheme, change, match", [
    ("magic", {}, r"scheme: expected one of"),
    ("uniform", {"rewards": torch.ones(12, 3, dtype=torch.long)}, r"rewards: expected dtype"),
    ("uniform", {"group_ids": torch.zeros(11, dtype=torch.long)}, r"group_ids: expected shape \(12,\)"),
    ("uniform", {"group_ids": torch.zeros(12)}, r"group_ids: expected an integer tensor"),
    ("otca", {"latents": None}, r"latents: scheme 'otca' needs the trajectory latents"),
    ("otca", {"latents": torch.ones(11, 6, 2, 3, 4)}, r"latents: expected 12 samples along dim 0"),
    ("otca", {"x0_preds": torch.ones(12, 4, 2, 3, 4)}, r"num_steps: the inputs disagree on T"),
    ("tempflow", {"sigmas": None}, r"sigmas: scheme 'tempflow' weights each step by its noise std"),
    ("tempflow", {"sigmas": torch.linspace(0, 1, 6)}, r"sigmas: expected a schedule from sigma <= 1"),
    ("tempflow", {"sigmas": torch.tensor([1.0, 0.6, 0.7, 0.3, 0.2, 0.0])},
     r"sigmas: expected a strictly decreasing"),
    ("tempflow", {"sigmas": torch.ones(2, 6)}, r"sigmas: expected 12 samples along dim 0"),
    ("coca", {"x0_preds": None}, r"x0_preds: scheme 'coca' scores the predicted clean latents"),
    ("otca_timing", {"step_rewards": None}, r"step_rewards: scheme 'otca_timing' needs per-step rewards"),
    ("otca_timing", {"step_rewards": torch.ones(12, 6, 2)},
     r"step_rewards: expected 3 objectives along dim 2"),
    ("otca_timing", {"step_rewards": torch.ones(12, 4, 3)},
     r"step_rewards: expected 6 states \(every state\) or 2"),
    ("window", {"window": (3, 9)}, r"window: expected 0 <= start < stop <= T = 5"),
    ("window", {"window": (1.0, 2.0)}, r"window: expected \(start, stop\) ints"),
])
def test_bad_input_is_rejected(scheme, change, match):
    data = batch()
    data.update(change)
    window = data.pop("window", None)
    kwargs = {"timing_every": 5} if scheme == "otca_timing" else {}
    with pytest.raises((ValueError, TypeError), match=match):
        build_advantages(scheme, **data, config=kwargs, window=window)


def test_scheme_specific_config_errors():
    data = batch()
    with pytest.raises(ValueError, match=r"select_fraction: scheme 'dance' chooses its own steps"):
        call("dance", data, select_fraction=0.5)
    with pytest.raises(ValueError, match=r"objective_weights: expected 3 weights \(one per reward column\)"):
        call("uniform", data, objective_weights=(0.5, 0.5))
    with pytest.raises(ValueError, match=r"dynamics: scheme 'tempflow' weights steps by their noise std"):
        call("tempflow", data, dynamics="ode")
    with pytest.raises(ValueError, match=r"coca_window: expected a divisor of T = 5"):
        call("coca", data, coca_window=2)
    with pytest.raises(ValueError, match=r"progress: window_schedule='progressive' needs the training"):
        build_advantages("window", **data, config={"window_schedule": "progressive"})
    with pytest.raises(ValueError, match=r"num_steps: cannot tell T"):
        build_advantages("uniform", **_drop(data, "latents", "x0_preds", "step_rewards", "sigmas"))
    with pytest.raises(ValueError, match=r"window_range: expected hi <= T = 5"):
        call("window", data, window_size=2, window_range=(0, 8))


# ---------------------------------------------------------------------------------------------------
# the plot
# ---------------------------------------------------------------------------------------------------

def test_plot_credit_writes_a_png(tmp_path):
    from PIL import Image

    data = batch()
    _, info = call("otca_timing", data)
    names = ["aesthetic", "motion", "text"]
    out = plot_credit(info, tmp_path / "report" / "credit.png", objective_names=names)
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as im:
        assert im.width > 300 and im.height > 200
        assert np.unique(np.asarray(im.convert("L"))).size > 20  # heatmaps, not a blank canvas
    assert [p.name for p in out.parent.iterdir()] == ["credit.png"]  # no temporary file left behind
    with pytest.raises(ValueError, match=r"info: expected the key 'c'"):
        plot_credit({"w": info["w"]}, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"objective_names: expected 3 names"):
        plot_credit(info, tmp_path / "x.png", objective_names=["a"])
    with pytest.raises(ValueError, match=r"path: expected a .png file name"):
        plot_credit(info, tmp_path / "x.jpg")


def test_moca_exploration_mixes_in_the_reward_weights():
    """c = (1 − λ)·c* + λ·ω with ω the normalised reward weights: at λ = 1 OTCA is TCD with the weighted static
    mix (reward weights are never silently replaced by 1/K), and equal weights keep the paper's λ/K."""
    data = batch()
    weights = (0.5, 0.3, 0.2)
    otca, info = call("otca", data, exploration=1.0, objective_weights=weights)
    tcd, _ = call("tcd_only", data, objective_weights=weights)
    torch.testing.assert_close(otca, tcd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(info["c"], torch.tensor([weights]).expand(12, 3))
    zhat = ops.group_advantages(data["rewards"], data["group_ids"], aggregate="none")
    _, half = call("moca_only", data, exploration=0.5, objective_weights=weights)
    expected = 0.5 * objective_credit(zhat, exploration=0.0) + 0.5 * torch.tensor([weights])
    torch.testing.assert_close(half["c"], expected)
    _, equal = call("otca", data, exploration=0.3, objective_weights=(1 / 3,) * 3)
    torch.testing.assert_close(equal["c"], objective_credit(zhat, exploration=0.3))

"""Reward registry: the registry and user-defined rewards, the guarded scoring loop (NaN/raise path),
and the weight-free rewards (each ranks a known-good clip above a known-bad one, plus exact values)."""

from __future__ import annotations

import io
import pickle
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from otca_fast.rewards import (
    ROLES,
    Reward,
    RewardCallError,
    RewardError,
    build_reward,
    list_rewards,
    register_reward,
    score_rewards,
)
from otca_fast.rewards._image import to_uint8

MODEL_REWARDS = {"ocr", "clip_score", "pickscore", "hps", "laion_aesthetic"}
# scored out of process (tests/test_reward_server.py, tests/test_vlm_judge.py)
SERVED_REWARDS = {"remote", "vlm_judge"}


# --------------------------------------------------------------------------------------------------
# synthetic clips: a smooth random texture translating 2 px per frame (64x64, 8 frames)
# --------------------------------------------------------------------------------------------------

def _texture(h: int = 64, w: int = 96, seed: int = 0, cells: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, h // cells, w // cells, generator=g)
    return F.interpolate(base, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)[0]


def moving_clip(frames: int = 8, speed: int = 2, seed: int = 0) -> torch.Tensor:
    big = _texture(seed=seed)
    return torch.stack([big[:, :, 8 + speed * t: 8 + speed * t + 64] for t in range(frames)])


def still_clip(frames: int = 8, seed: int = 0) -> torch.Tensor:
    return moving_clip(1, 0, seed)[0].expand(frames, -1, -1, -1).clone()


def noisy_clip(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 100)
    clip = moving_clip(seed=seed)
    return (clip + 0.16 * torch.randn(clip.shape, generator=g)).clamp(0, 1)


def flicker_clip(seed: int = 0) -> torch.Tensor:
    gain = 1.0 + 0.3 * torch.tensor([(-1.0) ** t for t in range(8)]).view(8, 1, 1, 1)
    return (moving_clip(seed=seed) * gain).clamp(0, 1)


def sharp_image() -> torch.Tensor:
    # 8-px checkerboard in two colours: many hard edges
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    board = (((yy // 8) + (xx // 8)) % 2).float()
    return torch.stack([0.2 + 0.6 * board, 0.3 + 0.4 * board, 0.7 - 0.5 * board])[None]


def blurred(img: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    k = (k[:, None] * k[None, :] / 256.0).view(1, 1, 5, 5).repeat(3, 1, 1, 1)
    x = F.pad(img, (2, 2, 2, 2), mode="replicate")
    for _ in range(3):
        x = F.conv2d(x, k, groups=3)
        x = F.pad(x, (2, 2, 2, 2), mode="replicate")
    return x[..., 2:-2, 2:-2]


def grey(img: torch.Tensor) -> torch.Tensor:
    y = (img * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return y.expand_as(img).clone()


def batch(*clips: torch.Tensor) -> torch.Tensor:
    return torch.stack(clips)


# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------

def test_list_rewards_has_every_family_with_roles_and_cost_flags():
    listed = list_rewards()
    expected = {
        "jpeg_compressibility": ("quality", True), "jpeg_incompressibility": ("quality", True),
        "brightness": ("quality", True), "saturation": ("quality", True),
        "colourfulness": ("quality", True), "sharpness": ("quality", True),
        "temporal_flicker": ("motion", True), "warp_consistency": ("motion", False),
        "motion_amount": ("motion", False), "dynamic_degree": ("motion", False),
        "motion_quality": ("motion", False), "ocr": ("alignment", False),
        "clip_score": ("alignment", False), "pickscore": ("quality", False), "hps": ("quality", False),
        "laion_aesthetic": ("quality", False),
    }
    for name, flags in expected.items():
        assert listed[name] == flags, name
    assert all(role in ROLES for role, _ in listed.values())


def test_build_reward_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"unknown reward 'nope'.*jpeg_compressibility"):
        build_reward("nope")
    with pytest.raises(TypeError, match=r"accepted options: \['target'\]"):
        build_reward("brightness", targte=0.5)
    with pytest.raises(TypeError, match=r"fixed for the registered reward"):
        build_reward("brightness", role="motion")
    with pytest.raises(ValueError, match=r"option target: expected <= 1.0, got 2"):
        build_reward("brightness", target=2)
    with pytest.raises(ValueError, match=r"option unit"):
        build_reward("jpeg_compressibility", unit="MB")
    with pytest.raises(ValueError, match=r"option quality: expected >= 1"):
        build_reward("jpeg_compressibility", quality=0)
    with pytest.raises(TypeError, match=r"option flow_short_side: expected int or None"):
        build_reward("motion_quality", flow_short_side=128.5)


def test_register_reward_rejects_clashes_and_bad_declarations():
    with pytest.raises(ValueError, match="already taken"):
        register_reward("brightness", role="quality", cheap=True)(lambda: (lambda f, p: f.sum()))
    with pytest.raises(ValueError, match="role"):
        register_reward("some_new_reward", role="beauty", cheap=True)
    with pytest.raises(ValueError, match="dotted paths"):
        register_reward("a.b", role="custom", cheap=True)
    with pytest.raises(ValueError, match="role"):
        Reward(name="x", role="speed", cheap=True, fn=lambda f, p: f)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_user_rewards.py").write_text(textwrap.dedent("""
        import torch

        def red_mean(frames, prompts, *, gain=1.0):
            return gain * frames[:, :, 0].mean(dim=(1, 2, 3))

        class PromptLength:
            def __init__(self, per_char=1.0):
                self.per_char = per_char

            def __call__(self, frames, prompts):
                return torch.tensor([self.per_char * len(p) for p in prompts])

        not_callable = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_user_rewards"


def test_user_defined_rewards_from_dotted_paths(user_module):
    frames = torch.rand(3, 2, 3, 8, 8)
    prompts = ["a", "bb", "ccc"]
    fn_reward = build_reward(f"{user_module}:red_mean", gain=2.0, role="quality", cheap=True)
    assert (fn_reward.role, fn_reward.cheap, fn_reward.name) == ("quality", True, f"{user_module}:red_mean")
    torch.testing.assert_close(fn_reward.fn(frames, prompts), 2.0 * frames[:, :, 0].mean(dim=(1, 2, 3)))
    cls_reward = build_reward(f"{user_module}.PromptLength", per_char=0.5)
    assert (cls_reward.role, cls_reward.cheap) == ("custom", False)
    out = score_rewards([fn_reward, cls_reward], frames, prompts, step=3)
    assert out.shape == (3, 2) and out.dtype == torch.float32
    torch.testing.assert_close(out[:, 1], torch.tensor([0.5, 1.0, 1.5]))


def test_user_defined_reward_errors(user_module):
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        build_reward("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        build_reward(f"{user_module}:missing")
    with pytest.raises(TypeError, match="expected a callable or a class"):
        build_reward(f"{user_module}:not_callable")
    with pytest.raises(TypeError, match=r"accepted options: \['gain'\]"):
        build_reward(f"{user_module}:red_mean", gian=2.0)
    with pytest.raises(ValueError, match="role"):
        build_reward(f"{user_module}:red_mean", role="speed")
    with pytest.raises(TypeError, match="cheap"):
        build_reward(f"{user_module}:red_mean", cheap="yes")


# --------------------------------------------------------------------------------------------------
# score_rewards: the guarded loop, NaN / raise path
# --------------------------------------------------------------------------------------------------

PROMPTS4 = ["a cat", "a dog", "a red fox", "a boat"]


def _custom(name, fn):
    return Reward(name=name, role="custom", cheap=True, fn=fn)


def test_score_rewards_stacks_columns_in_order():
    frames = batch(moving_clip(), still_clip(), noisy_clip(), flicker_clip())
    rewards = [build_reward("temporal_flicker"), build_reward("brightness"), build_reward("motion_amount")]
    out = score_rewards(rewards, frames, PROMPTS4, step=0)
    assert out.shape == (4, 3) and out.dtype == torch.float32 and out.device.type == "cpu"
    for k, r in enumerate(rewards):
        torch.testing.assert_close(out[:, k], r.fn(frames, PROMPTS4).float())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e39])
def test_non_finite_score_names_reward_prompt_and_step(bad):
    def fn(frames, prompts):
        s = torch.arange(len(prompts), dtype=torch.float64)
        s[2] = bad
        return s

    good = build_reward("brightness")
    with pytest.raises(RewardError) as info:
        score_rewards([good, _custom("nan_maker", fn)], batch(*[still_clip()] * 4), PROMPTS4, step=17)
    err = info.value
    assert (err.reward, err.prompt, err.step, err.index) == ("nan_maker", "a red fox", 17, 2)
    msg = str(err)
    assert "nan_maker" in msg and "'a red fox'" in msg and "step 17" in msg


def test_raising_reward_is_localised_to_the_prompt_that_triggers_it():
    def fn(frames, prompts):
        if "fox" in " ".join(prompts):
            raise KeyError("no fox detector")
        return torch.zeros(len(prompts))

    with pytest.raises(RewardError) as info:
        score_rewards([_custom("picky", fn)], batch(*[still_clip()] * 4), PROMPTS4, step=5)
    err = info.value
    assert (err.reward, err.prompt, err.step, err.index) == ("picky", "a red fox", 5, 2)
    assert isinstance(err.__cause__, KeyError) and err.cause is err.__cause__
    assert "KeyError" in str(err)


def test_batch_only_failure_and_malformed_outputs_have_no_prompt():
    def batch_only(frames, prompts):
        if len(prompts) > 2:
            raise MemoryError("batch too large")
        return torch.zeros(len(prompts))

    frames = batch(*[still_clip()] * 4)
    with pytest.raises(RewardError, match="on the batch as a whole") as info:
        score_rewards([_custom("oom", batch_only)], frames, PROMPTS4, step=1)
    assert info.value.prompt is None and info.value.index is None
    with pytest.raises(RewardError, match=r"expected scores of shape \(4,\), got \(4, 1\)") as info:
        score_rewards([_custom("shape", lambda f, p: torch.zeros(len(p), 1))], frames, PROMPTS4, step=1)
    assert info.value.prompt is None and "on the batch as a whole" in str(info.value)
    with pytest.raises(RewardError, match="expected a tensor, array or list"):
        score_rewards([_custom("junk", lambda f, p: "high")], frames, PROMPTS4, step=1)


def test_reward_error_pickles_with_its_fields():
    err = RewardError("r", "a cat", 9, ValueError("bad"), 1)
    back = pickle.loads(pickle.dumps(err))
    assert (back.reward, back.prompt, back.step, back.index, str(back)) == ("r", "a cat", 9, 1, str(err))


def test_score_rewards_validates_its_inputs():
    r = [build_reward("brightness")]
    good = batch(still_clip(), still_clip())
    with pytest.raises(ValueError, match=r"expected 5 dims \[B, F, C, H, W\]"):
        score_rewards(r, good[:, 0], ["a", "b"], step=0)
    with pytest.raises(ValueError, match="expected C = 3"):
        score_rewards(r, good[:, :, :1], ["a", "b"], step=0)
    with pytest.raises(TypeError, match="float tensor"):
        score_rewards(r, (good * 255).to(torch.uint8), ["a", "b"], step=0)
    with pytest.raises(ValueError, match=r"expected 2 prompts"):
        score_rewards(r, good, ["a"], step=0)
    with pytest.raises(TypeError, match="prompts: expected a list"):
        score_rewards(r, good, "ab", step=0)
    with pytest.raises(ValueError, match=r"expected values in \[0, 1\]"):
        score_rewards(r, good * 2 - 1, ["a", "b"], step=0)
    nan_frames = good.clone()
    nan_frames[1, 3, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match=r"sample 1 \(prompt 'b'\) contain NaN/Inf at step 4"):
        score_rewards(r, nan_frames, ["a", "b"], step=4)
    nan_frames[1, 3, 0, 5, 5] = 0.5
    nan_frames[0, 0, 2, 1, 1] = float("inf")
    with pytest.raises(ValueError, match=r"sample 0 \(prompt 'a'\) contain NaN/Inf"):
        score_rewards(r, nan_frames, ["a", "b"], step=4)
    with pytest.raises(ValueError, match="step: expected >= 0"):
        score_rewards(r, good, ["a", "b"], step=-1)
    with pytest.raises(TypeError, match="step: expected an int"):
        score_rewards(r, good, ["a", "b"], step=1.0)
    with pytest.raises(TypeError, match="non-empty sequence of Reward"):
        score_rewards([], good, ["a", "b"], step=0)
    with pytest.raises(TypeError, match=r"rewards\[0\]: expected a Reward"):
        score_rewards([lambda f, p: f], good, ["a", "b"], step=0)


def test_video_rewards_reject_images_through_the_error_path():
    images = torch.rand(2, 1, 3, 32, 32)
    with pytest.raises(RewardError, match=r"reward 'temporal_flicker'.*F >= 2"):
        score_rewards([build_reward("temporal_flicker")], images, ["a", "b"], step=2)


# --------------------------------------------------------------------------------------------------
# weight-free rewards: each ranks a known-good clip above a known-bad one
# --------------------------------------------------------------------------------------------------

def _as_video(img: torch.Tensor) -> torch.Tensor:
    return img[None].expand(1, -1, -1, -1) if img.ndim == 3 else img


RANKING_CASES = {
    # name: (options, good clip, bad clip) — each [F, 3, H, W]
    "jpeg_compressibility": ({}, lambda: moving_clip(), lambda: noisy_clip()),
    "jpeg_incompressibility": ({}, lambda: noisy_clip(), lambda: moving_clip()),
    "brightness": ({"target": 0.5}, lambda: moving_clip(), lambda: moving_clip() * 0.15),
    "saturation": ({}, lambda: sharp_image(), lambda: grey(sharp_image())),
    "colourfulness": ({}, lambda: moving_clip(), lambda: grey(moving_clip())),
    "sharpness": ({}, lambda: sharp_image(), lambda: blurred(sharp_image())),
    "temporal_flicker": ({}, lambda: moving_clip(), lambda: flicker_clip()),
    "warp_consistency": ({}, lambda: moving_clip(), lambda: noisy_clip()),
    "motion_amount": ({}, lambda: moving_clip(), lambda: still_clip()),
    "dynamic_degree": ({}, lambda: moving_clip(), lambda: still_clip()),
    "motion_quality": ({}, lambda: moving_clip(), lambda: still_clip()),
}


def test_every_weight_free_reward_has_a_ranking_case():
    from otca_fast.rewards import registry

    # only this package's rewards: other packages (the toy world, user plugins) register their own
    ours = {name for name, entry in registry._REGISTRY.items()
            if entry.factory.__module__.startswith("otca_fast.rewards.")}
    assert set(RANKING_CASES) == ours - MODEL_REWARDS - SERVED_REWARDS
    assert MODEL_REWARDS | SERVED_REWARDS <= ours


@pytest.mark.parametrize("name", sorted(RANKING_CASES))
def test_weight_free_reward_ranks_good_above_bad(name):
    options, good, bad = RANKING_CASES[name]
    reward = build_reward(name, **options)
    frames = batch(good(), bad())
    scores = score_rewards([reward], frames, ["p", "p"], step=0)[:, 0]
    assert scores[0] > scores[1], f"{name}: good {scores[0]:.4f} <= bad {scores[1]:.4f}"


@pytest.mark.parametrize("name", ["temporal_flicker", "warp_consistency", "motion_quality"])
def test_consistency_rewards_also_penalise_flicker_and_noise(name):
    scores = build_reward(name).fn(batch(moving_clip(), noisy_clip(), flicker_clip()), ["p"] * 3)
    assert scores[0] > scores[1] and scores[0] > scores[2]


def test_motion_quality_does_not_reward_a_still_clip():
    frames = batch(moving_clip(), still_clip(), noisy_clip())
    consistency = build_reward("warp_consistency").fn(frames, ["p"] * 3)
    quality = build_reward("motion_quality").fn(frames, ["p"] * 3)
    # consistency alone prefers the frozen clip — the reason it must be gated by motion
    assert consistency[1] >= consistency[0]
    assert quality[1] < 0.05 < quality[2] < quality[0]
    # above the motion target the gate is 1: the score is the consistency itself
    torch.testing.assert_close(quality[0], consistency[0])
    slow = build_reward("motion_quality", motion_target=16.0).fn(frames[:1], ["p"])
    torch.testing.assert_close(slow[0], consistency[0] * 8.0 / 16.0, atol=0.02, rtol=0)


def test_motion_amount_is_in_pixels_per_frame_at_256_short_side():
    # 2 px per frame at a 64-px short side is 8 px per frame at 256
    m = build_reward("motion_amount").fn(batch(moving_clip(speed=2), moving_clip(speed=1)), ["p"] * 2)
    assert abs(m[0] - 8.0) < 1.0 and abs(m[1] - 4.0) < 0.7
    target = build_reward("motion_amount", target=4.0).fn(batch(moving_clip(speed=2), moving_clip(speed=1)),
                                                         ["p"] * 2)
    assert target[1] > target[0]


def test_dynamic_degree_follows_vbench_frame_rate_rule():
    clip = moving_clip(frames=9, speed=1)       # 4 px/frame at 256 scale
    frames = batch(clip)
    assert build_reward("dynamic_degree", fps=8.0).fn(frames, ["p"]).item() == 0.0   # 4 < 6
    # 16 fps: every 2nd frame kept, so pairs move 8 px > 6
    assert build_reward("dynamic_degree", fps=16.0).fn(frames, ["p"]).item() == 1.0


def test_flicker_exact_value():
    # frames alternate 0.2 and 0.6 -> 51 and 153 in 8 bit, MAE 102: (255 - 102) / 255 = 0.6
    levels = torch.tensor([0.2, 0.6] * 3).view(6, 1, 1, 1).expand(6, 3, 16, 16)
    score = build_reward("temporal_flicker").fn(levels[None], ["p"])
    assert score.item() == pytest.approx(0.6, abs=1e-12)


def test_colour_statistics_exact_values():
    red = torch.zeros(1, 1, 3, 8, 8)
    red[:, :, 0] = 1.0
    mid = torch.full((1, 1, 3, 8, 8), 0.5)
    frames = torch.cat([red, mid])
    # Hasler-Süsstrunk on pure red: σ = 0, μ_rg = 255, μ_yb = 127.5 -> 0.3·√(255² + 127.5²)
    colour = build_reward("colourfulness").fn(frames, ["p"] * 2)
    torch.testing.assert_close(colour, torch.tensor([0.3 * (255.0**2 + 127.5**2) ** 0.5, 0.0],
                                                    dtype=torch.float64))
    sat = build_reward("saturation").fn(frames, ["p"] * 2)
    torch.testing.assert_close(sat, torch.tensor([1.0, 0.0], dtype=torch.float64))
    # round(0.5 · 255) = 128 (half to even); luma of red = round(0.299 · 255) = 76
    bright = build_reward("brightness").fn(frames, ["p"] * 2)
    torch.testing.assert_close(bright, torch.tensor([76 / 255, 128 / 255], dtype=torch.float64))
    near = build_reward("brightness", target=0.5).fn(frames, ["p"] * 2)
    torch.testing.assert_close(near, -(bright - 0.5).abs())


def test_jpeg_rewards_match_ddpo_measurement():
    frames = batch(moving_clip()[:3], noisy_clip()[:3])
    pixels = (frames * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()
    expected = []
    for clip in pixels:
        sizes = []
        for frame in clip:
            buf = io.BytesIO()
            Image.fromarray(frame).save(buf, format="JPEG", quality=95)
            sizes.append(buf.tell() / 1000)
        expected.append(np.mean(sizes))
    kb = build_reward("jpeg_incompressibility").fn(frames, ["p"] * 2)
    torch.testing.assert_close(kb, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(build_reward("jpeg_compressibility").fn(frames, ["p"] * 2), -kb)
    bpp = build_reward("jpeg_incompressibility", unit="bpp").fn(frames, ["p"] * 2)
    torch.testing.assert_close(bpp, kb * 8000 / (64 * 64))


def test_sharpness_target_peaks_at_the_target():
    frames = batch(sharp_image(), blurred(sharp_image()))
    from otca_fast.rewards.pixel import laplacian_variance

    raw = [laplacian_variance(to_uint8(frames)[i, 0]) for i in range(2)]
    at_blur = build_reward("sharpness", target=raw[1]).fn(frames, ["p"] * 2)
    assert at_blur[1].item() == pytest.approx(0.0, abs=1e-9) and at_blur[0] < 0


def test_uint8_conversion_is_shared_but_sees_in_place_edits():
    frames = torch.rand(2, 3, 3, 8, 8)
    a = to_uint8(frames)
    assert to_uint8(frames) is a and not a.flags.writeable
    frames[0, 0] = 0.0                       # in-place edit bumps the version counter
    b = to_uint8(frames)
    assert b is not a and b[0, 0].max() == 0
    assert to_uint8(frames.clone()) is not b
    with torch.inference_mode():
        inf = torch.rand(1, 2, 3, 4, 4)
    np.testing.assert_array_equal(to_uint8(inf), (inf * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2))
    half = torch.rand(2, 2, 3, 16, 16).to(torch.bfloat16)   # decoders often emit bf16: quantise in fp32
    np.testing.assert_array_equal(to_uint8(half), to_uint8(half.float()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_weight_free_rewards_give_the_same_scores_on_cuda_frames():
    frames = batch(moving_clip(), noisy_clip())
    names = sorted(RANKING_CASES)
    cpu = score_rewards([build_reward(n) for n in names], frames, ["p", "q"], step=0)
    gpu = score_rewards([build_reward(n) for n in names], frames.cuda(), ["p", "q"], step=0)
    torch.testing.assert_close(gpu, cpu)


# ------------------------------------------------------------------------------------------------
# the hooks of rewards scored out of process: located failures, joint calls
# ------------------------------------------------------------------------------------------------

class _Joint:
    """A reward fn of a fake server: ``score_jointly`` answers for every fn of the group in one call."""

    calls: list[tuple[str, ...]] = []

    def __init__(self, name: str, fail_index: int | None = None, key: str = "server-a"):
        self.name, self.fail_index, self.joint_key = name, fail_index, key

    def _one(self, frames):
        if self.fail_index is not None:
            return RewardCallError(f"{self.name} failed remotely", self.fail_index)
        return frames.mean(dim=(1, 2, 3, 4)) + len(self.name)

    def __call__(self, frames, prompts):
        type(self).calls.append((self.name,))
        out = self._one(frames)
        if isinstance(out, BaseException):
            raise out
        return out

    def score_jointly(self, fns, frames, prompts):
        type(self).calls.append(tuple(fn.name for fn in fns))
        return [fn._one(frames) for fn in fns]


def test_rewards_sharing_a_joint_key_are_scored_in_one_call_and_located_failures_are_not_rerun():
    frames, prompts = torch.rand(3, 2, 3, 8, 8), ["a", "b", "c"]
    _Joint.calls = []
    rewards = [Reward("q", "quality", False, _Joint("q")), build_reward("brightness"),
               Reward("mm", "motion", False, _Joint("mm")), Reward("other", "custom", False, _Joint("o", key="b"))]
    scores = score_rewards(rewards, frames, prompts, step=0)
    assert _Joint.calls == [("q", "mm"), ("o",)]   # one joint call for server a, a lone call for server b
    means = frames.mean(dim=(1, 2, 3, 4))
    assert torch.allclose(scores[:, 0], means + 1) and torch.allclose(scores[:, 2], means + 2)
    # a failure the reward located itself: taken as is, the batch is not re-run sample by sample
    _Joint.calls = []
    failing = [Reward("q", "quality", False, _Joint("q")), Reward("bad", "custom", False, _Joint("bad", fail_index=2))]
    with pytest.raises(RewardError) as info:
        score_rewards(failing, frames, prompts, step=5)
    assert (info.value.reward, info.value.index, info.value.prompt) == ("bad", 2, "c")
    assert _Joint.calls == [("q", "bad")]
    _Joint.calls = []
    with pytest.raises(RewardError) as info:
        score_rewards([Reward("bad", "custom", False, _Joint("bad", fail_index=7))], frames, prompts, step=5)
    assert info.value.index is None and info.value.prompt is None   # an index out of range blames no sample
    assert _Joint.calls == [("bad",)]


def test_a_factory_may_decide_role_and_cost_and_return_a_whole_reward():
    from otca_fast.rewards import registry

    @register_reward("test_dynamic_reward", role="custom", cheap=False)
    def factory(role: str = "motion", cheap: bool = True):
        return Reward("served_name", role, cheap, lambda frames, prompts: frames.mean(dim=(1, 2, 3, 4)))

    try:
        reward = build_reward("test_dynamic_reward", role="quality")
        assert (reward.name, reward.role, reward.cheap) == ("served_name", "quality", True)
        with pytest.raises(TypeError, match=r"\['cheap'\] are fixed for the registered reward"):
            build_reward("brightness", cheap=False)
    finally:
        registry._REGISTRY.pop("test_dynamic_reward")

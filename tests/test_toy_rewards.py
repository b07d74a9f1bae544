"""The three shapes-world rewards: each ranks the right clip above every kind of wrong clip."""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch

from otca_fast.rewards import build_reward, list_rewards, score_rewards
from otca_fast.toy.rewards import (
    REWARD_NAMES,
    alignment_score,
    alignment_terms,
    analyse_clips,
    motion_score,
    motion_terms,
    quality_score,
    quality_terms,
)
from otca_fast.toy.world import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    SHAPES,
    ClipSpec,
    background_image,
    draw_clips,
    render_clips,
)

_OPPOSITE = {d: next(e for e, w in DIRECTIONS.items() if w == (-x, -y)) for d, (x, y) in DIRECTIONS.items()}
_QUARTER_TURN = {d: next(e for e, w in DIRECTIONS.items() if w == (-y, x)) for d, (x, y) in DIRECTIONS.items()}


def _next(values, value):
    values = list(values)
    return values[(values.index(value) + 1) % len(values)]


@pytest.fixture(scope="module")
def world():
    """24 clips covering every colour, shape, direction and background, and their prompts."""
    colours, directions = list(COLOURS), list(DIRECTIONS)
    specs = [ClipSpec(colours[i % 4], SHAPES[i % 3], directions[(i // 2) % 4], BACKGROUNDS[i % 5]) for i in range(24)]
    clips = render_clips(specs, generator=torch.Generator().manual_seed(0))
    backgrounds = torch.stack([background_image(s.background, 32, 32) for s in specs])
    return specs, clips, backgrounds


def _render(specs, seed=0):
    # same seed → same sizes, speeds and positions as the fixture's clips; only the attributes differ
    return render_clips(specs, generator=torch.Generator().manual_seed(seed)).frames


def _assert_right_beats_wrong(score_fn, right, wrong, prompts, margin):
    r, w = score_fn(right, prompts), score_fn(wrong, prompts)
    assert r.shape == w.shape == (len(prompts),)
    assert bool((r > w + margin).all()), f"right {r.tolist()} vs wrong {w.tolist()}"


def test_correct_clips_score_near_the_top_of_every_reward(world):
    specs, clips, _ = world
    prompts = clips.prompts
    assert {s.colour for s in specs} == set(COLOURS) and {s.shape for s in specs} == set(SHAPES)
    assert {s.direction for s in specs} == set(DIRECTIONS) and {s.background for s in specs} == set(BACKGROUNDS)
    for fn in (alignment_score, motion_score, quality_score):
        scores = fn(clips.frames, prompts)
        assert scores.dtype == torch.float32
        assert float(scores.min()) > 0.9, (fn.__name__, scores.tolist())
        assert float(scores.max()) <= 1.0


# ------------------------------------------------------------------ alignment
@pytest.mark.parametrize("attribute", ["colour", "shape", "direction", "perpendicular direction"])
def test_alignment_ranks_the_right_clip_above_a_wrong_attribute(world, attribute):
    specs, clips, _ = world
    if attribute == "colour":
        wrong = [replace(s, colour=_next(COLOURS, s.colour)) for s in specs]
    elif attribute == "shape":
        wrong = [replace(s, shape=_next(SHAPES, s.shape)) for s in specs]
    elif attribute == "direction":
        wrong = [replace(s, direction=_OPPOSITE[s.direction]) for s in specs]
    else:
        wrong = [replace(s, direction=_QUARTER_TURN[s.direction]) for s in specs]
    _assert_right_beats_wrong(alignment_score, clips.frames, _render(wrong), clips.prompts, margin=0.2)


def test_alignment_terms_single_out_the_wrong_attribute(world):
    specs, clips, _ = world
    wrong_colour = _render([replace(s, colour=_next(COLOURS, s.colour)) for s in specs])
    terms = alignment_terms(wrong_colour, clips.prompts)
    assert float(terms["colour"].max()) < 0.05
    assert float(terms["shape"].min()) > 0.8 and float(terms["direction"].min()) > 0.9


def test_alignment_of_a_still_clip_has_no_direction(world):
    _, clips, _ = world
    still = clips.frames[:, :1].expand_as(clips.frames)
    direction = alignment_terms(still, clips.prompts)["direction"]
    assert torch.allclose(direction, torch.full_like(direction, 0.25), atol=1e-3)   # chance over 4 directions


# ------------------------------------------------------------------ motion
def _jittery(clips, specs):
    gen = torch.Generator().manual_seed(1)
    centres = clips.centres + 1.2 * torch.randn(clips.centres.shape, generator=gen)
    return draw_clips(specs, centres, clips.sizes)


def _fragmented(clips, specs, backgrounds):
    # a background-coloured 2-pixel cut through the object, across its direction of travel
    out = clips.frames.clone()
    for b, spec in enumerate(specs):
        for f in range(out.shape[1]):
            cx, cy = clips.centres[b, f].round().long().tolist()
            if DIRECTIONS[spec.direction][0] != 0:
                out[b, f, :, :, cx - 1:cx + 1] = backgrounds[b, :, :, cx - 1:cx + 1]
            else:
                out[b, f, :, cy - 1:cy + 1, :] = backgrounds[b, :, cy - 1:cy + 1, :]
    return out


def _blinking(clips, backgrounds):
    out = clips.frames.clone()
    out[:, 1::2] = backgrounds.unsqueeze(1)
    return out


def _colour_flicker(clips, specs):
    flipped = render_clips([replace(s, colour=_next(COLOURS, s.colour)) for s in specs],
                           generator=torch.Generator().manual_seed(0)).frames
    out = clips.frames.clone()
    out[:, 1::2] = flipped[:, 1::2]
    return out


@pytest.mark.parametrize("kind", ["still", "blinking", "colour flicker", "jittery", "fragmented"])
def test_motion_ranks_the_right_clip_above_each_kind_of_bad_motion(world, kind):
    specs, clips, backgrounds = world
    wrong = {
        "still": lambda: clips.frames[:, :1].expand_as(clips.frames).clone(),
        "blinking": lambda: _blinking(clips, backgrounds),
        "colour flicker": lambda: _colour_flicker(clips, specs),
        "jittery": lambda: _jittery(clips, specs),
        "fragmented": lambda: _fragmented(clips, specs, backgrounds),
    }[kind]()
    _assert_right_beats_wrong(motion_score, clips.frames, wrong, clips.prompts, margin=0.3)


def test_still_and_blinking_clips_score_zero_motion(world):
    specs, clips, backgrounds = world
    still = clips.frames[:, :1].expand_as(clips.frames).clone()
    assert float(motion_score(still, clips.prompts).max()) == 0.0
    assert float(motion_terms(_blinking(clips, backgrounds), clips.prompts)["continuity"].max()) == 0.0


def test_motion_does_not_depend_on_which_direction_the_prompt_names(world):
    # direction is alignment's business: motion of a clip is the same under any prompt direction
    specs, clips, _ = world
    other = [replace(s, direction=_OPPOSITE[s.direction]).prompt for s in specs]
    assert torch.allclose(motion_score(clips.frames, clips.prompts), motion_score(clips.frames, other))


# ------------------------------------------------------------------ quality
def _noisy(clips):
    gen = torch.Generator().manual_seed(2)
    return (clips.frames + 0.08 * torch.randn(clips.frames.shape, generator=gen)).clamp(0, 1)


def _blurred(clips):
    frames = clips.frames.numpy()
    out = np.empty_like(frames)
    for b in range(frames.shape[0]):
        for f in range(frames.shape[1]):
            out[b, f] = cv2.GaussianBlur(frames[b, f].transpose(1, 2, 0), (0, 0), 1.2).transpose(2, 0, 1)
    return torch.from_numpy(out)


def _smeared(clips):
    # each frame blended with the two before it: a ghost trail behind the object
    out = clips.frames.clone()
    out[:, 2:] = (clips.frames[:, 2:] + clips.frames[:, 1:-1] + clips.frames[:, :-2]) / 3
    return out


def _stray_blobs(clips, specs):
    out = clips.frames.clone()
    for b, spec in enumerate(specs):
        colour = torch.tensor(COLOURS[spec.colour]).view(3, 1, 1)
        x = 4 if clips.centres[b, 0, 0] > 16 else 27
        y = 4 if clips.centres[b, 0, 1] > 16 else 27
        patch = out[b, :, :, y - 1:y + 2, x - 1:x + 2]
        out[b, :, :, y - 1:y + 2, x - 1:x + 2] = 0.6 * colour + 0.4 * patch
    return out


@pytest.mark.parametrize("kind", ["noise", "blur", "smear", "stray blobs"])
def test_quality_ranks_the_right_clip_above_each_kind_of_degradation(world, kind):
    specs, clips, _ = world
    wrong = {"noise": lambda: _noisy(clips), "blur": lambda: _blurred(clips), "smear": lambda: _smeared(clips),
             "stray blobs": lambda: _stray_blobs(clips, specs)}[kind]()
    margin = {"stray blobs": 0.01, "smear": 0.1}.get(kind, 0.2)
    _assert_right_beats_wrong(quality_score, clips.frames, wrong, clips.prompts, margin=margin)


def test_quality_terms_single_out_the_degradation(world):
    specs, clips, _ = world
    blurred = quality_terms(_blurred(clips), clips.prompts)
    plain = torch.tensor([s.background in ("white", "black", "gray") for s in specs])
    assert float(blurred["sharp"].max()) < 0.5
    # on a plain background blur only touches the object's rim (a blurred texture is dirt, rightly)
    assert float(blurred["clean"][plain].min()) > 0.9
    noisy = quality_terms(_noisy(clips), clips.prompts)
    assert float(noisy["flat"].max()) < 0.5 and float(noisy["clean"].max()) < 0.5


def _shimmering(clips, specs, backgrounds, *, moving: bool):
    """Grey specks in the corner farthest from the object's track: fixed in place (``moving=False``: a flaw of
    the background that every frame repeats) or redrawn in a new place every frame (``moving=True``)."""
    out = clips.frames.clone()
    gen = torch.Generator().manual_seed(3)
    h, w = out.shape[-2:]
    for b in range(len(specs)):
        cx, cy = clips.centres[b].mean(0).tolist()
        y0 = 0 if cy > h / 2 else h - 8
        x0 = 0 if cx > w / 2 else w - 8
        fixed = torch.randint(0, 8, (6, 2), generator=gen)
        for f in range(out.shape[1]):
            where = torch.randint(0, 8, (6, 2), generator=gen) if moving else fixed
            for dy, dx in where.tolist():
                out[b, f, :, y0 + dy, x0 + dx] = 0.5 + 0.4 * (1 - 2 * backgrounds[b, 0, y0 + dy, x0 + dx].round())
    return out


def test_quality_sees_a_background_that_changes_between_frames(world):
    specs, clips, backgrounds = world
    still = quality_terms(clips.frames, clips.prompts)["still"]
    assert float(still.min()) == 1.0                     # the world's backgrounds never move
    fixed = quality_terms(_shimmering(clips, specs, backgrounds, moving=False), clips.prompts)
    moving = quality_terms(_shimmering(clips, specs, backgrounds, moving=True), clips.prompts)
    # the same specks per frame cost `clean` alike; only `still` tells a shimmer from a fixed flaw
    assert torch.allclose(fixed["clean"], moving["clean"], atol=0.02)
    assert float(fixed["still"].min()) > 0.99
    assert float(moving["still"].max()) < 0.5
    assert bool((moving["quality"] < fixed["quality"] - 0.2).all())


def test_an_empty_clip_scores_zero_everywhere(world):
    _, clips, backgrounds = world
    empty = backgrounds.unsqueeze(1).expand_as(clips.frames).clone()
    for fn in (alignment_score, motion_score, quality_score):
        assert float(fn(empty, clips.prompts).max()) == 0.0


# ------------------------------------------------------------------ analysis, inputs, registry
def test_segmentation_recovers_the_drawn_track(world):
    specs, clips, _ = world
    analysis = analyse_clips(clips.frames, clips.prompts)
    assert bool(analysis.present.all())
    not_triangle = torch.tensor([s.shape != "triangle" for s in specs])
    # for squares and circles the centroid is the bounding-box centre the world drew
    err = (analysis.centroid - clips.centres)[not_triangle].abs().max()
    assert float(err) < 0.2
    palette = torch.tensor([COLOURS[s.colour] for s in specs])
    assert torch.allclose(analysis.colour, palette.unsqueeze(1).expand_as(analysis.colour), atol=1e-4)


def test_scores_do_not_depend_on_the_rest_of_the_batch(world):
    _, clips, _ = world
    batch = quality_score(clips.frames, clips.prompts)
    alone = torch.cat([quality_score(clips.frames[i:i + 1], clips.prompts[i:i + 1]) for i in range(3)])
    assert torch.allclose(batch[:3], alone)


def test_bad_inputs_are_rejected_with_the_argument_named(world):
    _, clips, _ = world
    frames, prompts = clips.frames[:2], clips.prompts[:2]
    with pytest.raises(ValueError, match="prompt"):
        alignment_score(frames, ["a red square", prompts[1]])
    with pytest.raises(ValueError, match="prompts"):
        motion_score(frames, prompts[:1])
    with pytest.raises(ValueError, match="frames"):
        quality_score(frames[:, :, :2], prompts)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        quality_score(frames * 2, prompts)
    with pytest.raises(ValueError, match="NaN"):
        quality_score(frames.clone().fill_(float("nan")), prompts)


def test_rewards_are_registered_with_their_roles_and_score_together(world):
    _, clips, _ = world
    registered = list_rewards()
    for role, name in REWARD_NAMES.items():
        assert registered[name] == (role, True)
    rewards = [build_reward(REWARD_NAMES[k]) for k in ("alignment", "motion", "quality")]
    scores = score_rewards(rewards, clips.frames[:4], clips.prompts[:4], step=0)
    assert scores.shape == (4, 3)
    assert torch.allclose(scores[:, 0], alignment_score(clips.frames[:4], clips.prompts[:4]))
    assert torch.allclose(scores[:, 2], quality_score(clips.frames[:4], clips.prompts[:4]))


@pytest.mark.parametrize("factor", [1.35, 1.6, 0.6])
def test_no_reward_pays_for_an_object_of_another_size(world, factor):
    """RL inflated the objects to twice the world's largest while every reward rose (the shapes exam's
    size verdict fell from 0.78 to 0.06): the per-object statistics of motion and quality all improve as an
    object grows. The scale factor makes an object outside the world's 9-12 px cost motion and quality,
    on clean clips and on flawed ones alike, and alignment does not pay for it either."""
    specs, clips, _ = world
    gen = torch.Generator().manual_seed(4)
    jitter = clips.centres + 0.6 * torch.randn(clips.centres.shape, generator=gen)
    for centres in (clips.centres, jitter):
        right = draw_clips(specs, centres, clips.sizes)
        other = draw_clips(specs, centres, clips.sizes * factor)
        for fn in (motion_score, quality_score):
            r, w = fn(right, clips.prompts), fn(other, clips.prompts)
            assert float(w.mean()) < 0.6 * float(r.mean()), (fn.__name__, factor, r.mean(), w.mean())
        r, w = alignment_score(right, clips.prompts), alignment_score(other, clips.prompts)
        assert float(w.mean()) <= float(r.mean()) + 0.02

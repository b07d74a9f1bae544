"""The shapes exam, calibrated: the world's own clips pass every verdict, and each kind of wrong clip
fails the verdict that judges it.

Pass rates are measured on 120 clips per case: every colour, shape, direction and background, random
sizes, speeds and positions. The bounds are the issue's: ≥ 0.97 for the world's clips, ≤ 0.05 for the
matching verdict of a wrong clip.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from otca_fast.rewards import build_reward, list_metrics, list_rewards, score_metrics
from otca_fast.toy import rewards as toy_rewards
from otca_fast.toy import world as shapes_world
from otca_fast.toy.exam import EXAM_NAME, VERDICTS, exam_verdicts, read_clips
from otca_fast.toy.world import BACKGROUNDS, COLOURS, DIRECTIONS, SHAPES, ClipSpec, render_clips

# the reverse of each prompted direction, and the direction a quarter turn from it (the world's unit vectors)
_OPPOSITE = {d: next(e for e, w in DIRECTIONS.items() if w == (-x, -y)) for d, (x, y) in DIRECTIONS.items()}
_PERPENDICULAR = {d: next(e for e, w in DIRECTIONS.items() if w == (-y, x)) for d, (x, y) in DIRECTIONS.items()}
_N = 120


def _next(values, value, k=1):
    values = list(values)
    return values[(values.index(value) + k) % len(values)]


@pytest.fixture(scope="module")
def world():
    colours, directions = list(COLOURS), list(DIRECTIONS)
    specs = [ClipSpec(colours[i % 4], SHAPES[i % 3], directions[(i // 3) % 4], BACKGROUNDS[(i // 12) % 5])
             for i in range(_N)]
    clips = render_clips(specs, generator=torch.Generator().manual_seed(11))
    backgrounds = torch.stack([shapes_world.background_image(s.background, 32, 32) for s in specs])
    return specs, clips, backgrounds


def _rates(frames, prompts) -> dict[str, float]:
    return {k: float(v.mean()) for k, v in exam_verdicts(frames, prompts).items()}


def _rerender(specs, seed=11):
    # the same seed draws the same sizes, speeds and jitter: only the changed attribute differs
    return render_clips(specs, generator=torch.Generator().manual_seed(seed)).frames


def test_the_worlds_own_clips_pass_every_verdict(world):
    specs, clips, _ = world
    rates = _rates(clips.frames, clips.prompts)
    assert set(rates) == {*VERDICTS, "all_correct"}
    assert all(rate >= 0.97 for rate in rates.values()), rates


def test_fresh_world_clips_of_every_split_pass(world):
    from otca_fast.toy.world import sample_clips

    clips = sample_clips(200, split="all", generator=torch.Generator().manual_seed(5))
    assert _rates(clips.frames, clips.prompts)["all_correct"] >= 0.97


def _two_objects(clips, specs):
    # a second copy of the object, moving the same way, displaced to the other side of the frame
    shift = torch.where(clips.centres[:, :1] > 16, -12.0, 12.0)
    second = shapes_world.draw_clips(specs, clips.centres + shift, clips.sizes)
    return _overlay(clips.frames, second, specs)


def _overlay(frames, other, specs):
    background = torch.stack([shapes_world.background_image(s.background, 32, 32) for s in specs]).unsqueeze(1)
    extra = (other - background).abs().amax(2, keepdim=True) > 1e-6
    return torch.where(extra, other, frames)


def _specks(frames, specs, per_frame=6, seed=3):
    out = frames.clone()
    gen = torch.Generator().manual_seed(seed)
    b, f, _, h, w = frames.shape
    for i in range(b):
        for j in range(f):
            ys = torch.randint(0, h, (per_frame,), generator=gen)
            xs = torch.randint(0, w, (per_frame,), generator=gen)
            out[i, j, :, ys, xs] = torch.rand(3, per_frame, generator=gen)
    return out


def _wrong(kind, specs, clips, backgrounds):
    frames = clips.frames
    if kind == "colour":
        return _rerender([replace(s, colour=_next(COLOURS, s.colour)) for s in specs]), "colour"
    if kind == "shape":
        return _rerender([replace(s, shape=_next(SHAPES, s.shape)) for s in specs]), "shape"
    if kind == "shape (the other one)":
        return _rerender([replace(s, shape=_next(SHAPES, s.shape, 2)) for s in specs]), "shape"
    if kind == "opposite direction":
        return _rerender([replace(s, direction=_OPPOSITE[s.direction]) for s in specs]), "direction"
    if kind == "perpendicular direction":
        return _rerender([replace(s, direction=_PERPENDICULAR[s.direction]) for s in specs]), "direction"
    if kind == "background":
        return _rerender([replace(s, background=_next(BACKGROUNDS, s.background)) for s in specs]), "background"
    if kind == "background (another)":
        return _rerender([replace(s, background=_next(BACKGROUNDS, s.background, 3)) for s in specs]), "background"
    if kind == "still":
        return frames[:, 4:5].expand_as(frames).clone(), "direction"
    if kind == "blinking":
        out = frames.clone()
        out[:, 1::3] = backgrounds.unsqueeze(1)
        return out, "object"
    if kind == "vanishing":
        out = frames.clone()
        out[:, -2:] = backgrounds.unsqueeze(1)
        return out, "object"
    if kind == "two objects":
        return _two_objects(clips, specs), "object"
    if kind == "noise":
        gen = torch.Generator().manual_seed(2)
        return (frames + 0.08 * torch.randn(frames.shape, generator=gen)).clamp(0, 1), "clean"
    if kind == "specks":
        return _specks(frames, specs), "clean"
    if kind == "inflated":  # sides 14.5 to 17 px: over 20 % larger than any object of the world (9 to 12)
        return shapes_world.draw_clips(specs, clips.centres, 14.5 + (clips.sizes - 9) * 2.5 / 3), "size"
    if kind == "shrunk":  # sides 4.5 to 6 px
        return shapes_world.draw_clips(specs, clips.centres, 4.5 + (clips.sizes - 9) / 2), "size"
    raise AssertionError(kind)


KINDS = ["colour", "shape", "shape (the other one)", "opposite direction", "perpendicular direction", "background",
         "background (another)", "still", "blinking", "vanishing", "two objects", "noise", "specks", "inflated",
         "shrunk"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_of_wrong_clip_fails_its_verdict(world, kind):
    specs, clips, backgrounds = world
    frames, verdict = _wrong(kind, specs, clips, backgrounds)
    rates = _rates(frames, clips.prompts)
    assert rates[verdict] <= 0.05, (kind, rates)
    assert rates["all_correct"] <= 0.05, (kind, rates)


def test_a_wrong_clip_fails_only_what_is_wrong_with_it(world):
    # the verdicts judge different things: a wrong colour leaves shape, direction, size and the rest intact
    specs, clips, backgrounds = world
    frames, _ = _wrong("colour", specs, clips, backgrounds)
    rates = _rates(frames, clips.prompts)
    assert all(rates[v] >= 0.97 for v in VERDICTS if v != "colour"), rates
    frames, _ = _wrong("specks", specs, clips, backgrounds)
    rates = _rates(frames, clips.prompts)
    assert all(rates[v] >= 0.97 for v in ("background", "colour", "shape", "direction", "size")), rates


def test_an_empty_clip_fails_every_verdict_about_the_object(world):
    specs, clips, backgrounds = world
    empty = backgrounds.unsqueeze(1).expand_as(clips.frames).clone()
    rates = _rates(empty, clips.prompts)
    assert rates["background"] == 1.0 and rates["clean"] == 1.0
    assert all(rates[v] == 0.0 for v in ("object", "colour", "shape", "direction", "size", "all_correct"))


def test_the_reading_recovers_the_drawn_track_and_size(world):
    specs, clips, _ = world
    reading = read_clips(clips.frames, clips.prompts)
    assert bool(reading.present.all())
    square_or_circle = torch.tensor([s.shape != "triangle" for s in specs])
    assert float((reading.centroid - clips.centres)[square_or_circle].abs().max()) < 0.2
    side = reading.side.median(1).values
    assert float((side - clips.sizes)[square_or_circle].abs().max()) < 0.6


def test_verdicts_do_not_depend_on_the_rest_of_the_batch(world):
    _, clips, _ = world
    batch = exam_verdicts(clips.frames[:6], clips.prompts[:6])
    alone = [exam_verdicts(clips.frames[i:i + 1], clips.prompts[i:i + 1]) for i in range(6)]
    for key, value in batch.items():
        assert torch.equal(value, torch.cat([a[key] for a in alone]))


def test_the_exam_shares_no_code_with_the_rewards():
    # the exam imports the world's definition and the registry's input check, never a reward's scoring
    import ast
    import inspect

    from otca_fast.toy import exam

    imported = {}
    for node in ast.walk(ast.parse(inspect.getsource(exam))):
        if isinstance(node, ast.ImportFrom):
            imported[node.module] = {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            imported.update({alias.name: set() for alias in node.names})
    otca = {module: names for module, names in imported.items() if module.startswith("otca_fast")}
    assert set(otca) == {"otca_fast.rewards.registry", "otca_fast.toy.world"}, otca
    assert otca["otca_fast.rewards.registry"] == {"check_frames", "register_metric"}
    reward_code = {name for name, value in vars(toy_rewards).items() if inspect.isfunction(value)
                   and value.__module__ == toy_rewards.__name__}
    assert not reward_code & otca["otca_fast.toy.world"]
    rewards_imports = {node.module for node in ast.walk(ast.parse(inspect.getsource(toy_rewards)))
                       if isinstance(node, ast.ImportFrom)}
    assert exam.__name__ not in rewards_imports


def test_the_exam_is_an_eval_only_metric_with_every_verdict_as_a_part(world):
    _, clips, _ = world
    assert EXAM_NAME in list_metrics() and EXAM_NAME not in list_rewards()
    metric = build_reward(EXAM_NAME)
    assert metric.eval_only and metric.headline == "all_correct"
    scores = score_metrics([metric], clips.frames[:8], clips.prompts[:8], step=0)
    assert set(scores) == {EXAM_NAME} | {f"{EXAM_NAME}/{v}" for v in (*VERDICTS, "all_correct")}
    assert torch.equal(scores[EXAM_NAME], scores[f"{EXAM_NAME}/all_correct"])
    assert scores[EXAM_NAME].shape == (8,)


def test_bad_inputs_are_rejected_with_the_argument_named(world):
    _, clips, _ = world
    frames, prompts = clips.frames[:2], clips.prompts[:2]
    with pytest.raises(ValueError, match="prompt"):
        exam_verdicts(frames, ["a red square", prompts[1]])
    with pytest.raises(ValueError, match="frames"):
        exam_verdicts(frames[:, :, :2], prompts)
    with pytest.raises(ValueError, match="NaN"):
        exam_verdicts(frames.clone().fill_(float("nan")), prompts)

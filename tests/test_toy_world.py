"""The shapes world: deterministic clips, a grammar that parses back, a compositional split."""

from __future__ import annotations

import itertools

import pytest
import torch

from otca_fast.toy.text import build_tokenizer, load_tokenizer, tokenize
from otca_fast.toy.world import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    SHAPES,
    ClipSpec,
    WorldConfig,
    all_specs,
    background_image,
    draw_clips,
    is_heldout,
    make_prompt,
    parse_prompt,
    render_clips,
    sample_clips,
    split_specs,
)


def test_render_is_deterministic_given_the_seed():
    a = sample_clips(6, generator=torch.Generator().manual_seed(7))
    b = sample_clips(6, generator=torch.Generator().manual_seed(7))
    c = sample_clips(6, generator=torch.Generator().manual_seed(8))
    assert a.prompts == b.prompts
    assert torch.equal(a.frames, b.frames)
    assert not torch.equal(a.frames, c.frames)
    assert a.frames.shape == (6, 9, 3, 32, 32) and a.frames.dtype == torch.float32
    assert float(a.frames.min()) >= 0.0 and float(a.frames.max()) <= 1.0


def test_every_prompt_parses_back_to_its_attributes():
    specs = all_specs()
    assert len(specs) == len(COLOURS) * len(SHAPES) * len(DIRECTIONS) * len(BACKGROUNDS) == 240
    assert len({make_prompt(s) for s in specs}) == len(specs)
    for spec in specs:
        assert parse_prompt(make_prompt(spec)) == spec
    want = ClipSpec("red", "square", "left", "gray")
    assert parse_prompt("  A Red SQUARE moving left on a grey background. ") == want


@pytest.mark.parametrize("bad", [
    "a red hexagon moving left on a white background",       # unknown shape
    "a purple square moving left on a white background",     # unknown colour
    "a red square moving sideways on a white background",    # unknown direction
    "a red square on a white background",                    # not the grammar
    "",
])
def test_unparseable_prompts_are_rejected_with_the_prompt_named(bad):
    with pytest.raises(ValueError, match="prompt"):
        parse_prompt(bad)


def test_parse_prompt_rejects_non_strings():
    with pytest.raises(TypeError, match="prompt"):
        parse_prompt(3)  # type: ignore[arg-type]


def test_split_is_fixed_disjoint_and_compositional():
    train, held = split_specs("train"), split_specs("heldout")
    assert len(train) == 192 and len(held) == 48
    assert set(train).isdisjoint(held) and set(train) | set(held) == set(all_specs())
    assert all(is_heldout(s) for s in held) and not any(is_heldout(s) for s in train)
    # every attribute value and every pair of values of two attributes occurs in training, so the
    # held-out prompts are new *combinations* of known words
    fields = ("colour", "shape", "direction", "background")
    for f1, f2 in itertools.combinations(fields, 2):
        seen = {(getattr(s, f1), getattr(s, f2)) for s in train}
        wanted = {(getattr(s, f1), getattr(s, f2)) for s in all_specs()}
        assert seen == wanted, (f1, f2)
    with pytest.raises(ValueError, match="split"):
        split_specs("validation")


def test_sample_clips_draws_only_from_the_requested_split():
    held = set(split_specs("heldout"))
    clips = sample_clips(40, split="heldout", generator=torch.Generator().manual_seed(0))
    assert set(clips.specs) <= held
    clips = sample_clips(40, split="train", generator=torch.Generator().manual_seed(0))
    assert not set(clips.specs) & held


def test_clips_show_the_prompted_object_moving_in_the_prompted_direction():
    specs = [ClipSpec(c, s, d, b) for c, s, d, b in zip(COLOURS, SHAPES * 2, DIRECTIONS, BACKGROUNDS)]
    clips = render_clips(specs, generator=torch.Generator().manual_seed(3))
    for i, spec in enumerate(specs):
        frames = clips.frames[i]
        bg = background_image(spec.background, 32, 32)
        # the object stays inside the frame: the 1-pixel border is pure background in every frame
        border = torch.ones(32, 32, dtype=torch.bool)
        border[1:-1, 1:-1] = False
        assert torch.allclose(frames[:, :, border], bg[:, border].expand(9, -1, -1))
        # fully covered pixels have exactly the palette colour
        alpha = (frames - bg).abs().amax(1) > 0.39
        colour = torch.tensor(COLOURS[spec.colour])
        core = frames.permute(0, 2, 3, 1)[alpha]
        assert (core - colour).abs().amin(0).max() < 1e-5
        # the track is a straight line at the drawn speed in the prompted direction
        step = clips.centres[i, 1:] - clips.centres[i, :-1]
        want = torch.tensor(DIRECTIONS[spec.direction]) * clips.speeds[i]
        assert torch.allclose(step, want.expand_as(step), atol=1e-5)
        assert 1.0 <= float(clips.speeds[i]) <= 1.75


def test_tracks_are_centred_within_the_placement_jitter():
    clips = sample_clips(64, generator=torch.Generator().manual_seed(4))
    midpoint = (clips.centres[:, 0] + clips.centres[:, -1]) / 2
    assert float((midpoint - 16).abs().max()) <= WorldConfig().position_jitter + 1e-5
    assert float(midpoint.std(0).min()) > 0.5                     # the jitter is used, positions vary
    wide = sample_clips(64, generator=torch.Generator().manual_seed(4), config=WorldConfig(position_jitter=30.0))
    assert float(((wide.centres[:, 0] + wide.centres[:, -1]) / 2 - 16).abs().max()) > 4.0
    with pytest.raises(ValueError, match="position_jitter"):
        WorldConfig(position_jitter=-1.0)


def test_draw_clips_places_a_still_object_identically_in_every_frame():
    spec = ClipSpec("blue", "circle", "left", "checkered")
    frames = draw_clips([spec], torch.full((1, 4, 2), 16.0), torch.tensor([10.0]))
    assert frames.shape == (1, 4, 3, 32, 32)
    assert torch.equal(frames[0, 0], frames[0, 3])
    with pytest.raises(ValueError, match="centres"):
        draw_clips([spec], torch.zeros(1, 4), torch.tensor([10.0]))


def test_textured_backgrounds_are_patterns_of_two_levels():
    checkered, striped = background_image("checkered", 32, 32), background_image("striped", 32, 32)
    for image in (checkered, striped):
        assert torch.equal(image.unique(), torch.tensor([0.3, 0.7]))
        assert image.eq(0.7).float().mean() == 0.5
    assert not torch.equal(checkered, striped)
    assert torch.equal(striped[:, :, 0], striped[:, :, 17])       # horizontal stripes
    assert torch.equal(background_image("white", 4, 4), torch.ones(3, 4, 4))
    with pytest.raises(ValueError, match="background"):
        background_image("dotted", 4, 4)


def test_world_config_rejects_geometry_that_leaves_the_frame():
    with pytest.raises(ValueError, match="frame"):
        WorldConfig(height=16, width=16)
    with pytest.raises(ValueError, match="frames"):
        WorldConfig(frames=1)
    with pytest.raises(ValueError, match="ClipSpec.shape"):
        ClipSpec("red", "star", "left", "white")
    with pytest.raises(TypeError, match="specs"):
        render_clips(["a red square moving left on a white background"])  # type: ignore[list-item]


def test_tokenizer_gives_one_token_per_grammar_word_and_encodes_anything():
    tokenizer = build_tokenizer()
    # the shipped tokenizer.json is this tokenizer: rebuilding it must give the same vocabulary
    assert load_tokenizer(tokenizer.to_str()).get_vocab() == tokenizer.get_vocab()
    ids, mask = tokenize(tokenizer, ["a red square moving left on a white background", ""], 16)
    assert mask[0].sum() == 10 and mask[1].sum() == 1            # 9 words + </s>; the empty prompt = </s>
    assert ids[0, 9] == ids[1, 0] == tokenizer.token_to_id("</s>")
    upper, _ = tokenize(tokenizer, ["A RED SQUARE moving left on a white background"], 16)
    assert torch.equal(upper[0], ids[0])
    long_ids, long_mask = tokenize(tokenizer, ["a hexagonal prism drifting " * 5], 8)
    assert long_mask.sum() == 8 and long_ids[0, -1] == tokenizer.token_to_id("</s>")

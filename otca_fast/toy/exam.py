"""The shapes exam: hard yes/no verdicts on each clip, read from the pixels, that no trainer optimises.

The three world rewards (``otca_fast.toy.rewards``) are smooth scores a policy can climb, and it can
climb them the wrong way (bigger blobs, damaged backgrounds). The exam is the judge a person would be:
per clip, does it show what the prompt asks for? It is an *eval-only metric* (``eval.metrics:`` in a
config; a config that lists it under ``rewards:`` is refused), and it is written apart from the rewards
on purpose: it neither calls them nor shares their scoring code, so a flaw in one is not copied into the
other. It takes only the world's definition (``otca_fast.toy.world``: the grammar, palette, shapes,
directions and the exact background a prompt names).

How it sees a clip (different in kind from the rewards' background subtraction):

* **Object by colour, not by difference.** Every background of the world is gray (R = G = B) and every
  palette colour is far from the gray axis (≥ 0.45). A pixel's *chroma* is its component off the gray
  axis, P(x) = x − mean(x)·(1, 1, 1). Mixing an object colour c with any gray in proportions α : 1 − α
  gives P = α·P(c), so the object's coverage is α = ⟨P(x), P(c)⟩ / |P(c)|², whatever the background.
  c is the median colour of a frame's clearly chromatic pixels. The object mask is α > 0.5; its
  8-connected components come from label propagation (iterated 3×3 max-pooling).
* **Shape by geometry.** Soft width and height are sums of the per-column and per-row maxima of α (the
  side of a square, the diameter of a circle, the base and height of a triangle); the fill
  Σα / (width·height) is 1 for a square, π/4 for a circle and 1/2 for a triangle, and a triangle with its
  apex up has its mass low (vertical skewness −0.57, against 0 for the other two).
* **Background by temporal median.** Each pixel's median over the frames where the object is not on it
  (mask dilated by 2 px) estimates the clip's background; it is compared with the prompt's.

Verdicts (each ``[B]`` float, 1 = pass), at the world's 32 px scale (distances in pixels scale with the
frame):

================  ==========================================================================================
``background``    plain: ≥ 90 % of the estimated background within 0.15 (every channel) of the prompt's level;
                  textured: its pattern correlates ≥ 0.6 with the prompt's in some phase, at its mean level
                  within 0.1
``object``        every frame holds an object of ≥ 12 px, and no second one (a component ≥ 10 px or ≥ 25 %
                  of the largest)
``colour``        the object's interior colour is nearest the prompted palette colour, within 0.3, in
                  ≥ 80 % of the frames that hold it
``shape``         the frame's shape reads as the prompted one in ≥ 2/3 of all frames
``direction``     the least-squares centroid track moves ≥ 3 px along the prompted direction, and more along
                  it than across it
``size``          the object's side (its larger soft extent, median over frames) is 7 to 14 px (the world's:
                  9 to 12)
``clean``         in every frame, outside the object, the pixels deviate from the estimated background by
                  at most 0.04 RMS, with at most 2 specks (pixels off by more than 0.2)
``all_correct``   every verdict above passes
================  ==========================================================================================

Calibration (``tests/test_toy_exam.py``): the world's own clips pass every verdict (≥ 0.97), and each
kind of wrong clip (wrong colour, shape, direction or background; still, blinking, two objects, noise,
specks, inflated) fails its verdict (pass rate ≤ 0.05).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from otca_fast.rewards.registry import check_frames, register_metric
from otca_fast.toy.world import COLOURS, DIRECTIONS, PLAIN_BACKGROUNDS, background_image, parse_prompt

__all__ = ["VERDICTS", "EXAM_NAME", "ClipReading", "read_clips", "exam_verdicts", "shapes_exam"]

EXAM_NAME = "shapes_exam"
VERDICTS: tuple[str, ...] = ("background", "object", "colour", "shape", "direction", "size", "clean")

# thresholds at the world's 32 px scale (pixel counts scale with the frame's area, lengths with its side)
_CHROMA_SEED = 0.2          # a pixel this far off the gray axis surely belongs to an object
_MASK_ALPHA = 0.5
_MIN_OBJECT_PX = 12.0
_SECOND_OBJECT_PX = 10.0
_SECOND_OBJECT_SHARE = 0.25
_COLOUR_DISTANCE = 0.3
_COLOUR_SHARE = 0.8
_SHAPE_SHARE = 2 / 3
_MIN_TRAVEL_PX = 3.0
_SIDE_RANGE_PX = (7.0, 14.0)
_BACKGROUND_TOLERANCE = 0.15
_BACKGROUND_SHARE = 0.9
_TEXTURE_CORRELATION = 0.6
_TEXTURE_LEVEL = 0.1
_TEXTURE_PERIOD = 8         # the world's textures repeat every 8 px (4 px checker cells; stripes every 4 px)
_BACKGROUND_MIN_FRAMES = 3
_CLEAN_RMS = 0.04
_SPECK_LEVEL = 0.2
_MAX_SPECKS_PX = 2.0
_OBJECT_MARGIN_PX = 2

_PALETTE = torch.tensor(list(COLOURS.values()))      # [K, 3]
_UNITS = torch.tensor(list(DIRECTIONS.values()))     # [4, 2] (x right, y down)


def _chroma(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Component off the gray axis: x − mean over the colour channels."""
    return x - x.mean(dim, keepdim=True)


def _components(mask: torch.Tensor) -> torch.Tensor:
    """8-connected components of ``mask`` ``[N, H, W]``: each pixel labelled with its component's largest
    flat index + 1 (0 off the mask), by propagating the maximum through 3×3 neighbourhoods until stable."""
    n, h, w = mask.shape
    index = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, h, w)
    labels = torch.where(mask, index, torch.zeros(()))
    keep = mask.float().unsqueeze(1)
    labels = labels.unsqueeze(1)
    while True:
        grown = F.max_pool2d(labels, 3, 1, 1) * keep
        if torch.equal(grown, labels):
            return labels.squeeze(1).long()
        labels = grown


class ClipReading:
    """What the exam reads off a batch of clips ``[B, F, 3, H, W]``, per frame (see the module docstring)."""

    def __init__(self, frames: torch.Tensor, prompts: Sequence[str]) -> None:
        prompts = check_frames(frames, prompts)
        if not bool(torch.isfinite(frames).all()):
            raise ValueError("frames: contains NaN or Inf")
        self.specs = [parse_prompt(p) for p in prompts]
        frames = frames.detach().to("cpu", torch.float32).clamp(0, 1)
        b, f, _, h, w = frames.shape
        self.frames = frames
        self.scale = min(h, w) / 32.0
        self.expected_background = torch.stack([background_image(s.background, h, w) for s in self.specs])

        # object colour per frame: median of the clearly chromatic pixels; coverage α by projection
        chroma = _chroma(frames, 2)                                            # [B, F, 3, H, W]
        seed = chroma.norm(dim=2) > _CHROMA_SEED                               # [B, F, H, W]
        flat = frames.permute(0, 1, 3, 4, 2).reshape(b * f, h * w, 3)
        seed_flat = seed.reshape(b * f, h * w)
        colour = torch.zeros(b * f, 3)
        for i in torch.nonzero(seed_flat.any(1)).flatten().tolist():
            colour[i] = flat[i][seed_flat[i]].median(0).values
        colour = colour.view(b, f, 3)
        has_colour = seed.flatten(2).any(2)                                    # [B, F]
        direction = _chroma(colour, -1)                                        # [B, F, 3]
        norm2 = direction.square().sum(-1).clamp_min(1e-6)
        alpha = (chroma * direction[..., None, None]).sum(2) / norm2[..., None, None]
        alpha = (alpha.clamp(0, 1) * has_colour[..., None, None]).view(b * f, h, w)

        # components of the mask; the object is the one with the most coverage
        labels = _components(alpha > _MASK_ALPHA).flatten(1)                   # [BF, HW], 0 = off the mask
        pixels = torch.zeros(b * f, h * w + 1).scatter_add_(1, labels, torch.ones_like(alpha.flatten(1)))
        mass = torch.zeros(b * f, h * w + 1).scatter_add_(1, labels, alpha.flatten(1))
        pixels[:, 0], mass[:, 0] = 0.0, -1.0
        main = mass.argmax(1)                                                  # the object's label
        main_px = pixels.gather(1, main[:, None]).squeeze(1)
        present = main_px >= _MIN_OBJECT_PX * self.scale**2
        second = pixels.scatter(1, main[:, None], 0.0).amax(1)
        self.second_object = present & (second >= torch.minimum(
            torch.full_like(second, _SECOND_OBJECT_PX * self.scale**2), _SECOND_OBJECT_SHARE * main_px))
        component = (labels.view(b * f, h, w) == main[:, None, None]) & present[:, None, None]
        # the object's region: its component grown by 1 px (the anti-aliased rim has α < 0.5)
        region = F.max_pool2d(component.float().unsqueeze(1), 3, 1, 1).squeeze(1)
        weight = alpha * region                                                # [BF, H, W]
        self.present = present.view(b, f)
        self.alpha = weight.view(b, f, h, w)
        self.mass = weight.sum((1, 2)).view(b, f)

        # geometry: soft extents, fill, vertical skewness, centroid
        width = weight.amax(1).sum(1)                                          # Σ over columns of max α
        height = weight.amax(2).sum(1)
        self.side = torch.maximum(width, height).view(b, f)
        self.fill = (weight.sum((1, 2)) / (width * height).clamp_min(1e-6)).view(b, f)
        ys = torch.arange(h, dtype=torch.float32).view(1, h, 1) + 0.5
        xs = torch.arange(w, dtype=torch.float32).view(1, 1, w) + 0.5
        total = weight.sum((1, 2)).clamp_min(1e-6)
        cy = (weight * ys).sum((1, 2)) / total
        cx = (weight * xs).sum((1, 2)) / total
        dy = ys - cy.view(-1, 1, 1)
        var_y = (weight * dy.square()).sum((1, 2)) / total
        self.skew_y = ((weight * dy.pow(3)).sum((1, 2)) / total / var_y.clamp_min(1e-6).pow(1.5)).view(b, f)
        self.centroid = torch.stack([cx, cy], -1).view(b, f, 2)

        # interior colour (α ≥ 0.9), falling back to the seed median on thin objects
        interior = (weight >= 0.9).view(b, f, 1, h, w)
        n_interior = interior.sum((-1, -2))
        mean_interior = (frames * interior).sum((-1, -2)) / n_interior.clamp_min(1)
        self.colour = torch.where(n_interior > 0, mean_interior, colour)        # [B, F, 3]

        # the clip's own background: per-pixel median over the frames the object (grown 2 px) is not on
        margin = 2 * _OBJECT_MARGIN_PX + 1
        anything = (alpha > _MASK_ALPHA).float().unsqueeze(1)
        covered = F.max_pool2d(anything, margin, 1, _OBJECT_MARGIN_PX).squeeze(1).bool().view(b, f, h, w)
        self.outside = ~covered
        values = frames.masked_fill(covered.unsqueeze(2), float("nan"))
        self.background = values.nanmedian(1).values                           # [B, 3, H, W]
        self.background_frames = self.outside.sum(1)                           # [B, H, W]

    # ------------------------------------------------------------------ per-frame readings
    def shape_names(self) -> list[list[str | None]]:
        """The shape each frame reads as (None: no object, or no shape of the world)."""
        out = []
        for fill_row, skew_row, present_row in zip(self.fill.tolist(), self.skew_y.tolist(), self.present.tolist()):
            row = []
            for fill, skew, present in zip(fill_row, skew_row, present_row):
                row.append(_classify_shape(fill, skew) if present else None)
            out.append(row)
        return out


def _classify_shape(fill: float, skew_y: float) -> str | None:
    # square: fill 1, circle: π/4 = 0.785, triangle (apex up): 1/2 with its mass low (skewness −0.57)
    if fill < 0.7 and skew_y < -0.25:
        return "triangle"
    if abs(skew_y) < 0.25:
        if fill >= 0.9:
            return "square"
        if 0.7 <= fill < 0.9:
            return "circle"
    return None


def read_clips(frames: torch.Tensor, prompts: Sequence[str]) -> ClipReading:
    """The exam's reading of ``frames`` ``[B, F, 3, H, W]`` in [0, 1] under ``prompts``."""
    return ClipReading(frames, prompts)


def exam_verdicts(frames: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Hard verdicts per clip: ``{verdict: [B] float (1 = pass)}`` for :data:`VERDICTS` and ``all_correct``."""
    r = read_clips(frames, prompts)
    b, f = r.present.shape
    present = r.present
    n_present = present.sum(1)

    obj = present.all(1) & ~r.second_object.view(b, f).any(1)

    distance = (r.colour.unsqueeze(2) - _PALETTE.view(1, 1, -1, 3)).norm(dim=-1)   # [B, F, K]
    target_colour = torch.tensor([list(COLOURS).index(s.colour) for s in r.specs])
    nearest = distance.argmin(-1)
    to_target = distance.gather(-1, target_colour.view(b, 1, 1).expand(b, f, 1)).squeeze(-1)
    colour_ok = (nearest == target_colour.view(b, 1)) & (to_target <= _COLOUR_DISTANCE) & present
    colour = (n_present > 0) & (colour_ok.sum(1) >= _COLOUR_SHARE * n_present)

    names = r.shape_names()
    shape_ok = torch.tensor([[name == spec.shape for name in row] for row, spec in zip(names, r.specs)])
    shape = shape_ok.sum(1) >= _SHAPE_SHARE * f

    direction = _moves_as_prompted(r)

    side = r.side.masked_fill(~present, float("nan")).nanmedian(1).values
    lo, hi = (v * r.scale for v in _SIDE_RANGE_PX)
    size = (n_present > 0) & (side >= lo) & (side <= hi)

    background = _background_matches(r)
    clean = _clean(r)

    verdicts = {"background": background, "object": obj, "colour": colour, "shape": shape,
                "direction": direction, "size": size, "clean": clean}
    passed = torch.stack([verdicts[v] for v in VERDICTS]).all(0)
    out = {name: value.float() for name, value in verdicts.items()}
    out["all_correct"] = passed.float()
    return out


def _moves_as_prompted(r: ClipReading) -> torch.Tensor:
    """Least-squares displacement of the centroid over the frames holding the object, against the prompt."""
    b, f = r.present.shape
    weight = r.present.float()
    t = torch.arange(f, dtype=torch.float32).expand(b, f)
    n = weight.sum(1).clamp_min(1)
    t_mean = (weight * t).sum(1) / n
    c_mean = (weight.unsqueeze(-1) * r.centroid).sum(1) / n.unsqueeze(-1)
    dt = (t - t_mean.unsqueeze(1)) * weight
    slope = (dt.unsqueeze(-1) * (r.centroid - c_mean.unsqueeze(1))).sum(1) / (dt * dt).sum(1).clamp_min(1e-6)[:, None]
    displacement = slope * (f - 1)                                              # px over the clip
    unit = torch.stack([_UNITS[list(DIRECTIONS).index(s.direction)] for s in r.specs])
    along = (displacement * unit).sum(-1)
    across = (displacement[:, 0] * unit[:, 1] - displacement[:, 1] * unit[:, 0]).abs()
    return (weight.sum(1) >= 2) & (along >= _MIN_TRAVEL_PX * r.scale) & (across <= along)


def _background_matches(r: ClipReading) -> torch.Tensor:
    """Plain backgrounds: most pixels within 0.15 of the prompt's level. Textures: the same pattern, in any
    phase (the best normalised cross-correlation with a translation of the prompt's texture) at the same
    mean level. A texture is judged by its pattern because soft edges between its cells (every pixel on a
    cell edge off by ~0.2) and a shifted phase are still the prompted texture to a person, while each wrong
    cell lowers the correlation (20 % of the cells flipped: 0.6) and any other background of the world
    correlates at most 0 (stripes against checks, a plain gray)."""
    seen = r.background_frames >= _BACKGROUND_MIN_FRAMES                        # [B, H, W]
    enough = seen.flatten(1).float().mean(1) >= 0.5
    off = (r.background - r.expected_background).abs().amax(1)                  # NaN where never seen
    share = ((off <= _BACKGROUND_TOLERANCE) & seen).flatten(1).sum(1) / seen.flatten(1).sum(1).clamp_min(1)
    plain = share >= _BACKGROUND_SHARE
    weight = seen.flatten(1).float()
    n = weight.sum(1).clamp_min(1)
    got = r.background.nan_to_num(0.0).mean(1).flatten(1)
    got_mean = (got * weight).sum(1) / n
    dg = (got - got_mean[:, None]) * weight
    correlation = torch.full_like(got_mean, -1.0)
    level = torch.zeros_like(got_mean)
    h, w = r.expected_background.shape[-2:]
    # any phase of the texture is the texture: the best correlation over the translations of one period
    for dy, dx in itertools.product(range(min(h, _TEXTURE_PERIOD)), range(min(w, _TEXTURE_PERIOD))):
        want = r.expected_background.mean(1).roll((dy, dx), (-2, -1)).flatten(1)
        want_mean = (want * weight).sum(1) / n
        dw = (want - want_mean[:, None]) * weight
        c = (dg * dw).sum(1) / ((dg.square().sum(1) * dw.square().sum(1)).sqrt().clamp_min(1e-6))
        better = c > correlation
        correlation, level = torch.where(better, c, correlation), torch.where(better, want_mean, level)
    texture = (correlation >= _TEXTURE_CORRELATION) & ((got_mean - level).abs() <= _TEXTURE_LEVEL)
    textured = torch.tensor([s.background not in PLAIN_BACKGROUNDS for s in r.specs])
    return enough & torch.where(textured, texture, plain)


def _clean(r: ClipReading) -> torch.Tensor:
    residual = (r.frames - r.background.unsqueeze(1)).nan_to_num(0.0)          # [B, F, 3, H, W]
    outside = r.outside.unsqueeze(2).float()
    count = outside.sum((2, 3, 4)).clamp_min(1)
    rms = ((residual.square() * outside).sum((2, 3, 4)) / count).sqrt()        # [B, F]
    specks = ((residual.abs().amax(2) > _SPECK_LEVEL) & r.outside).sum((-1, -2))
    frame_clean = (rms <= _CLEAN_RMS) & (specks <= _MAX_SPECKS_PX * r.scale**2)
    return frame_clean.all(1)


@register_metric(EXAM_NAME, headline="all_correct")
def shapes_exam():
    """Hard per-clip verdicts of the shapes world (eval only): background, object, colour, shape,
    direction, size, clean and all_correct."""
    return exam_verdicts

"""Three rewards of the shapes world, computed from the pixels alone (no weights, no sampler internals).

Every reward first *segments* each frame against the background the prompt names (the world's
backgrounds are exact, so background subtraction is reliable):

1. ``d = max_c |frame − background|``; candidate object pixels are ``d > 0.25`` (the palette is at least
   0.4 away from every background in some channel);
2. 8-connected components of the candidates (OpenCV); the largest one is *the object* when it covers at
   least 4 px (scaled with the frame area); ``coherence`` = Σ_k (area_k / total)², the probability that
   two random candidate pixels lie in the same component (1 for one object, 0.5 for two equal halves);
3. object colour ``o`` = mean RGB of its interior (the component eroded by one pixel);
4. soft coverage ``α`` = the projection of each pixel onto the background→object colour line,
   ``α = clamp(<p − bg, o − bg> / |o − bg|², 0, 1)``, inside the object's one-pixel dilation;
5. centroid = α-weighted mean pixel position; area = Σ α.

Then (``scale`` = min(H, W) / 32 converts the pixel constants, tuned at 32x32):

* **alignment** ∈ [0, 1] = mean of three probabilities that the clip shows what the prompt says:
  colour: softmax over the palette of −|o − c_k|²/0.02, at the prompt's colour (mean over frames);
  shape: softmax over shapes of IoU_k/0.03, where IoU_k is the soft IoU of α with shape k rendered with
  the object's area and centroid (moment matching), at the prompt's shape (mean over frames);
  direction: softmax over the four directions of <D, u_k>/(2·scale), D the clip's displacement from a
  least-squares line through the centroid track, at the prompt's direction.
  Frames without an object count as 0.
* **scale**, a factor of motion and of quality: the world's objects have a bounding-box side of 9 to 12 px;
  the object's side is read from its area and the prompted shape's fill (side = √(area / fill), fill 1,
  π/4, 1/2 for square, circle, triangle), and a side outside [9, 12]·scale is discounted by
  exp(−(distance / 1.5·scale)²) per frame. Without it the per-object statistics below (steadiness,
  consistency, coherence, a clean rim) all improve as an object grows, and RL inflated the objects to
  twice the world's largest (the shapes exam, ``otca_fast.toy.exam``, showed it; the rewards did not).
* **motion** ∈ [0, 1] = moving · continuity · steady · coherent · consistent · scale (every condition must hold):
  moving = min(1, |velocity| / (0.75·scale px/frame)) (a still clip scores 0); continuity = share of
  consecutive frame pairs that both show the object (an object that blinks on and off scores 0);
  steady = exp(−(rms residual of the track about its line / 0.5·scale)²) (jitter and acceleration);
  coherent = mean coherence over the frames (one object, not fragments);
  consistent = exp(−(cv of the area / 0.15)²)·exp(−(std of the colour / 0.1)²); scale = its mean over the
  frames that show the object.
* **quality** ∈ [0, 1] = mean over frames of (clean · flat · sharp)^(1/3) · scale, times still:
  clean = exp(−mean |frame − background| outside the object / 0.04) (stray blobs, smear trails, noise);
  flat = exp(−std of the object's interior colour / 0.05) (noise on the object; the world's objects are
  flat colour); sharp = exp(−max(0, b − 3.75) / 2.5), b = band/√area scaled to a circle's perimeter
  (× 2√π / (perimeter/√area of the prompted shape): 4 for a square, 4.58 for the triangle, so an edge of
  a given width costs every shape alike), band = the number of partially covered pixels (0.1 < α < 0.9):
  an anti-aliased edge is one pixel wide (b is at most 3.6 on the world's own clips), a
  motion-smeared one about two (≈ 6) and a blurred one several (≈ 10 at σ = 1.2 px).
  Frames without an object score 0. still = exp(−rms / 0.01), rms = the frame-to-frame change of the
  pixels that are background in both frames (2 px clear of the object): the world's backgrounds never
  move, and ``clean`` (each frame against the prompted background, on average) barely sees a background
  that shimmers or throws specks from frame to frame (the shapes exam's ``clean`` verdict fell under RL
  while this reward rose).

Each reward is registered in the reward registry under ``shapes_alignment``, ``shapes_motion`` and
``shapes_quality`` (all ``cheap``: a batch of 64 clips takes milliseconds, so ``otca_timing`` may score
intermediate x̂0 predictions with them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from otca_fast.rewards.registry import RewardFn, check_frames, register_reward
from otca_fast.toy.world import (
    COLOURS,
    DIRECTIONS,
    SHAPE_AREA,
    SHAPES,
    ClipSpec,
    background_image,
    parse_prompt,
    shape_coverage,
)

__all__ = ["ClipAnalysis", "analyse_clips", "alignment_score", "motion_score", "quality_score",
           "alignment_terms", "motion_terms", "quality_terms", "scale_terms", "REWARD_NAMES"]

REWARD_NAMES = {"alignment": "shapes_alignment", "motion": "shapes_motion", "quality": "shapes_quality"}

_DIFF_THRESHOLD = 0.25
_MIN_AREA = 4.0            # pixels at 32x32
_COLOUR_TEMPERATURE = 0.02
_SHAPE_TEMPERATURE = 0.03
_DIRECTION_TEMPERATURE = 2.0   # pixels at 32x32
_MIN_SPEED = 0.75              # pixels per frame at 32x32
_STEADY_SCALE = 0.5            # pixels at 32x32
_AREA_CV_SCALE = 0.15
_COLOUR_STD_SCALE = 0.10
_CLEAN_SCALE = 0.04
_FLAT_SCALE = 0.05
_STILL_SCALE = 0.01            # rms frame-to-frame change of the background (gray levels)
_STILL_MARGIN = 2              # pixels at 32x32 kept clear around the object when the background is compared
_BAND_RATIO = 3.75
# perimeter / √area of each shape: a circle 2√π; a square 4; the world's triangle (base s, height s) (1 + √5)/√½
_PERIMETER_PER_ROOT_AREA = {"circle": 2 * math.sqrt(math.pi), "square": 4.0,
                            "triangle": (1 + math.sqrt(5)) / math.sqrt(0.5)}
_BAND_SCALE = 2.5
_SIDE_RANGE = (9.0, 12.0)      # pixels at 32x32: the world's bounding-box sides (WorldConfig.size_range)
_SIDE_SCALE = 1.5              # pixels at 32x32

_PALETTE = torch.tensor(list(COLOURS.values()))                # [K, 3]
_UNITS = torch.tensor(list(DIRECTIONS.values()))               # [4, 2]
_KERNEL = np.ones((3, 3), np.uint8)


@dataclass
class ClipAnalysis:
    """Per-frame segmentation of a batch of clips (see the module docstring)."""

    specs: list[ClipSpec]
    frames: torch.Tensor        # [B, F, 3, H, W]
    background: torch.Tensor    # [B, 3, H, W]
    present: torch.Tensor       # [B, F] bool
    alpha: torch.Tensor         # [B, F, H, W] soft coverage of the object
    region: torch.Tensor        # [B, F, H, W] bool: the object's component dilated by one pixel
    colour: torch.Tensor        # [B, F, 3] mean interior colour
    colour_std: torch.Tensor    # [B, F] std of the interior colour about its mean (mean over channels)
    coherence: torch.Tensor     # [B, F] Σ_k (component area / candidate pixels)²
    area: torch.Tensor          # [B, F] Σ α
    centroid: torch.Tensor      # [B, F, 2] (x, y) in pixels
    scale: float


def _check_inputs(frames: torch.Tensor, prompts: Sequence[str]) -> list[ClipSpec]:
    prompts = check_frames(frames, prompts)
    if not torch.isfinite(frames).all():
        raise ValueError("frames: contains NaN or Inf")
    lo, hi = frames.min().item(), frames.max().item()
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"frames: expected values in [0, 1], got range [{lo:.4f}, {hi:.4f}]")
    return [parse_prompt(p) for p in prompts]


def analyse_clips(frames: torch.Tensor, prompts: Sequence[str]) -> ClipAnalysis:
    """Segment every frame against the prompt's background (the shared first half of all three rewards)."""
    specs = _check_inputs(frames, prompts)
    frames = frames.detach().to("cpu", torch.float32).clamp(0, 1)
    b, f, _, h, w = frames.shape
    scale = min(h, w) / 32.0
    background = torch.stack([background_image(s.background, h, w) for s in specs])      # [B, 3, H, W]
    diff = frames - background.unsqueeze(1)                                              # [B, F, 3, H, W]
    candidates = (diff.abs().amax(2) > _DIFF_THRESHOLD).numpy().astype(np.uint8)          # [B, F, H, W]

    component = np.zeros((b, f, h, w), dtype=bool)
    interior = np.zeros((b, f, h, w), dtype=bool)
    region = np.zeros((b, f, h, w), dtype=bool)
    coherence = np.zeros((b, f), dtype=np.float32)
    present = np.zeros((b, f), dtype=bool)
    min_area = _MIN_AREA * scale * scale
    for i in range(b):
        for j in range(f):
            mask = candidates[i, j]
            total = int(mask.sum())
            if total == 0:
                continue
            count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
            areas = stats[1:, cv2.CC_STAT_AREA]
            biggest = int(np.argmax(areas)) + 1
            if areas[biggest - 1] < min_area:
                continue
            blob = (labels == biggest).astype(np.uint8)
            present[i, j] = True
            coherence[i, j] = float(np.square(areas / total).sum())
            component[i, j] = blob.astype(bool)
            core = cv2.erode(blob, _KERNEL).astype(bool)
            interior[i, j] = core if core.any() else blob.astype(bool)
            region[i, j] = cv2.dilate(blob, _KERNEL).astype(bool)

    present_t = torch.from_numpy(present)
    interior_t = torch.from_numpy(interior).unsqueeze(2)                                  # [B, F, 1, H, W]
    n_interior = interior_t.sum((-1, -2)).clamp_min(1)                                   # [B, F, 1]
    colour = (frames * interior_t).sum((-1, -2)) / n_interior                            # [B, F, 3]
    spread = ((frames - colour[..., None, None]).square() * interior_t).sum((-1, -2)) / n_interior
    colour_std = spread.sqrt().mean(-1)                                                  # [B, F]

    # α: projection onto the background → object colour line, per pixel (textured backgrounds vary)
    axis = colour[..., None, None] - background.unsqueeze(1)                             # [B, F, 3, H, W]
    alpha = (diff * axis).sum(2) / axis.square().sum(2).clamp_min(0.05)
    region_t = torch.from_numpy(region)
    alpha = alpha.clamp(0, 1) * region_t
    area = alpha.sum((-1, -2))
    ys = torch.arange(h, dtype=torch.float32).view(-1, 1) + 0.5
    xs = torch.arange(w, dtype=torch.float32).view(1, -1) + 0.5
    denom = area.clamp_min(1e-6)
    centroid = torch.stack([(alpha * xs).sum((-1, -2)) / denom, (alpha * ys).sum((-1, -2)) / denom], -1)
    zero = ~present_t
    return ClipAnalysis(
        specs=specs, frames=frames, background=background, present=present_t,
        alpha=alpha.masked_fill(zero[..., None, None], 0.0), region=region_t,
        colour=colour.masked_fill(zero[..., None], 0.0), colour_std=colour_std.masked_fill(zero, 0.0),
        coherence=torch.from_numpy(coherence), area=area.masked_fill(zero, 0.0),
        centroid=centroid.masked_fill(zero[..., None], 0.0), scale=scale)


def _track_fit(a: ClipAnalysis) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Least-squares line through each clip's centroid track over its present frames.

    Returns ``(velocity [B, 2] px/frame, rms residual [B] px, valid [B])``; valid needs 2 present frames.
    """
    b, f = a.present.shape
    weight = a.present.float()                                    # [B, F]
    t = torch.arange(f, dtype=torch.float32).expand(b, f)
    n = weight.sum(1).clamp_min(1)
    t_mean = (weight * t).sum(1) / n
    c_mean = (weight.unsqueeze(-1) * a.centroid).sum(1) / n.unsqueeze(-1)
    dt = (t - t_mean.unsqueeze(1)) * weight
    var_t = (dt * dt).sum(1).clamp_min(1e-6)
    velocity = (dt.unsqueeze(-1) * (a.centroid - c_mean.unsqueeze(1))).sum(1) / var_t.unsqueeze(-1)
    fitted = c_mean.unsqueeze(1) + (t - t_mean.unsqueeze(1)).unsqueeze(-1) * velocity.unsqueeze(1)
    residual = ((a.centroid - fitted).square().sum(-1) * weight).sum(1) / n
    valid = weight.sum(1) >= 2
    return velocity * valid.unsqueeze(-1), residual.sqrt() * valid, valid


def _shape_iou(a: ClipAnalysis) -> torch.Tensor:
    """``[B, F, len(SHAPES)]`` soft IoU of α with each shape rendered at the object's area and centroid."""
    b, f, h, w = a.alpha.shape
    k = len(SHAPES)
    area = a.area.clamp_min(1e-3).reshape(-1, 1).expand(-1, k)                           # [BF, K]
    factor = torch.tensor([SHAPE_AREA[s] for s in SHAPES]).view(1, k)
    size = (area / factor).sqrt()
    centre = a.centroid.reshape(-1, 1, 2).expand(-1, k, 2).clone()
    # a triangle's centroid sits s/6 below its bounding-box centre (2/3 of the way from the apex)
    tri = SHAPES.index("triangle")
    centre[:, tri, 1] = centre[:, tri, 1] - size[:, tri] / 6
    ids = torch.arange(k).repeat(b * f)
    template = shape_coverage(ids, centre.reshape(-1, 2), size.reshape(-1), h, w, supersample=2)
    template = template.view(b, f, k, h, w)
    alpha = a.alpha.unsqueeze(2)
    inter = torch.minimum(alpha, template).sum((-1, -2))
    union = torch.maximum(alpha, template).sum((-1, -2)).clamp_min(1e-6)
    return inter / union


def scale_terms(a: ClipAnalysis) -> torch.Tensor:
    """``[B, F]``: 1 while the object's side (from its area and the prompted shape's fill) lies in the world's
    range, discounted outside it; 0 where a frame shows no object."""
    fill = torch.tensor([SHAPE_AREA[s.shape] for s in a.specs]).view(-1, 1)
    side = (a.area / fill).sqrt()
    lo, hi = (v * a.scale for v in _SIDE_RANGE)
    outside = (side - hi).clamp_min(0) + (lo - side).clamp_min(0)
    return torch.exp(-(outside / (_SIDE_SCALE * a.scale)).square()) * a.present


def _target_probability(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return logits.softmax(-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)


def alignment_terms(frames: torch.Tensor, prompts: Sequence[str],
                    analysis: ClipAnalysis | None = None) -> dict[str, torch.Tensor]:
    """The three probabilities behind :func:`alignment_score`, each ``[B]``."""
    a = analysis or analyse_clips(frames, prompts)
    b, f = a.present.shape
    present = a.present.float()
    colour_target = torch.tensor([list(COLOURS).index(s.colour) for s in a.specs])
    shape_target = torch.tensor([SHAPES.index(s.shape) for s in a.specs])
    direction_target = torch.tensor([list(DIRECTIONS).index(s.direction) for s in a.specs])

    dist2 = (a.colour.unsqueeze(2) - _PALETTE.view(1, 1, -1, 3)).square().sum(-1)       # [B, F, K]
    colour_p = _target_probability(-dist2 / _COLOUR_TEMPERATURE, colour_target.view(b, 1).expand(b, f))
    shape_p = _target_probability(_shape_iou(a) / _SHAPE_TEMPERATURE, shape_target.view(b, 1).expand(b, f))
    velocity, _, valid = _track_fit(a)
    displacement = velocity * (f - 1)
    direction_logits = displacement @ _UNITS.T / (_DIRECTION_TEMPERATURE * a.scale)
    direction_p = _target_probability(direction_logits, direction_target) * valid
    return {"colour": (colour_p * present).mean(1), "shape": (shape_p * present).mean(1),
            "direction": direction_p}


def alignment_score(frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Colour, shape and direction of the moving object match the prompt: ``[B]`` in [0, 1]."""
    terms = alignment_terms(frames, prompts)
    return ((terms["colour"] + terms["shape"] + terms["direction"]) / 3).float()


def motion_terms(frames: torch.Tensor, prompts: Sequence[str],
                 analysis: ClipAnalysis | None = None) -> dict[str, torch.Tensor]:
    """The factors behind :func:`motion_score`, each ``[B]``."""
    a = analysis or analyse_clips(frames, prompts)
    present = a.present.float()
    n = present.sum(1).clamp_min(1)
    velocity, rms, valid = _track_fit(a)
    moving = (velocity.norm(dim=-1) / (_MIN_SPEED * a.scale)).clamp(0, 1)
    steady = torch.exp(-(rms / (_STEADY_SCALE * a.scale)).square()) * valid
    coherent = (a.coherence * present).sum(1) / n
    area_mean = (a.area * present).sum(1) / n
    area_std = (((a.area - area_mean.unsqueeze(1)).square() * present).sum(1) / n).sqrt()
    colour_mean = (a.colour * present.unsqueeze(-1)).sum(1) / n.unsqueeze(-1)
    colour_dev = (((a.colour - colour_mean.unsqueeze(1)).square() * present.unsqueeze(-1)).sum(1)
                  / n.unsqueeze(-1)).sqrt().mean(-1)
    consistent = (torch.exp(-(area_std / area_mean.clamp_min(1e-6) / _AREA_CV_SCALE).square())
                  * torch.exp(-(colour_dev / _COLOUR_STD_SCALE).square())) * valid
    continuity = (present[:, 1:] * present[:, :-1]).mean(1)
    scale = scale_terms(a).sum(1) / n
    return {"moving": moving, "continuity": continuity, "steady": steady, "coherent": coherent,
            "consistent": consistent, "scale": scale}


def motion_score(frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """One coherent object of the world's size moving smoothly at a steady, non-zero velocity: ``[B]`` in [0, 1]."""
    t = motion_terms(frames, prompts)
    return (t["moving"] * t["continuity"] * t["steady"] * t["coherent"] * t["consistent"] * t["scale"]).float()


def quality_terms(frames: torch.Tensor, prompts: Sequence[str],
                  analysis: ClipAnalysis | None = None) -> dict[str, torch.Tensor]:
    """The per-clip means of the factors behind :func:`quality_score`, each ``[B]``."""
    a = analysis or analyse_clips(frames, prompts)
    present = a.present.float()
    # background = outside the object's region grown by one more pixel (its anti-aliased rim)
    grown = torch.nn.functional.max_pool2d(a.region.float().flatten(0, 1).unsqueeze(1), 3, 1, 1)
    outside = (1 - grown.view_as(a.alpha)).unsqueeze(2)                                   # [B, F, 1, H, W]
    error = ((a.frames - a.background.unsqueeze(1)).abs() * outside).sum((2, 3, 4))
    error = error / (outside.sum((2, 3, 4)) * 3).clamp_min(1)
    clean = torch.exp(-error / _CLEAN_SCALE)                                              # [B, F]
    flat = torch.exp(-a.colour_std / _FLAT_SCALE) * present
    band = ((a.alpha > 0.1) & (a.alpha < 0.9)).float().sum((-1, -2))
    # the band of an edge of given width grows with the perimeter: compare every shape at a circle's
    # perimeter per √area, or blurred squares and triangles would pay more than blurred circles (and RL on
    # this reward would round every shape off)
    perimeter = torch.tensor([_PERIMETER_PER_ROOT_AREA[s.shape] for s in a.specs]).view(-1, 1)
    ratio = band / a.area.clamp_min(1e-6).sqrt() * (_PERIMETER_PER_ROOT_AREA["circle"] / perimeter)
    sharp = torch.exp(-(ratio - _BAND_RATIO).clamp_min(0) / _BAND_SCALE) * present
    scale = scale_terms(a)
    still = _still_background(a)
    per_frame = (clean * flat * sharp).pow(1 / 3) * scale
    return {"clean": clean.mean(1), "flat": flat.mean(1), "sharp": sharp.mean(1), "scale": scale.mean(1),
            "still": still, "quality": per_frame.mean(1) * still}


def _still_background(a: ClipAnalysis) -> torch.Tensor:
    """``[B]``: exp(−rms / 0.01), rms = the root-mean-square frame-to-frame change (max over channels) of the
    pixels that are background in both frames of a consecutive pair (outside the object's region grown by
    ``_STILL_MARGIN`` px).

    The world's backgrounds never move: only the object changes between frames. ``clean`` compares each frame
    with the prompted background on average, so a background that shimmers or throws specks from frame to
    frame, or a texture whose cells drift, costs it little; RL found that (the shapes exam's ``clean`` verdict
    fell while this reward rose). The world's own clips score 1; a clip with no background pixel left scores 0.
    """
    b, f, h, w = a.alpha.shape
    if f < 2:
        return torch.ones(b)
    margin = max(1, round(_STILL_MARGIN * a.scale))
    grown = torch.nn.functional.max_pool2d(a.region.float().flatten(0, 1).unsqueeze(1), 2 * margin + 1, 1, margin)
    background = grown.view(b, f, h, w) == 0
    both = background[:, 1:] & background[:, :-1]                                         # [B, F-1, H, W]
    change = (a.frames[:, 1:] - a.frames[:, :-1]).abs().amax(2)                           # [B, F-1, H, W]
    count = both.sum((1, 2, 3))
    rms = ((change.square() * both).sum((1, 2, 3)) / count.clamp_min(1)).sqrt()
    return torch.where(count > 0, torch.exp(-rms / _STILL_SCALE), torch.zeros_like(rms))


def quality_score(frames: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Sharp edges, a clean background, no noise or smear: ``[B]`` in [0, 1]."""
    return quality_terms(frames, prompts)["quality"].float()


# ---------------------------------------------------------------------------------------------
# registry entries (factories take no options: the constants above are calibrated to the world)
# ---------------------------------------------------------------------------------------------

@register_reward(REWARD_NAMES["alignment"], role="alignment", cheap=True)
def shapes_alignment() -> RewardFn:
    """Colour, shape and direction of the moving object match the prompt (shapes world, pixels only)."""
    return alignment_score


@register_reward(REWARD_NAMES["motion"], role="motion", cheap=True)
def shapes_motion() -> RewardFn:
    """One coherent object of the world's size moving smoothly at a steady, non-zero velocity (pixels only)."""
    return motion_score


@register_reward(REWARD_NAMES["quality"], role="quality", cheap=True)
def shapes_quality() -> RewardFn:
    """Sharp edges, a clean background, no noise or smear (shapes world, pixels only)."""
    return quality_score

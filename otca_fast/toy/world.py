"""The shapes-video world: procedural clips of one coloured shape moving over a background.

A clip is ``[F, 3, H, W]`` float in ``[0, 1]`` (default 9 frames of 32x32): one shape (square, circle or
triangle) of one palette colour translates at a constant velocity in one of four directions over a plain
(white, black, gray) or textured (checkered, striped) background. Its prompt comes from a one-rule
grammar::

    "a {colour} {shape} moving {direction} on a {background} background"

and :func:`parse_prompt` reads it back into a :class:`ClipSpec`.

Placement: the midpoint of the track sits within ±3 px (``WorldConfig.position_jitter``) of the frame
centre, which keeps the clips of one prompt nearly unimodal for a base model trained in half an hour of
one CPU core. (It was narrowed while the base model drew scattered fragments instead of one object; the
fix for that turned out to be the coordinate planes of ``otca_fast.toy.model``, and a full-frame
placement with them was not retried within the budget. ``position_jitter`` widens it.)

Rendering is anti-aliased (coverage of each pixel by the shape, estimated on a supersampled grid), so a
sub-pixel displacement moves the coverage-weighted centroid by exactly that amount: a clean clip's
centroid track is a straight line travelled at a steady speed, which is what the motion reward expects.

The train / held-out split is a fixed rule over the attribute indices,
``(colour + shape + direction + background) % 5 == 0`` → held-out: exactly one background per
(colour, shape, direction) triple is held out (20 % of the 240 combinations), every single attribute
value and every *pair* of values still occurs in training, so held-out prompts test composition, not
unseen words.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from otca_fast import checks

__all__ = [
    "COLOURS", "SHAPES", "DIRECTIONS", "BACKGROUNDS", "PLAIN_BACKGROUNDS", "SHAPE_AREA",
    "ClipSpec", "WorldConfig", "Clips", "make_prompt", "parse_prompt", "all_specs", "split_specs",
    "is_heldout", "write_prompt_files", "background_image", "shape_coverage", "render_clips", "draw_clips",
    "sample_clips",
]

# Palette: saturated, far apart in RGB (nearest pair red/yellow is 0.75 apart) and ≥ 0.4 from every
# background value in at least one channel, so background subtraction segments every object.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.70, 0.20),
    "blue": (0.10, 0.25, 0.90),
    "yellow": (0.95, 0.85, 0.10),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
# unit vectors in image coordinates (x to the right, y downwards)
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}
PLAIN_BACKGROUNDS: dict[str, float] = {"white": 1.0, "black": 0.0, "gray": 0.5}
# textured backgrounds: two gray levels in a fixed pattern (fixed phase, so a reward can render the
# exact expected background from the prompt)
_TEXTURE_LEVELS = (0.30, 0.70)
BACKGROUNDS: tuple[str, ...] = ("white", "black", "gray", "checkered", "striped")
# area of each shape as a fraction of its bounding box (side s): s², π s²/4, s²/2
SHAPE_AREA: dict[str, float] = {"square": 1.0, "circle": torch.pi / 4.0, "triangle": 0.5}

_PROMPT_RE = re.compile(
    r"^\s*an?\s+(?P<colour>\w+)\s+(?P<shape>\w+)\s+moving\s+(?P<direction>\w+)\s+on\s+an?\s+"
    r"(?P<background>\w+)\s+background\s*\.?\s*$",
    re.IGNORECASE,
)
_HELDOUT_MODULUS = 5


@dataclass(frozen=True)
class ClipSpec:
    """The attributes a prompt names."""

    colour: str
    shape: str
    direction: str
    background: str

    def __post_init__(self) -> None:
        for field, allowed in (("colour", tuple(COLOURS)), ("shape", SHAPES),
                               ("direction", tuple(DIRECTIONS)), ("background", BACKGROUNDS)):
            checks.choice(f"ClipSpec.{field}", getattr(self, field), list(allowed))

    @property
    def prompt(self) -> str:
        return make_prompt(self)

    @property
    def indices(self) -> tuple[int, int, int, int]:
        return (list(COLOURS).index(self.colour), SHAPES.index(self.shape),
                list(DIRECTIONS).index(self.direction), BACKGROUNDS.index(self.background))


@dataclass(frozen=True)
class WorldConfig:
    """Geometry of the world, in pixels of the rendered clip.

    The defaults keep every trajectory inside the frame: a 12 px shape travelling 14 px (1.75 px/frame
    over 8 steps) still has a 1 px margin in a 32 px frame.
    """

    frames: int = 9
    height: int = 32
    width: int = 32
    size_range: tuple[float, float] = (9.0, 12.0)   # side of the shape's bounding box
    speed_range: tuple[float, float] = (1.0, 1.75)   # pixels per frame
    margin: float = 1.0
    position_jitter: float = 3.0                     # track midpoint within ± this of the frame centre
    supersample: int = 4
    texture_cell: int = 4                            # checker cell / stripe period (pixels)

    def __post_init__(self) -> None:
        if self.frames < 2:
            raise ValueError(f"WorldConfig.frames: expected >= 2 (motion needs two frames), got {self.frames}")
        lo, hi = self.size_range
        slo, shi = self.speed_range
        if not 0 < lo <= hi:
            raise ValueError(f"WorldConfig.size_range: expected 0 < lo <= hi, got {self.size_range}")
        if not 0 <= slo <= shi:
            raise ValueError(f"WorldConfig.speed_range: expected 0 <= lo <= hi, got {self.speed_range}")
        travel = shi * (self.frames - 1)
        need = hi + travel + 2 * self.margin
        if need > min(self.height, self.width):
            raise ValueError(
                f"WorldConfig: a {hi}px shape travelling {travel}px needs {need}px of frame, "
                f"got {self.height}x{self.width}; shrink size_range/speed_range or enlarge the frame")
        if self.position_jitter < 0:
            raise ValueError(f"WorldConfig.position_jitter: expected >= 0, got {self.position_jitter}")
        if self.supersample < 1:
            raise ValueError(f"WorldConfig.supersample: expected >= 1, got {self.supersample}")
        if self.texture_cell < 1:
            raise ValueError(f"WorldConfig.texture_cell: expected >= 1, got {self.texture_cell}")


@dataclass
class Clips:
    """A batch of rendered clips and the ground truth that made them."""

    frames: torch.Tensor          # [B, F, 3, H, W] float32 in [0, 1]
    prompts: list[str]
    specs: list[ClipSpec]
    centres: torch.Tensor         # [B, F, 2] bounding-box centre (x, y) in pixels
    sizes: torch.Tensor           # [B] bounding-box side in pixels
    speeds: torch.Tensor          # [B] pixels per frame


# ---------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------

def make_prompt(spec: ClipSpec) -> str:
    """The grammar's sentence for ``spec``."""
    if not isinstance(spec, ClipSpec):
        raise TypeError(f"spec: expected a ClipSpec, got {type(spec).__name__}")
    return f"a {spec.colour} {spec.shape} moving {spec.direction} on a {spec.background} background"


def parse_prompt(prompt: str) -> ClipSpec:
    """Read a grammar sentence back into its attributes (case and extra spaces are tolerated)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt: expected a str, got {type(prompt).__name__}")
    match = _PROMPT_RE.match(prompt)
    if match is None:
        raise ValueError(
            f"prompt: expected 'a <colour> <shape> moving <direction> on a <background> background' "
            f"with colour in {list(COLOURS)}, shape in {list(SHAPES)}, direction in {list(DIRECTIONS)}, "
            f"background in {list(BACKGROUNDS)}; got {prompt!r}")
    parts = {key: value.lower() for key, value in match.groupdict().items()}
    if parts["background"] == "grey":
        parts["background"] = "gray"
    try:
        return ClipSpec(**parts)
    except ValueError as err:
        raise ValueError(f"prompt {prompt!r}: {err}") from None


def all_specs() -> list[ClipSpec]:
    """Every attribute combination, in a fixed order."""
    return [ClipSpec(c, s, d, b) for c in COLOURS for s in SHAPES for d in DIRECTIONS for b in BACKGROUNDS]


def is_heldout(spec: ClipSpec) -> bool:
    """True when ``spec`` belongs to the held-out split (see the module docstring for the rule)."""
    return sum(spec.indices) % _HELDOUT_MODULUS == 0


def split_specs(split: str) -> list[ClipSpec]:
    """The fixed ``"train"`` (192 combinations), ``"heldout"`` (48) or ``"all"`` (240) specs."""
    if split == "all":
        return all_specs()
    if split not in ("train", "heldout"):
        raise ValueError(f"split: expected 'train', 'heldout' or 'all', got {split!r}")
    want = split == "heldout"
    return [spec for spec in all_specs() if is_heldout(spec) == want]


def write_prompt_files(directory: str | Path) -> dict[str, Path]:
    """Write ``train_prompts.txt`` and ``heldout_prompts.txt`` (one prompt per line, the split's order).

    They are what a trainer config's ``data.prompt_file`` / ``data.eval_prompt_file`` point at; the
    package ships them in ``otca_fast/toy/assets/``.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for split in ("train", "heldout"):
        path = root / f"{split}_prompts.txt"
        tmp = path.with_suffix(".txt.tmp")
        tmp.write_text("".join(make_prompt(s) + "\n" for s in split_specs(split)))
        os.replace(tmp, path)
        out[split] = path
    return out


# ---------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------

def background_image(background: str, height: int, width: int, *, cell: int = 4,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """The exact background ``[3, H, W]`` of a prompt's background name."""
    if background in PLAIN_BACKGROUNDS:
        return torch.full((3, height, width), PLAIN_BACKGROUNDS[background], device=device)
    ys = torch.arange(height, device=device).view(-1, 1) // cell
    xs = torch.arange(width, device=device).view(1, -1) // cell
    if background == "checkered":
        pattern = (ys + xs) % 2
    elif background == "striped":
        # horizontal stripes: `cell` is the period, each stripe half of it
        pattern = ((torch.arange(height, device=device).view(-1, 1) * 2) // cell % 2).expand(height, width)
    else:
        raise ValueError(f"background: expected one of {list(BACKGROUNDS)}, got {background!r}")
    lo, hi = _TEXTURE_LEVELS
    return torch.where(pattern.bool(), hi, lo).float().expand(3, height, width).clone()


def shape_coverage(shape_ids: torch.Tensor, centres: torch.Tensor, sizes: torch.Tensor, height: int,
                   width: int, supersample: int = 4) -> torch.Tensor:
    """Fraction of each pixel covered by each shape: ``[N, H, W]`` in ``[0, 1]``.

    ``shape_ids`` ``[N]`` (index into :data:`SHAPES`), ``centres`` ``[N, 2]`` bounding-box centres (x, y)
    and ``sizes`` ``[N]`` bounding-box sides, all in pixels (pixel ``(i, j)`` spans ``[j, j+1) x [i, i+1)``).
    Membership is tested at ``supersample²`` points per pixel and averaged (box-filter anti-aliasing).
    """
    device = centres.device
    ss = supersample
    ys = (torch.arange(height * ss, device=device, dtype=torch.float32) + 0.5) / ss
    xs = (torch.arange(width * ss, device=device, dtype=torch.float32) + 0.5) / ss
    dx = xs.view(1, 1, -1) - centres[:, 0].view(-1, 1, 1).float()
    dy = ys.view(1, -1, 1) - centres[:, 1].view(-1, 1, 1).float()
    half = (sizes.float() / 2).view(-1, 1, 1)
    square = (dx.abs() <= half) & (dy.abs() <= half)
    circle = dx.square() + dy.square() <= half.square()
    # apex at the top (y = cy - s/2), base at the bottom: the half-width grows linearly with depth t
    depth = (dy + half) / (2 * half)
    triangle = (depth >= 0) & (depth <= 1) & (dx.abs() <= depth * half)
    ids = shape_ids.view(-1, 1, 1)
    inside = torch.where(ids == 0, square, torch.where(ids == 1, circle, triangle)).float()
    return torch.nn.functional.avg_pool2d(inside.unsqueeze(1), ss).squeeze(1)


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator | None) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator)


def render_clips(specs: Sequence[ClipSpec], *, generator: torch.Generator | None = None,
                 config: WorldConfig | None = None) -> Clips:
    """Render one clip per spec with random size, speed and start position (drawn from ``generator``).

    Deterministic given the generator's state: the same seed gives bit-identical clips.
    """
    cfg = config or WorldConfig()
    if not isinstance(cfg, WorldConfig):
        raise TypeError(f"config: expected a WorldConfig, got {type(cfg).__name__}")
    specs = checks.non_empty_list_of("specs", specs, ClipSpec)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    n, f, h, w = len(specs), cfg.frames, cfg.height, cfg.width
    sizes = _uniform(n, *cfg.size_range, generator)
    speeds = _uniform(n, *cfg.speed_range, generator)
    unit = torch.tensor([DIRECTIONS[s.direction] for s in specs])              # [N, 2]
    travel = speeds * (f - 1)
    # start so that the whole track, shape included, stays `margin` inside the frame
    lo = cfg.margin + sizes / 2
    extent = torch.tensor([w, h], dtype=torch.float32)
    hi = extent.view(1, 2) - lo.view(-1, 1)                                   # [N, 2]
    # the track's midpoint: the frame centre plus up to ±position_jitter on each axis, then clipped to the
    # starts that keep the whole track inside the frame
    jitter = cfg.position_jitter * (2 * torch.rand(n, 2, generator=generator) - 1)
    start = torch.empty(n, 2)
    for axis in range(2):
        moving_neg = unit[:, axis] < 0
        moving_pos = unit[:, axis] > 0
        lo_a = lo + torch.where(moving_neg, travel, torch.zeros_like(travel))
        hi_a = hi[:, axis] - torch.where(moving_pos, travel, torch.zeros_like(travel))
        centred = extent[axis] / 2 - unit[:, axis] * travel / 2
        start[:, axis] = torch.minimum(torch.maximum(centred + jitter[:, axis], lo_a), hi_a)
    steps = torch.arange(f, dtype=torch.float32).view(1, -1, 1)
    centres = start.view(n, 1, 2) + steps * (speeds.view(n, 1, 1) * unit.view(n, 1, 2))   # [N, F, 2]

    frames = draw_clips(specs, centres, sizes, config=cfg)
    return Clips(frames=frames, prompts=[make_prompt(s) for s in specs], specs=specs,
                 centres=centres, sizes=sizes, speeds=speeds)


def draw_clips(specs: Sequence[ClipSpec], centres: torch.Tensor, sizes: torch.Tensor, *,
               config: WorldConfig | None = None) -> torch.Tensor:
    """Draw each spec's shape at given per-frame positions: ``[B, F, 3, H, W]`` in [0, 1].

    ``centres`` ``[B, F, 2]`` are bounding-box centres (x, y) in pixels and ``sizes`` ``[B]`` the sides;
    ``F`` may differ from ``config.frames``. :func:`render_clips` calls this with straight-line tracks;
    tests call it with other tracks (still, jittery) to build the wrong clips the rewards must rank lower.
    """
    cfg = config or WorldConfig()
    specs = list(specs)
    n = len(specs)
    if centres.dim() != 3 or centres.shape[0] != n or centres.shape[2] != 2:
        raise ValueError(f"centres: expected [{n}, F, 2], got {tuple(centres.shape)}")
    if sizes.shape != (n,):
        raise ValueError(f"sizes: expected [{n}], got {tuple(sizes.shape)}")
    f, h, w = centres.shape[1], cfg.height, cfg.width
    shape_ids = torch.tensor([SHAPES.index(s.shape) for s in specs]).repeat_interleave(f)
    alpha = shape_coverage(shape_ids, centres.reshape(-1, 2).float(), sizes.float().repeat_interleave(f), h, w,
                           cfg.supersample).view(n, f, 1, h, w)
    colours = torch.tensor([COLOURS[s.colour] for s in specs]).view(n, 1, 3, 1, 1)
    backgrounds = torch.stack([background_image(s.background, h, w, cell=cfg.texture_cell) for s in specs])
    return (backgrounds.unsqueeze(1) * (1 - alpha) + colours * alpha).clamp(0, 1)


def sample_clips(n: int, *, split: str = "train", generator: torch.Generator | None = None,
                 config: WorldConfig | None = None) -> Clips:
    """``n`` clips of specs drawn uniformly (with replacement) from ``split``."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive int, got {n!r}")
    pool = split_specs(split)
    picks = torch.randint(len(pool), (n,), generator=generator)
    return render_clips([pool[int(i)] for i in picks], generator=generator, config=config)

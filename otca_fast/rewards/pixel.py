"""Weight-free image metrics: JPEG (in)compressibility, colour statistics, sharpness.

Every metric here is defined on the 8-bit RGB frames a user would save (``round(255·x)``), like the
references they come from (DDPO's JPEG size, Hasler–Süsstrunk on 8-bit images, OpenCV's Laplacian
recipe), and each clip's score is the mean over its F frames (images are F = 1). The batch is
quantised once (shared by every weight-free reward scoring it) and each frame goes through one or two
OpenCV/Pillow calls, so all are cheap enough for intermediate x̂0 predictions.
"""

from __future__ import annotations

import io
import math

import cv2
import numpy as np
import torch
from PIL import Image

from otca_fast import checks
from otca_fast.rewards._image import check_option, per_frame, to_uint8
from otca_fast.rewards.registry import RewardFn, check_frames, register_reward

__all__ = [
    "jpeg_compressibility", "jpeg_incompressibility", "brightness", "saturation", "colourfulness",
    "sharpness", "jpeg_kb", "luma_mean", "saturation_mean", "colourfulness_hs", "laplacian_variance",
]

_JPEG_UNITS = ("kb", "bpp")


# --- per-frame statistics of one [H, W, 3] uint8 RGB frame ------------------------------------------

def jpeg_kb(frame: np.ndarray, quality: int = 95) -> float:
    """Size in kB (1000 bytes) of the frame saved by Pillow as JPEG at ``quality`` (DDPO)."""
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000.0


def luma_mean(frame: np.ndarray) -> float:
    """Mean BT.601 luma ``Y = 0.299R + 0.587G + 0.114B`` in [0, 1] (OpenCV's RGB2GRAY)."""
    return float(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY).mean()) / 255.0


def saturation_mean(frame: np.ndarray) -> float:
    """Mean HSV saturation ``S = (max − min) / max`` in [0, 1] (0 on black pixels; OpenCV's RGB2HSV)."""
    return float(cv2.cvtColor(frame, cv2.COLOR_RGB2HSV)[..., 1].mean()) / 255.0


def colourfulness_hs(frame: np.ndarray) -> float:
    """Hasler & Süsstrunk (2003) colourfulness on the 0–255 scale.

    rg = R − G, yb = ½(R + G) − B; M = √(σ_rg² + σ_yb²) + 0.3·√(μ_rg² + μ_yb²) over the frame's pixels.
    Their scale: 0 not colourful, 15 slightly, 33 moderately, 45 averagely, 59 quite, 82 highly,
    109 extremely colourful.
    """
    f = frame.astype(np.float32)
    rg = f[..., 0] - f[..., 1]
    yb = 0.5 * (f[..., 0] + f[..., 1]) - f[..., 2]
    (m_rg,), (s_rg,) = cv2.meanStdDev(rg)
    (m_yb,), (s_yb,) = cv2.meanStdDev(yb)
    return float(math.sqrt(s_rg[0] ** 2 + s_yb[0] ** 2) + 0.3 * math.sqrt(m_rg[0] ** 2 + m_yb[0] ** 2))


def laplacian_variance(frame: np.ndarray) -> float:
    """Variance of the Laplacian of the 8-bit luma: ``cv2.Laplacian(gray, CV_64F).var()``.

    The standard focus measure (Pech-Pacheco et al. 2000; OpenCV's 4-neighbour kernel, ksize=1);
    the usual rule of thumb "below 100 is blurry" refers to this scale.
    """
    return float(cv2.Laplacian(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var())


# --- rewards -------------------------------------------------------------------------------------------

def _jpeg_factory(name: str, sign: float, quality: int, unit: str) -> RewardFn:
    check_option(quality, "quality", kind=int, lo=1, hi=100, reward=name)
    checks.choice(f"reward {name!r}: option unit", unit, list(_JPEG_UNITS))

    def fn(frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_frames(frames, prompts)
        kb = per_frame(to_uint8(frames), lambda f: jpeg_kb(f, quality))
        if unit == "bpp":
            # bits per pixel = 8000 · kB / (H·W): independent of the resolution, so one weight carries
            # over between low-resolution previews and full-resolution runs.
            kb = kb * 8000.0 / (frames.shape[-1] * frames.shape[-2])
        return sign * kb

    return fn


@register_reward("jpeg_compressibility", role="quality", cheap=True)
def jpeg_compressibility(*, quality: int = 95, unit: str = "kb") -> RewardFn:
    """DDPO's compressibility: ``−size`` of each frame saved as JPEG at ``quality`` (kB, or bits per
    pixel with ``unit="bpp"``), averaged over frames. Rewards flat, smooth, low-detail images.
    (Flow-GRPO divides DDPO's value by 500: scale with the reward's weight in the config.)"""
    return _jpeg_factory("jpeg_compressibility", -1.0, quality, unit)


@register_reward("jpeg_incompressibility", role="quality", cheap=True)
def jpeg_incompressibility(*, quality: int = 95, unit: str = "kb") -> RewardFn:
    """DDPO's incompressibility: ``+size`` of the JPEG (kB or bits per pixel). Rewards detail."""
    return _jpeg_factory("jpeg_incompressibility", 1.0, quality, unit)


def _target_reward(stat: torch.Tensor, target: float | None) -> torch.Tensor:
    # r = s (maximise) or r = −|s − s*| (hold a target): the distance form peaks at the target, so it
    # cannot be hacked past it.
    return stat if target is None else -(stat - target).abs()


def _stat_factory(name: str, stat, target: float | None, hi: float | None,
                  target_to_stat=float) -> RewardFn:
    check_option(target, "target", kind=(int, float), lo=0.0, hi=hi, allow_none=True, reward=name)
    goal = None if target is None else target_to_stat(target)

    def fn(frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_frames(frames, prompts)
        return _target_reward(per_frame(to_uint8(frames), stat), goal)

    return fn


@register_reward("brightness", role="quality", cheap=True)
def brightness(*, target: float | None = None) -> RewardFn:
    """Mean BT.601 luma Y in [0, 1]: ``Y`` when ``target`` is None, else ``−|Y − target|``."""
    return _stat_factory("brightness", luma_mean, target, 1.0)


@register_reward("saturation", role="quality", cheap=True)
def saturation(*, target: float | None = None) -> RewardFn:
    """Mean HSV saturation S in [0, 1]: ``S`` when ``target`` is None, else ``−|S − target|``."""
    return _stat_factory("saturation", saturation_mean, target, 1.0)


@register_reward("colourfulness", role="quality", cheap=True)
def colourfulness(*, target: float | None = None) -> RewardFn:
    """Hasler–Süsstrunk colourfulness M (0–255 scale, see :func:`colourfulness_hs`): ``M`` when
    ``target`` is None, else ``−|M − target|``."""
    return _stat_factory("colourfulness", colourfulness_hs, target, None)


@register_reward("sharpness", role="quality", cheap=True)
def sharpness(*, target: float | None = None) -> RewardFn:
    """Sharpness ``s = log(1 + Var(Laplacian(Y)))`` per frame (see :func:`laplacian_variance`).

    The log keeps a few very textured samples from dominating a group's z-score (the raw variance spans
    orders of magnitude). ``target`` (a raw Laplacian variance) gives ``−|s − log(1 + target)|``: pure
    maximisation also rewards noise, so give a target or pair it with ``jpeg_compressibility``.
    """
    return _stat_factory("sharpness", lambda f: math.log1p(laplacian_variance(f)), target, None,
                         target_to_stat=lambda t: math.log1p(float(t)))

"""Weight-free temporal metrics: flicker, optical-flow warp consistency, motion amount, dynamic degree.

Flow is OpenCV's Farneback (a classical dense flow, no weights) between consecutive frames. Frames
whose short side exceeds ``flow_short_side`` (default 256, the resolution VBench's thresholds are
calibrated at) are first downscaled with area averaging; that makes flow ~3x faster at 480p and
puts motion on one scale whatever the output resolution. Motion is reported in **pixels per frame at a
256-pixel short side**: ``|flow| · 256 / short_side``.

Consistency alone is maximised by a still clip (every warp is exact, nothing flickers), so a GRPO run
that rewards it alone collapses to frozen video. ``motion_quality`` therefore gates consistency by
the amount of motion (see its docstring); ``temporal_flicker`` is VBench's metric for *static*
content and should be paired with a motion term the same way.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from otca_fast.rewards._image import check_option, to_uint8
from otca_fast.rewards.registry import RewardFn, check_frames, register_reward

__all__ = [
    "temporal_flicker", "warp_consistency", "motion_amount", "dynamic_degree", "motion_quality",
    "flicker_score", "clip_flow_stats", "FARNEBACK_PARAMS",
]

# Farneback parameters of OpenCV's own sample (samples/python/opt_flow.py): 3-level pyramid at
# scale 0.5, 15-px window, 3 iterations, degree-5 polynomial with sigma 1.2.
FARNEBACK_PARAMS = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)
_REF_SHORT_SIDE = 256.0   # VBench: threshold = 6 px · (short_side / 256)
_VBENCH_THRESHOLD = 6.0   # px per frame pair at 8 fps, 256-px short side
_TOP_FRACTION = 0.05      # VBench: mean of the top 5 % flow magnitudes


def _need_video(frames: torch.Tensor, reward: str) -> None:
    if frames.shape[1] < 2:
        raise ValueError(f"reward {reward!r} measures change between frames: expected frames "
                         f"[B, F, C, H, W] with F >= 2, got F = {frames.shape[1]} "
                         f"(shape {tuple(frames.shape)})")


def flicker_score(frames: torch.Tensor) -> torch.Tensor:
    """VBench temporal flickering, ``[B]`` float64: ``(255 − mean_t MAE(f_t, f_{t+1})) / 255``.

    On 8-bit frames as VBench reads them from video files; the MAE runs over the pixels and channels of
    each consecutive pair (``cv2.norm(·, NORM_L1) / size``), then over pairs.
    """
    pixels = to_uint8(frames)
    b, f = pixels.shape[:2]
    size = pixels[0, 0].size
    mae = np.array([[cv2.norm(pixels[i, t], pixels[i, t + 1], cv2.NORM_L1) / size for t in range(f - 1)]
                    for i in range(b)])
    return torch.from_numpy((255.0 - mae.mean(axis=1)) / 255.0)


@register_reward("temporal_flicker", role="motion", cheap=True)
def temporal_flicker() -> RewardFn:
    """VBench's temporal-flickering score in [0, 1] (1 = no change between frames).

    VBench applies it to static-content prompts only: on its own it rewards a frozen clip.
    """

    def fn(frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_frames(frames, prompts)
        _need_video(frames, "temporal_flicker")
        return flicker_score(frames)

    return fn


def _resize_clip(clip: np.ndarray, flow_short_side: int | None) -> tuple[np.ndarray, float]:
    """Downscale ``[F, H, W, 3]`` uint8 so the short side is at most ``flow_short_side``."""
    h, w = clip.shape[1:3]
    short = min(h, w)
    if flow_short_side is None or short <= flow_short_side:
        return clip, float(short)
    s = flow_short_side / short
    size = (max(1, round(w * s)), max(1, round(h * s)))     # cv2 takes (width, height)
    out = np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in clip])
    return out, float(min(out.shape[1:3]))


def clip_flow_stats(clip: np.ndarray, *, flow_short_side: int | None = 256,
                    warp: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Per consecutive pair of one clip ``[F, H, W, 3]`` uint8: ``(motion [F-1], warp_error [F-1])``.

    * motion: mean of the top 5 % Farneback flow magnitudes (VBench's dynamic-degree statistic), in
      pixels per frame at a 256-px short side.
    * warp error (when ``warp``): frame t+1 is warped back onto frame t along the flow t → t+1
      (``cv2.remap``, bilinear); the error is mean|warped − f_t| / 255 over channels and over the pixels
      whose source lies inside frame t+1 (pixels that flow in from outside the frame have no source).
    """
    clip, short = _resize_clip(clip, flow_short_side)
    nf, h, w = clip.shape[:3]
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in clip]
    k = max(1, int(h * w * _TOP_FRACTION))
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    motion = np.empty(nf - 1, dtype=np.float64)
    error = np.empty(nf - 1, dtype=np.float64) if warp else None
    for t in range(nf - 1):
        # flow[y, x] = (dx, dy) with f_t(y, x) ≈ f_{t+1}(y + dy, x + dx)
        flow = cv2.calcOpticalFlowFarneback(gray[t], gray[t + 1], None, **FARNEBACK_PARAMS)
        mag = np.sqrt(flow[..., 0] ** 2 + flow[..., 1] ** 2).ravel()
        motion[t] = np.partition(mag, mag.size - k)[-k:].mean() * (_REF_SHORT_SIDE / short)
        if warp:
            map_x = gx + flow[..., 0]
            map_y = gy + flow[..., 1]
            warped = cv2.remap(clip[t + 1], map_x, map_y, interpolation=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT)
            valid = (map_x >= 0) & (map_x <= w - 1) & (map_y >= 0) & (map_y <= h - 1)
            n_valid = int(valid.sum())
            if n_valid == 0:
                error[t] = 1.0   # every pixel flowed out of the frame: nothing is consistent
            else:
                diff = np.abs(warped.astype(np.float32) - clip[t].astype(np.float32))
                error[t] = float(diff[valid].mean()) / 255.0
    return motion, error


def _flow_stats(frames: torch.Tensor, flow_short_side: int | None,
                warp: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """``(motion [B, F-1], warp_error [B, F-1] or None)`` for a batch."""
    pixels = to_uint8(frames)
    stats = [clip_flow_stats(clip, flow_short_side=flow_short_side, warp=warp) for clip in pixels]
    motion = np.stack([m for m, _ in stats])
    error = np.stack([e for _, e in stats]) if warp else None
    return motion, error


def _check_short_side(value: int | None, reward: str) -> None:
    check_option(value, "flow_short_side", kind=int, lo=16, allow_none=True, reward=reward)


@register_reward("warp_consistency", role="motion", cheap=False)
def warp_consistency(*, flow_short_side: int | None = 256) -> RewardFn:
    """Flow-warp temporal consistency ``C = 1 − mean_t e_t`` in [0, 1], e_t the warp error of
    :func:`clip_flow_stats`.

    High for smooth, coherent motion; low for noise, flicker and jumps. A still clip scores 1: use
    ``motion_quality`` (which gates C by motion) as a training reward unless another reward pushes
    motion.
    """
    _check_short_side(flow_short_side, "warp_consistency")

    def fn(frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_frames(frames, prompts)
        _need_video(frames, "warp_consistency")
        _, error = _flow_stats(frames, flow_short_side, warp=True)
        return torch.from_numpy(1.0 - error.mean(axis=1))

    return fn


@register_reward("motion_amount", role="motion", cheap=False)
def motion_amount(*, target: float | None = None, flow_short_side: int | None = 256) -> RewardFn:
    """Continuous dynamic degree: mean over frame pairs of the top-5 % Farneback flow magnitude
    ``m`` (pixels per frame at a 256-px short side). ``m`` when ``target`` is None, else
    ``−|m − target|``. For scale: VBench calls a pair "moving" above 6 at 8 fps.
    """
    check_option(target, "target", kind=(int, float), lo=0.0, allow_none=True, reward="motion_amount")
    _check_short_side(flow_short_side, "motion_amount")

    def fn(frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_frames(frames, prompts)
        _need_video(frames, "motion_amount")
        motion, _ = _flow_stats(frames, flow_short_side, warp=False)
        m = torch.from_numpy(motion.mean(axis=1))
        return m if target is None else -(m - target).abs()

    return fn


@register_reward("dynamic_degree", role="motion", cheap=False)
def dynamic_degree(*, fps: float = 8.0, flow_short_side: int | None = 256) -> RewardFn:
    """VBench's dynamic degree with Farneback flow in place of RAFT: 1.0 if the clip moves, else 0.0.

    As VBench: frames are subsampled to about 8 fps (every ``round(fps / 8)``-th frame); a pair moves
    when its top-5 % flow magnitude exceeds ``6 · max(1, 8 / fps)`` (256-px scale); the clip is
    dynamic when at least ``round(4 · n / 16)`` of its n kept frames' pairs move (at least one pair:
    VBench's rule would call a 2-frame clip dynamic unconditionally). A binary reward; see
    ``motion_amount`` for the continuous statistic.
    """
    check_option(fps, "fps", kind=(int, float), lo=1e-3, reward="dynamic_degree")
    _check_short_side(flow_short_side, "dynamic_degree")
    interval = max(1, round(fps / 8.0))
    threshold = _VBENCH_THRESHOLD * max(1.0, 8.0 / fps)

    def fn(frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_frames(frames, prompts)
        kept = frames[:, ::interval]
        if kept.shape[1] < 2:
            raise ValueError(f"reward 'dynamic_degree': at fps={fps} every {interval}-th frame is kept, "
                             f"leaving {kept.shape[1]} of {frames.shape[1]} frames; need >= 2")
        motion, _ = _flow_stats(kept, flow_short_side, warp=False)
        need = max(1, round(4 * kept.shape[1] / 16.0))
        moving = (motion > threshold).sum(axis=1)
        return torch.from_numpy((moving >= need).astype(np.float64))

    return fn


@register_reward("motion_quality", role="motion", cheap=False)
def motion_quality(*, motion_target: float | None = None, fps: float = 8.0,
                   flow_short_side: int | None = 256) -> RewardFn:
    """Consistent motion: warp consistency gated by the amount of motion,

        R = min(1, m / m*) · (1 − ē)

    with ē the mean warp error and m the mean top-5 % flow magnitude (both from one Farneback pass,
    see :func:`clip_flow_stats`) and m* = ``motion_target`` (default ``48 / fps``: VBench's "moving"
    threshold, 6 px per pair at 8 fps, per native frame pair). A still clip scores 0; a clip that
    moves at least m* is scored by its consistency alone, so the reward neither collapses to frozen
    video nor pays for ever faster, chaotic motion. Range [0, 1].
    """
    check_option(fps, "fps", kind=(int, float), lo=1e-3, reward="motion_quality")
    check_option(motion_target, "motion_target", kind=(int, float), lo=1e-6, allow_none=True,
                 reward="motion_quality")
    _check_short_side(flow_short_side, "motion_quality")
    m_star = float(motion_target) if motion_target is not None else _VBENCH_THRESHOLD * 8.0 / fps

    def fn(frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_frames(frames, prompts)
        _need_video(frames, "motion_quality")
        motion, error = _flow_stats(frames, flow_short_side, warp=True)
        gate = np.minimum(1.0, motion.mean(axis=1) / m_star)
        return torch.from_numpy(gate * (1.0 - error.mean(axis=1)))

    return fn

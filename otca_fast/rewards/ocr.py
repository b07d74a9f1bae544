"""Text-rendering reward with the bundled PP-OCR models of ``rapidocr-onnxruntime`` (Flow-GRPO's rule).

Install the optional extra: ``pip install 'otca_fast[ocr]'`` (or, to avoid pulling the non-headless
``opencv-python`` next to ``opencv-python-headless``: ``pip install --no-deps rapidocr-onnxruntime``
plus ``onnxruntime pyclipper shapely six``). The models ship inside the wheel: nothing is downloaded.

Scoring (Flow-GRPO ``OcrScorer``): the target is the text between the first pair of double quotes in
the prompt; both the recognised text and the target have spaces removed and are lower-cased;
``d = 0`` if the target is a substring of the recognised text, else the Levenshtein distance, capped
at ``len(target)``; the reward is ``1 − d / len(target)`` in [0, 1].
"""

from __future__ import annotations

import re

import numpy as np
import torch

from otca_fast import checks
from otca_fast.rewards._image import check_option, to_uint8
from otca_fast.rewards.registry import RewardFn, check_frames, register_reward

__all__ = ["ocr", "levenshtein", "quoted_target", "ocr_text_score"]

# "..." (Flow-GRPO's convention) or typographic “...”
_QUOTED = re.compile(r'"([^"]*)"|\u201c([^\u201d]*)\u201d')
_REDUCE = ("mean", "positive_mean")


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def quoted_target(prompt: str) -> str:
    """The text the prompt asks to render: the first double-quoted span (Flow-GRPO convention)."""
    match = _QUOTED.search(prompt)
    if match is None:
        raise ValueError(f"reward 'ocr': prompt {prompt!r} has no quoted target text; OCR prompts carry "
                         f'the text to render in double quotes, e.g. \'a sign that says "OPEN 24 HOURS"\'')
    target = match.group(1) if match.group(1) is not None else match.group(2)
    if not target.replace(" ", ""):
        raise ValueError(f"reward 'ocr': the quoted target text of prompt {prompt!r} is empty")
    return target


def ocr_text_score(recognised: str, target: str) -> float:
    """Flow-GRPO's OCR reward ``1 − min(d, len) / len`` on space-free, lower-cased strings."""
    rec = recognised.replace(" ", "").lower()
    tgt = target.replace(" ", "").lower()
    if not tgt:
        raise ValueError(f"ocr_text_score: target {target!r} is empty after removing spaces")
    dist = 0 if tgt in rec else min(levenshtein(rec, tgt), len(tgt))
    return 1.0 - dist / len(tgt)


def _load_engine(text_score: float):
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError as exc:
        raise ImportError(
            "reward 'ocr' needs rapidocr-onnxruntime (bundled PP-OCR models): pip install 'otca_fast[ocr]', "
            "or pip install --no-deps rapidocr-onnxruntime && pip install onnxruntime pyclipper shapely six"
        ) from exc
    # Detector input sizing of PaddleOCR's defaults (what Flow-GRPO ran): shrink only when the long side
    # exceeds 960 px. RapidOCR's own default upsizes the short side to 736 px, which is ~10x slower on
    # typical 320-1024 px generations and no more accurate for rendered text.
    return RapidOCR(text_score=text_score, det_limit_type="max", det_limit_side_len=960)


@register_reward("ocr", role="alignment", cheap=False)
def ocr(*, frame_stride: int = 4, reduce: str = "mean", text_score: float = 0.5) -> RewardFn:
    """OCR text-rendering reward (Flow-GRPO), see the module docstring for the scoring rule.

    Options:
        frame_stride: for video, OCR every ``frame_stride``-th frame (Flow-GRPO's video OCR uses 4).
        reduce: how frame scores combine: ``"mean"`` over the OCR'd frames, or ``"positive_mean"``
            (Flow-GRPO's video OCR: the mean over frames that scored > 0, 0 if none did).
        text_score: recognitions with confidence below this are dropped (RapidOCR's default 0.5,
            PaddleOCR's ``drop_score`` in Flow-GRPO).
    """
    check_option(frame_stride, "frame_stride", kind=int, lo=1, reward="ocr")
    check_option(text_score, "text_score", kind=(int, float), lo=0.0, hi=1.0, reward="ocr")
    checks.choice("reward 'ocr': option reduce", reduce, list(_REDUCE))
    engine = _load_engine(float(text_score))

    def read(frame_rgb: np.ndarray) -> str:
        # RapidOCR takes an ndarray as OpenCV BGR; angle classification off, as Flow-GRPO runs PaddleOCR.
        result, _ = engine(np.ascontiguousarray(frame_rgb[..., ::-1]), use_cls=False)
        if not result:
            return ""
        return "".join(text for _, text, _ in result)   # boxes come sorted top-to-bottom, left-to-right

    def fn(frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        prompts = check_frames(frames, prompts)
        targets = [quoted_target(p) for p in prompts]   # fail before any OCR runs
        pixels = to_uint8(frames[:, ::frame_stride])
        scores = torch.empty(len(prompts), dtype=torch.float64)
        for i, target in enumerate(targets):
            per_frame = np.array([ocr_text_score(read(f), target) for f in pixels[i]])
            if reduce == "positive_mean":
                positive = per_frame[per_frame > 0]
                scores[i] = float(positive.mean()) if positive.size else 0.0
            else:
                scores[i] = float(per_frame.mean())
        return scores

    return fn

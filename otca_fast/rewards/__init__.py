"""Reward registry for GRPO on image and video generators.

``build_reward(name, **options)`` gives a :class:`Reward` (name, role, cost flag, ``fn(frames, prompts)``);
``score_rewards(rewards, frames, prompts, step=...)`` evaluates several at once into ``[B, K]`` and turns
any failure or NaN/Inf into a :class:`RewardError` naming the reward, the prompt and the step.
``list_rewards()`` shows what is registered; ``docs/rewards.md`` documents each reward.

Importing this package registers the weight-free rewards (``pixel``, ``video``), the OCR reward and the
local-weights CLIP-family rewards; their heavy dependencies (rapidocr, transformers) load only when such
a reward is built.
"""

from otca_fast.rewards import clip_models, ocr, pixel, video  # noqa: F401  (registers the rewards)
from otca_fast.rewards.registry import (
    ROLES,
    Reward,
    RewardError,
    build_reward,
    check_frames,
    list_metrics,
    list_rewards,
    register_metric,
    register_reward,
    score_metrics,
    score_rewards,
)

__all__ = [
    "ROLES", "Reward", "RewardError", "build_reward", "check_frames", "list_metrics", "list_rewards",
    "register_metric", "register_reward", "score_metrics", "score_rewards",
]

"""Reward registry for GRPO on image and video generators.

``build_reward(name, **options)`` gives a :class:`Reward` (name, role, cost flag, ``fn(frames, prompts)``);
``score_rewards(rewards, frames, prompts, step=...)`` evaluates several at once into ``[B, K]`` and turns
any failure or NaN/Inf into a :class:`RewardError` naming the reward, the prompt and the step.
``list_rewards()`` shows what is registered; ``docs/rewards.md`` documents each reward.

Importing this package registers the weight-free rewards (``pixel``, ``video``), the OCR reward, the
local-weights CLIP-family rewards, and the rewards scored out of process: ``remote`` (a reward server,
``python -m otca_fast.rewards.serve``) and ``vlm_judge`` (an OpenAI-compatible VLM endpoint); their heavy
dependencies (rapidocr, transformers, requests) load only when such a reward is built or called.
"""

from otca_fast.rewards import clip_models, ocr, pixel, remote, video, vlm_judge  # noqa: F401  (registers the rewards)
from otca_fast.rewards.registry import (
    ROLES,
    Reward,
    RewardCallError,
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
    "ROLES", "Reward", "RewardCallError", "RewardError", "build_reward", "check_frames", "list_metrics", "list_rewards",
    "register_metric", "register_reward", "score_metrics", "score_rewards",
]

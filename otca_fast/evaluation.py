"""Held-out evaluation: fixed-noise ODE clips of the evaluation prompts, scored by the trained rewards and
by eval-only metrics the trainer never optimises, kept clip by clip so changes come with intervals.

A reward curve is a claim, not evidence: the policy is trained to raise it, and it can raise it the
wrong way (reward hacking). An *eval metric* (``eval.metrics:`` in a config: any registered reward or
eval-only metric, or ``package.module:callable``) is a judge the policy never sees. Every evaluation of
a run scores the same clips (same prompts, same noise) with both, so each change from the run's first
evaluation (the base model) is a paired comparison, and :func:`hacking_alarms` says when a trained reward
rose while an eval metric fell, each beyond its bootstrap interval.

Keys of :attr:`Evaluation.values`: ``reward/<name>`` for each trained reward and ``metric/<name>``
(``metric/<name>/<part>`` for each part of a multi-part metric) for each eval metric.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from otca_fast.stats import Interval, paired_difference

__all__ = ["Evaluation", "HackingAlarm", "HeldOut", "evaluation_rows", "evaluation_noise", "sample_and_score",
           "compare", "metric_part_keys", "hacking_alarms"]


@dataclass
class Evaluation:
    """The per-clip scores of one evaluation: ``values[key]`` is ``[P, S]`` (prompt, clip)."""

    step: int
    prompts: list[str]
    samples_per_prompt: int
    seed: int
    values: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shape = (len(self.prompts), self.samples_per_prompt)
        for key, value in self.values.items():
            if tuple(value.shape) != shape:
                raise ValueError(f"values[{key!r}]: expected shape {shape} (prompts, clips), got {tuple(value.shape)}")

    @classmethod
    def from_rows(cls, step: int, prompts: Sequence[str], samples_per_prompt: int, seed: int,
                  rows: dict[str, torch.Tensor]) -> Evaluation:
        """From per-row scores in :func:`evaluation_rows` order (each prompt's clips together)."""
        p, s = len(prompts), samples_per_prompt
        return cls(step, list(prompts), s, seed, {k: v.float().reshape(p, s) for k, v in rows.items()})

    def mean(self, key: str) -> float:
        return float(self.values[key].double().mean())

    def log_record(self, reward_weights: dict[str, float] | None = None) -> dict[str, float]:
        """``eval/<key>`` means for the metrics log, plus ``eval/reward/total`` (weighted) when weights are given."""
        record = {f"eval/{key}": self.mean(key) for key in self.values}
        if reward_weights:
            record["eval/reward/total"] = sum(w * self.mean(f"reward/{name}") for name, w in reward_weights.items())
        return record

    def to_json(self) -> dict:
        return {"step": self.step, "seed": self.seed, "samples_per_prompt": self.samples_per_prompt,
                "prompts": self.prompts, "values": {k: v.tolist() for k, v in self.values.items()}}

    @classmethod
    def from_json(cls, data: dict) -> Evaluation:
        return cls(int(data["step"]), list(data["prompts"]), int(data["samples_per_prompt"]), int(data["seed"]),
                   {k: torch.tensor(v, dtype=torch.float32) for k, v in data["values"].items()})

    def save(self, path: str | Path) -> Path:
        """Write to ``path`` (a temporary name, then renamed)."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(self.to_json()) + "\n")
        os.replace(tmp, out)
        return out

    @classmethod
    def load(cls, path: str | Path) -> Evaluation:
        return cls.from_json(json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class HackingAlarm:
    """A trained reward rose beyond its noise while an eval metric fell beyond its noise."""

    step: int
    metric: str
    metric_change: Interval
    reward: str
    reward_change: Interval

    def message(self) -> str:
        level = round(100 * self.metric_change.level)
        return (f"step {self.step}: eval metric {self.metric} fell {self.metric_change.format()} while the trained "
                f"reward {self.reward} rose {self.reward_change.format()} (changes from the first evaluation, "
                f"{level}% bootstrap intervals over {self.metric_change.n} prompts): the policy may be gaming "
                f"its reward")


def evaluation_rows(prompts: Sequence[str], samples_per_prompt: int) -> list[str]:
    """The prompt of each evaluated clip: each prompt's ``samples_per_prompt`` clips together."""
    return [p for p in prompts for _ in range(samples_per_prompt)]


def evaluation_noise(rows: int, latent_shape: Sequence[int], seed: int, *, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The fixed initial noise of an evaluation: row n is the same for every evaluation with ``seed``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn((rows, *latent_shape), generator=generator, device=device).to(dtype)


def sample_and_score(backbone, prompts: Sequence[str], noise: torch.Tensor, *, sigmas: torch.Tensor,
                     batch_size: int, guidance_scale: float, negative_prompt: str, rewards: Sequence,
                     metrics: Sequence, step: int, autocast: Callable = contextlib.nullcontext,
                     keep_frames: int = 0, scorer: Callable | None = None,
                     on_progress: Callable[[int], None] | None = None) -> tuple[dict[str, torch.Tensor],
                                                                                list[torch.Tensor]]:
    """ODE-sample one clip per row of ``noise`` and score it: ``({key: [N]}, kept clips)``.

    ``rewards`` and ``metrics`` are built :class:`otca_fast.rewards.Reward` objects; ``scorer`` wraps the
    scoring function (the trainer's error protocol on several ranks). Clips are decoded and scored chunk
    by chunk, so only ``batch_size`` clips are held at a time. ``on_progress`` is called after every
    denoising step of a chunk (it may raise to abandon the evaluation: the trainer's stop points).
    """
    from otca_fast.rewards import score_metrics, score_rewards
    from otca_fast.rollout import sample_trajectories

    prompts = list(prompts)
    cond = backbone.encode_prompts(prompts)
    uncond = None
    if guidance_scale != 1.0:
        uncond = backbone.encode_prompts([negative_prompt] * min(batch_size, len(prompts)))
    metric_chunks: list[dict[str, torch.Tensor]] = []

    def score(frames: torch.Tensor, chunk_prompts: list[str], step: int) -> torch.Tensor:
        if metrics:
            metric_chunks.append(score_metrics(list(metrics), frames, chunk_prompts, step=step))
        return score_rewards(list(rewards), frames, chunk_prompts, step=step)

    num_steps = sigmas.numel() - 1
    result = sample_trajectories(
        backbone, cond, sigmas=sigmas, sde_mask=torch.zeros(num_steps, dtype=torch.bool), init_noise=noise,
        prompts=prompts, batch_size=batch_size, dynamics="ode", noise_level=0.0, generator=None,
        guidance_scale=guidance_scale, uncond=uncond, autocast=autocast, step=step,
        score_fn=scorer(score) if scorer is not None else score, reward_executor=None, keep_frames=keep_frames,
        on_progress=on_progress)
    values = {f"reward/{r.name}": result.rewards[:, k] for k, r in enumerate(rewards)}
    if metric_chunks:
        for key in metric_chunks[0]:
            values[f"metric/{key}"] = torch.cat([chunk[key] for chunk in metric_chunks])
    return values, result.frames


@dataclass
class HeldOut:
    """What a run evaluates on, the same at every evaluation: ``samples_per_prompt`` clips of each held-out
    prompt from fixed noise (``seed``), ODE-sampled over ``sigmas`` and scored by the trained ``rewards`` and the
    eval-only ``metrics``; the first ``keep_frames`` clips are kept for the report."""

    backbone: object
    prompts: list[str]
    samples_per_prompt: int
    seed: int
    sigmas: torch.Tensor
    latent_shape: tuple[int, ...]
    latent_dtype: torch.dtype
    batch_size: int
    guidance_scale: float
    negative_prompt: str
    rewards: Sequence
    metrics: Sequence
    keep_frames: int

    def sample(self, step: int, *, device: torch.device, lockstep, autocast: Callable = contextlib.nullcontext,
               ) -> tuple[Evaluation, list[torch.Tensor]]:
        """The evaluation at ``step`` with the weights in place, and the clips kept. ``lockstep``
        (:class:`otca_fast.lockstep.Lockstep`): on several ranks each evaluates an equal share of the rows (the
        last row repeated) and the scores are gathered; a stop signal abandons the evaluation at a stop point."""
        from otca_fast import distributed

        dist = lockstep.dist
        prompts = evaluation_rows(self.prompts, self.samples_per_prompt)
        total = len(prompts)
        noise = evaluation_noise(total, self.latent_shape, self.seed, device=device, dtype=self.latent_dtype)
        if dist.enabled:
            share = distributed.eval_share(dist, total)
            noise, prompts = noise[share], [prompts[i] for i in share.tolist()]

        def sample():
            result = sample_and_score(
                self.backbone, prompts, noise, sigmas=self.sigmas, batch_size=self.batch_size,
                guidance_scale=self.guidance_scale, negative_prompt=self.negative_prompt, rewards=self.rewards,
                metrics=self.metrics, step=step, autocast=autocast,
                scorer=lambda score: lockstep.scorer(score, len(self.rewards)),
                keep_frames=self.keep_frames if dist.is_main else 0, on_progress=lambda _: lockstep.stop_point())
            lockstep.raise_held()
            return result

        rows, clips = lockstep.run(sample, forwards=True)
        rows = {key: distributed.all_gather_rows(dist, value)[:total] for key, value in rows.items()}
        return Evaluation.from_rows(step, self.prompts, self.samples_per_prompt, self.seed, rows), clips


def compare(before: Evaluation, after: Evaluation, *, level: float = 0.9, resamples: int = 2000,
            seed: int = 0) -> dict[str, Interval]:
    """``after − before`` per key with paired bootstrap intervals over the prompts (same prompts, same noise)."""
    if before.prompts != after.prompts or before.samples_per_prompt != after.samples_per_prompt \
            or before.seed != after.seed:
        raise ValueError("compare: the two evaluations must score the same prompts with the same evaluation noise "
                         f"(prompts equal: {before.prompts == after.prompts}, clips per prompt "
                         f"{before.samples_per_prompt} vs {after.samples_per_prompt}, seed {before.seed} vs "
                         f"{after.seed})")
    keys = [k for k in after.values if k in before.values]
    return {k: paired_difference(after.values[k], before.values[k], level=level, resamples=resamples, seed=seed)
            for k in keys}


def metric_part_keys(keys) -> list[str]:
    """The ``metric/…`` keys among ``keys``, without the key of a multi-part metric itself (it repeats its
    headline part)."""
    metric = [k for k in keys if k.startswith("metric/")]
    return [k for k in metric if not any(other.startswith(k + "/") for other in metric)]


def hacking_alarms(step: int, changes: dict[str, Interval]) -> list[HackingAlarm]:
    """Every eval metric (part) that fell beyond its noise while a trained reward rose beyond its noise; each
    alarm names the reward with the largest rise."""
    rising = [(k, c) for k, c in changes.items() if k.startswith("reward/") and c.above_zero]
    if not rising:
        return []
    reward, reward_change = max(rising, key=lambda kc: kc[1].mean)
    return [HackingAlarm(step, k.removeprefix("metric/"), changes[k], reward.removeprefix("reward/"), reward_change)
            for k in metric_part_keys(changes) if changes[k].below_zero]

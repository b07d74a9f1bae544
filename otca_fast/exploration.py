"""What a GRPO group can teach: ``python -m otca_fast.exploration CONFIG``.

GRPO learns only from the spread *inside* a group: a sample is pushed up by how far its reward lies above
its group's mean (A = Σ_k w_k (R_k − mean_group R_k) / std_group R_k with the config's ``credit.aggregate``,
the static mix every credit scheme starts from). So a judged property (an eval-only metric, e.g. the shapes
exam's ``shape`` verdict) can move under training only if

1. the group *disagrees* on it: some samples of one prompt pass and some fail (or the score varies), which
   depends on how the rollout explores (``sample.same_noise``, ``sample.dynamics``, ``sample.noise_level``,
   ``sample.sde``); and
2. the advantage *points at it*: within a group, the samples that pass get the larger advantages, i.e. the
   within-group correlation of A with the judge is positive (a reward that pays for something else gives
   ~0; one that can be gamed against the judge gives < 0).

This command samples groups of the config's training prompts exactly as the trainer's rollout does (the
same backbone, rollout settings and SDE steps), scores them with the rewards and with ``eval.metrics``, and
reports both quantities per judge key. It trains nothing. ``--split WORD`` adds rows for the groups whose
prompt contains WORD (e.g. ``--split square triangle circle``).

    python -m otca_fast.exploration configs/tiny_video.yaml --groups 24 --split square triangle circle
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["group_statistics", "probe_groups", "format_report", "main"]


def _within_group_correlation(x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """Mean over groups of the Pearson correlation of ``x`` and ``y`` ``[groups, G]`` within each group, over the
    groups where both vary; ``(nan, 0)`` when none does."""
    xc = x - x.mean(1, keepdim=True)
    yc = y - y.mean(1, keepdim=True)
    norm = xc.norm(dim=1) * yc.norm(dim=1)
    varies = norm > 1e-9
    if not bool(varies.any()):
        return float("nan"), 0
    corr = (xc * yc).sum(1)[varies] / norm[varies]
    return float(corr.mean()), int(varies.sum())


def group_statistics(rewards: dict[str, torch.Tensor], judges: dict[str, torch.Tensor],
                     weights: dict[str, float], *, std: str = "group", eps: float = 1e-4,
                     adv_clip_max: float = 5.0, aggregate: str = "normalize_then_sum") -> dict[str, dict]:
    """Per judge key: its mean, how often a group disagrees, and the within-group correlation of every reward's
    group z-score and of the total advantage with it.

    ``rewards`` and ``judges`` map names to ``[groups, G]`` scores. The advantages are the trainer's own
    (:func:`otca_fast.reference.group_advantages`, the static mix every credit scheme starts from): per reward
    ``aggregate="none"``, the total with ``weights`` (each reward's, as ``Config.credit_config`` normalises
    them), ``std``, ``eps``, ``adv_clip_max`` and ``aggregate`` of the config's ``credit`` section.
    """
    from otca_fast.reference import group_advantages

    if not rewards or not judges:
        raise ValueError("group_statistics: expected at least one reward and one judge")
    shapes = {tuple(v.shape) for v in [*rewards.values(), *judges.values()]}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"group_statistics: every score must be [groups, G] of one shape, got {sorted(shapes)}")
    groups, size = next(iter(shapes))
    names = list(rewards)
    flat = torch.stack([rewards[n].reshape(-1).double() for n in names], 1)              # [N, K]
    group_ids = torch.arange(groups).repeat_interleave(size)
    options = dict(std=std, eps=eps, adv_clip_max=adv_clip_max)
    per_reward = group_advantages(flat, group_ids, aggregate="none", **options)
    z = {n: per_reward[:, k].view(groups, size) for k, n in enumerate(names)}
    total = group_advantages(flat, group_ids, weights=[weights[n] for n in names], aggregate=aggregate,
                             **options).view(groups, size)
    out = {}
    for key, values in judges.items():
        values = values.float()
        binary = bool(((values == 0) | (values == 1)).all())
        share = values.mean(1)
        row = {"mean": float(values.mean()), "binary": binary,
               "within_group_std": float(values.std(1).mean()),
               "disagreeing_groups": float(((share > 0) & (share < 1)).float().mean()) if binary else None}
        for name in rewards:
            row[f"corr/{name}"], _ = _within_group_correlation(z[name], values)
        row["corr/advantage"], row["groups_with_spread"] = _within_group_correlation(total, values)
        out[key] = row
    return out


def probe_groups(cfg, *, groups: int, seed: int, device: torch.device | None = None) -> dict:
    """Sample ``groups`` groups of ``cfg``'s training prompts as the trainer's rollout does and score them:
    ``{"prompts": [groups], "rewards": {name: [groups, G]}, "judges": {key: [groups, G]}}``."""
    from otca_fast.data import read_prompts, seed_everything
    from otca_fast.devices import DTYPES, resolve_device
    from otca_fast.models.from_config import backbone_from_config, latent_shape_from_config
    from otca_fast.rewards import score_metrics, score_rewards
    from otca_fast.rewards.from_config import rewards_from_config
    from otca_fast.rollout import sample_trajectories
    from otca_fast.timesteps import sde_steps

    if groups < 1:
        raise ValueError(f"groups: expected >= 1, got {groups}")
    if not cfg.eval.metrics:
        raise ValueError("eval.metrics: the config lists no eval-only metric to probe the groups with")
    device = device or resolve_device(cfg.run.device, what="run.device")
    seed_everything(cfg.run.seed)
    backbone = backbone_from_config(cfg.model, device)
    backbone.transformer.requires_grad_(False).eval()
    rewards, metrics = rewards_from_config(cfg)
    s = cfg.sample
    size = s.group_size
    prompts = read_prompts(cfg.data.prompts, cfg.data.prompt_file, "prompt")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(prompts), generator=generator).tolist()
    chosen = [prompts[i] for i in (order * (groups // len(prompts) + 1))[:groups]]
    rows = [p for p in chosen for _ in range(size)]
    latent_shape = latent_shape_from_config(backbone, s)
    noise_generator = torch.Generator(device=device).manual_seed(seed)
    # as the trainer draws it: one initial noise per group (same_noise, DanceGRPO) or one per sample
    noise = torch.randn((groups if s.same_noise else groups * size, *latent_shape), generator=noise_generator,
                        device=device)
    if s.same_noise:
        noise = noise.repeat_interleave(size, 0)
    sde_mask, _ = sde_steps(s.num_steps, s.sde, cfg.credit.scheme, cfg.credit_config(),
                            generator=torch.Generator().manual_seed(seed), progress=0.0)
    metric_chunks: list[dict[str, torch.Tensor]] = []

    def score(frames: torch.Tensor, chunk_prompts: list[str], step: int) -> torch.Tensor:
        metric_chunks.append(score_metrics(list(metrics), frames, chunk_prompts, step=step))
        return score_rewards(list(rewards), frames, chunk_prompts, step=step)

    cond = backbone.encode_prompts(rows)
    uncond = None
    if s.guidance_scale != 1.0:
        uncond = backbone.encode_prompts([s.negative_prompt] * min(s.batch_size, len(rows)))
    sigmas = backbone.sigmas(s.num_steps).detach().to("cpu", torch.float64)
    result = sample_trajectories(
        backbone, cond, sigmas=sigmas, sde_mask=sde_mask, init_noise=noise.to(DTYPES[s.latent_dtype]),
        prompts=rows, batch_size=s.batch_size, dynamics=s.dynamics, noise_level=s.noise_level,
        generator=noise_generator, guidance_scale=s.guidance_scale, uncond=uncond, score_fn=score)
    judges = {key: torch.cat([c[key] for c in metric_chunks]).view(groups, size) for key in metric_chunks[0]}
    return {"prompts": chosen, "sde_mask": sde_mask.tolist(),
            "rewards": {r.name: result.rewards[:, k].view(groups, size) for k, r in enumerate(rewards)},
            "judges": judges,
            "weights": dict(zip([r.name for r in rewards], cfg.credit_config().objective_weights))}


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and value != value:
        return "n/a"
    return f"{value:+.2f}" if isinstance(value, float) else str(value)


def format_report(stats: dict[str, dict], reward_names: Sequence[str], title: str) -> str:
    """A markdown table: one row per judge key."""
    head = (["judge", "mean", "groups disagreeing", "within-group std"]
            + [f"corr(A_{n}, judge)" for n in reward_names] + ["corr(A, judge)", "groups used"])
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, row in stats.items():
        cells = [key, f"{row['mean']:.3f}",
                 "—" if row["disagreeing_groups"] is None else f"{row['disagreeing_groups']:.2f}",
                 f"{row['within_group_std']:.3f}"]
        cells += [_fmt(row[f"corr/{n}"]) for n in reward_names]
        cells += [_fmt(row["corr/advantage"]), str(row["groups_with_spread"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m otca_fast.exploration",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("config", type=Path, help="a training config (its model, rollout, rewards and eval.metrics)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value, as in otca_fast.train (e.g. --set sample.noise_level=1.0)")
    p.add_argument("--groups", type=int, default=24, help="groups (prompts) to sample (default 24)")
    p.add_argument("--seed", type=int, default=0, help="prompt choice and noise seed (default 0)")
    p.add_argument("--split", nargs="*", default=[], metavar="WORD",
                   help="also report the groups whose prompt contains each WORD")
    p.add_argument("--json", type=Path, default=None, help="write the statistics and every sample's scores here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from otca_fast.config import ConfigError, load_config

    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        probe = probe_groups(cfg, groups=args.groups, seed=args.seed)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = list(probe["rewards"])
    c = cfg.credit
    advantage = dict(std=c.std, eps=c.adv_eps, adv_clip_max=c.adv_clip_max, aggregate=c.aggregate)
    report = {"all": group_statistics(probe["rewards"], probe["judges"], probe["weights"], **advantage)}
    print(f"{args.groups} groups of {cfg.sample.group_size}, SDE steps {probe['sde_mask']}, "
          f"dynamics {cfg.sample.dynamics} (noise level {cfg.sample.noise_level}), "
          f"same_noise {cfg.sample.same_noise}\n")
    print(format_report(report["all"], names, "all groups"))
    for word in args.split:
        keep = [i for i, p in enumerate(probe["prompts"]) if word in p.split()]
        if not keep:
            print(f"\n(no sampled prompt contains {word!r})")
            continue
        index = torch.tensor(keep)
        report[word] = group_statistics({k: v[index] for k, v in probe["rewards"].items()},
                                        {k: v[index] for k, v in probe["judges"].items()},
                                        probe["weights"], **advantage)
        print("\n" + format_report(report[word], names, f"groups whose prompt contains {word!r} ({len(keep)})"))
    if args.json is not None:
        args.json.write_text(json.dumps({
            "statistics": report, "prompts": probe["prompts"], "sde_mask": probe["sde_mask"],
            "rewards": {k: v.tolist() for k, v in probe["rewards"].items()},
            "judges": {k: v.tolist() for k, v in probe["judges"].items()}}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

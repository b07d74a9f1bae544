"""Judge a finished run on held-out prompts with fresh seeds: ``python -m otca_fast.judge RUN_DIR``.

The trainer's own evaluations use one fixed noise seed (``eval.seed``), the one every run of a config is
watched and tuned on. A claim about what training did should not rest on it: this command samples the
base model and the trained policy (the checkpoint's EMA weights) from the *same fresh* noise, on every
evaluation prompt, scores the clips with the run's rewards and eval metrics (or the ``--metric`` given),
and reports each change with a paired bootstrap interval over the prompts:

    python -m otca_fast.judge runs/tiny_video --seeds 101 102 --samples-per-prompt 4

Output: a table (markdown with ``--markdown FILE``), and ``--json FILE`` with every clip's scores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from otca_fast.devices import DTYPES, resolve_device
from otca_fast.evaluation import Evaluation, compare, evaluation_noise, evaluation_rows, sample_and_score

__all__ = ["judge_run", "format_table", "main"]


def _load_policies(cfg, checkpoint: Path, device: torch.device, weights: str) -> list[tuple[str, object, object]]:
    """``[(name, backbone, context), ...]`` for ``base`` and ``trained``: ``context()`` puts the policy in
    place (LoRA: one backbone, adapters off for the base; full fine-tuning: two backbones)."""
    from otca_fast import checkpoint as ckpt
    from otca_fast.data import seed_everything
    from otca_fast.finetuning import adapters_disabled, add_lora_adapters
    from otca_fast.models import build_backbone

    m = cfg.model

    def build():
        seed_everything(cfg.run.seed)  # as the trainer does before building: tiny random bases are the same
        backbone = build_backbone(m.family, path=None if m.path is None else str(m.path), tiny=m.tiny or None,
                                  allow_download=m.allow_download, dtype=DTYPES[m.dtype], device=device,
                                  attention_backend=m.attention_backend, **m.options)
        backbone.transformer.requires_grad_(False).eval()
        return backbone

    saved = ckpt.load_checkpoint(checkpoint, map_location="cpu")
    tensors = saved["ema"] if weights == "ema" else saved["weights"]
    if tensors is None:
        raise ValueError(f"--weights ema: checkpoint {checkpoint} has no EMA weights (train.ema.enabled was false); "
                         f"use --weights raw")
    trained = build()
    if cfg.train.finetune == "lora":
        add_lora_adapters(trained, cfg.train.lora)
    named = dict(trained.transformer.named_parameters())
    missing = sorted(set(tensors) - set(named))
    if missing:
        raise ValueError(f"checkpoint {checkpoint}: weights {missing[:3]} do not exist in the model the run's config "
                         f"builds; judge with the config that wrote the checkpoint")
    with torch.no_grad():
        for name, value in tensors.items():
            named[name].copy_(value.to(named[name].device, named[name].dtype))
    if cfg.train.finetune == "lora":
        return [("base", trained, lambda: adapters_disabled(trained.transformer)),
                ("trained", trained, contextlib.nullcontext)]
    return [("base", build(), contextlib.nullcontext), ("trained", trained, contextlib.nullcontext)]


def judge_run(run_dir: str | Path, *, seeds: Sequence[int] = (101,), samples_per_prompt: int = 4,
              checkpoint: str | Path | None = None, metrics: Sequence[str] | None = None, weights: str = "ema",
              device: str = "auto", level: float = 0.9) -> dict:
    """Base vs trained on the run's evaluation prompts with fresh noise (see the module docstring).

    Returns ``{"base": Evaluation, "trained": Evaluation, "changes": {key: Interval}, ...}``; the two
    evaluations stack every seed's clips (``samples_per_prompt`` per seed) along the clip axis.
    """
    from otca_fast import checkpoint as ckpt
    from otca_fast.config import load_config
    from otca_fast.data import read_prompts
    from otca_fast.rewards import build_reward

    run = Path(run_dir)
    cfg = load_config(run / "config.yaml")
    path = Path(checkpoint) if checkpoint is not None else ckpt.latest_checkpoint(run)
    if path is None:
        raise FileNotFoundError(f"{run}: no checkpoint under {run / ckpt.CHECKPOINT_SUBDIR}")
    dev = resolve_device(device, what="device")
    if cfg.model.family == "shapes":
        import otca_fast.toy.exam  # noqa: F401  (registers shapes_exam)
        import otca_fast.toy.rewards  # noqa: F401
    rewards = [build_reward(r.name, **r.options) for r in cfg.rewards]
    metric_specs = [(name, {}) for name in metrics] if metrics is not None else \
        [(m.name, m.options) for m in cfg.eval.metrics]
    judges = [build_reward(name, **options) for name, options in metric_specs]
    prompts = read_prompts(cfg.data.eval_prompts, cfg.data.eval_prompt_file, "eval_prompt")
    policies = _load_policies(cfg, path, dev, weights)
    backbone = policies[-1][1]
    sigmas = backbone.sigmas(cfg.eval.num_steps or cfg.sample.num_steps).detach().to("cpu", torch.float64)
    shape = tuple(backbone.latent_shape(cfg.sample.height, cfg.sample.width, cfg.sample.num_frames))
    guidance = cfg.eval.guidance_scale if cfg.eval.guidance_scale is not None else cfg.sample.guidance_scale
    rows = evaluation_rows(prompts, samples_per_prompt)
    step = int(ckpt.load_checkpoint(path)["step"])
    per_policy: dict[str, list[dict[str, torch.Tensor]]] = {"base": [], "trained": []}
    for seed in seeds:
        noise = evaluation_noise(len(rows), shape, seed, device=dev, dtype=DTYPES[cfg.sample.latent_dtype])
        for name, policy, in_place in policies:
            with in_place():
                values, _ = sample_and_score(policy, rows, noise, sigmas=sigmas, batch_size=cfg.sample.batch_size,
                                             guidance_scale=guidance, negative_prompt=cfg.sample.negative_prompt,
                                             rewards=rewards, metrics=judges, step=step)
            per_policy[name].append({k: v.view(len(prompts), samples_per_prompt) for k, v in values.items()})
    stacked = {name: Evaluation(step, prompts, samples_per_prompt * len(seeds), -1,
                                {k: torch.cat([part[k] for part in parts], 1) for k in parts[0]})
               for name, parts in per_policy.items()}
    changes = compare(stacked["base"], stacked["trained"], level=level)
    return {"run": str(run), "checkpoint": str(path), "step": step, "seeds": list(seeds),
            "samples_per_prompt": samples_per_prompt, "weights": weights, "base": stacked["base"],
            "trained": stacked["trained"], "changes": changes}


def format_table(result: dict) -> str:
    """Markdown: per key the base and trained means, the change with its interval, and the verdict."""
    changes = result["changes"]
    level = round(100 * next(iter(changes.values())).level)
    lines = [f"| key | base | trained | change, {level}% interval over prompts | |", "|---|---|---|---|---|"]
    for key, c in changes.items():
        verdict = "**rose**" if c.above_zero else "**fell**" if c.below_zero else "noise"
        lines.append(f"| {key} | {result['base'].mean(key):.3f} | {result['trained'].mean(key):.3f} | "
                     f"{c.format()} | {verdict} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m otca_fast.judge", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run's output_dir (config.yaml and checkpoints/)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint directory (default: the latest)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[101],
                        help="evaluation noise seeds; use ones the run was not watched on (eval.seed)")
    parser.add_argument("--samples-per-prompt", type=int, default=4, help="clips per prompt and seed")
    parser.add_argument("--metric", dest="metrics", action="append", default=None,
                        help="judge with this metric instead of the run's eval.metrics (repeatable)")
    parser.add_argument("--weights", choices=["ema", "raw"], default="ema", help="the EMA or the raw trained weights")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--level", type=float, default=0.9, help="bootstrap interval level")
    parser.add_argument("--json", type=Path, default=None, help="write every clip's scores and the changes here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the table here")
    args = parser.parse_args(argv)
    if args.samples_per_prompt < 1:
        parser.error(f"--samples-per-prompt: expected >= 1, got {args.samples_per_prompt}")
    result = judge_run(args.run_dir, seeds=args.seeds, samples_per_prompt=args.samples_per_prompt,
                       checkpoint=args.checkpoint, metrics=args.metrics, weights=args.weights, device=args.device,
                       level=args.level)
    table = format_table(result)
    print(f"{result['run']} at step {result['step']} ({result['weights']} weights) vs the base: "
          f"{len(result['base'].prompts)} prompts x {result['base'].samples_per_prompt} clips "
          f"(seeds {result['seeds']})\n")
    print(table)
    if args.markdown is not None:
        args.markdown.write_text(table + "\n")
    if args.json is not None:
        payload = {k: v for k, v in result.items() if k not in ("base", "trained", "changes")}
        payload.update(base=result["base"].to_json(), trained=result["trained"].to_json(),
                       changes={k: c.to_dict() for k, c in result["changes"].items()})
        args.json.write_text(json.dumps(payload) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

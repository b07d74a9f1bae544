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
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from otca_fast.devices import DTYPES, resolve_device
from otca_fast.evaluation import Evaluation, compare, evaluation_noise, evaluation_rows, sample_and_score

__all__ = ["judge_run", "format_table", "headline_key", "write_contact_sheet", "write_exam_sheet", "main"]


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


def _adapters_on_first_steps(cfg, backbone, sigmas: torch.Tensor, steps: int):
    """A context that puts the trained policy in place with its adapters on for the first ``steps`` denoising
    steps of ``sigmas`` only (the base model's velocity below ``sigmas[steps]``)."""
    from otca_fast.finetuning import adapters_disabled

    if cfg.train.finetune != "lora":
        raise ValueError(f"adapter_steps: needs a LoRA run (train.finetune = 'lora'), got {cfg.train.finetune!r}")
    num_steps = sigmas.numel() - 1
    if not 0 <= steps <= num_steps:
        raise ValueError(f"adapter_steps: expected 0 <= K <= {num_steps} (the evaluation's steps), got {steps}")
    # step i evaluates the velocity at sigmas[i]; the first `steps` of them lie above sigmas[steps]
    cut = float(sigmas[steps]) + 1e-4 if steps < num_steps else -1.0
    velocity = backbone.velocity

    def split_velocity(latents, sigma, *args, **kwargs):
        if float(torch.as_tensor(sigma).max()) < cut:
            with adapters_disabled(backbone.transformer):
                return velocity(latents, sigma, *args, **kwargs)
        return velocity(latents, sigma, *args, **kwargs)

    @contextlib.contextmanager
    def in_place():
        backbone.velocity = split_velocity
        try:
            yield
        finally:
            del backbone.velocity  # the class's method again

    return in_place


def judge_run(run_dir: str | Path, *, seeds: Sequence[int] = (101,), samples_per_prompt: int = 4,
              checkpoint: str | Path | None = None, metrics: Sequence[str] | None = None, weights: str = "ema",
              device: str = "auto", level: float = 0.9, keep_clips: bool = False,
              adapter_steps: int | None = None) -> dict:
    """Base vs trained on the run's evaluation prompts with fresh noise (see the module docstring).

    Returns ``{"base": Evaluation, "trained": Evaluation, "changes": {key: Interval}, ...}``; the two
    evaluations stack every seed's clips (``samples_per_prompt`` per seed) along the clip axis. With
    ``keep_clips`` it also holds ``"clips": {"base": [R, F, C, H, W], "trained": ...}``, the first seed's clips
    (row ``p * samples_per_prompt + s`` is prompt ``p``'s clip ``s``, the same noise for both policies).

    ``adapter_steps`` (LoRA runs only) = K: the trained policy uses its adapters on the first K denoising steps
    and the base model on the rest. Where does a change live? GRPO trains only the SDE steps (the others have
    no log-probability), but the adapters act on every step; judging with K = the number of SDE steps shows
    what the trained steps alone do. K = 0 is the base; K = the number of steps is the whole policy.
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
    if adapter_steps is not None:
        policies[-1] = ("trained", backbone, _adapters_on_first_steps(cfg, backbone, sigmas, adapter_steps))
    shape = tuple(backbone.latent_shape(cfg.sample.height, cfg.sample.width, cfg.sample.num_frames))
    guidance = cfg.eval.guidance_scale if cfg.eval.guidance_scale is not None else cfg.sample.guidance_scale
    rows = evaluation_rows(prompts, samples_per_prompt)
    step = int(ckpt.load_checkpoint(path)["step"])
    per_policy: dict[str, list[dict[str, torch.Tensor]]] = {"base": [], "trained": []}
    clips: dict[str, torch.Tensor] = {}
    for seed in seeds:
        noise = evaluation_noise(len(rows), shape, seed, device=dev, dtype=DTYPES[cfg.sample.latent_dtype])
        keep = len(rows) if keep_clips and seed == seeds[0] else 0
        for name, policy, in_place in policies:
            with in_place():
                values, frames = sample_and_score(policy, rows, noise, sigmas=sigmas,
                                                  batch_size=cfg.sample.batch_size, guidance_scale=guidance,
                                                  negative_prompt=cfg.sample.negative_prompt, rewards=rewards,
                                                  metrics=judges, step=step, keep_frames=keep)
            if keep:  # kept per clip [F, C, H, W] or per chunk [b, F, C, H, W]
                parts = [f.float().cpu() for f in frames]
                clips[name] = torch.stack(parts) if parts[0].dim() == 4 else torch.cat(parts)
            per_policy[name].append({k: v.view(len(prompts), samples_per_prompt) for k, v in values.items()})
    stacked = {name: Evaluation(step, prompts, samples_per_prompt * len(seeds), -1,
                                {k: torch.cat([part[k] for part in parts], 1) for k in parts[0]})
               for name, parts in per_policy.items()}
    changes = compare(stacked["base"], stacked["trained"], level=level)
    out = {"run": str(run), "checkpoint": str(path), "step": step, "seeds": list(seeds),
           "samples_per_prompt": samples_per_prompt, "weights": weights, "adapter_steps": adapter_steps,
           "base": stacked["base"],
           "trained": stacked["trained"], "changes": changes}
    if keep_clips:
        out["clips"] = clips
    return out


def headline_key(result: dict) -> str:
    """The key a contact sheet sorts by: the first eval metric's headline (``metric/<name>``), else the first
    reward."""
    keys = list(result["changes"])
    return next((k for k in keys if k.startswith("metric/") and k.count("/") == 1),
                next((k for k in keys if k.startswith("metric/")), keys[0]))


def write_contact_sheet(result: dict, path: str | Path, *, key: str | None = None, rows: int = 12,
                        frames: Sequence[int] | None = None,
                        frame_numbers: Sequence[int] | None = None) -> list[str]:
    """A PNG a person can read: for the ``rows`` prompts whose ``key`` changed most (either way), the first
    seed's first clip of the base and of the trained policy from the same noise, a few frames each, titled with
    both clips' scores. Returns the prompts shown, in order. Needs ``judge_run(..., keep_clips=True)``.
    ``frame_numbers``: the clips' frames' numbers in the original clip, when the clips hold a subset of them
    (the title names the frames shown by these numbers)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "clips" not in result:
        raise ValueError("result: has no clips; call judge_run(..., keep_clips=True)")
    key = key or headline_key(result)
    base, trained = result["base"], result["trained"]
    if key not in base.values:
        raise ValueError(f"key: expected one of {sorted(base.values)}, got {key!r}")
    spp = result["samples_per_prompt"]
    change = trained.values[key].double().mean(1) - base.values[key].double().mean(1)        # [P]
    order = sorted(range(len(base.prompts)), key=lambda p: (-abs(float(change[p])), p))[:rows]
    clip_b, clip_t = result["clips"]["base"], result["clips"]["trained"]
    num_frames = clip_b.shape[1]
    shown = list(frames) if frames is not None else sorted({0, num_frames // 2, num_frames - 1})
    fig, axes = plt.subplots(len(order), 2 * len(shown), figsize=(1.3 * 2 * len(shown), 1.45 * len(order)),
                             squeeze=False)
    for r, p in enumerate(order):
        row = p * spp
        for half, (name, clip, evaluation) in enumerate((("base", clip_b, base), ("trained", clip_t, trained))):
            for c, f in enumerate(shown):
                ax = axes[r, half * len(shown) + c]
                ax.imshow(clip[row, f].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if c == 0:
                    ax.set_title(f"{name}: {float(evaluation.values[key][p, 0]):.2f}", fontsize=7, loc="left")
        axes[r, 0].set_ylabel(base.prompts[p].replace(" moving ", "\nmoving ").replace(" on a ", "\non a "),
                              fontsize=6, rotation=0, ha="right", va="center")
    fig.suptitle(f"{result['run']}, step {result['step']}: the {len(order)} prompts whose {key} changed most\n"
                 f"base (left) and trained (right) from the same noise, frames "
                 f"{[frame_numbers[f] for f in shown] if frame_numbers is not None else shown}; titles: this "
                 f"clip's score",
                 fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [base.prompts[p] for p in order]


def write_exam_sheet(report_dir: Path, run_name: str, base: Evaluation, evaluation: Evaluation,
                     changes: dict, clips: torch.Tensor, *, rows: int,
                     warn: Callable[[str], None]) -> Path | None:
    """``report_dir/exam_sheet.png`` (``eval.sheet_rows``): the first evaluation's clips beside this one's, from the
    same noise, for the ``rows`` prompts whose headline eval metric changed most (``judge.write_contact_sheet``).

    ``clips [R, F, C, H, W]`` are this evaluation's, every row. Three frames of each are kept (uint8): the first
    evaluation's in ``report_dir/eval/sheet_base_frames.pt``, so a resumed run draws the same sheet. At the
    first evaluation (``evaluation is base``) only those frames are written. Returns the sheet's path."""
    from otca_fast.errors import TrainingError

    num_frames = clips.shape[1]
    shown = sorted({0, num_frames // 2, num_frames - 1})
    frames = (clips[:, shown].clamp(0, 1) * 255).round().to(torch.uint8)   # [R, 3, C, H, W]
    base_file = Path(report_dir) / "eval" / "sheet_base_frames.pt"
    if evaluation is base:
        base_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save(frames, base_file)
        return None
    if not base_file.is_file():
        warn(f"eval.sheet_rows: no frames of the first evaluation in {base_file} (a run started before the sheet "
             f"existed?), so report/exam_sheet.png is not drawn")
        return None
    base_frames = torch.load(base_file, weights_only=True)
    if base_frames.shape != frames.shape:
        raise TrainingError(f"eval.sheet_rows: {base_file} holds frames {tuple(base_frames.shape)}, expected "
                            f"{tuple(frames.shape)} like this evaluation's (was eval changed on resume?)")
    result = {"run": run_name, "step": evaluation.step, "base": base, "trained": evaluation, "changes": changes,
              "samples_per_prompt": evaluation.samples_per_prompt,
              "clips": {"base": base_frames.float() / 255, "trained": frames.float() / 255}}
    path = Path(report_dir) / "exam_sheet.png"
    write_contact_sheet(result, path, frame_numbers=shown, rows=min(rows, len(evaluation.prompts)))
    return path


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
    parser.add_argument("--sheet", type=Path, default=None,
                        help="write a PNG of base vs trained clips (same noise) for the prompts whose headline "
                             "metric changed most, either way")
    parser.add_argument("--sheet-rows", type=int, default=12, help="prompts on the --sheet")
    parser.add_argument("--adapter-steps", type=int, default=None, metavar="K",
                        help="LoRA runs: the trained policy uses its adapters on the first K denoising steps only "
                             "(the base renders the rest): where does the change live?")
    args = parser.parse_args(argv)
    if args.samples_per_prompt < 1:
        parser.error(f"--samples-per-prompt: expected >= 1, got {args.samples_per_prompt}")
    if args.sheet_rows < 1:
        parser.error(f"--sheet-rows: expected >= 1, got {args.sheet_rows}")
    result = judge_run(args.run_dir, seeds=args.seeds, samples_per_prompt=args.samples_per_prompt,
                       checkpoint=args.checkpoint, metrics=args.metrics, weights=args.weights, device=args.device,
                       level=args.level, keep_clips=args.sheet is not None, adapter_steps=args.adapter_steps)
    table = format_table(result)
    partial = "" if args.adapter_steps is None else f", adapters on the first {args.adapter_steps} steps only"
    print(f"{result['run']} at step {result['step']} ({result['weights']} weights{partial}) vs the base: "
          f"{len(result['base'].prompts)} prompts x {result['base'].samples_per_prompt} clips "
          f"(seeds {result['seeds']})\n")
    print(table)
    if args.markdown is not None:
        args.markdown.write_text(table + "\n")
    if args.sheet is not None:
        write_contact_sheet(result, args.sheet, rows=args.sheet_rows)
        print(f"\ncontact sheet: {args.sheet}")
    if args.json is not None:
        payload = {k: v for k, v in result.items() if k not in ("base", "trained", "changes", "clips")}
        payload.update(base=result["base"].to_json(), trained=result["trained"].to_json(),
                       changes={k: c.to_dict() for k, c in result["changes"].items()})
        args.json.write_text(json.dumps(payload) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pretrain the shapes base model by flow matching: ``python -m otca_fast.toy.pretrain``.

Recipe (the defaults made the shipped ``assets/`` weights; ``assets/shapes_base.json`` records the exact
arguments, the wall time and the rewards of the result):

* data: clips of the *train* split rendered on the fly (``otca_fast.toy.world.sample_clips``);
* loss: rectified flow, x_t = (1 − σ)·x0 + σ·ε, target v = ε − x0, mean squared error of the velocity
  (the transformer predicts x̂0 and v = (x_t − x̂0)/σ: JiT's "x-prediction, v-loss"); σ = sigmoid(n),
  n ~ N(0.8, 0.8) (JiT's logit-normal, leaning to high noise, where the layout of the clip is decided);
* the prompt is replaced by "" with probability ``--uncond-prob`` so classifier-free guidance works;
* AdamW, linear warm-up then cosine decay, gradient clipping, and an exponential moving average of the
  weights (diffusers' ``EMAModel`` with warm-up; the EMA is what ships);
* text encoder and transformer are trained together from scratch.

Reproducible: everything random comes from generators seeded by ``--seed``; the same seed, torch version
and thread count give the same weights. The run ends by sampling one clip per held-out combination and
scoring it with the three world rewards (and the real clips of the same prompts, as the ceiling).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel

from otca_fast.toy.model import ASSETS_DIR, DEFAULT_TRANSFORMER, ShapesModel, frames_to_latents
from otca_fast.toy.world import WorldConfig, render_clips, sample_clips, split_specs, write_prompt_files

__all__ = ["PretrainArgs", "pretrain", "evaluate", "main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m otca_fast.toy.pretrain", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=ASSETS_DIR, help="directory for the weights, JSON and tokenizer")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.05, help="final lr as a fraction of the peak")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ema-decay", type=float, default=0.998, help="ceiling of the EMA decay (warm-up below it)")
    p.add_argument("--uncond-prob", type=float, default=0.1, help="probability of training on the empty prompt")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: the same float results on any machine, and no OpenMP "
                        "spin-waiting when the cores are shared)")
    p.add_argument("--shift", type=float, default=1.0, help="sampling schedule shift (stored with the weights)")
    p.add_argument("--patch", type=int, nargs=3, default=list(DEFAULT_TRANSFORMER["patch_size"]),
                   metavar=("T", "H", "W"), help="transformer patch (frames, rows, columns)")
    p.add_argument("--heads", type=int, default=DEFAULT_TRANSFORMER["num_attention_heads"])
    p.add_argument("--head-dim", type=int, default=DEFAULT_TRANSFORMER["attention_head_dim"])
    p.add_argument("--ffn", type=int, default=DEFAULT_TRANSFORMER["ffn_dim"], help="feed-forward width")
    p.add_argument("--layers", type=int, default=DEFAULT_TRANSFORMER["num_layers"])
    p.add_argument("--prediction", choices=["x0", "velocity"], default="x0",
                   help="what the transformer outputs (x0: JiT x-prediction; the adapter always returns v)")
    p.add_argument("--sigma-mean", type=float, default=0.8, help="σ = sigmoid(n), n ~ N(mean, std)")
    p.add_argument("--sigma-std", type=float, default=0.8)
    p.add_argument("--init", type=Path, default=None,
                   help="continue from the weights in this directory (written by this command) instead of a random "
                        "initialisation; the architecture, schedule and tokenizer are taken from there, and its "
                        "record is kept under 'continued_from'")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-steps", type=int, default=20, help="ODE steps for the final evaluation samples")
    p.add_argument("--eval-guidance", type=float, nargs="*", default=[1.0, 3.0],
                   help="guidance scales to evaluate (the first is the headline number)")
    p.add_argument("--no-eval", action="store_true", help="skip the final held-out evaluation")
    p.add_argument("--exam-clips", type=int, default=4,
                   help="clips per held-out prompt for the record's exam (8 ODE steps, as the main job evaluates)")
    p.add_argument("--evaluate", type=Path, default=None, metavar="DIR",
                   help="train nothing: re-measure the weights in DIR (rewards and the exam, with the current "
                        "code) and rewrite its record's evaluation fields in place")
    p.add_argument("--preview", type=Path, default=None, help="write a PNG grid of held-out samples here")
    p.add_argument("--snapshot-every", type=int, default=0,
                   help="every N steps write the EMA weights and a preview grid to --snapshot-dir (0 = never); "
                        "does not change the training run")
    p.add_argument("--snapshot-dir", type=Path, default=None, help="where --snapshot-every writes")
    return p


PretrainArgs = argparse.Namespace


def _lr_factor(step: int, *, total: int, warmup: int, min_ratio: float) -> float:
    # linear warm-up to the peak, then half a cosine down to min_ratio·peak
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _snapshot(model: ShapesModel, directory: Path, args: PretrainArgs) -> None:
    # called with the EMA weights swapped in; sampling draws from its own seeded generator, so the training
    # run's random streams (and hence the final weights) are the same with or without snapshots
    model.eval()
    model.save(directory)
    save_preview(model, directory / "preview.png", num_steps=args.eval_steps, seed=args.seed)


def _check_args(args: PretrainArgs) -> None:
    for name in ("steps", "batch_size", "threads", "eval_steps", "exam_clips"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup: expected >= 0, got {args.warmup}")
    for name in ("uncond_prob", "min_lr_ratio", "ema_decay"):
        if not 0 <= getattr(args, name) <= 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a value in [0, 1], got {getattr(args, name)}")
    if args.lr <= 0:
        raise ValueError(f"--lr: expected > 0, got {args.lr}")
    if args.snapshot_every < 0 or (args.snapshot_every and args.snapshot_dir is None):
        raise ValueError("--snapshot-every: expected >= 0, and --snapshot-dir when > 0; got "
                         f"{args.snapshot_every} and {args.snapshot_dir}")


def pretrain(args: PretrainArgs, *, log=None) -> tuple[ShapesModel, dict]:
    """Train a fresh model with ``args`` (see ``--help``); returns the EMA model and the run record."""
    _check_args(args)
    log = log or (lambda line: print(line, flush=True))
    torch.set_num_threads(args.threads)
    world = WorldConfig()
    arch = {"patch_size": tuple(args.patch), "num_attention_heads": args.heads, "attention_head_dim": args.head_dim,
            "ffn_dim": args.ffn, "num_layers": args.layers}
    if args.init is not None:
        model = ShapesModel.load(args.init)
        torch.manual_seed(args.seed)
    else:
        model = ShapesModel.from_config(transformer=arch, world=world, shift=args.shift, prediction=args.prediction,
                                        seed=args.seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, total=args.steps, warmup=args.warmup, min_ratio=args.min_lr_ratio))
    # diffusers' EMA with warm-up: decay_t = min(ema_decay, 1 − (1 + t)^(−3/4)), so early snapshots are not
    # dominated by the random initialisation (a fixed 0.998 would still weigh it 0.998^250 = 0.6 at step 250)
    ema = EMAModel(params, decay=args.ema_decay, use_ema_warmup=True, power=0.75)
    data_gen = torch.Generator().manual_seed(args.seed + 1)
    noise_gen = torch.Generator().manual_seed(args.seed + 2)

    losses: list[float] = []
    history: list[dict] = []
    start = time.perf_counter()
    for step in range(args.steps):
        clips = sample_clips(args.batch_size, split="train", generator=data_gen, config=world)
        x0 = frames_to_latents(clips.frames)
        drop = torch.rand(args.batch_size, generator=noise_gen) < args.uncond_prob
        prompts = ["" if d else p for d, p in zip(drop.tolist(), clips.prompts)]
        sigma = torch.sigmoid(args.sigma_mean + args.sigma_std * torch.randn(args.batch_size, generator=noise_gen))
        noise = torch.randn(x0.shape, generator=noise_gen)
        s = sigma.view(-1, 1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        v = model.velocity(x_t, sigma, model.encode_prompts(prompts))
        loss = torch.nn.functional.mse_loss(v, noise - x0)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretraining loss became {loss.item()} at step {step}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        optimizer.step()
        scheduler.step()
        ema.step(params)
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            recent = sum(losses[-args.log_every:]) / len(losses[-args.log_every:])
            elapsed = time.perf_counter() - start
            history.append({"step": step + 1, "loss": round(recent, 5), "seconds": round(elapsed, 1)})
            log(f"step {step + 1:5d}/{args.steps}  loss {recent:.4f}  grad {float(grad_norm):.3f}  "
                f"lr {scheduler.get_last_lr()[0]:.2e}  {elapsed:7.1f}s")
        if args.snapshot_every and (step + 1) % args.snapshot_every == 0:
            ema.store(params)
            ema.copy_to(params)
            _snapshot(model, args.snapshot_dir / f"step{step + 1:05d}", args)
            ema.restore(params)
            model.train()
            log(f"snapshot written to {args.snapshot_dir / f'step{step + 1:05d}'}")
    wall = time.perf_counter() - start

    ema.copy_to(params)
    trained = model.eval()
    record = {
        "made_by": {
            "command": "python -m otca_fast.toy.pretrain " + " ".join(sys.argv[1:]),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "wall_seconds": round(wall, 1),
            "final_loss": round(sum(losses[-100:]) / len(losses[-100:]), 5),
            "loss_history": history,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": f"{platform.machine()}, {args.threads} torch threads",
        },
        "parameters": {
            "transformer": sum(p.numel() for p in trained.transformer.parameters()),
            "text_encoder": sum(p.numel() for p in trained.text_encoder.parameters()),
        },
    }
    if args.init is not None:  # the chain of runs that made these weights, oldest last
        previous = ShapesModel.load(args.init).meta
        record["continued_from"] = [previous["made_by"], *previous.get("continued_from", [])]
    return trained, record


@torch.no_grad()
def evaluate(model: ShapesModel, *, split: str = "heldout", num_steps: int = 20, guidance_scale: float = 1.0,
             seed: int = 0, repeats: int = 1) -> dict:
    """Mean of the three world rewards on one sample per combination of ``split`` (x ``repeats``)."""
    from otca_fast.toy.rewards import alignment_score, motion_score, quality_score

    specs = split_specs(split) * repeats
    prompts = [s.prompt for s in specs]
    gen = torch.Generator().manual_seed(seed)
    frames = torch.cat([model.sample(prompts[i:i + 48], num_steps=num_steps, guidance_scale=guidance_scale,
                                     generator=gen) for i in range(0, len(prompts), 48)])
    real = render_clips(specs, generator=torch.Generator().manual_seed(seed), config=model.world).frames
    out: dict = {"split": split, "clips": len(specs), "num_steps": num_steps, "guidance_scale": guidance_scale}
    for name, fn in (("alignment", alignment_score), ("motion", motion_score), ("quality", quality_score)):
        out[name] = round(fn(frames, prompts).mean().item(), 4)
        out[f"{name}_real_clips"] = round(fn(real, prompts).mean().item(), 4)
    return out


@torch.no_grad()
def exam(model: ShapesModel, *, seed: int = 0, clips_per_prompt: int = 4, num_steps: int = 8) -> dict:
    """Share of held-out clips passing each verdict of the exam (``otca_fast.toy.exam``), which the rewards
    never see: the base's own exam table."""
    from otca_fast.toy.exam import exam_verdicts

    prompts = [s.prompt for s in split_specs("heldout") for _ in range(clips_per_prompt)]
    gen = torch.Generator().manual_seed(seed)
    frames = torch.cat([model.sample(prompts[i:i + 64], num_steps=num_steps, generator=gen)
                        for i in range(0, len(prompts), 64)])
    verdicts = exam_verdicts(frames, prompts)
    return {"clips": len(prompts), "num_steps": num_steps, "seed": seed,
            **{k: round(float(v.float().mean()), 4) for k, v in verdicts.items()}}


def save_preview(model: ShapesModel, path: Path, *, rows: int = 8, num_steps: int = 20, seed: int = 0) -> Path:
    """A PNG grid: each row one held-out prompt, sampled frames left to right."""
    import imageio.v3 as iio

    specs = split_specs("heldout")[:: max(1, len(split_specs("heldout")) // rows)][:rows]
    frames = model.sample([s.prompt for s in specs], num_steps=num_steps, generator=torch.Generator().manual_seed(seed))
    b, f, c, h, w = frames.shape
    pad = torch.ones(b, f, c, h, 2)
    grid = torch.cat([frames, pad], dim=-1).permute(0, 3, 1, 4, 2).reshape(b * h, f * (w + 2), c)
    image = (grid.repeat_interleave(3, 0).repeat_interleave(3, 1) * 255).round().to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, image)
    return path


def _measure(model: ShapesModel, record: dict, args: PretrainArgs) -> None:
    """The record's evaluation fields: the three rewards (held-out per guidance scale, and train), and the
    exam's verdicts on the held-out prompts (4 clips each, 8 ODE steps, as the main job's evaluation)."""
    record["heldout_rewards"] = [evaluate(model, num_steps=args.eval_steps, guidance_scale=g, seed=args.seed)
                                 for g in args.eval_guidance]
    record["train_rewards"] = [evaluate(model, split="train", num_steps=args.eval_steps,
                                        guidance_scale=args.eval_guidance[0], seed=args.seed)]
    record["heldout_exam"] = exam(model, seed=args.seed, clips_per_prompt=args.exam_clips)
    print(json.dumps({k: record[k] for k in ("heldout_rewards", "train_rewards", "heldout_exam")}, indent=2))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.evaluate is not None:
        _check_args(args)
        torch.set_num_threads(args.threads)
        model = ShapesModel.load(args.evaluate)
        record = dict(model.meta)
        _measure(model, record, args)
        record["evaluated_by"] = {"command": "python -m otca_fast.toy.pretrain " + " ".join(
            sys.argv[1:] if argv is None else argv), "torch": torch.__version__}
        model.save(args.evaluate, meta=record)
        print(f"rewrote the record in {args.evaluate}")
        return 0
    model, record = pretrain(args)
    if not args.no_eval:
        _measure(model, record, args)
    out = model.save(args.out, meta=record)
    write_prompt_files(args.out)
    print(f"wrote {out}")
    if args.preview is not None:
        print(f"wrote {save_preview(model, args.preview, num_steps=args.eval_steps, seed=args.seed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Train several variants of ``configs/tiny_video.yaml`` at once and tabulate their held-out gains.

    python bench/sweep_tiny_video.py --device cuda --deadline 430 --max-steps 400 [--only NAME ...]

Each variant is ``python -m otca_fast.train configs/tiny_video.yaml --set ...`` in its own process
(one CPU thread each, all sharing the GPU when ``--device cuda``), evaluated every 25 steps on the
held-out prompts; runs still going at ``--deadline`` seconds are stopped and reported up to their last
evaluation. Writes ``OUT/summary.json`` and ``OUT/runs/NAME/``. This is how the defaults of the
embedded run were chosen (bench/RESULTS.md, "Does the embedded default learn?"); the variants below
are the ones of that sweep, relative to the config as it was then (all-SDE rollouts, independent
initial noise): edit ``VARIANTS`` to ask other questions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

_F50 = ["sample.sde.mode=fraction", "sample.sde.fraction=0.5"]
_ALL_SDE = ["sample.sde.mode=all", "sample.same_noise=false"]
_SAME_NOISE = ["sample.same_noise=true"]
_INDEPENDENT = ["sample.same_noise=false"]
_UNIFORM = ["credit.scheme=uniform"]


def _full(lr: float) -> list[str]:
    return ["train.finetune=full", f"optimizer.lr={lr}"]


VARIANTS: dict[str, list[str]] = {
    "base_otca": _ALL_SDE,
    "base_uni": _ALL_SDE + _UNIFORM,
    "f50_otca": _F50 + _INDEPENDENT,
    "f50_uni": _F50 + _INDEPENDENT + _UNIFORM,
    "f50_sn_otca": _F50 + _SAME_NOISE,
    "f50_sn_uni": _F50 + _SAME_NOISE + _UNIFORM,
    "f50_full1e4_otca": _F50 + _INDEPENDENT + _full(1e-4),
    "f50_full1e4_uni": _F50 + _INDEPENDENT + _full(1e-4) + _UNIFORM,
    "f50_sn_full1e4_otca": _F50 + _SAME_NOISE + _full(1e-4),
    "f50_sn_full1e4_uni": _F50 + _SAME_NOISE + _full(1e-4) + _UNIFORM,
    "f50_lora1e3_otca": _F50 + _INDEPENDENT + ["optimizer.lr=1e-3"],
    "f50_sn_lora1e3_uni": _F50 + _SAME_NOISE + _UNIFORM + ["optimizer.lr=1e-3"],
    "f75_a10_otca": ["sample.sde.mode=fraction", "sample.sde.fraction=0.75", "sample.noise_level=1.0"]
    + _INDEPENDENT,
    "f50_sn_full3e4_otca": _F50 + _SAME_NOISE + _full(3e-4),
    "f50_sn_g16_otca": _F50 + _SAME_NOISE + ["sample.group_size=16"],
    "f50_sn_timing": _F50 + _SAME_NOISE + ["credit.scheme=otca_timing"],
}
# OTCA's options on today's defaults (SDE on the first half, shared noise), two seeds each:
# which half of OTCA (TCD's step weights, MOCA's objective mix) costs what, and what repairs it
CREDIT_VARIANTS: dict[str, list[str]] = {}
for _seed in (0, 1):
    CREDIT_VARIANTS.update({
        f"otca_s{_seed}": [],
        f"uniform_s{_seed}": _UNIFORM,
        f"otca_expl05_s{_seed}": ["credit.exploration=0.5"],
        f"otca_eps01_s{_seed}": ["credit.eps=0.1"],
        f"otca_expl05_eps01_s{_seed}": ["credit.exploration=0.5", "credit.eps=0.1"],
        f"otca_x0pred_s{_seed}": ["credit.source=x0_pred"],
        f"tcd_only_s{_seed}": ["credit.scheme=tcd_only"],
        f"moca_only_s{_seed}": ["credit.scheme=moca_only"],
    })
    for _name in list(CREDIT_VARIANTS):
        if _name.endswith(f"_s{_seed}"):
            CREDIT_VARIANTS[_name] = CREDIT_VARIANTS[_name] + [f"run.seed={_seed}"]
SWEEPS = {"defaults": VARIANTS, "credit": CREDIT_VARIANTS}
COMMON = ["eval.every=25", "eval.samples_per_prompt=2", "eval.save_clips=false", "run.plot_every=0",
          "run.tensorboard=false", "run.progress=none", "train.checkpoint_every=1000", "run.log_every=25",
          "train.mixed_precision='no'"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--deadline", type=float, default=430.0, help="seconds before unfinished runs are stopped")
    p.add_argument("--max-steps", type=int, default=400)
    p.add_argument("--sweep", choices=sorted(SWEEPS), default="defaults",
                   help="defaults: the sweep that chose the embedded config; credit: OTCA's options")
    p.add_argument("--only", nargs="+", default=None, help="run only these variants of the sweep")
    p.add_argument("--config", default="configs/tiny_video.yaml")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/sweep")))
    args = p.parse_args(argv)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = {}
    variants = SWEEPS[args.sweep]
    unknown = sorted(set(args.only or ()) - set(variants))
    if unknown:
        p.error(f"--only: not in the {args.sweep!r} sweep: {unknown}")
    for name, overrides in variants.items():
        if args.only and name not in args.only:
            continue
        run_dir = args.out / "runs" / name
        run_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "otca_fast.train", args.config, "--overwrite"]
        for o in [f"run.device={args.device}", f"train.max_steps={args.max_steps}", *COMMON, *overrides,
                  f"run.output_dir={run_dir}"]:
            cmd += ["--set", o]
        procs[name] = subprocess.Popen(cmd, stdout=open(run_dir / "log.txt", "w"), stderr=subprocess.STDOUT, env=env)
    start = time.time()
    while time.time() - start < args.deadline and any(p.poll() is None for p in procs.values()):
        time.sleep(5)
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
    summary = {}
    for name, proc in procs.items():
        path = args.out / "runs" / name / "metrics.jsonl"
        rows = [json.loads(line) for line in path.open()] if path.exists() else []
        evals = [(r["step"], {k.removeprefix("eval/reward/"): v for k, v in r.items() if k.startswith("eval/reward/")})
                 for r in rows if any(k.startswith("eval/reward/") for k in r)]
        step_s = [r["time/step_s"] for r in rows if "time/step_s" in r]
        summary[name] = {"returncode": proc.returncode, "evals": evals,
                         "step_s": sum(step_s) / len(step_s) if step_s else None}
        print(name, "exit", proc.returncode, *(f"\n   {s} {e}" for s, e in evals))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

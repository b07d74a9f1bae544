"""The credit benchmark: ``python -m otca_fast.bench_credit [--quick]``.

Every credit scheme trains the shipped shapes base model (``otca_fast.toy``) with the three world rewards
(``shapes_alignment``, ``shapes_motion``, ``shapes_quality``) on the *same* budget — the base config
(``configs/tiny_video.yaml``: prompts per step, group size, sampling steps, learning rate, training steps)
with only ``credit.scheme``, ``run.seed`` and ``run.output_dir`` changed — for several seeds, then is
evaluated on the held-out prompts (EMA weights, ODE sampling, fixed evaluation noise, so every run's
step-0 evaluation is the same base-model number).

It reports, per scheme: mean and spread (std over seeds) of each objective after training, the
average over objectives of the improvement over the base, and wall time per run; writes the table as the
"Credit benchmark on the shapes world" section of ``bench/RESULTS.md`` (the other sections are left as
they are), with a plain statement of which scheme wins and by how much, and a plot next to it.
The ablations ``tcd_only`` (OTCA's timestep credit with a static objective mix) and ``moca_only``
(OTCA's objective mix with uniform timestep credit) run too, as the paper's Table 4 does.

``--quick`` (CI): one seed, one training step of 2 prompts x 2 samples, 2 denoising steps, 4 held-out
prompts; it checks that every scheme runs end to end, not which one wins.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["SCHEMES", "ABLATIONS", "FULL_BUDGET", "OBJECTIVES", "SECTION_HEADING", "bench_config", "run_scheme",
           "summarise", "write_results", "merge_section", "plot_results", "main"]

SCHEMES: tuple[str, ...] = ("uniform", "dance", "tempflow", "window", "coca", "otca", "otca_timing")
ABLATIONS: tuple[str, ...] = ("tcd_only", "moca_only")
OBJECTIVES: tuple[str, ...] = ("shapes_alignment", "shapes_motion", "shapes_quality")
_REPO = Path(__file__).resolve().parent.parent
_DEFAULT_CONFIG = _REPO / "configs" / "tiny_video.yaml"
SECTION_HEADING = "## Credit benchmark on the shapes world (issue 6)"
# The full benchmark's budget: the main job's config with fewer training steps, so that all 9 schemes x 3
# seeds fit in about 75 minutes on 2 CPU cores (--jobs 2); every scheme gets exactly the same budget.
FULL_BUDGET = {"train.max_steps": 60}
_QUICK = {
    "train.max_steps": 1, "train.checkpoint_every": 1, "sample.num_steps": 2, "sample.group_size": 2,
    "sample.prompts_per_step": 2, "sample.batch_size": 4, "eval.num_steps": 2, "credit.window_size": 1,
}


def _shapes_world(data: dict[str, Any]) -> None:
    """Point a config dict at the shapes world: shipped base model, its prompts and its three rewards."""
    from otca_fast.toy.model import ASSETS_DIR

    data.setdefault("model", {}).update({"family": "shapes", "path": None, "tiny": False})
    data.setdefault("data", {}).update({
        "prompts": [], "prompt_file": str(ASSETS_DIR / "train_prompts.txt"),
        "eval_prompts": [], "eval_prompt_file": str(ASSETS_DIR / "heldout_prompts.txt")})
    data["rewards"] = [{"name": name, "weight": 1.0, "options": {}} for name in OBJECTIVES]
    data.setdefault("sample", {}).update({"height": 32, "width": 32, "num_frames": 9})


def bench_config(scheme: str, seed: int, output_dir: str | Path, *, base_config: str | Path = _DEFAULT_CONFIG,
                 overrides: Sequence[str] = (), quick: bool = False):
    """The :class:`otca_fast.config.Config` of one benchmark run."""
    from otca_fast.config import apply_overrides, parse_config, read_yaml

    if scheme not in SCHEMES + ABLATIONS:
        raise ValueError(f"scheme: expected one of {list(SCHEMES + ABLATIONS)}, got {scheme!r}")
    data = read_yaml(base_config)
    _shapes_world(data)
    settings = [
        f"credit.scheme={scheme}", f"run.seed={seed}", f"run.output_dir={output_dir}", "run.progress=none",
        "run.tensorboard=false", "run.plot_every=0", "eval.enabled=true", "eval.every=0", "eval.save_clips=false",
    ]
    if scheme == "window":
        # MixGRPO / Flow-GRPO-Fast: the credit window *is* the set of SDE steps (drawn in the first half,
        # credit.window_range), so the rollout's own SDE setting must leave every step eligible
        settings.append("sample.sde.mode=all")
    if quick:
        settings += [f"{k}={v}" for k, v in _QUICK.items()]
        apply_overrides(data, settings)
        data["data"]["eval_prompt_file"] = None
        data["data"]["eval_prompts"] = _heldout_prompts()[:4]
    else:
        settings += [f"{k}={v}" for k, v in FULL_BUDGET.items()]
        apply_overrides(data, settings)
    # the user's --set overrides come last, and apply to every scheme alike
    apply_overrides(data, list(overrides))
    data["train"]["checkpoint_every"] = data["train"]["max_steps"]
    data["train"]["keep_checkpoints"] = 1
    return parse_config(data, source=f"{base_config} (bench_credit: {scheme}, seed {seed})")


def _heldout_prompts() -> list[str]:
    from otca_fast.toy.world import split_specs

    return [s.prompt for s in split_specs("heldout")]


def run_scheme(scheme: str, seed: int, output_dir: str | Path, **config_kwargs: Any) -> dict[str, Any]:
    """Train one (scheme, seed) and return its base and final held-out rewards and its wall time."""
    from rich.console import Console

    from otca_fast import report
    from otca_fast.trainer import Trainer

    cfg = bench_config(scheme, seed, output_dir, **config_kwargs)
    start = time.perf_counter()
    with Trainer(cfg, console=Console(stderr=True, quiet=True)) as trainer:
        trainer.train()
        metrics_path = trainer.metrics.path
    wall = time.perf_counter() - start
    evals = [r for r in report.read_metrics(metrics_path) if any(k.startswith("eval/reward/") for k in r)]
    if len(evals) < 2:
        raise RuntimeError(f"{scheme} seed {seed}: expected evaluations at the start and the end in {metrics_path}, "
                           f"got {len(evals)}")
    first, last = evals[0], evals[-1]
    record = {"scheme": scheme, "seed": seed, "wall_seconds": wall, "steps": cfg.train.max_steps,
              "base": {k: first[f"eval/reward/{k}"] for k in OBJECTIVES},
              "final": {k: last[f"eval/reward/{k}"] for k in OBJECTIVES}}
    # the run's record beside its metrics: a benchmark stopped half-way keeps what it measured (--reuse)
    (Path(output_dir) / "bench_result.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per scheme: mean/std of each final objective, of each improvement, of their average."""
    rows = []
    for scheme in dict.fromkeys(r["scheme"] for r in runs):
        mine = [r for r in runs if r["scheme"] == scheme]
        row: dict[str, Any] = {"scheme": scheme, "seeds": len(mine)}
        gains = []
        for k in OBJECTIVES:
            row[k] = _mean_std([r["final"][k] for r in mine])
            row[f"{k}_gain"] = _mean_std([r["final"][k] - r["base"][k] for r in mine])
            gains.append([r["final"][k] - r["base"][k] for r in mine])
        # average over objectives per seed, then mean/std over seeds
        row["avg_gain"] = _mean_std([statistics.fmean(per_seed) for per_seed in zip(*gains)])
        row["wall_seconds"] = _mean_std([r["wall_seconds"] for r in mine])
        rows.append(row)
    return rows


def _verdict(rows: Sequence[dict[str, Any]]) -> list[str]:
    main_rows = [r for r in rows if r["scheme"] in SCHEMES]
    if len(main_rows) < 2:
        return ["Fewer than two schemes ran: no comparison."]
    ranked = sorted(main_rows, key=lambda r: r["avg_gain"][0], reverse=True)
    best, second = ranked[0], ranked[1]
    margin = best["avg_gain"][0] - second["avg_gain"][0]
    noise = math.hypot(best["avg_gain"][1], second["avg_gain"][1])
    if min(best["seeds"], second["seeds"]) > 1:
        spread = (f"the seed spread of that difference is about {noise:.4f}, so the lead is "
                  f"{'larger than' if margin > noise else 'within'} the noise of {best['seeds']} seeds.")
    else:
        spread = "one seed per scheme gives no estimate of the noise: do not read a ranking into it."
    lines = [f"**{best['scheme']}** has the largest average improvement over the base "
             f"({best['avg_gain'][0]:+.4f}), ahead of {second['scheme']} ({second['avg_gain'][0]:+.4f}) "
             f"by {margin:.4f}; {spread}"]
    otca = next((r for r in main_rows if r["scheme"] == "otca"), None)
    if otca is not None and otca is not best:
        rank = [r["scheme"] for r in ranked].index("otca") + 1
        lines.append(f"OTCA does **not** win: it ranks {rank} of {len(ranked)} with {otca['avg_gain'][0]:+.4f}.")
        ablations = {r["scheme"]: r for r in rows if r["scheme"] in ABLATIONS}
        if ablations:
            parts = [f"{name} {row['avg_gain'][0]:+.4f}" for name, row in ablations.items()]
            lines.append("Ablations (Table 4 of the paper): " + ", ".join(parts) + " — compare each with "
                         f"otca ({otca['avg_gain'][0]:+.4f}) and uniform to see which half helps or hurts.")
    return lines


def _fmt(pair: tuple[float, float], signed: bool = False) -> str:
    mean, std = pair
    return f"{mean:+.4f} ± {std:.4f}" if signed else f"{mean:.4f} ± {std:.4f}"


def write_results(path: str | Path, rows: Sequence[dict[str, Any]], runs: Sequence[dict[str, Any]],
                  settings: dict[str, Any], plot_path: str | Path | None = None) -> Path:
    """The Markdown report: settings, the table, the verdict, the plot."""
    base = runs[0]["base"]
    lines = [
        SECTION_HEADING, "",
        f"`{settings['command']}` — {settings['when']}, {settings['machine']}.", "",
        f"Base model: {settings['base_model']}; held-out rewards of the base: "
        + ", ".join(f"{k} {base[k]:.4f}" for k in OBJECTIVES) + ".",
        f"Budget per run (identical for every scheme): {settings['budget']}.", "",
        "Mean ± std over seeds of the held-out rewards after training, of their gain over the base, and of "
        "the average gain over the three objectives; wall time per run.", "",
        "| scheme | seeds | alignment | motion | quality | Δ alignment | Δ motion | Δ quality | avg Δ | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append("| " + " | ".join([
            r["scheme"], str(r["seeds"]), *(_fmt(r[k]) for k in OBJECTIVES),
            *(_fmt(r[f"{k}_gain"], True) for k in OBJECTIVES), _fmt(r["avg_gain"], True),
            f"{r['wall_seconds'][0]:.0f}"]) + " |")
    lines += ["", *_verdict(rows), ""]
    if plot_path is not None:
        lines += [f"![per-objective gains]({Path(plot_path).name})", ""]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(merge_section(out.read_text() if out.is_file() else "", "\n".join(lines)))
    tmp.replace(out)
    return out


def merge_section(document: str, section: str) -> str:
    """``document`` with its credit-benchmark section replaced by ``section`` (appended when absent).

    ``bench/RESULTS.md`` holds every benchmark of the project, one ``## `` section each; only this one is
    rewritten.
    """
    lines = document.splitlines()
    try:
        start = lines.index(SECTION_HEADING)
    except ValueError:
        body = document.rstrip("\n")
        return (body + "\n\n" if body else "") + section.rstrip("\n") + "\n"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    merged = lines[:start] + section.rstrip("\n").splitlines() + ([""] if end < len(lines) else []) + lines[end:]
    return "\n".join(merged).rstrip("\n") + "\n"


def plot_results(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Grouped bars: per scheme, the gain of each objective and the average, with the seed std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [*(f"{k}_gain" for k in OBJECTIVES), "avg_gain"]
    labels = [*(k.removeprefix("shapes_") for k in OBJECTIVES), "average"]
    width = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows)), 3.6))
    for j, (key, label) in enumerate(zip(keys, labels)):
        xs = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, [r[key][0] for r in rows], width, yerr=[r[key][1] for r in rows], label=label, capsize=2)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(rows)), [r["scheme"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("held-out reward − base")
    ax.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _machine(jobs: int) -> str:
    """Where the benchmark ran, for the report: CPU model and cores, GPU if used, parallel runs."""
    import os
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    where = f"{cpu}, {os.cpu_count()} cores"
    if torch.cuda.is_available():
        where += f", {torch.cuda.get_device_name()}"
    return where + (f", {jobs} runs at a time" if jobs > 1 else ", one run at a time")


def _worker_init(threads: int) -> None:
    """A ``--jobs`` worker: its share of the CPU cores, so parallel runs do not oversubscribe them."""
    import torch

    torch.set_num_threads(threads)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m otca_fast.bench_credit", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI smoke run: every scheme, 1 seed, 1 tiny step")
    p.add_argument("--schemes", nargs="+", default=None, help=f"default: {' '.join(SCHEMES + ABLATIONS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 1 2 (--quick: 0)")
    p.add_argument("--config", type=Path, default=_DEFAULT_CONFIG, help="base config (its budget is shared)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override the base config for every run, e.g. --set train.max_steps=40")
    p.add_argument("--jobs", type=int, default=2,
                   help="runs trained at once, in separate processes sharing the CPU cores (or the GPU) evenly "
                        "(default 2: one core each on a 2-core machine)")
    p.add_argument("--reuse", type=Path, default=None, metavar="JSON",
                   help="a credit_benchmark.json of an earlier run: its (scheme, seed) runs that this invocation "
                        "does not train join the table (only valid when nothing they read has changed since)")
    p.add_argument("--out", type=Path, default=None, help="run directories (default: a temporary directory)")
    p.add_argument("--results", type=Path, default=None,
                   help="Markdown report (default: bench/RESULTS.md; with --quick the report is only printed "
                        "unless a path is given)")
    return p


def main(argv: Sequence[str] | None = None) -> int:

    args = _parser().parse_args(argv)
    schemes = args.schemes or list(SCHEMES + ABLATIONS)
    unknown = [s for s in schemes if s not in SCHEMES + ABLATIONS]
    if unknown:
        raise SystemExit(f"--schemes: unknown {unknown}; expected some of {list(SCHEMES + ABLATIONS)}")
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    with tempfile.TemporaryDirectory(prefix="otca_bench_credit_") as scratch:
        out = args.out or Path(scratch)
        results = args.results or (Path(scratch) / "RESULTS.md" if args.quick else _REPO / "bench" / "RESULTS.md")
        if args.jobs < 1:
            raise SystemExit(f"--jobs: expected >= 1, got {args.jobs}")
        jobs = [(scheme, seed, out / f"{scheme}_seed{seed}") for scheme in schemes for seed in seeds]
        kwargs = dict(base_config=args.config, overrides=args.overrides, quick=args.quick)
        runs = []

        def report_run(run: dict[str, Any]) -> None:
            runs.append(run)
            gains = " ".join(f"{k.removeprefix('shapes_')} {run['final'][k] - run['base'][k]:+.4f}"
                             for k in OBJECTIVES)
            print(f"{run['scheme']:12s} seed {run['seed']}: {gains}  ({run['wall_seconds']:.0f} s)", flush=True)

        if args.jobs == 1:
            for scheme, seed, run_dir in jobs:
                report_run(run_scheme(scheme, seed, run_dir, **kwargs))
        else:
            import multiprocessing
            import os
            from concurrent.futures import ProcessPoolExecutor, as_completed

            threads = max(1, (os.cpu_count() or 1) // args.jobs)
            with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=_worker_init, initargs=(threads,)) as pool:
                futures = {pool.submit(run_scheme, scheme, seed, run_dir, **kwargs): (scheme, seed)
                           for scheme, seed, run_dir in jobs}
                for future in as_completed(futures):
                    try:
                        report_run(future.result())
                    except Exception as e:
                        # stop at the first failed run: cancel what has not started, and say which run it was
                        for other in futures:
                            other.cancel()
                        scheme, seed = futures[future]
                        raise RuntimeError(f"bench_credit: run {scheme} seed {seed} failed: {e}") from e
            # the table keeps the order of --schemes and --seeds whatever order the runs finished in
            order = {(scheme, seed): i for i, (scheme, seed, _) in enumerate(jobs)}
            runs.sort(key=lambda r: order[(r["scheme"], r["seed"])])
        if args.reuse is not None:
            trained = {(r["scheme"], r["seed"]) for r in runs}
            earlier = [r for r in json.loads(args.reuse.read_text()) if (r["scheme"], r["seed"]) not in trained]
            print(f"reusing {len(earlier)} runs of {args.reuse}: "
                  f"{sorted({r['scheme'] for r in earlier})}", flush=True)
            runs += earlier
            # the table in the canonical scheme order, whatever order the runs came from
            rank = {name: i for i, name in enumerate(SCHEMES + ABLATIONS)}
            runs.sort(key=lambda r: (rank[r["scheme"]], r["seed"]))
        rows = summarise(runs)
        cfg = bench_config(schemes[0], seeds[0], out / "_", base_config=args.config, overrides=args.overrides,
                           quick=args.quick)
        budget = (f"{cfg.train.max_steps} steps x {cfg.sample.prompts_per_step} prompts x {cfg.sample.group_size} "
                  f"samples, {cfg.sample.num_steps} denoising steps, {cfg.train.finetune} lr {cfg.optimizer.lr}, "
                  f"eval on {len(_heldout_prompts()) if not args.quick else 4} held-out prompts")
        settings = {"command": "python -m otca_fast.bench_credit " + " ".join(argv if argv is not None else
                                                                            sys.argv[1:]),
                    "when": time.strftime("%Y-%m-%d"), "budget": budget,
                    "base_model": ("random tiny weights (model.tiny)" if cfg.model.tiny else
                                   "the shipped shapes base (`otca_fast/toy/assets`)" if cfg.model.path is None
                                   else f"`{cfg.model.path}`"),
                    "machine": _machine(args.jobs)}
        plot = plot_results(rows, results.with_name("credit_benchmark.png"))
        write_results(results, rows, runs, settings, plot_path=plot)
        (results.with_name("credit_benchmark.json")).write_text(json.dumps(runs, indent=2) + "\n")
        if args.quick and args.results is None:
            print(results.read_text())
        else:
            print(f"wrote {results}, {plot} and {results.with_name('credit_benchmark.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

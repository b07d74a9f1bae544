"""The credit benchmark, judged by the exam: ``python -m otca_fast.bench_credit [--quick]``.

Which credit makes better clips, and which reaches them cheaper? Every variant below trains the shapes
world's base model with the embedded default's settings (``configs/tiny_video.yaml``: its base, prompts,
rewards, budget and learning rate), changing only the credit (and, for the compute table, which steps are
trained), for several seeds. The runs are *paired*: seed s is the same for every variant, so every run of
seed s draws the same prompts and the same initial and SDE noise at step 1, and every evaluation scores
the same held-out prompts from the same noise. Differences between variants are therefore measured seed
by seed, and their intervals come from the spread of those paired differences.

Two tables, written as a section of ``bench/RESULTS.md`` (other sections are kept):

* **which credit makes better clips** — per variant (every scheme, the ablations ``tcd_only`` and
  ``moca_only``, and OTCA's MOCA at several exploration levels λ), the gain over the base of the shapes
  exam's all-correct rate and of each verdict (``otca_fast.toy.exam``, a judge the trainer never
  optimises), next to the gains of the trained rewards; and each variant's mean difference from
  ``uniform`` with a 90 % Student-t interval over the paired seeds, marked when it excludes 0;
* **credit that saves compute** — training only the steps the credit picks (``train.timesteps.mode:
  credit``) and Flow-GRPO-Fast / MixGRPO windows of 1 or 2 steps, against ``uniform`` on every trainable
  step: the training time (the sum of ``time/step_s``, evaluations excluded, same machine, same
  invocation) until the all-correct rate first reaches what ``uniform`` reaches at the end of the budget,
  as a ratio to ``uniform``'s whole budget, with its interval over the seeds that reached it. Each run records
  its invocation; a seed whose variant and ``uniform`` were timed by different invocations is left out of this
  table and named under it.

Beside the first table, **trading one objective for another** (what OTCA's MOCA is meant to guard
against): per variant, the share of held-out prompts on which one trained reward (or one exam verdict)
rose by more than 0.05 while another fell by more than 0.05, with its paired difference from ``uniform``.

A variant that trains exactly what another variant trains on the config at hand (:func:`same_as`; on the
embedded default: the ``window`` scheme, whose only window is ``uniform``'s SDE steps; and, with MOCA off, the
ablations ``tcd_only``, which is ``otca``, and ``moca_only``, which is ``uniform``) is left out of the default list,
run with a warning when named, and named under the credit table with its twin and the reason.

``--quick`` (CI): every variant, one seed, one training step of 2 prompts x 2 samples, 2 denoising
steps, 4 held-out prompts; it checks that everything runs end to end, not which variant wins.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["read_runs", "shared_settings", "settings_digest", "settings_difference", "trade_share", "TRADE_KINDS",
           "TRADE_THRESHOLD", "COMPUTE_GOAL", "compute_rows", "invocation_id", "timed_together", "host_description",
           "record_run", "collect_run", "run_directory_name",
           "Variant", "VARIANTS", "same_as", "same_as_uniform",
           "CREDIT_TABLE", "COMPUTE_TABLE", "SCHEMES", "ABLATIONS", "OBJECTIVES", "EXAM_KEYS", "HEADLINE",
           "FULL_BUDGET", "SECTION_HEADING", "bench_config", "run_scheme", "summarise", "time_to_target",
           "write_results", "merge_section", "plot_results", "main"]

SCHEMES: tuple[str, ...] = ("uniform", "dance", "tempflow", "window", "coca", "otca", "otca_timing")
ABLATIONS: tuple[str, ...] = ("tcd_only", "moca_only")
OBJECTIVES: tuple[str, ...] = ("shapes_alignment", "shapes_motion", "shapes_quality")
EXAM_KEYS: tuple[str, ...] = tuple(f"metric/shapes_exam/{v}" for v in (
    "all_correct", "background", "object", "colour", "shape", "direction", "size", "clean"))
HEADLINE = EXAM_KEYS[0]
_REPO = Path(__file__).resolve().parent.parent
_DEFAULT_CONFIG = _REPO / "configs" / "tiny_video.yaml"
SECTION_HEADING = "## Credit benchmark judged by the exam (issue 14)"
# what every run of the full benchmark adds to the embedded default: evaluations every 25 steps (the
# compute table needs the curve) with 4 clips per held-out prompt, no clips or TensorBoard written
FULL_BUDGET = {"eval.every": 25, "eval.samples_per_prompt": 4}
_QUICK = {
    "train.max_steps": 1, "train.checkpoint_every": 1, "sample.num_steps": 2, "sample.group_size": 2,
    "sample.prompts_per_step": 2, "sample.batch_size": 4, "eval.num_steps": 2, "eval.samples_per_prompt": 1,
    "eval.every": 0, "credit.window_size": 1, "credit.window_range": None,
}


@dataclass(frozen=True)
class Variant:
    """One row of a table: a credit scheme with its own settings (``key=value`` overrides)."""

    name: str
    scheme: str
    overrides: tuple[str, ...] = ()
    # "credit": which makes better clips; "compute": which reaches them cheaper; a variant can be in both
    tables: tuple[str, ...] = ("credit",)

    def in_table(self, table: str) -> bool:
        return table in self.tables


def _in_table(name: str, table: str) -> bool:
    return name in VARIANTS and VARIANTS[name].in_table(table)


def _variants() -> dict[str, Variant]:
    rows = [Variant(s, s) for s in SCHEMES + ABLATIONS]
    # MOCA as the paper intends: the min-norm mix (λ = 0) guards against trading one objective for another;
    # λ mixes in the static objective weights (λ = 1 is TCD alone, tcd_only)
    rows += [Variant(f"otca λ={lam:g}", "otca", (f"credit.exploration={lam}",)) for lam in (0.0, 0.1, 0.5)]
    rows += [Variant("moca_only λ=0.1", "moca_only", ("credit.exploration=0.1",))]
    for fraction in (0.25, 0.5):
        for mode in ("importance", "topk"):
            rows.append(Variant(f"credit {fraction:g} {mode}", "otca", (
                "train.timesteps.mode=credit", f"train.timesteps.fraction={fraction}",
                f"train.timesteps.select_mode={mode}"), tables=("compute",)))
    # Flow-GRPO-Fast / MixGRPO: a window of 1 or 2 SDE steps (ODE elsewhere) is all that is sampled and trained.
    # Also the window scheme's rows of the credit table: the scheme's own default (a window of 4 in [0, 4)) is
    # uniform on the embedded default (same_as)
    rows += [Variant(f"window {size}", "window", (f"credit.window_size={size}", "credit.window_range=[0, 4]"),
                     tables=("credit", "compute")) for size in (1, 2)]
    return {v.name: v for v in rows}


VARIANTS: dict[str, Variant] = _variants()
CREDIT_TABLE: tuple[str, ...] = tuple(n for n, v in VARIANTS.items() if v.in_table("credit"))
COMPUTE_TABLE: tuple[str, ...] = tuple(n for n, v in VARIANTS.items() if v.in_table("compute"))


def _shapes_world(data: dict[str, Any]) -> None:
    """Point a config dict at the shapes world: its shipped base, prompts, rewards and the exam."""
    from otca_fast.toy.model import ASSETS_DIR

    data.setdefault("model", {}).update({"family": "shapes", "path": None, "tiny": False})
    data.setdefault("data", {}).update({
        "prompts": [], "prompt_file": str(ASSETS_DIR / "train_prompts.txt"),
        "eval_prompts": [], "eval_prompt_file": str(ASSETS_DIR / "heldout_prompts.txt")})
    # the config's own weights when it already names the three world rewards (the embedded default weights
    # alignment x3), else the three at weight 1
    if sorted(r.get("name") for r in data.get("rewards") or []) != sorted(OBJECTIVES):
        data["rewards"] = [{"name": name, "weight": 1.0, "options": {}} for name in OBJECTIVES]
    data.setdefault("eval", {})["metrics"] = [{"name": "shapes_exam", "options": {}}]
    data.setdefault("sample", {}).update({"height": 32, "width": 32, "num_frames": 9})


def bench_config(scheme: str, seed: int, output_dir: str | Path, *, base_config: str | Path = _DEFAULT_CONFIG,
                 overrides: Sequence[str] = (), quick: bool = False):
    """The :class:`otca_fast.config.Config` of one run of a variant (``scheme`` is a variant name)."""
    from otca_fast.config import apply_overrides, parse_config, read_yaml

    if scheme not in VARIANTS:
        raise ValueError(f"scheme: expected one of {list(VARIANTS)}, got {scheme!r}")
    variant = VARIANTS[scheme]
    data = read_yaml(base_config)
    _shapes_world(data)
    settings = [
        f"credit.scheme={variant.scheme}", f"run.seed={seed}", f"run.output_dir={output_dir}", "run.progress=none",
        "run.tensorboard=false", "run.plot_every=0", "eval.enabled=true", "eval.save_clips=false",
    ]
    if variant.scheme == "window":
        # MixGRPO / Flow-GRPO-Fast: the credit window *is* the set of SDE steps (drawn in credit.window_range),
        # so the rollout's own SDE setting must leave every step eligible
        settings.append("sample.sde.mode=all")
    settings += list(variant.overrides)
    settings += [f"{k}={'null' if v is None else v}" for k, v in (_QUICK if quick else FULL_BUDGET).items()]
    apply_overrides(data, settings)
    if quick:
        data["data"]["eval_prompt_file"] = None
        data["data"]["eval_prompts"] = _heldout_prompts()[:4]
    # the user's --set overrides come last, and apply to every variant alike
    apply_overrides(data, list(overrides))
    data["train"]["checkpoint_every"] = data["train"]["max_steps"]
    data["train"]["keep_checkpoints"] = 1
    return parse_config(data, source=f"{base_config} (bench_credit: {scheme}, seed {seed})")


def same_as(scheme: str, *, base_config: str | Path = _DEFAULT_CONFIG, overrides: Sequence[str] = (),
            quick: bool = False) -> tuple[str, str] | None:
    """``(twin, why)`` when the variant ``scheme`` trains exactly what the variant ``twin`` trains on this config
    (its runs would repeat the twin's, or differ from them by noise alone), else ``None``.

    * A ``window`` whose range leaves one possible window (or whose schedule is ``fixed``) and whose steps are
      ``uniform``'s SDE steps, every one trained, is ``uniform`` with another random stream: on the embedded
      default (8 steps, window 4 in [0, 4), the first half of the steps SDE).
    * With MOCA off (``credit.exploration`` 1) and unequal reward weights, OTCA's objective mix is
      ``0·c* + c_static`` = ``c_static`` exactly (:func:`otca_fast.credit.build_advantages`), so ``tcd_only``
      (TCD's step credit with the static mix) is ``otca`` to the last bit, and ``moca_only`` (that mix on every
      step alike) is ``uniform``'s ``normalize_then_sum`` static mix ``Σ_k c_k·clip(ẑ_k)`` up to one float32
      rounding (the same sum in another order): the embedded default's case."""
    from otca_fast.credit.schemes import window_bounds
    from otca_fast.rollout import sde_step_mask

    variant = VARIANTS[scheme]
    if variant.scheme in ("tcd_only", "moca_only"):
        cfg = bench_config(scheme, 0, "_", base_config=base_config, overrides=overrides, quick=quick)
        credit = cfg.credit_config()
        weights = credit.objective_weights
        if credit.exploration != 1.0 or weights is None or len(set(weights)) < 2:
            return None
        mix = f"the static reward weights ({', '.join(f'{w:g}' for w in weights)})"
        if variant.scheme == "tcd_only":
            return "otca", (f"credit.exploration 1 turns MOCA off, so otca's objective mix is exactly {mix}, the "
                            "mix tcd_only puts on the same TCD step credit")
        if credit.aggregate != "normalize_then_sum":
            return None
        return "uniform", (f"credit.exploration 1 turns MOCA off, so moca_only puts {mix} on every step alike: "
                           "uniform's normalize_then_sum static mix, up to one float32 rounding")
    if variant.scheme != "window":
        return None
    cfg = bench_config(scheme, 0, "_", base_config=base_config, overrides=overrides, quick=quick)
    base = bench_config("uniform", 0, "_", base_config=base_config, overrides=overrides, quick=quick)
    trains_all = base.train.timesteps.mode == "all" and cfg.train.timesteps.mode == "all"
    if base.sample.sde.mode not in ("all", "fraction") or not trains_all:
        return None
    steps, size = cfg.sample.num_steps, cfg.credit.window_size
    lo, hi = window_bounds(steps, cfg.credit_config())
    if cfg.credit.window_schedule != "fixed" and hi - lo != size:
        return None  # several windows: the scheme moves its SDE steps, uniform does not
    only = [lo <= t < lo + size for t in range(steps)]
    uniform = sde_step_mask(steps, base.sample.sde.mode, fraction=base.sample.sde.fraction).tolist()
    if only != uniform:
        return None
    return "uniform", (f"its only window, steps {lo}-{lo + size - 1}, is uniform's SDE steps and every one is "
                       f"trained (credit.window_size {size}, credit.window_range [{lo}, {hi}), sample.num_steps "
                       f"{steps})")


def same_as_uniform(scheme: str, *, base_config: str | Path = _DEFAULT_CONFIG, overrides: Sequence[str] = (),
                    quick: bool = False) -> str | None:
    """Why the variant ``scheme`` trains exactly what ``uniform`` trains on this config, or ``None``
    (:func:`same_as` with ``uniform`` as the twin)."""
    twin = same_as(scheme, base_config=base_config, overrides=overrides, quick=quick)
    return twin[1] if twin is not None and twin[0] == "uniform" else None


def shared_settings(*, base_config: str | Path = _DEFAULT_CONFIG, overrides: Sequence[str] = (),
                    quick: bool = False) -> dict[str, Any]:
    """What every run of an invocation shares, to check that runs joined with ``--reuse`` were made alike: the
    config its ``uniform`` run of seed 0 would train (the base config, ``--set`` overrides and ``--quick``
    applied; the output directory and seed left out, the credit being what the variants differ by) and a
    digest of the base model's weights and of the prompt files it reads."""
    import hashlib

    from otca_fast.toy.model import ASSETS_DIR, WEIGHTS_FILE

    cfg = bench_config("uniform", 0, "_", base_config=base_config, overrides=overrides, quick=quick)
    data = _comparable_config(cfg)
    data.pop("credit", None)
    files = [ASSETS_DIR / WEIGHTS_FILE] if cfg.model.path is None and not cfg.model.tiny else []
    files += [Path(f) for f in (cfg.data.prompt_file, cfg.data.eval_prompt_file) if f]
    data["file_sha256"] = {f.name: hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in files}
    return data


# what changes how a run is shown or stored, never what it trains or measures: left out of the settings compared
_PRESENTATION_KEYS = (("run", "output_dir"), ("run", "seed"), ("run", "progress"), ("run", "log_every"),
                      ("run", "tensorboard"), ("run", "plot_every"), ("run", "wandb"), ("eval", "save_clips"),
                      ("eval", "max_clips"), ("eval", "fps"), ("eval", "sheet_rows"), ("train", "checkpoint_every"),
                      ("train", "keep_checkpoints"))


def _without_presentation(data: dict[str, Any]) -> dict[str, Any]:
    data = json.loads(json.dumps(data))
    for section, key in _PRESENTATION_KEYS:
        data.get(section, {}).pop(key, None)
    # the prompt files by name: where the checkout lies does not matter (their contents' digests are compared)
    for key in ("prompt_file", "eval_prompt_file"):
        if data.get("data", {}).get(key):
            data["data"][key] = Path(data["data"][key]).name
    return data


def _comparable_config(cfg) -> dict[str, Any]:
    """A config as plain data without its presentation keys (output directory, seed, logging, clips)."""
    return _without_presentation(cfg.model_dump(mode="json"))


def settings_digest(settings: dict[str, Any]) -> str:
    """A short digest of :func:`shared_settings` (equal settings, equal digest; presentation keys, which records
    of earlier versions kept, are left out)."""
    import hashlib

    return hashlib.sha256(json.dumps(_without_presentation(settings), sort_keys=True).encode()).hexdigest()[:16]


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def settings_difference(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """``key: a -> b`` for every setting that differs between two :func:`shared_settings`."""
    fa, fb = _flat(_without_presentation(a)), _flat(_without_presentation(b))
    return [f"{k}: {fa.get(k, '(absent)')!r} -> {fb.get(k, '(absent)')!r}" for k in sorted(set(fa) | set(fb))
            if fa.get(k, "(absent)") != fb.get(k, "(absent)")]


def _heldout_prompts() -> list[str]:
    from otca_fast.toy.world import split_specs

    return [s.prompt for s in split_specs("heldout")]


def run_scheme(scheme: str, seed: int, output_dir: str | Path, *, invocation: str | None = None,
               **config_kwargs: Any) -> dict[str, Any]:
    """Train one (variant, seed); return every evaluation's per-prompt means and the training time at it.
    ``invocation`` (:func:`invocation_id`) is recorded with the run: the compute table compares training times
    only between runs of one invocation (:func:`timed_together`)."""
    from rich.console import Console

    from otca_fast.trainer import Trainer

    cfg = bench_config(scheme, seed, output_dir, **config_kwargs)
    start = time.perf_counter()
    with Trainer(cfg, console=Console(stderr=True, quiet=True)) as trainer:
        trainer.train()
    return record_run(scheme, seed, output_dir, wall_seconds=time.perf_counter() - start, invocation=invocation,
                      **config_kwargs)


def record_run(scheme: str, seed: int, output_dir: str | Path, *, wall_seconds: float | None = None,
               invocation: str | None = None, **config_kwargs: Any) -> dict[str, Any]:
    """The benchmark's record of a finished run of (variant, seed) in ``output_dir`` (its evaluations' per-prompt
    means, training times, the shared settings), also written to ``output_dir/bench_result.json``. The run's
    ``config.yaml`` must be the one this invocation would train (``config_kwargs``), presentation keys aside."""
    from otca_fast import report
    from otca_fast.config import load_config
    from otca_fast.evaluation import Evaluation

    out = Path(output_dir)
    cfg = bench_config(scheme, seed, out, **config_kwargs)
    if not (out / "config.yaml").is_file():
        raise RuntimeError(f"{scheme} seed {seed}: {out} holds no config.yaml (not a run directory)")
    made = load_config(out / "config.yaml")
    diff = settings_difference(_comparable_config(cfg), _comparable_config(made))
    if diff:
        raise RuntimeError(f"{scheme} seed {seed}: {out} was trained with other settings than this invocation's "
                           f"({'; '.join(diff[:6])}{'; ...' if len(diff) > 6 else ''})")
    records = report.read_metrics(out / "metrics.jsonl")
    step_seconds = {int(r["step"]): float(r["time/step_s"]) for r in records if "time/step_s" in r}
    evaluations = []
    for path in sorted((out / "report" / "eval").glob("step_*.json")):
        ev = Evaluation.load(path)
        evaluations.append({
            "step": ev.step, "train_seconds": sum(v for s, v in step_seconds.items() if s <= ev.step),
            "values": {k: v.double().mean(1).tolist() for k, v in ev.values.items()}})
    if len(evaluations) < 2 or evaluations[0]["step"] != 0 or evaluations[-1]["step"] != cfg.train.max_steps:
        got = [e["step"] for e in evaluations]
        raise RuntimeError(f"{scheme} seed {seed}: expected evaluations at the start and at step "
                           f"{cfg.train.max_steps} under {out}/report/eval, got steps {got}")
    settings = shared_settings(**config_kwargs)
    record = {"variant": scheme, "scheme": cfg.credit.scheme, "seed": seed, "steps": cfg.train.max_steps,
              "wall_seconds": wall_seconds, "train_seconds": sum(step_seconds.values()), "evaluations": evaluations,
              "settings_digest": settings_digest(settings), "settings": settings, "invocation": invocation,
              "host": host_description()}
    # the run's record beside its metrics: a benchmark stopped half-way keeps what it measured (--reuse)
    (out / "bench_result.json").write_text(json.dumps(record) + "\n")
    return record


def run_directory_name(scheme: str, seed: int) -> str:
    """The directory a run of (variant, seed) trains in, under ``--out``."""
    return f"{scheme.replace(' ', '_').replace('=', '')}_seed{seed}"


def collect_run(run_dir: str | Path, **config_kwargs: Any) -> dict[str, Any]:
    """:func:`record_run` for a run directory named by :func:`run_directory_name` (the variant and seed are read
    from its name): a run whose benchmark process stopped after it trained but before it was recorded. Which
    invocation trained it is not known, so it is recorded without one (the compute table calls its pair
    unchecked)."""
    path = Path(run_dir)
    for scheme in VARIANTS:
        prefix = run_directory_name(scheme, 0)[:-1]
        seed_text = path.name[len(prefix):]
        if path.name.startswith(prefix) and seed_text.isdigit():
            return record_run(scheme, int(seed_text), path, **config_kwargs)
    raise SystemExit(f"--collect {path}: not a benchmark run directory (expected <variant>_seed<N>, e.g. "
                     f"{run_directory_name('uniform', 0)})")


# ------------------------------------------------------------------------------------------------
# the tables
# ------------------------------------------------------------------------------------------------

def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values)


def _gain(run: dict[str, Any], key: str) -> float:
    """Final − base of ``key``, averaged over the held-out prompts."""
    base, final = run["evaluations"][0]["values"][key], run["evaluations"][-1]["values"][key]
    return _mean(final) - _mean(base)


def _keys(runs: Sequence[dict[str, Any]]) -> list[str]:
    values = runs[0]["evaluations"][0]["values"]
    return [k for k in (*EXAM_KEYS, *(f"reward/{o}" for o in OBJECTIVES)) if k in values]


TRADE_THRESHOLD = 0.05
TRADE_KINDS: tuple[str, ...] = ("rewards", "exam")


def trade_share(run: dict[str, Any], kind: str, threshold: float = TRADE_THRESHOLD) -> float:
    """The share of held-out prompts on which the run traded one objective for another: between the base (step
    0) and the end, one of them rose by more than ``threshold`` while another fell by more than it (per prompt,
    the mean over its clips, from the same evaluation noise). ``kind``: the trained rewards (what MOCA's min-norm
    mix balances) or the exam's verdicts (all_correct excluded: it is their conjunction). MOCA is meant as a guard
    against exactly this; a lower share is what it should buy."""
    if kind not in TRADE_KINDS:
        raise ValueError(f"kind: expected one of {TRADE_KINDS}, got {kind!r}")
    base, final = run["evaluations"][0]["values"], run["evaluations"][-1]["values"]
    keys = ([f"reward/{o}" for o in OBJECTIVES] if kind == "rewards" else [k for k in EXAM_KEYS if k != HEADLINE])
    keys = [k for k in keys if k in base]
    if len(keys) < 2:
        return 0.0
    prompts = len(base[keys[0]])
    traded = 0
    for p in range(prompts):
        change = [final[k][p] - base[k][p] for k in keys]
        traded += max(change) > threshold and min(change) < -threshold
    return traded / prompts


def summarise(runs: Sequence[dict[str, Any]], *, level: float = 0.9,
              reference: str = "uniform") -> list[dict[str, Any]]:
    """One row per variant: per key the mean and std over seeds of the gain over the base, and the paired
    difference from ``reference`` (same seeds) with its Student-t interval (``None`` without the reference)."""
    from otca_fast.stats import t_interval

    keys = _keys(runs)
    by_variant: dict[str, dict[int, dict[str, Any]]] = {}
    for r in runs:
        by_variant.setdefault(r["variant"], {})[r["seed"]] = r
    ref = by_variant.get(reference, {})
    rows = []
    for variant, seeds in by_variant.items():
        row: dict[str, Any] = {"variant": variant, "seeds": len(seeds), "gain": {}, "vs_reference": {}}
        for key in keys:
            gains = [_gain(run, key) for run in seeds.values()]
            row["gain"][key] = (_mean(gains), statistics.stdev(gains) if len(gains) > 1 else 0.0)
            paired = [_gain(run, key) - _gain(ref[s], key) for s, run in seeds.items() if s in ref]
            row["vs_reference"][key] = (t_interval(paired, level=level)
                                        if paired and variant != reference else None)
        row["trades"] = {}
        for kind in TRADE_KINDS:
            shares = [trade_share(run, kind) for run in seeds.values()]
            paired = [trade_share(run, kind) - trade_share(ref[s], kind) for s, run in seeds.items() if s in ref]
            row["trades"][kind] = (_mean(shares), statistics.stdev(shares) if len(shares) > 1 else 0.0,
                                   t_interval(paired, level=level) if paired and variant != reference else None)
        row["train_seconds"] = _mean([run["train_seconds"] for run in seeds.values()])
        rows.append(row)
    return rows


def time_to_target(run: dict[str, Any], target: float, key: str = HEADLINE) -> float | None:
    """Training seconds until the run's ``key`` (mean over prompts) first reaches ``target``; None if never."""
    for ev in run["evaluations"][1:]:
        if _mean(ev["values"][key]) >= target - 1e-12:
            return ev["train_seconds"]
    return None


# the pre-registered goal of the compute table: the best credit reaches uniform's final all-correct in at most
# half of uniform's training time, on every seed and with the ratio's whole interval
COMPUTE_GOAL = 0.5


def invocation_id() -> str:
    """This benchmark invocation's name, recorded with each of its runs: start time, host and process."""
    import os
    import platform

    return f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} {platform.node()} pid {os.getpid()}"


def timed_together(run: dict[str, Any], reference: dict[str, Any]) -> bool | None:
    """Whether two runs' training times compare: True when one invocation recorded both, False when two did
    (another day, another host load: a time ratio between them measures the host as much as the variant), None
    when either was recorded before runs kept their invocation (nothing shows either way)."""
    a, b = run.get("invocation"), reference.get("invocation")
    return None if a is None or b is None else a == b


def compute_rows(runs: Sequence[dict[str, Any]], names: Sequence[str], *, level: float = 0.9,
                 reference: str = "uniform") -> list[dict[str, Any]]:
    """Per variant: how often it reaches, per seed, the all-correct rate the reference reaches at the end of
    its budget, and the training time it takes as a ratio to the reference's whole budget; its own final
    all-correct minus the reference's, paired by seed (a cheap variant that ends lower has not saved compute);
    and whether it meets :data:`COMPUTE_GOAL` (reached on every seed, ratio interval ≤ the goal).

    Only pairs whose times compare count (:func:`timed_together`): a seed whose variant and reference runs were
    recorded by different invocations is left out of the row and named in ``mixed``; one recorded before runs
    kept their invocation counts and is named in ``unchecked``."""
    from otca_fast.stats import t_interval

    ref = {r["seed"]: r for r in runs if r["variant"] == reference}
    # the rate each seed's reference reaches at the end of its budget: the target, and what "ends lower" means
    target = {seed: _mean(run["evaluations"][-1]["values"][HEADLINE]) for seed, run in ref.items()}
    # the reference's own row (how late it reaches its final rate) over the seeds the variants were run on, so
    # that its row and theirs describe the same runs
    shared = {r["seed"] for r in runs if r["variant"] in names and r["seed"] in ref} or set(ref)
    rows = []
    for name in [reference, *names]:
        mine = [r for r in runs if r["variant"] == name and r["seed"] in ref
                and (name != reference or r["seed"] in shared)]
        together = {r["seed"]: timed_together(r, ref[r["seed"]]) for r in mine}
        mixed = sorted(seed for seed, same in together.items() if same is False)
        unchecked = sorted(seed for seed, same in together.items() if same is None and name != reference)
        mine = [r for r in mine if together[r["seed"]] is not False]
        if not mine:
            if mixed:
                rows.append({"variant": name, "seeds": 0, "reached": 0, "missed": [], "ratio": None,
                             "step_time_ratio": None, "final_vs_reference": None, "goal_met": False,
                             "mixed": mixed, "unchecked": []})
            continue
        ratios, missed = [], []
        for run in mine:
            reached = time_to_target(run, target[run["seed"]])
            if reached is None:
                missed.append(run["seed"])
            else:
                ratios.append(reached / ref[run["seed"]]["train_seconds"])
        per_step = _mean([r["train_seconds"] / r["steps"] for r in mine]) / _mean(
            [ref[r["seed"]]["train_seconds"] / ref[r["seed"]]["steps"] for r in mine])
        final = [_mean(r["evaluations"][-1]["values"][HEADLINE]) - target[r["seed"]] for r in mine]
        ratio = t_interval(ratios, level=level) if ratios else None
        # one seed has no interval (lo is -inf): the goal needs the interval, so one seed never meets it
        goal = (name != reference and not missed and ratio is not None and math.isfinite(ratio.lo)
                and ratio.hi <= COMPUTE_GOAL)
        rows.append({"variant": name, "seeds": len(mine), "reached": len(ratios), "missed": missed,
                     "ratio": ratio, "step_time_ratio": per_step,
                     "final_vs_reference": None if name == reference else t_interval(final, level=level),
                     "goal_met": goal, "mixed": mixed, "unchecked": unchecked})
    return rows


def _fmt_gain(pair: tuple[float, float]) -> str:
    return f"{pair[0]:+.3f} ± {pair[1]:.3f}"


def _fmt_interval(c) -> str:
    if c is None:
        return "—"
    if not math.isfinite(c.lo):
        # one seed, or a few seeds that agree exactly (otca_fast.stats.t_interval: too few for the level)
        return f"{c.mean:+.3f} (1 seed)" if c.n == 1 else f"{c.mean:+.3f} ({c.n} seeds agree, too few to tell)"
    mark = " **above**" if c.above_zero else " **below**" if c.below_zero else ""
    return f"{c.mean:+.3f} [{c.lo:+.3f}, {c.hi:+.3f}]{mark}"


def _short(key: str) -> str:
    return key.removeprefix("metric/shapes_exam/").removeprefix("reward/shapes_")


def write_results(path: str | Path, rows: Sequence[dict[str, Any]], runs: Sequence[dict[str, Any]],
                  settings: dict[str, Any], plot_path: str | Path | None = None,
                  compute: Sequence[dict[str, Any]] = (), versus: str | None = None,
                  twins: dict[str, tuple[str, str]] | None = None) -> Path:
    """The Markdown report: settings, the two tables, what they say, the plot; with ``versus`` (a variant among
    ``runs``) a third table of every credit variant's paired differences from it, on every outcome; ``twins``
    (variant → ``(twin, why)``, :func:`same_as`) names the variants not run because they train what their twin
    trains."""
    keys = _keys(runs)
    base = runs[0]["evaluations"][0]["values"]
    level = round(100 * settings.get("level", 0.9))
    lines = [
        SECTION_HEADING, "",
        f"`{settings['command']}` — {settings['when']}, {settings['machine']}.", "",
        f"Base model: {settings['base_model']}; its held-out exam: "
        + ", ".join(f"{_short(k)} {_mean(base[k]):.3f}" for k in keys if k.startswith("metric/")) + ".",
        f"Budget per run (identical for every variant but what the variant changes): {settings['budget']}. "
        f"Seeds {settings['seeds']}, paired: seed s draws the same prompts and the same initial and SDE noise "
        f"at step 1 in every variant, and every evaluation scores the same clips' noise.", "",
        "### Which credit makes better clips", "",
        f"Gain over the base (final − step 0, mean over held-out prompts), mean ± std over seeds; the last column "
        f"is the difference from `uniform` in all-correct, paired by seed, with its {level} % Student-t "
        f"interval (**above** / **below**: the interval excludes 0).", "",
        "| variant | seeds | " + " | ".join(f"Δ {_short(k)}" for k in keys) + " | all-correct − uniform |",
        "|" + "---|" * (len(keys) + 3),
    ]
    for r in rows:
        if not _in_table(r["variant"], "credit"):
            continue
        lines.append(f"| {r['variant']} | {r['seeds']} | " + " | ".join(_fmt_gain(r["gain"][k]) for k in keys)
                     + f" | {_fmt_interval(r['vs_reference'].get(HEADLINE))} |")
    lines += ["", *_verdict(rows), ""]
    for name, (twin, why) in (twins or {}).items():
        if _in_table(name, "credit"):
            lines.append(f"- `{name}` is not run: on this config it trains exactly what `{twin}` trains ({why}); "
                         f"its row is `{twin}`'s.")
    if twins:
        lines.append("")
    lines += ["### Trading one objective for another (what MOCA is meant to prevent)", "",
              f"Share of held-out prompts on which, from the base to the end of training, one objective rose by more "
              f"than {TRADE_THRESHOLD} while another fell by more than {TRADE_THRESHOLD} (per prompt, the mean over "
              f"its clips, same noise): among the trained rewards, and among the exam's verdicts. Mean ± std over "
              f"seeds, and the paired difference from `uniform` ({level} % interval; lower is better).", "",
              "| variant | seeds | reward trades | − uniform | exam trades | − uniform |", "|---|---|---|---|---|---|"]
    for r in rows:
        if not _in_table(r["variant"], "credit"):
            continue
        cells = []
        for kind in TRADE_KINDS:
            mean, std, diff = r["trades"][kind]
            cells += [f"{mean:.3f} ± {std:.3f}", _fmt_interval(diff)]
        lines.append(f"| {r['variant']} | {r['seeds']} | " + " | ".join(cells) + " |")
    lines.append("")
    if compute:
        lines += ["### Credit that saves compute", "",
                  "Training time (sum of `time/step_s`, evaluations excluded) until the all-correct rate first "
                  "reaches what `uniform` on every trainable step reaches at the end of its budget (per seed), "
                  f"as a ratio to `uniform`'s whole budget, with its {level} % interval over the seeds that "
                  "reached it; the step-time ratio says how much cheaper each step is; the last column is the "
                  "variant's own final all-correct minus `uniform`'s, paired by seed.", "",
                  "| variant | seeds | reached | time to uniform's final all-correct (ratio) | step time ratio "
                  "| final all-correct − uniform |",
                  "|---|---|---|---|---|---|"]
        for c in compute:
            if not c["seeds"]:
                continue
            ratio = "—" if c["ratio"] is None else (
                f"{c['ratio'].mean:.2f}" + ("" if not math.isfinite(c["ratio"].lo) else
                                            f" [{c['ratio'].lo:.2f}, {c['ratio'].hi:.2f}]"))
            lines.append(f"| {c['variant']} | {c['seeds']} | {c['reached']} | {ratio} | "
                         f"{c['step_time_ratio']:.2f} | {_fmt_interval(c.get('final_vs_reference'))} |")
        lines += ["", *_compute_verdict(compute), *_compute_pairing(compute), ""]
    if versus is not None:
        lines += _versus_table(runs, versus, keys, level=settings.get("level", 0.9))
    if plot_path is not None:
        lines += [f"![exam gains]({Path(plot_path).name})", ""]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(merge_section(out.read_text() if out.is_file() else "", "\n".join(lines)))
    tmp.replace(out)
    return out


def _versus_table(runs: Sequence[dict[str, Any]], versus: str, keys: Sequence[str], *,
                  level: float = 0.9) -> list[str]:
    """Every credit variant against ``versus`` (not uniform), paired by seed: the question a variant that
    changes one thing of another asks (MOCA's min-norm mix against the default it is added to, say)."""
    rows = [r for r in summarise(runs, level=level, reference=versus)
            if r["variant"] != versus and _in_table(r["variant"], "credit")
            and r["vs_reference"].get(HEADLINE) is not None]
    pct = round(100 * level)
    lines = [f"### Paired differences from `{versus}`", "",
             f"Each variant's gain minus `{versus}`'s, per seed on the seeds both were run on, mean and {pct} % "
             f"Student-t interval (**above** / **below**: the interval excludes 0); the trading shares likewise "
             f"(lower is less trading).", "",
             "| variant | pairs | " + " | ".join(f"Δ {_short(k)}" for k in keys)
             + " | reward trades | exam trades |", "|" + "---|" * (len(keys) + 4)]
    for r in rows:
        cells = [_fmt_interval(r["vs_reference"][k]) for k in keys]
        cells += [_fmt_interval(r["trades"][kind][2]) for kind in TRADE_KINDS]
        lines.append(f"| {r['variant']} | {r['vs_reference'][HEADLINE].n} | " + " | ".join(cells) + " |")
    if not rows:
        lines.append(f"| (no variant shares a seed with `{versus}`) |" + " |" * (len(keys) + 3))
    return [*lines, ""]


def _seed_list(seeds: Sequence[int]) -> str:
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def _compute_pairing(compute: Sequence[dict[str, Any]]) -> list[str]:
    """What the compute table left out, or could not check, about which runs were timed together."""
    lines = []
    mixed = [f"`{c['variant']}` {_seed_list(c['mixed'])}" for c in compute if c.get("mixed")]
    if mixed:
        lines.append("Left out (the variant and `uniform` of that seed were timed by different invocations, so "
                     "their times do not compare): " + "; ".join(mixed) + ".")
    unchecked = [f"`{c['variant']}` {_seed_list(c['unchecked'])}" for c in compute if c.get("unchecked")]
    if unchecked:
        lines.append("Not checked (recorded before runs kept their invocation, so nothing here shows they were "
                     "timed beside `uniform`'s run of that seed): " + "; ".join(unchecked) + ".")
    return [""] + lines if lines else []


def _compute_verdict(compute: Sequence[dict[str, Any]]) -> list[str]:
    others = [c for c in compute if c.get("final_vs_reference") is not None]
    if not others:
        return ["No selection variant was compared with `uniform` on paired seeds."]
    met = [c["variant"] for c in others if c.get("goal_met")]
    goal = (f"Goal (uniform's final all-correct in at most {COMPUTE_GOAL:g} of its training time, on every seed, "
            f"interval included)")
    return [f"{goal} met by: **{', '.join(met)}**." if met else f"{goal} **not met** by any variant."]


def _verdict(rows: Sequence[dict[str, Any]]) -> list[str]:
    credit = [r for r in rows if _in_table(r["variant"], "credit")]
    compared = [r for r in credit if r["vs_reference"].get(HEADLINE) is not None]
    if not compared:
        return ["No variant was compared with `uniform` on paired seeds."]
    beyond = [r for r in compared if r["vs_reference"][HEADLINE].above_zero or r["vs_reference"][HEADLINE].below_zero]
    # a partial table (a benchmark run in chunks) ranks only the variants with the most paired seeds: a mean over
    # fewer seeds is an interim, and its larger noise would win a ranking by the mean alone
    most = max(r["vs_reference"][HEADLINE].n for r in compared)
    interim = [r for r in compared if r["vs_reference"][HEADLINE].n < most]
    best = max((r for r in compared if r["vs_reference"][HEADLINE].n == most),
               key=lambda r: r["vs_reference"][HEADLINE].mean)
    among = f" among the variants with {most} paired seeds" if interim else ""
    lines = [f"Largest all-correct difference from uniform{among}: **{best['variant']}**, "
             f"{_fmt_interval(best['vs_reference'][HEADLINE])}."]
    if interim:
        lines.append("On fewer paired seeds (an interim, not ranked): " + ", ".join(
            f"{r['variant']} ({r['vs_reference'][HEADLINE].n})" for r in interim) + ".")
    if beyond:
        named = [f"{r['variant']} ({'better' if r['vs_reference'][HEADLINE].above_zero else 'worse'}"
                 + ("" if r["vs_reference"][HEADLINE].n == most else f", {r['vs_reference'][HEADLINE].n} seeds")
                 + ")" for r in beyond]
        lines.append("Beyond the noise of the paired seeds: " + ", ".join(named) + ".")
    else:
        lines.append("No variant differs from uniform beyond the noise of the paired seeds.")
    return lines


def merge_section(document: str, section: str) -> str:
    """``document`` with this benchmark's section replaced by ``section`` (appended when absent).

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
    """Per variant: the all-correct gain (mean ± std over seeds) and its paired difference from uniform."""
    from otca_fast.report import _figure, _save

    fig = _figure(max(6.0, 0.6 * len(rows) + 2), 4.0)
    ax = fig.subplots()
    xs = range(len(rows))
    gains = [r["gain"].get(HEADLINE, (0.0, 0.0)) for r in rows]
    ax.bar([x - 0.2 for x in xs], [g[0] for g in gains], 0.4, yerr=[g[1] for g in gains], capsize=2,
           label="all-correct gain over the base (± std over seeds)")
    diffs = [r["vs_reference"].get(HEADLINE) for r in rows]
    for x, d in zip(xs, diffs):
        if d is not None and math.isfinite(d.lo):
            ax.errorbar(x + 0.2, d.mean, yerr=[[d.mean - d.lo], [d.hi - d.mean]], fmt="o", color="tab:red",
                        capsize=3)
    ax.plot([], [], "o", color="tab:red", label="difference from uniform (paired seeds, interval)")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(list(xs), [r["variant"] for r in rows], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("held-out all-correct rate")
    ax.legend(fontsize=8)
    fig.subplots_adjust(bottom=0.3, left=0.08, right=0.98, top=0.95)
    return _save(fig, path)


def host_description() -> str:
    """The host a run trains on, recorded with it: CPU model, cores and torch's CPU vector capability, and the GPU
    if one is used. Results can differ between kinds of host (other vector kernels round otherwise), and a training
    run amplifies a difference from its first update on (``bench/RESULTS.md`` has a case), so a run that does not
    reproduce another says whether the host was the same."""
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
    where = f"{cpu}, {os.cpu_count()} cores, torch CPU capability {torch.backends.cpu.get_cpu_capability()}"
    if torch.cuda.is_available():
        where += f", {torch.cuda.get_device_name()}"
    return where


def _machine(jobs: int) -> str:
    """Where the benchmark ran, for the report: the host (:func:`host_description`) and the parallel runs."""
    return host_description() + (f", {jobs} runs at a time" if jobs > 1 else ", one run at a time")


def _worker_init(threads: int, parent: int | None = None) -> None:
    """A ``--jobs`` worker: its share of the CPU cores, so parallel runs do not oversubscribe them; and it
    ends when the invocation that started it is gone (``parent``, its pid). A killed driver does not stop a
    process pool's workers by itself, and an orphaned run keeps training for minutes, contending for the cores
    with whatever runs next (and inflating that run's step times, which the compute table reads)."""
    import threading

    import torch

    torch.set_num_threads(threads)
    if parent is not None:
        threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True,
                         name="bench_credit-parent-watch").start()


def _exit_when_orphaned(parent: int, every_s: float = 2.0) -> None:
    """Poll the parent's pid: once the worker is re-parented (the driver died), leave at once."""
    import os

    while os.getppid() == parent:
        time.sleep(every_s)
    print(f"bench_credit worker {os.getpid()}: the invocation that started it (pid {parent}) is gone; stopping",
          file=sys.stderr, flush=True)
    os._exit(1)


def read_runs(paths: Sequence[Path], *, expected: dict[str, Any] | None = None,
              trust_unrecorded: bool = False) -> list[dict[str, Any]]:
    """The runs recorded in ``paths``: each a ``credit_benchmark.json`` (a list of runs) or one run's
    ``bench_result.json``. A (variant, seed) recorded twice is an error: which of the two counts is unclear.

    The runs must share their settings (:func:`shared_settings`), with each other and with ``expected`` (the
    settings of the invocation that trains beside them) when it is given; a run recorded without its settings
    (made before they were kept) is refused unless ``trust_unrecorded``: a paired table of runs made on
    different defaults compares nothing."""
    runs: list[dict[str, Any]] = []
    first: tuple[dict[str, Any], str] | None = (expected, "this invocation") if expected is not None else None
    where: dict[tuple[str, int], Path] = {}
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"--reuse {path}: cannot read it ({e})") from None
        for run in data if isinstance(data, list) else [data]:
            if not isinstance(run, dict) or not {"variant", "seed", "evaluations"} <= set(run):
                raise SystemExit(f"--reuse {path}: expected benchmark runs (variant, seed, evaluations), "
                                 f"got {str(run)[:80]!r}")
            if run["variant"] not in VARIANTS:
                raise SystemExit(f"--reuse {path}: unknown variant {run['variant']!r}; expected one of "
                                 f"{list(VARIANTS)}")
            key = (run["variant"], run["seed"])
            if key in where:
                raise SystemExit(f"--reuse: {key[0]} seed {key[1]} is recorded in both {where[key]} and {path}")
            where[key] = Path(path)
            if "settings" not in run:
                if not trust_unrecorded:
                    raise SystemExit(f"--reuse {path}: {key[0]} seed {key[1]} was recorded without its settings, so "
                                     f"nothing shows it was made like the other runs; pass --trust-unrecorded to "
                                     f"join it anyway")
            elif first is None:
                first = (run["settings"], f"{key[0]} seed {key[1]} in {path}")
            elif settings_digest(run["settings"]) != settings_digest(first[0]):
                diff = settings_difference(first[0], run["settings"])
                raise SystemExit(f"--reuse {path}: {key[0]} seed {key[1]} was made with other settings than "
                                 f"{first[1]} ({'; '.join(diff[:6])}{'; ...' if len(diff) > 6 else ''}): runs "
                                 f"made on different settings do not pair")
            runs.append(run)
    return runs


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m otca_fast.bench_credit", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI smoke run: every variant, 1 seed, 1 tiny step")
    p.add_argument("--schemes", nargs="+", default=None, metavar="VARIANT",
                   help="variants to run (scheme names and the named variants: " + "; ".join(VARIANTS)
                        + "); default: all")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 .. 7 (--quick: 0)")
    p.add_argument("--config", type=Path, default=_DEFAULT_CONFIG, help="base config (its budget is shared)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override the base config for every run, e.g. --set train.max_steps=40")
    p.add_argument("--jobs", type=int, default=2,
                   help="runs trained at once, in separate processes sharing the CPU cores (or the GPU) evenly "
                        "(default 2: one core each on a 2-core machine)")
    p.add_argument("--reuse", type=Path, nargs="+", default=None, metavar="JSON",
                   help="credit_benchmark.json files of earlier invocations, or single runs' bench_result.json: "
                        "their (variant, seed) runs that this invocation does not train join the tables (only "
                        "valid when nothing they read has changed since)")
    p.add_argument("--trust-unrecorded", action="store_true",
                   help="join --reuse runs recorded without their settings (made before runs kept them); by "
                        "default they are refused, since nothing shows they share this invocation's settings")
    p.add_argument("--collect", type=Path, nargs="+", default=None, metavar="RUN_DIR",
                   help="record run directories that finished training but whose benchmark process stopped before "
                        "writing their bench_result.json (checked against this invocation's --config, --set and "
                        "--quick), then exit; join them with --reuse RUN_DIR/bench_result.json")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the tables from the --reuse runs alone (a benchmark run in chunks)")
    p.add_argument("--versus", default=None, metavar="VARIANT",
                   help="also tabulate every credit variant's paired differences from this one (every outcome, "
                        "trading included), e.g. --versus otca to ask what MOCA adds to the default; the "
                        "pre-registered comparisons stay against uniform")
    p.add_argument("--out", type=Path, default=None, help="run directories (default: a temporary directory)")
    p.add_argument("--results", type=Path, default=None,
                   help="Markdown report (default: bench/RESULTS.md; with --quick the report is only printed "
                        "unless a path is given)")
    return p


def _train_all(jobs: list[tuple[str, int, Path]], n_jobs: int, kwargs: dict[str, Any],
               invocation: str | None = None) -> list[dict[str, Any]]:
    runs = []

    def report_run(run: dict[str, Any]) -> None:
        runs.append(run)
        print(f"{run['variant']:24s} seed {run['seed']}: all-correct {_gain(run, HEADLINE):+.3f}  "
              f"({run['train_seconds']:.0f} s training, {run['wall_seconds']:.0f} s in all)", flush=True)

    if n_jobs == 1:
        for scheme, seed, run_dir in jobs:
            report_run(run_scheme(scheme, seed, run_dir, invocation=invocation, **kwargs))
        return runs
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (os.cpu_count() or 1) // n_jobs)
    with ProcessPoolExecutor(n_jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init, initargs=(threads, os.getpid())) as pool:
        futures = {pool.submit(run_scheme, scheme, seed, run_dir, invocation=invocation, **kwargs): (scheme, seed)
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
    # the tables keep the order of --schemes and --seeds whatever order the runs finished in
    order = {(scheme, seed): i for i, (scheme, seed, _) in enumerate(jobs)}
    runs.sort(key=lambda r: order[(r["variant"], r["seed"])])
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    names = args.schemes or list(VARIANTS)
    unknown = [s for s in names if s not in VARIANTS]
    if unknown:
        raise SystemExit(f"--schemes: unknown {unknown}; expected some of {list(VARIANTS)}")
    if args.jobs < 1:
        raise SystemExit(f"--jobs: expected >= 1, got {args.jobs}")
    if args.versus is not None and args.versus not in VARIANTS:
        raise SystemExit(f"--versus: unknown {args.versus!r}; expected one of {list(VARIANTS)}")
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else list(range(8)))
    if not args.quick and not args.report_only and not args.collect:
        # a variant that trains exactly what another trains measures noise (or repeats the other's runs): left
        # out of the default list, run with a warning when named (--quick keeps every variant: it checks code
        # paths, not results)
        for name in list(names):
            twin = same_as(name, base_config=args.config, overrides=args.overrides)
            if twin is None:
                continue
            if args.schemes is None:
                names.remove(name)
                print(f"bench_credit: {name!r} not run: it is {twin[0]} on this config ({twin[1]})", flush=True)
            else:
                print(f"bench_credit: warning: {name!r} is {twin[0]} on this config ({twin[1]}); its runs repeat "
                      f"{twin[0]}'s", flush=True)
    if args.collect:
        for run_dir in args.collect:
            try:
                run = collect_run(run_dir, base_config=args.config, overrides=args.overrides, quick=args.quick)
            except RuntimeError as e:
                raise SystemExit(f"--collect {run_dir}: {e}") from None
            print(f"{run['variant']} seed {run['seed']}: all-correct {_gain(run, HEADLINE):+.3f}; wrote "
                  f"{Path(run_dir) / 'bench_result.json'}", flush=True)
        return 0
    expected = None if args.report_only else shared_settings(base_config=args.config, overrides=args.overrides,
                                                                 quick=args.quick)
    reused = read_runs(args.reuse, expected=expected, trust_unrecorded=args.trust_unrecorded) if args.reuse else []
    if args.report_only:
        if not reused:
            raise SystemExit("--report-only: expected --reuse with at least one run, got none")
        # the tables' variants and seeds are the reused runs' (the budget line reads the first of them)
        names = list(dict.fromkeys(r["variant"] for r in reused))
        seeds = sorted({r["seed"] for r in reused})
    with tempfile.TemporaryDirectory(prefix="otca_bench_credit_") as scratch:
        out = args.out or Path(scratch)
        results = args.results or (Path(scratch) / "RESULTS.md" if args.quick else _REPO / "bench" / "RESULTS.md")
        jobs = [] if args.report_only else [(name, seed, out / run_directory_name(name, seed))
                                            for name in names for seed in seeds]
        runs = _train_all(jobs, args.jobs, dict(base_config=args.config, overrides=args.overrides,
                                                 quick=args.quick), invocation=invocation_id()) if jobs else []
        if reused:
            trained = {(r["variant"], r["seed"]) for r in runs}
            earlier = [r for r in reused if (r["variant"], r["seed"]) not in trained]
            print(f"reusing {len(earlier)} runs of {', '.join(map(str, args.reuse))}: "
                  f"{sorted({r['variant'] for r in earlier})}", flush=True)
            runs += earlier
            rank = {name: i for i, name in enumerate(VARIANTS)}
            runs.sort(key=lambda r: (rank[r["variant"]], r["seed"]))
        rows = summarise(runs)
        compute = compute_rows(runs, [n for n in VARIANTS if VARIANTS[n].in_table("compute")
                                      and any(r["variant"] == n for r in runs)])
        cfg = bench_config(names[0], seeds[0], out / "_", base_config=args.config, overrides=args.overrides,
                           quick=args.quick)
        budget = (f"{cfg.train.max_steps} steps x {cfg.sample.prompts_per_step} prompts x {cfg.sample.group_size} "
                  f"samples, {cfg.sample.num_steps} denoising steps, {cfg.train.finetune} lr {cfg.optimizer.lr}, "
                  f"evaluated every {cfg.eval.every or cfg.train.max_steps} steps on "
                  f"{len(_heldout_prompts()) if not args.quick else 4} held-out prompts x "
                  f"{cfg.eval.samples_per_prompt} clips")
        settings = {"command": "python -m otca_fast.bench_credit " + " ".join(argv if argv is not None else
                                                                            sys.argv[1:]),
                    "when": time.strftime("%Y-%m-%d"), "budget": budget, "seeds": sorted({r["seed"] for r in runs}),
                    "base_model": ("random tiny weights (model.tiny)" if cfg.model.tiny else
                                   "the shipped shapes base (`otca_fast/toy/assets`)" if cfg.model.path is None
                                   else f"`{cfg.model.path}`"),
                    "machine": ("tables only (--report-only): the runs were trained by earlier invocations"
                                if args.report_only else _machine(args.jobs)), "level": 0.9}
        # the variants left out as twins of a variant in these tables (a twin that is not here has no row to stand for)
        ran = {r["variant"] for r in runs}
        twins = {} if args.quick else {
            name: twin for name in VARIANTS if name not in ran
            for twin in [same_as(name, base_config=args.config, overrides=args.overrides)]
            if twin is not None and twin[0] in ran}
        plot = plot_results(rows, results.with_name("credit_benchmark.png"))
        write_results(results, rows, runs, settings, plot_path=plot, compute=compute, versus=args.versus,
                      twins=twins)
        (results.with_name("credit_benchmark.json")).write_text(json.dumps(runs) + "\n")
        if args.quick and args.results is None:
            print(results.read_text())
        else:
            print(f"wrote {results}, {plot} and {results.with_name('credit_benchmark.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

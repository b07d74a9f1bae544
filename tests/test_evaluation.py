"""Eval-only metrics: scored on held-out clips, never trained on, compared with the base with bootstrap
intervals, and a warning when a trained reward rises while a metric falls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from otca_fast.config import ConfigError, load_config
from otca_fast.evaluation import Evaluation, compare, hacking_alarms
from otca_fast.judge import format_table, headline_key, judge_run, write_contact_sheet
from otca_fast.rewards import RewardError, build_reward, score_metrics
from otca_fast.stats import bootstrap_mean, paired_difference, t_interval
from otca_fast.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_video.yaml"

# ------------------------------------------------------------------------------------------------
# user-defined judges for the tests below (reached as dotted paths 'test_evaluation:...')
# ------------------------------------------------------------------------------------------------
_CALLS = {"reward": 0, "metric": 0}


def rising_reward(frames, prompts):
    """A 'reward' that rises by 0.1 with every scored batch: it always looks better later."""
    _CALLS["reward"] += 1
    return torch.full((frames.shape[0],), 0.1 * _CALLS["reward"])


def falling_metric(frames, prompts):
    """A two-part judge whose 'quality' part falls with every scored batch."""
    _CALLS["metric"] += 1
    return {"quality": torch.full((frames.shape[0],), 1.0 / _CALLS["metric"]),
            "constant": torch.ones(frames.shape[0])}


def nan_part_metric(frames, prompts):
    return {"fine": torch.ones(frames.shape[0]), "broken": torch.full((frames.shape[0],), float("nan"))}


# ------------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------------

def test_bootstrap_interval_brackets_the_mean_and_is_deterministic():
    values = torch.linspace(0, 1, 48)
    a = bootstrap_mean(values, level=0.9, seed=3)
    b = bootstrap_mean(values, level=0.9, seed=3)
    assert a == b and a.lo < a.mean < a.hi and a.n == 48
    assert abs(a.mean - 0.5) < 1e-6
    wide = bootstrap_mean(values, level=0.99, seed=3)
    assert wide.lo <= a.lo and wide.hi >= a.hi


def test_paired_difference_of_a_constant_shift_has_no_width():
    before = torch.rand(10, 3, generator=torch.Generator().manual_seed(0))
    diff = paired_difference(before + 0.25, before)
    assert diff.lo == pytest.approx(0.25) and diff.hi == pytest.approx(0.25) and diff.above_zero
    with pytest.raises(ValueError, match="same prompts"):
        paired_difference(before, before[:5])
    with pytest.raises(ValueError, match="level"):
        bootstrap_mean(before, level=1.5)


# ------------------------------------------------------------------------------------------------
# metrics with parts, evaluations, alarms
# ------------------------------------------------------------------------------------------------

def test_t_interval_over_seeds_and_equal_values():
    """Student-t over seeds; equal values (two seeds of a share of 48 prompts that happen to agree) give no
    spread, so the interval falls back on the sign test: ±inf until 1 − 2·0.5^n reaches the level."""
    import math

    from scipy.stats import t as student_t

    xs = [0.01, -0.02, 0.03, 0.0]
    got = t_interval(xs, level=0.9)
    sd = math.sqrt(sum((x - 0.005) ** 2 for x in xs) / 3)
    half = student_t.ppf(0.95, 3) * sd / 2
    assert got.n == 4 and abs(got.mean - 0.005) < 1e-12
    assert abs(got.lo - (0.005 - half)) < 1e-12 and abs(got.hi - (0.005 + half)) < 1e-12
    for n in (2, 3, 4):  # coverage 0.5, 0.75, 0.875 < 0.9: not "below" on agreement alone
        same = t_interval([-0.021] * n, level=0.9)
        assert (same.lo, same.hi) == (-math.inf, math.inf) and not same.below_zero, n
    five = t_interval([-0.021] * 5, level=0.9)  # 1 − 2/32 = 0.9375 >= 0.9
    assert (five.lo, five.hi) == (-0.021, -0.021) and five.below_zero
    assert not t_interval([-0.021] * 5, level=0.95).below_zero  # 0.9375 < 0.95
    rounded = t_interval([0.34375 - 0.3645833333333333, 0.3333333333333333 - 0.3541666666666667], level=0.9)
    assert rounded.lo == -math.inf, "equal up to float rounding is equal"  # two seeds' shares of 48 prompts
    zero = t_interval([0.0] * 8, level=0.9)
    assert not zero.below_zero and not zero.above_zero
    assert (t_interval([0.3], level=0.9).lo, t_interval([0.3], level=0.9).hi) == (-math.inf, math.inf)


def test_score_metrics_logs_every_part_and_the_headline():
    frames, prompts = torch.rand(3, 2, 3, 8, 8), ["a", "b", "c"]
    metric = build_reward("test_evaluation:falling_metric", headline="quality")
    out = score_metrics([metric, build_reward("brightness")], frames, prompts, step=0)
    assert set(out) == {"test_evaluation:falling_metric", "test_evaluation:falling_metric/quality",
                        "test_evaluation:falling_metric/constant", "brightness"}
    assert torch.equal(out["test_evaluation:falling_metric"], out["test_evaluation:falling_metric/quality"])
    with pytest.raises(RewardError, match="broken"):
        score_metrics([build_reward("test_evaluation:nan_part_metric")], frames, prompts, step=3)


def test_a_multi_part_judge_cannot_be_a_trained_reward():
    from otca_fast.rewards import score_rewards

    with pytest.raises(RewardError, match="eval.metrics"):
        score_rewards([build_reward("test_evaluation:falling_metric")], torch.rand(2, 1, 3, 4, 4), ["a", "b"], step=0)


def test_evaluations_round_trip_and_compare_clip_for_clip(tmp_path):
    prompts = ["p0", "p1", "p2", "p3"]
    base = Evaluation.from_rows(0, prompts, 2, 7, {"reward/r": torch.arange(8.0), "metric/m": torch.ones(8)})
    later = Evaluation.from_rows(5, prompts, 2, 7, {"reward/r": torch.arange(8.0) + 1, "metric/m": torch.zeros(8)})
    loaded = Evaluation.load(later.save(tmp_path / "e.json"))
    assert loaded.values.keys() == later.values.keys()
    assert torch.equal(loaded.values["metric/m"], later.values["metric/m"])
    changes = compare(base, loaded)
    assert changes["reward/r"].above_zero and changes["metric/m"].below_zero
    alarms = hacking_alarms(5, changes)
    assert [(a.metric, a.reward) for a in alarms] == [("m", "r")]
    assert "may be gaming" in alarms[0].message() and "step 5" in alarms[0].message()
    assert hacking_alarms(5, compare(base, base)) == []
    with pytest.raises(ValueError, match="same evaluation noise"):
        compare(base, Evaluation.from_rows(5, prompts, 2, 8, {"reward/r": torch.arange(8.0)}))


# ------------------------------------------------------------------------------------------------
# configs and the trainer
# ------------------------------------------------------------------------------------------------

def _sets(out: Path, **extra) -> list[str]:
    from test_trainer import small  # the fast tiny-model overrides of the trainer tests

    args = small(out, **extra)
    return [args[i + 1] for i in range(0, len(args), 2)]


def test_a_metric_that_is_also_a_trained_reward_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="never optimises"):
        load_config(TINY, _sets(tmp_path, **{"eval.metrics": [{"name": "shapes_quality"}]}))
    with pytest.raises(ConfigError, match="duplicates"):
        load_config(TINY, _sets(tmp_path, **{"eval.metrics": [{"name": "shapes_exam"}, {"name": "shapes_exam"}]}))


def test_an_eval_only_metric_cannot_be_trained_on(tmp_path):
    rewards = [{"name": "shapes_quality"}, {"name": "shapes_exam"}]
    cfg = load_config(TINY, _sets(tmp_path / "run", **{"rewards": rewards, "eval.metrics": []}))
    with pytest.raises(ConfigError, match="eval-only metric is never trained on"):
        Trainer(cfg)


def test_the_run_logs_metrics_and_warns_when_a_reward_rises_while_a_metric_falls(tmp_path, capsys):
    out = tmp_path / "run"
    _CALLS.update(reward=0, metric=0)
    cfg = load_config(TINY, _sets(out, **{
        "rewards": [{"name": "test_evaluation:rising_reward"}],
        "eval.metrics": [{"name": "test_evaluation:falling_metric", "options": {"headline": "quality"}},
                         {"name": "shapes_exam"}],
        "eval.every": 1, "train.max_steps": 2, "run.plot_every": 2, "run.progress": "plain"}))
    with Trainer(cfg) as trainer:
        trainer.train()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if "eval/reward/test_evaluation:rising_reward" in r]
    assert [r["step"] for r in evals] == [0, 1, 2]
    key = "eval/metric/test_evaluation:falling_metric/quality"
    assert evals[0][key] > evals[1][key] > evals[2][key]
    assert all(f"eval/metric/shapes_exam/{v}" in evals[-1] for v in ("shape", "direction", "all_correct"))
    assert [r.get("eval/hacking_alarms") for r in evals] == [None, 1, 1]
    assert evals[-1]["eval/hacking_metrics"] == ["test_evaluation:falling_metric/quality"]
    err = capsys.readouterr().err
    assert "warning: step 1: eval metric test_evaluation:falling_metric/quality fell" in err
    assert "eval/metric/shapes_exam/all_correct" in err  # the run summary lists the metrics
    for step in (0, 1, 2):
        saved = Evaluation.load(out / "report" / "eval" / f"step_{step:06d}.json")
        assert saved.values[key.removeprefix("eval/")].shape == (2, 2)  # 2 prompts x 2 clips
    assert (out / "report" / "rewards.png").stat().st_size > 0


@pytest.mark.slow
def test_judge_compares_the_trained_policy_with_the_base_on_fresh_seeds(tmp_path):
    from test_trainer import small

    from otca_fast.train import main

    out = tmp_path / "run"
    assert main([str(TINY), *small(out, **{"train.max_steps": 2, "optimizer.lr": 0.05})]) == 0
    result = judge_run(out, seeds=[11, 12], samples_per_prompt=2)
    assert result["step"] == 2 and result["base"].samples_per_prompt == 4
    assert set(result["changes"]) >= {"reward/shapes_quality", "metric/shapes_exam/all_correct"}
    moved = sum(float((result["trained"].values[k] - result["base"].values[k]).abs().sum())
                for k in result["changes"])
    assert moved > 0  # the trained adapters are in place for 'trained', off for 'base'
    table = format_table(result)
    assert "| metric/shapes_exam/all_correct |" in table and "90% interval" in table
    assert "clips" not in result  # kept only when asked

    # the contact sheet: the first seed's clips of both policies, the prompts that changed most first
    kept = judge_run(out, seeds=[11, 12], samples_per_prompt=2, keep_clips=True)
    rows = len(kept["base"].prompts) * 2
    assert kept["clips"]["base"].shape[0] == kept["clips"]["trained"].shape[0] == rows
    assert not torch.equal(kept["clips"]["base"], kept["clips"]["trained"])
    for key in kept["changes"]:  # the clips' scores are the same as without keeping them
        assert torch.equal(kept["trained"].values[key], result["trained"].values[key])
    assert headline_key(kept) == "metric/shapes_exam"
    sheet = tmp_path / "sheet.png"
    shown = write_contact_sheet(kept, sheet, rows=1)
    before, after = kept["base"].values["metric/shapes_exam"], kept["trained"].values["metric/shapes_exam"]
    change = {p: float(after[i].double().mean() - before[i].double().mean())
              for i, p in enumerate(kept["base"].prompts)}
    assert shown == [max(change, key=lambda p: abs(change[p]))] and sheet.stat().st_size > 0
    with pytest.raises(ValueError, match="keep_clips"):
        write_contact_sheet(result, sheet)

    # adapters on the first K steps only: K = 0 is the base exactly, K = every step the whole policy
    none = judge_run(out, seeds=[11], samples_per_prompt=2, adapter_steps=0)
    run_cfg = load_config(out / "config.yaml")
    steps = run_cfg.eval.num_steps or run_cfg.sample.num_steps
    every = judge_run(out, seeds=[11], samples_per_prompt=2, adapter_steps=steps)
    whole = judge_run(out, seeds=[11], samples_per_prompt=2)
    for key in result["changes"]:
        assert torch.equal(none["trained"].values[key], none["base"].values[key]), key
        assert torch.equal(every["trained"].values[key], whole["trained"].values[key]), key
    with pytest.raises(ValueError, match="adapter_steps"):
        judge_run(out, seeds=[11], samples_per_prompt=1, adapter_steps=99)
    with pytest.raises(ValueError, match="key"):
        write_contact_sheet(kept, sheet, key="metric/nope")

"""``otca_fast.exploration``: what a GRPO group can teach (within-group disagreement and the advantage's
correlation with a judge)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from otca_fast.exploration import group_statistics, main


def test_a_reward_that_is_the_judge_correlates_one_and_its_opposite_minus_one():
    judge = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    noise = torch.tensor([[0.3, -0.1, 0.2, 0.5], [0.1, 0.4, -0.2, 0.0], [0.7, -0.3, 0.2, 0.1]])
    rewards = {"same": judge.clone(), "opposite": -judge, "unrelated": noise}
    stats = group_statistics(rewards, {"verdict": judge}, {"same": 1.0, "opposite": 0.0, "unrelated": 0.0})
    row = stats["verdict"]
    assert row["binary"] and row["mean"] == pytest.approx(judge.mean().item())
    # groups 0 and 2 disagree, group 1 is unanimous (it teaches GRPO nothing about the verdict)
    assert row["disagreeing_groups"] == pytest.approx(2 / 3)
    assert row["corr/same"] == pytest.approx(1.0, abs=1e-5)
    assert row["corr/opposite"] == pytest.approx(-1.0, abs=1e-5)
    # the total advantage with weight on 'same' only is 'same''s advantage
    assert row["corr/advantage"] == pytest.approx(1.0, abs=1e-5)
    assert row["groups_with_spread"] == 2
    # the unrelated reward's correlation is the mean of its per-group correlations over groups 0 and 2
    expected = []
    for g in (0, 2):
        x, y = noise[g] - noise[g].mean(), judge[g] - judge[g].mean()
        expected.append(float((x * y).sum() / (x.norm() * y.norm())))
    assert row["corr/unrelated"] == pytest.approx(sum(expected) / 2, abs=1e-5)


def test_a_unanimous_judge_has_no_correlation_and_a_continuous_judge_no_disagreement_share():
    rewards = {"r": torch.randn(4, 8, generator=torch.Generator().manual_seed(0))}
    stats = group_statistics(rewards, {"flat": torch.ones(4, 8), "score": torch.rand(4, 8)}, {"r": 1.0})
    assert math.isnan(stats["flat"]["corr/r"]) and stats["flat"]["groups_with_spread"] == 0
    assert stats["flat"]["disagreeing_groups"] == 0.0
    assert stats["score"]["binary"] is False and stats["score"]["disagreeing_groups"] is None
    assert stats["score"]["groups_with_spread"] == 4


def test_scores_of_different_shapes_are_refused():
    with pytest.raises(ValueError, match=r"\[groups, G\]"):
        group_statistics({"r": torch.zeros(2, 4)}, {"j": torch.zeros(2, 3)}, {"r": 1.0})
    with pytest.raises(ValueError, match="at least one reward"):
        group_statistics({}, {"j": torch.zeros(2, 3)}, {})


def test_the_command_probes_the_embedded_default(tmp_path, capsys):
    out = tmp_path / "probe.json"
    code = main(["configs/tiny_video.yaml", "--groups", "2", "--set", "sample.group_size=4",
                 "--set", "sample.num_steps=4", "--split", "square", "circle", "triangle", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "| shapes_exam/shape |" in text and "corr(A, judge)" in text
    data = json.loads(out.read_text())
    assert len(data["prompts"]) == 2
    assert set(data["rewards"]) == {"shapes_quality", "shapes_motion", "shapes_alignment"}
    assert len(data["judges"]["shapes_exam/all_correct"]) == 2
    assert len(data["judges"]["shapes_exam/all_correct"][0]) == 4
    assert "shapes_exam/shape" in data["statistics"]["all"]


def test_a_config_without_eval_metrics_is_refused(capsys):
    code = main(["configs/tiny_video.yaml", "--groups", "1", "--set", "eval.metrics=[]"])
    assert code == 2
    assert "eval.metrics" in capsys.readouterr().err


@pytest.mark.parametrize("aggregate", ["normalize_then_sum", "sum_then_normalize"])
def test_the_total_advantage_is_the_trainers_static_mix(aggregate):
    """The total is reference.group_advantages with the config's aggregate: a reward on a 100x scale drowns the
    other under sum_then_normalize (Flow-GRPO) and not under normalize_then_sum."""
    from otca_fast.reference import group_advantages

    g = torch.Generator().manual_seed(1)
    judge = (torch.rand(6, 8, generator=g) > 0.5).float()
    loud = 100 * torch.randn(6, 8, generator=g)
    rewards = {"loud": loud, "judge_like": judge + 0.1 * torch.randn(6, 8, generator=g)}
    stats = group_statistics(rewards, {"verdict": judge}, {"loud": 0.5, "judge_like": 0.5}, aggregate=aggregate)
    flat = torch.stack([rewards["loud"].reshape(-1), rewards["judge_like"].reshape(-1)], 1).double()
    total = group_advantages(flat, torch.arange(6).repeat_interleave(8), weights=[0.5, 0.5],
                             aggregate=aggregate).view(6, 8)
    centred_a, centred_j = total - total.mean(1, keepdim=True), judge - judge.mean(1, keepdim=True)
    varies = centred_j.norm(dim=1) > 0
    expected = ((centred_a * centred_j).sum(1) / (centred_a.norm(dim=1) * centred_j.norm(dim=1)))[varies].mean()
    assert stats["verdict"]["corr/advantage"] == pytest.approx(float(expected), abs=1e-6)
    if aggregate == "sum_then_normalize":
        assert stats["verdict"]["corr/advantage"] == pytest.approx(stats["verdict"]["corr/loud"], abs=0.05)
    else:
        assert stats["verdict"]["corr/advantage"] > stats["verdict"]["corr/loud"] + 0.2

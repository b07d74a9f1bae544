"""The credit benchmark's --quick mode runs every requested scheme end to end and writes its report."""

from __future__ import annotations

import json

import pytest

from otca_fast.bench_credit import (
    ABLATIONS,
    FULL_BUDGET,
    OBJECTIVES,
    SCHEMES,
    SECTION_HEADING,
    bench_config,
    main,
    merge_section,
    summarise,
)


@pytest.mark.parametrize("jobs, schemes", [(1, ["uniform", "otca"]), (2, list(SCHEMES + ABLATIONS))])
def test_quick_benchmark_trains_each_scheme_and_writes_the_table(tmp_path, jobs, schemes):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Another benchmark\n\nkeep me\n")
    # jobs=2: every scheme and ablation, in two worker processes; the table keeps the order of --schemes
    assert main(["--quick", "--schemes", *schemes, "--jobs", str(jobs), "--out", str(tmp_path / "runs"),
                 "--results", str(results)]) == 0
    text = results.read_text()
    assert all(f"| {scheme} | 1 |" in text for scheme in schemes)
    assert text.startswith("# Benchmark results") and "keep me" in text and SECTION_HEADING in text
    assert "shipped shapes base" in text
    assert (tmp_path / "credit_benchmark.png").stat().st_size > 0
    runs = json.loads((tmp_path / "credit_benchmark.json").read_text())
    assert [r["scheme"] for r in runs] == schemes
    # every scheme starts from the same base model and the same evaluation noise
    assert all(run["base"] == runs[0]["base"] for run in runs)
    for run in runs:
        assert set(run["final"]) == set(OBJECTIVES)
        assert all(0.0 <= v <= 1.0 for v in run["final"].values())
        # each run leaves its record beside its metrics
        saved = json.loads((tmp_path / "runs" / f"{run['scheme']}_seed0" / "bench_result.json").read_text())
        assert saved == run


def test_every_scheme_shares_the_budget_and_only_the_scheme_and_seed_differ(tmp_path):
    a = bench_config("uniform", 0, tmp_path / "a")
    b = bench_config("otca_timing", 2, tmp_path / "b")
    assert a.credit.scheme == "uniform" and b.credit.scheme == "otca_timing"
    assert (a.run.seed, b.run.seed) == (0, 2)
    assert a.model.family == b.model.family == "shapes" and a.model.path is None and not a.model.tiny
    assert [r.name for r in a.rewards] == list(OBJECTIVES)
    for section in ("sample", "optimizer", "data", "eval"):
        assert getattr(a, section) == getattr(b, section), section
    assert a.train.max_steps == b.train.max_steps == FULL_BUDGET["train.max_steps"]
    # the user's --set overrides apply to every scheme alike, after the benchmark's own budget
    c = bench_config("coca", 1, tmp_path / "c", overrides=["train.max_steps=7"])
    assert c.train.max_steps == 7
    # window's SDE steps are its own window, so the rollout leaves every step eligible
    assert bench_config("window", 0, tmp_path / "w").sample.sde.mode == "all"
    assert a.sample.sde.mode == b.sample.sde.mode == "fraction"
    with pytest.raises(ValueError, match="scheme"):
        bench_config("best_of_n", 0, tmp_path / "c")


def test_summary_averages_gains_per_seed_then_over_seeds():
    base = dict.fromkeys(OBJECTIVES, 0.5)
    runs = [{"scheme": "otca", "seed": s, "wall_seconds": 10.0 + s, "steps": 1, "base": base,
             "final": {k: 0.5 + 0.1 * (s + 1) * (i + 1) for i, k in enumerate(OBJECTIVES)}} for s in range(2)]
    (row,) = summarise(runs)
    # seed 0 gains 0.1, 0.2, 0.3 (avg 0.2); seed 1 gains 0.2, 0.4, 0.6 (avg 0.4)
    assert row["avg_gain"][0] == pytest.approx(0.3)
    assert row["avg_gain"][1] == pytest.approx(0.1414, abs=1e-4)
    assert row["shapes_alignment_gain"][0] == pytest.approx(0.15)
    assert row["wall_seconds"][0] == pytest.approx(10.5)


def test_merge_section_replaces_only_its_own_section():
    doc = f"# R\n\n## A\n\na\n\n{SECTION_HEADING}\n\nold\n\n## B\n\nb\n"
    merged = merge_section(doc, f"{SECTION_HEADING}\n\nnew")
    assert merged == f"# R\n\n## A\n\na\n\n{SECTION_HEADING}\n\nnew\n\n## B\n\nb\n"
    assert merge_section("", f"{SECTION_HEADING}\n\nx") == f"{SECTION_HEADING}\n\nx\n"
    assert merge_section("# R\n", "## S\n") == "# R\n\n## S\n"


def test_reuse_merges_an_earlier_runs_schemes_in_canonical_order(tmp_path):
    first, second = tmp_path / "first" / "RESULTS.md", tmp_path / "second" / "RESULTS.md"
    assert main(["--quick", "--jobs", "1", "--schemes", "otca", "--out", str(tmp_path / "a"),
                 "--results", str(first)]) == 0
    # the second invocation trains uniform and takes otca from the first one's JSON
    assert main(["--quick", "--jobs", "1", "--schemes", "uniform", "--out", str(tmp_path / "b"),
                 "--results", str(second), "--reuse", str(first.with_name("credit_benchmark.json"))]) == 0
    runs = json.loads(second.with_name("credit_benchmark.json").read_text())
    assert [r["scheme"] for r in runs] == ["uniform", "otca"]
    earlier = json.loads(first.with_name("credit_benchmark.json").read_text())
    assert runs[1] == earlier[0]
    text = second.read_text()
    assert text.index("| uniform | 1 |") < text.index("| otca | 1 |")

"""The credit benchmark's --quick mode runs every requested scheme end to end and writes its report."""

from __future__ import annotations

import json

import pytest

from otca_fast.bench_credit import OBJECTIVES, SECTION_HEADING, bench_config, main, merge_section, summarise


def test_quick_benchmark_trains_each_scheme_and_writes_the_table(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Another benchmark\n\nkeep me\n")
    assert main(["--quick", "--schemes", "uniform", "otca", "--out", str(tmp_path / "runs"),
                 "--results", str(results)]) == 0
    text = results.read_text()
    assert "| uniform | 1 |" in text and "| otca | 1 |" in text
    assert text.startswith("# Benchmark results") and "keep me" in text and SECTION_HEADING in text
    assert "shipped shapes base" in text
    assert (tmp_path / "credit_benchmark.png").stat().st_size > 0
    runs = json.loads((tmp_path / "credit_benchmark.json").read_text())
    assert [r["scheme"] for r in runs] == ["uniform", "otca"]
    # both schemes start from the same base model and the same evaluation noise
    assert runs[0]["base"] == runs[1]["base"]
    for run in runs:
        assert set(run["final"]) == set(OBJECTIVES)
        assert all(0.0 <= v <= 1.0 for v in run["final"].values())


def test_every_scheme_shares_the_budget_and_only_the_scheme_and_seed_differ(tmp_path):
    a = bench_config("uniform", 0, tmp_path / "a")
    b = bench_config("otca_timing", 2, tmp_path / "b")
    assert a.credit.scheme == "uniform" and b.credit.scheme == "otca_timing"
    assert (a.run.seed, b.run.seed) == (0, 2)
    assert a.model.family == b.model.family == "shapes" and a.model.path is None and not a.model.tiny
    assert [r.name for r in a.rewards] == list(OBJECTIVES)
    for section in ("sample", "optimizer", "data", "eval"):
        assert getattr(a, section) == getattr(b, section), section
    assert a.train.max_steps == b.train.max_steps
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

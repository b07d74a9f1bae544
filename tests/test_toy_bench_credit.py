"""The credit benchmark: its --quick mode runs every variant end to end and writes both tables; its
statistics pair the runs by seed."""

from __future__ import annotations

import json
import math

import pytest

from otca_fast.bench_credit import (
    _DEFAULT_CONFIG,
    COMPUTE_TABLE,
    CREDIT_TABLE,
    HEADLINE,
    OBJECTIVES,
    SECTION_HEADING,
    VARIANTS,
    bench_config,
    compute_rows,
    main,
    merge_section,
    summarise,
    time_to_target,
)
from otca_fast.config import load_config


@pytest.mark.parametrize("jobs, variants", [(1, ["uniform", "otca λ=0", "credit 0.5 importance", "window 1"]),
                                            (2, list(VARIANTS))])
def test_quick_benchmark_trains_each_variant_and_writes_both_tables(tmp_path, jobs, variants):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Another benchmark\n\nkeep me\n")
    assert main(["--quick", "--schemes", *variants, "--jobs", str(jobs), "--out", str(tmp_path / "runs"),
                 "--results", str(results)]) == 0
    text = results.read_text()
    assert text.startswith("# Benchmark results") and "keep me" in text and SECTION_HEADING in text
    assert all(f"| {v} | 1 |" in text for v in variants)
    assert "### Which credit makes better clips" in text and "### Credit that saves compute" in text
    assert "### Trading one objective for another" in text
    # a Flow-GRPO-Fast window is judged in both tables: by its clips (the window scheme's row, since the scheme's
    # own default is uniform on the embedded default) and by its compute
    better_clips = text.split("### Which credit makes better clips")[1].split("### Trading")[0]
    trading = text.split("### Trading")[1].split("### Credit that saves compute")[0]
    compute = text.split("### Credit that saves compute")[1]
    assert all("| window 1 | 1 |" in part for part in (better_clips, trading, compute))
    assert "| credit 0.5 importance | 1 |" not in better_clips and "| otca λ=0 | 1 |" not in compute
    assert (tmp_path / "credit_benchmark.png").stat().st_size > 0
    runs = json.loads((tmp_path / "credit_benchmark.json").read_text())
    assert [r["variant"] for r in runs] == variants
    # every run says which invocation timed it and on what host: the compute table pairs times within one invocation
    assert len({r["invocation"] for r in runs}) == 1 and runs[0]["invocation"]
    assert all("torch CPU capability" in r["host"] for r in runs)
    base = runs[0]["evaluations"][0]["values"]
    assert HEADLINE in base and all(f"reward/{o}" in base for o in OBJECTIVES)
    for run in runs:
        # every variant starts from the same base and scores the same clips' noise
        assert run["evaluations"][0]["values"] == base
        assert run["evaluations"][-1]["step"] == run["steps"] == 1
        assert all(0.0 <= v <= 1.0 for v in run["evaluations"][-1]["values"][HEADLINE])
        saved = tmp_path / "runs" / f"{run['variant'].replace(' ', '_').replace('=', '')}_seed0" / "bench_result.json"
        assert json.loads(saved.read_text()) == run


def test_variants_share_the_budget_and_change_only_what_they_name(tmp_path):
    a = bench_config("uniform", 0, tmp_path / "a")
    b = bench_config("otca λ=0.5", 2, tmp_path / "b")
    assert (a.credit.scheme, b.credit.scheme) == ("uniform", "otca") and b.credit.exploration == 0.5
    assert (a.run.seed, b.run.seed) == (0, 2)
    assert a.model.family == "shapes" and a.model.path is None and not a.model.tiny
    assert sorted(r.name for r in a.rewards) == sorted(OBJECTIVES)
    assert [m.name for m in a.eval.metrics] == ["shapes_exam"]
    # the embedded default's own reward weights (alignment x3), not 1 each
    default = load_config(_DEFAULT_CONFIG)
    assert {r.name: r.weight for r in a.rewards} == {r.name: r.weight for r in default.rewards}
    assert a.sample.prompts_per_step == default.sample.prompts_per_step
    assert a.train.max_steps == default.train.max_steps
    for section in ("sample", "optimizer", "data", "eval", "train"):
        assert getattr(a, section) == getattr(b, section), section
    credit = bench_config("credit 0.25 topk", 0, tmp_path / "c")
    assert (credit.train.timesteps.mode, credit.train.timesteps.fraction, credit.train.timesteps.select_mode) == \
        ("credit", 0.25, "topk")
    window = bench_config("window 2", 0, tmp_path / "w")
    assert window.credit.window_size == 2 and window.sample.sde.mode == "all"
    assert a.sample.sde.mode == "fraction"
    assert bench_config("coca", 1, tmp_path / "d", overrides=["train.max_steps=7"]).train.max_steps == 7
    assert set(CREDIT_TABLE) | set(COMPUTE_TABLE) == set(VARIANTS)
    assert set(CREDIT_TABLE) & set(COMPUTE_TABLE) == {"window 1", "window 2"}
    with pytest.raises(ValueError, match="scheme"):
        bench_config("best_of_n", 0, tmp_path / "e")


def _run(variant, seed, finals, base=0.2, seconds=(10.0, 20.0)):
    """A synthetic run: all-correct per prompt at step 0 and at two evaluations."""
    def ev(step, value, t):
        return {"step": step, "train_seconds": t, "values": {HEADLINE: [value] * 4,
                                                             "reward/shapes_quality": [value / 2] * 4}}
    return {"variant": variant, "seed": seed, "steps": 2, "train_seconds": seconds[-1],
            "evaluations": [ev(0, base, 0.0), ev(1, finals[0], seconds[0]), ev(2, finals[1], seconds[1])]}


def test_summary_pairs_each_variant_with_uniform_by_seed():
    runs = [_run("uniform", s, (0.2, 0.3 + 0.1 * s)) for s in range(3)]
    runs += [_run("otca", s, (0.3, 0.35 + 0.1 * s)) for s in range(3)]  # +0.05 on every seed
    rows = {r["variant"]: r for r in summarise(runs)}
    assert rows["uniform"]["vs_reference"][HEADLINE] is None
    diff = rows["otca"]["vs_reference"][HEADLINE]
    # three seeds that agree exactly are too few to tell at 90 % (sign test: 1 − 2·0.5³ = 0.75): no zero-width interval
    assert diff.mean == pytest.approx(0.05) and diff.lo == -math.inf and not diff.above_zero
    assert rows["otca"]["gain"][HEADLINE][0] == pytest.approx(0.25)  # gains 0.15, 0.25, 0.35
    assert rows["otca"]["gain"][HEADLINE][1] == pytest.approx(0.1)


def test_a_partial_table_ranks_only_the_variants_with_the_most_paired_seeds():
    """A benchmark run in chunks: a variant on 2 seeds with a large, noisy mean is an interim, not the winner."""
    from otca_fast.bench_credit import _verdict

    runs = [_run("uniform", s, (0.2, 0.3)) for s in range(4)]
    runs += [_run("otca", s, (0.2, 0.31 + 0.001 * s)) for s in range(4)]  # +0.011 .. +0.014 on 4 seeds
    runs += [_run("dance", s, (0.2, 0.40 + 0.1 * s)) for s in range(2)]  # +0.10, +0.20 on 2 seeds
    lines = _verdict(summarise(runs))
    assert lines[0].startswith("Largest all-correct difference from uniform among the variants with 4 paired "
                               "seeds: **otca**")
    assert lines[1] == "On fewer paired seeds (an interim, not ranked): dance (2)."
    assert lines[2] == "Beyond the noise of the paired seeds: otca (better)."
    # a complete table reads as before
    complete = _verdict(summarise([r for r in runs if r["variant"] != "dance"]))
    assert complete[0].startswith("Largest all-correct difference from uniform: **otca**")


def _trading_run(variant, seed, alignment, quality, shape=(0.0,) * 4, size=(0.0,) * 4):
    """A synthetic run of 4 held-out prompts whose per-prompt changes are given (base 0.5 everywhere)."""
    keys = {"reward/shapes_alignment": alignment, "reward/shapes_quality": quality,
            "metric/shapes_exam/shape": shape, "metric/shapes_exam/size": size}
    base = {k: [0.5] * 4 for k in keys} | {HEADLINE: [0.5] * 4}
    final = {k: [0.5 + c for c in v] for k, v in keys.items()} | {HEADLINE: [0.9] * 4}
    return {"variant": variant, "seed": seed, "steps": 1, "train_seconds": 1.0,
            "evaluations": [{"step": 0, "train_seconds": 0.0, "values": base},
                            {"step": 1, "train_seconds": 1.0, "values": final}]}


def test_trade_share_counts_prompts_where_one_objective_was_bought_with_another():
    from otca_fast.bench_credit import trade_share

    # prompt 0 trades (+0.1 / −0.1); 1 gains both; 2 loses too little to count (−0.03); 3 does not move
    run = _trading_run("uniform", 0, (0.1, 0.1, 0.1, 0.0), (-0.1, 0.1, -0.03, 0.0),
                       shape=(0.25, 0.25, 0.25, 0.0), size=(-0.25, -0.25, 0.0, 0.0))
    assert trade_share(run, "rewards") == 0.25
    assert trade_share(run, "exam") == 0.5          # all_correct (their conjunction) is not one of them
    with pytest.raises(ValueError, match="kind"):
        trade_share(run, "both")
    runs = [run, _trading_run("uniform", 1, (0.1,) * 4, (-0.1,) * 4),
            _trading_run("otca λ=0", 0, (0.1,) * 4, (0.1,) * 4), _trading_run("otca λ=0", 1, (0.1,) * 4, (0.0,) * 4)]
    rows = {r["variant"]: r for r in summarise(runs)}
    mean, _, diff = rows["otca λ=0"]["trades"]["rewards"]
    assert mean == 0.0 and diff.mean == pytest.approx(-(0.25 + 1.0) / 2) and rows["uniform"]["trades"]["rewards"][2] \
        is None


def test_time_to_target_and_the_compute_ratio():
    uniform = [_run("uniform", s, (0.25, 0.4)) for s in range(2)]
    fast = [_run("credit 0.5 importance", s, (0.45, 0.5), seconds=(t, 8.0)) for s, t in ((0, 4.0), (1, 4.2))]
    slow = [_run("window 1", 0, (0.3, 0.35), seconds=(3.0, 6.0))]
    assert time_to_target(fast[0], 0.4) == 4.0 and time_to_target(fast[1], 0.4) == 4.2
    assert time_to_target(slow[0], 0.4) is None
    rows = {r["variant"]: r for r in compute_rows(uniform + fast + slow, ["credit 0.5 importance", "window 1"])}
    assert rows["uniform"]["ratio"].mean == pytest.approx(1.0)
    assert rows["credit 0.5 importance"]["ratio"].mean == pytest.approx(0.205)  # 4 and 4.2 s of uniform's 20 s
    assert rows["credit 0.5 importance"]["step_time_ratio"] == pytest.approx(0.4)
    assert rows["window 1"]["reached"] == 0 and rows["window 1"]["missed"] == [0] and rows["window 1"]["ratio"] is None
    # its own final against uniform's, paired by seed: +0.1 on both seeds; window 1 ends 0.05 lower (one seed)
    assert rows["credit 0.5 importance"]["final_vs_reference"].mean == pytest.approx(0.1)
    assert rows["window 1"]["final_vs_reference"].mean == pytest.approx(-0.05)
    assert rows["uniform"]["final_vs_reference"] is None
    # the goal: reached on every seed with the ratio's interval at most 0.5 (here 0.2 and 0.21)
    assert rows["credit 0.5 importance"]["goal_met"] and not rows["window 1"]["goal_met"]
    assert not rows["uniform"]["goal_met"]
    spread = [_run("credit 0.5 importance", s, (0.45, 0.5), seconds=(t, 18.0)) for s, t in ((0, 4.0), (1, 9.0))]
    late = {r["variant"]: r for r in compute_rows(uniform + spread, ["credit 0.5 importance"])}
    assert not late["credit 0.5 importance"]["goal_met"]  # 0.2 and 0.45: the interval reaches above 0.5
    # uniform's own row covers the seeds the variants were run on, not every uniform run there is
    third = _run("uniform", 2, (0.4, 0.4), seconds=(10.0, 20.0))  # reaches its final at 0.5, not 1.0
    rows = {r["variant"]: r for r in compute_rows(uniform + [third] + slow, ["window 1"])}
    assert rows["uniform"]["seeds"] == 1 and rows["uniform"]["ratio"].mean == pytest.approx(1.0)
    rows = {r["variant"]: r for r in compute_rows(uniform + [third], [])}  # no variant: every uniform run
    assert rows["uniform"]["seeds"] == 3


def test_the_compute_table_compares_times_only_within_one_invocation():
    """A variant timed on another day (another host load) than uniform's run of its seed is left out and named;
    a pair recorded before runs kept their invocation counts but is named as unchecked."""
    from otca_fast.bench_credit import _compute_pairing, timed_together

    uniform = [_run("uniform", s, (0.25, 0.4)) | {"invocation": "A"} for s in range(3)]
    window = [_run("window 1", s, (0.45, 0.5), seconds=(4.0, 8.0)) | {"invocation": "A"} for s in range(2)]
    window.append(_run("window 1", 2, (0.45, 0.5), seconds=(1.0, 2.0)) | {"invocation": "B"})  # a faster host
    old = [_run("window 2", s, (0.45, 0.5), seconds=(5.0, 10.0)) for s in range(2)]  # no invocation recorded
    assert timed_together(window[0], uniform[0]) is True and timed_together(window[2], uniform[2]) is False
    assert timed_together(old[0], uniform[0]) is None
    rows = {r["variant"]: r for r in compute_rows(uniform + window + old, ["window 1", "window 2"])}
    # seed 2's 0.05 would pull the ratio down: it is not in the row, and the row says so
    assert rows["window 1"]["seeds"] == 2 and rows["window 1"]["mixed"] == [2]
    assert rows["window 1"]["ratio"].mean == pytest.approx(0.2) and rows["window 1"]["unchecked"] == []
    assert rows["window 2"]["seeds"] == 2 and rows["window 2"]["unchecked"] == [0, 1]
    assert rows["window 2"]["mixed"] == []
    assert rows["uniform"]["mixed"] == [] and rows["uniform"]["unchecked"] == []
    lines = _compute_pairing(list(rows.values()))
    assert "`window 1` seed 2" in lines[1] and lines[1].startswith("Left out")
    assert "`window 2` seeds 0, 1" in lines[2] and lines[2].startswith("Not checked")
    # a variant with no comparable pair has no ratio and no goal, but is still named
    only_b = {r["variant"]: r for r in compute_rows(uniform + window[2:], ["window 1"])}
    assert only_b["window 1"]["seeds"] == 0 and only_b["window 1"]["mixed"] == [2]
    assert not only_b["window 1"]["goal_met"] and only_b["window 1"]["ratio"] is None


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process: the run lock's liveness check, with an exited process not yet
    reaped (a zombie) counted as gone."""
    from pathlib import Path

    from otca_fast.runlock import _alive

    if not _alive(pid):
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return not Path("/proc").is_dir()  # gone since the check, or no procfs (then _alive's answer stands)
    return state != "Z"


def test_a_workers_run_stops_when_the_invocation_that_started_it_is_killed(tmp_path):
    """``--jobs`` workers watch their driver: killing it (as a person stopping the benchmark does) must not
    leave runs training on the cores that the next benchmark's step times are measured on."""
    import os
    import signal
    import subprocess
    import sys
    import time

    driver = tmp_path / "driver.py"
    driver.write_text(
        "import multiprocessing, os, sys, time\n"
        "from otca_fast.bench_credit import _worker_init\n"
        "def work(parent, path):\n"
        "    _worker_init(1, parent)\n"
        "    open(path + '.tmp', 'w').write(str(os.getpid()))\n"
        "    os.replace(path + '.tmp', path)\n"
        "    time.sleep(120)\n"
        "if __name__ == '__main__':\n"
        "    ctx = multiprocessing.get_context('spawn')\n"
        "    ctx.Process(target=work, args=(os.getpid(), sys.argv[1])).start()\n"
        "    time.sleep(120)\n")
    pid_file = tmp_path / "worker.pid"
    proc = subprocess.Popen([sys.executable, str(driver), str(pid_file)], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not pid_file.is_file():
            assert time.monotonic() < deadline, "the worker never started"
            time.sleep(0.2)
        worker = int(pid_file.read_text())
        assert _running(worker)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 30
    while _running(worker):
        if time.monotonic() > deadline:
            os.kill(worker, signal.SIGKILL)
            pytest.fail(f"worker {worker} was still running 30 s after its driver was killed")
        time.sleep(0.2)


def test_merge_section_replaces_only_its_own_section():
    doc = f"# R\n\n## A\n\na\n\n{SECTION_HEADING}\n\nold\n\n## B\n\nb\n"
    merged = merge_section(doc, f"{SECTION_HEADING}\n\nnew")
    assert merged == f"# R\n\n## A\n\na\n\n{SECTION_HEADING}\n\nnew\n\n## B\n\nb\n"
    assert merge_section("", f"{SECTION_HEADING}\n\nx") == f"{SECTION_HEADING}\n\nx\n"
    assert merge_section("# R\n", "## S\n") == "# R\n\n## S\n"


def test_reuse_merges_an_earlier_invocations_runs_in_canonical_order(tmp_path):
    first, second = tmp_path / "first" / "RESULTS.md", tmp_path / "second" / "RESULTS.md"
    assert main(["--quick", "--jobs", "1", "--schemes", "otca", "--out", str(tmp_path / "a"),
                 "--results", str(first)]) == 0
    # the second invocation trains uniform and takes otca from the first one's JSON
    assert main(["--quick", "--jobs", "1", "--schemes", "uniform", "--out", str(tmp_path / "b"),
                 "--results", str(second), "--reuse", str(first.with_name("credit_benchmark.json"))]) == 0
    runs = json.loads(second.with_name("credit_benchmark.json").read_text())
    assert [r["variant"] for r in runs] == ["uniform", "otca"]
    assert runs[1] == json.loads(first.with_name("credit_benchmark.json").read_text())[0]
    text = second.read_text()
    assert text.index("| uniform | 1 |") < text.index("| otca | 1 |")


def test_report_only_builds_the_tables_from_chunks_of_runs(tmp_path):
    """A benchmark run in chunks (sessions, machines): each run keeps its bench_result.json, and
    --report-only joins them without training anything; a run recorded twice is refused."""
    first = tmp_path / "first" / "RESULTS.md"
    assert main(["--quick", "--jobs", "1", "--schemes", "otca", "uniform", "--out", str(tmp_path / "a"),
                 "--results", str(first)]) == 0
    single = tmp_path / "a" / "uniform_seed0" / "bench_result.json"
    otca_only = tmp_path / "otca.json"
    otca_only.write_text(json.dumps([r for r in json.loads(first.with_name("credit_benchmark.json").read_text())
                                     if r["variant"] == "otca"]))
    joined = tmp_path / "joined" / "RESULTS.md"
    assert main(["--report-only", "--reuse", str(otca_only), str(single), "--results", str(joined)]) == 0
    runs = json.loads(joined.with_name("credit_benchmark.json").read_text())
    assert [r["variant"] for r in runs] == ["uniform", "otca"]
    assert runs[0] == json.loads(single.read_text())
    assert "| otca | 1 |" in joined.read_text()
    with pytest.raises(SystemExit, match="uniform seed 0 is recorded in both"):
        main(["--report-only", "--reuse", str(single), str(first.with_name("credit_benchmark.json")),
              "--results", str(tmp_path / "x" / "RESULTS.md")])
    with pytest.raises(SystemExit, match="--report-only: expected --reuse"):
        main(["--report-only", "--results", str(tmp_path / "y" / "RESULTS.md")])


def test_versus_tabulates_the_paired_differences_from_another_variant(tmp_path):
    """--versus otca: what λ = 0 (MOCA's min-norm mix) changes against the default it is added to, on every
    outcome, paired by seed; the pre-registered table stays against uniform."""
    runs = [_run("uniform", s, (0.2, 0.3 + 0.1 * s)) for s in range(3)]
    runs += [_run("otca", s, (0.3, 0.35 + 0.1 * s)) for s in range(3)]
    runs += [_run("otca λ=0", s, (0.3, 0.37 + 0.1 * s)) for s in range(3)]  # +0.02 over otca on every seed
    runs += [_run("tcd_only", 5, (0.3, 0.4))]  # no seed shared with otca: no row
    reuse = tmp_path / "runs.json"
    reuse.write_text(json.dumps(runs))
    results = tmp_path / "RESULTS.md"
    assert main(["--report-only", "--trust-unrecorded", "--reuse", str(reuse), "--versus", "otca",
                 "--results", str(results)]) == 0
    text = results.read_text()
    table = text[text.index("### Paired differences from `otca`"):]
    # the same difference on all three seeds: too few to tell at 90 % (stats.t_interval), never a zero-width "above"
    assert "| otca λ=0 | 3 | +0.020 (3 seeds agree, too few to tell) |" in table
    assert "| uniform | 3 | -0.050 (3 seeds agree, too few to tell) |" in table
    assert "| tcd_only |" not in table and "| otca | " not in table
    assert "| otca λ=0 | 3 | " in text[:text.index("### Paired differences")]  # the uniform table is still there
    with pytest.raises(SystemExit, match="--versus: unknown 'nope'"):
        main(["--report-only", "--reuse", str(reuse), "--versus", "nope", "--results", str(results)])


def test_reuse_refuses_runs_made_with_other_settings(tmp_path):
    """Runs joined into one paired table must share their settings (the config every variant shares, the base
    weights, the prompt files): a run made on another default, or recorded without its settings, is refused
    with the keys that differ."""
    from otca_fast.bench_credit import settings_difference, shared_settings

    results = tmp_path / "a" / "RESULTS.md"
    assert main(["--quick", "--jobs", "1", "--schemes", "uniform", "--out", str(tmp_path / "a"),
                 "--results", str(results)]) == 0
    run = json.loads((tmp_path / "a" / "uniform_seed0" / "bench_result.json").read_text())
    assert run["settings"] == shared_settings(quick=True) and run["settings"]["file_sha256"]
    assert shared_settings(quick=True, overrides=["train.tail_matching.weight=0.5"]) != run["settings"]

    other = json.loads(json.dumps({**run, "variant": "otca"}))
    other["settings"]["optimizer"]["lr"] = 0.123
    other_path = tmp_path / "other.json"
    other_path.write_text(json.dumps(other))
    single = tmp_path / "a" / "uniform_seed0" / "bench_result.json"
    out = str(tmp_path / "x" / "RESULTS.md")
    with pytest.raises(SystemExit, match=r"otca seed 0 was made with other settings .*optimizer\.lr: .* -> 0\.123"):
        main(["--report-only", "--reuse", str(single), str(other_path), "--results", out])
    moved = json.loads(json.dumps(run["settings"]))   # the same files in another checkout
    moved["data"]["prompt_file"] = "/elsewhere/otca_fast/toy/assets/" + moved["data"]["prompt_file"].split("/")[-1]
    moved["eval"]["sheet_rows"] = 3                     # presentation only
    assert settings_difference(run["settings"], moved) == []
    assert settings_difference(run["settings"], other["settings"]) == [
        f"optimizer.lr: {run['settings']['optimizer']['lr']!r} -> 0.123"]
    # an invocation that trains checks the reused runs against its own settings before it trains anything
    with pytest.raises(SystemExit, match=r"train\.max_steps: 2 -> 1"):
        main(["--quick", "--jobs", "1", "--schemes", "otca", "--set", "train.max_steps=2", "--reuse", str(single),
              "--out", str(tmp_path / "b"), "--results", out])
    assert not (tmp_path / "b").exists()

    # --collect records a finished run directory whose benchmark process stopped before recording it
    single.unlink()
    assert main(["--quick", "--collect", str(single.parent)]) == 0
    # which invocation trained it is not known: the compute table counts it as unchecked, never as timed together
    assert json.loads(single.read_text()) == {**run, "wall_seconds": None, "invocation": None}
    with pytest.raises(SystemExit, match=r"--collect .*trained with other settings .*optimizer\.lr: 0\.5 -> "):
        main(["--quick", "--set", "optimizer.lr=0.5", "--collect", str(single.parent)])
    with pytest.raises(SystemExit, match="not a benchmark run directory"):
        main(["--quick", "--collect", str(tmp_path / "a")])

    unrecorded = {k: v for k, v in {**run, "variant": "otca"}.items() if k not in ("settings", "settings_digest")}
    old = tmp_path / "old.json"
    old.write_text(json.dumps([unrecorded]))
    with pytest.raises(SystemExit, match="recorded without its settings.*--trust-unrecorded"):
        main(["--report-only", "--reuse", str(single), str(old), "--results", out])
    assert main(["--report-only", "--trust-unrecorded", "--reuse", str(single), str(old), "--results", out]) == 0


class _Stop(Exception):
    pass


def test_a_window_that_is_uniform_is_left_out_of_the_default_list(tmp_path, monkeypatch, capsys):
    """On the embedded default (8 steps, the first 4 SDE) the ``window`` scheme's window of 4 in [0, 4) has one
    place, steps 0-3: its rollouts and trained advantages are uniform's, so its runs would measure noise. The
    full benchmark leaves it out (saying why) and runs it with a warning when it is named."""
    import torch

    import otca_fast.bench_credit as bench
    from otca_fast.credit import build_advantages
    from otca_fast.timesteps import sde_steps

    why = bench.same_as_uniform("window")
    assert why is not None and "steps 0-3" in why
    # the claim itself, checked on what the trainer would do: same SDE steps, same advantages on them
    window_cfg, uniform_cfg = (bench_config(name, 0, tmp_path / name) for name in ("window", "uniform"))
    masks = [sde_steps(c.sample.num_steps, c.sample.sde, c.credit.scheme, c.credit_config(),
                       generator=torch.Generator().manual_seed(0), progress=0.0) for c in (window_cfg, uniform_cfg)]
    assert torch.equal(masks[0][0], masks[1][0]) and masks[0][1] == (0, 4)
    rewards, groups = torch.randn(8, 3, dtype=torch.float64), torch.arange(8) // 4
    trained = masks[1][0]
    adv_window, _ = build_advantages("window", rewards=rewards, group_ids=groups,
                                     config=window_cfg.credit_config(), window=masks[0][1])
    adv_uniform, _ = build_advantages("uniform", rewards=rewards, group_ids=groups,
                                      config=uniform_cfg.credit_config())
    assert torch.equal(adv_window[:, trained], adv_uniform[:, trained])
    # windows that move, or that cover other steps, are not uniform
    for name, overrides in [("window 1", []), ("window 2", []), ("otca", []), ("window", ["credit.window_size=2"]),
                            ("window", ["credit.window_range=[0, 6]"]),
                            ("window", ["credit.window_schedule=fixed", "credit.window_range=[2, 6]"])]:
        assert bench.same_as_uniform(name, overrides=overrides) is None, (name, overrides)

    seen: dict[str, set[str]] = {}

    def fake_train_all(jobs, n_jobs, kwargs, invocation=None):
        seen["names"] = {name for name, _, _ in jobs}
        raise _Stop

    monkeypatch.setattr(bench, "_train_all", fake_train_all)
    common = ["--seeds", "0", "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "R.md")]
    with pytest.raises(_Stop):
        main(common)
    assert "window" not in seen["names"] and {"uniform", "window 1", "window 2"} <= seen["names"]
    assert seen["names"] == set(VARIANTS) - {"window", "tcd_only", "moca_only"}
    out = capsys.readouterr().out
    assert "'window' not run: it is uniform on this config" in out
    assert "'tcd_only' not run: it is otca on this config" in out
    assert "'moca_only' not run: it is uniform on this config" in out
    with pytest.raises(_Stop):
        main(["--schemes", "window", *common])
    assert seen["names"] == {"window"}
    assert "warning: 'window' is uniform on this config" in capsys.readouterr().out


def test_with_moca_off_the_ablations_are_their_twins_and_say_so(tmp_path):
    """On the embedded default MOCA is off (exploration 1, reward weights 0.2/0.2/0.6): OTCA's objective mix is
    0·c* + the static weights, so ``tcd_only`` trains ``otca``'s advantages to the last bit, and ``moca_only``
    trains ``uniform``'s up to one float32 rounding (the same sum in another order). Checked on what the trainer
    hands ``build_advantages`` (latents, x0 predictions, the trainable steps, groups of 8 as on the default and of
    4), rewards wide enough that the ±5 clip bites; the claim is withdrawn as soon as MOCA is on, the weights are
    equal, or uniform sums before it normalises. The report names them under the credit table."""
    import torch

    import otca_fast.bench_credit as bench
    from otca_fast.credit import build_advantages

    assert bench.same_as("tcd_only")[0] == "otca" and bench.same_as("moca_only")[0] == "uniform"
    assert bench.same_as_uniform("moca_only") is not None and bench.same_as_uniform("tcd_only") is None
    cfgs = {name: bench_config(name, 0, tmp_path / name) for name in ("otca", "tcd_only", "uniform", "moca_only")}
    generator = torch.Generator().manual_seed(7)
    steps = cfgs["otca"].sample.num_steps
    trainable = torch.arange(steps) < steps // 2
    for trial in range(20):
        n, group = (16, 8) if trial % 2 else (16, 4)
        rewards = torch.rand(n, 3, generator=generator) if trial % 3 else torch.randn(n, 3, generator=generator) * 10
        rewards[0, trial % 3] = 50.0 * (1 if trial % 4 < 2 else -1)  # one outlier: ẑ is clipped
        groups = torch.arange(n) // group
        latents = torch.randn(n, steps + 1, 2, 3, 4, 4, generator=generator)
        x0_preds = torch.randn(n, steps, 2, 3, 4, 4, generator=generator)
        adv = {name: build_advantages(cfg.credit.scheme, rewards=rewards, group_ids=groups,
                                      config=cfg.credit_config(), latents=latents, x0_preds=x0_preds,
                                      trainable=trainable)[0] for name, cfg in cfgs.items()}
        assert adv["otca"].abs().max() > 0
        assert torch.equal(adv["tcd_only"], adv["otca"]), trial
        torch.testing.assert_close(adv["moca_only"], adv["uniform"], rtol=1e-6, atol=1e-6)
        assert not torch.equal(adv["otca"], adv["uniform"])  # TCD does move the credit
    for name, overrides in [("tcd_only", ["credit.exploration=0.1"]), ("moca_only", ["credit.exploration=0"]),
                            ("tcd_only", ["rewards.0.weight=1", "rewards.1.weight=1", "rewards.2.weight=1"]),
                            ("moca_only", ["credit.aggregate=sum_then_normalize"]),
                            ("moca_only λ=0.1", []), ("otca λ=0", [])]:
        assert bench.same_as(name, overrides=overrides) is None, (name, overrides)
    # MOCA on, the twins differ: the claim would be false there
    on = {name: bench_config(name, 0, tmp_path / name, overrides=["credit.exploration=0"])
          for name in ("otca", "tcd_only")}
    rewards, groups = torch.randn(16, 3, generator=generator), torch.arange(16) // 4
    latents = torch.randn(16, steps + 1, 2, 3, 4, 4, generator=generator)
    x0_preds = torch.randn(16, steps, 2, 3, 4, 4, generator=generator)
    adv = [build_advantages(cfg.credit.scheme, rewards=rewards, group_ids=groups, config=cfg.credit_config(),
                            latents=latents, x0_preds=x0_preds, trainable=trainable)[0] for cfg in on.values()]
    assert not torch.equal(*adv)
    # the report names the twins with the reason
    runs = [_run(name, seed, (0.3, 0.4)) for name in ("uniform", "otca") for seed in range(2)]
    settings = {"command": "python -m otca_fast.bench_credit", "when": "2026-12-06", "machine": "test",
                "base_model": "b", "budget": "2 steps", "seeds": [0, 1], "level": 0.9}
    path = bench.write_results(tmp_path / "R.md", bench.summarise(runs), runs, settings,
                               twins={n: bench.same_as(n) for n in ("tcd_only", "moca_only")})
    text = path.read_text()
    assert "`tcd_only` is not run: on this config it trains exactly what `otca` trains" in text
    assert "`moca_only` is not run: on this config it trains exactly what `uniform` trains" in text


def test_the_trainer_trains_a_twin_exactly_as_its_twin(tmp_path):
    """What ``same_as`` claims from the config, checked on the trainer's own path (rollout, the x0 predictions
    and cosines it hands the credit, the update, the EMA): with MOCA off, two steps of ``tcd_only`` end with
    weights bit for bit ``otca``'s, and ``moca_only`` within float32 rounding of ``uniform``'s. Four denoising
    steps (two SDE, both trained) so that TCD does move the credit: ``otca`` and ``uniform`` end apart, which
    is what makes the equalities above worth checking."""
    import torch
    from rich.console import Console
    from safetensors.torch import load_file

    import otca_fast.bench_credit as bench
    from otca_fast.trainer import Trainer

    overrides = ["train.max_steps=2", "sample.num_steps=4", "eval.enabled=false"]
    assert bench.same_as("tcd_only", overrides=overrides, quick=True)[0] == "otca"
    assert bench.same_as("moca_only", overrides=overrides, quick=True)[0] == "uniform"

    def trained(name: str) -> dict[str, dict[str, torch.Tensor]]:
        out = tmp_path / name
        cfg = bench_config(name, 0, out, overrides=overrides, quick=True)
        with Trainer(cfg, console=Console(stderr=True, quiet=True)) as trainer:
            trainer.train()
        files = sorted(out.rglob("*.safetensors"))
        assert files, f"{name}: no checkpoint written under {out}"
        return {str(f.relative_to(out)): load_file(f) for f in files}

    runs = {name: trained(name) for name in ("otca", "tcd_only", "uniform", "moca_only")}
    assert runs["otca"].keys() == runs["tcd_only"].keys() == runs["uniform"].keys() == runs["moca_only"].keys()
    moved = False
    for file, tensors in runs["otca"].items():
        for key, value in tensors.items():
            assert torch.equal(runs["tcd_only"][file][key], value), (file, key)
            torch.testing.assert_close(runs["moca_only"][file][key], runs["uniform"][file][key], rtol=1e-5,
                                       atol=1e-6, msg=lambda m, f=file, k=key: f"{f} {k}: {m}")
            moved |= not torch.equal(value, runs["uniform"][file][key])
    assert moved, "otca and uniform trained the same weights: TCD moved no credit, so the test shows nothing"

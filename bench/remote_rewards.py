"""Step time of the main job with its three rewards in process vs served by one reward server on localhost.

    python bench/remote_rewards.py [--steps 20] [--pairs 2] [--calls 40] [--out runs/bench_remote]

Runs ``python -m otca_fast.train configs/tiny_video.yaml`` with evaluation off, as shipped ("in process")
and with shapes_quality / shapes_motion / shapes_alignment as ``remote`` rewards of one
``python -m otca_fast.rewards.serve`` on 127.0.0.1 (8-bit frames, the default transport; "served"), in
ABBA order (in, served, served, in, ...) so that a drifting machine load falls on both alike. Prints the
medians over all steps of each condition of ``time/step_s``, ``time/rollout_s`` (rewards are scored in
the rollout) and ``time/update_s`` (no reward runs there: its difference between the two conditions
measures the noise of the machine), and a markdown row for bench/RESULTS.md.

Before that (``--calls``; 0 skips it), the cost of one rollout chunk's scoring alone: the main job's chunk
of 8 clips of 9x32x32 scored by the three rewards in process and through the server (one request), the two
calls alternated, medians. ``--pairs 0`` skips the training runs. Never asserts a time.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["shapes_quality", "shapes_motion", "shapes_alignment"]


KEYS = ("time/step_s", "time/rollout_s", "time/update_s")


def train(out: Path, steps: int, extra: list[str]) -> list[dict]:
    cmd = [sys.executable, "-m", "otca_fast.train", "configs/tiny_video.yaml", "--set", f"train.max_steps={steps}",
           "--set", "eval.enabled=false", "--set", f"run.output_dir={out}", "--set", "run.progress=plain",
           "--overwrite", *extra]
    subprocess.run(cmd, cwd=ROOT, check=True)
    # step 1 includes the one-off warm-up (first forwards, kernel set-up): left out of both conditions
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]


def scoring_cost(url: str, calls: int) -> None:
    import torch

    from otca_fast.rewards import build_reward, score_rewards
    from otca_fast.toy import register_toy_rewards
    from otca_fast.toy.world import sample_clips

    register_toy_rewards()
    clips = sample_clips(8, generator=torch.Generator().manual_seed(0))   # one chunk of the main job
    local = [build_reward(n) for n in NAMES]
    remote = [build_reward("remote", url=url, reward=n) for n in NAMES]
    seconds: dict[str, list[float]] = {"in process": [], "served (localhost)": []}
    for _ in range(calls):
        for name, rewards in (("in process", local), ("served (localhost)", remote)):
            start = time.perf_counter()
            score_rewards(rewards, clips.frames, clips.prompts, step=0)
            seconds[name].append(time.perf_counter() - start)
    print(f"scoring one chunk (8 clips, 9x32x32, three rewards), median of {calls} alternated calls:")
    for name, values in seconds.items():
        print(f"  {name:<20} {1000 * statistics.median(values):8.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=2, help="ABBA pairs of runs (each pair: one run per condition)")
    parser.add_argument("--calls", type=int, default=40, help="alternated scoring calls per condition (0: skip)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_remote")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "server.log"
    with open(log, "w") as sink:
        server = subprocess.Popen([sys.executable, "-m", "otca_fast.rewards.serve", "--port", "0",
                                   *[a for n in NAMES for a in ("--reward", n)]], cwd=ROOT, stdout=sink,
                                  stderr=subprocess.STDOUT)
    steps: dict[str, list[dict]] = {"in process": [], "served (localhost)": []}
    try:
        deadline = time.monotonic() + 300
        while not (match := re.search(r"serving .* on (http://[\d.]+:\d+)", log.read_text())):
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the reward server did not start:\n{log.read_text()}")
            time.sleep(0.2)
        if args.calls:
            scoring_cost(match.group(1), args.calls)
        served = [{"name": "remote", "weight": 1.0, "options": {"url": match.group(1), "reward": n}} for n in NAMES]
        conditions = {"in process": [], "served (localhost)": ["--set", f"rewards={json.dumps(served)}"]}
        order = [c for i in range(args.pairs) for c in (list(conditions) if i % 2 == 0 else list(conditions)[::-1])]
        for i, name in enumerate(order):
            steps[name] += train(args.out / f"run{i}", args.steps, conditions[name])
    finally:
        server.kill()
        server.wait()
    if not args.pairs:
        return
    medians = {name: {k: statistics.median(r[k] for r in recs) for k in KEYS} for name, recs in steps.items()}
    print(f"medians over {len(steps['in process'])} steps per condition (step 1 of each run left out)")
    print(f"{'':<22} {'time/step_s':>12} {'time/rollout_s':>15} {'time/update_s':>14}")
    for name, m in medians.items():
        print(f"{name:<22} {m['time/step_s']:>12.3f} {m['time/rollout_s']:>15.3f} {m['time/update_s']:>14.3f}")
    a, b = medians["in process"], medians["served (localhost)"]
    print("| " + " | ".join(f"{a[k]:.2f} s | {b[k]:.2f} s ({b[k] / a[k] - 1:+.0%})" for k in KEYS) + " |")


if __name__ == "__main__":
    main()

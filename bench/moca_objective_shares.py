"""How much each reward counts in the advantage under MOCA's objective mix, on the embedded default's rollouts.

``python bench/moca_objective_shares.py [--seed 0] [--batches 8]``

The credit benchmark (``bench/RESULTS.md``, issue 14) finds every MOCA setting (λ < 1) below ``uniform`` on the exam,
with the trained alignment reward (weight 0.6 in the static mix) among what it loses. This script asks why, without
training: it samples ``--batches`` of the base policy's rollouts exactly as the trainer does at step 1 (prompts,
noise, SDE steps, rewards), takes their clipped per-objective group z-scores ẑ ``[N, K]``, and builds the advantage
each objective mix gives a sample: A_n = Σ_k c_nk ẑ_nk. The *share* of reward k is its least-squares coefficient in
A ≈ Σ_k β_k ẑ_k, normalised to sum 1, i.e. how strongly A follows that reward's z-score. Mixes:

* the static mix ``credit.objective_weights`` (what ``uniform`` and ``otca`` train on the embedded default);
* MOCA's min-norm mix c* (λ = 0) and the shipped λ = 0.1 and 0.5, from ``build_advantages("moca_only")``;
* the min-norm mix computed on the *weighted* z-scores w_k·ẑ_k (not a shipped option; the question is whether
  making the min-norm problem see the reward weights would restore the heavy reward's share).

It also prints the share of samples whose objectives conflict in sign (min-norm signal exactly 0) and the spread of
A. It reads only the base policy's first batches, so it describes the start of training, not its end.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from typing import Any

import torch
from rich.console import Console

from otca_fast.bench_credit import bench_config
from otca_fast.credit import build_advantages, objective_credit
from otca_fast.trainer import Trainer


def collect_rewards(seed: int, batches: int) -> tuple[torch.Tensor, torch.Tensor, Any, list[str], list[float]]:
    """Rewards ``[B·N, K]``, group ids, credit config, reward names and weights of ``batches`` base-policy
    rollouts of the benchmark's seed ``seed``."""
    with tempfile.TemporaryDirectory() as out:
        cfg = bench_config("uniform", seed, out, overrides=["eval.enabled=false"])
        with Trainer(cfg, console=Console(stderr=True, quiet=True)) as trainer:
            rewards, groups = [], []
            for step in range(1, batches + 1):
                ids = trainer.sampler.next()
                prompts = [trainer.prompts[i] for i in ids for _ in range(trainer.group_size)]
                rollout = trainer.rollout(step, prompts)
                rewards.append(rollout.rewards.float())
                # groups of different batches must not be pooled: offset their ids
                groups.append(torch.arange(len(ids)).repeat_interleave(trainer.group_size) + (step - 1) * len(ids))
            names, weights = list(trainer.reward_names), list(trainer.reward_weights)
            return torch.cat(rewards), torch.cat(groups), trainer.credit_config, names, weights


def shares(zhat: torch.Tensor, advantage: torch.Tensor) -> list[float]:
    """Least-squares coefficients of ``advantage`` on the columns of ``zhat``, normalised to sum 1."""
    beta = torch.linalg.lstsq(zhat.double(), advantage.double()[:, None]).solution.squeeze(1)
    return (beta / beta.sum()).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batches", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)

    rewards, groups, credit, names, weights = collect_rewards(args.seed, args.batches)
    w = torch.tensor(weights, dtype=torch.float32) / sum(weights)
    mixes: dict[str, torch.Tensor] = {}
    zhat = None
    for lam in (1.0, 0.5, 0.1, 0.0):
        cfg = dataclasses.replace(credit, exploration=lam)
        A, info = build_advantages("moca_only", rewards=rewards, group_ids=groups, config=cfg)
        zhat = info["advantages"]
        label = "static mix (λ = 1)" if lam == 1.0 else f"MOCA λ = {lam:g}"
        mixes[label] = A[:, 0]
    weighted = zhat * w
    mixes["min-norm on w·ẑ (λ = 0)"] = (objective_credit(weighted, exploration=0.0) * weighted).sum(1)

    conflict = ((zhat > 0).any(1) & (zhat < 0).any(1)).float().mean().item()
    corr = torch.corrcoef(zhat.T.double())
    print(f"seed {args.seed}, {args.batches} batches, {len(rewards)} samples; rewards {names}, weights "
          f"{[round(x, 2) for x in w.tolist()]}")
    print(f"samples whose objectives conflict in sign: {conflict:.2f}; correlation of ẑ: "
          f"{[[round(x, 2) for x in row] for row in corr.tolist()]}")
    print(f"| mix | share of {' / '.join(names)} | std(A) |")
    print("|---|---|---|")
    for label, a in mixes.items():
        s = " / ".join(f"{x:.2f}" for x in shares(zhat, a))
        print(f"| {label} | {s} | {a.std().item():.3f} |")


if __name__ == "__main__":
    main()

"""Credit assignment for GRPO on flow-matching generators: which step, and which objective, earned the reward.

* :func:`trajectory_credit` — TCD: per-step credit w ``[N, T]`` from the cosine progress of the
  trajectory toward its own final latent (a streaming Triton reduction on CUDA).
* :func:`objective_credit` — MOCA: the exact min-norm objective mix c ``[N, K]`` plus exploration.
* :func:`objective_timing_credit` — per-objective step credit ``[N, T, K]`` from per-step rewards
  (beyond the paper); :func:`evaluation_states` / :func:`interpolate_step_rewards` for the trainer.
* :func:`select_timesteps` — train only the steps that carry the credit, unbiased (beyond the paper).
* :func:`build_advantages` — every scheme (Flow-GRPO, DanceGRPO, TempFlow, MixGRPO window, CoCA,
  OTCA and its ablations) as one ``A [N, T]`` plus an info dict; :class:`CreditConfig` names every knob.
* :func:`plot_credit` — the PNG heatmaps of an info dict.

Imports torch and ``otca_fast.ops`` only; matplotlib is imported by :func:`plot_credit` when called.
"""

from otca_fast.credit.config import CreditConfig, as_credit_config
from otca_fast.credit.objective import objective_credit
from otca_fast.credit.plots import plot_credit
from otca_fast.credit.schemes import SCHEMES, build_advantages, window_steps
from otca_fast.credit.selection import select_timesteps
from otca_fast.credit.timing import evaluation_states, interpolate_step_rewards, objective_timing_credit
from otca_fast.credit.trajectory import coca_suffix_credit, state_cosines, tcd_weights, trajectory_credit

__all__ = [
    "CreditConfig", "as_credit_config", "SCHEMES", "build_advantages", "window_steps", "trajectory_credit",
    "state_cosines", "tcd_weights", "coca_suffix_credit", "objective_credit", "objective_timing_credit",
    "evaluation_states", "interpolate_step_rewards", "select_timesteps", "plot_credit",
]

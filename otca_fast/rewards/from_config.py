"""The rewards a run trains on and the metrics it only evaluates with, built from its config."""

from __future__ import annotations

from otca_fast.config import Config, ConfigError
from otca_fast.rewards.registry import Reward, build_reward

__all__ = ["rewards_from_config"]


def rewards_from_config(cfg: Config) -> tuple[list[Reward], list[Reward]]:
    """``(rewards, eval_metrics)`` of ``cfg.rewards`` and ``cfg.eval.metrics``, each error naming its entry.

    An eval-only metric is refused as a reward (a judge the policy can optimise can be gamed), each name may
    appear once (metrics are logged by name), and ``otca_timing`` needs a reward marked cheap."""
    if cfg.model.family == "shapes" or any(r.name.startswith("shapes_") for r in [*cfg.rewards, *cfg.eval.metrics]):
        from otca_fast.toy import register_toy_rewards

        register_toy_rewards()
    rewards = []
    for i, spec in enumerate(cfg.rewards):
        try:
            reward = build_reward(spec.name, **spec.options)
        except (TypeError, ValueError, ImportError, ConnectionError) as e:   # a reward server that is down
            raise ConfigError(f"rewards[{i}] ({spec.name}): {e}") from None
        if reward.eval_only:
            raise ConfigError(f"rewards[{i}] ({spec.name}): an eval-only metric is never trained on (a judge the "
                              f"policy can optimise can be gamed); list it under eval.metrics")
        rewards.append(reward)
    metrics = []
    for i, spec in enumerate(cfg.eval.metrics):
        try:
            metrics.append(build_reward(spec.name, **spec.options))
        except (TypeError, ValueError, ImportError, ConnectionError) as e:
            raise ConfigError(f"eval.metrics[{i}] ({spec.name}): {e}") from None
    # metrics are keyed by the built names (a remote reward takes its served reward's name)
    built = [r.name for r in rewards] + [m.name for m in metrics]
    dup = sorted({n for n in built if built.count(n) > 1})
    if dup:
        raise ConfigError(f"rewards / eval.metrics: {dup} would be logged twice (a remote reward is logged under "
                          f"the served reward's name); each reward and metric may appear once")
    if cfg.credit.scheme == "otca_timing" and not any(r.cheap for r in rewards):
        raise ConfigError(f"credit.scheme: otca_timing scores the rewards marked cheap on the intermediate x̂0 "
                          f"predictions, but none of {[r.name for r in rewards]} is cheap")
    return rewards, metrics

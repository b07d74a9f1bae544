"""The trainer end to end on a 2-core CPU: the CLI, resume equivalence, failures, LoRA and full fine-tuning.

Every run uses configs/tiny_video.yaml with small overrides (few steps, few samples) so the whole
file stays within its share of the CI budget.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from otca_fast import checkpoint as ckpt
from otca_fast.config import ConfigError, load_config
from otca_fast.rewards import build_reward
from otca_fast.tail_matching import tail_targets
from otca_fast.train import main
from otca_fast.trainer import TIMING_KEYS, Trainer, TrainingError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_video.yaml"


# a one-block version of the tiny config's transformer (random weights) on 3x16x16 clips: the loop is
# the same, the forwards are about 30x cheaper
FAST_MODEL = {"transformer": {"num_layers": 1, "ffn_dim": 64}}


def small(out: Path, **extra) -> list[str]:
    """--set overrides that make the tiny config cheap: 2 prompts x 2 samples, 4 denoising steps, all SDE."""
    sets = {"run.output_dir": str(out), "run.progress": "none", "run.plot_every": 0, "model.tiny": FAST_MODEL,
            "sample.height": 16, "sample.width": 16, "sample.num_frames": 3, "sample.num_steps": 4,
            "sample.group_size": 2, "sample.prompts_per_step": 2, "sample.batch_size": 4,
            # every step stochastic and independent initial noise (the shipped config confines the SDE to
            # the first half and shares the noise per group; these tests count pairs over all steps)
            "sample.sde.mode": "all", "sample.same_noise": False,
            "train.max_steps": 2, "train.checkpoint_every": 1, "eval.every": 0, "eval.max_clips": 1,
            # two held-out prompts (the default config evaluates all 48 held-out combinations)
            "data.eval_prompt_file": None,
            "data.eval_prompts": ["a blue circle moving up on a white background",
                                  "a green circle moving left on a checkered background"]}
    sets.update(extra)
    out_list = []
    for key, value in sets.items():
        out_list += ["--set", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    return out_list


def cfg_of(out: Path, **extra):
    args = small(out, **extra)
    return load_config(TINY, [args[i + 1] for i in range(0, len(args), 2)])


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_records(out: Path) -> list[dict]:
    return [r for r in records(out) if "loss" in r]


def weights_of(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step_{step:08d}" / "weights.safetensors"))


# ------------------------------------------------------------------------------------------------
# the CLI end to end (a real subprocess: `python -m otca_fast.train`)
# ------------------------------------------------------------------------------------------------

def test_cli_runs_the_tiny_config_end_to_end(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "otca_fast.train", str(TINY),
                           *small(out, **{"run.progress": "plain", "eval.every": 2, "run.plot_every": 2,
                                          "train.checkpoint_every": 1, "train.keep_checkpoints": 1})],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = load_config(TINY)
    names = [r.name for r in cfg.rewards]
    recs = train_records(out)
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        for key in ["loss", "kl", "approx_kl", "clip_frac", "grad_norm", "ratio_mean", "zero_std_ratio",
                    "samples_per_s", "peak_memory_gb", "credit/adv_abs_mean", "credit/early_share",
                    *[f"reward/{n}" for n in names], *[f"credit/c/{n}" for n in names]]:
            assert isinstance(r[key], float), key
        # rollout and training share one log-prob computation and one batch composition, and there is
        # one optimizer update per rollout batch: every ratio is exactly 1 (Flow-GRPO's debug check)
        assert r["ratio_mean"] == 1.0 and r["ratio_dev_max"] == 0.0 and r["clip_frac"] == 0.0
        assert r["grad_norm"] > 0
    evals = [r for r in records(out) if "eval/reward/total" in r]
    assert [r["step"] for r in evals] == [0, 2]
    # outputs: TensorBoard, plots, credit heatmaps, clips at the start and at each evaluation, checkpoints
    assert list((out / "tb").glob("events.out.tfevents.*"))
    report = out / "report"
    for png in ("rewards.png", "training.png", "credit_step_000002.png"):
        assert (report / png).stat().st_size > 1000, png
    for step in (0, 2):
        assert (report / "clips" / f"step_{step:06d}_00.gif").is_file()
        assert (report / "clips" / f"step_{step:06d}_00.mp4").is_file()
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2]  # keep_checkpoints: 1
    assert (out / "config.yaml").is_file()
    # progress lines with ETA and the final summary table
    assert "step 2/2" in proc.stderr and "eta" in proc.stderr
    assert "run summary" in proc.stderr and f"reward/{names[0]}" in proc.stderr


# ------------------------------------------------------------------------------------------------
# resume equivalence
# ------------------------------------------------------------------------------------------------

def _comparable(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in recs]


@contextlib.contextmanager
def _interrupted_at(monkeypatch, at_step: int):
    """Within the block, Ctrl-C arrives in the middle of step ``at_step``'s update."""
    real_update = Trainer.update

    def interrupted(self, step, *args, **kwargs):
        if step == at_step:
            raise KeyboardInterrupt
        return real_update(self, step, *args, **kwargs)

    monkeypatch.setattr(Trainer, "update", interrupted)
    try:
        yield
    finally:
        monkeypatch.setattr(Trainer, "update", real_update)


def test_resume_after_an_interruption_is_bitwise_identical(tmp_path, monkeypatch, capsys):
    extra = {"train.max_steps": 4, "train.checkpoint_every": 2, "eval.every": 2, "train.ema.update_every": 1}
    full = tmp_path / "full"
    assert main([str(TINY), *small(full, **extra)]) == 0

    # the same run, interrupted (Ctrl-C) in the middle of step 3's update, after step 2's checkpoint
    part = tmp_path / "part"
    with _interrupted_at(monkeypatch, 3):
        assert main([str(TINY), *small(part, **extra)]) == 130
    assert "continue with --resume" in capsys.readouterr().err
    assert [s for s, _ in ckpt.list_checkpoints(part)] == [2]
    # without --resume an existing run is never overwritten
    assert main([str(TINY), *small(part, **extra)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([str(TINY), *small(part, **extra), "--resume"]) == 0

    a, b = ckpt.load_checkpoint(full / "checkpoints" / "step_00000004"), ckpt.load_checkpoint(
        part / "checkpoints" / "step_00000004")
    assert_same_state(a, b)
    assert _comparable(records(full)) == _comparable(records(part))
    # the weights did move: the comparison is not between two untouched models
    first = weights_of(full, 2)
    assert any(not torch.equal(first[n], a["weights"][n]) for n in first)


def test_resume_needs_a_checkpoint_and_overwrite_starts_over(tmp_path, capsys):
    assert main([str(TINY), *small(tmp_path / "empty"), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    out = tmp_path / "old"
    ckpt.save_checkpoint(out, 5, weights={"w": torch.zeros(1)}, optimizer={}, state={})
    (out / "metrics.jsonl").write_text('{"step": 5}\n')
    assert main([str(TINY), *small(out), "--resume", "--overwrite"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert main([str(TINY), *small(out, **{"train.max_steps": 1, "eval.enabled": False}), "--overwrite"]) == 0
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1]
    assert [r["step"] for r in records(out)] == [1]


# ------------------------------------------------------------------------------------------------
# failures: a NaN reward, a non-finite loss
# ------------------------------------------------------------------------------------------------

class FlakyBrightness:
    """A user-defined reward (dotted path): brightness, but NaN from call ``fail_at`` on."""

    def __init__(self, fail_at: int = 10**9):
        self.fn = build_reward("brightness").fn
        self.fail_at = fail_at
        self.calls = 0

    def __call__(self, frames, prompts):
        self.calls += 1
        scores = self.fn(frames, prompts)
        return torch.full_like(torch.as_tensor(scores), float("nan")) if self.calls >= self.fail_at else scores


def test_nan_reward_checkpoints_the_last_good_state_and_names_reward_prompt_step(tmp_path, capsys):
    out = tmp_path / "nan"
    # calls: eval at step 0 (1), step 1 (1 chunk of 4), then the first chunk of step 2 fails
    flaky = f"{__name__}:FlakyBrightness"
    extra = {"rewards": [{"name": flaky, "weight": 1.0, "options": {"fail_at": 3, "role": "quality",
                                                                     "cheap": True}}],
             "train.checkpoint_every": 100, "train.max_steps": 3}
    assert main([str(TINY), *small(out, **extra)]) == 1
    err = capsys.readouterr().err
    assert f"reward '{flaky}' failed at step 2 on prompt" in err and "non-finite" in err
    assert "the last good state (step 1) is checkpointed" in err
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1]
    assert [r["step"] for r in train_records(out)] == [1]

    # that checkpoint is exactly the state after step 1 of a run that never failed: the same weights,
    # optimizer moments, EMA, prompt sampler and every RNG (captured before step 2 drew anything)
    healthy = tmp_path / "healthy"
    ok = {**extra, "rewards": [{"name": flaky, "weight": 1.0, "options": {"role": "quality", "cheap": True}}],
          "train.max_steps": 1}
    assert main([str(TINY), *small(healthy, **ok)]) == 0
    a = ckpt.load_checkpoint(healthy / "checkpoints" / "step_00000001")
    b = ckpt.load_checkpoint(out / "checkpoints" / "step_00000001")
    assert_same_state(a, b)


def assert_same_state(a, b) -> None:
    """Two checkpoints hold bit-identical weights, EMA, optimizer state, RNG and sampler state."""
    for key in ("weights", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}[{name}]"
    for pid, state in a["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, b["optimizer"]["state"][pid][k]), f"optimizer state {pid}.{k}"
    ra, rb = a["state"]["rng"], b["state"]["rng"]
    assert torch.equal(ra["torch_cpu"], rb["torch_cpu"]) and ra["python"] == rb["python"]
    assert torch.equal(ra["numpy"]["keys"], rb["numpy"]["keys"]) and ra["numpy"]["pos"] == rb["numpy"]["pos"]
    assert ra["generators"].keys() == rb["generators"].keys()
    for name in ra["generators"]:
        assert torch.equal(ra["generators"][name], rb["generators"][name]), f"generator {name}"
    sa, sb = a["state"]["sampler"], b["state"]["sampler"]
    assert (sa["epoch"], sa["pos"]) == (sb["epoch"], sb["pos"]) and torch.equal(sa["order"], sb["order"])
    assert a["state"]["optimizer_steps"] == b["state"]["optimizer_steps"]


def test_non_finite_training_log_prob_names_step_timestep_and_tensor(tmp_path, monkeypatch):
    cfg = cfg_of(tmp_path / "inf")
    real = Trainer._velocity

    def poisoned(self, x, sigma_rows, cond, uncond, *, transformer=None):
        v = real(self, x, sigma_rows, cond, uncond, transformer=transformer)
        return v if not torch.is_grad_enabled() else v * float("inf")  # only the training forward

    monkeypatch.setattr(Trainer, "_velocity", poisoned)
    with Trainer(cfg) as trainer, pytest.raises(TrainingError) as info:
        trainer.train()
    msg = str(info.value)
    assert re.search(r"step 1: training log_prob is (nan|-?inf) at timestep index t=0 for sample 0", msg), msg
    assert "last good state (step 0)" in msg
    assert [s for s, _ in ckpt.list_checkpoints(cfg.run.output_dir)] == [0]


# ------------------------------------------------------------------------------------------------
# LoRA and full fine-tuning, KL to the reference
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("finetune, reference", [("lora", "adapter"), ("full", "copy")])
def test_lora_and_full_finetuning_with_kl(tmp_path, finetune, reference):
    # gradient checkpointing on: the (non-reentrant) recomputation must still reach the LoRA weights
    cfg = cfg_of(tmp_path / finetune, **{"train.finetune": finetune, "train.kl_beta": 0.1,
                                         "train.kl_reference": reference, "train.max_steps": 2,
                                         "train.gradient_checkpointing": True, "eval.enabled": False})
    with Trainer(cfg) as trainer:
        names = set(trainer.named_trainable)
        base = {n: p.detach().clone() for n, p in trainer.transformer.named_parameters()}
        recs = trainer.train()
        after = dict(trainer.transformer.named_parameters())
        changed = {n for n in base if not torch.equal(base[n], after[n].detach())}
    if finetune == "lora":
        assert names and all("lora_" in n for n in names)
        assert changed and changed <= names  # only adapter weights move; the base model is frozen
    else:
        assert names == set(base)
        assert len(changed) > len(names) // 2
    # step 1: the policy equals the reference (LoRA B = 0 / an exact copy): KL is exactly 0;
    # step 2: one update later it is positive
    assert recs[0]["kl"] == 0.0 and recs[1]["kl"] > 0.0
    assert all(r["grad_norm"] > 0 for r in recs)
    saved = weights_of(cfg.run.output_dir, 2)
    assert set(saved) == names


# ------------------------------------------------------------------------------------------------
# schemes and timestep selection
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, pairs", [
    ({"train.timesteps.mode": "credit", "train.timesteps.fraction": 0.5}, 4 * 2),     # ceil(0.5·3) = 2
    ({"train.timesteps.mode": "fraction", "train.timesteps.fraction": 0.7}, 4 * 2),   # int(0.7·3) = 2
    ({"train.timesteps.mode": "window", "train.timesteps.window_start": 1,
      "train.timesteps.window_size": 2}, 4 * 2),
    ({"credit.scheme": "window", "credit.window_size": 2, "credit.window_range": [0, 4],
      "credit.window_schedule": "fixed"}, 4 * 2),
    ({"credit.scheme": "dance", "credit.dance_fraction": 0.5}, None),
    ({"credit.scheme": "otca_timing", "credit.timing_every": 2}, 4 * 3),
    ({"credit.scheme": "uniform", "sample.sde.mode": "fraction", "sample.sde.fraction": 0.5}, 4 * 2),
])
def test_schemes_and_trained_timesteps(tmp_path, extra, pairs):
    cfg = cfg_of(tmp_path / "s", **{"train.max_steps": 1, "eval.enabled": False, **extra})
    with Trainer(cfg) as trainer:
        (rec,) = trainer.train()
    assert rec["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    if pairs is not None:
        assert rec["trained_pairs"] == pairs
    else:  # dance: int(3 * 0.5) = 1 random step among the 3 trainable ones per sample
        assert rec["trained_pairs"] == 4 * 1
    assert torch.isfinite(torch.tensor(rec["loss"]))


@pytest.mark.parametrize("select_mode", ["importance", "topk"])
@pytest.mark.parametrize("scheme, sde", [("otca", "all"), ("tcd_only", "fraction"), ("uniform", "fraction")])
def test_credit_guided_steps_are_chosen_once_among_the_trainable_steps(tmp_path, select_mode, scheme, sde):
    """train.timesteps.mode: credit trains exactly the steps build_advantages chose: ⌈fraction·S⌉ of the S
    trainable steps, each with non-zero credit (a second selection would drop some of them for others, train
    pairs whose advantage is 0, and change the trained fraction)."""
    cfg = cfg_of(tmp_path / "c", **{"train.max_steps": 1, "eval.enabled": False, "credit.scheme": scheme,
                                    "sample.num_steps": 6, "sample.sde.mode": sde, "sample.sde.fraction": 0.5,
                                    "train.timesteps.mode": "credit", "train.timesteps.fraction": 0.5,
                                    "train.timesteps.select_mode": select_mode})
    seen = {}
    with Trainer(cfg) as trainer:
        original = trainer.choose_timesteps

        def spy(sde_mask, credit):
            out = original(sde_mask, credit)
            seen.update(sde_mask=sde_mask, A=credit.advantages, info=credit.info, out=out)
            return out

        trainer.choose_timesteps = spy
        (rec,) = trainer.train()
    index, valid = seen["out"].index, seen["out"].valid
    trainable = trainer.trainable_steps(seen["sde_mask"])
    s = trainable.numel()  # all: 6 steps minus the last = 5; fraction 0.5: the first 3
    assert s == (5 if sde == "all" else 3)
    assert index.shape == (4, -(-s // 2)) and bool(valid.all())        # ⌈0.5·S⌉ steps per sample
    assert torch.equal(index, seen["info"]["index"])                   # the steps build_advantages chose
    assert bool(torch.isin(index, trainable).all())
    A = seen["A"]
    assert bool((A.gather(1, index) != 0).all())                       # no trained pair without credit
    off = torch.ones_like(A, dtype=torch.bool).scatter_(1, index, False)
    assert bool((A[off] == 0).all())                                   # no credit off the trained pairs
    assert rec["trained_pairs"] == index.numel()
    assert rec["credit/trained_steps_per_sample"] == index.shape[1]


# ------------------------------------------------------------------------------------------------
# every backbone adapter: one rollout + one train step
# ------------------------------------------------------------------------------------------------

IMAGE_REWARDS = [{"name": "brightness", "weight": 1.0, "options": {}},
                 {"name": "saturation", "weight": 1.0, "options": {}}]


@pytest.mark.parametrize("family, size", [
    ("wan2.1", {"sample.num_frames": 5}), ("wan2.2", {"sample.num_frames": 5}),
    ("sd3", {"sample.num_frames": 1, "rewards": IMAGE_REWARDS}),
    ("flux", {"sample.num_frames": 1, "rewards": IMAGE_REWARDS})])
def test_each_backbone_builds_tiny_and_trains_one_step(tmp_path, family, size):
    cfg = cfg_of(tmp_path / family, **{"model.family": family, "model.tiny": True, "sample.height": 16,
                                       "sample.width": 16, "train.max_steps": 1, "eval.every": 1, **size})
    with Trainer(cfg) as trainer:
        (rec,) = trainer.train()
    assert rec["ratio_mean"] == 1.0 and rec["grad_norm"] > 0
    clips = sorted(p.suffix for p in (Path(cfg.run.output_dir) / "report" / "clips").iterdir())
    assert clips == ([".png"] * 2 if size["sample.num_frames"] == 1 else [".gif", ".gif", ".mp4", ".mp4"])


def test_cfg_shared_noise_and_several_updates_per_step(tmp_path):
    cfg = cfg_of(tmp_path / "cfg", **{"sample.guidance_scale": 3.0, "sample.same_noise": True,
                                      "train.updates_per_step": 2, "train.inner_epochs": 2,
                                      "sample.batch_size": 2, "train.max_steps": 1, "eval.enabled": False})
    with Trainer(cfg) as trainer:
        noise = trainer._initial_noise(2, torch.Generator().manual_seed(0))
        (rec,) = trainer.train()
    # DanceGRPO's init_same_noise: the G samples of a group start from one x_T
    assert torch.equal(noise[0], noise[1]) and not torch.equal(noise[1], noise[2])
    assert rec["optimizer_steps"] == 4 and rec["trained_pairs"] == 4 * 3
    # the first update's pairs are on-policy; the rest see weights that one update already moved
    assert rec["ratio_dev_max"] > 0.0 and torch.isfinite(torch.tensor(rec["loss"]))


# ------------------------------------------------------------------------------------------------
# train.tail_matching: advantage-weighted flow matching on the ODE tail
# ------------------------------------------------------------------------------------------------

TAIL = {"train.max_steps": 1, "eval.enabled": False, "sample.sde.mode": "fraction", "sample.sde.fraction": 0.5,
        "train.tail_matching.weight": 0.5}


def _grads(trainer) -> list[torch.Tensor]:
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in trainer.trainable]


@pytest.mark.parametrize("positive_only", [True, False])
def test_tail_matching_regresses_the_ode_tail_on_the_weighted_final_clips(tmp_path, positive_only):
    """The term's gradient is that of weight · Σ_n w_n·mean((v_θ((1 − σ)x0_n + σε, σ) − (ε − x0_n))²) / N, with
    w_n the sample's advantage (mean of A over the trainable steps; max(·, 0) with positive_only), σ one of the
    ODE tail's noise levels, x0_n the sample's final clip from the buffer; rows of weight 0 add nothing."""
    cfg = cfg_of(tmp_path / "t", **{**TAIL, "train.tail_matching.positive_only": positive_only})
    with Trainer(cfg) as trainer:
        prompt_ids = trainer.sampler.next()
        prompts = [trainer.prompts[i] for i in prompt_ids for _ in range(trainer.group_size)]
        group_ids = torch.arange(len(prompt_ids)).repeat_interleave(trainer.group_size)
        rollout = trainer.rollout(1, prompts)
        credit = trainer.compute_credit(1, rollout, group_ids)
        tail = tail_targets(credit.advantages, rollout.sde_mask, trainer.trainable_steps(rollout.sde_mask),
                            num_steps=4, adv_clip_max=trainer.credit_config.adv_clip_max,
                            positive_only=positive_only, generator=trainer.generators["tail"],
                            latent_shape=trainer.latent_shape)
        # 4 denoising steps, SDE on the first 2: the tail is steps 2 and 3 (σ > 0 at both)
        assert rollout.sde_mask.tolist() == [True, True, False, False]
        assert tail["steps"].tolist() == [2, 3]
        a = credit.advantages[:, trainer.trainable_steps(rollout.sde_mask)].mean(1)
        assert a.abs().max() > 0
        assert torch.equal(tail["weight"], a.clamp_min(0) if positive_only else a)

        n = trainer.num_samples
        assert tail["eps"].shape == (n, *trainer.latent_shape)
        assert bool(torch.isin(tail["step"], torch.tensor([2, 3])).all())
        trainer.optimizer.zero_grad(set_to_none=True)
        totals = {"tail_loss": 0.0, "tail_rows": 0}
        trainer._tail_matching(1, rollout, slice(0, n), tail, n, totals)
        got = _grads(trainer)

        # the same term written out
        keep = (tail["weight"] != 0).nonzero().flatten()
        x0 = trainer.buffer.gather(keep, torch.full((keep.numel(),), 4, dtype=torch.long))
        sigma = trainer.sigmas[tail["step"][keep]].float()
        eps = tail["eps"][keep]
        s = sigma.view(-1, 1, 1, 1, 1)
        trainer.optimizer.zero_grad(set_to_none=True)
        v = trainer._velocity((1 - s) * x0 + s * eps, sigma, rollout.cond.index(keep), None)
        per = (v - (eps - x0)).square().flatten(1).mean(1)
        (0.5 * (tail["weight"][keep] * per).sum() / n).backward()
        want = _grads(trainer)
        assert any(bool(g.abs().max() > 0) for g in want)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-12)
        assert totals["tail_rows"] == keep.numel()
        assert totals["tail_loss"] == pytest.approx(float(per.detach().sum()), rel=1e-5)

        # no weight, no gradient
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer._tail_matching(1, rollout, slice(0, n), {**tail, "weight": torch.zeros(n)}, n, totals)
        assert all(p.grad is None for p in trainer.trainable)


def test_tail_matching_runs_resumes_exactly_and_needs_an_ode_tail(tmp_path, monkeypatch):
    extra = {**TAIL, "train.max_steps": 3, "train.checkpoint_every": 1, "train.ema.update_every": 1}
    full = tmp_path / "full"
    assert main([str(TINY), *small(full, **extra)]) == 0
    recs = train_records(full)
    assert all(r["tail_matching_loss"] > 0 and r["ratio_mean"] == 1.0 for r in recs)

    part = tmp_path / "part"
    with _interrupted_at(monkeypatch, 3):
        assert main([str(TINY), *small(part, **extra)]) == 130
    assert main([str(TINY), *small(part, **extra), "--resume"]) == 0
    assert_same_state(ckpt.load_checkpoint(full / "checkpoints" / "step_00000003"),
                      ckpt.load_checkpoint(part / "checkpoints" / "step_00000003"))
    assert _comparable(records(full)) == _comparable(records(part))

    # the term's off switch leaves the loop as it was: no tail stream, no tail statistic
    off = cfg_of(tmp_path / "off", **{**TAIL, "train.tail_matching.weight": 0.0})
    with Trainer(off) as trainer:
        (rec,) = trainer.train()
        assert "tail" not in trainer.generators and "tail_matching_loss" not in rec
    for sde in ({"sample.sde.mode": "all"}, {"sample.sde.fraction": 1.0}):
        with pytest.raises(ConfigError, match="train.tail_matching: the SDE covers every denoising step"):
            cfg_of(tmp_path / "all", **{**TAIL, **sde})


def test_exam_sheet_shows_base_and_current_clips_from_the_same_noise(tmp_path, monkeypatch):
    """eval.sheet_rows: every evaluation after the first draws report/exam_sheet.png from the first evaluation's
    frames (kept on disk, so a resumed run draws it too) and this one's; the written clips stay max_clips."""
    from otca_fast import judge

    out = tmp_path / "sheet"
    extra = {"eval.every": 1, "eval.sheet_rows": 2, "eval.samples_per_prompt": 2, "train.max_steps": 2}
    drawn = []
    real = judge.write_contact_sheet

    def spy(result, path, **kwargs):
        drawn.append((result, kwargs))
        return real(result, path, **kwargs)

    monkeypatch.setattr(judge, "write_contact_sheet", spy)
    assert main([str(TINY), *small(out, **extra)]) == 0
    report = out / "report"
    assert (report / "exam_sheet.png").stat().st_size > 0
    base = torch.load(report / "eval" / "sheet_base_frames.pt", weights_only=True)
    assert base.dtype == torch.uint8 and base.shape == (2 * 2, 3, 3, 16, 16)   # 2 prompts x 2 clips, 3 frames
    assert sorted(p.name for p in (report / "clips").iterdir() if p.suffix == ".gif") == [
        f"step_{s:06d}_00.gif" for s in (0, 1, 2)]                                 # eval.max_clips: 1
    assert [r["step"] for r, _ in drawn] == [1, 2] and drawn[-1][1]["rows"] == 2
    assert drawn[-1][1]["frame_numbers"] == [0, 1, 2]                          # of 3 frames: all of them
    result = drawn[-1][0]
    assert torch.equal((result["clips"]["base"] * 255).round().to(torch.uint8), base)
    assert result["clips"]["trained"].shape == base.shape and result["base"].step == 0
    assert result["trained"].step == 2 and set(result["changes"]) == set(result["base"].values)

    # resumed after step 1 (the base evaluation is not sampled again): the sheet is drawn from the kept frames
    (report / "exam_sheet.png").unlink()
    drawn.clear()
    assert main([str(TINY), *small(out, **{**extra, "train.max_steps": 3}), "--resume"]) == 0
    assert [r["step"] for r, _ in drawn] == [3] and (report / "exam_sheet.png").is_file()
    assert torch.equal((drawn[0][0]["clips"]["base"] * 255).round().to(torch.uint8), base)

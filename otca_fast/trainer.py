"""The GRPO trainer as a recipe: set-up, then per step prompts → rollout → credit → timesteps → update, then
evaluation and checkpoints. Read :meth:`Trainer.train_step` first; every phase is a method below it, in order.

1. **prompts** — P prompts from the shuffled training set (:class:`otca_fast.data.PromptSampler`); group g holds
   G samples of prompt g (integer group ids 0..P−1, N = P·G rows);
2. **rollout** — :func:`otca_fast.rollout.sample_trajectories`: sample the N trajectories with ``ops.sde_step``
   on the SDE steps (:func:`otca_fast.timesteps.sde_steps`), store every state in the trajectory buffer and the
   step log-probs, decode, score the rewards (in a thread, overlapping the next chunk) → a :class:`Rollout`;
3. **credit** — ``otca_fast.credit.build_advantages(scheme, ...)`` → A[N, T], which step and which objective
   earned the reward (``otca`` by default), living on the trainable steps → a :class:`Credit`;
4. **timesteps** — the steps each sample trains (:func:`otca_fast.timesteps.choose_timesteps`): all trainable
   SDE steps, a random fraction, a window, or the steps the credit chose;
5. **update** — for every (micro-batch, trained step): recompute the velocity with gradients and take
   ``ops.grpo_step_loss`` (clipped surrogate, optional KL to the reference policy), summed so that each
   optimizer update sees the mean over its samples and steps; clip, step, EMA.

Loss normalisation: the update u over the rows S_u and the M trained steps per row minimises

    L_u = 1/(|S_u|·M) · Σ_{n∈S_u} Σ_m ℓ(n, t_{n,m}),
    ℓ = −min(r·Â, clip(r, 1±ε)·Â) + β·KL,   Â = clip(A[n, t], ±adv_clip_max) · weight[n, m]

(a micro-batch of b rows contributes mean_b ℓ · b/(|S_u|·M) per step). The selection weight goes into Â
because the clipped surrogate is positively homogeneous in A: −min(r·wA, clip(r)·wA) = w·(−min(r·A, clip(r)·A))
for w > 0, so this is exactly the weighted per-step loss.

Around the loop: metrics (``metrics.jsonl``, TensorBoard), checkpoints (:mod:`otca_fast.checkpoint`: atomic,
last N kept, verified on ``--resume``), evaluation on held-out prompts (EMA weights, ODE sampling, fixed seed,
eval-only metrics, clips), plots under ``report/`` and a summary table. The run holds ``run.output_dir``
locked (:mod:`otca_fast.runlock`); SIGTERM/SIGUSR1 stop the loop at its next stop point with a checkpoint
(:mod:`otca_fast.preemption`). Several ranks (``torchrun``): each rank samples and trains a contiguous share of
the N rows, every rank builds the same advantages of the whole batch, and :class:`otca_fast.lockstep.Lockstep`
keeps the ranks in step (failures, FSDP idle passes, gradient sync).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import torch

from otca_fast import checkpoint as ckpt
from otca_fast import distributed, ops, report, run_directory, runlock, tail_matching
from otca_fast.buffer import trajectory_buffers
from otca_fast.config import Config, ConfigError
from otca_fast.credit.result import Credit, credit_summary
from otca_fast.data import PromptSampler, read_prompts, seed_everything, stream_seed
from otca_fast.devices import DTYPES, resolve_device
from otca_fast.errors import TrainingError
from otca_fast.evaluation import Evaluation, HeldOut, compare, hacking_alarms, metric_part_keys
from otca_fast.finetuning import adapters_disabled, add_lora_adapters, build_ema, build_optimizer, setup_finetuning
from otca_fast.judge import write_exam_sheet
from otca_fast.lockstep import Lockstep
from otca_fast.models.from_config import backbone_from_config, embed_prompts, latent_shape_from_config
from otca_fast.preemption import StopRequested, StopSignals, announce_on_stderr
from otca_fast.recovery import Recovery
from otca_fast.rewards.from_config import rewards_from_config
from otca_fast.rollout import (
    NonFiniteError,
    RewardWorker,
    Rollout,
    assemble_step_rewards,
    cheap_step_reward_fn,
    check_training_loss,
    sample_trajectories,
    share_chunks,
)
from otca_fast.timesteps import TrainedSteps, choose_timesteps, sde_steps, trainable_steps

__all__ = ["Trainer", "TrainingError", "PromptSampler", "adapters_disabled", "add_lora_adapters", "read_prompts",
           "seed_everything", "TIMING_KEYS"]

# metrics that measure time or memory: they differ between two runs of the same numbers
TIMING_KEYS = ("samples_per_s", "time/rollout_s", "time/update_s", "time/step_s", "peak_memory_gb")
_LOSS_STATS = ("loss", "ratio", "clipped", "approx_kl", "kl")  # summed over the trained pairs, then averaged


class Trainer:
    """Builds everything a run needs from a :class:`Config`, then :meth:`train` runs it."""

    def __init__(self, cfg: Config, *, resume: bool = False, overwrite: bool = False, console=None,
                 dist: distributed.DistContext | None = None):
        from rich.console import Console

        self.cfg = cfg
        # torchrun: this rank's place in the job (a single process: rank 0 of 1); see otca_fast.distributed
        self._owns_dist = dist is None
        self.dist = dist if dist is not None else distributed.setup(cfg.run.device, cfg.distributed.timeout_s)
        self.console = console or Console(stderr=True)
        if not self.dist.is_main:  # the console, progress, metrics and reports are rank 0's
            self.console = Console(stderr=True, quiet=True)
        self.output_dir = Path(cfg.run.output_dir)
        self.report_dir = self.output_dir / "report"
        self.step, self.optimizer_steps = 0, 0
        self._closed = False
        self._executor: RewardWorker | None = None
        self.metrics: report.MetricsLog | None = None
        self.progress = report.RunProgress("none", total_steps=cfg.train.max_steps)
        self._updated_this_step = False  # an optimizer step happened since the last step's start
        self._lock: runlock.RunLock | None = None  # run.output_dir, held by rank 0 for the run's life
        self._stop = StopSignals(announce=announce_on_stderr if self.dist.is_main else None)  # SIGTERM / SIGUSR1
        self._stop_state: dict[str, Any] | None = None  # what a stop checkpoints while a step is under way
        self._evaluating: int | None = None  # the step of the evaluation under way
        self.lockstep = Lockstep(self.dist, self._stop, lambda: not self._updated_this_step)
        self.recovery = Recovery(self.output_dir, self._write_checkpoint, self._state_for_checkpoint,
                                 all_ranks=self.dist.enabled)
        self.last_credit_info: dict[str, Any] | None = None
        self.base_evaluation: Evaluation | None = None  # every later evaluation is compared with it, clip for clip
        self.last_changes: dict[str, Any] = {}
        try:
            self._setup(resume, overwrite)
        except BaseException:
            self.close()  # the lock, the process group, the buffers: a failed set-up leaves nothing held
            raise

    # ---- set-up ------------------------------------------------------------------------------------------------

    def _setup(self, resume: bool, overwrite: bool) -> None:
        cfg = self.cfg
        self._lock = run_directory.lock(self.output_dir, self.dist, self._warn)  # one run per directory
        run_directory.prepare(self.output_dir, self.dist, resume=resume, overwrite=overwrite, warn=self._warn)
        self.device = self.dist.device if self.dist.enabled else resolve_device(cfg.run.device, error=ConfigError)
        self.latent_dtype = DTYPES[cfg.sample.latent_dtype]
        mp = cfg.train.mixed_precision
        self.autocast_dtype = torch.bfloat16 if mp == "bf16" or (mp == "auto" and self.device.type == "cuda") else None
        seed_everything(cfg.run.seed)  # everything random below is seeded: tiny backbones and LoRA init included
        self.prompts, self.eval_prompts, self.sampler = self._setup_data()
        distributed.check_batch(self.dist, cfg)
        self.group_size = cfg.sample.group_size
        self.num_samples = cfg.sample.prompts_per_step * cfg.sample.group_size
        self.local_samples = self.num_samples // self.dist.world_size  # the rows this rank samples and trains
        self.rewards, self.eval_metrics = rewards_from_config(cfg)
        self.reward_names = [r.name for r in self.rewards]
        self.reward_weights = [spec.weight for spec in cfg.rewards]
        self.backbone = backbone_from_config(cfg.model, self.device)
        self.transformer = self.backbone.transformer
        finetuning = setup_finetuning(self.backbone, cfg.train)
        self.ref_transformer, self._kl_mode = finetuning.reference, finetuning.kl_mode
        # several ranks: replicate (ddp) or shard (fsdp) the transformer; fsdp replaces the parameters
        self.named_trainable = distributed.prepare_model(self.dist, cfg, self.transformer, self.ref_transformer,
                                                         finetuning.named_trainable)
        self.trainable = list(self.named_trainable.values())
        tail_matching.check_strategy(self.dist.strategy, cfg.train.tail_matching.weight)
        self.latent_shape = latent_shape_from_config(self.backbone, cfg.sample)
        self.sigmas = self.backbone.sigmas(cfg.sample.num_steps).detach().to("cpu", torch.float64)
        embed_prompts(self.backbone, self.prompts + self.eval_prompts + [cfg.sample.negative_prompt],
                      offload_text_encoder=cfg.model.offload_text_encoder)
        self.optimizer = build_optimizer(self.trainable, cfg.optimizer)
        self.ema = build_ema(self.trainable, cfg.train.ema)
        self.held_out = self._setup_held_out()
        if cfg.eval.sheet_rows and self.dist.world_size > 1:
            self._warn("eval.sheet_rows: report/exam_sheet.png needs a single process (each rank keeps its own "
                       "clips); use `python -m otca_fast.judge RUN --sheet FILE.png`")
        self.credit_config = cfg.credit_config()
        self.generators = {  # the random streams of the loop (all saved in checkpoints)
            "noise": torch.Generator(device=self.device).manual_seed(stream_seed(cfg.run.seed, "noise")),
            "schedule": torch.Generator().manual_seed(stream_seed(cfg.run.seed, "schedule")),
            "credit": torch.Generator().manual_seed(stream_seed(cfg.run.seed, "credit")),
        }
        if cfg.train.tail_matching.weight > 0:  # its own stream: switching it on changes no rollout's noise
            self.generators["tail"] = torch.Generator(device=self.device).manual_seed(stream_seed(cfg.run.seed, "tail"))
        c = cfg.credit  # x̂0 predictions: CoCA's credit, and TCD's with credit.source: x0_pred
        x0 = c.scheme == "coca" or (c.source == "x0_pred" and c.scheme in ("otca", "tcd_only", "otca_timing"))
        self.buffer, self.x0_buffer = trajectory_buffers(self.local_samples, cfg.sample.num_steps, self.latent_shape,
                                                         dtype=self.latent_dtype, device=self.device,
                                                         x0_predictions=x0)
        if cfg.sample.async_rewards:
            self._executor = RewardWorker()
        if resume:  # the newest checkpoint that verifies; damaged newer ones are set aside
            ckpt.resume_newest_valid(self.dist, self.output_dir, self._load_checkpoint, self._warn)
        # the evaluation of the resume step, when it was cut short (a stop or a crash during it), runs again
        cut_short = resume and self._evaluation_due(self.step) and not self._evaluation_file(self.step).is_file()
        self._evaluate_first = not resume or distributed.any_rank(self.dist, cut_short)
        self.metrics = run_directory.open_logs(cfg, self.dist, resumed_at=self.step if resume else None,
                                               rerun_evaluation=self._evaluate_first and resume, warn=self._warn)
        self.base_evaluation = run_directory.base_evaluation(self.output_dir, resumed_at=self.step if resume else None,
                                                             evaluates=cfg.eval.enabled, warn=self._warn)

    def _setup_data(self) -> tuple[list[str], list[str], PromptSampler]:
        cfg = self.cfg
        prompts = read_prompts(cfg.data.prompts, cfg.data.prompt_file, "prompt")
        eval_prompts = read_prompts(cfg.data.eval_prompts, cfg.data.eval_prompt_file, "eval_prompt")
        if not prompts:
            raise ConfigError("data: no training prompts (data.prompts is empty and data.prompt_file has none)")
        sampler = PromptSampler(len(prompts), cfg.sample.prompts_per_step, seed=cfg.run.seed, shuffle=cfg.data.shuffle)
        return prompts, eval_prompts, sampler

    def _setup_held_out(self) -> HeldOut:
        c, s = self.cfg.eval, self.cfg.sample
        return HeldOut(
            self.backbone, self.eval_prompts, c.samples_per_prompt, c.seed, latent_shape=self.latent_shape,
            sigmas=self.backbone.sigmas(c.num_steps or s.num_steps).detach().to("cpu", torch.float64),
            latent_dtype=self.latent_dtype, batch_size=s.batch_size, negative_prompt=s.negative_prompt,
            guidance_scale=c.guidance_scale if c.guidance_scale is not None else s.guidance_scale,
            rewards=self.rewards, metrics=self.eval_metrics,
            # the exam sheet needs every clip (a few frames of each), the written clips the first max_clips
            keep_frames=(len(self.eval_prompts) * c.samples_per_prompt if c.sheet_rows and self.dist.world_size == 1
                         else c.max_clips if c.save_clips else 0))

    def _warn(self, message: str) -> None:
        from rich.markup import escape

        self.console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)

    # ---- the loop ----------------------------------------------------------------------------------------------

    def train(self) -> list[dict[str, Any]]:
        """Run until ``train.max_steps``; returns the metric records of this run.

        Raises :class:`TrainingError` when training stops on a failure (the last good state checkpointed when
        it can be), and :class:`otca_fast.preemption.TrainingStopped` after a SIGTERM or SIGUSR1 arrived while
        it ran (the state to resume from checkpointed)."""
        cfg = self.cfg
        self.progress = report.RunProgress(cfg.run.progress if self.dist.is_main else "none",
                                           total_steps=cfg.train.max_steps, start_step=self.step,
                                           log_every=cfg.run.log_every, console=self.console)
        records = []
        with self._stop.installed():  # SIGTERM / SIGUSR1: stop at the next stop point with a checkpoint
            try:
                self.progress.print(report.banner(cfg, device=self.device, reward_names=self.reward_names,
                                                  trainable_params=sum(p.numel() for p in self.trainable),
                                                  output_dir=self.output_dir, resumed_at=self.step, dist=self.dist))
                if self._evaluate_first:
                    at = self.step
                    self._guarded(at, lambda: self.evaluate(at), self._state_for_checkpoint() if at == 0 else None)
                while self.step < cfg.train.max_steps:
                    records.append(self._run_step(self.step + 1))
            except StopRequested as stop:  # checkpoint the state to resume from
                raise self.recovery.stopped(stop, self._stop_state, evaluating=self._evaluating) from None
            finally:
                self.progress.close()
        if records and self.dist.is_main:
            report.print_summary(self.console, self.metrics.path, self.reward_names, metric_keys=self.metric_keys(),
                                 title=f"otca_fast run summary ({self.output_dir})", changes=self.last_changes)
        return records

    def _run_step(self, step: int) -> dict[str, Any]:
        """One step with what surrounds it: the stop point, the step, its log, checkpoint, evaluation, plots."""
        cfg = self.cfg
        self.lockstep.stop_point()
        good_state = self._state_for_checkpoint()  # the last good state, should the step fail or stop
        self._stop_state = good_state
        record = self._guarded(step, lambda: self.train_step(step), good_state)
        self.step, self._stop_state, self._updated_this_step = step, None, False
        logged = self.metrics.log(step, record)
        last = step == cfg.train.max_steps
        if step % cfg.train.checkpoint_every == 0 or last:
            self.recovery.save_or_stop(step, self._state_for_checkpoint())
        if self._evaluation_due(step):
            self._guarded(step, lambda: self.evaluate(step), None)
        if ((cfg.run.plot_every and step % cfg.run.plot_every == 0) or last) and self.dist.is_main:
            self.write_plots(step)
        self.progress.step_done(step, report.summary_line(record, self.reward_names))
        return logged

    def train_step(self, step: int) -> dict[str, Any]:
        """One GRPO iteration: prompts → rollout → credit → timesteps → update. Returns its metrics."""
        t_start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

        # 1. prompts: group g = G copies of prompt g (integer group ids, never decoded strings)
        prompt_ids = self.sampler.next()
        prompts = [self.prompts[i] for i in prompt_ids for _ in range(self.group_size)]
        group_ids = torch.arange(len(prompt_ids)).repeat_interleave(self.group_size)

        # 2. rollout: several ranks each sample their share of the N rows (a failure on any rank is
        # announced to all before the next collective)
        rollout = self.lockstep.run(lambda: self.rollout(step, prompts), forwards=True)
        t_rollout = time.perf_counter() - t_start

        # 3. credit: A[n, t], for the whole batch on every rank
        credit = self.compute_credit(step, rollout, group_ids)

        # 4. which steps to train, per sample, with their loss weights
        steps = self.choose_timesteps(rollout.sde_mask, credit)

        # 5. the update
        t_update = time.perf_counter()
        stats = self.update(step, rollout, credit, steps)
        t_end = time.perf_counter()

        record: dict[str, Any] = report.reward_record(credit.rewards, self.reward_names, self.reward_weights,
                                                      group_ids)
        record.update(stats)
        record.update(credit_summary(credit.advantages, credit.info, steps.valid, self.reward_names))
        record.update({"lr": self.optimizer.param_groups[0]["lr"],
                       "samples_per_s": self.num_samples / (t_end - t_start), "time/rollout_s": t_rollout,
                       "time/update_s": t_end - t_update, "time/step_s": t_end - t_start,
                       "peak_memory_gb": report.peak_memory_gb(self.device)})
        self.last_credit_info = credit.info
        return record

    def _evaluation_due(self, step: int) -> bool:
        """Whether the loop evaluates at ``step`` (at the start, every ``eval.every`` steps, at the end)."""
        e = self.cfg.eval
        return e.enabled and (step == 0 or bool(e.every and step % e.every == 0) or step == self.cfg.train.max_steps)

    def _progress(self, step: int) -> float:
        """Training progress in [0, 1) at the start of ``step`` (drives progressive credit windows)."""
        return (step - 1) / self.cfg.train.max_steps

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    # ---- 2. rollout --------------------------------------------------------------------------------------------

    def rollout(self, step: int, prompts: list[str]) -> Rollout:
        """Sample the step's trajectories (this rank's rows) into the buffer and score them."""
        cfg = self.cfg.sample
        sde_mask, window = sde_steps(cfg.num_steps, cfg.sde, self.cfg.credit.scheme, self.credit_config,
                                     generator=self.generators["schedule"], progress=self._progress(step))
        # several ranks: this rank samples the rows `share` of the global batch (every rank drew the same
        # prompts, and sample n gets the same initial and SDE noise whatever the number of ranks)
        share = self.dist.share(len(prompts))
        total, prompts = len(prompts), prompts[share]
        cond = self.backbone.encode_prompts(prompts)
        uncond = None
        if cfg.guidance_scale != 1.0:
            uncond = self.backbone.encode_prompts([cfg.negative_prompt] * min(cfg.batch_size, len(prompts)))
        noise = self._initial_noise(total // self.group_size, self.generators["noise"])[share]
        # forget the previous step's trajectories: a gather of a pair not written this step then raises
        for buffer in (self.buffer, self.x0_buffer):
            if buffer is not None:
                buffer.reset()
        step_reward_fn = self._step_reward_fn(step, prompts) if self.cfg.credit.scheme == "otca_timing" else None
        self.progress.phase("rollout", len(prompts) * cfg.num_steps)
        out = sample_trajectories(
            self.backbone, cond, sigmas=self.sigmas, sde_mask=sde_mask, init_noise=noise, prompts=prompts,
            batch_size=cfg.batch_size, dynamics=cfg.dynamics, noise_level=cfg.noise_level,
            generator=self.generators["noise"], guidance_scale=cfg.guidance_scale, uncond=uncond,
            buffer=self.buffer, x0_buffer=self.x0_buffer, autocast=self._autocast, step=step,
            score_fn=self.lockstep.scorer(self._score, len(self.rewards)), reward_executor=self._executor,
            step_reward_fn=step_reward_fn, on_progress=self._rollout_progress, rows=share, total_rows=total,
            poll=self.lockstep.poll_stop)
        self.lockstep.raise_held()
        step_rewards = None
        if step_reward_fn is not None:
            cheap = [k for k, r in enumerate(self.rewards) if r.cheap]
            step_rewards = assemble_step_rewards(out.step_rewards, out.rewards, cheap, self._timing_states(),
                                                 cfg.num_steps)
        return Rollout(prompts=prompts, cond=cond, uncond=uncond, sde_mask=sde_mask, window=window,
                       log_probs=out.log_probs, rewards=out.rewards, step_rewards=step_rewards, rows=share)

    def _initial_noise(self, num_prompts: int, generator: torch.Generator) -> torch.Tensor:
        shape = (num_prompts if self.cfg.sample.same_noise else num_prompts * self.group_size, *self.latent_shape)
        noise = torch.randn(shape, generator=generator, device=self.device, dtype=torch.float32)
        if self.cfg.sample.same_noise:
            # DanceGRPO's init_same_noise: the group differs only through the SDE noise
            noise = noise.repeat_interleave(self.group_size, dim=0)
        return noise.to(self.latent_dtype)

    def _score(self, frames: torch.Tensor, prompts: list[str], *, step: int) -> torch.Tensor:
        from otca_fast.rewards import score_rewards

        return score_rewards(self.rewards, frames, prompts, step=step)

    def _rollout_progress(self, rows: int) -> None:
        self.progress.advance("rollout", rows)
        self.lockstep.stop_point()  # after every denoising step of a chunk

    def _timing_states(self) -> list[int]:
        from otca_fast.credit.timing import evaluation_states

        return evaluation_states(self.cfg.sample.num_steps, self.credit_config.timing_every)

    def _step_reward_fn(self, step: int, prompts: list[str]):
        """otca_timing: the rewards marked cheap, scored on the decoded x̂0 of the intermediate states."""
        from otca_fast.rewards import score_rewards

        cheap = [r for r in self.rewards if r.cheap]
        score = self.lockstep.scorer(lambda frames, chunk_prompts, step: score_rewards(cheap, frames, chunk_prompts,
                                                                                       step=step), len(cheap))
        # the last state is the final sample, scored anyway
        return cheap_step_reward_fn(self.backbone, score, prompts, self._timing_states()[:-1], step=step)

    # ---- 3. credit ---------------------------------------------------------------------------------------------

    def compute_credit(self, step: int, rollout: Rollout, group_ids: torch.Tensor) -> Credit:
        """A[N, T] from ``build_advantages`` with the configured scheme, on the trainable steps.

        The per-sample inputs of the credit are computed where the trajectories live (TCD's state cosines
        from this rank's buffer). On several ranks they, the rewards ``[N/W, K]`` and the group ids are
        all-gathered (a few KB: no latent crosses ranks), and every rank builds the advantages of all N rows
        with the global group statistics, exactly as a single process would.
        """
        from otca_fast.credit import build_advantages

        cfg, d = self.cfg, self.dist
        n, t = self.num_samples, cfg.sample.num_steps
        cosines = self.lockstep.run(self._local_credit_inputs)
        rewards = distributed.all_gather_rows(d, rollout.rewards)
        group_ids = distributed.all_gather_rows(d, group_ids[rollout.rows])
        kwargs: dict[str, Any] = {}
        if cosines is not None:
            kwargs["cosines"] = distributed.all_gather_rows(d, cosines)
        # every tensor on one device: the trajectory's when it is passed, else the CPU
        dev = kwargs["cosines"].device if "cosines" in kwargs else torch.device("cpu")
        kwargs["sigmas"] = self.sigmas.float().to(dev)
        if rollout.step_rewards is not None:
            kwargs["step_rewards"] = distributed.all_gather_rows(d, rollout.step_rewards).to(dev)
        # the credit lives on the steps that can be trained (and credit-guided selection happens here, once)
        trainable = torch.zeros(t, dtype=torch.bool)
        trainable[self.trainable_steps(rollout.sde_mask)] = True
        A, info = build_advantages(cfg.credit.scheme, rewards=rewards.to(dev), group_ids=group_ids.to(dev),
                                   config=self.credit_config, progress=self._progress(step),
                                   generator=self.generators["credit"], window=rollout.window,
                                   trainable=trainable.to(dev), **kwargs)
        A = A.float()
        if A.shape != (n, t):
            raise RuntimeError(f"build_advantages({cfg.credit.scheme!r}) returned A of shape {tuple(A.shape)}, "
                               f"expected ({n}, {t})")
        if not bool(torch.isfinite(A).all()):
            i, j = (int(v) for v in (~torch.isfinite(A)).nonzero()[0])
            raise NonFiniteError(f"step {step}: the advantage A[{i}, {j}] of credit scheme {cfg.credit.scheme!r} "
                                 f"is {float(A[i, j])}")
        return Credit(advantages=A.cpu(), info=info, rewards=rewards)

    def _local_credit_inputs(self) -> torch.Tensor | None:
        """TCD's state cosines ``[N/W, T+1]`` of this rank's trajectories (None when the scheme needs none):
        ``state_cosines`` of the noisy states or, for ``coca`` and ``credit.source: x0_pred``, of x̂0."""
        c = self.cfg.credit
        if not (c.scheme in ("otca", "tcd_only", "coca") or (c.scheme == "otca_timing" and c.timing_blend > 0)):
            return None
        from otca_fast.credit.trajectory import state_cosines

        latents = self.buffer.all_states()
        x0_preds = self.x0_buffer.all_states() if self.x0_buffer is not None else None
        source = "x0_pred" if c.scheme == "coca" else c.source
        return state_cosines(latents, source=source, x0_preds=x0_preds,
                             per_frame=c.per_frame, frame_dim=c.frame_dim)

    # ---- 4. timesteps ------------------------------------------------------------------------------------------

    def trainable_steps(self, sde_mask: torch.Tensor) -> torch.Tensor:
        """The SDE steps that may be trained (the last denoising step never is with ``train.skip_last_step``)."""
        return trainable_steps(sde_mask, skip_last=self.cfg.train.skip_last_step)

    def choose_timesteps(self, sde_mask: torch.Tensor, credit: Credit) -> TrainedSteps:
        """The steps each sample of the whole batch trains, with their loss weights (``train.timesteps``)."""
        return choose_timesteps(self.cfg.train.timesteps, self.trainable_steps(sde_mask), credit.info,
                                num_samples=credit.advantages.shape[0], generator=self.generators["schedule"])

    # ---- 5. update ---------------------------------------------------------------------------------------------

    def update(self, step: int, rollout: Rollout, credit: Credit, steps: TrainedSteps) -> dict[str, Any]:
        """Clipped-GRPO updates over the trained (sample, step) pairs; returns the loss statistics.

        Several ranks: ``credit`` and ``steps`` cover the whole batch; this rank trains its own rows
        (``rollout.rows``). Each term is scaled by W/(the update's pairs on *all* ranks), so after the gradient
        average (DDP all-reduce or FSDP reduce-scatter) every optimizer update minimises the global mean, as one
        process would; the logged statistics are global too.
        """
        tc = self.cfg.train
        n_all = steps.index.shape[0]
        share = rollout.rows
        self.lockstep.begin_step(steps.valid)
        # Flow-GRPO clamps A[:, t] to ±adv_clip_max before the surrogate; credit-guided selection has clamped A
        # before folding in its importance weights, which must not be clipped
        clip = self.credit_config.adv_clip_max
        adv = (credit.advantages if tc.timesteps.mode == "credit" else credit.advantages.clamp(-clip, clip))[share]
        mine = TrainedSteps(steps.index[share], steps.weight[share], steps.valid[share])
        # the rollout's chunks (same rows, same batch composition, so on-policy ratios are exactly 1), split as
        # evenly as possible over the optimizer updates of this step
        micro = [rows for _, rows in share_chunks(n_all, share, self.cfg.sample.batch_size) if rows is not None]
        k = min(tc.updates_per_step, len(micro))
        updates = [micro[i * len(micro) // k:(i + 1) * len(micro) // k] for i in range(k)] * tc.inner_epochs
        sums = dict.fromkeys(_LOSS_STATS, 0.0)
        totals = {"pairs": 0, "ratio_dev_max": 0.0, "grad_norms": [], "tail_loss": 0.0, "tail_rows": 0}
        tail = tail_matching.tail_targets(
            credit.advantages, rollout.sde_mask, self.trainable_steps(rollout.sde_mask),
            num_steps=self.cfg.sample.num_steps, adv_clip_max=clip, positive_only=tc.tail_matching.positive_only,
            generator=self.generators["tail"], latent_shape=self.latent_shape) if tc.tail_matching.weight > 0 else None
        self.progress.phase("update", tc.inner_epochs * int(mine.valid.sum()))
        for chunk_rows in updates:
            # L_u = mean over this update's (sample, step) pairs of the per-step loss (on every rank)
            pairs = self.lockstep.pairs(chunk_rows)
            if pairs == 0:
                continue
            self.optimizer.zero_grad(set_to_none=True)
            local_rows = sum(r.stop - r.start for r in chunk_rows)  # the same on every rank
            for rows in chunk_rows:
                self._accumulate_chunk(step, rollout, rows, mine, adv, pairs, sums, totals)
                if tail is not None:
                    self._tail_matching(step, rollout, rows, tail, local_rows, totals)
            self._optimizer_step(step, totals["grad_norms"])
        self.optimizer.zero_grad(set_to_none=True)
        sums, pairs_done, ratio_dev_max = self.lockstep.reduce_stats(sums, totals["pairs"], totals["ratio_dev_max"])
        if pairs_done == 0:
            raise TrainingError(f"step {step}: no (sample, step) pair to train: every selected step was "
                                f"excluded (check sample.sde and train.timesteps)")
        out = {key: value / pairs_done for key, value in sums.items()}
        out["ratio_mean"] = out.pop("ratio")
        out["clip_frac"] = out.pop("clipped")
        out["ratio_dev_max"] = ratio_dev_max
        out["grad_norm"] = sum(totals["grad_norms"]) / len(totals["grad_norms"])
        out["optimizer_steps"] = self.optimizer_steps
        out["trained_pairs"] = pairs_done // tc.inner_epochs
        if tail is not None:  # the mean over the rows every rank trained
            loss_sum, rows = distributed.all_reduce(
                self.dist, torch.tensor([totals["tail_loss"], totals["tail_rows"]], dtype=torch.float64)).tolist()
            out["tail_matching_loss"] = loss_sum / max(rows, 1.0)
        return out

    def _tail_matching(self, step: int, rollout: Rollout, rows: slice, tail: dict[str, torch.Tensor],
                       local_rows: int, totals: dict[str, Any]) -> None:
        """The tail-matching term's backward for this rank's rows ``rows`` (:mod:`otca_fast.tail_matching`),
        divided by the update's ``local_rows`` on this rank: DDP's average over the ranks then makes it the mean
        over the whole update. Rows of weight 0 are skipped (FSDP, whose backward is collective, is refused)."""
        local = torch.arange(rows.start, rows.stop)
        keep = tail["weight"][local + (rollout.rows.start or 0)] != 0
        if not bool(keep.any()):
            return
        ids = local[keep]
        b = ids.numel()
        x0 = self.buffer.gather(ids, torch.full((b,), self.cfg.sample.num_steps, dtype=torch.long))
        cond = rollout.cond.index(ids) if b != rows.stop - rows.start else rollout.cond.index(rows)
        uncond = rollout.uncond.index(slice(0, b)) if rollout.uncond is not None else None
        per_sample = tail_matching.tail_matching_backward(
            lambda x, sigma: self._velocity(x, sigma, cond, uncond), x0, ids + (rollout.rows.start or 0), tail,
            self.sigmas, scale=self.cfg.train.tail_matching.weight / local_rows, step=step,
            latent_dtype=self.latent_dtype)
        totals["tail_loss"] += float(per_sample.sum())
        totals["tail_rows"] += b

    def _accumulate_chunk(self, step: int, rollout: Rollout, rows: slice, mine: TrainedSteps, adv: torch.Tensor,
                          pairs: int, sums: dict[str, float], totals: dict[str, Any]) -> None:
        """The gradients of one micro-batch of rows (local indices), trained step by step."""
        all_ids = torch.arange(rows.start, rows.stop)
        m = mine.index.shape[1]
        for j in range(m):
            self.lockstep.stop_point()  # until the step's first optimizer update
            keep = mine.valid[rows, j]
            if self.lockstep.held is not None or not bool(keep.any()):
                if self.lockstep.needs_idle_pass(rows, j):
                    self._idle_pass(all_ids, mine.index[all_ids, j], rollout.cond.index(rows), rollout.uncond)
                continue
            if j + 1 < m:  # the next step's states, copied while this one computes
                nxt = mine.valid[rows, j + 1]
                self.buffer.prefetch(all_ids[nxt], mine.index[all_ids[nxt], j + 1])
            full = bool(keep.all())
            ids = all_ids if full else all_ids[keep]
            cond = rollout.cond.index(rows) if full else rollout.cond.index(ids)
            self._train_pairs(step, rollout, ids, mine.index[ids, j], mine.weight[ids, j], cond, adv, pairs, sums,
                              totals)

    def _train_pairs(self, step: int, rollout: Rollout, ids: torch.Tensor, t: torch.Tensor, weight: torch.Tensor,
                     cond, adv: torch.Tensor, pairs: int, sums: dict[str, float], totals: dict[str, Any]) -> None:
        """Backward of the clipped surrogate of rows ``ids`` at their steps ``t``, scaled to the update's mean."""
        cfg, b = self.cfg, ids.numel()
        uncond = rollout.uncond.index(slice(0, b)) if rollout.uncond is not None else None
        x, x_next = self.buffer.gather(ids, t), self.buffer.gather(ids, t + 1)
        s_rows, s_next = self.sigmas[t], self.sigmas[t + 1]
        sigma_in = s_rows.to(device=self.device, dtype=torch.float32)
        v = self._velocity(x, sigma_in, cond, uncond)
        v_ref = self._reference_velocity(x, sigma_in, cond, uncond) if self._kl_mode else None
        loss, st = ops.grpo_step_loss(
            x, v, x_next, rollout.log_probs[ids, t].to(self.device), (adv[ids, t] * weight).to(self.device),
            s_rows, s_next, dynamics=cfg.sample.dynamics, noise_level=cfg.sample.noise_level,
            clip_range=cfg.train.clip_range, ref_model_output=v_ref, kl_beta=cfg.train.kl_beta,
            sigma_max=float(self.sigmas[1]),  # Flow-GRPO's σ = 1 rule, as in the rollout
            check_finite=False)  # old log-probs and A were checked once per step
        try:
            check_training_loss(step, loss, st, ids, t)
        except NonFiniteError as e:
            self.lockstep.hold(e, v)  # a single process raises; ranks announce it before the gradient average
            return
        (loss * (b * self.dist.world_size / pairs)).backward()
        ratio = st["ratio"].detach()
        sums["loss"] += float(loss.detach()) * b
        sums["ratio"] += float(ratio.sum())
        sums["clipped"] += float(st["clipped"].float().sum())
        sums["approx_kl"] += float(st["approx_kl"].sum())
        sums["kl"] += float(st["kl"].sum())
        totals["ratio_dev_max"] = max(totals["ratio_dev_max"], float((ratio - 1).abs().max()))
        totals["pairs"] += b
        self.progress.advance("update", b)

    def _optimizer_step(self, step: int, grad_norms: list[float]) -> None:
        """Average the gradients over the ranks, clip them, step, update the EMA."""
        tc = self.cfg.train
        self.lockstep.finish_update(self.trainable)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, tc.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # fsdp: the global norm of the sharded gradients
            grad_norm = grad_norm.full_tensor()
        if not bool(torch.isfinite(grad_norm)):
            raise NonFiniteError(f"step {step}: the gradient norm is {float(grad_norm)} (update {len(grad_norms) + 1});"
                                 f" the loss was finite, so the transformer's backward overflowed (try float32 weights"
                                 f" or a smaller learning rate)")
        grad_norms.append(float(grad_norm))
        self.optimizer.step()
        self._updated_this_step = True
        self.optimizer_steps += 1
        if self.ema is not None and self.optimizer_steps % tc.ema.update_every == 0:
            self.ema.step(self.trainable)

    def _velocity(self, x, sigma_rows, cond, uncond, *, transformer=None):
        with self._autocast():
            return self.backbone.velocity(x, sigma_rows, cond, guidance_scale=self.cfg.sample.guidance_scale,
                                          uncond=uncond, transformer=transformer).to(x.dtype)

    def _reference_velocity(self, x, sigma_rows, cond, uncond):
        with torch.no_grad():
            if self._kl_mode == "adapter":
                with adapters_disabled(self.transformer):
                    return self._velocity(x, sigma_rows, cond, uncond)
            return self._velocity(x, sigma_rows, cond, uncond, transformer=self.ref_transformer)

    def _idle_pass(self, ids: torch.Tensor, t: torch.Tensor, cond, uncond) -> None:
        """FSDP: a zero-weighted forward and backward on rows ``ids`` at steps ``t``, so this rank's
        collectives stay in step with ranks that train a (chunk, step) slot it has no pair in."""
        x = self.buffer.gather(ids, t)
        sigma_in = self.sigmas[t].to(device=self.device, dtype=torch.float32)
        u = uncond.index(slice(0, ids.numel())) if uncond is not None else None
        v = self._velocity(x, sigma_in, cond, u)
        if self._kl_mode:
            self._reference_velocity(x, sigma_in, cond, u)
        (v.float().sum() * 0.0).backward()

    # ---- evaluation and reports --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def ema_weights(self):
        """The EMA weights swapped in for the duration (the training weights restored exactly after)."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.trainable)
        self.ema.copy_to(self.trainable)
        try:
            yield
        finally:
            self.ema.restore(self.trainable)

    def _evaluation_file(self, step: int) -> Path:
        return run_directory.evaluation_file(self.output_dir, step)

    def evaluate(self, step: int) -> dict[str, Any]:
        """Held-out prompts, EMA weights, ODE sampling from a fixed seed: the trained rewards and the eval
        metrics of every clip (``report/eval/step_*.json``), their means (``eval/…``), the changes from the
        first evaluation with bootstrap intervals, a warning when a reward rose while a metric fell, clips."""
        cfg = self.cfg
        if not cfg.eval.enabled:
            return {}
        # fork_rng: whatever evaluation draws never moves the training RNG streams
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), self.ema_weights():
            self._evaluating = step  # left set if the evaluation does not finish: a stop or Ctrl-C says where
            evaluation, clips = self.held_out.sample(step, device=self.device, lockstep=self.lockstep,
                                                     autocast=self._autocast)
            self._evaluating = None
        record = evaluation.log_record(dict(zip(self.reward_names, self.reward_weights)))
        if self.base_evaluation is None or step == 0:
            self.base_evaluation = evaluation
        elif self.dist.is_main:
            self.last_changes = compare(self.base_evaluation, evaluation, level=cfg.eval.confidence)
            alarms = hacking_alarms(step, self.last_changes)
            record["eval/hacking_alarms"] = len(alarms)
            record["eval/hacking_metrics"] = [alarm.metric for alarm in alarms]  # marked on report/rewards.png
            for alarm in alarms:
                self.progress.print(f"warning: {alarm.message()}")
        self.metrics.log(step, record)
        for i, frames in enumerate(clips[:cfg.eval.max_clips] if cfg.eval.save_clips else []):
            paths = report.save_clip(frames, self.report_dir / "clips" / f"step_{step:06d}_{i:02d}", fps=cfg.eval.fps)
            self.metrics.add_clip(f"eval/clip_{i:02d}", paths, step, fps=cfg.eval.fps)
        if cfg.eval.sheet_rows and self.dist.world_size == 1 and clips:
            write_exam_sheet(self.report_dir, self.output_dir.name, self.base_evaluation, evaluation,
                             self.last_changes, torch.stack([c.float() for c in clips]), rows=cfg.eval.sheet_rows,
                             warn=self._warn)
        if self.dist.is_main:  # last: its presence says the evaluation is complete (a resume runs it again if not)
            evaluation.save(self._evaluation_file(step))
        return record

    def metric_keys(self) -> list[str]:
        """The ``metric/…`` keys the evaluations log (each part of a multi-part metric separately)."""
        if self.base_evaluation is None:
            return []
        return metric_part_keys(self.base_evaluation.values)

    def write_plots(self, step: int) -> None:
        report.write_plots(self.metrics, self.report_dir, step, self.reward_names, metric_keys=self.metric_keys(),
                           credit_info=self.last_credit_info, scheme=self.cfg.credit.scheme)

    # ---- stops, failures and checkpoints -----------------------------------------------------------------------

    def _guarded(self, step: int, fn, good_state: dict[str, Any] | None):
        """Run ``fn``; on a reward failure or a non-finite value, checkpoint the last good state and stop."""
        from otca_fast.rewards import RewardError

        self._updated_this_step = False
        try:
            return fn()
        except (distributed.RankFailure, RewardError, NonFiniteError) as e:
            if isinstance(e, distributed.RankFailure) and not e.recoverable:
                raise TrainingError(str(e)) from e  # not a reward or a non-finite value: no new checkpoint
            where = self.recovery.after_failure(step, good_state, updated=self._updated_this_step)
            raise TrainingError(f"{e}{where}") from e

    def _state_for_checkpoint(self) -> dict[str, Any]:
        return ckpt.training_state(step=self.step, optimizer_steps=self.optimizer_steps, generators=self.generators,
                                   sampler=self.sampler, ema=self.ema)

    def _write_checkpoint(self, step: int, state: dict[str, Any]) -> Path:
        return ckpt.save_training(self.dist, self.output_dir, step, state, model=self.transformer,
                                  named_trainable=self.named_trainable, optimizer=self.optimizer, ema=self.ema,
                                  config_yaml=self.cfg.to_yaml(), keep_last=self.cfg.train.keep_checkpoints)

    def save_checkpoint(self) -> Path:
        """Checkpoint the current state (after ``self.step`` steps)."""
        return self._write_checkpoint(self.step, self._state_for_checkpoint())

    def _load_checkpoint(self, path: Path) -> None:
        """Load the checkpoint ``path`` into the run and continue from its state."""
        state, config_yaml = ckpt.load_training(self.dist, path, model=self.transformer, optimizer=self.optimizer,
                                                named_trainable=self.named_trainable, ema=self.ema,
                                                sampler=self.sampler, generators=self.generators)
        self.step, self.optimizer_steps = int(state["step"]), int(state["optimizer_steps"])
        changed = ckpt.config_changes(config_yaml, self.cfg.to_yaml())
        if changed:
            self._warn(f"resuming with a config that differs from the checkpoint's in {changed}; the run will not "
                       f"match an uninterrupted one")
        self.console.print(f"resumed from {path} (step {self.step})", highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._executor is not None:
            # a reward call still running (Ctrl-C during a slow reward) is abandoned, not waited for
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self.metrics is not None:
            self.metrics.close()
        for buf in (getattr(self, "buffer", None), getattr(self, "x0_buffer", None)):
            if buf is not None:
                buf.close()
        if self._lock is not None:
            self._lock.release()
        if self._owns_dist:
            distributed.shutdown(self.dist)

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""The GRPO trainer: one readable loop, top to bottom (torchtune-recipe style).

A training step is

1. **prompts** — P prompts from the shuffled training set; group g holds G samples of prompt g
   (integer group ids 0..P−1, N = P·G rows);
2. **rollout** — :func:`otca_fast.rollout.sample_trajectories`: sample the N trajectories with
   ``ops.sde_step`` (SDE on all steps / a fraction / a window), store every state in the
   trajectory buffer and the step log-probs, decode, score the rewards (in a thread, overlapping
   the next chunk) → R[N, K];
3. **credit** — ``otca_fast.credit.build_advantages(scheme, ...)`` → A[N, T] (which step and which
   objective earned the reward; ``otca`` by default);
4. **timesteps** — the trained steps per sample: all trainable SDE steps, a random fraction, a
   window, or credit-guided ``select_timesteps`` (its importance weights multiply the advantage);
5. **update** — for every (micro-batch, trained step): recompute the velocity with gradients and
   take ``ops.grpo_step_loss`` (clipped surrogate, optional KL to the reference policy), summed so
   that each optimizer update sees the mean over its samples and steps; clip, step, EMA.

Then metrics (``metrics.jsonl``, TensorBoard), checkpoints (atomic, last N kept), evaluation on
held-out prompts (EMA weights, ODE sampling, fixed seed; clips as GIF/MP4), plots under
``report/`` and a summary table at the end.

Crash consistency: the run holds ``run.output_dir`` locked (:mod:`otca_fast.runlock`); ``--resume`` loads
the newest checkpoint that verifies and sets damaged newer ones aside (:mod:`otca_fast.checkpoint`), and
drops what the abandoned steps left in the log and the report; SIGTERM/SIGUSR1 stop the loop at its next
stop point with a checkpoint (:mod:`otca_fast.preemption`).

Several ranks (``torchrun``, :mod:`otca_fast.distributed`): each rank samples and trains a contiguous
share of the N rows; the rewards and the per-sample credit inputs are all-gathered so every rank
builds the same advantages of the whole batch; the loss is normalised over all ranks' pairs; a
failure on one rank is announced to all (``_rank_local``); checkpoints are sharded; rank 0 reports.

Loss normalisation: the update u over the rows S_u and the M trained steps per row minimises

    L_u = 1/(|S_u|·M) · Σ_{n∈S_u} Σ_m ℓ(n, t_{n,m}),
    ℓ = −min(r·Â, clip(r, 1±ε)·Â) + β·KL,   Â = clip(A[n, t], ±adv_clip_max) · weight[n, m]

(a micro-batch of b rows contributes mean_b ℓ · b/(|S_u|·M) per step). The selection weight goes
into Â because the clipped surrogate is positively homogeneous in A: −min(r·wA, clip(r)·wA) =
w·(−min(r·A, clip(r)·A)) for w > 0, so this is exactly the weighted per-step loss.
"""

from __future__ import annotations

import contextlib
import copy
import resource
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import torch

from otca_fast import checkpoint as ckpt
from otca_fast import distributed, ops, report, runlock
from otca_fast.config import Config, ConfigError
from otca_fast.evaluation import (
    Evaluation,
    compare,
    evaluation_noise,
    evaluation_rows,
    hacking_alarms,
    metric_part_keys,
    sample_and_score,
)
from otca_fast.preemption import StopRequested, StopSignals, TrainingStopped
from otca_fast.rollout import NonFiniteError, RewardWorker, chunks, sample_trajectories, sde_step_mask, share_chunks
from otca_fast.wandb_log import ID_FILE as WANDB_ID_FILE

__all__ = ["Trainer", "TrainingError", "PromptSampler", "adapters_disabled", "add_lora_adapters", "read_prompts",
           "seed_everything"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# metrics that measure time or memory: they differ between two runs of the same numbers
TIMING_KEYS = ("samples_per_s", "time/rollout_s", "time/update_s", "time/step_s", "peak_memory_gb")


class TrainingError(RuntimeError):
    """Training stopped on a failure that the message locates (step, timestep, reward, prompt).

    ``all_ranks``: every rank raised it at the same point (a failure they agreed on), so the job can be
    torn down in order and the message is printed once."""

    all_ranks = False


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------

def _stream_seed(seed: int, name: str) -> int:
    """A distinct, reproducible seed per random stream (crc32 is stable across processes)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (the trainer does this before building anything random)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class PromptSampler:
    """Draws ``per_step`` prompt indices per step from epochs of a (shuffled) permutation.

    Its whole state (epoch, position, permutation, generator) goes into checkpoints, so a resumed
    run draws the same prompts as an uninterrupted one.
    """

    def __init__(self, num_prompts: int, per_step: int, *, seed: int, shuffle: bool = True):
        if num_prompts < 1:
            raise ValueError(f"num_prompts: expected >= 1, got {num_prompts}")
        self.num_prompts, self.per_step, self.shuffle = num_prompts, per_step, shuffle
        self.generator = torch.Generator().manual_seed(_stream_seed(seed, "prompts"))
        self.epoch, self.pos = 0, 0
        self.order = self._new_order()

    def _new_order(self) -> torch.Tensor:
        if self.shuffle:
            return torch.randperm(self.num_prompts, generator=self.generator)
        return torch.arange(self.num_prompts)

    def next(self) -> list[int]:
        out = []
        while len(out) < self.per_step:
            if self.pos == self.num_prompts:
                self.epoch, self.pos = self.epoch + 1, 0
                self.order = self._new_order()
            out.append(int(self.order[self.pos]))
            self.pos += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "order": self.order.clone(),
                "generator": self.generator.get_state(), "num_prompts": self.num_prompts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["num_prompts"]) != self.num_prompts:
            raise ValueError(f"checkpoint prompt sampler: saved for {int(state['num_prompts'])} prompts, the config "
                             f"has {self.num_prompts}; resume with the same data.prompts")
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self.order = state["order"].clone()
        self.generator.set_state(state["generator"])


@contextlib.contextmanager
def adapters_disabled(module: torch.nn.Module):
    """The base model: every peft LoRA layer of ``module`` switched off for the duration.

    This is the KL reference of LoRA training (Flow-GRPO's ``disable_adapter()``): the network
    with its adapters removed is exactly the frozen pretrained policy, at no extra memory.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise RuntimeError("adapters_disabled: the module has no peft adapter layers")
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield module
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def add_lora_adapters(backbone, lora) -> None:
    """Inject peft LoRA adapters (``train.lora`` of the config) into ``backbone.transformer``, in float32.

    The adapters train in float32 even over bf16 base weights (their updates are tiny). B is zero at
    initialisation, so the adapted network starts as the pretrained one.
    """
    from peft import LoraConfig, inject_adapter_in_model

    targets = lora.target_modules or list(backbone.lora_target_modules())
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        init_lora_weights="gaussian" if lora.init == "gaussian" else True, target_modules=targets)
    try:
        inject_adapter_in_model(config, backbone.transformer)
    except ValueError as e:
        raise ConfigError(f"train.lora.target_modules: {e} (the backbone's defaults are "
                          f"{list(backbone.lora_target_modules())})") from None
    for name, p in backbone.transformer.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()


def read_prompts(inline: list[str], path: Path | None, what: str) -> list[str]:
    prompts = list(inline)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"data.{what}_file: file not found: {p} (one prompt per line)")
        prompts += [line.strip() for line in p.read_text().splitlines() if line.strip()]
    return prompts


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # CPU: the process's peak resident set (ru_maxrss is in KiB on Linux, bytes on macOS)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


# ------------------------------------------------------------------------------------------------
# the trainer
# ------------------------------------------------------------------------------------------------

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
        self.step = 0
        self.optimizer_steps = 0
        self._closed = False
        self._executor: RewardWorker | None = None
        self.metrics: report.MetricsLog | None = None
        self.progress = report.RunProgress("none", total_steps=cfg.train.max_steps)
        self._updated_this_step = False  # an optimizer step happened since the last step's start
        self._held_error: BaseException | None = None  # a reward failure held until the rollout's end (ranks)
        self._lock: runlock.RunLock | None = None  # run.output_dir, held by rank 0 for the run's life
        self._stop = StopSignals(announce=self._announce if self.dist.is_main else None)  # SIGTERM / SIGUSR1
        self._stop_state: dict[str, Any] | None = None  # what a stop checkpoints while a step is under way
        self._evaluating: int | None = None  # the step of the evaluation under way
        try:
            self._build(resume, overwrite)
        except BaseException:
            self.close()  # the lock, the process group, the buffers: a failed set-up leaves nothing held
            raise

    def _build(self, resume: bool, overwrite: bool) -> None:
        cfg = self.cfg
        # --- where the run lives: one run per directory, the leftovers of a killed write removed ---------
        self._lock = self._take_lock()
        if self.dist.is_main:
            for done in ckpt.remove_stale_temporaries(self.output_dir):
                self._warn(f"{self.output_dir / ckpt.CHECKPOINT_SUBDIR}: {done}")
        found = ckpt.checkpoint_dirs(self.output_dir)
        if resume and not found:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.output_dir / ckpt.CHECKPOINT_SUBDIR} "
                                    f"(run without --resume to start a new run)")
        if resume and overwrite:
            raise ConfigError("--resume and --overwrite exclude each other (continue a run, or start it over)")
        if not resume and found:
            if not overwrite:
                raise FileExistsError(f"run.output_dir {self.output_dir} already holds a run (latest checkpoint: "
                                      f"{found[-1][1].name}); pass --resume to continue it, --overwrite to start it "
                                      f"over, or choose another run.output_dir")
            if self.dist.is_main:
                self._remove_previous_run()
        distributed.barrier(self.dist)
        self.device = self.dist.device if self.dist.enabled else self._resolve_device(cfg.run.device)
        self.latent_dtype = _DTYPES[cfg.sample.latent_dtype]
        mp = cfg.train.mixed_precision
        use_bf16 = mp == "bf16" or (mp == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None

        # --- everything random below is seeded: tiny random backbones and LoRA init included -------
        seed_everything(cfg.run.seed)

        # --- data ------------------------------------------------------------------------------------
        self.prompts = read_prompts(cfg.data.prompts, cfg.data.prompt_file, "prompt")
        self.eval_prompts = read_prompts(cfg.data.eval_prompts, cfg.data.eval_prompt_file, "eval_prompt")
        if not self.prompts:
            raise ConfigError("data: no training prompts (data.prompts is empty and data.prompt_file has none)")
        self.sampler = PromptSampler(len(self.prompts), cfg.sample.prompts_per_step, seed=cfg.run.seed,
                                     shuffle=cfg.data.shuffle)
        self.group_size = cfg.sample.group_size
        self.num_samples = cfg.sample.prompts_per_step * cfg.sample.group_size
        distributed.check_batch(self.dist, cfg)
        self.local_samples = self.num_samples // self.dist.world_size  # the rows this rank samples and trains

        # --- rewards ---------------------------------------------------------------------------------
        from otca_fast.rewards import build_reward

        if cfg.model.family == "shapes" or any(r.name.startswith("shapes_")
                                               for r in [*cfg.rewards, *cfg.eval.metrics]):
            from otca_fast.toy import register_toy_rewards

            register_toy_rewards()
        self.rewards = []
        for i, spec in enumerate(cfg.rewards):
            try:
                reward = build_reward(spec.name, **spec.options)
            except (TypeError, ValueError, ImportError, ConnectionError) as e:   # a reward server that is down
                raise ConfigError(f"rewards[{i}] ({spec.name}): {e}") from None
            if reward.eval_only:
                raise ConfigError(f"rewards[{i}] ({spec.name}): an eval-only metric is never trained on (a judge the "
                                  f"policy can optimise can be gamed); list it under eval.metrics")
            self.rewards.append(reward)
        self.eval_metrics = []
        for i, spec in enumerate(cfg.eval.metrics):
            try:
                self.eval_metrics.append(build_reward(spec.name, **spec.options))
            except (TypeError, ValueError, ImportError, ConnectionError) as e:
                raise ConfigError(f"eval.metrics[{i}] ({spec.name}): {e}") from None
        self.reward_names = [r.name for r in self.rewards]
        # metrics are keyed by the built names (a remote reward takes its served reward's name)
        built = self.reward_names + [m.name for m in self.eval_metrics]
        dup = sorted({n for n in built if built.count(n) > 1})
        if dup:
            raise ConfigError(f"rewards / eval.metrics: {dup} would be logged twice (a remote reward is logged under "
                              f"the served reward's name); each reward and metric may appear once")
        self.reward_weights = [spec.weight for spec in cfg.rewards]
        if cfg.credit.scheme == "otca_timing" and not any(r.cheap for r in self.rewards):
            raise ConfigError(f"credit.scheme: otca_timing scores the rewards marked cheap on the intermediate x̂0 "
                              f"predictions, but none of {self.reward_names} is cheap")

        # --- backbone, fine-tuning mode, reference policy --------------------------------------------
        self.backbone = self._build_backbone()
        self.transformer = self.backbone.transformer
        self.ref_transformer = None
        self.named_trainable = self._setup_finetuning()
        # several ranks: replicate (ddp) or shard (fsdp) the transformer; fsdp replaces the parameters
        self.named_trainable = distributed.prepare_model(self.dist, cfg, self.transformer, self.ref_transformer,
                                                         self.named_trainable)
        self.trainable = list(self.named_trainable.values())
        try:
            self.latent_shape = tuple(self.backbone.latent_shape(cfg.sample.height, cfg.sample.width,
                                                                 cfg.sample.num_frames))
        except ValueError as e:
            raise ConfigError(f"sample.height / width / num_frames: {e}") from None
        self.sigmas = self.backbone.sigmas(cfg.sample.num_steps).detach().to("cpu", torch.float64)
        self.eval_sigmas = self.backbone.sigmas(cfg.eval.num_steps or cfg.sample.num_steps).detach().to(
            "cpu", torch.float64)
        self._embed_all_prompts()

        # --- optimizer and EMA -------------------------------------------------------------------------
        self.optimizer = self._build_optimizer()
        self.ema = None
        if cfg.train.ema.enabled:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.trainable, decay=cfg.train.ema.decay)

        # --- credit ----------------------------------------------------------------------------------
        self.credit_config = cfg.credit_config()

        # --- the random streams of the loop (all saved in checkpoints) ---------------------------------
        self.generators = {
            "noise": torch.Generator(device=self.device).manual_seed(_stream_seed(cfg.run.seed, "noise")),
            "schedule": torch.Generator().manual_seed(_stream_seed(cfg.run.seed, "schedule")),
            "credit": torch.Generator().manual_seed(_stream_seed(cfg.run.seed, "credit")),
        }

        # --- trajectory storage ------------------------------------------------------------------------
        from otca_fast.buffer import TrajectoryBuffer

        t = cfg.sample.num_steps
        self.buffer = TrajectoryBuffer(self.local_samples, t + 1, self.latent_shape, dtype=self.latent_dtype,
                                       device=self.device)
        self.x0_buffer = None
        if self._needs_x0_preds():
            self.x0_buffer = TrajectoryBuffer(self.local_samples, t, self.latent_shape, dtype=self.latent_dtype,
                                              device=self.device)
        if cfg.sample.async_rewards:
            self._executor = RewardWorker()

        # --- resume: the newest checkpoint that verifies; damaged newer ones are set aside ------------------
        if resume:
            _, _, skipped = ckpt.load_newest_valid(self.output_dir, self._load_checkpoint, self._warn)
            if self.dist.is_main:
                for path, _ in skipped:
                    self._warn(f"moved the damaged checkpoint {path.name} aside to {ckpt.set_aside(path).name}")
            distributed.barrier(self.dist)
        self.report_dir = self.output_dir / "report"
        # the evaluation of the resume step, when it was cut short (a stop or a crash during it), runs again
        cut_short = resume and self._evaluation_due(self.step) and not self._evaluation_file(self.step).is_file()
        self._evaluate_first = not resume or distributed.any_rank(self.dist, cut_short)
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(cfg.to_yaml())
            self.report_dir.mkdir(exist_ok=True)
            if resume:  # nothing of the abandoned steps is trusted: their evaluations, clips and plots go
                removed = report.discard_report_files_after(self.report_dir, self.step)
                if removed:
                    self._warn(f"{self.report_dir}: removed {len(removed)} file(s) of the steps after the checkpoint "
                               f"(step {self.step}): {', '.join(f.name for f in removed[:4])}"
                               f"{', ...' if len(removed) > 4 else ''}")
            at, rerun = self.step, self._evaluate_first and resume
            self.metrics = report.MetricsLog(
                self.output_dir, tensorboard=cfg.run.tensorboard, resume_step=self.step if resume else None,
                wandb=cfg.run.wandb, run_config=cfg.model_dump(mode="json"), warn=self._warn,
                drop=(lambda r: r.get("step") == at and any(k.startswith("eval/") for k in r)) if rerun else None)
        else:
            self.metrics = distributed.NullMetrics()
        self.last_credit_info: dict[str, Any] | None = None
        # the first evaluation (the base model): every later one is compared with it, clip for clip
        self.base_evaluation: Evaluation | None = None
        self.last_changes: dict[str, Any] = {}
        base_file = self._evaluation_file(0)
        if resume and base_file.is_file():
            self.base_evaluation = Evaluation.load(base_file)
        elif resume and cfg.eval.enabled and self.step > 0:
            self._warn(f"{base_file} is missing: the evaluations of this run are compared with the next one instead "
                       f"of the base model's")

    # ============================================================================================
    # set-up
    # ============================================================================================

    def _take_lock(self) -> runlock.RunLock | None:
        """Rank 0 locks ``run.output_dir`` for the run's life; if another run holds it, every rank fails."""
        lock, error = None, None
        if self.dist.is_main:
            try:
                lock = runlock.acquire(self.output_dir, warn=self._warn,
                                       note=f"torchrun, {self.dist.world_size} ranks" if self.dist.enabled else None)
            except runlock.RunLockError as e:
                error = e
        distributed.agree(self.dist, error, runlock.RunLockError)
        return lock

    def _warn(self, message: str) -> None:
        from rich.markup import escape

        self.console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)

    @staticmethod
    def _announce(message: str) -> None:
        # called from a signal handler: plain stderr, no console lock
        sys.stderr.write(f"otca-train: {message}\n")
        sys.stderr.flush()

    def _remove_previous_run(self) -> None:
        """``--overwrite``: delete what an earlier run wrote here (only the trainer's own outputs)."""
        import shutil

        for name in (ckpt.CHECKPOINT_SUBDIR, "tb", "report"):
            shutil.rmtree(self.output_dir / name, ignore_errors=True)
        for name in ("metrics.jsonl", "config.yaml", WANDB_ID_FILE):  # a new wandb run (offline runs stay)
            (self.output_dir / name).unlink(missing_ok=True)

    @staticmethod
    def _resolve_device(name: str) -> torch.device:
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(name)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"run.device: {name!r} but no CUDA device is available (use 'auto' or 'cpu')")
        return dev

    def _build_backbone(self):
        from otca_fast.models import build_backbone

        m = self.cfg.model
        try:
            return build_backbone(m.family, path=None if m.path is None else str(m.path), tiny=m.tiny or None,
                                  allow_download=m.allow_download, dtype=_DTYPES[m.dtype], device=self.device,
                                  attention_backend=m.attention_backend, **m.options)
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"model ({m.family}): {e}") from None

    def _setup_finetuning(self) -> dict[str, torch.nn.Parameter]:
        """Freeze the backbone; add LoRA adapters (peft) or unfreeze the transformer; build the KL reference."""
        cfg = self.cfg.train
        tr = self.transformer
        tr.requires_grad_(False)
        # eval mode throughout: the policy must be the same function in rollout and training
        # (dropout would make the training log-prob differ from the rollout's, so ratio != 1)
        tr.eval()
        reference = cfg.kl_reference
        if reference == "auto":
            reference = "adapter" if cfg.finetune == "lora" else "copy"
        if cfg.kl_beta > 0 and reference == "copy":
            self.ref_transformer = copy.deepcopy(tr).requires_grad_(False).eval()
        self._kl_mode = reference if cfg.kl_beta > 0 else None
        if cfg.finetune == "lora":
            add_lora_adapters(self.backbone, cfg.lora)
        else:
            tr.requires_grad_(True)
        if cfg.gradient_checkpointing:
            if not hasattr(tr, "enable_gradient_checkpointing"):
                raise ConfigError(f"train.gradient_checkpointing: {type(tr).__name__} has no "
                                  f"enable_gradient_checkpointing()")
            tr.enable_gradient_checkpointing()
        if cfg.compile:
            tr.compile()
        named = {n: p for n, p in tr.named_parameters() if p.requires_grad}
        if not named:
            raise ConfigError("train: nothing to train (no parameter requires grad after the fine-tuning set-up)")
        return named

    def _build_optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optimizer
        kwargs = dict(lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps)
        if o.name == "adamw8bit":
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise ConfigError("optimizer.name: adamw8bit needs bitsandbytes (pip install bitsandbytes, CUDA "
                                  "only); or use optimizer.name: adamw") from None
            return bnb.optim.AdamW8bit(self.trainable, **kwargs)
        return torch.optim.AdamW(self.trainable, **kwargs)

    def _embed_all_prompts(self) -> None:
        """Embed every prompt once (the backbone caches them), then let the text encoders leave the GPU."""
        texts = list(dict.fromkeys(self.prompts + self.eval_prompts + [self.cfg.sample.negative_prompt]))
        for part in chunks(len(texts), 64):
            self.backbone.encode_prompts(texts[part])
        if self.cfg.model.offload_text_encoder:
            self.backbone.offload_text_encoder()

    def _needs_x0_preds(self) -> bool:
        c = self.cfg.credit
        return c.scheme == "coca" or (c.source == "x0_pred" and c.scheme in ("otca", "tcd_only", "otca_timing"))

    def _needs_latents(self) -> bool:
        c = self.cfg.credit
        return c.scheme in ("otca", "tcd_only", "coca") or (c.scheme == "otca_timing" and c.timing_blend > 0)

    # ============================================================================================
    # the loop
    # ============================================================================================

    def train(self) -> list[dict[str, Any]]:
        """Run until ``train.max_steps``; returns the metric records of this run.

        Raises :class:`TrainingError` when training stops on a failure (the last good state checkpointed when
        it can be), and :class:`otca_fast.preemption.TrainingStopped` after a SIGTERM or SIGUSR1 arrived while
        it ran (the state to resume from checkpointed)."""
        cfg = self.cfg
        progress = report.RunProgress(cfg.run.progress if self.dist.is_main else "none",
                                      total_steps=cfg.train.max_steps, start_step=self.step,
                                      log_every=cfg.run.log_every, console=self.console)
        self.progress = progress
        records = []
        # SIGTERM / SIGUSR1 (preemption): stop at the next stop point with a checkpoint, see _stopped
        with self._stop.installed():
            try:
                progress.print(self._banner())
                if self._evaluate_first:
                    at = self.step
                    self._guarded(at, lambda: self.evaluate(at), self._state_for_checkpoint() if at == 0 else None)
                while self.step < cfg.train.max_steps:
                    step = self.step + 1
                    self._stop_point()
                    good_state = self._state_for_checkpoint()  # the last good state, should step fail or stop
                    self._stop_state = good_state
                    record = self._guarded(step, lambda s=step: self.train_step(s), good_state)
                    self.step, self._stop_state, self._updated_this_step = step, None, False
                    records.append(self.metrics.log(step, record))
                    if step % cfg.train.checkpoint_every == 0 or step == cfg.train.max_steps:
                        self._save_or_stop(step, self._state_for_checkpoint())
                    if self._evaluation_due(step) and step > 0:
                        self._guarded(step, lambda s=step: self.evaluate(s), None)
                    if ((cfg.run.plot_every and step % cfg.run.plot_every == 0) or step == cfg.train.max_steps) \
                            and self.dist.is_main:
                        self.write_plots(step)
                    progress.step_done(step, self._summary_line(record))
            except StopRequested as stop:
                raise self._stopped(stop) from None
            finally:
                progress.close()
        if records and self.dist.is_main:
            from rich.console import Console

            table = report.summary_table(report.read_metrics(self.metrics.path), self.reward_names,
                                         title=f"otca_fast run summary ({self.output_dir})",
                                         metric_keys=self.metric_keys(), changes=self.last_changes)
            # a log file or pipe: wide enough that metric names and intervals are not cut
            console = self.console if self.console.is_terminal else Console(file=self.console.file, width=160)
            console.print(table)
        return records

    def _evaluation_due(self, step: int) -> bool:
        """Whether the loop evaluates at ``step`` (at the start, every ``eval.every`` steps, at the end)."""
        e = self.cfg.eval
        return e.enabled and (step == 0 or bool(e.every and step % e.every == 0) or step == self.cfg.train.max_steps)

    # --- stops (preemption) and checkpoint writes ---------------------------------------------------

    def _stop_point(self) -> None:
        """A stop point: raise :class:`StopRequested` if a stop signal arrived, on any rank (an all-reduce, so
        every rank stops at this same point). Never once the step has updated the weights: it is finished
        first, the checkpoint then taken at its end."""
        if self._updated_this_step:
            return
        if distributed.any_rank(self.dist, self._stop.requested is not None):
            raise StopRequested(self._stop.requested or "a stop signal to another rank")

    def _poll_stop(self) -> None:
        """The stop point while waiting for this rank's rewards (ranks are not in step there: on several ranks
        the request is agreed on by :meth:`_rank_local` before anyone stops)."""
        if self._stop.requested is not None and not self._updated_this_step:
            raise StopRequested(self._stop.requested, local=self.dist.enabled)

    def _stopped(self, stop: StopRequested) -> TrainingStopped:
        """Checkpoint the state to resume from after a stop signal; the exception that ends the run."""
        state = self._stop_state if self._stop_state is not None else self._state_for_checkpoint()
        step = int(state["step"])
        if self._stop_state is not None:
            what = f"during step {step + 1} (abandoned: it had not updated the weights; it runs again on resume)"
        elif self._evaluating is not None:
            what = f"during the evaluation at step {step} (abandoned: it runs again on resume)"
        else:
            what = f"after step {step}"
        latest = ckpt.latest_checkpoint(self.output_dir)
        # the checkpoint of this very state may be written already (at the step's end, or the one resumed from)
        path = latest if latest is not None and latest.name == f"step_{step:08d}" else self._save_or_stop(step, state)
        return TrainingStopped(f"stopped by {stop.signal_name} {what}; the state after step {step} is checkpointed "
                               f"in {path}; continue with --resume", signal_name=stop.signal_name, step=step,
                               checkpoint=path)

    def _save_or_stop(self, step: int, state: dict[str, Any]) -> Path:
        """Write a checkpoint; a write that fails (a full disk, non-finite weights) stops training with a
        :class:`TrainingError` naming the latest checkpoint that is intact."""
        try:
            return self._write_checkpoint(step, state)
        except ckpt.CheckpointWriteError as e:
            latest = ckpt.latest_checkpoint(self.output_dir)
            error = TrainingError(f"step {step}: {e} (latest checkpoint: {latest if latest is not None else 'none'})")
            error.all_ranks = self.dist.enabled  # agreed on by every rank (distributed.agree)
            raise error from e

    def _guarded(self, step: int, fn, good_state: dict[str, Any] | None):
        """Run ``fn``; on a reward failure or a non-finite value, checkpoint the last good state and stop."""
        from otca_fast.rewards import RewardError

        self._updated_this_step = False
        try:
            return fn()
        except distributed.RankFailure as e:
            if not e.recoverable:  # not a reward or a non-finite value: stop without a new checkpoint
                raise TrainingError(str(e)) from e
            where = self._checkpoint_after_failure(step, good_state)
            raise TrainingError(f"{e}{where}") from e
        except (RewardError, NonFiniteError) as e:
            where = self._checkpoint_after_failure(step, good_state)
            raise TrainingError(f"{e}{where}") from e

    def _checkpoint_after_failure(self, step: int, good_state: dict[str, Any] | None) -> str:
        """Checkpoint the last good state after a failure in ``step``; says where (for the message).

        On several ranks every rank gets here together (the failure was announced by
        ``distributed.check_errors``), so the checkpoint is written collectively."""
        latest = ckpt.latest_checkpoint(self.output_dir)
        try:
            if good_state is None:
                # evaluation after a completed step: the training state itself is sound
                return f"; the state after step {step} is checkpointed in {self.save_checkpoint()}"
            if self._updated_this_step:
                # an optimizer update already ran in this step, so the weights are no longer those of
                # the state captured before it; do not write a checkpoint that mixes the two
                return (f"; the weights were already updated in step {step}, so no new checkpoint is written "
                        f"(latest: {latest if latest is not None else 'none'})")
            if step > 0:
                path = self._write_checkpoint(step - 1, good_state)
                return f"; the last good state (step {step - 1}) is checkpointed in {path}"
        except ckpt.CheckpointWriteError as e:
            return f"; the last good state could not be checkpointed: {e} (latest: {latest or 'none'})"
        return ""

    def _rank_local(self, fn, *, forwards: bool = False):
        """Run rank-local work (a single process: just ``fn()``).

        Several ranks: an exception is held, and every rank then calls ``distributed.check_errors``
        before its next collective, so a failure on one rank (a reward that raises, a NaN) stops every
        rank at the same point with a :class:`distributed.RankFailure` naming it. Under FSDP every
        forward is itself a collective: a failure before ``fn``'s forwards are all done (``forwards``
        and ``self._forwards_done`` still False) cannot be announced in step with the others, so it is
        recorded in the rendezvous store and this rank stops (the others end on their broken collective
        or the process-group timeout).
        """
        if not self.dist.enabled:
            return fn()
        self._forwards_done = not (forwards and self.dist.strategy == "fsdp")
        error, out, stop = None, None, False
        try:
            out = fn()
        except distributed.RankFailure:
            raise
        except StopRequested as e:
            if not e.local:  # a stop point every rank passed together: all raise it here
                raise
            stop = True  # this rank stopped waiting for its rewards: the ranks agree below
        except Exception as e:  # noqa: BLE001 - held, then raised on every rank by check_errors
            if not self._forwards_done:
                raise TrainingError(distributed.fatal_message(self.dist, e)) from e
            error = e
        # also a stop point: the same all-reduce carries every rank's stop request
        stop = stop or (self._stop.requested is not None and not self._updated_this_step)
        if distributed.check_errors(self.dist, error, stop=stop):
            raise StopRequested(self._stop.requested or "a stop signal to another rank")
        return out

    def _scorer(self, score, columns: int | None = None):
        """``score`` as the rollout's reward function. Several ranks: a failure is held (NaN scores are
        returned so the rollout finishes its forwards) and raised at the end of the rollout."""
        if not self.dist.enabled:
            return score

        def held(frames, prompts, **kwargs):
            try:
                return score(frames, prompts, **kwargs)
            except Exception as e:  # noqa: BLE001 - re-raised by _raise_held
                if self._held_error is None:
                    self._held_error = e
                return torch.full((frames.shape[0], columns or len(self.rewards)), float("nan"))

        return held

    def _raise_held(self) -> None:
        self._forwards_done = True
        if self._held_error is not None:
            error, self._held_error = self._held_error, None
            raise error

    def train_step(self, step: int) -> dict[str, Any]:
        """One GRPO iteration: prompts → rollout → credit → timesteps → update. Returns its metrics."""
        t_start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

        # 1. prompts: group g = G copies of prompt g (integer group ids, never decoded strings)
        prompt_ids = self.sampler.next()
        prompts = [self.prompts[i] for i in prompt_ids for _ in range(self.group_size)]
        group_ids = torch.arange(len(prompt_ids)).repeat_interleave(self.group_size)

        # 2. rollout (several ranks: each samples its share of the N rows; a failure on any rank is
        # announced to all before the next collective, see _rank_local)
        roll = self._rank_local(lambda: self.rollout(step, prompts), forwards=True)
        t_rollout = time.perf_counter() - t_start

        # 3. credit: A[n, t]
        A, info = self.compute_advantages(step, roll, group_ids)

        # 4. which steps to train, per sample, with their loss weights
        index, weight, valid = self.choose_timesteps(roll["sde_mask"], A, info)

        # 5. the update
        t_update = time.perf_counter()
        stats = self.update(step, roll, A, index, weight, valid)
        t_end = time.perf_counter()

        rewards = roll["rewards"]
        record: dict[str, Any] = {}
        for k, name in enumerate(self.reward_names):
            record[f"reward/{name}"] = float(rewards[:, k].mean())
            record[f"reward_std/{name}"] = float(rewards[:, k].std(unbiased=False))
        w = torch.tensor(self.reward_weights, dtype=torch.float32)
        record["reward/total"] = float((rewards * w).sum(1).mean())
        # a group whose every objective has zero spread carries no GRPO signal (Flow-GRPO logs it)
        spread = torch.stack([rewards[group_ids == g].std(0, unbiased=False) for g in range(len(prompt_ids))])
        record["zero_std_ratio"] = float((spread.amax(1) <= 1e-8).float().mean())
        record.update(stats)
        record.update(self._credit_summary(A, info, valid))
        record["lr"] = self.optimizer.param_groups[0]["lr"]
        record["samples_per_s"] = self.num_samples / (t_end - t_start)
        record["time/rollout_s"] = t_rollout
        record["time/update_s"] = t_end - t_update
        record["time/step_s"] = t_end - t_start
        record["peak_memory_gb"] = _peak_memory_gb(self.device)
        self.last_credit_info = info
        return record

    # ============================================================================================
    # 2. rollout
    # ============================================================================================

    def _progress(self, step: int) -> float:
        """Training progress in [0, 1) at the start of ``step`` (drives progressive credit windows)."""
        return (step - 1) / self.cfg.train.max_steps

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

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
        self._stop_point()  # after every denoising step of a chunk

    def rollout(self, step: int, prompts: list[str]) -> dict[str, Any]:
        """Sample the step's N trajectories into the buffer; score them. Returns what training needs."""
        cfg = self.cfg.sample
        sde = cfg.sde
        window = None
        if self.cfg.credit.scheme == "window":
            # MixGRPO / Flow-GRPO-Fast: the credit window *is* the set of SDE steps (ODE elsewhere);
            # build_advantages gets the same (start, stop) back
            from otca_fast.credit import window_steps

            window = window_steps(cfg.num_steps, self.credit_config, generator=self.generators["schedule"],
                                  progress=self._progress(step))
            sde_mask = torch.zeros(cfg.num_steps, dtype=torch.bool)
            sde_mask[window[0]:window[1]] = True
        else:
            sde_mask = sde_step_mask(cfg.num_steps, sde.mode, fraction=sde.fraction, window_size=sde.window_size,
                                     window_range=sde.window_range, generator=self.generators["schedule"])
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
        self.buffer.reset()
        if self.x0_buffer is not None:
            self.x0_buffer.reset()
        step_reward_fn = self._step_reward_fn(step, prompts) if self.cfg.credit.scheme == "otca_timing" else None
        self.progress.phase("rollout", len(prompts) * cfg.num_steps)
        out = sample_trajectories(
            self.backbone, cond, sigmas=self.sigmas, sde_mask=sde_mask, init_noise=noise, prompts=prompts,
            batch_size=cfg.batch_size, dynamics=cfg.dynamics, noise_level=cfg.noise_level,
            generator=self.generators["noise"], guidance_scale=cfg.guidance_scale, uncond=uncond,
            buffer=self.buffer, x0_buffer=self.x0_buffer, autocast=self._autocast, step=step,
            score_fn=self._scorer(self._score), reward_executor=self._executor, step_reward_fn=step_reward_fn,
            on_progress=self._rollout_progress, rows=share, total_rows=total, poll=self._poll_stop)
        self._raise_held()
        step_rewards = None
        if step_reward_fn is not None:
            step_rewards = self._assemble_step_rewards(out.step_rewards, out.rewards)
        return {"prompts": prompts, "cond": cond, "uncond": uncond, "sde_mask": sde_mask, "window": window,
                "log_probs": out.log_probs, "rewards": out.rewards, "step_rewards": step_rewards, "rows": share}

    # --- otca_timing: cheap rewards on the decoded x̂0 predictions --------------------------------------

    def _timing_states(self) -> list[int]:
        from otca_fast.credit.timing import evaluation_states

        return evaluation_states(self.cfg.sample.num_steps, self.credit_config.timing_every)

    def _step_reward_fn(self, step: int, prompts: list[str]):
        cheap = [k for k, r in enumerate(self.rewards) if r.cheap]
        from otca_fast.rewards import score_rewards

        states = self._timing_states()[:-1]  # the last state is the final sample, scored anyway
        cheap_rewards = [self.rewards[k] for k in cheap]
        score = self._scorer(lambda frames, chunk_prompts, step: score_rewards(cheap_rewards, frames, chunk_prompts,
                                                                               step=step), columns=len(cheap))

        def fn(rows: slice, x0s: list[torch.Tensor], _frames: torch.Tensor) -> torch.Tensor:
            chunk_prompts = prompts[rows]
            values = []
            for j in states:
                frames = self.backbone.decode(x0s[j]).float().cpu()
                values.append(score(frames, chunk_prompts, step=step))
            return torch.stack(values, 1)  # [B, M-1, K_cheap]

        return fn

    def _assemble_step_rewards(self, cheap_values: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
        """[N, T+1, K]: cheap rewards interpolated between the scored states, the others constant.

        An objective that is not scored per step is given its final value at every state: its
        gains are then 0 and its timing uniform (credit/timing.py).
        """
        from otca_fast.credit.timing import interpolate_step_rewards

        t = self.cfg.sample.num_steps
        cheap = [k for k, r in enumerate(self.rewards) if r.cheap]
        values = torch.cat([cheap_values, final[:, None, cheap]], 1)
        interp = interpolate_step_rewards(values, self._timing_states(), t)
        out = final[:, None, :].repeat(1, t + 1, 1)
        out[:, :, cheap] = interp.to(out.dtype)
        return out

    # ============================================================================================
    # 3. credit
    # ============================================================================================

    def compute_advantages(self, step: int, roll: dict[str, Any], group_ids: torch.Tensor):
        """A[N, T] from ``build_advantages`` with the configured scheme.

        The per-sample inputs of the credit are computed where the trajectories live (TCD's state
        cosines from this rank's buffer, :meth:`_local_credit_inputs`). On several ranks they, the
        rewards ``[N/W, K]`` and the group ids are all-gathered (a few KB: no latent crosses ranks),
        ``roll["rewards"]`` becomes the whole batch's, and every rank builds the advantages of all N
        rows with the global group statistics, exactly as a single process would.
        """
        from otca_fast.credit import build_advantages

        cfg = self.cfg
        n, t = self.num_samples, cfg.sample.num_steps
        cosines = self._rank_local(self._local_credit_inputs)
        rows = roll.get("rows", slice(0, n))
        roll["rewards"] = distributed.all_gather_rows(self.dist, roll["rewards"])
        group_ids = distributed.all_gather_rows(self.dist, group_ids[rows])
        kwargs: dict[str, Any] = {}
        if cosines is not None:
            kwargs["cosines"] = distributed.all_gather_rows(self.dist, cosines)
        # every tensor on one device: the trajectory's when it is passed, else the CPU
        dev = kwargs["cosines"].device if "cosines" in kwargs else torch.device("cpu")
        kwargs["sigmas"] = self.sigmas.float().to(dev)
        if roll["step_rewards"] is not None:
            kwargs["step_rewards"] = distributed.all_gather_rows(self.dist, roll["step_rewards"]).to(dev)
        # the credit lives on the steps that can be trained (and credit-guided selection happens here, once)
        trainable = torch.zeros(t, dtype=torch.bool)
        trainable[self.trainable_steps(roll["sde_mask"])] = True
        A, info = build_advantages(cfg.credit.scheme, rewards=roll["rewards"].to(dev), group_ids=group_ids.to(dev),
                                   config=self.credit_config, progress=self._progress(step),
                                   generator=self.generators["credit"], window=roll["window"],
                                   trainable=trainable.to(dev), **kwargs)
        A = A.float()
        if A.shape != (n, t):
            raise RuntimeError(f"build_advantages({cfg.credit.scheme!r}) returned A of shape {tuple(A.shape)}, "
                               f"expected ({n}, {t})")
        if not bool(torch.isfinite(A).all()):
            i, j = (int(v) for v in (~torch.isfinite(A)).nonzero()[0])
            raise NonFiniteError(f"step {step}: the advantage A[{i}, {j}] of credit scheme {cfg.credit.scheme!r} "
                                 f"is {float(A[i, j])}")
        return A.cpu(), info

    def _local_credit_inputs(self) -> torch.Tensor | None:
        """TCD's state cosines ``[N/W, T+1]`` of this rank's trajectories (None when the scheme needs none):
        ``state_cosines`` of the noisy states or, for ``coca`` and ``credit.source: x0_pred``, of x̂0."""
        if not self._needs_latents():
            return None
        from otca_fast.credit.trajectory import state_cosines

        c = self.cfg.credit
        n, t = self.local_samples, self.cfg.sample.num_steps
        all_n = torch.arange(n).repeat_interleave(t + 1)
        all_t = torch.arange(t + 1).repeat(n)
        latents = self.buffer.gather(all_n, all_t).view(n, t + 1, *self.latent_shape)
        x0_preds = None
        if self.x0_buffer is not None:
            all_n = torch.arange(n).repeat_interleave(t)
            all_t = torch.arange(t).repeat(n)
            x0_preds = self.x0_buffer.gather(all_n, all_t).view(n, t, *self.latent_shape)
        source = "x0_pred" if c.scheme == "coca" else c.source
        return state_cosines(latents, source=source, x0_preds=x0_preds, per_frame=c.per_frame, frame_dim=c.frame_dim)

    def _credit_summary(self, A: torch.Tensor, info: dict[str, Any], valid: torch.Tensor) -> dict[str, Any]:
        """Scalars for the log: where the credit went over steps and objectives."""
        out: dict[str, Any] = {}
        absA = A.abs()
        per_step = absA.mean(0)
        half = max(1, per_step.numel() // 2)
        out["credit/adv_abs_mean"] = float(absA.mean())
        out["credit/adv_std"] = float(A.std(unbiased=False))
        # share of |A| on the first (high-noise) half of the steps
        out["credit/early_share"] = float(per_step[:half].sum() / per_step.sum().clamp_min(1e-12))
        out["credit/step_profile"] = [round(float(v), 6) for v in per_step]  # mean |A[:, t]| (jsonl only)
        out["credit/trained_steps_per_sample"] = float(valid.sum(1).float().mean())
        w = info.get("w")
        if isinstance(w, torch.Tensor):
            w = w.detach().float().cpu()
            row = w.sum(1) if w.dim() == 2 else w.sum(1).mean(-1)
            peak = w.amax(1) if w.dim() == 2 else w.amax(1).mean(-1)
            # 1/T = uniform credit; 1 = all of a sample's credit on one step
            out["credit/w_peak_share"] = float((peak / row.clamp_min(1e-12)).mean())
        c = info.get("c")
        if isinstance(c, torch.Tensor) and c.dim() == 2 and c.shape[1] == len(self.reward_names):
            for k, name in enumerate(self.reward_names):
                out[f"credit/c/{name}"] = float(c[:, k].float().mean())  # the objective mix (MOCA)
        cos = info.get("cosines")
        if isinstance(cos, torch.Tensor):
            out["credit/cos_first_state"] = float(cos[:, 0].float().mean())
        return out

    # ============================================================================================
    # 4. timesteps
    # ============================================================================================

    def trainable_steps(self, sde_mask: torch.Tensor) -> torch.Tensor:
        """The SDE steps that may be trained; the last denoising step never is (σ' = 0 overflows)."""
        steps = sde_mask.nonzero().flatten()
        if self.cfg.train.skip_last_step:
            steps = steps[steps != sde_mask.numel() - 1]
        return steps

    def choose_timesteps(self, sde_mask: torch.Tensor, A: torch.Tensor, info: dict[str, Any]):
        """``(index, weight, valid)``, each ``[N, M]``: the absolute steps each sample trains, their loss
        weights, and which entries are real (rows may train fewer steps than M, e.g. DanceGRPO's random
        subset minus the never-trained last step).

        The candidates are the trainable SDE steps that the scheme's ``train_mask`` keeps (``dance``
        and ``window`` choose their own steps; the other schemes keep all), then ``train.timesteps``
        picks among them.
        """
        ts = self.cfg.train.timesteps
        steps = self.trainable_steps(sde_mask)
        n, s = A.shape[0], steps.numel()
        allowed = info["train_mask"].to("cpu", torch.bool)[:, steps]
        if ts.mode == "all":
            counts = allowed.sum(1)
            m = max(int(counts.max()), 1) if n else 1
            # stable sort puts each row's allowed steps first, in step order
            local = torch.sort((~allowed).to(torch.int8), dim=1, stable=True).indices[:, :m]
            valid = torch.arange(m)[None, :] < counts[:, None]
            weight = torch.ones(n, m)
        elif ts.mode == "fraction":
            # DanceGRPO: a random subset of int(S·fraction) steps per sample, trained in step order
            m = max(1, int(s * ts.fraction))
            local = torch.stack([torch.randperm(s, generator=self.generators["schedule"])[:m].sort().values
                                 for _ in range(n)])
            weight, valid = torch.ones(n, m), torch.ones(n, m, dtype=torch.bool)
        elif ts.mode == "window":
            local = torch.arange(ts.window_start, ts.window_start + ts.window_size).expand(n, ts.window_size)
            weight, valid = torch.ones(n, ts.window_size), torch.ones(n, ts.window_size, dtype=torch.bool)
        else:
            # credit-guided: build_advantages already chose ⌈fraction·S⌉ of the S trainable steps per sample,
            # ∝ |A[n, t]| with Horvitz–Thompson weights 1/π (importance) or the top-k, and folded the weights
            # into A; train exactly those (the weights go in A, so the loss weight here is 1)
            index = info["index"].to("cpu")
            return index.contiguous(), torch.ones(index.shape), torch.ones(index.shape, dtype=torch.bool)
        return steps[local].contiguous(), weight.float().contiguous(), valid.contiguous()

    # ============================================================================================
    # 5. update
    # ============================================================================================

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

    def update(self, step: int, roll: dict[str, Any], A: torch.Tensor, index: torch.Tensor,
               weight: torch.Tensor, valid: torch.Tensor) -> dict[str, Any]:
        """Clipped-GRPO updates over the trained (sample, step) pairs; returns the loss statistics.

        Several ranks: ``A``, ``index``, ``weight`` and ``valid`` cover the whole batch; this rank trains
        its own rows (``roll["rows"]``). Each term is scaled by W/(the update's pairs on *all* ranks), so
        after the gradient average (DDP all-reduce or FSDP reduce-scatter) every optimizer update minimises
        the global mean, as one process would; the logged statistics are global too.
        """
        cfg = self.cfg
        tc = cfg.train
        d = self.dist
        n_all, m = index.shape
        share = roll.get("rows", slice(0, n_all))
        per_rank = valid.view(d.world_size, -1, m)  # [W, N/W, M]: every rank's pairs (equal shares)
        A, index, weight, valid = A[share], index[share], weight[share], valid[share]
        lockstep = d.strategy == "fsdp"  # FSDP forwards/backwards are collectives: all ranks run the same ones
        held: NonFiniteError | None = None
        sig = self.sigmas
        sigma_max = float(sig[1])  # Flow-GRPO's σ = 1 rule, as in the rollout
        # the rollout's chunks (same rows, same batch composition, so on-policy ratios are exactly 1),
        # split as evenly as possible over the optimizer updates of this step
        micro = [rows for _, rows in share_chunks(n_all, share, cfg.sample.batch_size) if rows is not None]
        k = min(tc.updates_per_step, len(micro))
        groups = [micro[i * len(micro) // k:(i + 1) * len(micro) // k] for i in range(k)]
        old_log_probs = roll["log_probs"]
        clip = self.credit_config.adv_clip_max
        # Flow-GRPO clamps A[:, t] to ±adv_clip_max before the surrogate; credit-guided selection has clamped
        # A before folding in its importance weights, which must not be clipped
        adv = A if self.cfg.train.timesteps.mode == "credit" else A.clamp(-clip, clip)
        cond, uncond = roll["cond"], roll["uncond"]
        sums = dict.fromkeys(("loss", "ratio", "clipped", "approx_kl", "kl"), 0.0)
        ratio_dev_max, pairs_done, grad_norms = 0.0, 0, []
        self.progress.phase("update", tc.inner_epochs * int(valid.sum()))
        for _epoch in range(tc.inner_epochs):
            for part in groups:
                # L_u = mean over this update's (sample, step) pairs of the per-step loss (on every rank)
                pairs = sum(int(per_rank[:, rows].sum()) for rows in part)
                if pairs == 0:
                    continue
                self.optimizer.zero_grad(set_to_none=True)
                for rows in part:
                    all_ids = torch.arange(rows.start, rows.stop)
                    for j in range(m):
                        self._stop_point()  # until the step's first optimizer update
                        keep = valid[rows, j]
                        if held is not None or not bool(keep.any()):
                            if lockstep and bool(per_rank[:, rows, j].any()):
                                self._idle_pass(all_ids, index[all_ids, j], cond.index(rows), uncond)
                            continue
                        full = bool(keep.all())
                        ids = all_ids if full else all_ids[keep]
                        b = ids.numel()
                        c = cond.index(rows) if full else cond.index(ids)
                        u = uncond.index(slice(0, b)) if uncond is not None else None
                        t = index[ids, j]
                        if j + 1 < m:
                            nxt = valid[rows, j + 1]
                            self.buffer.prefetch(all_ids[nxt], index[all_ids[nxt], j + 1])
                        x = self.buffer.gather(ids, t)
                        x_next = self.buffer.gather(ids, t + 1)
                        s_rows, s_next = sig[t], sig[t + 1]
                        sigma_in = s_rows.to(device=self.device, dtype=torch.float32)
                        v = self._velocity(x, sigma_in, c, u)
                        v_ref = self._reference_velocity(x, sigma_in, c, u) if self._kl_mode else None
                        a_rows = (adv[ids, t] * weight[ids, j]).to(self.device)
                        old = old_log_probs[ids, t].to(self.device)
                        loss, st = ops.grpo_step_loss(
                            x, v, x_next, old, a_rows, s_rows, s_next, dynamics=cfg.sample.dynamics,
                            noise_level=cfg.sample.noise_level, clip_range=tc.clip_range,
                            ref_model_output=v_ref, kl_beta=tc.kl_beta, sigma_max=sigma_max,
                            check_finite=False)  # old log-probs and A were checked once per step
                        try:
                            self._check_loss(step, loss, st, ids, t)
                        except NonFiniteError as e:
                            if not d.enabled:
                                raise
                            held = e  # announced to every rank before the gradients are averaged
                            if lockstep:
                                (v.float().sum() * 0.0).backward()
                            continue
                        (loss * (b * d.world_size / pairs)).backward()
                        ratio = st["ratio"].detach()
                        sums["loss"] += float(loss.detach()) * b
                        sums["ratio"] += float(ratio.sum())
                        sums["clipped"] += float(st["clipped"].float().sum())
                        sums["approx_kl"] += float(st["approx_kl"].sum())
                        sums["kl"] += float(st["kl"].sum())
                        ratio_dev_max = max(ratio_dev_max, float((ratio - 1).abs().max()))
                        pairs_done += b
                        self.progress.advance("update", b)
                if d.enabled:
                    distributed.check_errors(d, held)
                    distributed.sync_gradients(d, self.trainable)  # ddp; fsdp reduced them in backward
                grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, tc.max_grad_norm)
                if hasattr(grad_norm, "full_tensor"):  # fsdp: the global norm of the sharded gradients
                    grad_norm = grad_norm.full_tensor()
                if not bool(torch.isfinite(grad_norm)):
                    raise NonFiniteError(
                        f"step {step}: the gradient norm is {float(grad_norm)} (update {len(grad_norms) + 1}); "
                        f"the loss was finite, so the transformer's backward overflowed (try float32 weights "
                        f"or a smaller learning rate)")
                grad_norms.append(float(grad_norm))
                self.optimizer.step()
                self._updated_this_step = True
                self.optimizer_steps += 1
                if self.ema is not None and self.optimizer_steps % tc.ema.update_every == 0:
                    self.ema.step(self.trainable)
        self.optimizer.zero_grad(set_to_none=True)
        if d.enabled:  # the statistics of the whole batch
            keys = list(sums)
            total = distributed.all_reduce(d, torch.tensor([sums[key] for key in keys] + [pairs_done],
                                                           dtype=torch.float64))
            sums = {key: float(total[i]) for i, key in enumerate(keys)}
            pairs_done = int(total[-1])
            ratio_dev_max = float(distributed.all_reduce(d, torch.tensor([ratio_dev_max], dtype=torch.float64),
                                                         "max")[0])
        if pairs_done == 0:
            raise TrainingError(f"step {step}: no (sample, step) pair to train: every selected step was "
                                f"excluded (check sample.sde and train.timesteps)")
        out = {key: value / pairs_done for key, value in sums.items()}
        out["ratio_mean"] = out.pop("ratio")
        out["clip_frac"] = out.pop("clipped")
        out["ratio_dev_max"] = ratio_dev_max
        out["grad_norm"] = sum(grad_norms) / len(grad_norms)
        out["optimizer_steps"] = self.optimizer_steps
        out["trained_pairs"] = pairs_done // tc.inner_epochs
        return out

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

    def _check_loss(self, step: int, loss: torch.Tensor, stats: dict[str, torch.Tensor], ids: torch.Tensor,
                    t: torch.Tensor) -> None:
        for name, value in (("log_prob", stats["log_prob"]), ("ratio", stats["ratio"]), ("kl", stats["kl"])):
            bad = ~torch.isfinite(value)
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise NonFiniteError(f"step {step}: training {name} is {float(value[i])} at timestep index "
                                     f"t={int(t[i])} for sample {int(ids[i])} (the recomputed velocity went "
                                     f"non-finite)")
        if not bool(torch.isfinite(loss)):
            raise NonFiniteError(f"step {step}: the loss is {float(loss)} at timestep indices {t.tolist()} "
                                 f"(samples {ids.tolist()})")

    # ============================================================================================
    # evaluation
    # ============================================================================================

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
        return self.output_dir / "report" / "eval" / f"step_{step:06d}.json"

    def evaluate(self, step: int) -> dict[str, Any]:
        """Held-out prompts, EMA weights, ODE sampling from a fixed seed: the trained rewards and the eval
        metrics of every clip (``report/eval/step_*.json``), their means (``eval/…``), the changes from the
        first evaluation with bootstrap intervals, a warning when a reward rose while a metric fell, clips."""
        cfg = self.cfg
        if not cfg.eval.enabled:
            return {}
        prompts = evaluation_rows(self.eval_prompts, cfg.eval.samples_per_prompt)
        guidance = cfg.eval.guidance_scale if cfg.eval.guidance_scale is not None else cfg.sample.guidance_scale
        # fork_rng: whatever evaluation draws never moves the training RNG streams
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self.ema_weights():
            noise = evaluation_noise(len(prompts), self.latent_shape, cfg.eval.seed, device=self.device,
                                     dtype=self.latent_dtype)
            total = len(prompts)
            if self.dist.enabled:  # each rank evaluates its share (equal shares, the last row repeated)
                share = distributed.eval_share(self.dist, total)
                noise, prompts = noise[share], [prompts[i] for i in share.tolist()]

            def sample():
                result = sample_and_score(
                    self.backbone, prompts, noise, sigmas=self.eval_sigmas, batch_size=cfg.sample.batch_size,
                    guidance_scale=guidance, negative_prompt=cfg.sample.negative_prompt, rewards=self.rewards,
                    metrics=self.eval_metrics, step=step, autocast=self._autocast, scorer=self._scorer,
                    keep_frames=cfg.eval.max_clips if cfg.eval.save_clips and self.dist.is_main else 0,
                    on_progress=lambda _: self._stop_point())
                self._raise_held()
                return result

            self._evaluating = step  # left set if the evaluation does not finish: a stop or Ctrl-C says where
            rows, clips = self._rank_local(sample, forwards=True)
            self._evaluating = None
        rows = {key: distributed.all_gather_rows(self.dist, value)[:total] for key, value in rows.items()}
        evaluation = Evaluation.from_rows(step, self.eval_prompts, cfg.eval.samples_per_prompt, cfg.eval.seed, rows)
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
        for i, frames in enumerate(clips):
            paths = report.save_clip(frames, self.report_dir / "clips" / f"step_{step:06d}_{i:02d}", fps=cfg.eval.fps)
            self.metrics.add_clip(f"eval/clip_{i:02d}", paths, step, fps=cfg.eval.fps)
        if self.dist.is_main:  # last: its presence says the evaluation is complete (a resume runs it again if not)
            evaluation.save(self._evaluation_file(step))
        return record

    # ============================================================================================
    # reports
    # ============================================================================================

    def metric_keys(self) -> list[str]:
        """The ``metric/…`` keys the evaluations log (each part of a multi-part metric separately)."""
        if self.base_evaluation is None:
            return []
        return metric_part_keys(self.base_evaluation.values)

    def write_plots(self, step: int) -> None:
        records = report.read_metrics(self.metrics.path)
        images = {"report/rewards": report.plot_rewards(records, self.reward_names, self.report_dir / "rewards.png",
                                                        metric_keys=self.metric_keys()),
                  "report/training": report.plot_training(records, self.report_dir / "training.png")}
        if self.last_credit_info is not None:
            from otca_fast.credit import plot_credit

            images["report/credit"] = plot_credit(
                self.last_credit_info, self.report_dir / f"credit_step_{step:06d}.png",
                objective_names=self.reward_names, title=f"credit at step {step} ({self.cfg.credit.scheme})")
        for tag, path in images.items():
            self.metrics.add_image_file(tag, path, step)

    def _banner(self) -> str:
        c = self.cfg
        n_params = sum(p.numel() for p in self.trainable)
        return (f"otca_fast: {c.model.family} on {self.device} | {c.train.finetune} ({n_params:,} trainable) | "
                f"credit {c.credit.scheme} | rewards {', '.join(self.reward_names)} | "
                f"{c.sample.prompts_per_step}x{c.sample.group_size} samples/step, {c.sample.num_steps} steps | "
                f"output {self.output_dir}" + (f" | resumed at step {self.step}" if self.step else "")
                + (f" | {self.dist.world_size} ranks ({self.dist.strategy})" if self.dist.enabled else ""))

    def _summary_line(self, record: dict[str, Any]) -> str:
        parts = [f"{name}={record[f'reward/{name}']:.4g}" for name in self.reward_names]
        parts += [f"loss={record['loss']:.3g}", f"kl={record['kl']:.2g}", f"clip={record['clip_frac']:.2f}",
                  f"{record['samples_per_s']:.2f} samples/s"]
        return " ".join(parts)

    # ============================================================================================
    # checkpoints
    # ============================================================================================

    def _state_for_checkpoint(self) -> dict[str, Any]:
        """Everything besides the weights and optimizer moments that the next step depends on."""
        state = {"rng": ckpt.capture_rng_state(self.generators), "sampler": self.sampler.state_dict(),
                 "optimizer_steps": self.optimizer_steps, "step": self.step}
        if self.ema is not None:
            ema_state = self.ema.state_dict()
            ema_state.pop("shadow_params")
            state["ema"] = ema_state
        return state

    def _write_checkpoint(self, step: int, state: dict[str, Any]) -> Path:
        ema = None
        if self.ema is not None:
            ema = dict(zip(self.named_trainable, self.ema.shadow_params))
        if self.dist.enabled:  # the sharded layout: every rank writes its shards (torch.distributed.checkpoint)
            return distributed.save_checkpoint(self.dist, self.output_dir, step, model=self.transformer,
                                               optimizer=self.optimizer, ema=ema, state=state,
                                               config_yaml=self.cfg.to_yaml(),
                                               keep_last=self.cfg.train.keep_checkpoints)
        return ckpt.save_checkpoint(self.output_dir, step, weights=dict(self.named_trainable),
                                    optimizer=self.optimizer.state_dict(), state=state, ema=ema,
                                    config_yaml=self.cfg.to_yaml(), keep_last=self.cfg.train.keep_checkpoints)

    def save_checkpoint(self) -> Path:
        """Checkpoint the current state (after ``self.step`` steps)."""
        return self._write_checkpoint(self.step, self._state_for_checkpoint())

    def _load_checkpoint(self, path: Path) -> None:
        """Load the checkpoint ``path`` into the run; :class:`otca_fast.checkpoint.CheckpointError` (on every rank
        together) when it does not verify: a file missing, unreadable or truncated, or a NaN/Inf in it."""
        if self.dist.enabled or ckpt.is_sharded(path):
            # any layout onto any number of ranks, either strategy: by parameter name, through
            # torch.distributed.checkpoint.state_dict (each rank keeps its part)
            ema = dict(zip(self.named_trainable, self.ema.shadow_params)) if self.ema is not None else None
            state = distributed.load_checkpoint(self.dist, path, model=self.transformer, optimizer=self.optimizer,
                                                named_trainable=self.named_trainable, ema=ema)
            if self.ema is not None:
                if "ema" not in state:
                    raise ConfigError(f"checkpoint {path} has no EMA weights but train.ema.enabled is true")
                self.ema.load_state_dict(dict(state["ema"]))  # the shadow weights were loaded in place
            config = Path(path) / "config.yaml"
            self._restore_state(path, state, config.read_text() if config.is_file() else None)
            return
        c = ckpt.load_checkpoint(path, map_location="cpu")
        self._check_state(path, c["state"])
        missing = sorted(set(self.named_trainable) - set(c["weights"]))
        extra = sorted(set(c["weights"]) - set(self.named_trainable))
        if missing or extra:
            raise ConfigError(f"checkpoint {path}: its weights do not match this config's trainable parameters "
                              f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
                              f"{extra[:3]}{'...' if len(extra) > 3 else ''}); resume with the config that wrote it")
        with torch.no_grad():
            for name, p in self.named_trainable.items():
                p.copy_(c["weights"][name].to(p.device, p.dtype))
        self.optimizer.load_state_dict(c["optimizer"])
        state = c["state"]
        if self.ema is not None:
            if c["ema"] is None or "ema" not in state:
                raise ConfigError(f"checkpoint {path} has no EMA weights but train.ema.enabled is true")
            ema_state = dict(state["ema"])
            ema_state["shadow_params"] = [c["ema"][n].to(p.device, p.dtype) for n, p in self.named_trainable.items()]
            self.ema.load_state_dict(ema_state)
        self._restore_state(path, state, c["config_yaml"])

    @staticmethod
    def _check_state(path: Path, state: dict[str, Any]) -> None:
        missing = [key for key in ("rng", "sampler", "optimizer_steps") if key not in state]
        if missing:
            raise ckpt.CheckpointError(f"{Path(path) / 'state.pt'}: not a training state (no {missing})")

    def _restore_state(self, path: Path, state: dict[str, Any], config_yaml: str | None) -> None:
        self._check_state(path, state)
        self.sampler.load_state_dict(state["sampler"])
        rng = state["rng"]
        if self.dist.enabled or int(state.get("world_size", 1)) > 1:
            # rank 0's RNG states (every rank drew the same); the per-GPU CUDA states belong to one
            # machine's devices and the loop draws only from its own generators, so they are skipped
            rng = {key: value for key, value in rng.items() if key != "torch_cuda"}
        ckpt.restore_rng_state(rng, self.generators)
        self.step = int(state["step"])
        self.optimizer_steps = int(state["optimizer_steps"])
        self._warn_config_changes(config_yaml)
        self.console.print(f"resumed from {path} (step {self.step})", highlight=False, soft_wrap=True)

    def _warn_config_changes(self, saved_yaml: str | None) -> None:
        import yaml

        if saved_yaml is None:
            return
        saved = yaml.safe_load(saved_yaml)
        now = yaml.safe_load(self.cfg.to_yaml())
        benign = {"train.max_steps", "train.checkpoint_every", "train.keep_checkpoints"}

        def flat(d, prefix=""):
            out = {}
            for k, v in d.items():
                key = f"{prefix}{k}"
                if isinstance(v, dict):
                    out.update(flat(v, key + "."))
                else:
                    out[key] = v
            return out

        a, b = flat(saved), flat(now)
        changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in benign
                         and not k.startswith(("run.", "eval.", "distributed.")))
        if changed:
            self.console.print(f"[yellow]warning:[/] resuming with a config that differs from the checkpoint's in "
                               f"{changed}; the run will not match an uninterrupted one", highlight=False)

    # ============================================================================================
    # teardown
    # ============================================================================================

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


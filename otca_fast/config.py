"""The trainer's typed configuration: YAML -> pydantic v2 models.

Every section forbids unknown keys, so a typo (``train.max_step``) is an error that names the full
field path instead of a knob that silently keeps its default. Load with :func:`load_config`, which
also applies ``--set a.b.c=value`` overrides (the value is parsed with ``yaml.safe_load``, so
``--set train.kl_beta=0.01`` gives a float and ``--set model.tiny=false`` a bool).

Keys that must exist (no default): ``run.output_dir``, ``run.seed``, ``train.max_steps``,
``train.checkpoint_every``, ``credit.scheme`` and ``rewards``. Every other knob has the default
documented on its field and in ``configs/*.yaml``.

The ``credit`` section mirrors :class:`otca_fast.credit.CreditConfig` field for field (it is
generated from that dataclass, so the two can never drift apart) plus ``scheme``;
:meth:`Config.credit_config` converts it.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from otca_fast.credit import CreditConfig
from otca_fast.credit.schemes import SCHEMES as CREDIT_SCHEMES
from otca_fast.reference import DYNAMICS

__all__ = [
    "Config", "RunConfig", "WandbConfig", "ModelConfig", "DataConfig", "SampleConfig", "SDEConfig", "RewardSpec",
    "TrainConfig", "TimestepConfig", "LoraConfig", "EMAConfig", "OptimizerConfig", "EvalConfig",
    "DistributedConfig", "FSDPConfig",
    "ConfigError", "load_config", "parse_config", "apply_overrides", "credit_section_model", "CREDIT_SCHEMES",
    "reference_markdown",
]

# CREDIT_SCHEMES (imported above) are the schemes of otca_fast.credit.build_advantages, which owns the list;
# `otca` is the default of the example configs, the others are the baselines and ablations it is compared with.
# A rollout needs stochastic (trainable) steps: every dynamics of otca_fast.reference but the deterministic ODE.
ROLLOUT_DYNAMICS = tuple(d for d in DYNAMICS if d != "ode")
# CreditConfig fields that are not in the YAML credit section: each has one source of truth
# elsewhere (see Config.credit_config), so the two can never disagree.
CREDIT_DERIVED = ("dynamics", "noise_level", "objective_weights", "num_steps", "progress", "select_fraction",
                  "select_mode")

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
UnitFloat = Annotated[float, Field(gt=0, le=1)]


class ConfigError(ValueError):
    """A config that cannot be loaded; the message lists every problem with its full field path."""


class _Section(BaseModel):
    # extra="forbid": unknown keys are errors; validate_assignment so --set style edits in code
    # are checked too; frozen would forbid the trainer's own derived values, so it is not used.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ------------------------------------------------------------------------------------------------
# sections
# ------------------------------------------------------------------------------------------------

class WandbConfig(_Section):
    """Weights & Biases beside TensorBoard: the same scalars, the report images and the evaluation clips."""

    project: str = Field("otca_fast", description="wandb project")
    entity: str | None = Field(None, description="wandb entity (team or user; null = your default)")
    mode: Literal["online", "offline", "disabled"] = Field(
        "disabled", description="'online' (needs `wandb login`), 'offline' (written under output_dir/wandb or "
                                "$WANDB_DIR; `wandb sync` later) or 'disabled'")
    tags: list[str] = Field(default_factory=list, description="wandb run tags")


class RunConfig(_Section):
    """Where a run writes and how it reports."""

    output_dir: Path = Field(description="directory of metrics.jsonl, tb/, report/ and checkpoints/ (required)")
    seed: int = Field(description="seeds every random stream of the run (required)")
    device: str = Field("auto", description="'auto' (cuda when available, else cpu), 'cpu', 'cuda' or 'cuda:N'")
    progress: Literal["auto", "rich", "plain", "none"] = Field(
        "auto", description="live progress bars (rich) on a terminal, one line per step otherwise ('auto')")
    log_every: PositiveInt = Field(1, description="print a console line every N steps (metrics.jsonl gets every step)")
    tensorboard: bool = Field(True, description="write TensorBoard events under output_dir/tb")
    plot_every: NonNegativeInt = Field(
        10, description="redraw report/*.png every N steps (0 = only at the end of the run)")
    wandb: WandbConfig = Field(default_factory=WandbConfig)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {v!r}")


class ModelConfig(_Section):
    """The backbone (see otca_fast.models.build_backbone)."""

    family: str = Field("wan2.1", description="backbone family: wan2.1, wan2.2, sd3, flux, shapes (or one added "
                                               "with otca_fast.models.register_backbone)")
    path: Path | None = Field(None, description="local diffusers directory of the pretrained model")
    tiny: bool | dict[str, Any] = Field(
        False, description="build the same classes tiny with random weights (true, or a dict of overrides)")
    allow_download: bool = Field(False, description="allow fetching `path` from the Hugging Face Hub")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the frozen backbone weights (trainable LoRA weights stay float32)")
    attention_backend: str | None = Field(
        None, description="diffusers attention backend: null = torch SDPA, or e.g. 'flash', '_native_flash'")
    offload_text_encoder: bool = Field(
        True, description="after all prompts are embedded (once, cached), move text encoders to the CPU")
    options: dict[str, Any] = Field(default_factory=dict, description="extra keywords for build_backbone")

    @model_validator(mode="after")
    def _source(self) -> ModelConfig:
        if self.path is None and self.tiny is False and self.family != "shapes":
            raise ValueError("model: give model.path (a local diffusers directory) or model.tiny: true "
                             "(random weights, for tests)")
        return self


class DataConfig(_Section):
    """Training and held-out prompts: inline lists or text files (one prompt per line)."""

    prompts: list[str] = Field(default_factory=list, description="training prompts")
    prompt_file: Path | None = Field(None, description="text file of training prompts, one per line")
    eval_prompts: list[str] = Field(default_factory=list, description="held-out evaluation prompts")
    eval_prompt_file: Path | None = Field(None, description="text file of held-out prompts, one per line")
    shuffle: bool = Field(True, description="reshuffle the training prompts every pass over them")

    @model_validator(mode="after")
    def _some_prompts(self) -> DataConfig:
        if not self.prompts and self.prompt_file is None:
            raise ValueError("data: give data.prompts (a list) or data.prompt_file (one prompt per line)")
        for name in ("prompts", "eval_prompts"):
            for i, p in enumerate(getattr(self, name)):
                if not p.strip():
                    raise ValueError(f"data.{name}[{i}]: expected a non-empty prompt, got {p!r}")
        return self


class SDEConfig(_Section):
    """Which rollout steps are stochastic (SDE, trainable) and which are deterministic (ODE)."""

    mode: Literal["all", "fraction", "window"] = Field(
        "all", description="'all' steps SDE; the first `fraction` of steps; or a random window (Flow-GRPO-Fast)")
    fraction: UnitFloat = Field(1.0, description="mode=fraction: share of the (high-noise) first steps that are SDE")
    window_size: PositiveInt = Field(2, description="mode=window: number of consecutive SDE steps")
    window_range: tuple[NonNegativeInt, PositiveInt] | None = Field(
        None, description="mode=window: [lo, hi) the window must lie in (default [0, num_steps // 2])")


class SampleConfig(_Section):
    """Rollout: per prompt a group of `group_size` samples."""

    height: PositiveInt = Field(16, description="frame height in pixels")
    width: PositiveInt = Field(16, description="frame width in pixels")
    num_frames: PositiveInt = Field(1, description="frames per clip (1 = image; Wan wants 4k+1)")
    num_steps: Annotated[int, Field(ge=2)] = Field(10, description="denoising steps of a training rollout")
    group_size: Annotated[int, Field(ge=2)] = Field(4, description="samples per prompt (the GRPO group, G)")
    prompts_per_step: PositiveInt = Field(2, description="groups (prompts) per training step")
    batch_size: PositiveInt = Field(
        4, description="samples per transformer forward in rollout AND training (equal, so the first ratio is 1)")
    guidance_scale: Annotated[float, Field(ge=1.0)] = Field(
        1.0, description="CFG scale; 1 = no CFG (cond only); > 1 batches cond + uncond in one forward")
    negative_prompt: str = Field("", description="the unconditional prompt of CFG")
    dynamics: Literal[ROLLOUT_DYNAMICS] = Field(
        "flow_sde", description="SDE of the stochastic steps (ops.sde_step)")
    noise_level: PositiveFloat = Field(0.7, description="a (flow_sde, cps) or eta (dance_sde) of the SDE")
    same_noise: bool = Field(False, description="the samples of a group share their initial noise x_T")
    sde: SDEConfig = Field(default_factory=SDEConfig)
    latent_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype of the stored trajectory (float32: rollout and training log-probs agree)")
    async_rewards: bool = Field(True, description="score a chunk's rewards in a thread while the next chunk samples")

    @model_validator(mode="after")
    def _check(self) -> SampleConfig:
        if self.dynamics == "cps" and self.noise_level > 1:
            raise ValueError(f"sample.noise_level: cps needs 0 < noise_level <= 1, got {self.noise_level}")
        if self.sde.mode == "window":
            lo, hi = self.sde.window_range or (0, self.num_steps // 2)
            if not lo + self.sde.window_size <= hi <= self.num_steps:
                raise ValueError(f"sample.sde.window_range: expected lo + window_size <= hi <= num_steps "
                                 f"({self.num_steps}), got [{lo}, {hi}) with window_size {self.sde.window_size}")
        return self


def logged_name(spec: RewardSpec | MetricSpec) -> str:
    """The name a reward or metric is logged under: its own, or for ``remote`` the served reward's."""
    if spec.name == "remote" and isinstance(spec.options.get("reward"), str):
        return spec.options["reward"]
    return spec.name


def _non_empty_name(kind: str, v: str) -> str:
    if not v.strip():
        raise ValueError(f"expected a {kind} name, got an empty string")
    return v


class RewardSpec(_Section):
    """One reward: a registry name or a dotted path 'package.module:callable'."""

    name: str = Field(description="registry name (otca_fast.rewards.list_rewards()) or 'pkg.module:callable'")
    weight: float = Field(1.0, description="objective weight in the mix of per-reward advantages")
    options: dict[str, Any] = Field(default_factory=dict, description="keywords for the reward's factory")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _non_empty_name("reward", v)


class MetricSpec(_Section):
    """One held-out metric that is never trained on: a registry name (a reward, or an eval-only metric such
    as ``shapes_exam``) or a dotted path 'package.module:callable'."""

    name: str = Field(description="registry name (otca_fast.rewards.list_rewards() / list_metrics()) or "
                                  "'pkg.module:callable'")
    options: dict[str, Any] = Field(default_factory=dict, description="keywords for the metric's factory")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _non_empty_name("metric", v)


class TimestepConfig(_Section):
    """Which SDE steps are trained (the last denoising step never is, see train.skip_last_step)."""

    mode: Literal["all", "fraction", "window", "credit"] = Field(
        "all", description="'all' SDE steps; a random `fraction` per sample (DanceGRPO); a `window`; or "
                           "credit-guided select_timesteps, whose weights multiply the per-step loss")
    fraction: UnitFloat = Field(0.6, description="mode=fraction/credit: share of the trainable steps per sample")
    window_start: NonNegativeInt = Field(0, description="mode=window: first trained step (among trainable steps)")
    window_size: PositiveInt = Field(2, description="mode=window: number of trained steps")
    select_mode: Literal["importance", "topk"] = Field(
        "importance", description="mode=credit: sample steps by credit with unbiasing weights, or the top-k")


class LoraConfig(_Section):
    rank: PositiveInt = Field(32, description="LoRA rank r")
    alpha: PositiveFloat = Field(64.0, description="LoRA alpha (scale alpha / r)")
    dropout: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.0, description="LoRA dropout (keep 0: dropout makes the training log-prob differ from the rollout's)")
    init: Literal["gaussian", "default"] = Field("gaussian", description="peft init_lora_weights (B = 0 either way)")
    target_modules: list[str] | None = Field(
        None, description="peft target module names (null = the backbone's lora_target_modules())")


class EMAConfig(_Section):
    enabled: bool = Field(True, description="keep an EMA of the trainable weights (used for evaluation)")
    decay: Annotated[float, Field(ge=0, lt=1)] = Field(0.9, description="EMA decay (Flow-GRPO: 0.9)")
    update_every: PositiveInt = Field(8, description="update the EMA every N optimizer steps (Flow-GRPO: 8)")


class TailMatchingConfig(_Section):
    """Advantage-weighted flow matching on the ODE tail: the steps after the SDE window have no log-probability,
    so GRPO never trains them, yet the shared LoRA weights change them. This term gives them a gradient: each
    sample's final clip x0 is noised afresh to a tail step's σ, x = (1 − σ)·x0 + σ·ε, and the velocity is
    regressed on ε − x0 with the sample's advantage as the weight (reward-weighted regression on the policy's own
    clips; with ``positive_only`` the clips worse than their group's mean get no weight)."""

    weight: NonNegativeFloat = Field(0.0, description="weight of the term beside the GRPO loss (0 = off)")
    positive_only: bool = Field(True, description="weights max(A, 0): pull towards the better clips only (a "
                                                  "negative weight on a squared error has no bound)")


class TrainConfig(_Section):
    max_steps: PositiveInt = Field(description="training steps (one step = one rollout batch) (required)")
    checkpoint_every: PositiveInt = Field(description="write a checkpoint every N steps (required)")
    keep_checkpoints: PositiveInt = Field(3, description="keep the last N checkpoints")
    finetune: Literal["lora", "full"] = Field("lora", description="LoRA adapters (peft) or all transformer weights")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    updates_per_step: PositiveInt = Field(
        1, description="optimizer updates per rollout batch (the samples are split in this many parts)")
    inner_epochs: PositiveInt = Field(1, description="passes over each rollout batch")
    timesteps: TimestepConfig = Field(default_factory=TimestepConfig)
    skip_last_step: bool = Field(
        True, description="never train the last denoising step (sigma -> 0: its likelihood overflows)")
    clip_range: PositiveFloat = Field(1e-4, description="PPO clip epsilon of the ratio")
    kl_beta: NonNegativeFloat = Field(0.0, description="weight of the KL to the reference policy (0 = off)")
    kl_reference: Literal["auto", "adapter", "copy"] = Field(
        "auto", description="reference: LoRA adapter disabled ('adapter') or a frozen copy ('copy'); "
                            "'auto' = adapter for LoRA, copy for full fine-tuning")
    max_grad_norm: PositiveFloat = Field(1.0, description="gradient clipping norm")
    mixed_precision: Literal["auto", "no", "bf16"] = Field(
        "auto", description="bf16 autocast of the transformer; 'auto' = bf16 on CUDA, off on CPU")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (saves memory)")
    compile: bool = Field(False, description="torch.compile the transformer")
    ema: EMAConfig = Field(default_factory=EMAConfig)
    tail_matching: TailMatchingConfig = Field(default_factory=TailMatchingConfig)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.kl_reference == "adapter" and self.finetune == "full":
            raise ValueError("train.kl_reference: 'adapter' needs train.finetune: lora (full fine-tuning has "
                             "no adapter to disable; use 'copy' or 'auto')")
        return self


class OptimizerConfig(_Section):
    name: Literal["adamw", "adamw8bit"] = Field("adamw", description="AdamW, or bitsandbytes' 8-bit AdamW")
    lr: PositiveFloat = Field(3e-4, description="learning rate (Flow-GRPO LoRA: 3e-4)")
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.999), description="Adam betas")
    weight_decay: NonNegativeFloat = Field(1e-4, description="decoupled weight decay")
    eps: PositiveFloat = Field(1e-8, description="Adam epsilon")


class EvalConfig(_Section):
    """Periodic evaluation on held-out prompts with the EMA weights and deterministic (ODE) sampling."""

    enabled: bool = Field(True, description="evaluate (needs data.eval_prompts or data.eval_prompt_file)")
    every: NonNegativeInt = Field(0, description="evaluate every N steps (0 = only at the start and the end)")
    num_steps: PositiveInt | None = Field(None, description="ODE steps (null = sample.num_steps)")
    samples_per_prompt: PositiveInt = Field(1, description="clips per held-out prompt")
    seed: int = Field(1234, description="fixed seed of the evaluation noise (the same clips every time)")
    guidance_scale: Annotated[float, Field(ge=1.0)] | None = Field(
        None, description="CFG scale of evaluation (null = sample.guidance_scale)")
    save_clips: bool = Field(True, description="write GIF and MP4 clips under report/clips/")
    max_clips: PositiveInt = Field(4, description="clips written per evaluation")
    fps: PositiveInt = Field(8, description="frame rate of the written clips")
    sheet_rows: NonNegativeInt = Field(
        0, description="report/exam_sheet.png at every evaluation: base vs current clips from the same noise for the "
                       "held-out prompts whose headline eval metric changed most, this many rows (0 = off; keeps "
                       "three frames of every evaluation clip in memory; single-process runs)")
    metrics: list[MetricSpec] = Field(
        default_factory=list, description="held-out metrics never trained on, logged as eval/metric/<name>: list of "
                                          "{name, options} (a reward, an eval-only metric or 'pkg.module:callable')")
    confidence: Annotated[float, Field(gt=0.5, lt=1.0)] = Field(
        0.9, description="level of the bootstrap intervals (over prompts) of every change from the first "
                         "evaluation; a trained reward rising while an eval metric falls, both beyond them, is "
                         "reported as possible reward hacking")

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: list[MetricSpec]) -> list[MetricSpec]:
        names = [logged_name(m) for m in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"each metric may appear once (it is logged by name), got duplicates {dup}")
        return v


class FSDPConfig(_Section):
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) options of ``distributed.strategy: fsdp``."""

    reshard_after_forward: bool = Field(
        True, description="free the gathered weights of a block after its forward (saves memory; they are "
                          "gathered again for backward); false keeps them until backward")
    cpu_offload: bool = Field(
        False, description="keep the sharded weights, gradients and optimizer state in CPU memory "
                           "(CPUOffloadPolicy; the optimizer step runs on the CPU)")
    param_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="MixedPrecisionPolicy.param_dtype: dtype of the gathered weights and of the "
                          "forward/backward compute (null = the weights' own dtype)")
    reduce_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="MixedPrecisionPolicy.reduce_dtype: dtype of the gradient reduce-scatter "
                          "(null = param_dtype; float32 keeps the reduction exact over many ranks)")


class DistributedConfig(_Section):
    """Scale-out with torchrun: how the transformer is replicated or sharded over the ranks.

    Read only when the run is launched with more than one process (``torchrun --nproc_per_node N``);
    a single process ignores it. The global batch per step is always sample.prompts_per_step x
    sample.group_size samples, split into equal contiguous shares, one per rank.
    """

    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="'ddp': every rank holds the whole transformer, gradients are averaged once per "
                            "optimizer update; 'fsdp': FSDP2 fully_shard per transformer block (weights, "
                            "gradients and optimizer state sharded); 'auto' = fsdp for a transformer of at "
                            "least 1B parameters, or fully fine-tuned with at least 100M, ddp otherwise")
    fsdp: FSDPConfig = Field(default_factory=FSDPConfig)
    timeout_s: PositiveFloat = Field(
        1800.0, description="process-group timeout of every collective (seconds): a rank that stops answering "
                            "ends the job after this long instead of hanging it")


# ------------------------------------------------------------------------------------------------
# the credit section, generated from otca_fast.credit.CreditConfig
# ------------------------------------------------------------------------------------------------

def _attribute_docstrings(cls: type) -> dict[str, str]:
    """The docstring under each annotated attribute of ``cls`` (PEP 257 attribute docstrings)."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


@functools.cache
def credit_section_model() -> type[BaseModel]:
    """A pydantic model with ``scheme`` plus one field per field of ``CreditConfig`` (same defaults)."""
    hints = typing.get_type_hints(CreditConfig)
    docs = _attribute_docstrings(CreditConfig)
    fields: dict[str, Any] = {
        "scheme": (Literal[CREDIT_SCHEMES], Field(description="credit scheme of build_advantages (required)")),
    }
    for f in dataclasses.fields(CreditConfig):
        if f.name in CREDIT_DERIVED:
            continue
        doc = docs.get(f.name)
        if f.default is not dataclasses.MISSING:
            default = Field(f.default, description=doc)
        elif f.default_factory is not dataclasses.MISSING:
            default = Field(default_factory=f.default_factory, description=doc)
        else:
            default = Field(description=doc)
        fields[f.name] = (hints[f.name], default)

    def _to_dataclass(self):
        # CreditConfig validates its own ranges; raising here makes pydantic report it under `credit`
        try:
            CreditConfig(**self.model_dump(exclude={"scheme"}))
        except TypeError as e:  # pydantic only turns ValueError/AssertionError into field errors
            raise ValueError(str(e)) from None
        return self

    return create_model(
        "CreditSection", __config__=ConfigDict(extra="forbid", validate_assignment=True),
        __validators__={"_credit_config": model_validator(mode="after")(_to_dataclass)}, **fields)


# ------------------------------------------------------------------------------------------------
# the root
# ------------------------------------------------------------------------------------------------

class Config(_Section):
    """A whole training run."""

    run: RunConfig
    model: ModelConfig
    data: DataConfig
    sample: SampleConfig = Field(default_factory=SampleConfig)
    credit: Any  # validated against credit_section_model() in _credit below
    rewards: list[RewardSpec] = Field(description="the objectives: list of {name, weight, options} (required)")
    train: TrainConfig
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @field_validator("credit", mode="before")
    @classmethod
    def _credit(cls, v: Any) -> Any:
        section = credit_section_model()
        if isinstance(v, section):
            return v
        if not isinstance(v, dict):
            raise ValueError(f"expected a mapping with at least `scheme`, got {type(v).__name__}")
        return section.model_validate(v)

    @field_validator("rewards")
    @classmethod
    def _rewards(cls, v: list[RewardSpec]) -> list[RewardSpec]:
        if not v:
            raise ValueError("expected at least one reward ({name, weight, options})")
        names = [logged_name(r) for r in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"each reward may appear once (metrics are keyed by name), got duplicates {dup}")
        return v

    @model_validator(mode="after")
    def _cross(self) -> Config:
        if self.model.family == "wan2.1" or self.model.family == "wan2.2":
            if (self.sample.num_frames - 1) % 4 != 0:
                raise ValueError(f"sample.num_frames: Wan needs 4k+1 frames, got {self.sample.num_frames}")
            if self.sample.height % 16 or self.sample.width % 16:
                raise ValueError(f"sample.height/width: Wan needs multiples of 16, got "
                                 f"{self.sample.height}x{self.sample.width}")
        if self.eval.enabled and not self.data.eval_prompts and self.data.eval_prompt_file is None:
            raise ValueError("data.eval_prompts: evaluation is on (eval.enabled) but there are no held-out prompts; "
                             "give data.eval_prompts / data.eval_prompt_file or set eval.enabled: false")
        trained = sorted({logged_name(r) for r in self.rewards} & {logged_name(m) for m in self.eval.metrics})
        if trained:
            raise ValueError(f"eval.metrics: {trained} {'is' if len(trained) == 1 else 'are'} also under rewards:; an "
                             f"eval metric is a judge the trainer never optimises (trained rewards are evaluated "
                             f"as eval/reward/<name> already)")
        if sum(abs(r.weight) for r in self.rewards) == 0:
            raise ValueError("rewards: every weight is 0; at least one objective must carry weight")
        s = self.sample
        scheme = self.credit.scheme
        if scheme in ("dance", "window") and self.train.timesteps.mode != "all":
            raise ValueError(f"train.timesteps.mode: credit scheme {scheme!r} chooses its own trained steps "
                             f"(credit.{'dance_fraction' if scheme == 'dance' else 'window_size'}); keep "
                             f"train.timesteps.mode: all, got {self.train.timesteps.mode!r}")
        if scheme == "window" and s.sde.mode != "all":
            raise ValueError(f"sample.sde.mode: credit scheme 'window' makes its window the SDE steps (ODE "
                             f"elsewhere, credit.window_size / window_range / window_schedule); keep "
                             f"sample.sde.mode: all, got {s.sde.mode!r}")
        if s.sde.mode == "window" and self.train.skip_last_step:
            lo, hi = s.sde.window_range or (0, s.num_steps // 2)
            if hi >= s.num_steps:
                raise ValueError(f"sample.sde.window_range: with train.skip_last_step the window must end before "
                                 f"the last step (hi <= {s.num_steps - 1}), got hi = {hi}")
        all_sde = (s.sde.mode == "all" and scheme != "window") or (s.sde.mode == "fraction" and s.sde.fraction >= 1)
        if self.train.tail_matching.weight > 0 and all_sde:
            raise ValueError("train.tail_matching: the SDE covers every denoising step, so there is no ODE tail to "
                             "train; use sample.sde.mode: fraction (< 1) or window, or tail_matching.weight: 0")
        trainable = self.num_trainable_steps()
        if trainable < 1:
            raise ValueError("sample.sde: no trainable SDE step is left (the last step is never trained); "
                             "raise sample.sde.fraction or sample.num_steps")
        ts = self.train.timesteps
        if ts.mode == "window" and ts.window_start + ts.window_size > trainable:
            raise ValueError(f"train.timesteps: window [{ts.window_start}, {ts.window_start + ts.window_size}) "
                             f"exceeds the {trainable} trainable SDE steps")
        return self

    def num_trainable_steps(self) -> int:
        """SDE steps of a rollout that may be trained: the last denoising step is excluded when
        ``train.skip_last_step`` (σ' = 0 makes its Gaussian likelihood overflow, Flow-GRPO #62)."""
        s = self.sample
        if self.credit.scheme == "window":
            # the credit window is the SDE window; it may end on the last step, which is not trained
            return self.credit.window_size - (1 if self.train.skip_last_step and self.credit.window_size > 1
                                               else 0)
        if s.sde.mode == "all":
            n, includes_last = s.num_steps, True
        elif s.sde.mode == "fraction":
            n = max(1, round(s.sde.fraction * s.num_steps))
            includes_last = n == s.num_steps
        else:
            n, includes_last = s.sde.window_size, False  # validated above to end before the last step
        return n - 1 if (includes_last and self.train.skip_last_step) else n

    def credit_config(self, *, num_steps: int | None = None):
        """The ``otca_fast.credit.CreditConfig`` of this run.

        The credit section gives every CreditConfig field except the ones that have a single source
        of truth elsewhere in the config (:data:`CREDIT_DERIVED`): ``dynamics`` and ``noise_level``
        come from ``sample``, ``objective_weights`` from the ``rewards`` weights (normalised so their
        absolute values sum to 1), ``num_steps`` from ``sample.num_steps``, ``select_fraction`` and
        ``select_mode`` from ``train.timesteps`` (mode ``credit``); ``progress`` is passed per step
        by the trainer.
        """
        weights = [r.weight for r in self.rewards]
        total = sum(abs(w) for w in weights)
        return CreditConfig(**self.credit.model_dump(exclude={"scheme"}), dynamics=self.sample.dynamics,
                            noise_level=self.sample.noise_level, num_steps=num_steps or self.sample.num_steps,
                            objective_weights=tuple(w / total for w in weights),
                            select_fraction=self.train.timesteps.fraction if self.train.timesteps.mode == "credit"
                            else None, select_mode=self.train.timesteps.select_mode)

    def to_yaml(self) -> str:
        """The resolved config (defaults filled in) as YAML that :func:`parse_config` reads back."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------

def _loc(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith("function-") or part in ("constrained-str",):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


_LEADING_PATH = re.compile(r"^([A-Za-z_][\w.\[\]/]*): (.*)$", re.S)


def format_validation_error(err: ValidationError, source: str) -> str:
    """Every problem of a pydantic error on its own line, prefixed with its full field path."""
    lines = [f"invalid config {source}: {err.error_count()} problem(s)"]
    for e in err.errors(include_url=False):
        path = _loc(e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not a field of this section; check the spelling against configs/*.yaml)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif e["type"] == "value_error":
            # our validators (and CreditConfig's) start their message with the field they are about:
            # a full path ("sample.noise_level: ...") or a field of the section ("window_size: ...")
            msg = msg.removeprefix("Value error, ")
            m = _LEADING_PATH.match(msg)
            if m:
                lead, rest = m.groups()
                if path == "<root>" or lead.startswith(path + ".") or lead == path:
                    path, msg = lead, rest
                elif "." not in lead:
                    path, msg = f"{path}.{lead}", rest
        shown = e.get("input")
        got = "" if e["type"] in ("missing", "extra_forbidden", "value_error") or isinstance(shown, dict) \
            else f" (got {shown!r})"
        lines.append(f"  {path}: {msg}{got}")
    return "\n".join(lines)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides to a nested dict (in place); values go through yaml.safe_load.

    A list element is addressed by its index: ``rewards.0.weight=2``.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set: expected key.path=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"--set: expected a dotted key like train.max_steps, got {key!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: the value {raw!r} is not valid YAML ({e})") from None
        parts = key.split(".")
        node: Any = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[:depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {key}: {'.'.join(parts[:depth]) or '<root>'} is a list of "
                                      f"{len(node)}; expected an index below {len(node)}, got {part!r}")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise ConfigError(f"--set {key}: {where.rsplit('.', 1)[0]} is a {type(node).__name__}, "
                                  f"not a section")
    return data


def parse_config(data: Any, *, source: str = "<dict>") -> Config:
    """Validate a nested dict (e.g. from YAML) into a :class:`Config`; errors list full field paths."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: expected a YAML mapping at the top level, "
                          f"got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p} (give a YAML file such as configs/tiny_video.yaml)")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config {p} is not valid YAML: {e}") from None
    if data is None:
        raise ConfigError(f"config {p} is empty")
    return data


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config, apply ``--set`` overrides, validate. Raises :class:`ConfigError`."""
    data = read_yaml(path)
    apply_overrides(data, overrides)
    return parse_config(data, source=str(path))


# ------------------------------------------------------------------------------------------------
# the config reference (docs/trainer.md is generated from this, so it cannot drift from the models)
# ------------------------------------------------------------------------------------------------

def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in typing.get_args(annotation))
    if origin is Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin in (list, tuple, dict):
        args = ", ".join(_type_name(a) if a is not Ellipsis else "..." for a in typing.get_args(annotation))
        return f"{origin.__name__}[{args}]"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "{" + ", ".join(annotation.model_fields) + "}"
    return getattr(annotation, "__name__", str(annotation))


def reference_markdown() -> str:
    """One markdown table per config section: key, type, default, meaning."""
    from pydantic_core import PydanticUndefined

    sections: list[tuple[str, type[BaseModel]]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        sections.append((prefix, model))
        for name, field in model.model_fields.items():
            ann = credit_section_model() if (model is Config and name == "credit") else field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")

    walk(Config, "")
    sections.insert(1, ("rewards[].", RewardSpec))
    out = []
    for prefix, model in sections:
        rows = []
        for name, field in model.model_fields.items():
            ann = credit_section_model() if (model is Config and name == "credit") else field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                continue
            if field.is_required():
                default = "**required**"
            elif field.default_factory is not None:
                default = f"`{field.default_factory()!r}`"
            else:
                default = f"`{field.default!r}`" if field.default is not PydanticUndefined else ""
            desc = (field.description or "").replace("``", "`").replace("|", "\\|")
            rows.append(f"| `{prefix}{name}` | {_type_name(ann)} | {default} | {desc} |")
        if rows:
            title = prefix.rstrip(".") or "top level"
            out.append(f"#### `{title}`\n\n| key | type | default | meaning |\n|---|---|---|---|\n" + "\n".join(rows))
    return "\n\n".join(out) + "\n"

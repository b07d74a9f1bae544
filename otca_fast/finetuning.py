"""What is trained and against what: LoRA adapters or the full transformer, the KL reference, the optimizer."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch

from otca_fast.config import ConfigError

__all__ = ["FineTuning", "adapters_disabled", "add_lora_adapters", "build_ema", "build_optimizer", "setup_finetuning"]


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


@dataclass
class FineTuning:
    """The trainable parameters by name, and the KL reference policy.

    ``kl_mode``: None (no KL term), ``"adapter"`` (the transformer with its LoRA adapters switched off) or
    ``"copy"`` (``reference``, a frozen copy of the transformer taken before training)."""

    named_trainable: dict[str, torch.nn.Parameter]
    reference: torch.nn.Module | None
    kl_mode: str | None


def setup_finetuning(backbone, train) -> FineTuning:
    """Freeze the backbone; add LoRA adapters (peft) or unfreeze the transformer; build the KL reference.

    ``train`` is the config's ``train`` section."""
    tr = backbone.transformer
    tr.requires_grad_(False)
    # eval mode throughout: the policy must be the same function in rollout and training
    # (dropout would make the training log-prob differ from the rollout's, so ratio != 1)
    tr.eval()
    reference = train.kl_reference
    if reference == "auto":
        reference = "adapter" if train.finetune == "lora" else "copy"
    ref_transformer = None
    if train.kl_beta > 0 and reference == "copy":  # copied before adapters exist: the pretrained policy
        ref_transformer = copy.deepcopy(tr).requires_grad_(False).eval()
    if train.finetune == "lora":
        add_lora_adapters(backbone, train.lora)
    else:
        tr.requires_grad_(True)
    if train.gradient_checkpointing:
        if not hasattr(tr, "enable_gradient_checkpointing"):
            raise ConfigError(f"train.gradient_checkpointing: {type(tr).__name__} has no "
                              f"enable_gradient_checkpointing()")
        tr.enable_gradient_checkpointing()
    if train.compile:
        tr.compile()
    named = {n: p for n, p in tr.named_parameters() if p.requires_grad}
    if not named:
        raise ConfigError("train: nothing to train (no parameter requires grad after the fine-tuning set-up)")
    return FineTuning(named, ref_transformer, reference if train.kl_beta > 0 else None)


def build_optimizer(params: list[torch.nn.Parameter], o) -> torch.optim.Optimizer:
    """AdamW (or bitsandbytes' 8-bit AdamW) over ``params`` from the config's ``optimizer`` section ``o``."""
    kwargs = dict(lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps)
    if o.name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("optimizer.name: adamw8bit needs bitsandbytes (pip install bitsandbytes, CUDA "
                              "only); or use optimizer.name: adamw") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def build_ema(params: list[torch.nn.Parameter], ema):
    """The exponential moving average (diffusers' EMAModel) of ``params`` from the config's ``train.ema``; None when
    it is off. Evaluations use the EMA weights."""
    if not ema.enabled:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=ema.decay)

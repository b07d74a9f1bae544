"""Text side of the backbones: offline tokenizers and tiny text encoders for tiny builds, and the
per-prompt embedding cache.

Tiny builds must not touch the Hugging Face Hub, so their tokenizer is a byte-level BPE with no
merges built in code with ``tokenizers`` (every UTF-8 byte is one token; 256 byte tokens plus four
specials), wrapped in ``transformers.PreTrainedTokenizerFast`` so the diffusers pipelines call it
exactly as they call T5/CLIP tokenizers. Text encoders are the real transformers classes (UMT5, T5,
CLIP) built from small configs whose ``vocab_size`` matches that tokenizer, in eval mode: a model
built from a config starts in training mode and T5 dropout would make embeddings random.

The cache embeds each distinct prompt string once (DanceGRPO precomputes embeddings the same way,
so the text encoder can leave the GPU during RL).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from otca_fast import checks
from otca_fast.models.embeds import PromptEmbeds

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import PreTrainedTokenizerFast

__all__ = ["byte_tokenizer", "tiny_umt5", "tiny_t5", "tiny_clip", "PromptCache", "BYTE_SPECIALS"]

#: id of each special token of :func:`byte_tokenizer` (the byte alphabet follows them)
BYTE_SPECIALS = {"<pad>": 0, "</s>": 1, "<unk>": 2, "<s>": 3}


def byte_tokenizer(*, style: str = "t5", model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """A file-free byte-level tokenizer (260 ids) in the style of T5 (``text </s>``) or CLIP
    (``<s> text </s>``). ``model_max_length`` is what pipelines pad CLIP-style prompts to."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if style not in ("t5", "clip"):
        raise ValueError(f"style: expected 't5' or 'clip', got {style!r}")
    checks.int_at_least("model_max_length", model_max_length, 2)
    vocab = dict(BYTE_SPECIALS)
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    eos = ("</s>", BYTE_SPECIALS["</s>"])
    if style == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[eos])
    else:
        bos = ("<s>", BYTE_SPECIALS["<s>"])
        tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> $B </s>",
                                                           special_tokens=[bos, eos])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   bos_token="<s>", model_max_length=model_max_length)


def _vocab_size() -> int:
    return len(BYTE_SPECIALS) + 256


def _t5_kwargs(overrides: dict[str, Any]) -> dict[str, Any]:
    # the hf-internal-testing/tiny-random-t5 config diffusers' pipeline tests use, with our vocabulary
    kw = dict(d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2, relative_attention_num_buckets=8,
              feed_forward_proj="relu", vocab_size=_vocab_size(), pad_token_id=BYTE_SPECIALS["<pad>"],
              eos_token_id=BYTE_SPECIALS["</s>"], decoder_start_token_id=0, layer_norm_epsilon=1e-6,
              dropout_rate=0.0)
    kw.update(overrides)
    return kw


def tiny_umt5(**overrides: Any) -> torch.nn.Module:
    """A small ``UMT5EncoderModel`` (Wan's text encoder class), eval mode, random weights."""
    from transformers import UMT5Config, UMT5EncoderModel
    return UMT5EncoderModel(UMT5Config(**_t5_kwargs(overrides))).eval()


def tiny_t5(**overrides: Any) -> torch.nn.Module:
    """A small ``T5EncoderModel`` (SD3's and FLUX's long-prompt encoder), eval mode, random weights."""
    from transformers import T5Config, T5EncoderModel
    return T5EncoderModel(T5Config(**_t5_kwargs(overrides))).eval()


def tiny_clip(*, with_projection: bool, **overrides: Any) -> torch.nn.Module:
    """A small CLIP text encoder: ``CLIPTextModelWithProjection`` (SD3) or ``CLIPTextModel`` (FLUX).

    ``eos_token_id`` is the byte tokenizer's ``</s>`` so the pooled output is taken at the end-of-text
    token, as in real CLIP.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    kw = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32,
              vocab_size=_vocab_size(), max_position_embeddings=77, layer_norm_eps=1e-5, hidden_act="gelu",
              bos_token_id=BYTE_SPECIALS["<s>"], eos_token_id=BYTE_SPECIALS["</s>"],
              pad_token_id=BYTE_SPECIALS["<pad>"])
    kw.update(overrides)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(CLIPTextConfig(**kw)).eval()


class PromptCache:
    """Embeddings per prompt string, stored once and assembled into batches on request.

    ``get(prompts, encode)`` calls ``encode(missing_prompts) -> {name: [M, ...] tensor}`` for the
    distinct prompts not cached yet (one batched call), stores each row detached on ``device``, and
    returns the batch for ``prompts`` in order. ``hits``/``misses`` count prompt look-ups.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self._rows: dict[str, dict[str, torch.Tensor]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, prompt: object) -> bool:
        return prompt in self._rows

    def clear(self) -> None:
        self._rows.clear()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for row in self._rows.values() for t in row.values())

    def get(self, prompts: list[str], encode: Callable[[list[str]], dict[str, torch.Tensor]]) -> PromptEmbeds:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._rows))
        self.misses += len(missing)
        self.hits += len(prompts) - len(missing)
        if missing:
            batch = encode(missing)
            if not isinstance(batch, dict) or not batch:
                raise TypeError(f"encode: expected a non-empty dict name -> [M, ...] tensor, got {type(batch)}")
            for name, t in batch.items():
                if not isinstance(t, torch.Tensor) or t.dim() < 1 or t.shape[0] != len(missing):
                    shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(f"encode: tensor {name!r} must have {len(missing)} rows (one per new prompt), "
                                     f"got {shape}")
                if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
                    bad = [missing[i] for i in range(len(missing)) if not bool(torch.isfinite(t[i]).all())]
                    raise ValueError(f"encode: non-finite values in {name!r} for prompt(s) {bad[:3]!r}")
            for i, p in enumerate(missing):
                self._rows[p] = {k: t[i:i + 1].detach().to(self.device) for k, t in batch.items()}
        names = list(self._rows[prompts[0]])
        return PromptEmbeds({k: torch.cat([self._rows[p][k] for p in prompts]) for k in names})

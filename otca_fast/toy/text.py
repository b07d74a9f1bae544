"""Text conditioning for the shapes world that needs no download.

* Tokenizer: a byte-level BPE built in code with ``tokenizers``. Its merges are learnt from the grammar's
  own words, so every grammar word is one token, while any other string still encodes (it falls back to
  its bytes). The trained tokenizer ships next to the weights (``assets/tokenizer.json``): the embedding
  rows are indexed by its ids, so it must not drift with a ``tokenizers`` upgrade.
* Encoder: a small ``transformers`` ``UMT5EncoderModel`` (the encoder family Wan uses), trained jointly
  with the base transformer by ``otca_fast.toy.pretrain``.

Embeddings follow the Wan pipeline's convention: the encoder's hidden states for the real tokens, zeros
for the padding positions up to ``max_sequence_length`` (``WanPipeline._get_t5_prompt_embeds``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import UMT5Config, UMT5EncoderModel

from otca_fast import checks
from otca_fast.toy.world import BACKGROUNDS, COLOURS, DIRECTIONS, SHAPES

__all__ = ["PAD_TOKEN", "EOS_TOKEN", "grammar_words", "build_tokenizer", "load_tokenizer",
           "DEFAULT_TEXT_ENCODER", "build_text_encoder", "tokenize", "encode_text"]

PAD_TOKEN = "<pad>"
EOS_TOKEN = "</s>"
# a small T5 encoder: 2 layers, width 64, relative position buckets sized to ~12-token prompts
DEFAULT_TEXT_ENCODER: dict = {
    "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4,
    "relative_attention_num_buckets": 8, "relative_attention_max_distance": 32,
    "feed_forward_proj": "gated-gelu", "dropout_rate": 0.0, "layer_norm_epsilon": 1e-6,
}


def grammar_words() -> list[str]:
    """Every word the world's prompt grammar can produce."""
    return [*COLOURS, *SHAPES, *DIRECTIONS, *BACKGROUNDS, "a", "moving", "on", "background"]


def build_tokenizer() -> Tokenizer:
    """Train the byte-level BPE on the grammar words (deterministic; no files, no download)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, min_frequency=1, show_progress=False,
                                  special_tokens=[PAD_TOKEN, EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([" ".join(grammar_words())], trainer=trainer)
    # an end-of-sequence token after every prompt (T5 convention), so the empty prompt is one token
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}", special_tokens=[(EOS_TOKEN, tokenizer.token_to_id(EOS_TOKEN))])
    return tokenizer


def load_tokenizer(json_text: str) -> Tokenizer:
    """A tokenizer from its serialised JSON (``Tokenizer.to_str()``)."""
    if not isinstance(json_text, str):
        raise TypeError(f"json_text: expected a str, got {type(json_text).__name__}")
    tokenizer = Tokenizer.from_str(json_text)
    for special in (PAD_TOKEN, EOS_TOKEN):
        if tokenizer.token_to_id(special) is None:
            raise ValueError(f"json_text: the tokenizer has no {special!r} token; it is not a shapes tokenizer")
    return tokenizer


def build_text_encoder(vocab_size: int, **overrides) -> UMT5EncoderModel:
    """A randomly initialised encoder of :data:`DEFAULT_TEXT_ENCODER` (``overrides`` replace fields)."""
    checks.int_at_least("vocab_size", vocab_size, 2)
    fields = {**DEFAULT_TEXT_ENCODER, **overrides}
    config = UMT5Config(vocab_size=vocab_size, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                        is_encoder_decoder=False, use_cache=False, **fields)
    # eval(): a model built from config starts in training mode, and dropout would make encodings
    # non-deterministic (pretraining switches it to train() itself)
    return UMT5EncoderModel(config).eval()


def tokenize(tokenizer: Tokenizer, prompts: Sequence[str], max_length: int,
             device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [B, max_length], attention_mask [B, max_length])``; longer prompts are truncated."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts: expected a list of str")
    if len(prompts) == 0:
        raise ValueError("prompts: expected at least one prompt, got an empty list")
    if max_length < 1:
        raise ValueError(f"max_length: expected >= 1, got {max_length}")
    pad_id = tokenizer.token_to_id(PAD_TOKEN)
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    ids = torch.full((len(prompts), max_length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), max_length), dtype=torch.long)
    for row, encoding in enumerate(tokenizer.encode_batch(list(prompts))):
        tokens = encoding.ids
        if len(tokens) > max_length:
            # keep the end-of-sequence marker the encoder was trained with
            tokens = tokens[: max_length - 1] + [eos_id]
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, : len(tokens)] = 1
    return ids.to(device), mask.to(device)


def encode_text(encoder: UMT5EncoderModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden states ``[B, L, d_model]`` with the padding positions set to zero (Wan's convention)."""
    hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return hidden * attention_mask.unsqueeze(-1).to(hidden.dtype)

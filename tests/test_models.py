"""Backbone adapters (otca_fast.models): tiny builds of every family, rollout + train step through the
fused ops, parity with the diffusers pipelines, prompt cache, checkpoint-directory checks,
attention backends, Wan2.2 expert routing."""

from __future__ import annotations

import importlib.util
import json
import logging

import pytest
import torch

pytest.importorskip("diffusers")

from otca_fast import ops  # noqa: E402
from otca_fast.models import (  # noqa: E402
    Backbone,
    PromptEmbeds,
    build_backbone,
    list_backbones,
    register_backbone,
    wan21_1_3b_config,
)

FAMILIES = ("wan2.1", "wan2.2", "sd3", "flux")
# output size per family: smallest valid (Wan: multiples of 16, 4k+1 frames; FLUX: even latents)
SIZES = {"wan2.1": (16, 16, 5), "wan2.2": (16, 16, 5), "sd3": (16, 16, 1), "flux": (8, 8, 1)}
PROMPTS = ["a red cube on a table", "a blue sphere rolling"]


@pytest.fixture(autouse=True)
def _quiet_diffusers():
    # tiny builds log "modules that should be kept in float32" warnings; they are expected here
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


@pytest.fixture
def restore_attention_backend():
    """diffusers' set_attention_backend also sets a process-wide active backend: put it back."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    saved = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(saved)


def _shape(bb: Backbone) -> tuple[int, ...]:
    h, w, f = SIZES[bb.family]
    return bb.latent_shape(h, w, f)


def _euler_rollout(bb: Backbone, x: torch.Tensor, cond, uncond, g: float, steps: int) -> torch.Tensor:
    """ODE rollout x' = x + (σ' − σ)·v, what FlowMatchEulerDiscreteScheduler.step does."""
    sig = bb.sigmas(steps)
    for i in range(steps):
        v = bb.velocity(x, sig[i].expand(x.shape[0]), cond, guidance_scale=g, uncond=uncond)
        x = x + (sig[i + 1] - sig[i]) * v
    return x


# ---------------------------------------------------------------------------------------------
# the acceptance test: tiny build, one SDE rollout, one GRPO train step
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_rollout_and_train_step(family):
    bb = build_backbone(family, tiny=True)
    assert bb.family == family and bb.is_video == family.startswith("wan")
    shape = _shape(bb)
    B, g = 2, 4.5
    cond, uncond = bb.encode_prompts(PROMPTS), bb.encode_prompts([""] * B)
    sig = bb.sigmas(2)
    assert sig.shape == (3,) and sig[0] == 1 and sig[-1] == 0 and bool((sig[1:] < sig[:-1]).all())
    sde = dict(dynamics="flow_sde", noise_level=0.7, sigma_max=float(sig[1]))  # σ₁ stands in at σ = 1

    gen = torch.Generator().manual_seed(0)
    states, logps = [torch.randn(B, *shape, generator=gen)], []
    with torch.no_grad():
        for i in range(2):
            v = bb.velocity(states[-1], sig[i].expand(B), cond, guidance_scale=g, uncond=uncond)
            assert v.shape == states[-1].shape and bool(torch.isfinite(v).all())
            prev, logp, _, _ = ops.sde_step(states[-1], v, float(sig[i]), float(sig[i + 1]), generator=gen, **sde)
            states.append(prev)
            logps.append(logp)
    frames = bb.decode(states[-1])
    h, w, f = SIZES[family]
    assert frames.shape == (B, f, 3, h, w)
    assert frames.min() >= 0 and frames.max() <= 1 and frames.std() > 0

    params = [p for p in bb.transformer.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-3)
    adv = torch.tensor([1.0, -1.0])
    for i in range(2):  # both steps (Wan2.2: the first is the high-noise expert's, the second the low-noise one's)
        v = bb.velocity(states[i], sig[i].expand(B), cond, guidance_scale=g, uncond=uncond)
        loss, stats = ops.grpo_step_loss(states[i], v, states[i + 1], logps[i], adv, float(sig[i]), float(sig[i + 1]),
                                         clip_range=1e-4, **sde)
        # on-policy: the training forward reproduces the rollout's velocity bit for bit
        assert torch.equal(stats["ratio"], torch.ones(B)), stats["ratio"]
        loss.backward()
    grads = [p.grad for p in params if p.grad is not None]
    assert grads and all(bool(torch.isfinite(gr).all()) for gr in grads)
    opt.step()
    changed = sum(not torch.equal(b, p.detach()) for b, p in zip(before, params))
    assert changed >= len(params) // 2, f"only {changed} of {len(params)} parameter tensors moved"
    if family == "wan2.2":  # trainable_experts="both": both experts learned
        for expert in (bb.transformer.high, bb.transformer.low):
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in expert.parameters())
    for frozen in bb.text_encoders() + [bb.pipe.vae]:
        assert all(not p.requires_grad and p.grad is None for p in frozen.parameters())


# ---------------------------------------------------------------------------------------------
# conventions: the adapter's Euler rollout equals the diffusers pipeline's (timestep scale, CFG,
# packing, schedule, expert routing)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_matches_diffusers_pipeline(family):
    options = {"guidance_scale_2": 2.0} if family == "wan2.2" else {}
    tiny = {"transformer": {"guidance_embeds": True}} if family == "flux" else True
    if family == "flux":
        options["embedded_guidance"] = 2.5
    bb = build_backbone(family, tiny=tiny, **options)
    shape, B, g, steps = _shape(bb), 2, 3.0, 3
    cond, uncond = bb.encode_prompts(PROMPTS), bb.encode_prompts([""] * B)
    x = torch.randn(B, *shape)
    ours = _euler_rollout(bb, x.clone(), cond, uncond, g, steps)
    h, w, f = SIZES[family]
    c, u = cond.tensors, uncond.tensors
    with torch.no_grad():
        if family.startswith("wan"):
            extra = {"guidance_scale_2": 2.0} if family == "wan2.2" else {}
            ref = bb.pipe(prompt_embeds=c["encoder_hidden_states"], negative_prompt_embeds=u["encoder_hidden_states"],
                          height=h, width=w, num_frames=f, latents=x.clone(), num_inference_steps=steps,
                          guidance_scale=g, output_type="latent", **extra).frames
        elif family == "sd3":
            ref = bb.pipe(prompt_embeds=c["encoder_hidden_states"], pooled_prompt_embeds=c["pooled_projections"],
                          negative_prompt_embeds=u["encoder_hidden_states"],
                          negative_pooled_prompt_embeds=u["pooled_projections"], height=h, width=w,
                          latents=x.clone(), num_inference_steps=steps, guidance_scale=g,
                          output_type="latent").images
        else:
            packed = bb.pack(x.clone())
            ref = bb.pipe(prompt_embeds=c["encoder_hidden_states"], pooled_prompt_embeds=c["pooled_projections"],
                          negative_prompt_embeds=u["encoder_hidden_states"],
                          negative_pooled_prompt_embeds=u["pooled_projections"], true_cfg_scale=g,
                          guidance_scale=2.5, height=h, width=w, latents=packed, num_inference_steps=steps,
                          output_type="latent").images
            ref = bb.unpack(ref, *shape[1:])
    assert ref.shape == ours.shape
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, x, atol=1e-3)  # the rollout did move the latents


def test_flux_schedule_shifts_with_resolution():
    """FLUX.1-dev's dynamic shifting: mu grows with the image-token count, so larger images spend more
    steps at high noise. The schedule's resolution is explicit, else the last latent_shape call."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    bb = build_backbone("flux", tiny=True)
    small, large = bb.sigmas(4, height=8, width=8), bb.sigmas(4, height=128, width=128)
    assert bool((large[1:-1] > small[1:-1]).all())
    mu = calculate_shift(64 * 64, 256, 4096, 0.5, 1.15)  # 128 px / (VAE 1 x pack 2) = 64 tokens a side
    grid = torch.linspace(1.0, 0.25, 4, dtype=torch.float64)
    want = torch.exp(torch.tensor(mu)) / (torch.exp(torch.tensor(mu)) + (1 / grid - 1))  # time_shift, exponential
    torch.testing.assert_close(large[:-1].double(), want, rtol=1e-6, atol=1e-6)
    bb.latent_shape(128, 128)
    assert torch.equal(bb.sigmas(4), large)
    with pytest.raises(ValueError, match="height/width: give both or neither"):
        bb.sigmas(4, height=8)


def test_prompt_embeddings_match_pipeline_and_pack_roundtrip():
    bb = build_backbone("flux", tiny=True)
    emb = bb.encode_prompts(PROMPTS)
    ref, pooled, _ = bb.pipe.encode_prompt(prompt=PROMPTS, prompt_2=None, max_sequence_length=bb.max_sequence_length)
    torch.testing.assert_close(emb.tensors["encoder_hidden_states"], ref, rtol=0, atol=0)
    torch.testing.assert_close(emb.tensors["pooled_projections"], pooled, rtol=0, atol=0)
    x = torch.randn(3, *bb.latent_shape(16, 8))
    packed = bb.pack(x)
    assert packed.shape == (3, (16 // 2) * (8 // 2), 4 * bb.latent_channels)
    assert torch.equal(bb.unpack(packed, *x.shape[2:]), x)


# ---------------------------------------------------------------------------------------------
# text: cache, offload
# ---------------------------------------------------------------------------------------------

def test_prompt_cache_encodes_each_prompt_once():
    bb = build_backbone("wan2.1", tiny=True)
    calls = []
    bb.pipe.text_encoder.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    first = bb.encode_prompts(["a", "b", "a"])
    assert calls == [2]  # one batched call for the two distinct prompts
    assert torch.equal(first.tensors["encoder_hidden_states"][0], first.tensors["encoder_hidden_states"][2])
    again = bb.encode_prompts(["b", "a"])
    assert calls == [2]
    assert torch.equal(again.tensors["encoder_hidden_states"], first.tensors["encoder_hidden_states"][[1, 0]])
    assert (bb.prompt_cache.hits, bb.prompt_cache.misses, len(bb.prompt_cache)) == (3, 2, 2)
    direct, _ = bb.pipe.encode_prompt(prompt=["a", "b"], do_classifier_free_guidance=False,
                                      max_sequence_length=bb.max_sequence_length)
    torch.testing.assert_close(first.tensors["encoder_hidden_states"][:2], direct, rtol=0, atol=0)
    bb.offload_text_encoder()
    assert bb.text_encoder_device == torch.device("cpu")
    late = bb.encode_prompts(["c"])  # still works after offload (encoded where the encoder now lives)
    assert calls == [2, 2, 1] and late.tensors["encoder_hidden_states"].device == bb.device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_moves_text_encoders_off_the_gpu():
    bb = build_backbone("sd3", tiny=True, device="cuda")
    emb = bb.encode_prompts(PROMPTS)
    assert emb.device.type == "cuda" and all(next(e.parameters()).is_cuda for e in bb.text_encoders())
    bb.offload_text_encoder()
    assert all(not next(e.parameters()).is_cuda for e in bb.text_encoders())
    again = bb.encode_prompts(PROMPTS)  # served from the cache, on the GPU
    assert again.device.type == "cuda"
    torch.testing.assert_close(again.tensors["encoder_hidden_states"], emb.tensors["encoder_hidden_states"])
    x = torch.randn(2, *_shape(bb), device="cuda")
    v = bb.velocity(x, torch.full((2,), 0.5, device="cuda"), again)
    assert v.is_cuda and bool(torch.isfinite(v).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["wan2.2", "flux"])
def test_cuda_bf16_rollout_is_on_policy(family):
    """On the GPU in bf16 (the training setting) the train-time forward must still reproduce the
    rollout's log-prob exactly: same batch, same kernels (Flow-GRPO #204 is what breaks otherwise)."""
    bb = build_backbone(family, tiny=True, dtype=torch.bfloat16, device="cuda")
    B, g = 2, 4.5
    cond, uncond = bb.encode_prompts(PROMPTS), bb.encode_prompts([""] * B)
    sig = bb.sigmas(2)
    sde = dict(dynamics="flow_sde", noise_level=0.7, sigma_max=float(sig[1]))
    x = torch.randn(B, *_shape(bb), device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        v = bb.velocity(x, sig[0].expand(B), cond, guidance_scale=g, uncond=uncond)
        prev, logp, _, _ = ops.sde_step(x, v, float(sig[0]), float(sig[1]), **sde)
    v = bb.velocity(x, sig[0].expand(B), cond, guidance_scale=g, uncond=uncond)
    assert v.dtype == torch.bfloat16
    loss, stats = ops.grpo_step_loss(x, v, prev, logp, torch.tensor([1.0, -1.0], device="cuda"), float(sig[0]),
                                     float(sig[1]), clip_range=1e-4, **sde)
    assert torch.equal(stats["ratio"], torch.ones(B, device="cuda")), stats["ratio"]
    loss.backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in bb.transformer.parameters() if p.grad is not None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_flash_sdpa_backend_matches_default(restore_attention_backend):
    tiny = {"transformer": {"attention_head_dim": 16}}  # flash kernels want head_dim % 8 == 0
    torch.manual_seed(5)
    default = build_backbone("wan2.1", tiny=tiny, dtype=torch.bfloat16, device="cuda")
    torch.manual_seed(5)
    flash = build_backbone("wan2.1", tiny=tiny, dtype=torch.bfloat16, device="cuda", attention_backend="_native_flash")
    x = torch.randn(2, *_shape(default), device="cuda", dtype=torch.bfloat16)
    cond, sigma = default.encode_prompts(PROMPTS), torch.tensor([0.9, 0.2], device="cuda")
    torch.testing.assert_close(flash.velocity(x, sigma, cond), default.velocity(x, sigma, cond), rtol=2e-2, atol=2e-2)


def test_prompt_embeds_container():
    e = PromptEmbeds({"a": torch.arange(6.0).view(3, 2), "b": torch.arange(3)})
    assert len(e) == 3 and e.index(1).tensors["a"].tolist() == [[2.0, 3.0]]
    g = e.index([0, 0, 2])
    assert g.tensors["b"].tolist() == [0, 0, 2]
    cat = PromptEmbeds.cat([e, g])
    assert cat.batch_size == 6 and cat.tensors["a"].shape == (6, 2)
    half = e.to(dtype=torch.float16)
    assert half.tensors["a"].dtype == torch.float16 and half.tensors["b"].dtype == torch.int64
    with pytest.raises(ValueError, match="same batch size"):
        PromptEmbeds({"a": torch.zeros(2, 1), "b": torch.zeros(3)})
    with pytest.raises(ValueError, match="expected tensors"):
        PromptEmbeds.cat([e, PromptEmbeds({"a": torch.zeros(1, 2)})])
    with pytest.raises(IndexError, match="idx"):
        e.index([5])
    with pytest.raises(ValueError, match="non-empty"):
        PromptEmbeds({})


# ---------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------

def test_bad_inputs_name_the_argument():
    bb = build_backbone("sd3", tiny=True)
    cond = bb.encode_prompts(PROMPTS)
    x = torch.randn(2, *_shape(bb))
    with pytest.raises(ValueError, match=r"latents: expected \[B, C, H, W\]"):
        bb.velocity(x[:, None], torch.ones(2), cond)
    for bad in (torch.zeros(2), torch.full((2,), 1.5)):
        with pytest.raises(ValueError, match=r"sigma: expected values in \(0, 1\]"):
            bb.velocity(x, bad, cond)
    with pytest.raises(ValueError, match=r"sigma: expected shape \(2,\)"):
        bb.velocity(x, torch.ones(3), cond)
    with pytest.raises(ValueError, match="cond: expected batch 2"):
        bb.velocity(x, torch.ones(2), cond.index(0))
    with pytest.raises(ValueError, match="uncond: guidance_scale=4.0"):
        bb.velocity(x, torch.ones(2), cond, guidance_scale=4.0)
    with pytest.raises(TypeError, match="prompts: expected a list"):
        bb.encode_prompts("a cat")
    with pytest.raises(ValueError, match="num_frames: SD3 generates images"):
        bb.latent_shape(16, 16, 5)
    with pytest.raises(ValueError, match="height: flux needs a multiple of 2"):
        build_backbone("flux", tiny=True).latent_shape(15, 16)
    with pytest.raises(ValueError, match="num_steps"):
        bb.sigmas(0)
    wan = build_backbone("wan2.1", tiny=True)
    with pytest.raises(ValueError, match="num_frames: Wan needs 4k\\+1 frames"):
        wan.latent_shape(16, 16, 8)
    with pytest.raises(ValueError, match="width: Wan needs a multiple of 16"):
        wan.latent_shape(16, 24, 5)
    assert wan.latent_shape(480, 832, 81) == (16, 21, 60, 104)  # the 480p / 81-frame training size


def test_build_arguments_are_checked():
    with pytest.raises(ValueError, match="family: expected one of"):
        build_backbone("sdxl", tiny=True)
    with pytest.raises(ValueError, match="either path .* or tiny"):
        build_backbone("wan2.1", path="/nonexistent", tiny=True)
    with pytest.raises(ValueError, match="(?s)give path= .*hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers"):
        build_backbone("wan2.1")
    with pytest.raises(TypeError, match="dtype: expected a floating torch.dtype"):
        build_backbone("wan2.1", tiny=True, dtype=torch.int8)
    with pytest.raises(TypeError, match="vae_dtype: expected a floating torch.dtype"):
        build_backbone("wan2.1", tiny=True, vae_dtype="float8")
    with pytest.raises(ValueError, match="tiny: unknown key 'transfomer'"):
        build_backbone("wan2.1", tiny={"transfomer": {}})
    with pytest.raises(ValueError, match="text_dim .* must equal text_encoder.d_model"):
        build_backbone("wan2.1", tiny={"transformer": {"text_dim": 48}})
    with pytest.raises(ValueError, match="trainable_experts / guidance_scale_2: only for two-expert"):
        build_backbone("wan2.1", tiny=True, trainable_experts="high")
    with pytest.raises(ValueError, match="embedded_guidance: this FLUX transformer has no guidance embedding"):
        build_backbone("flux", tiny=True, embedded_guidance=3.5)


# ---------------------------------------------------------------------------------------------
# local checkpoints: layout checks and a save/load round trip
# ---------------------------------------------------------------------------------------------

def test_missing_or_wrong_path_explains_the_layout(tmp_path):
    with pytest.raises(ValueError) as err:
        build_backbone("wan2.1", path=str(tmp_path / "nope"))
    msg = str(err.value)
    assert "does not exist" in msg and "model_index.json" in msg and "transformer/" in msg
    assert "hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir" in msg and "allow_download" in msg
    with pytest.raises(ValueError) as err:
        build_backbone("flux", path=str(tmp_path))
    msg = str(err.value)
    for piece in ("missing model_index.json", "missing transformer/", "missing text_encoder_2/", "is gated",
                  "black-forest-labs/FLUX.1-dev"):
        assert piece in msg, piece


def test_downloads_only_when_allowed(tmp_path):
    from otca_fast.models.loading import resolve_checkpoint
    repo = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    assert resolve_checkpoint(repo, "wan2.1", allow_download=True) == (repo, {})  # handed to from_pretrained
    with pytest.raises(ValueError, match="does not exist"):
        resolve_checkpoint(repo, "wan2.1", allow_download=False)
    with pytest.raises(ValueError, match="does not exist"):  # a local-looking path is never a repo id
        resolve_checkpoint(str(tmp_path / "wan"), "wan2.1", allow_download=True)


def test_docs_cover_every_family():
    from pathlib import Path

    from otca_fast.models import LAYOUTS
    doc = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    for layout in LAYOUTS.values():
        for repo in layout.repos:
            assert repo in doc, repo
        for component in layout.components:
            assert f"{component}/" in doc, component
    for option in ("trainable_experts", "guidance_scale_2", "embedded_guidance", "attention_backend",
                   "allow_download", "max_sequence_length", "offload_text_encoder"):
        assert option in doc, option


def test_local_checkpoint_round_trip_and_incomplete_download(tmp_path):
    tiny = build_backbone("wan2.2", tiny=True)
    ckpt = tmp_path / "wan22"
    tiny.pipe.save_pretrained(ckpt)
    loaded = build_backbone("wan2.2", path=str(ckpt), trainable_experts="high",
                            max_sequence_length=tiny.max_sequence_length)
    assert loaded.two_experts and loaded.boundary_ratio == 0.875 and loaded.shift == 12.0
    assert loaded.transformer is loaded.high and not any(p.requires_grad for p in loaded.low.parameters())
    x, sigma = torch.randn(2, *_shape(tiny)), torch.tensor([0.95, 0.3])
    cond = tiny.encode_prompts(PROMPTS)
    torch.testing.assert_close(loaded.encode_prompts(PROMPTS).tensors["encoder_hidden_states"],
                               cond.tensors["encoder_hidden_states"], rtol=0, atol=0)
    torch.testing.assert_close(loaded.velocity(x, sigma, cond), tiny.velocity(x, sigma, cond), rtol=1e-5, atol=1e-6)

    with pytest.raises(ValueError, match="this is a Wan2.2 two-expert checkpoint, use model.family: wan2.2"):
        build_backbone("wan2.1", path=str(ckpt))
    with pytest.raises(ValueError, match="(?s)names pipeline 'WanPipeline'.*set model.family accordingly"):
        build_backbone("sd3", path=str(ckpt))
    with pytest.raises(ValueError, match="point model.path at its parent"):
        build_backbone("wan2.2", path=str(ckpt / "transformer"))
    for f in (ckpt / "transformer_2").glob("*.safetensors"):
        f.unlink()
    (ckpt / "tokenizer" / "tokenizer.json").unlink()
    (ckpt / "tokenizer" / "tokenizer_config.json").unlink()
    with pytest.raises(ValueError) as err:
        build_backbone("wan2.2", path=str(ckpt))
    assert "transformer_2/ has no weights" in str(err.value) and "tokenizer/ has no tokenizer files" in str(err.value)
    (ckpt / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match="model_index.json is not readable JSON"):
        build_backbone("wan2.2", path=str(ckpt))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_image_checkpoint_round_trip(family, tmp_path):
    from otca_fast.models import check_checkpoint_dir
    bb = build_backbone(family, tiny=True)
    ckpt = tmp_path / family
    bb.pipe.save_pretrained(ckpt)
    path, index = check_checkpoint_dir(ckpt, family)
    assert index["_class_name"] in ("StableDiffusion3Pipeline", "FluxPipeline") and path.is_dir()
    loaded = build_backbone(family, path=str(ckpt), max_sequence_length=bb.max_sequence_length)
    x, sigma = torch.randn(2, *_shape(bb)), torch.tensor([1.0, 0.4])
    cond = bb.encode_prompts(PROMPTS)
    for key, t in loaded.encode_prompts(PROMPTS).tensors.items():
        torch.testing.assert_close(t, cond.tensors[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loaded.velocity(x, sigma, cond), bb.velocity(x, sigma, cond), rtol=1e-5, atol=1e-6)
    h, w, _ = SIZES[family]
    torch.testing.assert_close(loaded.sigmas(4, height=h, width=w), bb.sigmas(4), rtol=0, atol=0)
    if family == "flux":
        return
    # a sharded component whose index names a shard that is not on disk: an incomplete download
    weight_map = {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"}
    (ckpt / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match="transformer/ misses weight shards"):
        check_checkpoint_dir(ckpt, "sd3")


# ---------------------------------------------------------------------------------------------
# attention backends
# ---------------------------------------------------------------------------------------------

def test_attention_backend_names_are_checked(restore_attention_backend):
    with pytest.raises(ValueError, match="attention_backend: expected one of"):
        build_backbone("flux", tiny=True, attention_backend="fastest")
    with pytest.raises(ValueError, match="downloads its kernel from the Hugging Face Hub"):
        build_backbone("flux", tiny=True, attention_backend="flash_hub")


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_missing_flash_attn_is_a_clear_error(restore_attention_backend):
    with pytest.raises(RuntimeError, match="attention_backend='flash' is not usable.*flash-attn"):
        build_backbone("wan2.1", tiny=True, attention_backend="flash")


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed here")
def test_missing_xformers_is_a_clear_error(restore_attention_backend):
    with pytest.raises(RuntimeError, match="attention_backend='xformers' is not usable.*xformers"):
        build_backbone("sd3", tiny=True, attention_backend="xformers")


@pytest.mark.parametrize("family", ["wan2.1", "sd3"])
def test_attention_backend_is_applied_and_exact(family, restore_attention_backend):
    from diffusers.models.attention_dispatch import AttentionBackendName
    tiny = {"transformer": {"num_layers": 2, "dual_attention_layers": (0,), "qk_norm": "rms_norm"}} \
        if family == "sd3" else True
    torch.manual_seed(3)
    default = build_backbone(family, tiny=tiny)
    torch.manual_seed(3)
    math_bb = build_backbone(family, tiny=tiny, attention_backend="_native_math")
    procs = [m.processor for m in math_bb.transformer.modules() if hasattr(m, "processor")]
    assert procs and all(p._attention_backend == AttentionBackendName._NATIVE_MATH for p in procs)
    x = torch.randn(2, *_shape(default))
    cond = default.encode_prompts(PROMPTS)
    v_default = default.velocity(x, torch.tensor([0.9, 0.4]), cond)
    torch.testing.assert_close(math_bb.velocity(x, torch.tensor([0.9, 0.4]), cond), v_default, rtol=1e-5, atol=1e-5)
    if family == "sd3":
        # the dispatch processor computes what diffusers' own JointAttnProcessor2_0 computes
        from diffusers.models.attention_processor import JointAttnProcessor2_0
        default.transformer.set_attn_processor(JointAttnProcessor2_0())
        torch.testing.assert_close(default.velocity(x, torch.tensor([0.9, 0.4]), cond), v_default,
                                   rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Wan2.2: per-sample expert routing, trainable experts, LoRA on both
# ---------------------------------------------------------------------------------------------

def test_wan22_routes_each_sample_to_its_expert():
    bb = build_backbone("wan2.2", tiny=True)
    x = torch.randn(3, *_shape(bb))
    cond = bb.encode_prompts(["a", "b", "c"])
    sigma = torch.tensor([0.95, 0.3, 0.875])  # t = 950 → high, 300 → low, 875 = boundary → high
    v = bb.velocity(x, sigma, cond)
    e = cond.tensors["encoder_hidden_states"]
    with torch.no_grad():
        want = [bb.high(hidden_states=x[[0, 2]], timestep=sigma[[0, 2]] * 1000, encoder_hidden_states=e[[0, 2]],
                        return_dict=False)[0],
                bb.low(hidden_states=x[[1]], timestep=sigma[[1]] * 1000, encoder_hidden_states=e[[1]],
                       return_dict=False)[0]]
    torch.testing.assert_close(v[[0, 2]], want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v[[1]], want[1], rtol=1e-6, atol=1e-6)
    # the container's own forward routes the same way
    out = bb.transformer(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=e)[0]
    torch.testing.assert_close(out, v, rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="must hold both experts"):
        bb.velocity(x, sigma, cond, transformer=bb.high)


def test_wan22_lora_on_both_experts_and_override():
    from peft import LoraConfig
    bb = build_backbone("wan2.2", tiny=True)
    targets = bb.lora_target_modules()
    assert "attn1.to_q" in targets and "attn2.to_out.0" in targets
    bb.transformer.requires_grad_(False)
    bb.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights="gaussian"))
    for expert in (bb.high, bb.low):
        names = [n for n, p in expert.named_parameters() if p.requires_grad]
        assert names and all("lora_" in n for n in names)
        assert len(names) == 2 * len(targets) * 2  # A and B for every target in both blocks
    with torch.no_grad():  # peft starts LoRA at B = 0 (a no-op); give it a value to see
        for n, p in bb.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.1)
    x, cond = torch.randn(2, *_shape(bb)), bb.encode_prompts(PROMPTS)
    sigma = torch.tensor([0.95, 0.3])
    with_lora = bb.velocity(x, sigma, cond)
    bb.transformer.disable_adapters()  # the frozen reference (KL) is the base model
    base = bb.velocity(x, sigma, cond)
    bb.transformer.enable_adapters()
    assert not torch.allclose(with_lora, base)
    torch.testing.assert_close(bb.velocity(x, sigma, cond), with_lora, rtol=0, atol=0)


def test_wan22_trainable_low_expert_and_guidance_scale_2():
    bb = build_backbone("wan2.2", tiny=True, trainable_experts="low", guidance_scale_2=1.5)
    assert bb.transformer is bb.low and not any(p.requires_grad for p in bb.high.parameters())
    x = torch.randn(2, *_shape(bb))
    cond, uncond = bb.encode_prompts(PROMPTS), bb.encode_prompts(["", ""])
    sigma = torch.tensor([0.95, 0.3])
    v = bb.velocity(x, sigma, cond, guidance_scale=4.0, uncond=uncond)
    v_c, v_u = bb.velocity(x, sigma, cond), bb.velocity(x, sigma, uncond)
    torch.testing.assert_close(v[0], v_u[0] + 4.0 * (v_c[0] - v_u[0]), rtol=1e-5, atol=1e-5)  # high: scale 4
    torch.testing.assert_close(v[1], v_u[1] + 1.5 * (v_c[1] - v_u[1]), rtol=1e-5, atol=1e-5)  # low: scale 1.5
    copy = build_backbone("wan2.2", tiny=True, trainable_experts="low")
    # an override stands in for the trainable (low) expert only; high-noise samples keep bb.high
    v_override = bb.velocity(x, sigma, cond, transformer=copy.low)
    torch.testing.assert_close(v_override[0], v_c[0], rtol=0, atol=0)
    assert not torch.allclose(v_override[1], v_c[1])


# ---------------------------------------------------------------------------------------------
# misc: dtypes, the 1.3B config, the registry
# ---------------------------------------------------------------------------------------------

def test_bf16_build_keeps_fp32_modules_and_returns_latent_dtype():
    bb = build_backbone("wan2.1", tiny=True, dtype="bfloat16")  # YAML spelling
    t = bb.transformer
    assert t.patch_embedding.weight.dtype == torch.bfloat16
    assert next(t.condition_embedder.time_embedder.parameters()).dtype == torch.float32  # _keep_in_fp32_modules
    assert next(bb.pipe.vae.parameters()).dtype == torch.float32  # VAE stays float32 by default
    x = torch.randn(2, *_shape(bb), dtype=torch.bfloat16)
    cond = bb.encode_prompts(PROMPTS)
    assert cond.tensors["encoder_hidden_states"].dtype == torch.bfloat16
    v = bb.velocity(x, torch.tensor([1.0, 0.5]), cond)
    assert v.dtype == torch.bfloat16 and bool(torch.isfinite(v).all())
    v32 = bb.velocity(x.float(), torch.tensor([1.0, 0.5]), cond)
    assert v32.dtype == torch.float32


def test_wan21_1_3b_config_builds_the_published_architecture():
    from diffusers import WanTransformer3DModel
    cfg = wan21_1_3b_config()
    assert cfg["num_attention_heads"] * cfg["attention_head_dim"] == 1536
    with torch.device("meta"):  # shapes only: no 1.4e9-parameter allocation on the CPU
        model = WanTransformer3DModel(**cfg)
    n = sum(p.numel() for p in model.parameters())
    assert 1.3e9 < n < 1.5e9, n
    assert len(model.blocks) == 30 and model.blocks[0].ffn.net[0].proj.out_features == 8960
    assert model.condition_embedder.text_embedder.linear_1.in_features == 4096


def test_registry_accepts_custom_families(monkeypatch):
    import otca_fast.models.base as base
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    built = build_backbone("sd3", tiny=True)

    def factory(**kwargs):
        assert kwargs["dtype"] == torch.float32 and kwargs["device"] == torch.device("cpu")
        assert kwargs["colour"] == "red"
        return built

    register_backbone("my_sd3", factory)
    register_backbone("my_sd3", factory)  # the same factory again is a no-op
    assert "my_sd3" in list_backbones() and {"wan2.1", "wan2.2", "sd3", "flux", "shapes"} <= set(list_backbones())
    assert build_backbone("My_SD3", colour="red") is built
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("my_sd3", lambda **kw: built)
    register_backbone("my_sd3", lambda **kw: object(), overwrite=True)
    with pytest.raises(TypeError, match="expected a Backbone"):
        build_backbone("my_sd3")

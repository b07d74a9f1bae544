"""Model-based rewards: OCR with the bundled PP-OCR models (real model), and the local-weights CLIP family
(tiny random CLIPModels of the real class, saved and loaded through the same path as real checkpoints,
with the real CLIP BPE vocabulary)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from otca_fast.rewards import build_reward, score_rewards
from otca_fast.rewards.clip_models import CLIP_MEAN, CLIP_STD, AestheticMLP, clip_tokenizer
from otca_fast.rewards.ocr import levenshtein, ocr_text_score, quoted_target

HAS_RAPIDOCR = importlib.util.find_spec("rapidocr_onnxruntime") is not None


# --------------------------------------------------------------------------------------------------
# OCR
# --------------------------------------------------------------------------------------------------

def test_levenshtein_and_flow_grpo_scoring_rule():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0
    assert ocr_text_score("OPEN 24 HOURS", "open24hours") == 1.0          # spaces and case ignored
    assert ocr_text_score("xx Hello GRPO yy", "Hello GRPO") == 1.0       # substring -> distance 0
    assert ocr_text_score("HelloGRP0", "Hello GRPO") == pytest.approx(1 - 1 / 9)
    assert ocr_text_score("", "cat") == 0.0
    assert ocr_text_score("a very long unrelated string", "cat") == 0.0  # distance capped at len


def test_quoted_target_extraction():
    assert quoted_target('a neon sign that says "Hello GRPO" at night') == "Hello GRPO"
    assert quoted_target("a poster reading \u201cOPEN\u201d and \"CLOSED\"") == "OPEN"
    with pytest.raises(ValueError, match="no quoted target text"):
        quoted_target("a cat on a mat")
    with pytest.raises(ValueError, match="empty"):
        quoted_target('a sign that says "  "')


def _render(text: str, w: int = 320, h: int = 96, size: int = 40) -> torch.Tensor:
    img = Image.new("RGB", (w, h), "white")
    ImageDraw.Draw(img).text((12, 22), text, fill=(20, 20, 20), font=ImageFont.load_default(size=size))
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255.0


@pytest.fixture(scope="module")
def ocr_reward():
    if not HAS_RAPIDOCR:
        pytest.skip("rapidocr-onnxruntime is not installed (optional extra: pip install 'otca_fast[ocr]')")
    return build_reward("ocr")


def test_ocr_reward_ranks_rendered_text_with_the_real_model(ocr_reward):
    prompt = 'a shop sign that says "Hello GRPO"'
    frames = torch.stack([_render("Hello GRPO"), _render("Hallo GRP"), _render("Goodbye"),
                          torch.ones(3, 96, 320)])[:, None]
    scores = score_rewards([ocr_reward], frames, [prompt] * 4, step=0)[:, 0]
    assert scores[0] == 1.0
    assert scores[0] > scores[1] > scores[2] >= scores[3] == 0.0


def test_ocr_video_frame_reduction(ocr_reward):
    text, blank = _render("OPEN"), torch.ones(3, 96, 320)
    video = torch.stack([text, blank, blank, blank, blank])[None]      # stride 4 reads frames 0 and 4
    prompt = ['a door sign "OPEN"']
    assert ocr_reward.fn(video, prompt).item() == pytest.approx(0.5)
    assert build_reward("ocr", reduce="positive_mean").fn(video, prompt).item() == pytest.approx(1.0)


def test_ocr_errors(ocr_reward):
    with pytest.raises(ValueError, match="no quoted target text"):
        ocr_reward.fn(torch.ones(1, 1, 3, 32, 32), ["a sign"])
    with pytest.raises(ValueError, match="option reduce"):
        build_reward("ocr", reduce="max")


# --------------------------------------------------------------------------------------------------
# CLIP family: tiny random CLIPModels, saved and reloaded like real checkpoints
# --------------------------------------------------------------------------------------------------

def _tiny_clip(vocab: int = 49408, image_size: int = 32, projection_dim: int = 16, seed: int = 0):
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=37,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=projection_dim)
    torch.manual_seed(seed)
    return CLIPModel(config).eval()


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from otca_fast.rewards.clip_models import ClipEmbedder

    path = tmp_path_factory.mktemp("tiny_clip")
    model = _tiny_clip()
    model.save_pretrained(path)
    # Holding one embedder keeps the shared checkpoint loaded: the rewards built below reuse it.
    keep = ClipEmbedder(path)
    yield path, model
    del keep


def _quantised(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g).float() / 255.0


def _hf_logits(model, frames_bchw, prompts):
    tok = clip_tokenizer()(prompts, padding=True, return_tensors="pt")
    pixels = (frames_bchw - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model(input_ids=tok.input_ids, attention_mask=tok.attention_mask, pixel_values=pixels)
    return out.logits_per_image.diagonal()


def test_bundled_tokenizer_is_the_real_clip_bpe():
    tok = clip_tokenizer()
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_clip_score_matches_the_transformers_forward(clip_dir):
    path, model = clip_dir
    frames = _quantised((3, 1, 3, 32, 32))        # model resolution, 8-bit values: no resampling involved
    prompts = ["a photo of a cat", "a red car on a street", "a photo of a cat"]
    reward = build_reward("clip_score", path=str(path))
    assert (reward.role, reward.cheap) == ("alignment", False)
    expected = _hf_logits(model, frames[:, 0], prompts) / 30.0
    torch.testing.assert_close(reward.fn(frames, prompts), expected, rtol=1e-5, atol=1e-6)
    # sample scores do not depend on the batch they are in, nor on the prompt cache
    torch.testing.assert_close(reward.fn(frames[1:2], prompts[1:2]), expected[1:2], rtol=1e-5, atol=1e-6)


def test_preference_scorers_share_the_cosine(clip_dir):
    path, model = clip_dir
    frames = _quantised((2, 1, 3, 32, 32), seed=1)
    prompts = ["a dog", "a lighthouse at dusk"]
    cos = build_reward("hps", path=str(path)).fn(frames, prompts)
    tau = model.logit_scale.exp().item()
    torch.testing.assert_close(build_reward("pickscore", path=str(path)).fn(frames, prompts), cos * tau / 26)
    torch.testing.assert_close(cos * tau, _hf_logits(model, frames[:, 0], prompts), rtol=1e-5, atol=1e-6)
    assert cos.abs().max() <= 1.0


def test_video_scores_average_evenly_spaced_frames(clip_dir):
    path, _ = clip_dir
    video = _quantised((1, 5, 3, 32, 32), seed=2)
    prompt = ["a bird flying"]
    per_frame = build_reward("hps", path=str(path)).fn(video.transpose(0, 1), prompt * 5)
    every = build_reward("hps", path=str(path)).fn(video, prompt)
    torch.testing.assert_close(every, per_frame.mean().view(1))
    ends = build_reward("hps", path=str(path), max_frames=2).fn(video, prompt)
    torch.testing.assert_close(ends, per_frame[[0, 4]].mean().view(1))


def test_torch_preprocessing_matches_clip_image_processor(tmp_path):
    from transformers import CLIPImageProcessorPil

    model = _tiny_clip()
    model.save_pretrained(tmp_path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path)
    from otca_fast.rewards.clip_models import ClipEmbedder

    embedder = ClipEmbedder(tmp_path)
    g = torch.Generator().manual_seed(3)
    image = F.interpolate(torch.rand(1, 3, 6, 8, generator=g), size=(48, 72), mode="bicubic").clamp(0, 1)
    image = (image * 255).round() / 255.0
    pil = Image.fromarray((image[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
    reference = CLIPImageProcessorPil.from_pretrained(tmp_path)(images=pil, return_tensors="pt").pixel_values
    ours = embedder.pixel_values(image)
    assert ours.shape == reference.shape == (1, 3, 32, 32)
    # PIL resamples in 8 bit: one grey level (1/255/std ≈ 0.015) of difference is expected
    assert (ours - reference).abs().max() < 0.03


def test_tokenizer_files_in_the_model_directory_are_used(tmp_path, clip_dir):
    path, model = clip_dir
    model.save_pretrained(tmp_path)
    clip_tokenizer().save_pretrained(tmp_path)
    frames = _quantised((2, 1, 3, 32, 32), seed=4)
    prompts = ["a cat", "a boat"]
    with_files = build_reward("clip_score", path=str(tmp_path)).fn(frames, prompts)
    torch.testing.assert_close(with_files, build_reward("clip_score", path=str(path)).fn(frames, prompts))


def test_rewards_on_one_checkpoint_share_the_weights(clip_dir):
    from otca_fast.rewards.clip_models import ClipEmbedder

    path, _ = clip_dir
    a, b = ClipEmbedder(path), ClipEmbedder(str(path), batch_size=4)
    assert a.checkpoint is b.checkpoint and a.model is b.model and (a.batch_size, b.batch_size) == (32, 4)
    assert ClipEmbedder(path, dtype="bfloat16").checkpoint is not a.checkpoint


def test_clip_rewards_explain_what_path_must_hold(tmp_path):
    with pytest.raises(ValueError, match=r"option path is required.*CLIPModel format"):
        build_reward("clip_score")
    with pytest.raises(FileNotFoundError, match=r"is not a directory.*config.json"):
        build_reward("pickscore", path=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        build_reward("hps", path=str(tmp_path))
    odd = tmp_path / "odd_vocab"
    _tiny_clip(vocab=1000).save_pretrained(odd)
    with pytest.raises(FileNotFoundError, match=r"no tokenizer files.*\(1000 ids\)"):
        build_reward("clip_score", path=str(odd))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="expected a transformers CLIPModel"):
        build_reward("clip_score", path=str(tmp_path / "bert"))


def test_clip_option_validation(clip_dir):
    path, _ = clip_dir
    with pytest.raises(ValueError, match="option dtype"):
        build_reward("clip_score", path=str(path), dtype="float8")
    with pytest.raises(ValueError, match="option max_frames"):
        build_reward("clip_score", path=str(path), max_frames=0)


@pytest.mark.parametrize("relu,suffix", [(False, ".pth"), (True, ".safetensors")])
def test_laion_aesthetic_head_on_clip_embeddings(clip_dir, tmp_path, relu, suffix):
    path, model = clip_dir
    torch.manual_seed(5)
    head = AestheticMLP(16, relu=relu).eval()
    file = tmp_path / f"head{suffix}"
    if suffix == ".pth":
        torch.save(head.state_dict(), file)
    else:
        from safetensors.torch import save_file

        save_file(head.state_dict(), str(file))
    reward = build_reward("laion_aesthetic", path=str(path), head=str(file))
    frames = _quantised((2, 1, 3, 32, 32), seed=6)
    pixels = (frames[:, 0] - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        emb = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        expected = head(F.normalize(emb, dim=-1))
    torch.testing.assert_close(reward.fn(frames, ["x", "y"]), expected, rtol=1e-5, atol=1e-6)


def test_laion_aesthetic_errors(clip_dir, tmp_path):
    path, _ = clip_dir
    with pytest.raises(ValueError, match="option head is required"):
        build_reward("laion_aesthetic", path=str(path))
    with pytest.raises(FileNotFoundError, match="is not a file"):
        build_reward("laion_aesthetic", path=str(path), head=str(tmp_path / "none.pth"))
    wide = tmp_path / "wide.pth"
    torch.save(AestheticMLP(768).state_dict(), wide)
    with pytest.raises(ValueError, match=r"takes 768-d embeddings but the CLIP .* projects to 16-d"):
        build_reward("laion_aesthetic", path=str(path), head=str(wide))
    junk = tmp_path / "junk.pth"
    torch.save({"w": torch.zeros(2)}, junk)
    with pytest.raises(ValueError, match="not a LAION aesthetic MLP"):
        build_reward("laion_aesthetic", path=str(path), head=str(junk))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_clip_reward_follows_cuda_frames(clip_dir):
    path, _ = clip_dir
    frames = _quantised((2, 1, 3, 32, 32), seed=7)
    reward = build_reward("clip_score", path=str(path))
    cpu = reward.fn(frames, ["a", "b"])
    gpu = reward.fn(frames.cuda(), ["a", "b"])
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)

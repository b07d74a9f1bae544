"""The shipped shapes base model: loads offline, samples clips of the right shape, beats random weights;
the "shapes" backbone speaks the trainer's interface; the pretraining script is reproducible."""

from __future__ import annotations

import json

import pytest
import torch

from otca_fast import ops
from otca_fast.models import PromptEmbeds, build_backbone
from otca_fast.toy.model import (
    ASSETS_DIR,
    META_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    ShapesBackbone,
    ShapesModel,
    coordinate_planes,
    frames_to_latents,
    latents_to_frames,
    shifted_sigmas,
)
from otca_fast.toy.pretrain import _parser, main, pretrain
from otca_fast.toy.rewards import alignment_score, motion_score, quality_score
from otca_fast.toy.world import sample_clips, split_specs

_SMALL = {"transformer": {"num_layers": 1, "num_attention_heads": 6, "attention_head_dim": 8, "ffn_dim": 16},
          "text_encoder": {"num_layers": 1}}


@pytest.fixture(scope="module")
def shipped() -> ShapesBackbone:
    return build_backbone("shapes")


def _rollout(backbone, prompts, *, steps, seed, guidance_scale=1.0):
    """Sample with the backbone exactly as the trainer does: velocity + ops.sde_step (ODE)."""
    gen = torch.Generator().manual_seed(seed)
    cond = backbone.encode_prompts(prompts)
    uncond = backbone.encode_prompts([""] * len(prompts)) if guidance_scale != 1.0 else None
    x = torch.randn((len(prompts), *backbone.latent_shape(32, 32, 9)), generator=gen)
    sigmas = backbone.sigmas(steps)
    with torch.no_grad():
        for i in range(steps):
            v = backbone.velocity(x, sigmas[i].expand(len(prompts)), cond, guidance_scale=guidance_scale,
                                  uncond=uncond)
            x = ops.sde_step(x, v, float(sigmas[i]), float(sigmas[i + 1]), dynamics="ode")[0]
    return backbone.decode(x)


def test_shipped_files_are_small_and_say_how_they_were_made():
    weights = ASSETS_DIR / WEIGHTS_FILE
    assert weights.is_file() and (ASSETS_DIR / TOKENIZER_FILE).is_file()
    assert weights.stat().st_size <= 20 * 1024 * 1024
    meta = json.loads((ASSETS_DIR / META_FILE).read_text())
    made = meta["made_by"]
    assert made["command"].startswith("python -m otca_fast.toy.pretrain")
    assert {"seed", "steps", "batch_size", "lr"} <= set(made["args"])
    assert made["wall_seconds"] > 0
    held = meta["heldout_rewards"][0]
    assert held["split"] == "heldout" and held["clips"] == len(split_specs("heldout"))
    for name in ("alignment", "motion", "quality"):
        # good but imperfect: room left below the real clips' level for RL
        assert 0.0 < held[name] < held[f"{name}_real_clips"]


def test_shipped_backbone_loads_offline_and_samples_clips_of_the_right_shape(shipped, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert isinstance(shipped, ShapesBackbone)
    assert shipped.family == "shapes" and shipped.is_video
    assert shipped.latent_shape(32, 32, 9) == (3, 9, 32, 32)
    frames = _rollout(shipped, [s.prompt for s in split_specs("heldout")[:2]], steps=4, seed=0)
    assert frames.shape == (2, 9, 3, 32, 32) and frames.dtype == torch.float32
    assert float(frames.min()) >= 0.0 and float(frames.max()) <= 1.0


def test_shipped_weights_generate_the_world_far_better_than_random_weights(shipped):
    prompts = [s.prompt for s in split_specs("heldout")[::6]]
    random_init = build_backbone("shapes", tiny=True)
    scores = {}
    for name, backbone in (("shipped", shipped), ("random", random_init)):
        frames = _rollout(backbone, prompts, steps=10, seed=1)
        scores[name] = torch.stack([fn(frames, prompts) for fn in (alignment_score, motion_score, quality_score)])
    shipped_mean, random_mean = scores["shipped"].mean(1), scores["random"].mean(1)
    assert float(shipped_mean[0]) > float(random_mean[0]) + 0.2, (shipped_mean, random_mean)   # alignment
    assert float(shipped_mean[2]) > float(random_mean[2]) + 0.2, (shipped_mean, random_mean)   # quality


def test_velocity_batches_guidance_in_one_forward(shipped):
    prompts = ["a red square moving left on a white background", "a blue circle moving up on a gray background"]
    cond, uncond = shipped.encode_prompts(prompts), shipped.encode_prompts(["", ""])
    assert isinstance(cond, PromptEmbeds) and cond.tensors["encoder_hidden_states"].shape == (2, 16, 64)
    x = torch.randn(2, 3, 9, 32, 32, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.9, 0.4])
    with torch.no_grad():
        v_c = shipped.velocity(x, sigma, cond)
        v_u = shipped.velocity(x, sigma, uncond)
        guided = shipped.velocity(x, sigma, cond, guidance_scale=3.0, uncond=uncond)
    assert v_c.shape == x.shape
    assert torch.allclose(guided, v_u + 3.0 * (v_c - v_u), atol=1e-4)
    assert not torch.allclose(v_c, v_u)                        # the text conditioning matters
    with pytest.raises(ValueError, match="uncond"):
        shipped.velocity(x, sigma, cond, guidance_scale=3.0)
    with pytest.raises(ValueError, match="sigma"):
        shipped.velocity(x, torch.tensor([0.0, 0.5]), cond)
    with pytest.raises(ValueError, match="channels"):
        shipped.velocity(torch.randn(2, 4, 9, 32, 32), sigma, cond)


def test_backbone_schedule_decode_and_lora_targets(shipped):
    sigmas = shipped.sigmas(10)
    assert sigmas.shape == (11,) and float(sigmas[0]) == 1.0 and float(sigmas[-1]) == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    assert torch.allclose(shifted_sigmas(4, 3.0), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))
    clips = sample_clips(2, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(shipped.decode(frames_to_latents(clips.frames)), clips.frames, atol=1e-6)
    targets = shipped.lora_target_modules()
    assert {"to_q", "to_k", "to_v", "to_out.0"} <= set(targets)
    with pytest.raises(ValueError, match="height"):
        shipped.latent_shape(30, 32, 9)
    with pytest.raises(ValueError, match="num_frames"):
        shipped.latent_shape(32, 32, 8)


def test_save_and_load_round_trip(tmp_path):
    model = ShapesModel.from_config(transformer=_SMALL["transformer"], text_encoder=_SMALL["text_encoder"], seed=3)
    model.save(tmp_path, meta={"note": "round trip"})
    loaded = ShapesModel.load(tmp_path)
    assert loaded.meta["note"] == "round trip"
    assert loaded.tokenizer.to_str() == model.tokenizer.to_str()
    x = torch.randn(1, 3, 9, 32, 32)
    prompts = ["a green triangle moving down on a striped background"]
    with torch.no_grad():
        want = model.eval().velocity(x, torch.tensor([0.5]), model.encode_prompts(prompts))
        got = loaded.velocity(x, torch.tensor([0.5]), loaded.encode_prompts(prompts))
    assert torch.equal(want, got)
    backbone = build_backbone("shapes", path=str(tmp_path))
    assert backbone.transformer.config.num_layers == 1


def test_x_prediction_converts_the_clean_clip_estimate_to_a_velocity():
    model = ShapesModel.from_config(transformer=_SMALL["transformer"], text_encoder=_SMALL["text_encoder"], seed=4)
    x = torch.randn(2, 3, 9, 32, 32, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.7, 0.01])
    embeds = model.encode_prompts(["a red square moving left on a white background"] * 2)
    inputs = torch.cat([x, coordinate_planes(x)], dim=1)
    with torch.no_grad():
        x0_hat = model.transformer(hidden_states=inputs, timestep=sigma * 1000, encoder_hidden_states=embeds,
                                   return_dict=False)[0]
        v = model.velocity(x, sigma, embeds)
    assert model.prediction == "x0"
    assert torch.allclose(v[0], (x[0] - x0_hat[0]) / 0.7, atol=1e-5)
    assert torch.allclose(v[1], (x[1] - x0_hat[1]) / 0.05, atol=1e-4)    # σ below the floor divides by 0.05
    # x_t − σ·v recovers the transformer's clean-clip estimate (above the floor)
    assert torch.allclose(x[0] - 0.7 * v[0], x0_hat[0], atol=1e-5)
    narrow_patch = {**_SMALL["transformer"], "patch_size": (1, 4, 4)}     # 48 values per patch = the width
    velocity_model = ShapesModel.from_config(transformer=narrow_patch, text_encoder=_SMALL["text_encoder"],
                                             prediction="velocity", seed=4)
    with torch.no_grad():
        assert torch.equal(velocity_model.velocity(x, sigma, embeds), velocity_model.transformer(
            hidden_states=inputs, timestep=sigma * 1000, encoder_hidden_states=embeds, return_dict=False)[0])
    # a velocity model narrower than a patch (144 values) could never remove part of the noise
    with pytest.raises(ValueError, match="width"):
        ShapesModel.from_config(transformer={"num_attention_heads": 4}, prediction="velocity")
    with pytest.raises(ValueError, match="prediction"):
        ShapesModel.from_config(transformer=_SMALL["transformer"], prediction="epsilon")


def test_coordinate_planes_give_every_pixel_its_absolute_position():
    planes = coordinate_planes(torch.zeros(2, 3, 9, 32, 32))
    assert planes.shape == (2, 3, 9, 32, 32)
    x, y, t = planes[0]
    assert torch.equal(x[0, 0], torch.linspace(-1, 1, 32)) and bool((x == x[:1, :1]).all())
    assert torch.equal(y[0, :, 0], torch.linspace(-1, 1, 32)) and bool((y == y[:1, :, :1]).all())
    assert torch.equal(t[:, 0, 0], torch.linspace(-1, 1, 9))
    assert torch.equal(coordinate_planes(torch.zeros(1, 3, 1, 4, 4))[0, 2], torch.zeros(1, 4, 4))


def test_load_and_build_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        ShapesModel.load(tmp_path)
    with pytest.raises(ValueError, match="not both"):
        build_backbone("shapes", path=str(tmp_path), tiny=True)
    with pytest.raises(ValueError, match="tiny"):
        build_backbone("shapes", tiny={"vae": {}})
    with pytest.raises(ValueError, match="latents"):
        latents_to_frames(torch.zeros(1, 9, 3, 32, 32))


def test_pretraining_is_reproducible_from_the_seed_and_writes_loadable_weights(tmp_path):
    args = _parser().parse_args(["--steps", "2", "--batch-size", "2", "--warmup", "1", "--no-eval",
                                 "--out", str(tmp_path)])
    a, record = pretrain(args, log=lambda line: None)
    b, _ = pretrain(args, log=lambda line: None)
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert record["made_by"]["final_loss"] > 0
    fresh = ShapesModel.from_config(seed=0).state_dict()
    assert any(not torch.equal(fresh[k], state_a[k]) for k in fresh)     # the steps did update the weights
    assert main(["--steps", "1", "--batch-size", "2", "--no-eval", "--out", str(tmp_path)]) == 0
    assert ShapesModel.load(tmp_path).meta["made_by"]["args"]["steps"] == 1
    with pytest.raises(ValueError, match="--steps"):
        pretrain(_parser().parse_args(["--steps", "0"]))


def test_the_shipped_record_has_the_exam_and_evaluate_rewrites_a_record(tmp_path):
    from otca_fast.toy.exam import VERDICTS

    meta = json.loads((ASSETS_DIR / META_FILE).read_text())
    exam = meta["heldout_exam"]
    assert exam["clips"] == 4 * len(split_specs("heldout")) and exam["num_steps"] == 8
    for verdict in (*VERDICTS, "all_correct"):
        assert 0.0 <= exam[verdict] <= 1.0
        assert exam["all_correct"] <= exam[verdict]
    # the chain of runs that made the shipped weights, each with its command
    assert all(run["command"].startswith("python -m otca_fast.toy.pretrain") for run in meta["continued_from"])

    assert main(["--steps", "1", "--batch-size", "2", "--no-eval", "--out", str(tmp_path)]) == 0
    assert "heldout_exam" not in ShapesModel.load(tmp_path).meta
    before = ShapesModel.load(tmp_path).state_dict()
    assert main(["--evaluate", str(tmp_path), "--eval-steps", "1", "--eval-guidance", "1.0",
                 "--exam-clips", "1"]) == 0
    after = ShapesModel.load(tmp_path)
    assert all(torch.equal(before[k], v) for k, v in after.state_dict().items())   # nothing trained
    assert after.meta["made_by"]["args"]["steps"] == 1
    assert after.meta["evaluated_by"]["command"].startswith("python -m otca_fast.toy.pretrain --evaluate")
    assert after.meta["heldout_rewards"][0]["num_steps"] == 1
    assert after.meta["heldout_exam"]["clips"] == len(split_specs("heldout"))
    assert "all_correct" in after.meta["heldout_exam"]

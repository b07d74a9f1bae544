"""The trainer's parts on their own: checkpoints and RNG state, the prompt sampler, reports, rollout helpers."""

from __future__ import annotations

import json
import random

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from otca_fast import checkpoint as ckpt
from otca_fast import report
from otca_fast.rollout import chunks, sde_step_mask
from otca_fast.trainer import PromptSampler, adapters_disabled

# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------


def _save(root, step, **kw):
    weights = {"a.lora_A.weight": torch.randn(3, 4), "b": torch.randn(5)[::2]}  # a strided view too
    return ckpt.save_checkpoint(root, step, weights=weights, optimizer={"state": {0: {"m": torch.ones(2)}}},
                                state={"x": torch.arange(3), "k": [1, 2]}, ema={"a.lora_A.weight": torch.zeros(3, 4)},
                                config_yaml="run: {}\n", **kw), weights


def test_checkpoint_round_trip(tmp_path):
    path, weights = _save(tmp_path, 7)
    assert path.name == "step_00000007" and path.parent.name == ckpt.CHECKPOINT_SUBDIR
    c = ckpt.load_checkpoint(path)
    assert c["step"] == 7
    assert torch.equal(c["weights"]["a.lora_A.weight"], weights["a.lora_A.weight"])
    assert torch.equal(c["weights"]["b"], weights["b"])
    assert torch.equal(c["ema"]["a.lora_A.weight"], torch.zeros(3, 4))
    assert torch.equal(c["optimizer"]["state"][0]["m"], torch.ones(2))
    assert torch.equal(c["state"]["x"], torch.arange(3)) and c["state"]["k"] == [1, 2]
    assert c["config_yaml"] == "run: {}\n"


def test_checkpoints_keep_the_last_n_and_ignore_partial_writes(tmp_path):
    for step in (2, 4, 6, 8):
        _save(tmp_path, step, keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [6, 8]
    # a crash mid-write leaves only a temporary directory: never picked up as the latest
    partial = tmp_path / ckpt.CHECKPOINT_SUBDIR / ".step_00000010.tmp-999"
    partial.mkdir()
    (partial / "weights.safetensors").write_bytes(b"")
    incomplete = tmp_path / ckpt.CHECKPOINT_SUBDIR / "step_00000012"
    incomplete.mkdir()  # no state.pt: not a complete checkpoint
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000008"
    # re-saving an existing step replaces it
    path, weights = _save(tmp_path, 8, keep_last=2)
    assert torch.equal(ckpt.load_checkpoint(path)["weights"]["b"], weights["b"])
    assert not list((tmp_path / ckpt.CHECKPOINT_SUBDIR).glob(".step_00000008*"))


def test_checkpoint_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="step"):
        ckpt.save_checkpoint(tmp_path, -1, weights={}, optimizer={}, state={})
    with pytest.raises(ValueError, match="keep_last"):
        ckpt.save_checkpoint(tmp_path, 1, weights={}, optimizer={}, state={}, keep_last=0)
    with pytest.raises(TypeError, match=r"weights\['w'\]"):
        ckpt.save_checkpoint(tmp_path, 1, weights={"w": [1.0]}, optimizer={}, state={})
    with pytest.raises(FileNotFoundError, match="state.pt"):
        ckpt.load_checkpoint(tmp_path)
    assert ckpt.latest_checkpoint(tmp_path / "nothing") is None


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    torch.randn(3, generator=gen)
    state = ckpt.capture_rng_state({"noise": gen})
    expected = (torch.randn(4), random.random(), np.random.rand(2), torch.randn(2, generator=gen))
    # scramble everything, then restore from what went through torch.save / weights_only load
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    gen.manual_seed(99)
    ckpt.save_checkpoint(tmp_path, 1, weights={}, optimizer={}, state={"rng": state})
    loaded = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))["state"]["rng"]
    ckpt.restore_rng_state(loaded, {"noise": gen})
    got = (torch.randn(4), random.random(), np.random.rand(2), torch.randn(2, generator=gen))
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]
    assert np.array_equal(got[2], expected[2]) and torch.equal(got[3], expected[3])
    with pytest.raises(KeyError, match="'other'"):
        ckpt.restore_rng_state(loaded, {"other": torch.Generator()})


# ------------------------------------------------------------------------------------------------
# prompt sampler
# ------------------------------------------------------------------------------------------------

def test_prompt_sampler_covers_every_prompt_each_epoch_and_resumes_exactly():
    s = PromptSampler(5, 3, seed=0)
    first = s.next() + s.next()[:2]  # 5 draws = one epoch
    assert sorted(first) == list(range(5))
    s2 = PromptSampler(5, 3, seed=0)
    s2.next()
    saved = s2.state_dict()
    tail = [s2.next() for _ in range(4)]
    s3 = PromptSampler(5, 3, seed=123)
    s3.load_state_dict(saved)
    assert [s3.next() for _ in range(4)] == tail
    assert PromptSampler(4, 2, seed=0, shuffle=False).next() == [0, 1]
    with pytest.raises(ValueError, match="saved for 5 prompts"):
        PromptSampler(6, 3, seed=0).load_state_dict(saved)
    with pytest.raises(ValueError, match="num_prompts"):
        PromptSampler(0, 3, seed=0)


# ------------------------------------------------------------------------------------------------
# reports
# ------------------------------------------------------------------------------------------------

def test_metrics_log_writes_jsonl_and_tensorboard_and_truncates_on_resume(tmp_path):
    with report.MetricsLog(tmp_path, tensorboard=True) as log:
        for step in (1, 2, 3):
            log.log(step, {"loss": torch.tensor(0.5 * step), "reward/a": np.float32(step), "nan": float("nan"),
                           "profile": [1.0, 2.0]})
    records = report.read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1]["loss"] == 1.0 and records[2]["reward/a"] == 3.0
    assert records[0]["nan"] is None and records[0]["profile"] == [1.0, 2.0]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    with report.MetricsLog(tmp_path, tensorboard=False, resume_step=2) as log:
        log.log(3, {"loss": 9.0})
    assert [(r["step"], r["loss"]) for r in report.read_metrics(tmp_path / "metrics.jsonl")] == [
        (1, 0.5), (2, 1.0), (3, 9.0)]
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        report.read_metrics(tmp_path / "bad.jsonl")


def test_save_clip_writes_gif_and_mp4_with_every_frame(tmp_path):
    frames = torch.rand(5, 3, 16, 18)
    frames[2] = 0.0
    paths = report.save_clip(frames, tmp_path / "clips" / "c0", fps=4)
    assert [p.suffix for p in paths] == [".gif", ".mp4"]
    gif = iio.imread(paths[0])
    assert gif.shape[:3] == (5, 16, 18)
    # GIF is palette-quantised: compare on average
    assert gif[2].max() == 0 and np.abs(gif[0].astype(float) / 255 - frames[0].permute(1, 2, 0).numpy()).mean() < 0.05
    assert iio.imread(paths[1]).shape[0] == 5
    # odd sizes are padded for H.264, images become PNGs
    assert iio.imread(report.save_clip(torch.rand(3, 3, 15, 17), tmp_path / "odd")[1]).shape[1:3] == (16, 18)
    png = report.save_clip(torch.rand(1, 3, 8, 8), tmp_path / "img")
    assert [p.suffix for p in png] == [".png"] and iio.imread(png[0]).shape == (8, 8, 3)
    with pytest.raises(ValueError, match=r"\[F, C, H, W\]"):
        report.save_clip(torch.rand(3, 16, 16), tmp_path / "bad")
    with pytest.raises(ValueError, match="NaN"):
        report.save_clip(torch.full((2, 3, 4, 4), float("nan")), tmp_path / "nan")


def test_plots_and_summary_table(tmp_path):
    records = [{"step": s, "reward/a": s * 0.1, "reward_std/a": 0.01, "reward/b": -s, "loss": 1.0 / s,
                "kl": 0.0, "clip_frac": 0.1, "grad_norm": 1.0, "samples_per_s": 3.0} for s in range(1, 6)]
    records.append({"step": 5, "eval/reward/a": 0.7})
    for path in (report.plot_rewards(records, ["a", "b"], tmp_path / "r.png"),
                 report.plot_training(records, tmp_path / "t.png")):
        img = iio.imread(path)
        assert img.ndim == 3 and img.shape[0] > 100
    from rich.console import Console

    console = Console(record=True, width=120)
    console.print(report.summary_table(records, ["a", "b"]))
    text = console.export_text()
    assert "reward/a" in text and "eval/reward/a" in text and "+0.4" in text and "-4" in text


def test_progress_plain_prints_one_line_per_step_with_eta():
    from rich.console import Console

    console = Console(record=True, width=200)
    prog = report.RunProgress("plain", total_steps=4, start_step=1, log_every=2, console=console)
    for step in (2, 3, 4):
        prog.step_done(step, f"loss={step}")
    prog.close()
    lines = [line for line in console.export_text().splitlines() if line.startswith("step")]
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"] and all("eta" in line for line in lines)
    with pytest.raises(ValueError, match="mode"):
        report.RunProgress("fancy", total_steps=1, console=console)


def test_metrics_file_is_one_json_object_per_line(tmp_path):
    with report.MetricsLog(tmp_path, tensorboard=False) as log:
        log.log(1, {"x": 1.0})
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        {"step": 1, "x": 1.0}]


# ------------------------------------------------------------------------------------------------
# rollout helpers
# ------------------------------------------------------------------------------------------------

def test_chunks_and_sde_masks():
    assert chunks(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    with pytest.raises(ValueError, match="size"):
        chunks(3, 0)
    assert sde_step_mask(6, "all").tolist() == [True] * 6
    assert sde_step_mask(10, "fraction", fraction=0.3).tolist() == [True] * 3 + [False] * 7
    gen = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(40):
        m = sde_step_mask(10, "window", window_size=2, window_range=(1, 6), generator=gen)
        idx = m.nonzero().flatten().tolist()
        assert len(idx) == 2 and idx[1] == idx[0] + 1 and 1 <= idx[0] and idx[1] < 6
        starts.add(idx[0])
    assert starts == {1, 2, 3, 4}
    with pytest.raises(ValueError, match="window_range"):
        sde_step_mask(10, "window", window_size=4, window_range=(0, 3))
    with pytest.raises(ValueError, match="mode"):
        sde_step_mask(10, "sometimes")


def test_adapters_disabled_gives_the_base_model_and_restores_the_adapters():
    from peft import LoraConfig, inject_adapter_in_model

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    x = torch.randn(5, 4)
    base = model(x).detach()
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["0", "2"]), model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    adapted = model(x).detach()
    assert not torch.allclose(adapted, base)
    with adapters_disabled(model):
        assert torch.equal(model(x), base)
    assert torch.equal(model(x).detach(), adapted)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    with pytest.raises(RuntimeError, match="no peft adapter"), adapters_disabled(torch.nn.Linear(2, 2)):
        pass

"""Scale-out on torch.distributed, on the CPU with gloo: 2 processes under torchrun equal 1 process.

The runs use configs/tiny_video.yaml with small overrides (a one-block transformer, 3x16x16 clips,
3 denoising steps, 2 prompts x 4 samples, 2 steps) and are launched the way a user launches them:
``python -m torch.distributed.run --nproc_per_node N ...`` in a subprocess. The 1-process reference
goes through torchrun too (``--nproc_per_node 1``), with the same thread count, so the only
difference between the runs is the number of ranks.

The rewards are two user rewards that read one pixel each (tests/dist_worker.py). Summing a gradient in
another order leaves a last-bit difference (~1e-10) in the weights after step 1, and the advantages of
step 2 are group z-scores: a reward change dR becomes dR / (group std). The registry's pixel rewards are
defined on 8-bit frames (round(255·x)), so that difference can flip one pixel's rounding and move a reward
by ~1e-6; a mean over the clip moves by a float32 ulp (6e-8) while its spread within a group is ~5e-3,
so A moves by ~1e-5. One pixel has neither rounding nor a float sum and a spread of ~0.1 within a
group: what remains is the distributed run's own difference. That difference is the order of the
step-1 gradient sum (two partial sums averaged instead of one running sum): AdamW's first update,
lr·g/(|g| + eps), turns the last-bit differences of gradient elements that nearly cancel into ~1e-6
*relative* differences of the LoRA B weights (B starts at 0, so it is lr-sized after step 1), and the
step-2 rollout carries them into A. Measured at lr 1e-5 with
TCD's credit shared over the trainable steps only (the last step never trains, so each of the other steps
carries more of A than when the last one took a share): up to 1.2e-6 in the step-2 advantages under FSDP
(ddp: below 1e-6); the 2e-6 tolerance leaves a margin over that rounding while staying at the level of
float32 rounding of O(1) advantages (a rank training the wrong rows changes step 2's rollout outright).
That measure does not carry across hosts: on an AMD EPYC with torch CPU capability AVX512 (2026-12-07) ddp's
step-2 advantages differed by 2.5e-6 (rewards by 3.6e-7, within TOL): the rewards' rounding divided by a
group std. The step-2 advantages get ADV_TOL = 1e-5 (about 80 float32 ulps of 1), still at the level of rounding,
where training the wrong rows changes step 2's rollout outright (not measured here); every other comparison
keeps TOL.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from otca_fast import checkpoint as ckpt
from otca_fast.config import ConfigError, load_config
from otca_fast.distributed import DistContext, check_batch, eval_share

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_video.yaml"
WORKER = ROOT / "tests" / "dist_worker.py"
TOL = 2e-6  # 1 vs 2 processes: the same math, summed in a different order
ADV_TOL = 1e-5  # step-2 advantages: the rewards' rounding over a group std (module docstring)

SMALL = {"run.progress": "plain", "run.plot_every": 0, "run.tensorboard": False,
         "model.tiny": {"transformer": {"num_layers": 1, "ffn_dim": 64}},
         "sample.height": 16, "sample.width": 16, "sample.num_frames": 3, "sample.num_steps": 3,
         "sample.group_size": 4, "sample.prompts_per_step": 2, "sample.batch_size": 4, "sample.sde.mode": "all",
         # OTCA with both halves on (TCD on x̂0 + MOCA λ = 0.1; the shipped tiny config turns MOCA off), pinned
         # so the tolerance below does not move with the shipped credit defaults
         "credit.scheme": "otca", "credit.source": "x0_pred", "credit.exploration": 0.1, "optimizer.lr": 1e-5,
         "rewards": [{"name": "dist_worker:Pixel", "weight": 1.0, "options": {"role": "quality"}},
                     {"name": "dist_worker:OtherPixel", "weight": 1.0, "options": {"role": "quality"}}],
         "train.max_steps": 2, "train.checkpoint_every": 1, "train.ema.update_every": 1, "eval.enabled": False,
         "distributed.timeout_s": 60}


def _sets(out: Path, **extra) -> list[str]:
    args = []
    for key, value in {**SMALL, "run.output_dir": str(out), **extra}.items():
        args += ["--set", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, out: Path, *, dump: Path | None = None, resume: bool = False, env: dict | None = None,
             timeout: float = 240, **extra) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node nproc`` of the CLI (through tests/dist_worker.py when ``dump``)."""
    target = [str(WORKER), str(dump)] if dump is not None else ["-m", "otca_fast.train"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), *target, str(TINY), *_sets(out, **extra)]
    if resume:
        cmd.append("--resume")
    full_env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _optimizer_diff(a, b) -> float:
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and sa
    return max(float((v.double() - sb[pid][key].double()).abs().max()) for pid, s in sa.items() for key, v in s.items())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 2 steps on 1 process, on 2 ranks with DDP, and on 2 ranks with FSDP2 (+ activation
    checkpointing): output directories and what every rank computed."""
    base = tmp_path_factory.mktemp("dist")
    out = {}
    for name, nproc, extra in [("single", 1, {}), ("ddp", 2, {"distributed.strategy": "ddp"}),
                               ("fsdp", 2, {"distributed.strategy": "fsdp", "train.gradient_checkpointing": True})]:
        t0 = time.perf_counter()
        proc = torchrun(nproc, base / name, dump=base / f"{name}_dump", **extra)
        _ok(proc)
        out[name] = {"dir": base / name, "seconds": time.perf_counter() - t0, "stderr": proc.stderr,
                     "ranks": [torch.load(base / f"{name}_dump" / f"rank{r}.pt", weights_only=False)
                               for r in range(nproc)]}
    return out


# ------------------------------------------------------------------------------------------------
# 2 ranks = 1 process
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process(runs, strategy):
    one, two = runs["single"], runs[strategy]
    assert f"2 ranks ({strategy})" in two["stderr"]
    # every rank built the advantages of the whole batch from the gathered rewards (global group
    # statistics), for its own half of the rows
    ref = one["ranks"][0]
    assert [r["step"] for r in ref] == [1, 2]
    adv_diff = reward_diff = 0.0
    for rank, seen in enumerate(two["ranks"]):
        assert [r["step"] for r in seen] == [1, 2]
        for mine, theirs in zip(seen, ref):
            assert mine["world_size"] == 2 and mine["strategy"] == strategy
            assert mine["rows"] == (4 * rank, 4 * rank + 4)
            assert mine["A"].shape == theirs["A"].shape == (8, 3)
            adv_diff = max(adv_diff, float((mine["A"] - theirs["A"]).abs().max()))
            reward_diff = max(reward_diff, float((mine["rewards"] - theirs["rewards"]).abs().max()))
    # step 1 is bit-identical (same weights, same noise per sample); step 2 differs by the rounding of
    # the gradient sum of step 1 (two partial sums averaged instead of one sum)
    assert torch.equal(two["ranks"][0][0]["A"], ref[0]["A"]) and torch.equal(two["ranks"][1][0]["A"], ref[0]["A"])
    assert adv_diff <= ADV_TOL and reward_diff <= TOL, (adv_diff, reward_diff)
    loss_diff = max(abs(a - b) for a, b in zip(_losses(one["dir"]), _losses(two["dir"])))
    assert loss_diff <= TOL
    # the updated weights (and EMA and AdamW moments) after 2 steps, from the checkpoints
    a = ckpt.load_checkpoint(one["dir"] / "checkpoints" / "step_00000002")
    b = ckpt.load_checkpoint(two["dir"] / "checkpoints" / "step_00000002")
    assert not ckpt.is_sharded(a["path"]) and ckpt.is_sharded(b["path"])  # 2 ranks: torch.distributed.checkpoint
    first = ckpt.load_checkpoint(one["dir"] / "checkpoints" / "step_00000001")
    assert _max_diff(a["weights"], first["weights"]) > 1e-5 > TOL  # the weights did move
    weight_diff, ema_diff, optim_diff = (_max_diff(a["weights"], b["weights"]), _max_diff(a["ema"], b["ema"]),
                                         _optimizer_diff(a, b))
    assert weight_diff <= TOL and ema_diff <= TOL and optim_diff <= TOL
    assert b["state"]["step"] == 2 and b["state"]["world_size"] == 2 and b["state"]["strategy"] == strategy
    print(f"\n1 vs 2 processes ({strategy}): max |dA| {adv_diff:.3g}, |dreward| {reward_diff:.3g}, |dloss| "
          f"{loss_diff:.3g}, |dweights| {weight_diff:.3g}, |dEMA| {ema_diff:.3g}, |dAdam| {optim_diff:.3g}; "
          f"runs {one['seconds']:.0f}s / {two['seconds']:.0f}s")


def test_rank_zero_alone_writes_the_reports(runs):
    out = runs["ddp"]["dir"]
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2]
    assert runs["ddp"]["stderr"].count("step 2/2") == 1  # one progress line per step, from rank 0
    assert runs["ddp"]["stderr"].count("run summary") == 1


def test_fsdp_lockstep_with_uneven_pairs_full_finetuning_and_a_sharded_kl_reference(tmp_path):
    """Samples that train different numbers of steps, one sample per chunk: a rank has no pair at a
    (chunk, step) slot the other rank trains, and runs a zero-weighted pass to keep FSDP's collectives in
    step; the pair counts differ per rank, the loss is still the mean over the whole batch. DanceGRPO's
    random steps (2 of the 4 trainable ones per sample; the built-in schemes give every sample the same
    count, so the worker drops one pair of 3 samples), full fine-tuning with a KL to a frozen copy (sharded
    too)."""
    extra = {"credit.scheme": "dance", "sample.num_steps": 5, "sample.batch_size": 1, "train.finetune": "full",
             "train.kl_beta": 0.1, "train.kl_reference": "copy"}
    env = {"OTCA_TEST_UNEVEN_PAIRS": "1"}
    _ok(torchrun(1, tmp_path / "one", dump=tmp_path / "one_dump", env=env, **extra))
    _ok(torchrun(2, tmp_path / "two", dump=tmp_path / "two_dump", env=env,
                 **{**extra, "distributed.strategy": "fsdp"}))
    idle = [torch.load(tmp_path / "two_dump" / f"rank{r}.pt", weights_only=False)[0]["idle_passes"] for r in (0, 1)]
    assert sum(idle) > 0  # the lockstep path ran
    one, two = torch.load(tmp_path / "one_dump" / "rank0.pt", weights_only=False), torch.load(
        tmp_path / "two_dump" / "rank0.pt", weights_only=False)
    assert max(float((a["A"] - b["A"]).abs().max()) for a, b in zip(one, two)) <= TOL
    assert max(abs(a - b) for a, b in zip(_losses(tmp_path / "one"), _losses(tmp_path / "two"))) <= TOL
    kl = [json.loads(line)["kl"] for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert kl[0] == 0.0 and kl[1] > 0.0  # the sharded reference is the frozen start
    a = ckpt.load_checkpoint(tmp_path / "one" / "checkpoints" / "step_00000002")
    b = ckpt.load_checkpoint(tmp_path / "two" / "checkpoints" / "step_00000002")
    assert len(a["weights"]) > 20 and _max_diff(a["weights"], b["weights"]) <= TOL  # every transformer weight
    assert _optimizer_diff(a, b) <= TOL
    print(f"\nfsdp lockstep ({idle} idle passes): |dweights| {_max_diff(a['weights'], b['weights']):.3g}, "
          f"|dAdam| {_optimizer_diff(a, b):.3g}")


def test_tail_matching_on_two_ddp_ranks_equals_one_process_and_fsdp_refuses_it(tmp_path):
    """train.tail_matching (advantage-weighted flow matching on the ODE tail): its draws cover the whole batch
    in row order, so 2 DDP ranks train what 1 process does; FSDP (collective backward passes) refuses it."""
    extra = {"sample.sde.mode": "fraction", "sample.sde.fraction": 0.67, "train.tail_matching.weight": 0.5,
             "train.tail_matching.positive_only": False}
    _ok(torchrun(1, tmp_path / "one", **extra))
    _ok(torchrun(2, tmp_path / "two", **{**extra, "distributed.strategy": "ddp"}))
    recs = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("one", "two")]
    assert all(r["tail_matching_loss"] > 0 for r in recs[0])
    assert max(abs(a["tail_matching_loss"] - b["tail_matching_loss"]) / a["tail_matching_loss"]
               for a, b in zip(*recs)) <= 1e-5  # the mean over every rank's rows
    a = ckpt.load_checkpoint(tmp_path / "one" / "checkpoints" / "step_00000002")
    b = ckpt.load_checkpoint(tmp_path / "two" / "checkpoints" / "step_00000002")
    first = ckpt.load_checkpoint(tmp_path / "one" / "checkpoints" / "step_00000001")
    assert _max_diff(a["weights"], first["weights"]) > 1e-5 > TOL
    assert _max_diff(a["weights"], b["weights"]) <= TOL and _optimizer_diff(a, b) <= TOL
    proc = torchrun(2, tmp_path / "fsdp", **{**extra, "distributed.strategy": "fsdp"})
    assert proc.returncode != 0 and "train.tail_matching: not supported with distributed.strategy fsdp" in proc.stderr


# ------------------------------------------------------------------------------------------------
# resume from a sharded checkpoint onto 1 and onto 2 processes (and the 1-process layout onto 2)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source, nproc, strategy", [("ddp", 1, "ddp"), ("fsdp", 2, "fsdp"), ("single", 2, "ddp")],
                         ids=["sharded-to-1", "sharded-to-2", "single-to-2"])
def test_resume_on_the_same_or_another_number_of_ranks(runs, tmp_path, source, nproc, strategy):
    src = runs[source]["dir"]
    out = tmp_path / "resumed"
    shutil.copytree(src, out)
    shutil.rmtree(out / "checkpoints" / "step_00000002")
    extra = {"distributed.strategy": strategy}
    if source == "fsdp":
        extra["train.gradient_checkpointing"] = True
    proc = torchrun(nproc, out, resume=True, **extra)
    _ok(proc)
    assert "resumed from" in proc.stderr and "differs from the checkpoint" not in proc.stderr
    resumed = ckpt.load_checkpoint(out / "checkpoints" / "step_00000002")
    assert ckpt.is_sharded(resumed["path"]) == (nproc > 1)
    if nproc == 2 and source != "single":
        # the same ranks and strategy: bit for bit the uninterrupted run
        uninterrupted = ckpt.load_checkpoint(src / "checkpoints" / "step_00000002")
        for key in ("weights", "ema"):
            assert all(torch.equal(resumed[key][n], uninterrupted[key][n]) for n in resumed[key]), key
        assert _optimizer_diff(resumed, uninterrupted) == 0.0
        assert _losses(out) == _losses(src)
    else:
        single = ckpt.load_checkpoint(runs["single"]["dir"] / "checkpoints" / "step_00000002")
        assert _max_diff(resumed["weights"], single["weights"]) <= TOL
        assert _max_diff(resumed["ema"], single["ema"]) <= TOL
        assert _optimizer_diff(resumed, single) <= TOL
        assert max(abs(a - b) for a, b in zip(_losses(out), _losses(runs["single"]["dir"]))) <= TOL


# ------------------------------------------------------------------------------------------------
# a failing rank stops the whole job, in bounded time, naming the rank and the cause
# ------------------------------------------------------------------------------------------------

def test_a_reward_failing_on_one_rank_stops_every_rank(tmp_path):
    out = tmp_path / "fail"
    reward = [{"name": "dist_worker:FailOnRank", "weight": 1.0, "options": {"rank": 1, "fail_at": 2}}]
    t0 = time.perf_counter()
    proc = torchrun(2, out, timeout=120, **{"rewards": reward, "train.max_steps": 4})
    assert time.perf_counter() - t0 < 120
    assert proc.returncode != 0
    msg = [line for line in proc.stderr.splitlines() if line.startswith("otca-train: training stopped")]
    assert len(msg) == 1, proc.stderr[-4000:]  # announced to every rank, printed once (rank 0)
    assert "rank 1: reward 'dist_worker:FailOnRank' failed at step 2" in msg[0]
    assert "simulated reward outage on rank 1" in msg[0]
    assert "the last good state (step 1) is checkpointed" in msg[0]
    # the checkpoint of step 1 is intact and loads
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1]
    c = ckpt.load_checkpoint(out / "checkpoints" / "step_00000001")
    assert c["step"] == 1 and c["weights"] and c["optimizer"]["state"]
    assert not list((out / "checkpoints").glob(".*tmp*"))
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_a_rank_failing_inside_an_fsdp_forward_ends_the_job(tmp_path):
    """A failure that cannot be held until a check point (the FSDP forwards are collectives): the rank
    records it in the rendezvous store and leaves; the other rank's collective breaks and it names
    the failing rank too."""
    out = tmp_path / "fault"
    t0 = time.perf_counter()
    proc = torchrun(2, out, dump=tmp_path / "dump", timeout=120, env={"OTCA_TEST_BREAK_ROLLOUT": "1:2"},
                    **{"distributed.strategy": "fsdp", "train.max_steps": 4})
    assert time.perf_counter() - t0 < 120
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("otca-train: training stopped")]
    assert lines and all("rank 1: RuntimeError: simulated device fault" in line for line in lines), proc.stderr[-4000:]
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1]
    assert ckpt.load_checkpoint(out / "checkpoints" / "step_00000001")["step"] == 1


def test_sigterm_to_torchrun_stops_every_rank_together_and_the_resumed_run_is_bitwise_identical(runs, tmp_path):
    """A preempted job: SIGTERM reaches torchrun, which forwards it to the workers (a moment apart). Every rank
    stops at the same stop point of step 2 (the ranks agree on it by an all-reduce), the state after step 1 is
    checkpointed collectively, every rank exits 75; resuming gives the uninterrupted run bit for bit."""
    out, dump = tmp_path / "preempted", tmp_path / "dump"
    extra = {"distributed.strategy": "ddp", "train.checkpoint_every": 100}  # only the stop writes a checkpoint
    proc = torchrun(2, out, dump=dump, timeout=180, env={"OTCA_TEST_SIGTERM_AT": "2"}, **extra)
    assert [(dump / f"exit{r}.txt").read_text() for r in (0, 1)] == ["75", "75"], proc.stderr[-4000:]
    stopped = [line for line in proc.stderr.splitlines() if line.startswith("otca-train: stopped by SIGTERM")]
    assert len(stopped) == 1, proc.stderr[-4000:]  # printed once, by rank 0
    assert "during step 2 (abandoned" in stopped[0] and "the state after step 1 is checkpointed" in stopped[0]
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1] and ckpt.is_sharded(out / "checkpoints" / "step_00000001")
    assert not list((out / "checkpoints").glob(".*"))
    _ok(torchrun(2, out, resume=True, **extra))
    uninterrupted = ckpt.load_checkpoint(runs["ddp"]["dir"] / "checkpoints" / "step_00000002")
    resumed = ckpt.load_checkpoint(out / "checkpoints" / "step_00000002")
    for key in ("weights", "ema"):
        assert all(torch.equal(resumed[key][n], uninterrupted[key][n]) for n in resumed[key]), key
    assert _optimizer_diff(resumed, uninterrupted) == 0.0
    assert _losses(out) == _losses(runs["ddp"]["dir"])


# ------------------------------------------------------------------------------------------------
# units (no process group)
# ------------------------------------------------------------------------------------------------

def test_the_global_batch_must_split_evenly_over_the_ranks():
    cfg = load_config(TINY, ["sample.prompts_per_step=3", "sample.group_size=3", "sample.batch_size=3"])
    with pytest.raises(ConfigError, match=r"3 x 3 = 9 samples per step do not split evenly over the 2 ranks.*"
                                          r"prompts_per_step = 4"):
        check_batch(DistContext(rank=0, world_size=2), cfg)
    cfg = load_config(TINY, ["sample.prompts_per_step=2", "sample.group_size=6", "sample.batch_size=4"])
    with pytest.raises(ConfigError, match=r"sample.batch_size: on 2 ranks each rank holds 6 .* must divide 6"):
        check_batch(DistContext(rank=1, world_size=2), cfg)
    check_batch(DistContext(rank=1, world_size=4), load_config(TINY))  # 16 samples, 4 per rank, batch 8
    assert DistContext(rank=1, world_size=4).share(16) == slice(4, 8)
    assert eval_share(DistContext(rank=2, world_size=3), 7).tolist() == [6, 6, 6]  # padded with the last row


def test_config_distributed_section():
    cfg = load_config(TINY)
    assert cfg.distributed.strategy == "auto" and cfg.distributed.timeout_s > 0
    with pytest.raises(ConfigError, match=r"distributed.strategy"):
        load_config(TINY, ["distributed.strategy=zero"])
    with pytest.raises(ConfigError, match=r"distributed.fsdp.param_dtyp: unknown key"):
        load_config(TINY, ["distributed.fsdp.param_dtyp=bfloat16"])


class _Embeds:
    def index(self, rows):
        return self


class _Backbone:
    """v = x·0.3 + σ: enough to run sample_trajectories without a transformer."""

    def velocity(self, x, sigma, cond, guidance_scale=1.0, uncond=None):
        return x * 0.3 + sigma.view(-1, *([1] * (x.dim() - 1)))


def test_a_split_rollout_gives_every_sample_the_noise_of_the_whole_batch():
    from otca_fast.rollout import sample_trajectories

    n, shape = 12, (2, 3, 4)
    sigmas = torch.linspace(1, 0, 5, dtype=torch.float64)
    mask = torch.tensor([True, False, True, True])
    init = torch.randn(n, *shape)
    kw = dict(sigmas=sigmas, sde_mask=mask, batch_size=3, dynamics="flow_sde", noise_level=0.7, keep_final=True)
    whole_gen = torch.Generator().manual_seed(3)
    whole = sample_trajectories(_Backbone(), _Embeds(), init_noise=init, prompts=["p"] * n, generator=whole_gen, **kw)
    for world in (2, 4):  # 6 rows per rank (2 chunks), 3 rows per rank (1 chunk)
        per = n // world
        for r in range(world):
            rows = slice(r * per, (r + 1) * per)
            gen = torch.Generator().manual_seed(3)
            part = sample_trajectories(_Backbone(), _Embeds(), init_noise=init[rows], prompts=["p"] * per,
                                       generator=gen, rows=rows, total_rows=n, **kw)
            assert torch.equal(part.final_latents, whole.final_latents[rows])
            assert torch.equal(part.log_probs, whole.log_probs[rows])
            # every rank leaves the shared generator where one process leaves it
            assert torch.equal(gen.get_state(), whole_gen.get_state())


def test_build_advantages_takes_precomputed_cosines():
    from otca_fast.credit import build_advantages
    from otca_fast.credit.trajectory import state_cosines

    torch.manual_seed(0)
    n, t = 8, 5
    rewards, group_ids = torch.rand(n, 3), torch.arange(2).repeat_interleave(4)
    latents, x0 = torch.randn(n, t + 1, 4, 3, 4), torch.randn(n, t, 4, 3, 4)
    for scheme, source in [("otca", "latent"), ("tcd_only", "latent"), ("coca", "x0_pred")]:
        a, info = build_advantages(scheme, rewards=rewards, group_ids=group_ids, latents=latents, x0_preds=x0)
        cos = state_cosines(latents, source=source, x0_preds=x0)
        b, info_b = build_advantages(scheme, rewards=rewards, group_ids=group_ids, cosines=cos)
        assert torch.equal(a, b) and torch.equal(info["cosines"], info_b["cosines"]), scheme
    with pytest.raises(ValueError, match="cosines"):
        build_advantages("otca", rewards=rewards, group_ids=group_ids, cosines=torch.full((n, t + 1), float("nan")))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL across 2 processes needs 2 CUDA devices")
def test_two_gpus_with_nccl_equal_one(tmp_path):
    one = torchrun(1, tmp_path / "one", **{"run.device": "cuda", "train.mixed_precision": "no"})
    two = torchrun(2, tmp_path / "two", **{"run.device": "cuda", "train.mixed_precision": "no",
                                            "distributed.strategy": "fsdp"})
    _ok(one)
    _ok(two)
    a = ckpt.load_checkpoint(tmp_path / "one" / "checkpoints" / "step_00000002")
    b = ckpt.load_checkpoint(tmp_path / "two" / "checkpoints" / "step_00000002")
    assert _max_diff(a["weights"], b["weights"]) <= 1e-5  # GPU reductions are not bit-stable across batch splits

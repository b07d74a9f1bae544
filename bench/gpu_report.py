"""One table of the fused ops on a GPU: ms per call, achieved GB/s, ratio to eager, extra peak memory.

    python bench/gpu_report.py [--no-compile] [--json PATH]

For each latent size (SD3.5-M 512 px, FLUX 720 px, Wan2.1 240p/33f and 480p/81f) and batch 1 and 4,
in bf16: forward + backward of ``ops.grpo_step_loss`` against the eager Flow-GRPO computation
(``bench/eager_baseline.py``) and ``torch.compile`` of the reference, and the rollout step
``ops.sde_step`` against Flow-GRPO's ``sde_step_with_logprob``.

Bytes that must move: forward reads x, v, x' once; backward reads them again and writes the
gradient — 7 latent-sized tensors per fused forward+backward; the rollout step reads x, v and the
float32 noise and writes x' and μ. GB/s is those bytes over the median time, compared with the
measured device-to-device copy bandwidth. Times are CUDA-event medians over rotating input sets
(so the 50 MB L2 does not hold the inputs). Exits non-zero if a result is not finite.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eager_baseline import flow_grpo_loss, flow_grpo_sde_step_with_logprob  # noqa: E402
from latent_sizes import BATCHES, GPU_SIZES  # noqa: E402
from otca_fast import ops, reference  # noqa: E402

SIGMA, SIGMA_NEXT, SIGMA_MAX = 0.7, 0.65, 0.96
DTYPE = torch.bfloat16
N_SETS = 3


def median_ms(fn, inputs, reps: int = 40, warmup: int = 5) -> float:
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        args = inputs[i % len(inputs)]
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_ms(fn, inputs, reps: int = 60) -> float:
    """Median time of a CUDA-graph replay of ``fn``: the device time alone, without host launch cost."""
    graphs = []
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for args in inputs:
            for _ in range(3):
                fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    for args in inputs:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(*args)
        graphs.append(graph)
    return median_ms(lambda g: g.replay(), [(g,) for g in graphs], reps=reps)


def extra_peak_mb(fn, args) -> float:
    """Peak memory allocated during one call beyond what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(*args)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth_gbs() -> float:
    src = torch.empty(2**28, dtype=torch.float32, device="cuda").normal_()  # 1 GiB
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), [()], reps=20)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def make_inputs(shape, batch):
    full = (batch, *shape)
    sets = []
    for _ in range(N_SETS):
        x = torch.randn(full, device="cuda", dtype=DTYPE)
        v = torch.randn(full, device="cuda", dtype=DTYPE)
        xp, logp, _, _ = ops.sde_step(x, v, SIGMA, SIGMA_NEXT)
        v_train = (v.float() + 0.01 * torch.randn_like(v, dtype=torch.float32)).to(DTYPE).requires_grad_()
        adv = torch.randn(batch, device="cuda")
        sets.append((x, v_train, xp, logp, adv))
    return sets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_report.py needs a CUDA GPU", file=sys.stderr)
        return 2
    torch._dynamo.config.cache_size_limit = 64
    name = torch.cuda.get_device_name(0)
    copy_bw = copy_bandwidth_gbs()
    print(f"device: {name}, torch {torch.__version__}, dtype bf16, device-to-device copy {copy_bw:.0f} GB/s")

    def fused(x, v, xp, old, adv):
        v.grad = None
        ops.grpo_step_loss(x, v, xp, old, adv, SIGMA, SIGMA_NEXT, check_finite=False)[0].backward()

    def fused_checked(x, v, xp, old, adv):
        v.grad = None
        ops.grpo_step_loss(x, v, xp, old, adv, SIGMA, SIGMA_NEXT)[0].backward()

    # Flow-GRPO reads its sigmas from a device tensor (scheduler.sigmas): no host copy per call
    sig, sig_next, sig_max = (torch.tensor(s, device="cuda") for s in (SIGMA, SIGMA_NEXT, SIGMA_MAX))

    def eager(x, v, xp, old, adv):
        v.grad = None
        flow_grpo_loss(x, v, xp, old, adv, sig, sig_next, sig_max)[0].backward()

    compiled_loss = torch.compile(reference.grpo_step_loss, dynamic=False)

    def compiled(x, v, xp, old, adv):
        v.grad = None
        compiled_loss(x, v, xp, old, adv, SIGMA, SIGMA_NEXT)[0].backward()

    def rollout_fused(x, v, xp, old, adv):
        with torch.no_grad():
            ops.sde_step(x, v, SIGMA, SIGMA_NEXT)

    def rollout_eager(x, v, xp, old, adv):
        with torch.no_grad():
            out = flow_grpo_sde_step_with_logprob(x, v, sig, sig_next, sig_max)
            out[0].to(DTYPE)

    rows = []
    ok = True
    for size, shape in GPU_SIZES.items():
        for batch in BATCHES:
            inputs = make_inputs(shape, batch)
            numel = batch * int(torch.tensor(shape).prod())
            elt = torch.finfo(DTYPE).bits // 8
            row = {"size": size, "batch": batch, "elements": numel}
            impls = {"fused": fused, "fused_checked": fused_checked, "eager": eager}
            if not args.no_compile:
                impls["compiled"] = compiled
            for label, fn in impls.items():
                row[f"{label}_ms"] = median_ms(fn, inputs)
                row[f"{label}_extra_mb"] = extra_peak_mb(fn, inputs[0])
                grad = inputs[0][1].grad
                ok &= grad is not None and bool(torch.isfinite(grad.float()).all())
            row["fused_graph_ms"] = graph_ms(fused, inputs)
            row["eager_graph_ms"] = graph_ms(eager, inputs)
            row["fused_gbs"] = 7 * numel * elt / (row["fused_ms"] * 1e-3) / 1e9
            row["fused_graph_gbs"] = 7 * numel * elt / (row["fused_graph_ms"] * 1e-3) / 1e9
            row["speedup_vs_eager"] = row["eager_ms"] / row["fused_ms"]
            row["rollout_fused_ms"] = median_ms(rollout_fused, inputs)
            row["rollout_eager_ms"] = median_ms(rollout_eager, inputs)
            row["rollout_fused_gbs"] = (4 * elt + 4) * numel / (row["rollout_fused_ms"] * 1e-3) / 1e9
            rows.append(row)
            del inputs
            torch.cuda.empty_cache()

    header = (f"{'size':<14}{'B':>2} | {'fused ms':>9}{'chk ms':>8}{'eager ms':>9}{'x eager':>8}{'compile':>9}"
              f" | {'graph ms fused/eager':>21}{'x':>6}{'GB/s':>7}{'%copy':>6}"
              f" | {'extra MB fused/eager/compile':>29} | {'rollout ms fused/eager':>23}")
    print(header)
    print("-" * len(header))
    for r in rows:
        comp = f"{r['compiled_ms']:9.3f}" if "compiled_ms" in r else f"{'-':>9}"
        mem = f"{r['fused_extra_mb']:.1f}/{r['eager_extra_mb']:.1f}/" + (
            f"{r['compiled_extra_mb']:.1f}" if "compiled_extra_mb" in r else "-")
        graph = f"{r['fused_graph_ms']:.3f}/{r['eager_graph_ms']:.3f}"
        print(f"{r['size']:<14}{r['batch']:>2} | {r['fused_ms']:9.3f}{r['fused_checked_ms']:8.3f}{r['eager_ms']:9.3f}"
              f"{r['speedup_vs_eager']:8.2f}{comp} | {graph:>21}{r['eager_graph_ms'] / r['fused_graph_ms']:6.2f}"
              f"{r['fused_graph_gbs']:7.0f}{100 * r['fused_graph_gbs'] / copy_bw:6.0f} | {mem:>29} | "
              f"{r['rollout_fused_ms']:>11.3f}/{r['rollout_eager_ms']:.3f}")
    print("fused = ops.grpo_step_loss(check_finite=False) fwd+bwd, launched from Python per call; chk = the same with "
          "the default per-call NaN check (one device sync); graph = the same fwd+bwd replayed from a CUDA graph "
          "(device time without host launch cost), GB/s = 7 latent tensors moved / graph time; extra MB = peak "
          "allocated during one fwd+bwd beyond the inputs")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "copy_gbs": copy_bw, "rows": rows}, indent=1))
    if not ok:
        print("ERROR: a gradient was not finite", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

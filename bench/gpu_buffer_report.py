"""GPU report for the trajectory buffer: one table, correctness first.

    python bench/gpu_buffer_report.py [--markdown bench/buffer_results.md] [--quick]

1. Correctness (the run fails, exit 1, on any mismatch): bitwise round trips in fp32/fp16/bf16, pinned
   and pageable, for the "cuda" and "torch" backends; stream/event ordering (a producer that writes
   its latents behind a long kernel, the caller overwriting its tensor right after put, a consumer
   that uses the gathered batch at once, a put over prefetched rows, a side-stream consumer).
2. Throughput on a Wan2.1 480p group (12 samples x 21 states x 16x21x60x104 bf16, 1.06 GB): put of the
   whole group (device -> host) and gather of a training batch of 240 (sample, state) rows (host ->
   device), for the buffer pinned / pageable / pure-torch, the obvious list + torch.stack + .to(device)
   way, and everything kept on the device; against the PCIe link's nominal rate and a raw pinned copy.
3. Overlap: a gather prefetched behind a bf16 matmul chain, against the chain alone.

Needs a CUDA GPU (exits 2 without one). Times are medians of CUDA-synchronised wall-clock runs.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from otca_fast.buffer import TrajectoryBuffer, extension_status  # noqa: E402

FAILURES: list[str] = []
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def check(ok: bool, what: str) -> None:
    print(f"  [{'ok' if ok else 'FAIL'}] {what}", flush=True)
    if not ok:
        FAILURES.append(what)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    itype = INT_VIEW[b.dtype]
    return a.shape == b.shape and torch.equal(a.contiguous().view(itype).cpu(), b.contiguous().view(itype).cpu())


def timed(fn: Callable[[], object], iters: int, warmup: int = 1) -> float:
    """Median seconds per call, the GPU drained before and after each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def pcie_nominal() -> tuple[str, float | None]:
    """The link's nominal rate per direction from nvidia-smi (max generation and width)."""
    rates = {1: 2.5, 2: 5.0, 3: 8.0, 4: 16.0, 5: 32.0, 6: 64.0}  # GT/s per lane
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=pcie.link.gen.max,pcie.link.width.max",
                              "--format=csv,noheader,nounits", f"--id={torch.cuda.current_device()}"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.strip()
        gen, width = (int(v) for v in out.split(",")[:2])
    except (OSError, subprocess.SubprocessError, ValueError):
        return "unknown (nvidia-smi unavailable)", None
    encoding = 0.8 if gen <= 2 else (128 / 130 if gen <= 5 else 242 / 256)
    return f"PCIe Gen{gen} x{width}", rates.get(gen, 0.0) * width * encoding / 8


# --------------------------------------------------------------------------------------------------
# 1. Correctness
# --------------------------------------------------------------------------------------------------

def correctness(backends: list[str]) -> None:
    print("correctness")
    gen = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    for backend in backends:
        for pinned in (True, False):
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                shape = (4, 3, 16, 16)
                itype = INT_VIEW[dtype]
                info = torch.iinfo(itype)
                ref = torch.randint(info.min, info.max, (6, 5, *shape), generator=gen).to(itype).view(dtype)
                with TrajectoryBuffer(6, 5, shape, dtype=dtype, device="cuda", backend=backend,
                                      pin_memory=pinned) as buf:
                    for t in rng.sample(range(5), 5):
                        buf.put(t, ref[:3, t].cuda(), slice(0, 3))
                        buf.put(t, ref[3:, t].cuda(), slice(3, 6))
                    ok = True
                    for _ in range(6):
                        s = [rng.randrange(6) for _ in range(9)]
                        k = [rng.randrange(5) for _ in range(9)]
                        buf.prefetch(s, k)
                        ok &= same_bits(buf.gather(s, k), ref[s, k])
                        ok &= same_bits(buf.gather(range(6), k[0]), ref[:, k[0]])
                check(ok, f"{backend}: bitwise round trip {dtype}, {'pinned' if pinned else 'pageable'}")
        ordering(backend)


def ordering(backend: str) -> None:
    sleep = 50_000_000  # tens of ms of GPU time: an unordered copy would see stale data
    shape = (16, 21, 60, 26)
    with TrajectoryBuffer(8, 3, shape, dtype=torch.bfloat16, device="cuda", backend=backend) as buf:
        truth = torch.randn(8, *shape, device="cuda").bfloat16()
        x = torch.zeros_like(truth)
        for state in range(3):
            torch.cuda._sleep(sleep)
            x.copy_(truth + state)  # the producer writes behind a long kernel
            buf.put(state, x)
            x.fill_(float("nan"))  # ... and reuses its tensor as soon as put returns
        ok = all(torch.equal(buf.gather(range(8), s), truth + s) for s in range(3))
        check(ok, f"{backend}: put waits for the producer; the caller may overwrite its tensor at once")

        buf.put(0, truth * 2)
        out = buf.gather(range(8), 0)
        total = out.float().sum()  # used at once on the current stream
        check(bool(torch.isclose(total, (truth * 2).float().sum())) and torch.equal(out, truth * 2),
              f"{backend}: the consumer stream waits for the gather")

        buf.prefetch(range(8), 1)
        torch.cuda._sleep(sleep)
        buf.put(1, truth * 3)
        check(torch.equal(buf.gather(range(8), 1), truth * 3), f"{backend}: a put over prefetched rows wins")

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            buf.put(2, truth * 4)
            got = buf.gather(range(8), 2)
            ok = torch.equal(got, truth * 4)
        side.synchronize()
        check(ok, f"{backend}: put and gather on a side stream")


# --------------------------------------------------------------------------------------------------
# 2. Throughput
# --------------------------------------------------------------------------------------------------

def raw_copies(nbytes: int, iters: int) -> list[tuple]:
    """What the link gives one large transfer, pinned and pageable, each direction."""
    rows = []
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    for name, host in (("raw pinned", torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)),
                       ("raw pageable", torch.empty(nbytes, dtype=torch.uint8))):
        t_h2d = timed(lambda h=host: dev.copy_(h, non_blocking=True), iters)
        t_d2h = timed(lambda h=host: h.copy_(dev, non_blocking=True), iters)
        label = f"{name} copy_ (one {nbytes / 1e9:.2f} GB block)"
        rows += [("put (D2H)", label, nbytes, t_d2h, True), ("gather (H2D)", label, nbytes, t_h2d, True)]
    return rows


def on_device_reference(xs, samples, stepidx, expected, put_bytes, gather_bytes, iters) -> list[tuple]:
    """Everything kept on the device: no PCIe at all, the whole group held in GPU memory."""
    group = torch.empty(xs[0].shape[0], len(xs), *xs[0].shape[1:], dtype=xs[0].dtype, device="cuda")

    def put_all():
        for t, x in enumerate(xs):
            group[:, t] = x

    t_put = timed(put_all, iters)
    s_idx, t_idx = torch.tensor(samples, device="cuda"), torch.tensor(stepidx, device="cuda")
    t_gather = timed(lambda: group[s_idx, t_idx], iters)
    check(same_bits(group[s_idx, t_idx], expected), "on-device reference: full-size batch bitwise")
    return [("put (D2H)", "on device (no host copy)", put_bytes, t_put, False),
            ("gather (H2D)", "on device (no host copy)", gather_bytes, t_gather, False)]


def throughput(group: int, states: int, latent: tuple[int, ...], iters: int, backends: list[str]):
    dtype = torch.bfloat16
    row_bytes = torch.Size(latent).numel() * dtype.itemsize
    put_bytes = group * states * row_bytes
    steps = sorted(random.Random(0).sample(range(states - 1), min(10, states - 1)))
    samples = [n for n in range(group) for t in steps for _ in (0, 1)]
    stepidx = [t + k for n in range(group) for t in steps for k in (0, 1)]
    gather_bytes = len(samples) * row_bytes
    print(f"\nthroughput: group {group} x {states} states x {latent} bf16 = {put_bytes / 1e9:.2f} GB; "
          f"training batch {len(samples)} rows = {gather_bytes / 1e9:.2f} GB")
    g = torch.Generator(device="cuda").manual_seed(0)
    xs = [torch.randn(group, *latent, generator=g, device="cuda").to(dtype) for _ in range(states)]
    expected = torch.stack([xs[t][n] for n, t in zip(samples, stepidx)])
    rows = []

    rows += raw_copies(put_bytes // 2, iters)
    variants = []
    if "cuda" in backends:
        variants += [("buffer cuda, pinned", "cuda", True), ("buffer cuda, pageable", "cuda", False)]
    variants.append(("buffer torch, pinned", "torch", True))
    for name, backend, pin in variants:
        with TrajectoryBuffer(group, states, latent, dtype=dtype, device="cuda", backend=backend,
                              pin_memory=pin) as buf:
            def put_all(b=buf):
                for t, x in enumerate(xs):
                    b.put(t, x)
                b.synchronize()

            t_put = timed(put_all, max(2, iters // 2))
            t_gather = timed(lambda b=buf: b.gather(samples, stepidx), iters)
            check(same_bits(buf.gather(samples, stepidx), expected), f"{name}: full-size batch bitwise")
        rows.append(("put (D2H)", name, put_bytes, t_put, False))
        rows.append(("gather (H2D)", name, gather_bytes, t_gather, False))

    # the obvious way: a list of per-state host tensors, torch.stack, .to(device)
    kept: list[torch.Tensor] = []

    def list_put():
        kept.clear()
        kept.extend(x.to("cpu", copy=True) for x in xs)

    t_put = timed(list_put, max(2, iters // 2))

    def list_gather():
        return torch.stack([kept[t][n] for n, t in zip(samples, stepidx)]).to("cuda")

    t_gather = timed(list_gather, iters)
    check(same_bits(list_gather(), expected), "list baseline: full-size batch bitwise")
    rows.append(("put (D2H)", "list of x.to('cpu')", put_bytes, t_put, False))
    rows.append(("gather (H2D)", "list: torch.stack(...).to(device)", gather_bytes, t_gather, False))
    kept.clear()

    rows += on_device_reference(xs, samples, stepidx, expected, put_bytes, gather_bytes, iters)
    return rows, (samples, stepidx, expected)


# --------------------------------------------------------------------------------------------------
# 3. Overlap
# --------------------------------------------------------------------------------------------------

def overlap(group: int, states: int, latent: tuple[int, ...], batch, backend: str, iters: int) -> list[tuple]:
    samples, stepidx, _ = batch
    dtype = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(1)
    with TrajectoryBuffer(group, states, latent, dtype=dtype, device="cuda", backend=backend) as buf:
        for t in range(states):
            buf.put(t, torch.randn(group, *latent, generator=g, device="cuda").to(dtype))
        buf.synchronize()
        want = buf.gather(samples, stepidx).clone()
        t_gather = timed(lambda: buf.gather(samples, stepidx), iters)
        a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
        b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
        t_mm = timed(lambda: a @ b, iters)
        k = max(1, round(1.5 * t_gather / t_mm))  # compute 1.5x as long as the copy

        def compute():
            c = a
            for _ in range(k):
                c = a @ b
            return c

        def serial():
            out = buf.gather(samples, stepidx)
            compute()
            return out

        def overlapped():
            buf.prefetch(samples, stepidx)  # the copy starts now, on the copy stream
            compute()  # queued on the current stream, runs concurrently with the copy
            return buf.gather(samples, stepidx)  # current stream waits for the copy's event

        t_compute = timed(compute, iters)
        t_serial = timed(serial, iters)
        t_overlap = timed(overlapped, iters)
        check(same_bits(overlapped(), want), f"{backend}: overlapped gather bitwise")
    extra = t_overlap - t_compute
    print(f"\noverlap ({backend}): gather {t_gather * 1e3:.2f} ms alone, {k} bf16 8192^3 matmuls "
          f"{t_compute * 1e3:.2f} ms alone; gather then matmuls {t_serial * 1e3:.2f} ms; prefetch behind the matmuls "
          f"{t_overlap * 1e3:.2f} ms: the overlapped gather costs {extra * 1e3:+.2f} ms "
          f"({100 * extra / t_gather:+.1f}% of its own time)")
    return [("overlap", f"{backend}: gather alone", t_gather), ("overlap", f"{backend}: matmuls alone", t_compute),
            ("overlap", f"{backend}: gather, then matmuls", t_serial),
            ("overlap", f"{backend}: prefetch behind matmuls", t_overlap),
            ("overlap", f"{backend}: extra cost of the overlapped gather", extra)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", type=Path, help="also write the table as markdown to this file")
    parser.add_argument("--quick", action="store_true", help="a 1/4-size group and fewer repeats (smoke run)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_buffer_report.py needs a CUDA GPU", file=sys.stderr)
        return 2
    latent = (16, 21, 30, 52) if args.quick else (16, 21, 60, 104)
    group, states, iters = 12, 21, (3 if args.quick else 7)
    status = extension_status()
    link, nominal = pcie_nominal()
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} (CUDA {torch.version.cuda}) | "
          f"{link}{f', nominal {nominal:.1f} GB/s per direction' if nominal else ''}")
    print(f"compiled buffer: {status}")
    backends = ["cuda", "torch"] if status["with_cuda"] else ["torch"]
    if not status["with_cuda"]:
        FAILURES.append(f"no CUDA build of the compiled buffer ({status['source']}): only the torch backend ran")

    correctness(backends)
    rows, batch = throughput(group, states, latent, iters, backends)
    over = overlap(group, states, latent, batch, backends[0], iters)

    raw = {op: max(n / t for o, name, n, t, is_raw in rows if is_raw and o == op and "pinned" in name)
           for op in ("put (D2H)", "gather (H2D)")}
    header = ["operation", "variant", "GB/s", "ms", "% raw pinned"] + (["% PCIe nominal"] if nominal else [])
    table = []
    for op, name, nbytes, t, _ in rows:
        gbs = nbytes / t / 1e9
        line = [op, name, f"{gbs:.1f}", f"{t * 1e3:.2f}", f"{100 * nbytes / t / raw[op]:.0f}%"]
        if nominal:
            line.append(f"{100 * gbs / nominal:.0f}%")
        table.append(line)
    for op, name, t in over:
        table.append([op, name, "", f"{t * 1e3:+.2f}" if "extra" in name else f"{t * 1e3:.2f}", ""]
                     + ([""] if nominal else []))
    widths = [max(len(str(r[i])) for r in [header, *table]) for i in range(len(header))]
    print()
    for r in [header, ["-" * w for w in widths], *table]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    if args.markdown:
        md = [f"Trajectory buffer on {torch.cuda.get_device_name()} ({link}; torch {torch.__version__}); "
              f"`python bench/gpu_buffer_report.py{' --quick' if args.quick else ''}`", "",
              "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        md += ["| " + " | ".join(r) + " |" for r in table]
        args.markdown.write_text("\n".join(md) + "\n")
        print(f"\nmarkdown written to {args.markdown}")
    if FAILURES:
        print(f"\n{len(FAILURES)} FAILURE(S):", *FAILURES, sep="\n  ", file=sys.stderr)
        return 1
    print("\nall correctness checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

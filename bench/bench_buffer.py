"""Trajectory buffer throughput: put a whole Wan 480p trajectory group, gather a training batch.

    pytest bench/bench_buffer.py --benchmark-only --benchmark-group-by=func --benchmark-columns=mean,stddev,rounds

Against the obvious pure-torch way: a Python list with one tensor per state (``x.to("cpu", copy=True)``
on put) and ``torch.stack([...]).to(device)`` on gather. Every case records its throughput as
``extra_info["GB/s"]`` (bytes moved / mean time; shown with ``--benchmark-json``) and checks the bits
it gathered (outside the timed region); no timing is asserted.

Sizes: on a GPU the real group, 12 samples x 21 states of 16x21x60x104 bf16 latents (1.06 GB), with
the buffer pinned, pageable, and everything kept on the device as a third reference; on a CPU the
same group at 1/16 of the spatial size (16x21x15x26, 66 MB: larger than the caches, so the copies are
memory-bound as on the real size). ``bench/gpu_buffer_report.py`` prints the GPU table against the
PCIe limit, with the overlap demonstration.
"""

from __future__ import annotations

import random

import pytest
import torch

from latent_sizes import GPU_SIZES
from otca_fast.buffer import TrajectoryBuffer, extension_status

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda", torch.cuda.current_device()) if CUDA else torch.device("cpu")
DTYPE = torch.bfloat16
GROUP, STATES = 12, 21
LATENT = GPU_SIZES["wan_480p_81f"] if CUDA else (16, 21, 15, 26)
# A training batch: every sample at 10 of the 20 steps (CFG-free Flow-GRPO trains a random subset of
# steps), as (x_t, x_{t+1}) pairs, so 240 rows; in sample-major order, as a trainer iterates.
TRAIN_STEPS = sorted(random.Random(0).sample(range(STATES - 1), 10))
SAMPLES = [n for n in range(GROUP) for t in TRAIN_STEPS for _ in (0, 1)]
STEPS = [t + k for n in range(GROUP) for t in TRAIN_STEPS for k in (0, 1)]

ROW_BYTES = torch.Size(LATENT).numel() * DTYPE.itemsize
PUT_BYTES = GROUP * STATES * ROW_BYTES
GATHER_BYTES = len(SAMPLES) * ROW_BYTES


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _record(benchmark, nbytes: int) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.mean > 0:
        benchmark.extra_info["GB/s"] = round(nbytes / stats.stats.mean / 1e9, 2)
    benchmark.extra_info["bytes"] = nbytes


@pytest.fixture(scope="module")
def states() -> list[torch.Tensor]:
    """The group's 21 states on the device, [GROUP, *LATENT] each."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    return [torch.randn(GROUP, *LATENT, generator=g, device=DEVICE).to(DTYPE) for _ in range(STATES)]


@pytest.fixture(scope="module")
def expected(states) -> torch.Tensor:
    return torch.stack([states[t][n] for n, t in zip(SAMPLES, STEPS)])


VARIANTS = ["cuda-pinned", "cuda-pageable", "torch-pinned"] if CUDA else ["cpp", "torch"]


def _make(variant: str) -> TrajectoryBuffer:
    if variant in ("cpp", "cuda-pinned", "cuda-pageable") and not extension_status()["available"]:
        pytest.skip(f"compiled buffer unavailable: {extension_status()['source']}")
    if variant == "cuda-pageable" and not extension_status()["with_cuda"]:
        pytest.skip("the compiled buffer has no CUDA variant here")
    backend = {"cpp": "cpp", "torch": "torch", "cuda-pinned": "cuda", "cuda-pageable": "cuda",
               "torch-pinned": "torch"}[variant]
    return TrajectoryBuffer(GROUP, STATES, LATENT, dtype=DTYPE, device=DEVICE, backend=backend,
                            pin_memory=(variant != "cuda-pageable") if CUDA else False)


@pytest.mark.parametrize("variant", VARIANTS)
def test_put_group(benchmark, states, variant):
    with _make(variant) as buf:
        def put_all():
            for t, x in enumerate(states):
                buf.put(t, x)
            buf.synchronize()  # GB/s counts bytes that have landed on the host

        benchmark(put_all)
        _record(benchmark, PUT_BYTES)
        assert torch.equal(buf.gather(range(GROUP), STATES - 1), states[-1])


def test_put_group_list_baseline(benchmark, states):
    """The obvious way: one host copy per state in a Python list."""
    def put_all():
        kept = [x.to("cpu", copy=True) for x in states]
        _sync()
        return kept

    kept = benchmark(put_all)
    _record(benchmark, PUT_BYTES)
    assert torch.equal(kept[-1], states[-1].cpu())


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("prefetched", [False, True], ids=["gather", "prefetch+gather"])
def test_gather_batch(benchmark, states, expected, variant, prefetched):
    with _make(variant) as buf:
        for t, x in enumerate(states):
            buf.put(t, x)
        buf.synchronize()

        def gather():
            if prefetched:  # no compute to hide behind here: measures the prefetch path's own cost
                buf.prefetch(SAMPLES, STEPS)
            out = buf.gather(SAMPLES, STEPS)
            _sync()
            return out

        out = benchmark(gather)
        _record(benchmark, GATHER_BYTES)
        assert torch.equal(out, expected)


def test_gather_batch_list_baseline(benchmark, states, expected):
    """The obvious way: index the per-state host tensors, torch.stack, .to(device)."""
    kept = [x.to("cpu", copy=True) for x in states]

    def gather():
        out = torch.stack([kept[t][n] for n, t in zip(SAMPLES, STEPS)]).to(DEVICE)
        _sync()
        return out

    out = benchmark(gather)
    _record(benchmark, GATHER_BYTES)
    assert torch.equal(out, expected)


@pytest.mark.skipif(not CUDA, reason="needs CUDA: the on-device reference keeps the group in GPU memory")
def test_gather_batch_on_device_reference(benchmark, states, expected):
    """Everything kept on the device (no host traffic): the speed of light, at 1 GB of GPU memory."""
    group = torch.stack(states, dim=1)  # [GROUP, STATES, *LATENT] on the device
    samples = torch.tensor(SAMPLES, device=DEVICE)
    steps = torch.tensor(STEPS, device=DEVICE)

    def gather():
        out = group[samples, steps]
        _sync()
        return out

    out = benchmark(gather)
    _record(benchmark, GATHER_BYTES)
    assert torch.equal(out, expected)

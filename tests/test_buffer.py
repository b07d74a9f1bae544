"""TrajectoryBuffer: bitwise round trips, prefetch/put ordering, extras, reset, every error, many buffers,
and the pure-torch backend against the compiled one.

CPU tests run on both the compiled backend ("cpp") and the pure-torch one ("torch"). If the compiled
extension is neither installed nor buildable, the "cpp" cases skip and say why, unless
``OTCA_FAST_REQUIRE_CPP=1`` (CI), which makes them fail instead. The first run may build the
extension just in time (about a minute on 2 cores, cached in ``TORCH_EXTENSIONS_DIR``).

CUDA tests (stream/event ordering, pinned vs pageable) run on "cuda" and "torch" when a GPU is present.
"""

from __future__ import annotations

import os
import random
import stat
import warnings

import pytest
import torch

from otca_fast import buffer as buffer_mod
from otca_fast.buffer import TrajectoryBuffer, extension_status

REQUIRE_CPP = os.environ.get("OTCA_FAST_REQUIRE_CPP", "0") not in ("", "0")
HAS_CUDA = torch.cuda.is_available()
_skip_without_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (stream/event ordering runs on a GPU only)")


def needs_cuda(test):
    """Marks a GPU test: selectable with ``-m gpu``, skipped (saying so) without CUDA."""
    return pytest.mark.gpu(_skip_without_cuda(test))

INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _compiled_or_skip() -> None:
    status = extension_status()
    if status["available"]:
        return
    if REQUIRE_CPP:
        pytest.fail(f"OTCA_FAST_REQUIRE_CPP=1 but the compiled buffer is unavailable: {status['source']}")
    pytest.skip(f"compiled buffer unavailable: {status['source']}")


@pytest.fixture(params=["cpp", "torch"])
def backend(request) -> str:
    if request.param == "cpp":
        _compiled_or_skip()
    return request.param


@pytest.fixture(params=["cuda", "torch"])
def cuda_backend(request) -> str:
    if not HAS_CUDA:
        pytest.skip("needs CUDA (stream/event ordering runs on a GPU only)")
    if request.param == "cuda":
        status = extension_status()
        if not status["with_cuda"]:
            if REQUIRE_CPP:
                pytest.fail(f"OTCA_FAST_REQUIRE_CPP=1 but no CUDA build of the buffer: {status['source']}")
            pytest.skip(f"no CUDA build of the compiled buffer: {status['source']}")
    return request.param


def random_bits(shape, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Uniformly random bit patterns (NaN payloads, infinities, -0, subnormals included)."""
    itype = INT_VIEW[dtype]
    info = torch.iinfo(itype)
    return torch.randint(info.min, info.max, tuple(shape), generator=gen, dtype=torch.int64).to(itype).view(dtype)


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    itype = INT_VIEW[expected.dtype]
    a, e = actual.cpu().contiguous().view(itype), expected.cpu().contiguous().view(itype)
    if not torch.equal(a, e):
        bad = (a != e).nonzero()[:5].tolist()
        raise AssertionError(f"bitwise mismatch at {bad} (of {int((a != e).sum())} elements)")


class Model:
    """The obvious reference: a dense tensor and a written mask."""

    def __init__(self, n: int, t: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.data = torch.zeros(n, t, *shape, dtype=dtype)
        self.written = torch.zeros(n, t, dtype=torch.bool)

    def put(self, state: int, values: torch.Tensor, start: int) -> None:
        self.data[start:start + values.shape[0], state] = values.cpu()
        self.written[start:start + values.shape[0], state] = True

    def readable(self, samples, states) -> bool:
        return bool(self.written[torch.as_tensor(samples), torch.as_tensor(states)].all())

    def gather(self, samples, states) -> torch.Tensor:
        return self.data[torch.as_tensor(samples), torch.as_tensor(states)]


def random_slices(n: int, rng: random.Random) -> list[slice]:
    """A random partition of [0, n) into contiguous slices."""
    cuts = sorted(rng.sample(range(1, n), rng.randint(0, n - 1))) if n > 1 else []
    bounds = [0, *cuts, n]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def fill(buf: TrajectoryBuffer, model: Model, rng: random.Random, gen: torch.Generator, device="cpu") -> None:
    """Write every (sample, state) in a random order of states and random partial slices."""
    states = list(range(buf.num_states))
    rng.shuffle(states)
    for t in states:
        slices = random_slices(buf.num_samples, rng)
        rng.shuffle(slices)
        for sl in slices:
            values = random_bits((sl.stop - sl.start, *buf.latent_shape), buf.dtype, gen).to(device)
            buf.put(t, values, sl)
            model.put(t, values, sl.start)


# ------------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_bitwise(backend, dtype):
    rng, gen = random.Random(7), torch.Generator().manual_seed(7)
    shape = (3, 4, 6)
    with TrajectoryBuffer(7, 5, shape, dtype=dtype, device="cpu", backend=backend) as buf:
        assert buf.backend == backend and not buf.pinned and buf.nbytes == 7 * 5 * 72 * dtype.itemsize
        model = Model(7, 5, shape, dtype)
        fill(buf, model, rng, gen)
        # overwrite a random subset again, in random order
        for _ in range(6):
            t = rng.randrange(5)
            a = rng.randrange(7)
            b = rng.randrange(a + 1, 8)
            values = random_bits((b - a, *shape), dtype, gen)
            buf.put(t, values, slice(a, b))
            model.put(t, values, a)
        for _ in range(10):
            m = rng.randint(1, 20)  # repeats and any order
            samples = [rng.randrange(7) for _ in range(m)]
            states = [rng.randrange(5) for _ in range(m)]
            assert_bitwise(buf.gather(samples, states), model.gather(samples, states))
            buf.prefetch(samples, states)
            assert_bitwise(buf.gather(samples, states), model.gather(samples, states))
        everything = buf.gather(torch.arange(7).repeat_interleave(5), torch.arange(5).repeat(7))
        assert_bitwise(everything.view(7, 5, *shape), model.data)


def test_non_contiguous_and_broadcast_indices(backend):
    gen = torch.Generator().manual_seed(3)
    with TrajectoryBuffer(4, 3, (2, 3, 5), dtype=torch.float32, device="cpu", backend=backend) as buf:
        base = random_bits((4, 5, 3, 2), torch.float32, gen)
        latents = base.permute(0, 3, 2, 1)  # (4, 2, 3, 5), non-contiguous
        assert not latents.is_contiguous()
        buf.put(1, latents)
        assert_bitwise(buf.gather(range(4), 1), latents.contiguous())
        assert_bitwise(buf.gather(2, [1, 1]), torch.stack([latents[2], latents[2]]))
        assert_bitwise(buf.gather(torch.tensor([3, 0], dtype=torch.int32), torch.tensor(1)), latents[[3, 0]])
        empty = buf.gather([], [])
        assert empty.shape == (0, 2, 3, 5) and empty.dtype == torch.float32
        buf.put(2, latents[:0], slice(4, 4))  # an empty slice is a no-op, not an error
        with pytest.raises(ValueError, match="never written"):
            buf.gather(0, 2)


def test_cpu_latents_are_copied_at_once(backend):
    """put() returns with the values stored: overwriting the source afterwards changes nothing."""
    with TrajectoryBuffer(3, 2, (8,), dtype=torch.bfloat16, device="cpu", backend=backend) as buf:
        x = torch.randn(3, 8).bfloat16()
        kept = x.clone()
        buf.put(0, x)
        x.fill_(float("nan"))
        assert_bitwise(buf.gather(range(3), 0), kept)


def test_gathered_tensors_stay_valid_while_referenced(backend):
    """Gather outputs may be recycled (the C++ CPU engine pools them to avoid page faults), but never
    while the caller holds the tensor, a view of it, or its storage."""
    gen = torch.Generator().manual_seed(8)
    with TrajectoryBuffer(4, 3, (16,), dtype=torch.float32, device="cpu", backend=backend) as buf:
        model = Model(4, 3, (16,), torch.float32)
        fill(buf, model, random.Random(8), gen)
        first = buf.gather(range(4), 0)
        view = buf.gather(range(4), 1)[2:]  # only a view survives
        storage = buf.gather(range(4), 2).untyped_storage()  # only the storage survives
        buf.prefetch(range(4), 1)
        for k in range(6):  # churn: every free block gets reused
            assert_bitwise(buf.gather([k % 4, 3], [k % 3, 2]), model.gather([k % 4, 3], [k % 3, 2]))
        assert_bitwise(first, model.data[:, 0])
        assert_bitwise(view, model.data[2:, 1])
        kept = torch.empty(0, dtype=torch.float32).set_(storage)[:64].view(4, 16)
        assert_bitwise(kept, model.data[:, 2])
        assert_bitwise(buf.gather(range(4), 1), model.data[:, 1])  # the prefetched batch


# ------------------------------------------------------------------------------------------------
# Prefetch ordering: whatever the order of calls, a gather returns what a synchronous gather would
# ------------------------------------------------------------------------------------------------

def test_prefetch_is_consumed_and_retired(backend):
    gen = torch.Generator().manual_seed(11)
    with TrajectoryBuffer(5, 4, (6,), dtype=torch.float32, device="cpu", backend=backend) as buf:
        model = Model(5, 4, (6,), torch.float32)
        fill(buf, model, random.Random(11), gen)
        pending = buf._core.num_pending
        a, b, c = ([0, 1], [2, 2]), ([3], [0]), ([4, 4], [1, 3])
        buf.prefetch(*a)
        assert pending() == 1
        assert_bitwise(buf.gather(*b), model.gather(*b))  # a different batch leaves the prefetch alone
        assert pending() == 1
        assert_bitwise(buf.gather(*a), model.gather(*a))  # the matching one is consumed
        assert pending() == 0
        buf.prefetch(*a)
        buf.prefetch(*b)
        buf.prefetch(*c)  # at most two stay in flight
        assert pending() == 2
        assert_bitwise(buf.gather(*c), model.gather(*c))  # consuming c retires the older b
        assert pending() == 0


def test_put_retires_overlapping_prefetch(backend):
    gen = torch.Generator().manual_seed(5)
    with TrajectoryBuffer(6, 3, (4, 4), dtype=torch.float16, device="cpu", backend=backend) as buf:
        model = Model(6, 3, (4, 4), torch.float16)
        fill(buf, model, random.Random(5), gen)
        pairs = ([0, 2, 5], [1, 1, 2])
        other = ([1], [0])
        buf.prefetch(*pairs)
        buf.prefetch(*other)
        new = random_bits((2, 4, 4), torch.float16, gen)
        buf.put(1, new, slice(2, 4))  # overwrites (2, 1), which the first prefetch read
        model.put(1, new, 2)
        assert buf._core.num_pending() == 1  # only the overlapping prefetch was retired
        assert_bitwise(buf.gather(*pairs), model.gather(*pairs))
        assert_bitwise(buf.gather(*other), model.gather(*other))


def test_reset_drops_prefetches_and_written_state(backend):
    with TrajectoryBuffer(3, 2, (5,), dtype=torch.float32, device="cpu", backend=backend,
                          extras={"lp": ((3, 2), torch.float32)}) as buf:
        buf.put(0, torch.randn(3, 5))
        buf.put_extra("lp", torch.randn(3, 2))
        buf.prefetch(range(3), 0)
        buf.reset()
        assert buf._core.num_pending() == 0
        with pytest.raises(ValueError, match=r"\(sample 0, state 0\) was never written since the last reset"):
            buf.gather(0, 0)
        with pytest.raises(ValueError, match="never written"):
            buf.extra("lp")
        x = torch.randn(3, 5)
        buf.put(0, x)
        assert torch.equal(buf.gather(range(3), 0), x)


def test_random_call_orders_match_the_model(backend):
    """Random interleavings of put / prefetch / gather / reset against the dense reference."""
    rng, gen = random.Random(2024), torch.Generator().manual_seed(2024)
    n, t, shape, dtype = 6, 4, (3, 5), torch.bfloat16
    with TrajectoryBuffer(n, t, shape, dtype=dtype, device="cpu", backend=backend) as buf:
        model = Model(n, t, shape, dtype)
        prefetched: list[tuple[list[int], list[int]]] = []
        checked = refused = 0
        for _ in range(300):
            op = rng.random()
            if op < 0.45:
                state, a = rng.randrange(t), rng.randrange(n)
                b = rng.randrange(a + 1, n + 1)
                values = random_bits((b - a, *shape), dtype, gen)
                buf.put(state, values, slice(a, b))
                model.put(state, values, a)
            elif op < 0.985:
                if prefetched and rng.random() < 0.5:
                    samples, states = prefetched.pop(rng.randrange(len(prefetched)))
                else:
                    m = rng.randint(1, 8)
                    written = model.written.nonzero().tolist()
                    if written and rng.random() < 0.75:  # mostly pairs that can be read, sometimes any
                        samples, states = (list(c) for c in zip(*rng.choices(written, k=m)))
                    else:
                        samples = [rng.randrange(n) for _ in range(m)]
                        states = [rng.randrange(t) for _ in range(m)]
                prefetch = rng.random() < 0.4
                call = buf.prefetch if prefetch else buf.gather
                if not model.readable(samples, states):
                    with pytest.raises(ValueError, match="never written"):
                        call(samples, states)
                    refused += 1
                elif prefetch:
                    call(samples, states)
                    prefetched.append((samples, states))
                else:
                    assert_bitwise(call(samples, states), model.gather(samples, states))
                    checked += 1
            else:
                buf.reset()
                model.written.zero_()
                prefetched.clear()
        assert checked > 50 and refused > 15  # the sequence really exercised both outcomes


def test_backends_agree():
    """Same calls, same bits: the pure-torch fallback against the compiled backend."""
    _compiled_or_skip()
    outputs = {}
    for name in ("cpp", "torch"):
        rng, gen = random.Random(99), torch.Generator().manual_seed(99)
        with TrajectoryBuffer(5, 6, (2, 7), dtype=torch.float16, device="cpu", backend=name) as buf:
            fill(buf, Model(5, 6, (2, 7), torch.float16), rng, gen)
            idx = [(rng.choices(range(5), k=9), rng.choices(range(6), k=9)) for _ in range(4)]
            buf.prefetch(*idx[0])
            outputs[name] = [buf.gather(*i) for i in idx]
    for a, b in zip(outputs["cpp"], outputs["torch"]):
        assert_bitwise(a, b)


# ------------------------------------------------------------------------------------------------
# Extras
# ------------------------------------------------------------------------------------------------

def test_extras_round_trip(backend):
    extras = {"log_prob": ((4, 3), torch.float32), "rewards": ((4, 2), torch.float64),
              "group": ((4,), torch.int64)}
    with TrajectoryBuffer(4, 4, (2,), dtype=torch.float32, device="cpu", backend=backend, extras=extras) as buf:
        assert buf.extra_names == ("log_prob", "rewards", "group")
        assert buf.nbytes == 4 * 4 * 2 * 4 + 4 * 3 * 4 + 4 * 2 * 8 + 4 * 8
        lp = torch.randn(4, 3)
        buf.put_extra("log_prob", lp[:1], slice(0, 1))
        with pytest.raises(ValueError, match=r"rows \[1, 2, 3\] of 'log_prob' were never written"):
            buf.extra("log_prob")
        buf.put_extra("log_prob", lp[1:], slice(1, 4))
        got = buf.extra("log_prob")
        assert torch.equal(got, lp)
        got.zero_()  # a copy: the buffer keeps its values
        assert torch.equal(buf.extra("log_prob"), lp)
        group = torch.tensor([0, 0, 1, 1])
        buf.put_extra("group", group)
        group[0] = 9  # the caller's tensor is free once put_extra returned
        assert buf.extra("group").tolist() == [0, 0, 1, 1]
        rewards = torch.randn(4, 2, dtype=torch.float64)
        buf.put_extra("rewards", rewards)
        assert torch.equal(buf.extra("rewards"), rewards)


# ------------------------------------------------------------------------------------------------
# Errors, never garbage
# ------------------------------------------------------------------------------------------------

def _make(default_backend, **kw):
    args = {"num_samples": 4, "num_states": 3, "latent_shape": (2, 3), "dtype": torch.float32, "device": "cpu",
            "backend": default_backend}
    args.update(kw)
    return TrajectoryBuffer(args.pop("num_samples"), args.pop("num_states"), args.pop("latent_shape"), **args)


@pytest.mark.parametrize(("kwargs", "exc", "match"), [
    ({"num_samples": 0}, ValueError, "num_samples must be positive, got 0"),
    ({"num_samples": 2.0}, TypeError, "num_samples must be an int, got float"),
    ({"num_states": True}, TypeError, "num_states must be an int, got bool"),
    ({"latent_shape": ()}, ValueError, "latent_shape must have at least one dimension"),
    ({"latent_shape": (2, 0)}, ValueError, r"latent_shape\[1\] must be positive, got 0"),
    ({"latent_shape": "22"}, TypeError, "latent_shape must be a sequence of ints, got str"),
    ({"dtype": torch.int32}, TypeError, "dtype must be a floating-point dtype"),
    ({"dtype": "float32"}, TypeError, "dtype must be a torch.dtype, got str"),
    ({"device": "meta"}, ValueError, "device must be a cpu or cuda device, got meta"),
    ({"device": "nonsense"}, ValueError, "device must be 'cpu', 'cuda' or 'cuda:<index>'"),
    ({"pin_memory": True}, ValueError, "pin_memory=True needs a CUDA device"),
    ({"pin_memory": 1}, TypeError, "pin_memory must be a bool or None, got int"),
    ({"backend": "gpu"}, ValueError, "backend must be one of"),
    ({"backend": "cuda"}, ValueError, "backend='cuda' does not serve device cpu"),
    ({"extras": [("a", ((2,), torch.float32))]}, TypeError, "extras must be a mapping"),
    ({"extras": {"a": ((2,),)}}, TypeError, r"extras\['a'\] must be a \(shape, dtype\) pair"),
    ({"extras": {"a": ((2, -1), torch.float32)}}, ValueError, r"extras\['a'\] shape\[1\] must be positive"),
    ({"extras": {"a": ((2,), "f4")}}, TypeError, r"extras\['a'\] dtype must be a torch.dtype"),
])
def test_constructor_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _make("torch", **kwargs)


@pytest.mark.skipif(HAS_CUDA, reason="checks the message given on machines without CUDA")
def test_cuda_device_without_cuda_is_an_error():
    with pytest.raises(ValueError, match="CUDA is not available here; pass device='cpu'"):
        TrajectoryBuffer(2, 2, (3,))  # the default device is cuda


def test_put_errors(backend):
    with _make(backend) as buf:
        good = torch.zeros(4, 2, 3)
        cases = [
            (lambda: buf.put(3, good), ValueError, r"state_index = 3 is outside \[0, 3\)"),
            (lambda: buf.put(-1, good), ValueError, r"state_index = -1 is outside \[0, 3\)"),
            (lambda: buf.put(1.0, good), TypeError, "state_index must be an int, got float"),
            (lambda: buf.put(0, good.numpy()), TypeError, "latents must be a torch.Tensor, got ndarray"),
            (lambda: buf.put(0, good.double()), TypeError, "latents dtype must be torch.float32"),
            (lambda: buf.put(0, torch.zeros(4, 3, 2)), ValueError, r"latents must have shape \(4, 2, 3\)"),
            (lambda: buf.put(0, torch.zeros(4, 6)), ValueError, r"latents must have shape \(4, 2, 3\)"),
            (lambda: buf.put(0, good, slice(0, 2)), ValueError, r"latents must have shape \(2, 2, 3\)"),
            (lambda: buf.put(0, good[:2], slice(3, 5)), ValueError, r"\[3:5\] is outside the capacity \[0:4\]"),
            (lambda: buf.put(0, good[:2], slice(-2, None)), ValueError, "outside the capacity"),
            (lambda: buf.put(0, good[:2], slice(0, 4, 2)), ValueError, "sample_slice must have step 1"),
            (lambda: buf.put(0, good[:1], 1), TypeError, "sample_slice must be a slice or None, got int"),
            (lambda: buf.put(0, good.to("meta")), ValueError, "latents must be on cpu, got meta"),
        ]
        for call, exc, match in cases:
            with pytest.raises(exc, match=match):
                call()
        # nothing was written by the failed calls
        with pytest.raises(ValueError, match="never written"):
            buf.gather(0, 0)


def test_gather_and_prefetch_errors(backend):
    with _make(backend) as buf:
        buf.put(0, torch.zeros(4, 2, 3))
        for call in (buf.gather, buf.prefetch):
            name = call.__name__
            cases = [
                (([4], [0]), ValueError, rf"{name}: sample_index\[0\] = 4 is outside \[0, 4\)"),
                (([0, -1], [0, 0]), ValueError, rf"{name}: sample_index\[1\] = -1 is outside"),
                (([0], [3]), ValueError, rf"{name}: state_index\[0\] = 3 is outside \[0, 3\)"),
                (([0, 1], [0, 0, 0]), ValueError, "same length"),
                ((torch.zeros(2, 2, dtype=torch.long), 0), ValueError, "must be an int or 1-D"),
                ((torch.tensor([0.0]), 0), TypeError, "sample_index must hold integers"),
                (([True], [0]), TypeError, r"sample_index\[0\] must be an int, got bool"),
                ((0, "0"), TypeError, "state_index must be an int, a sequence of ints or an integer tensor"),
                (([0, 1], [0, 1]), ValueError, rf"{name}: \(sample 1, state 1\) was never written"),
            ]
            for args, exc, match in cases:
                with pytest.raises(exc, match=match):
                    call(*args)
        assert buf._core.num_pending() == 0  # failed prefetches left nothing behind


def test_extra_errors(backend):
    with _make(backend, extras={"lp": ((4, 3), torch.float32)}) as buf:
        with pytest.raises(ValueError, match=r"unknown extra 'rewards'; declared extras: \['lp'\]"):
            buf.put_extra("rewards", torch.zeros(4))
        with pytest.raises(ValueError, match="unknown extra"):
            buf.extra("rewards")
        with pytest.raises(TypeError, match="extra 'lp' has dtype torch.float32, got values of dtype torch.float64"):
            buf.put_extra("lp", torch.zeros(4, 3, dtype=torch.float64))
        with pytest.raises(ValueError, match=r"values must have shape \(4, 3\), got \(3, 4\)"):
            buf.put_extra("lp", torch.zeros(3, 4))
        with pytest.raises(ValueError, match=r"values must have shape \(2, 3\)"):
            buf.put_extra("lp", torch.zeros(4, 3), slice(1, 3))
        with pytest.raises(ValueError, match="outside the capacity"):
            buf.put_extra("lp", torch.zeros(2, 3), slice(3, 5))
        with pytest.raises(TypeError, match="values must be a torch.Tensor"):
            buf.put_extra("lp", [[0.0] * 3] * 4)


def test_closed_buffer_errors(backend):
    buf = _make(backend, extras={"lp": ((4,), torch.float32)})
    buf.put(0, torch.zeros(4, 2, 3))
    assert buf.nbytes > 0 and not buf.closed
    buf.close()
    buf.close()  # idempotent
    assert buf.closed and buf.nbytes == 0 and not buf.pinned
    calls = [
        ("put", lambda: buf.put(0, torch.zeros(4, 2, 3))),
        ("gather", lambda: buf.gather(0, 0)),
        ("prefetch", lambda: buf.prefetch(0, 0)),
        ("put_extra", lambda: buf.put_extra("lp", torch.zeros(4))),
        ("extra", lambda: buf.extra("lp")),
        ("reset", buf.reset),
        ("synchronize", buf.synchronize),
    ]
    for op, call in calls:
        with pytest.raises(ValueError, match=rf"TrajectoryBuffer.{op}: the buffer is closed"):
            call()
    with pytest.raises(ValueError, match="closed"):
        with buf:
            pass
    assert "closed" in repr(buf)


def test_context_manager_closes(backend):
    with _make(backend) as buf:
        buf.put(1, torch.ones(4, 2, 3))
    assert buf.closed and buf.nbytes == 0


# ------------------------------------------------------------------------------------------------
# Many buffers at once
# ------------------------------------------------------------------------------------------------

def test_many_buffers_alive_at_once(backend):
    rng, gen = random.Random(1), torch.Generator().manual_seed(1)
    bufs, models = [], []
    for i in range(24):
        shape = (rng.randint(1, 4), rng.randint(1, 9))
        dtype = DTYPES[i % 3]
        n, t = rng.randint(1, 6), rng.randint(1, 5)
        bufs.append(TrajectoryBuffer(n, t, shape, dtype=dtype, device="cpu", backend=backend))
        models.append(Model(n, t, shape, dtype))
    for buf, model in zip(bufs, models):  # interleaved: fill all, then prefetch in every one
        fill(buf, model, rng, gen)
    for buf in bufs:
        buf.prefetch(range(buf.num_samples), buf.num_states - 1)
    for i, (buf, model) in enumerate(zip(bufs, models)):
        assert buf.nbytes == model.data.numel() * buf.dtype.itemsize
        samples = list(range(buf.num_samples))
        states = [buf.num_states - 1] * buf.num_samples
        assert_bitwise(buf.gather(samples, states), model.gather(samples, states))
        if i % 2:
            buf.close()
    for i, (buf, model) in enumerate(zip(bufs, models)):
        if i % 2:
            with pytest.raises(ValueError, match="closed"):
                buf.gather(0, 0)
        else:
            everything = buf.gather(torch.arange(buf.num_samples).repeat_interleave(buf.num_states),
                                    torch.arange(buf.num_states).repeat(buf.num_samples))
            assert_bitwise(everything.view(model.data.shape), model.data)
            buf.close()


# ------------------------------------------------------------------------------------------------
# Backend selection, fallback, build configuration
# ------------------------------------------------------------------------------------------------

def test_default_backend_is_compiled_when_available():
    status = extension_status()
    if REQUIRE_CPP:
        assert status["available"], status["source"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        buf = TrajectoryBuffer(2, 2, (3,), dtype=torch.float32, device="cpu")
    with buf:
        assert buf.backend == ("cpp" if status["available"] else "torch")
        if REQUIRE_CPP:
            assert buf.backend == "cpp"


def test_fallback_warns_once_and_says_why(monkeypatch):
    monkeypatch.setattr(buffer_mod, "_extension", lambda: (None, "simulated compiler failure"))
    monkeypatch.setattr(buffer_mod, "_fallback_warned", False)
    monkeypatch.delenv("OTCA_FAST_REQUIRE_CPP", raising=False)
    with pytest.warns(RuntimeWarning, match="simulated compiler failure.*pure-torch TrajectoryBuffer"):
        first = TrajectoryBuffer(2, 2, (3,), dtype=torch.float32, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second buffer must not warn again
        second = TrajectoryBuffer(2, 2, (3,), dtype=torch.float32, device="cpu")
    assert first.backend == second.backend == "torch"
    first.close()
    second.close()
    with pytest.raises(RuntimeError, match="backend='cpp' needs the compiled trajectory buffer.*simulated"):
        TrajectoryBuffer(2, 2, (3,), dtype=torch.float32, device="cpu", backend="cpp")
    monkeypatch.setenv("OTCA_FAST_REQUIRE_CPP", "1")
    with pytest.raises(RuntimeError, match="OTCA_FAST_REQUIRE_CPP=1 needs the compiled trajectory buffer"):
        TrajectoryBuffer(2, 2, (3,), dtype=torch.float32, device="cpu")


def _fake_toolkit(root):
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "lib64").mkdir()
    nvcc = root / "bin" / "nvcc"
    nvcc.write_bytes(b"\x7fELF fake binary")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    (root / "include" / "cuda_runtime.h").write_text("")
    (root / "lib64" / "libcudart.so").write_text("")


def test_cuda_home_found_through_a_wrapper_script(tmp_path, monkeypatch):
    """The nvcc on PATH is a script that execs the real one: the root is read from the script, not
    guessed as dirname(dirname(which nvcc)) (which names /usr/local and breaks linking)."""
    config = buffer_mod._load_build_config(buffer_mod._csrc_dir())
    root = tmp_path / "cuda-13.0"
    _fake_toolkit(root)
    wrappers = tmp_path / "wrappers" / "bin"
    wrappers.mkdir(parents=True)
    script = wrappers / "nvcc"
    script.write_text(f'#!/bin/sh\nexec {root}/bin/nvcc "$@"\n')
    script.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(wrappers))
    assert config.find_cuda_home() == os.path.realpath(root)
    # a symlinked nvcc resolves too
    link_dir = tmp_path / "links"
    link_dir.mkdir()
    (link_dir / "nvcc").symlink_to(root / "bin" / "nvcc")
    monkeypatch.setenv("PATH", str(link_dir))
    assert os.path.realpath(config.find_cuda_home()) == os.path.realpath(root)
    # an explicit CUDA_HOME wins, and a broken one is reported rather than replaced by a guess
    monkeypatch.setenv("CUDA_HOME", str(root))
    assert config.find_cuda_home() == str(root)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="is not a CUDA toolkit root"):
        config.find_cuda_home()


def test_build_config_sources_exist():
    config = buffer_mod._load_build_config(buffer_mod._csrc_dir())
    cpu, cuda = config.sources(False), config.sources(True)
    assert all(os.path.isfile(p) for p in cuda)
    assert not any(p.endswith(".cu") for p in cpu) and any(p.endswith(".cu") for p in cuda)
    digest = config.sources_hash()
    assert digest[0].isalpha() and len(digest) == 17  # a bare preprocessor token
    assert config.define_macros(False) == [("OTCA_SOURCES_HASH", digest)]
    assert config.define_macros(True) == [("OTCA_SOURCES_HASH", digest), ("OTCA_WITH_CUDA", "1")]


def test_compiled_module_matches_the_sources():
    """The module in use was built from the current csrc/ (a stale in-place build is not used)."""
    _compiled_or_skip()
    module, _ = buffer_mod._extension()
    config = buffer_mod._load_build_config(buffer_mod._csrc_dir())
    assert module.SOURCES_HASH == config.sources_hash()


# ------------------------------------------------------------------------------------------------
# CUDA: stream and event ordering (skipped without a GPU)
# ------------------------------------------------------------------------------------------------

# About 20-50 ms of GPU time on current parts: long enough that an unordered copy would see the old data.
SLEEP_CYCLES = 50_000_000


@needs_cuda
@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "pageable"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_round_trip_bitwise(cuda_backend, dtype, pinned):
    rng, gen = random.Random(3), torch.Generator().manual_seed(3)
    shape = (4, 3, 8, 8)
    with TrajectoryBuffer(6, 5, shape, dtype=dtype, device="cuda", backend=cuda_backend, pin_memory=pinned) as buf:
        assert buf.pinned == pinned and buf.backend == cuda_backend
        model = Model(6, 5, shape, dtype)
        fill(buf, model, rng, gen, device="cuda")
        for _ in range(8):
            m = rng.randint(1, 12)
            samples = [rng.randrange(6) for _ in range(m)]
            states = [rng.randrange(5) for _ in range(m)]
            buf.prefetch(samples, states)
            out = buf.gather(samples, states)
            assert out.device.type == "cuda"
            assert_bitwise(out, model.gather(samples, states))
        # the layouts the copy engine batches: one state of every sample (strided), a sample's run
        assert_bitwise(buf.gather(range(6), 2), model.gather(list(range(6)), [2] * 6))
        assert_bitwise(buf.gather(4, range(5)), model.gather([4] * 5, list(range(5))))


@needs_cuda
def test_cuda_put_is_ordered_after_the_producer_and_frees_the_source(cuda_backend):
    """The producer writes the latents after a long sleep; put must copy those values, and the caller
    overwriting its tensor right after put returns must not change what was stored."""
    shape = (16, 64, 64)
    with TrajectoryBuffer(4, 3, shape, dtype=torch.bfloat16, device="cuda", backend=cuda_backend) as buf:
        truth = torch.randn(4, *shape, device="cuda").bfloat16()
        x = torch.zeros_like(truth)
        for state in range(3):
            torch.cuda._sleep(SLEEP_CYCLES)
            x.copy_(truth + state)  # queued behind the sleep on the producer stream
            buf.put(state, x)
            x.fill_(float("nan"))  # the caller reuses its tensor at once
        for state in range(3):
            assert_bitwise(buf.gather(range(4), state), truth + state)


@needs_cuda
def test_cuda_gather_is_ordered_before_the_consumer(cuda_backend):
    """Queue a large put so that the copy stream is busy, gather, and use the result at once on the
    current stream: the consumer must wait for the copy, never see the freshly allocated memory."""
    shape = (16, 21, 60, 26)  # 0.5M elements per row: the copies take a while
    with TrajectoryBuffer(8, 2, shape, dtype=torch.bfloat16, device="cuda", backend=cuda_backend) as buf:
        truth = torch.randn(8, *shape, device="cuda").bfloat16()
        buf.put(0, truth)
        buf.put(1, truth * 2)
        out = buf.gather(range(8), 1)
        total = out.float().sum()  # queued on the current stream right away
        assert torch.equal(out, truth * 2)
        assert torch.isclose(total, (truth * 2).float().sum())
        # consumed on a side stream: the wait follows the stream that is current at gather time
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())  # `truth` was made on the default stream
        with torch.cuda.stream(side):
            buf.put(0, truth * 3)
            got = buf.gather(range(8), 0)
            ok = torch.equal(got, truth * 3)
        side.synchronize()
        assert ok


@needs_cuda
def test_cuda_prefetch_then_put_same_rows(cuda_backend):
    shape = (8, 32, 32)
    with TrajectoryBuffer(4, 2, shape, dtype=torch.float32, device="cuda", backend=cuda_backend) as buf:
        a = torch.randn(4, *shape, device="cuda")
        buf.put(0, a)
        buf.prefetch(range(4), 0)
        b = torch.randn(4, *shape, device="cuda")
        torch.cuda._sleep(SLEEP_CYCLES)
        buf.put(0, b)  # overwrites the prefetched rows: the prefetch is retired
        assert buf._core.num_pending() == 0
        assert torch.equal(buf.gather(range(4), 0), b)
        buf.prefetch(range(4), 0)  # and a prefetch issued after the put sees the new values
        assert torch.equal(buf.gather(range(4), 0), b)


@needs_cuda
def test_cuda_cpu_latents_and_close(cuda_backend):
    with TrajectoryBuffer(3, 2, (5, 7), dtype=torch.float16, device="cuda", backend=cuda_backend) as buf:
        x = torch.randn(3, 5, 7).half()
        buf.put(1, x)  # a CPU source is accepted and copied synchronously
        x.zero_()
        assert buf.pinned and buf.gather(range(3), 1).device.type == "cuda"
        assert buf.nbytes == 3 * 2 * 35 * 2
    assert buf.closed and buf.nbytes == 0 and not buf.pinned


@needs_cuda
def test_cuda_many_buffers(cuda_backend):
    bufs = [TrajectoryBuffer(3, 3, (4, 16), dtype=torch.bfloat16, device="cuda", backend=cuda_backend)
            for _ in range(12)]
    values = [torch.randn(3, 4, 16, device="cuda").bfloat16() for _ in bufs]
    for state in range(3):
        for buf, v in zip(bufs, values):
            buf.put(state, v + state)
    for buf in bufs:
        buf.prefetch(range(3), 2)
    for buf, v in zip(bufs, values):
        assert torch.equal(buf.gather(range(3), 2), v + 2)
        buf.close()

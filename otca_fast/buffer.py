"""Trajectory buffer: rollout latents in (pinned) host memory, brought back to the device on demand.

A Wan2.1 480p group (12 samples x 21 states x 16x21x60x104 bf16 latents) is about 1 GB per prompt; kept
on the GPU it competes with the model. :class:`TrajectoryBuffer` keeps trajectories on the host while the
GPU keeps sampling (``put`` drains them asynchronously) and brings back only the (sample, state) pairs a
training step needs (``gather``), overlapping that copy with the previous step (``prefetch``).

Three interchangeable backends implement the same class (``TrajectoryBuffer.backend``):

* ``"cuda"``: the compiled extension (``otca_fast._C``, CUDA variant) for a CUDA ``device``: pinned
  storage from ``cudaHostAlloc``, copies on a dedicated copy stream through the GPU's copy engines.
* ``"cpp"``: the compiled extension for ``device="cpu"``: multi-threaded copies, prefetch on a worker
  thread.
* ``"torch"``: pure torch, used when the extension can neither be imported nor built just in time
  (one ``RuntimeWarning`` says why); same results, slower copies.

``OTCA_FAST_REQUIRE_CPP=1`` turns that fallback into an error (CI uses it to prove the compiled backend
is the one under test).

Storage layout is ``[num_samples, num_states, *latent_shape]``, so every (sample, state) pair is one
contiguous row. The trainer's extras (log-probs, rewards, group ids...) are a few KB and live on
``device`` so that recording them never waits for the GPU.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import logging
import math
import operator
import os
import threading
import warnings
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

__all__ = ["TrajectoryBuffer", "extension_status"]

_BACKENDS = ("cuda", "cpp", "torch")
# Prefetches kept in flight (same as kMaxPending in csrc/trajectory_buffer.h).
_MAX_PENDING = 2

IndexLike = int | Sequence[int] | torch.Tensor


# --------------------------------------------------------------------------------------------------
# The compiled extension: import it, or build it just in time, once per process.
# --------------------------------------------------------------------------------------------------

_log = logging.getLogger(__name__)
_ext_lock = threading.Lock()
_ext_state: dict[str, Any] = {}
_fallback_warned = False


def _csrc_dir() -> Path | None:
    """The C++ sources: ``csrc/`` beside the package in a source checkout or editable install, or
    ``otca_fast/_csrc`` when a wheel ships them."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "csrc", here / "_csrc"):
        if (candidate / "build_config.py").is_file() and (candidate / "trajectory_buffer.cpp").is_file():
            return candidate
    return None


def _load_build_config(csrc: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("_otca_fast_build_config", csrc / "build_config.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {csrc / 'build_config.py'}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _jit_build() -> ModuleType:
    """Compile the extension with torch.utils.cpp_extension.load (cached in TORCH_EXTENSIONS_DIR).

    The CUDA variant is built only where it can run (a CUDA build of torch, a visible GPU and a
    toolkit); elsewhere the CPU variant builds in a fraction of the time.
    """
    csrc = _csrc_dir()
    if csrc is None:
        raise ImportError("the C++ sources (csrc/) are not installed beside otca_fast")
    config = _load_build_config(csrc)
    with_cuda = False
    if torch.version.cuda is not None and torch.cuda.is_available():
        cuda_home = config.find_cuda_home()
        if cuda_home is not None:
            config.configure_cuda_env(cuda_home, visible_gpu=True)
            with_cuda = True
    from torch.utils import cpp_extension

    if with_cuda:
        # cpp_extension read CUDA_HOME when it was first imported, possibly before we set it.
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
    macros = [f"-D{name}={value}" for name, value in config.define_macros(with_cuda)]
    return cpp_extension.load(
        name=f"otca_fast_buffer_{'cuda' if with_cuda else 'cpu'}",
        sources=config.sources(with_cuda),
        extra_cflags=config.CXX_FLAGS + macros,
        extra_cuda_cflags=config.NVCC_FLAGS + macros if with_cuda else None,
        with_cuda=with_cuda,
        verbose=os.environ.get("OTCA_FAST_JIT_VERBOSE", "0") == "1",
    )


def _find_or_build() -> tuple[ModuleType | None, str]:
    reasons = []
    try:
        from otca_fast import _C  # built by setup.py
    except ImportError as exc:
        reasons.append(f"import otca_fast._C failed ({exc})")
    else:
        # An editable install compiles _C once; after csrc/ changes it would silently run old code.
        csrc = _csrc_dir()
        current = _load_build_config(csrc).sources_hash() if csrc is not None else None
        built = getattr(_C, "SOURCES_HASH", None)
        if current is None or built == current:
            return _C, "otca_fast._C"
        reasons.append(f"otca_fast._C is stale (built from sources {built}, {csrc} is now {current}; "
                       "reinstall to refresh it)")
        _log.warning("%s: building the current sources just in time", reasons[-1])
    try:
        _log.info("building the trajectory buffer extension just in time (about a minute on 2 cores; "
                  "cached in TORCH_EXTENSIONS_DIR)")
        return _jit_build(), "just-in-time build"
    except Exception as exc:  # whatever broke the build, the answer is: fall back, say why
        lines = str(exc).strip().splitlines()
        reasons.append(f"just-in-time build failed ({type(exc).__name__}: {lines[0][:300] if lines else ''})")
    return None, "; ".join(reasons)


def _extension() -> tuple[ModuleType | None, str]:
    """(module, where it came from) or (None, why not). Thread-safe; tried once per process."""
    with _ext_lock:
        if "module" not in _ext_state:
            _ext_state["module"], _ext_state["how"] = _find_or_build()
        return _ext_state["module"], _ext_state["how"]


def extension_status() -> dict[str, Any]:
    """Which compiled backend is available, without creating a buffer (builds it if needed).

    Returns ``{"available": bool, "with_cuda": bool, "source": str}``; ``source`` says where the
    module came from, or why it is missing.
    """
    module, how = _extension()
    return {"available": module is not None, "with_cuda": bool(module is not None and module.WITH_CUDA),
            "source": how}


def _require_cpp() -> bool:
    return os.environ.get("OTCA_FAST_REQUIRE_CPP", "0") not in ("", "0")


def _select_backend(requested: str | None, device: torch.device) -> tuple[str, ModuleType | None]:
    wanted = "cuda" if device.type == "cuda" else "cpp"
    if requested == "torch":
        return "torch", None
    if requested is not None and requested != wanted:
        raise ValueError(f"backend={requested!r} does not serve device {device}; expected {wanted!r} or 'torch'")
    module, how = _extension()
    problem = None
    if module is None:
        problem = f"otca_fast._C is unavailable: {how}"
    elif wanted == "cuda" and not module.WITH_CUDA:
        problem = f"otca_fast._C ({how}) was built without CUDA, so it cannot serve {device}"
    if problem is None:
        return wanted, module
    if requested is not None or _require_cpp():
        why = f"backend={requested!r}" if requested is not None else "OTCA_FAST_REQUIRE_CPP=1"
        raise RuntimeError(f"{why} needs the compiled trajectory buffer, but {problem}")
    global _fallback_warned
    if not _fallback_warned:
        _fallback_warned = True
        warnings.warn(f"{problem}; using the pure-torch TrajectoryBuffer (same results, slower copies)",
                      RuntimeWarning, stacklevel=3)
    return "torch", None


# --------------------------------------------------------------------------------------------------
# Pure-torch core: the same operations and the same stream protocol as csrc/, in Python.
# --------------------------------------------------------------------------------------------------

class _TorchCore:
    """Pure-torch twin of the C++ core (csrc/trajectory_buffer.cpp and trajectory_buffer_cuda.cu).

    The argument checks happen in :class:`TrajectoryBuffer`; this class owns the storage, the written
    mask, the prefetch queue and the copies. See trajectory_buffer_cuda.cu for the stream protocol.
    """

    def __init__(self, num_samples: int, num_states: int, latent_shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device, pin_memory: bool) -> None:
        self._n, self._t = num_samples, num_states
        self._latent_shape = latent_shape
        self._row = math.prod(latent_shape)
        self._dtype, self._device = dtype, device
        self._lock = threading.RLock()
        self._closed = False
        self._pending: deque[tuple[list[int], list[int], dict[str, Any]]] = deque()
        self._storage = torch.empty(num_samples * num_states * self._row, dtype=dtype)
        self._rows = self._storage.view(num_samples * num_states, self._row)
        self._registered = False
        if pin_memory:
            # cudaHostRegister pins exactly these pages; torch.empty(pin_memory=True) would round a
            # 1 GB group up to the next power of two and keep it cached after close().
            err = int(torch.cuda.cudart().cudaHostRegister(self._storage.data_ptr(), self._storage.nbytes, 1))
            if err != 0:
                raise RuntimeError(f"cudaHostRegister of {self._storage.nbytes} bytes failed with cudaError {err}")
            self._registered = True
        self._written = torch.zeros(num_samples * num_states, dtype=torch.bool)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        if device.type == "cuda":
            self._copy_stream = torch.cuda.Stream(device)
            self._slots: list[dict[str, Any] | None] = [None, None]
            self._slot_free = [torch.cuda.Event(), torch.cuda.Event()]
            self._next_slot = 0

    # -- properties ---------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pinned(self) -> bool:
        return self._registered and not self._closed

    @property
    def nbytes(self) -> int:
        return 0 if self._closed else self._storage.nbytes

    @property
    def backend(self) -> str:
        return "torch"

    def num_pending(self) -> int:
        return len(self._pending)

    # -- copies ---------------------------------------------------------------------------------------
    def _check_written(self, op: str, samples: list[int], states: list[int]) -> list[int]:
        rows = [s * self._t + k for s, k in zip(samples, states)]
        if rows:
            missing = (~self._written[torch.tensor(rows)]).nonzero()
            if missing.numel():
                i = int(missing[0])
                raise ValueError(f"TrajectoryBuffer.{op}: (sample {samples[i]}, state {states[i]}) was never "
                                 "written since the last reset()")
        return rows

    def _issue(self, rows: list[int], background: bool) -> dict[str, Any]:
        sizes = (len(rows), *self._latent_shape)
        if self._device.type == "cpu":
            index = torch.tensor(rows, dtype=torch.long)

            def copy() -> torch.Tensor:
                return torch.index_select(self._rows, 0, index).view(sizes)

            if background:
                if self._executor is None:
                    self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="otca-prefetch")
                return {"future": self._executor.submit(copy)}
            return {"out": copy()}
        consumer = torch.cuda.current_stream(self._device)
        out = torch.empty(sizes, dtype=self._dtype, device=self._device)
        if rows:
            alloc_ready = torch.cuda.Event()
            alloc_ready.record(consumer)
            self._copy_stream.wait_event(alloc_ready)
            out.record_stream(self._copy_stream)
            flat = out.view(len(rows), self._row)
            with torch.cuda.stream(self._copy_stream):
                i = 0
                while i < len(rows):  # one copy per run of consecutive rows
                    j = i + 1
                    while j < len(rows) and rows[j] == rows[j - 1] + 1:
                        j += 1
                    flat[i:j].copy_(self._rows[rows[i]:rows[i] + j - i], non_blocking=True)
                    i = j
        done = torch.cuda.Event()
        done.record(self._copy_stream)
        return {"out": out, "done": done, "alloc_stream": consumer}

    def _wait(self, ticket: dict[str, Any]) -> torch.Tensor:
        if "future" in ticket:
            ticket["out"] = ticket.pop("future").result()
        if "done" in ticket:
            current = torch.cuda.current_stream(self._device)
            current.wait_event(ticket["done"])
            if current != ticket["alloc_stream"] and ticket["out"].numel():
                ticket["out"].record_stream(current)
        return ticket["out"]

    def _retire(self, ticket: dict[str, Any]) -> None:
        """Drop a prefetch nobody will read: join its CPU worker; a CUDA copy needs nothing (``out`` was
        recorded on the copy stream, and the storage is freed only after the stream is drained)."""
        if "future" in ticket:
            ticket.pop("future").result()

    def put(self, state: int, start: int, latents: torch.Tensor) -> None:
        with self._lock:
            n = latents.shape[0]
            if n == 0:
                return
            keep = deque()
            for entry in self._pending:
                samples, states, ticket = entry
                if any(k == state and start <= s < start + n for s, k in zip(samples, states)):
                    self._retire(ticket)
                else:
                    keep.append(entry)
            self._pending = keep
            rows = self._storage.view(self._n, self._t, self._row)
            if latents.device.type == "cpu":
                if self._device.type == "cuda":
                    self._copy_stream.synchronize()  # queued copies may still touch these rows
                rows[start:start + n, state].copy_(latents.reshape(n, self._row))
            else:
                self._put_cuda(rows, state, start, latents)
            self._written.view(self._n, self._t)[start:start + n, state] = True

    def _put_cuda(self, rows: torch.Tensor, state: int, start: int, latents: torch.Tensor) -> None:
        producer = torch.cuda.current_stream(self._device)
        k = self._next_slot
        self._next_slot = (k + 1) % len(self._slots)
        numel = latents.numel()
        slot = self._slots[k]
        if slot is None or slot["mem"].numel() < numel:
            mem = torch.empty(numel, dtype=self._dtype, device=self._device)
            mem.record_stream(self._copy_stream)  # the allocator keeps it until the last D2H is done
            slot = self._slots[k] = {"mem": mem, "alloc_stream": producer}
        producer.wait_event(self._slot_free[k])  # no-op until the slot has been drained once
        if producer != slot["alloc_stream"]:
            slot["mem"].record_stream(producer)
        staged = slot["mem"][:numel].view(latents.shape)
        staged.copy_(latents)  # on the producer stream: the caller may overwrite `latents` after this
        ready = torch.cuda.Event()
        ready.record(producer)
        self._copy_stream.wait_event(ready)
        with torch.cuda.stream(self._copy_stream):
            src = staged.view(latents.shape[0], self._row)
            for i in range(latents.shape[0]):  # rows are num_states apart in the storage
                rows[start + i, state].copy_(src[i], non_blocking=True)
        self._slot_free[k].record(self._copy_stream)

    def gather(self, samples: list[int], states: list[int]) -> torch.Tensor:
        with self._lock:
            rows = self._check_written("gather", samples, states)
            for p, (ps, pt, ticket) in enumerate(self._pending):
                if ps == samples and pt == states:
                    for _ in range(p):  # prefetches skipped by the caller are retired
                        self._retire(self._pending.popleft()[2])
                    self._pending.popleft()
                    return self._wait(ticket)
            return self._wait(self._issue(rows, background=False))

    def prefetch(self, samples: list[int], states: list[int]) -> None:
        with self._lock:
            rows = self._check_written("prefetch", samples, states)
            self._pending.append((samples, states, self._issue(rows, background=True)))
            while len(self._pending) > _MAX_PENDING:
                self._retire(self._pending.popleft()[2])

    def _drain(self) -> None:
        while self._pending:
            self._retire(self._pending.popleft()[2])
        if self._device.type == "cuda":
            self._copy_stream.synchronize()

    def synchronize(self) -> None:
        with self._lock:
            if self._device.type == "cuda":
                self._copy_stream.synchronize()

    def reset(self) -> None:
        with self._lock:
            self._drain()
            self._written.zero_()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._drain()
            if self._executor is not None:
                self._executor.shutdown(wait=True)
            if self._registered:
                err = int(torch.cuda.cudart().cudaHostUnregister(self._storage.data_ptr()))
                self._registered = False
                if err != 0:
                    raise RuntimeError(f"cudaHostUnregister failed with cudaError {err}")
            self._storage = self._rows = torch.empty(0, dtype=self._dtype)
            self._slots = [None, None] if self._device.type == "cuda" else []
            self._closed = True

    def __del__(self) -> None:
        # Pinned pages must be unregistered before the tensor frees them.
        try:
            self.close()
        except Exception:  # interpreter shutdown; nothing left to report to
            pass


# --------------------------------------------------------------------------------------------------
# Public class
# --------------------------------------------------------------------------------------------------

def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        value = operator.index(value)  # ints, numpy integers, 0-d integer tensors
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def _shape(value: Any, name: str) -> tuple[int, ...]:
    if isinstance(value, torch.Size):
        value = tuple(value)
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise TypeError(f"{name} must be a sequence of ints, got {type(value).__name__}")
    if len(value) == 0:
        raise ValueError(f"{name} must have at least one dimension, got ()")
    return tuple(_positive_int(s, f"{name}[{i}]") for i, s in enumerate(value))


def _device(value: Any) -> torch.device:
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:<index>', got {value!r}") from exc
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"device must be a cpu or cuda device, got {device}")
    if not torch.cuda.is_available():
        raise ValueError(f"device={value!r} but CUDA is not available here; pass device='cpu'")
    index = torch.cuda.current_device() if device.index is None else device.index
    if not 0 <= index < torch.cuda.device_count():
        raise ValueError(f"device {device} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def _index(value: Any, name: str) -> torch.Tensor:
    """int, sequence of ints or integer tensor -> int64 CPU tensor (0-D for a scalar, else 1-D)."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.dtype.is_floating_point or value.dtype.is_complex:
            raise TypeError(f"{name} must hold integers, got a {value.dtype} tensor")
        if value.dim() > 1:
            raise ValueError(f"{name} must be an int or 1-D, got shape {tuple(value.shape)}")
        return value.detach().to("cpu", torch.long)
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a sequence of ints, got bool")
    try:
        return torch.tensor(operator.index(value), dtype=torch.long)
    except TypeError:
        pass
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise TypeError(f"{name} must be an int, a sequence of ints or an integer tensor, got {type(value).__name__}")
    items = []
    for i, item in enumerate(value):
        if isinstance(item, bool):
            raise TypeError(f"{name}[{i}] must be an int, got bool")
        try:
            items.append(operator.index(item))
        except TypeError:
            raise TypeError(f"{name}[{i}] must be an int, got {type(item).__name__}") from None
    return torch.tensor(items, dtype=torch.long).reshape(len(items))


def _slice(value: Any, size: int, name: str) -> tuple[int, int]:
    """None or a step-1 slice of non-negative bounds within [0, size] -> (start, stop)."""
    if value is None:
        return 0, size
    if not isinstance(value, slice):
        raise TypeError(f"{name} must be a slice or None, got {type(value).__name__}")
    if value.step not in (None, 1):
        raise ValueError(f"{name} must have step 1, got step {value.step}")
    start = 0 if value.start is None else value.start
    stop = size if value.stop is None else value.stop
    for bound, label in ((start, "start"), (stop, "stop")):
        if isinstance(bound, bool) or not isinstance(bound, int):
            raise TypeError(f"{name}.{label} must be an int or None, got {type(bound).__name__}")
    if not 0 <= start <= stop <= size:
        raise ValueError(f"{name} = [{start}:{stop}] is outside the capacity [0:{size}] (negative bounds "
                         "are not accepted)")
    return start, stop


class TrajectoryBuffer:
    """Rollout latents in host memory, pairs brought back to the device on demand.

    Args:
        num_samples: N, rollouts per buffer (e.g. prompts x group size).
        num_states: T, latents kept per rollout (denoising steps + 1 for the initial noise).
        latent_shape: shape of one latent, e.g. ``(16, 21, 60, 104)`` for Wan2.1 480p.
        dtype: storage dtype; ``put`` requires exactly this dtype (nothing is cast silently).
        device: where ``put`` reads from and ``gather`` returns to (``"cuda"``, ``"cuda:1"``, ``"cpu"``).
        extras: small tensors stored beside the latents, ``{name: (shape, dtype)}``, e.g.
            ``{"log_prob": ((N, T - 1), torch.float32), "rewards": ((N, K), torch.float32)}``.
            They live on ``device`` (a few KB; keeping them there means recording them never waits
            for the GPU). Rows along their first dimension are tracked like the latents.
        pin_memory: page-lock the host storage. Default: pinned when ``device`` is a CUDA device
            (only device copies profit, and only pinned copies run asynchronously), pageable
            otherwise; ``False`` on CUDA gives the pageable baseline of the benchmarks.
        backend: ``None`` picks the compiled backend (``"cuda"``/``"cpp"``) and falls back to
            ``"torch"`` with one warning; naming one makes its absence an error.

    Ordering guarantees (whatever the order of calls):

    * ``put`` returns before the data has reached the host, yet the caller may overwrite or free
      ``latents`` at once: the buffer first copies them into a device staging slot *on the caller's
      current stream*, so any later write to ``latents`` on that stream (or on another stream that
      synchronises with it, as torch requires anyway) comes after that read. The device-to-host copy
      then runs from the slot on the buffer's copy stream while the caller keeps sampling; the
      caller's stream only waits when both staging slots are still draining. CPU ``latents`` are
      copied synchronously.
    * ``gather`` returns a tensor the caller owns; on CUDA the caller's current stream is made to wait
      for the copy, so nothing reads it early (the host is not blocked). A gather always sees every
      ``put`` issued before it; a ``put`` overwriting rows of a pending prefetch retires that prefetch.
    * ``reset`` and ``close`` wait for every copy in flight.
    """

    def __init__(self, num_samples: int, num_states: int, latent_shape: Sequence[int], *,
                 dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cuda",
                 extras: Mapping[str, tuple[Sequence[int], torch.dtype]] | None = None,
                 pin_memory: bool | None = None, backend: str | None = None) -> None:
        self._num_samples = _positive_int(num_samples, "num_samples")
        self._num_states = _positive_int(num_states, "num_states")
        self._latent_shape = _shape(latent_shape, "latent_shape")
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype (latents), got {dtype}")
        self._dtype = dtype
        self._device = _device(device)
        if pin_memory is None:
            pin_memory = self._device.type == "cuda"
        if not isinstance(pin_memory, bool):
            raise TypeError(f"pin_memory must be a bool or None, got {type(pin_memory).__name__}")
        if pin_memory and self._device.type != "cuda":
            raise ValueError("pin_memory=True needs a CUDA device: pinned pages only speed up device copies")
        if backend is not None and backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS} or None, got {backend!r}")
        self._extras = self._make_extras(extras)
        self._backend, module = _select_backend(backend, self._device)
        args = (self._num_samples, self._num_states, self._latent_shape, self._dtype, self._device, pin_memory)
        self._core = _TorchCore(*args) if module is None else module.TrajectoryBuffer(*args)

    def _make_extras(self, extras: Any) -> dict[str, dict[str, Any]]:
        if extras is None:
            return {}
        if not isinstance(extras, Mapping):
            raise TypeError(f"extras must be a mapping name -> (shape, dtype), got {type(extras).__name__}")
        out = {}
        for name, spec in extras.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"extras keys must be non-empty strings, got {name!r}")
            if not isinstance(spec, tuple | list) or len(spec) != 2:
                raise TypeError(f"extras[{name!r}] must be a (shape, dtype) pair, got {spec!r}")
            shape = _shape(spec[0], f"extras[{name!r}] shape")
            if not isinstance(spec[1], torch.dtype):
                raise TypeError(f"extras[{name!r}] dtype must be a torch.dtype, got {type(spec[1]).__name__}")
            out[name] = {
                "values": torch.empty(shape, dtype=spec[1], device=self._device),
                "written": torch.zeros(shape[0], dtype=torch.bool),
            }
        return out

    # -- properties ---------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """``"cuda"``, ``"cpp"`` or ``"torch"``."""
        return self._backend

    @property
    def nbytes(self) -> int:
        """Bytes held: the host latent storage plus the extras (0 once closed)."""
        if self._core.closed:
            return 0
        return self._core.nbytes + sum(e["values"].nbytes for e in self._extras.values())

    @property
    def pinned(self) -> bool:
        """Whether the host storage is page-locked."""
        return self._core.pinned

    @property
    def closed(self) -> bool:
        return self._core.closed

    @property
    def num_samples(self) -> int:
        return self._num_samples

    @property
    def num_states(self) -> int:
        return self._num_states

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self._latent_shape

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def extra_names(self) -> tuple[str, ...]:
        return tuple(self._extras)

    # -- operations ---------------------------------------------------------------------------------
    def _check_open(self, op: str) -> None:
        if self._core.closed:
            raise ValueError(f"TrajectoryBuffer.{op}: the buffer is closed")

    def put(self, state_index: int, latents: torch.Tensor, sample_slice: slice | None = None) -> None:
        """Store ``latents [n, *latent_shape]`` as state ``state_index`` of samples ``sample_slice``.

        ``sample_slice`` (default: all samples) is a step-1 slice with ``stop - start == n``.
        ``latents`` must have the buffer's dtype and live on its device (or the CPU). Asynchronous on
        CUDA; the caller may overwrite ``latents`` as soon as this returns (see the class docstring).
        """
        self._check_open("put")
        if isinstance(state_index, bool) or not isinstance(state_index, int):
            try:
                state_index = operator.index(state_index)
            except TypeError:
                raise TypeError(f"state_index must be an int, got {type(state_index).__name__}") from None
        if not 0 <= state_index < self._num_states:
            raise ValueError(f"state_index = {state_index} is outside [0, {self._num_states})")
        if not isinstance(latents, torch.Tensor):
            raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
        if latents.dtype != self._dtype:
            raise TypeError(f"latents dtype must be {self._dtype} (the buffer's dtype), got {latents.dtype}")
        start, stop = _slice(sample_slice, self._num_samples, "sample_slice")
        expected = (stop - start, *self._latent_shape)
        if tuple(latents.shape) != expected:
            raise ValueError(f"latents must have shape {expected} (sample_slice [{start}:{stop}] x latent_shape), "
                             f"got {tuple(latents.shape)}")
        if latents.device != self._device and latents.device.type != "cpu":
            allowed = "cpu" if self._device.type == "cpu" else f"{self._device} or cpu"
            raise ValueError(f"latents must be on {allowed}, got {latents.device}")
        self._core.put(state_index, start, latents.detach())

    def _pairs(self, op: str, sample_index: IndexLike, state_index: IndexLike) -> tuple[torch.Tensor, torch.Tensor]:
        samples = _index(sample_index, "sample_index")
        states = _index(state_index, "state_index")
        if samples.dim() == 0 and states.dim() == 0:
            samples, states = samples.reshape(1), states.reshape(1)
        elif samples.dim() == 0:
            samples = samples.expand(states.shape[0]).contiguous()
        elif states.dim() == 0:
            states = states.expand(samples.shape[0]).contiguous()
        elif samples.shape != states.shape:
            raise ValueError(f"sample_index and state_index must have the same length (or one be an int), got "
                             f"{samples.shape[0]} and {states.shape[0]}")
        for values, name, size in ((samples, "sample_index", self._num_samples),
                                   (states, "state_index", self._num_states)):
            bad = ((values < 0) | (values >= size)).nonzero()
            if bad.numel():
                i = int(bad[0])
                raise ValueError(f"TrajectoryBuffer.{op}: {name}[{i}] = {int(values[i])} is outside [0, {size})")
        return samples, states

    def gather(self, sample_index: IndexLike, state_index: IndexLike) -> torch.Tensor:
        """Latents of the pairs ``(sample_index[i], state_index[i])`` as ``[M, *latent_shape]`` on ``device``.

        Either index may be an int, broadcast against the other (``gather(range(N), t)``: state ``t``
        of every sample). Indices are best given as lists or CPU tensors (a CUDA index tensor costs a
        device sync). Uses the matching :meth:`prefetch` if one is in flight. Raises ValueError for a
        pair never written since the last :meth:`reset`.
        """
        self._check_open("gather")
        samples, states = self._pairs("gather", sample_index, state_index)
        if self._backend == "torch":
            return self._core.gather(samples.tolist(), states.tolist())
        return self._core.gather(samples, states)

    def all_states(self) -> torch.Tensor:
        """Every state of every sample, ``[num_samples, num_states, *latent_shape]`` (a whole trajectory each)."""
        n, t = self._num_samples, self._num_states
        states = self.gather(torch.arange(n).repeat_interleave(t), torch.arange(t).repeat(n))
        return states.view(n, t, *self._latent_shape)

    def prefetch(self, sample_index: IndexLike, state_index: IndexLike) -> None:
        """Start the copy of a later :meth:`gather` with the same indices, in the background.

        Call it right after taking the current batch and before the training step, so the copy
        overlaps that step (double buffering). Up to two prefetches stay in flight; older ones are
        retired. A ``put`` to any of its pairs retires it, so a gather never returns stale data.
        """
        self._check_open("prefetch")
        samples, states = self._pairs("prefetch", sample_index, state_index)
        if self._backend == "torch":
            self._core.prefetch(samples.tolist(), states.tolist())
        else:
            self._core.prefetch(samples, states)

    def _extra(self, op: str, name: Any) -> dict[str, Any]:
        self._check_open(op)
        if name not in self._extras:
            raise ValueError(f"TrajectoryBuffer.{op}: unknown extra {name!r}; declared extras: "
                             f"{sorted(self._extras)}")
        return self._extras[name]

    def put_extra(self, name: str, values: torch.Tensor, sample_slice: slice | None = None) -> None:
        """Store ``values`` into extra ``name``: the whole tensor, or rows ``sample_slice`` of its first
        dimension. Dtype must match the declaration exactly; values may live on any device."""
        entry = self._extra("put_extra", name)
        store: torch.Tensor = entry["values"]
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
        if values.dtype != store.dtype:
            raise TypeError(f"extra {name!r} has dtype {store.dtype}, got values of dtype {values.dtype}")
        start, stop = _slice(sample_slice, store.shape[0], "sample_slice")
        expected = (stop - start, *store.shape[1:])
        if tuple(values.shape) != expected:
            raise ValueError(f"extra {name!r}: values must have shape {expected}, got {tuple(values.shape)}")
        # Blocking for CPU values (so the caller may reuse them at once, pinned or not), stream-ordered
        # for device values; either way the copy is a few KB.
        store[start:stop].copy_(values.detach())
        entry["written"][start:stop] = True

    def extra(self, name: str) -> torch.Tensor:
        """A copy of extra ``name`` on ``device``; ValueError if any row was not written since reset()."""
        entry = self._extra("extra", name)
        missing = (~entry["written"]).nonzero().flatten()
        if missing.numel():
            rows = missing[:8].tolist()
            more = f" and {missing.numel() - 8} more" if missing.numel() > 8 else ""
            raise ValueError(f"TrajectoryBuffer.extra: rows {rows}{more} of {name!r} were never written since "
                             "the last reset()")
        return entry["values"].clone()

    def reset(self) -> None:
        """Forget what was written (latents and extras) so the storage can take the next rollout."""
        self._check_open("reset")
        self._core.reset()
        for entry in self._extras.values():
            entry["written"].zero_()

    def synchronize(self) -> None:
        """Block until every copy issued so far has landed (e.g. before timing or checkpointing)."""
        self._check_open("synchronize")
        self._core.synchronize()

    def close(self) -> None:
        """Wait for copies in flight and free the storage (pinned pages go back to the OS). Idempotent."""
        self._core.close()
        for entry in self._extras.values():
            entry["values"] = torch.empty(0, dtype=entry["values"].dtype, device=self._device)

    def __enter__(self) -> TrajectoryBuffer:
        self._check_open("__enter__")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"nbytes={self.nbytes}, pinned={self.pinned}"
        return (f"TrajectoryBuffer(num_samples={self._num_samples}, num_states={self._num_states}, "
                f"latent_shape={self._latent_shape}, dtype={self._dtype}, device={self._device}, "
                f"backend={self._backend!r}, {state})")


def trajectory_buffers(rows: int, num_steps: int, latent_shape: tuple[int, ...], *, dtype: torch.dtype,
                       device: torch.device, x0_predictions: bool) -> tuple[TrajectoryBuffer, TrajectoryBuffer | None]:
    """A rollout's storage: the states x_0..x_T of ``rows`` trajectories (``[rows, T+1]``) and, when the credit
    needs them (``x0_predictions``), the clean-sample predictions x̂0 of each step (``[rows, T]``)."""
    states = TrajectoryBuffer(rows, num_steps + 1, latent_shape, dtype=dtype, device=device)
    x0 = TrajectoryBuffer(rows, num_steps, latent_shape, dtype=dtype, device=device) if x0_predictions else None
    return states, x0

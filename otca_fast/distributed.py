"""Scale-out on ``torch.distributed``: torchrun, DDP or FSDP2, global group statistics, failures agreed on.

``torchrun --nproc_per_node N -m otca_fast.train CONFIG`` runs the same trainer on N ranks (and on many
nodes through torchrun's rendezvous). This module holds everything the trainer needs for that, so the
loop itself only calls small hooks:

* :func:`setup` — the process group from torchrun's environment (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``): NCCL on CUDA, gloo on the CPU, ``timeout=distributed.timeout_s``; nothing at all
  for a single process. :class:`DistContext` says who this rank is.
* **Batch semantics.** The global batch of a step is P = ``prompts_per_step`` groups of G =
  ``group_size`` samples, N = P·G rows with integer group ids (the global prompt slot, ``n // G``).
  Rank r holds the contiguous rows ``[r·N/W, (r+1)·N/W)`` (:meth:`DistContext.share`), so a group may
  span ranks. Every rank draws the same prompts and, for its rows, the same initial and SDE noise as a
  single process would (``rollout.sample_trajectories(rows=...)``): sample n is the same sample
  whatever the number of ranks.
* **Credit.** Rewards ``[N/W, K]``, TCD's state cosines ``[N/W, T+1]`` (computed where the trajectories
  live) and ``otca_timing``'s per-step rewards are all-gathered (:func:`all_gather_rows`); every rank
  then builds the advantages of the whole batch with the global group statistics (a few KB) and trains
  its own rows.
* **Models** (:func:`prepare_model`). ``ddp``: every rank holds the whole transformer; the trainable
  weights are broadcast from rank 0 and the gradients are averaged with one coalesced all-reduce per
  optimizer update (:func:`sync_gradients`). ``fsdp``: FSDP2 ``fully_shard`` on every transformer block
  and on the root, with a ``MixedPrecisionPolicy`` and optional ``CPUOffloadPolicy``; FSDP reduce-scatters
  the gradients in backward and ``clip_grad_norm_`` works on the sharded (DTensor) gradients.
  Activation checkpointing is the backbone's own gradient checkpointing (``train.gradient_checkpointing``).
* **Failures** (:func:`check_errors`). Rank-local work (rollout, rewards, the backward passes of an
  update) is wrapped: an exception is held, and before the next collective every rank all-reduces an
  error flag; when it is set the messages are all-gathered and *every* rank raises
  :class:`RankFailure` ("rank R: cause") at the same point, so the job stops together, writes its
  last good checkpoint together, and never hangs in a collective. A failure that cannot be held
  (inside an FSDP forward) is recorded in the rendezvous store (:func:`record_fatal`) before the rank
  exits; the process-group timeout is the backstop. The same all-reduce carries a *stop request*
  (SIGTERM/SIGUSR1, :mod:`otca_fast.preemption`), and :func:`any_rank` agrees on one at the loop's other
  stop points, so every rank abandons (or finishes) the same step and checkpoints it together.
* **Checkpoints** live in :mod:`otca_fast.checkpoint` (``save_sharded``, ``load_onto_ranks``), which uses
  :func:`agree` so that the ranks decide together on a damaged checkpoint or a failed write.

Rank 0 alone writes ``metrics.jsonl``, TensorBoard, plots, clips and the console and progress output.
"""

from __future__ import annotations

import datetime
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from otca_fast.devices import DTYPES, resolve_device
from otca_fast.errors import CheckpointError, TrainingError, disk_full_errno

__all__ = [
    "DistContext", "RankFailure", "setup", "shutdown", "env_rank", "prepare_model", "resolve_strategy",
    "sync_gradients", "all_gather_rows", "all_reduce", "barrier", "check_errors", "record_fatal",
    "recorded_failure", "fatal_message", "eval_share", "NullMetrics",
    "check_batch", "any_rank", "agree",
]

# auto strategy: FSDP from these sizes up (DDP replicates the weights, the gradients and AdamW's two
# moments on every rank: 16 bytes per trainable parameter in float32)
AUTO_FSDP_PARAMS = 1_000_000_000
AUTO_FSDP_FULL_FINETUNE_PARAMS = 100_000_000
_FATAL_KEY = "otca_fast/failed/"


class RankFailure(RuntimeError):
    """A failure on one or more ranks, raised on *every* rank at the same point of the step.

    ``failures``: ``[(rank, message, recoverable)]``; ``recoverable`` when every failure is a reward
    failure or a non-finite value (the training state itself is sound: checkpoint it and stop).
    """

    def __init__(self, failures: list[tuple[int, str, bool]]):
        self.failures = list(failures)
        self.ranks = [r for r, _, _ in self.failures]
        self.recoverable = all(rec for _, _, rec in self.failures)
        super().__init__("; ".join(f"rank {r}: {msg}" for r, msg, _ in self.failures))


@dataclass
class DistContext:
    """Who this process is. A single process is ``DistContext()`` (rank 0 of 1, strategy ``single``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    strategy: str = "single"          # single | ddp | fsdp (resolved by prepare_model)
    owns_group: bool = False          # setup() created the process group (shutdown() destroys it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where the small tensors of a collective must live (NCCL: this rank's GPU)."""
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def share(self, total: int) -> slice:
        """This rank's contiguous rows of a global batch of ``total`` (``total % world_size == 0``)."""
        if total % self.world_size:
            raise ValueError(f"total: {total} rows do not split evenly over {self.world_size} ranks")
        per = total // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)


# ------------------------------------------------------------------------------------------------
# set-up
# ------------------------------------------------------------------------------------------------

def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}: expected an integer (torchrun sets it), got {raw!r}") from None


def env_rank() -> int:
    """``RANK`` of the environment (0 outside torchrun): who should print before set-up."""
    return _env_int("RANK", 0)


def setup(device: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """The :class:`DistContext` of this process, from torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``.

    With ``WORLD_SIZE`` > 1 the default process group is initialised (unless the caller already did):
    NCCL when this rank runs on CUDA (``cuda:LOCAL_RANK`` for ``device`` 'auto' or 'cuda'), gloo on the
    CPU, with ``timeout_s`` as the collective timeout.
    """
    from otca_fast.config import ConfigError

    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"environment: expected 0 <= RANK < WORLD_SIZE, got RANK={rank}, WORLD_SIZE={world}")
    try:
        dev = resolve_device(device, what="run.device")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if world > 1 and device in ("auto", "cuda") and dev.type == "cuda":
        dev = torch.device(f"cuda:{local_rank}")  # one GPU per rank: torchrun's LOCAL_RANK picks it
    if world == 1:
        return DistContext(device=dev)
    import torch.distributed as dist

    if dev.type == "cuda":
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"run.device: rank {rank} wants {dev} but this node has {torch.cuda.device_count()} "
                              f"GPUs (torchrun --nproc_per_node must not exceed the GPUs per node)")
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=float(timeout_s)))
        owns = True
    else:
        backend = dist.get_backend()
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise RuntimeError(f"process group: rank {dist.get_rank()} of {dist.get_world_size()}, but the environment "
                           f"says RANK={rank}, WORLD_SIZE={world}")
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev, backend=backend,
                       owns_group=owns)


def shutdown(ctx: DistContext) -> None:
    """Destroy the process group if :func:`setup` created it."""
    if ctx.owns_group:
        import torch.distributed as dist

        if dist.is_initialized():
            if ctx.world_size > 1:
                # no rank tears its gloo/NCCL connections down while another still finishes its last
                # collectives or writes the reports
                try:
                    dist.barrier()
                except Exception as e:  # noqa: BLE001 - a peer failed at the very end: say so, tear down anyway
                    print(f"otca-train: rank {ctx.rank}: the ranks did not meet before shutting down ({e}); "
                          f"another rank may have failed after the run's last step", file=sys.stderr)
            dist.destroy_process_group()
        ctx.owns_group = False


def check_batch(ctx: DistContext, cfg) -> None:
    """The global batch must split evenly over the ranks (clear error naming the values)."""
    from otca_fast.config import ConfigError

    if not ctx.enabled:
        return
    s = cfg.sample
    n = s.prompts_per_step * s.group_size
    if n % ctx.world_size:
        import math

        q = ctx.world_size // math.gcd(s.group_size, ctx.world_size)  # prompts_per_step must be a multiple of q
        raise ConfigError(
            f"sample.prompts_per_step x sample.group_size = {s.prompts_per_step} x {s.group_size} = {n} samples per "
            f"step do not split evenly over the {ctx.world_size} ranks (torchrun --nproc_per_node x --nnodes): "
            f"the global batch must be a multiple of the world size, e.g. prompts_per_step = "
            f"{-(-s.prompts_per_step // q) * q}")
    per = n // ctx.world_size
    if per % s.batch_size and s.batch_size % per:
        # the ranks must cut their rows into the same chunks: every rank then runs the same number of
        # forwards (each one a collective under FSDP) and of optimizer updates
        raise ConfigError(f"sample.batch_size: on {ctx.world_size} ranks each rank holds {per} of the {n} samples of a "
                          f"step; sample.batch_size must divide {per} (or be a multiple of it), got {s.batch_size}")


# ------------------------------------------------------------------------------------------------
# models: DDP or FSDP2
# ------------------------------------------------------------------------------------------------

def resolve_strategy(strategy: str, module: torch.nn.Module, finetune: str) -> str:
    """``auto`` → ``fsdp`` for ≥ 1B parameters, or full fine-tuning of ≥ 100M; ``ddp`` otherwise."""
    if strategy != "auto":
        return strategy
    n = sum(p.numel() for p in module.parameters())
    if n >= AUTO_FSDP_PARAMS or (finetune == "full" and n >= AUTO_FSDP_FULL_FINETUNE_PARAMS):
        return "fsdp"
    return "ddp"


def _block_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks: the elements of every outermost ``nn.ModuleList`` that hold parameters
    (``blocks`` of Wan, ``transformer_blocks`` / ``single_transformer_blocks`` of SD3 and FLUX)."""
    blocks, prefixes = [], []
    for name, child in module.named_modules():
        if not isinstance(child, torch.nn.ModuleList) or any(name.startswith(p) for p in prefixes):
            continue
        for i, block in enumerate(child):
            if any(True for _ in block.parameters()):
                blocks.append(block)
                prefixes.append(f"{name}.{i}." if name else f"{i}.")
    return blocks


def _fully_shard(module: torch.nn.Module, fsdp_cfg) -> None:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=DTYPES.get(fsdp_cfg.param_dtype),
                              reduce_dtype=DTYPES.get(fsdp_cfg.reduce_dtype))
    # pinned host memory needs a GPU (pin_memory raises on a machine without one)
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if fsdp_cfg.cpu_offload else OffloadPolicy()
    for block in _block_modules(module):
        fully_shard(block, reshard_after_forward=fsdp_cfg.reshard_after_forward, mp_policy=mp,
                    offload_policy=offload)
    fully_shard(module, mp_policy=mp, offload_policy=offload)
    # diffusers transformers return a view of their last reshape; FSDP warns that an in-place op on it
    # would skip its pre-backward hook. The backbone adapters (otca_fast.models, otca_fast.toy) only
    # compute out of place with the transformer's output, so the warning does not apply.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor", category=UserWarning)


def prepare_model(ctx: DistContext, cfg, transformer: torch.nn.Module, reference: torch.nn.Module | None,
                  named_trainable: dict[str, torch.nn.Parameter]) -> dict[str, torch.nn.Parameter]:
    """Shard (fsdp) or replicate (ddp) the transformer; returns the trainable parameters by name.

    FSDP2 replaces the module's parameters by sharded DTensor parameters of the same names, so the
    optimizer and EMA must be built from what this returns. A single process is left untouched.
    """
    if not ctx.enabled:
        ctx.strategy = "single"
        return named_trainable
    ctx.strategy = resolve_strategy(cfg.distributed.strategy, transformer, cfg.train.finetune)
    if ctx.strategy == "fsdp":
        _fully_shard(transformer, cfg.distributed.fsdp)
        if reference is not None:
            _fully_shard(reference, cfg.distributed.fsdp)
    else:
        import torch.distributed as dist

        # every rank built the same weights from run.seed; rank 0's are the truth all the same
        with torch.no_grad():
            for p in named_trainable.values():
                buf = p.data.to(ctx.comm_device)
                dist.broadcast(buf, src=0)
                if buf is not p.data:
                    p.data.copy_(buf)
    return {n: p for n, p in transformer.named_parameters() if p.requires_grad}


def sync_gradients(ctx: DistContext, params: list[torch.nn.Parameter], bucket_elements: int = 1 << 24) -> None:
    """DDP: average the gradients over the ranks, one coalesced all-reduce per bucket (no-op for fsdp,
    whose backward reduce-scatters them, and for a single process).

    A parameter that got no gradient on any rank keeps ``grad = None`` (as in a single process, so the
    optimizer skips it the same way); one that got a gradient on some ranks only is averaged with
    zeros for the others.
    """
    if not ctx.enabled or ctx.strategy != "ddp" or not params:
        return
    import torch.distributed as dist

    buckets: list[list[torch.nn.Parameter]] = []
    size = 0
    for p in params:
        if not buckets or size + p.numel() > bucket_elements or buckets[-1][0].dtype != p.dtype:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += p.numel()
    for bucket in buckets:
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket]
                         + [torch.tensor([0.0 if p.grad is None else 1.0 for p in bucket], dtype=bucket[0].dtype,
                                         device=bucket[0].device)])
        flat = flat.to(ctx.comm_device)
        dist.all_reduce(flat)
        offset = 0
        present = flat[-len(bucket):].tolist()  # one device sync per bucket
        for i, p in enumerate(bucket):
            g = flat[offset:offset + p.numel()].view_as(p).div_(ctx.world_size).to(p.device)
            offset += p.numel()
            if present[i] == 0:
                p.grad = None
            elif p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)


# ------------------------------------------------------------------------------------------------
# small collectives
# ------------------------------------------------------------------------------------------------

def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        dist.barrier()


def all_gather_rows(ctx: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` (same shape on all) along dim 0, in rank order."""
    if not ctx.enabled:
        return tensor
    import torch.distributed as dist

    local = tensor.detach().to(ctx.comm_device).contiguous()
    parts = [torch.empty_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(parts, local)
    return torch.cat(parts, 0).to(tensor.device)


def all_reduce(ctx: DistContext, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or ``max``) of ``tensor`` over the ranks; returns a new tensor on ``tensor``'s device."""
    if not ctx.enabled:
        return tensor
    import torch.distributed as dist

    t = tensor.detach().to(ctx.comm_device).clone()
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.to(tensor.device)


def eval_share(ctx: DistContext, total: int) -> torch.Tensor:
    """This rank's rows of an evaluation batch of ``total``: ⌈total/W⌉ global indices, padded with the
    last row so every rank runs the same number of forwards (:func:`all_gather_rows` then ``[:total]``)."""
    per = -(-total // ctx.world_size)
    return torch.arange(ctx.rank * per, (ctx.rank + 1) * per).clamp_max(total - 1)


# ------------------------------------------------------------------------------------------------
# failures
# ------------------------------------------------------------------------------------------------

def _describe(error: BaseException) -> tuple[str, bool]:
    from otca_fast.rewards import RewardError
    from otca_fast.rollout import NonFiniteError

    recoverable = isinstance(error, (RewardError, NonFiniteError))
    if isinstance(error, RankFailure):
        return str(error), error.recoverable
    plain = recoverable or isinstance(error, (TrainingError, CheckpointError))
    text = str(error) if plain else f"{type(error).__name__}: {error}"
    return text, recoverable


def check_errors(ctx: DistContext, error: BaseException | None, *, stop: bool = False) -> bool:
    """The failure protocol: call on every rank after rank-local work, before the next collective.

    Every rank contributes its held exception (or ``None``); if any rank has one, every rank raises
    :class:`RankFailure` naming each failing rank and its cause. A single process re-raises ``error``.
    ``stop``: this rank was asked to stop (a signal); returns whether any rank was (in the same
    all-reduce, so a stop costs no extra collective).
    """
    if not ctx.enabled:
        if error is not None:
            raise error
        return stop
    if isinstance(error, RankFailure):  # already known to every rank
        raise error
    import torch.distributed as dist

    flag = torch.tensor([0 if error is None else 1, int(stop)], dtype=torch.int64, device=ctx.comm_device)
    dist.all_reduce(flag)
    if int(flag[0]) == 0:
        return bool(flag[1])
    mine = None if error is None else (*_describe(error),)
    everyone: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(everyone, mine)
    failures = [(r, msg, rec) for r, item in enumerate(everyone) if item is not None for msg, rec in [item]]
    raise RankFailure(failures) from error


def any_rank(ctx: DistContext, flag: bool) -> bool:
    """Whether ``flag`` is set on any rank (a collective: every rank calls it at the same point)."""
    if not ctx.enabled:
        return flag
    return bool(all_reduce(ctx, torch.tensor([int(flag)], dtype=torch.int64), "max")[0])


def agree(ctx: DistContext, error: BaseException | None, cls: type[Exception]) -> None:
    """:func:`check_errors` for a failure every rank handles alike (a damaged checkpoint, a failed write): if
    any rank has ``error``, every rank raises ``cls`` with each distinct cause once. A single process re-raises
    ``error`` itself."""
    try:
        check_errors(ctx, error)
    except RankFailure as e:
        out = cls("; ".join(dict.fromkeys(msg for _, msg, _ in e.failures)))
        if isinstance(out, OSError):
            out.errno = disk_full_errno(out)
        raise out from error


def _store():
    import torch.distributed as dist

    if not dist.is_initialized():
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, AttributeError, ValueError):
        return None


def record_fatal(ctx: DistContext, error: BaseException) -> None:
    """Leave ``error`` in the rendezvous store for the other ranks (a failure this rank could not
    announce through :func:`check_errors`, e.g. inside an FSDP forward): they name it when their next
    collective breaks. Best effort; never raises."""
    if not ctx.enabled:
        return
    try:
        store = _store()
        if store is not None:
            store.set(f"{_FATAL_KEY}{ctx.rank}", _describe(error)[0][:4000])
    except Exception:  # noqa: BLE001 - the store may be gone with the failing rank
        pass


def recorded_failure(ctx: DistContext) -> str | None:
    """"rank R: cause" of the first other rank that recorded a fatal failure, or None."""
    if not ctx.enabled:
        return None
    try:
        store = _store()
        if store is None:
            return None
        for r in range(ctx.world_size):
            key = f"{_FATAL_KEY}{r}"
            if r != ctx.rank and store.check([key]):
                return f"rank {r}: {store.get(key).decode(errors='replace')}"
    except Exception:  # noqa: BLE001 - best effort
        return None
    return None


def fatal_message(ctx: DistContext, error: BaseException) -> str:
    """The message of a failure this rank cannot announce through :func:`check_errors`.

    If another rank recorded a failure first, this rank's error is a symptom of it (a collective that
    broke because that rank left): the message names the other rank and its cause. Otherwise this
    rank's own failure is recorded for the others and named.
    """
    other = recorded_failure(ctx)
    if other is not None:
        return f"{other} (rank {ctx.rank} stopped too: {type(error).__name__}: {error})"
    record_fatal(ctx, error)
    return f"rank {ctx.rank}: {_describe(error)[0]}"


class NullMetrics:
    """The metrics log of ranks other than 0: records are built (and returned) but nothing is written."""

    path = None

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        from otca_fast.report import _jsonable

        return {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}

    def add_image(self, *args, **kwargs) -> None:
        pass

    def add_image_file(self, *args, **kwargs) -> None:
        pass

    def add_clip(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

"""Checkpoints: atomic, self-describing, enough to resume bit for bit.

Layout of ``<output_dir>/checkpoints/step_00000010/``:

* ``weights.safetensors`` — the trainable weights (LoRA adapters or the full transformer), by name;
* ``ema.safetensors``     — their EMA, by the same names (absent when EMA is off);
* ``optimizer.pt``        — the optimizer's ``state_dict``;
* ``state.pt``            — step, every RNG (torch CPU/CUDA, python, numpy, the trainer's own
  generators), the prompt sampler, and whatever else the trainer needs to continue;
* ``config.yaml``         — the resolved config of the run that wrote it.

The directory is written under a temporary name and renamed into place (``os.replace`` of a
directory is atomic on POSIX), so a crash mid-write never leaves a checkpoint that looks complete;
``latest_checkpoint`` ignores the temporaries. ``.pt`` files are read with
``torch.load(weights_only=True)``: they hold only tensors and plain Python containers.

A run on several ranks (torchrun) writes the *sharded* layout instead (:func:`save_sharded`, every rank together):

* ``dcp/``        — a ``torch.distributed.checkpoint`` directory (every rank writes its shards) holding
  ``model`` (the trainable weights by name), ``optim`` (the optimizer state keyed by parameter
  name, when the optimizer has stepped) and ``ema``;
* ``state.pt`` and ``config.yaml`` as above, written by rank 0.

Both layouts load on any number of ranks (:func:`load_onto_ranks`, keyed by parameter name, either FSDP or
DDP); :func:`save_training` / :func:`load_training` are what the trainer calls for either layout, and
:func:`load_checkpoint` reads either into full tensors
(the sharded optimizer state comes back in ``optimizer.state_dict()`` form, keyed 0, 1, ... in the
order of the trainable parameters).

Crash consistency. ``state.pt`` lists every other file of the checkpoint with its size (``files``), so
a checkpoint whose file was truncated, replaced or deleted after the write is recognised without
reading it. :func:`load_checkpoint` checks that list, reads every file and checks that every tensor
is finite; what fails raises :class:`CheckpointError` naming the file and the cause, and
:func:`load_newest_valid` (``--resume``) then falls back to the next older checkpoint. A checkpoint is
never written from non-finite values, and a write that fails on a full disk says so, with the space it
needed (:class:`CheckpointWriteError`). :func:`remove_stale_temporaries` deletes what an interrupted
write left behind.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from otca_fast import checks
from otca_fast.config import ConfigError
from otca_fast.distributed import DistContext, agree, all_reduce, barrier
from otca_fast.errors import DISK_FULL, CheckpointError, CheckpointFileMissing, CheckpointWriteError, disk_full_errno

__all__ = [
    "CHECKPOINT_SUBDIR", "DCP_SUBDIR", "save_checkpoint", "load_checkpoint", "list_checkpoints", "latest_checkpoint",
    "capture_rng_state", "restore_rng_state", "Checkpoint", "is_sharded", "read_sharded", "CheckpointError",
    "CheckpointFileMissing", "CheckpointWriteError", "read_state", "first_nonfinite", "checkpoint_dirs",
    "load_newest_valid", "resume_newest_valid", "set_aside", "remove_stale_temporaries", "disk_full_errno",
    "write_failure",
    "tensor_bytes", "torch_save", "format_bytes", "unreadable", "nonfinite_state", "save_sharded",
    "load_onto_ranks", "training_state", "check_training_state", "save_training", "load_training", "config_changes",
]

CHECKPOINT_SUBDIR = "checkpoints"
DCP_SUBDIR = "dcp"  # the sharded layout's torch.distributed.checkpoint directory
_STEP_DIR = re.compile(r"^step_(\d{8})$")
# what an interrupted write leaves: the temporary directory (.tmp-PID, .tmp-sharded) or a checkpoint moved
# aside to be replaced (.old-PID)
_TEMPORARY = re.compile(r"^\.step_(\d{8})\.(tmp|old)-.+$")
T = TypeVar("T")


class Checkpoint(dict):
    """What :func:`load_checkpoint` returns: keys ``path``, ``step``, ``weights``, ``ema``,
    ``optimizer``, ``state`` and ``config_yaml`` (a dict, so it is easy to inspect)."""


def _step_dir(root: Path, step: int) -> Path:
    return root / CHECKPOINT_SUBDIR / f"step_{step:08d}"


def _contiguous(tensors: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}[{name!r}]: expected a torch.Tensor, got {type(t).__name__}")
        # safetensors refuses shared or strided storage: save an owned, contiguous CPU copy
        out[name] = t.detach().to("cpu").contiguous().clone()
    return out


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(output_dir: str | Path, step: int, *, weights: dict[str, torch.Tensor],
                    optimizer: dict[str, Any], state: dict[str, Any], ema: dict[str, torch.Tensor] | None = None,
                    config_yaml: str | None = None, keep_last: int = 3) -> Path:
    """Write the checkpoint of ``step`` atomically, then delete all but the newest ``keep_last``.

    Returns the final directory. Re-saving a step that already exists replaces it (atomically too).
    Raises :class:`CheckpointWriteError` (nothing written, the earlier checkpoints intact) when a tensor is
    NaN/Inf or the disk fills up.
    """
    checks.int_at_least("step", step, 0)
    checks.int_at_least("keep_last", keep_last, 1)
    root = Path(output_dir)
    final = _step_dir(root, step)
    weights = _contiguous(weights, "weights")
    ema = None if ema is None else _contiguous(ema, "ema")
    refused = nonfinite_state(final, {"weights": weights, "ema": ema, "optimizer": optimizer})
    if refused is not None:
        raise refused
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file(weights, str(tmp / "weights.safetensors"), metadata={"step": str(step)})
        if ema is not None:
            save_file(ema, str(tmp / "ema.safetensors"), metadata={"step": str(step)})
        torch_save(optimizer, tmp / "optimizer.pt")
        if config_yaml is not None:
            (tmp / "config.yaml").write_text(config_yaml)
        # the manifest: every other file and its size, checked before the checkpoint is ever loaded
        files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
        torch_save({**state, "step": step, "files": files}, tmp / "state.pt")
        publish_checkpoint(tmp, final, keep_last)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = write_failure(e, final, tensor_bytes([weights, ema, optimizer, state]))
        if full is None:
            raise
        raise full from e
    except BaseException:  # Ctrl-C mid-write: leave no temporary behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def publish_checkpoint(tmp: Path, final: Path, keep_last: int) -> None:
    """Make the fully written directory ``tmp`` the checkpoint ``final`` and prune the old ones.

    Everything under ``tmp`` is synced to disk before the rename, so a crash at any instant leaves
    either the previous checkpoints or the complete new one under the final name, never a partial
    one; then all but the newest ``keep_last`` checkpoints are removed. Both checkpoint layouts (the
    single-process safetensors one and the sharded DCP one) are published through here.
    """
    for dirpath, _, files in os.walk(tmp):
        for name in files:
            with open(Path(dirpath) / name, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))
    if final.exists():
        # a checkpoint of this step already exists (e.g. written again after a reward failure):
        # move it aside first so that at every instant one complete copy carries the final name
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(old, final)
            raise
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)
    for _, path in list_checkpoints(final.parent.parent)[:-keep_last]:
        shutil.rmtree(path)


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``output_dir`` as ``(step, path)``, oldest first."""
    root = Path(output_dir) / CHECKPOINT_SUBDIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / "state.pt").is_file() and (
                (p / "weights.safetensors").is_file() or is_sharded(p)):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def checkpoint_dirs(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Every ``step_*`` directory under ``output_dir/checkpoints`` as ``(step, path)``, oldest first, complete
    or not (what ``--resume`` examines; :func:`list_checkpoints` lists only the complete-looking ones)."""
    root = Path(output_dir) / CHECKPOINT_SUBDIR
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir())


def load_newest_valid(output_dir: str | Path, load: Callable[[Path], T],
                      warn: Callable[[str], None]) -> tuple[Path, T, list[tuple[Path, str]]]:
    """``load(path)`` the newest checkpoint that loads, falling back to older ones.

    ``load`` raises :class:`CheckpointError` for a damaged checkpoint (any other exception propagates: a
    config that does not fit the checkpoint is not damage). Each skipped checkpoint is reported through
    ``warn``. Returns ``(path, what load returned, [(skipped path, why)])``; with no checkpoint at all
    raises :class:`CheckpointFileMissing`, with none valid a :class:`CheckpointError` naming each one and why.
    """
    root = Path(output_dir) / CHECKPOINT_SUBDIR
    skipped: list[tuple[Path, str]] = []
    for _, path in reversed(checkpoint_dirs(output_dir)):
        try:
            value = load(path)
        except CheckpointError as e:
            skipped.append((path, str(e)))
            warn(f"checkpoint {path.name} is damaged, skipped: {e}")
            continue
        return path, value, skipped
    if not skipped:
        raise CheckpointFileMissing(f"--resume: no checkpoint in {root} (run without --resume to start a new run)")
    raise CheckpointError(f"--resume: no valid checkpoint in {root}: "
                          + "; ".join(f"{path.name}: {why}" for path, why in skipped))


def resume_newest_valid(ctx: DistContext, output_dir: str | Path, load: Callable[[Path], T],
                        warn: Callable[[str], None]) -> T:
    """``--resume``: :func:`load_newest_valid` on every rank, then rank 0 sets the damaged newer checkpoints
    aside (:func:`set_aside`), so the next run does not meet them again."""
    _, value, skipped = load_newest_valid(output_dir, load, warn)
    if ctx.is_main:
        for path, _ in skipped:
            warn(f"moved the damaged checkpoint {path.name} aside to {set_aside(path).name}")
    barrier(ctx)
    return value


def set_aside(path: str | Path) -> Path:
    """Rename a damaged checkpoint to ``step_<N>.damaged`` (``.damaged-2``, ... if taken): never listed, never
    loaded, never pruned, kept for inspection. Returns the new path."""
    p = Path(path)
    target, n = p.with_name(f"{p.name}.damaged"), 1
    while target.exists():
        n += 1
        target = p.with_name(f"{p.name}.damaged-{n}")
    os.replace(p, target)
    return target


def remove_stale_temporaries(output_dir: str | Path) -> list[str]:
    """Clean up after checkpoint writes that never finished (a killed process); returns what was done.

    A temporary directory (``.step_<N>.tmp-*``) is deleted. A checkpoint moved aside to be replaced
    (``.step_<N>.old-*``) is put back when its replacement never arrived, deleted otherwise. Call it only
    while holding the run lock (:mod:`otca_fast.runlock`): another live run's temporaries look the same.
    """
    root = Path(output_dir) / CHECKPOINT_SUBDIR
    done: list[str] = []
    if not root.is_dir():
        return done
    for p in sorted(root.iterdir()):
        m = _TEMPORARY.match(p.name)
        if not m or not p.is_dir():
            continue
        final = root / f"step_{m.group(1)}"
        if m.group(2) == "old" and not final.exists():
            os.replace(p, final)
            done.append(f"restored {final.name} from {p.name} (its replacement was interrupted)")
            continue
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        shutil.rmtree(p, ignore_errors=True)
        done.append(f"removed {p.name} ({format_bytes(size)}), left by an interrupted checkpoint write")
    return done


def is_sharded(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint of the sharded (multi-rank, ``dcp/``) layout."""
    return (Path(path) / DCP_SUBDIR / ".metadata").is_file()


def read_sharded(path: str | Path) -> dict[str, Any]:
    """Everything in a ``torch.distributed.checkpoint`` directory as full CPU tensors, in this process
    (no process group needed): ``{"model": {...}, "optim": {...}, "ema": {...}}`` as saved."""
    import warnings

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():  # "no process group: loading in a single process" is the intent here
        warnings.simplefilter("ignore", UserWarning)
        return _load_state_dict_from_keys(storage_reader=FileSystemReader(str(path)))


def _indexed_optimizer_state(optim: dict[str, Any] | None) -> dict[str, Any]:
    """A name-keyed optimizer state (torch.distributed.checkpoint.state_dict) in ``state_dict()`` form."""
    if not optim:
        return {"state": {}, "param_groups": []}
    order: list[str] = []
    groups = []
    for group in optim["param_groups"]:
        names = list(group["params"])
        groups.append({**group, "params": list(range(len(order), len(order) + len(names)))})
        order += names
    state = {order.index(name): value for name, value in optim.get("state", {}).items()}
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def _load_sharded(p: Path, map_location: str | torch.device, verify: bool) -> Checkpoint:
    state = read_state(p) if verify else torch.load(p / "state.pt", map_location="cpu", weights_only=True)
    try:
        data = read_sharded(p / DCP_SUBDIR)
    except Exception as e:  # noqa: BLE001 - any failure to read the shards is damage, named with its file
        raise unreadable(p / DCP_SUBDIR, e) from None
    data, state = _move(data, map_location), _move(state, map_location)
    if verify:
        for key in ("model", "ema", "optim"):
            bad = first_nonfinite(data.get(key), key)
            if bad is not None:
                raise CheckpointError(f"{p / DCP_SUBDIR}: {bad}")
    return Checkpoint(path=p, step=int(state["step"]), weights=dict(data.get("model", {})),
                      ema=dict(data["ema"]) if data.get("ema") else None,
                      optimizer=_indexed_optimizer_state(data.get("optim")), state=state,
                      config_yaml=(p / "config.yaml").read_text() if (p / "config.yaml").is_file() else None)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *, verify: bool = True) -> Checkpoint:
    """Read a checkpoint directory written by :func:`save_checkpoint` (or a sharded one, see above).

    With ``verify`` (the default) the checkpoint is checked as it is read: every file its ``state.pt`` lists
    present with its recorded size, every file loadable, every tensor finite. A failure raises
    :class:`CheckpointError` (:class:`CheckpointFileMissing` for a missing file) naming the file.
    """
    p = Path(path)
    if is_sharded(p) and (p / "state.pt").is_file():
        return _load_sharded(p, map_location, verify)
    if (p / DCP_SUBDIR).is_dir() and not is_sharded(p):
        raise CheckpointFileMissing(f"{p / DCP_SUBDIR / '.metadata'}: missing (the sharded checkpoint's index)")
    missing = [n for n in ("weights.safetensors", "optimizer.pt", "state.pt") if not (p / n).is_file()]
    if missing:
        raise CheckpointFileMissing(f"checkpoint {p}: expected files weights.safetensors, optimizer.pt and state.pt, "
                                    f"missing {missing}")
    state = read_state(p) if verify else torch.load(p / "state.pt", map_location="cpu", weights_only=True)
    dev = str(map_location)
    files = {"weights.safetensors": _read(p / "weights.safetensors", lambda f: load_file(str(f), device=dev)),
             "optimizer.pt": _read(p / "optimizer.pt",
                                   lambda f: torch.load(f, map_location=map_location, weights_only=True))}
    if (p / "ema.safetensors").is_file():
        files["ema.safetensors"] = _read(p / "ema.safetensors", lambda f: load_file(str(f), device=dev))
    if verify:
        for name, tree in files.items():
            bad = first_nonfinite(tree, "tensor" if name.endswith(".safetensors") else "optimizer")
            if bad is not None:
                raise CheckpointError(f"{p / name}: {bad}")
    state = _move(state, map_location)
    return Checkpoint(path=p, step=int(state["step"]), weights=files["weights.safetensors"],
                      ema=files.get("ema.safetensors"), optimizer=files["optimizer.pt"], state=state,
                      config_yaml=(p / "config.yaml").read_text() if (p / "config.yaml").is_file() else None)


def _move(tree: Any, device: str | torch.device) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if isinstance(tree, dict):
        return {k: _move(v, device) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_move(v, device) for v in tree)
    return tree


def read_state(path: str | Path) -> dict[str, Any]:
    """``state.pt`` of the checkpoint ``path``, checked: it loads, it is the step of its directory, and every
    file it lists (``files``, written since the manifest was introduced) is present with its recorded
    size. Raises :class:`CheckpointError` naming the file otherwise. Cheap: no tensor file is read."""
    p = Path(path)
    state = _read(p / "state.pt", lambda f: torch.load(f, map_location="cpu", weights_only=True))
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{p / 'state.pt'}: not a checkpoint state (no 'step')")
    m = _STEP_DIR.match(p.name)
    if m and int(m.group(1)) != int(state["step"]):
        raise CheckpointError(f"{p / 'state.pt'}: holds step {int(state['step'])}, not the step of its directory")
    for rel, size in dict(state.get("files", {})).items():
        f = p / rel
        if not f.is_file():
            raise CheckpointFileMissing(f"{f}: missing (the checkpoint was written with it)")
        actual = f.stat().st_size
        if actual != int(size):
            raise CheckpointError(f"{f}: {actual} bytes, written with {int(size)} (truncated or overwritten)")
    return state


def _read(f: Path, reader: Callable[[Path], T]) -> T:
    """``reader(f)``, any failure raised as a :class:`CheckpointError` naming ``f`` (never torch's advice to
    retry with ``weights_only=False``: a damaged file is not an untrusted one)."""
    if not f.is_file():
        raise CheckpointFileMissing(f"{f}: missing")
    try:
        return reader(f)
    except Exception as e:  # noqa: BLE001 - every way a damaged file fails to load
        raise unreadable(f, e) from None


def unreadable(f: Path, error: BaseException) -> CheckpointError:
    """The :class:`CheckpointError` of a checkpoint file (or directory) ``f`` that failed to load with ``error``:
    the first sentence of its message, never torch's advice to retry with ``weights_only=False`` (a damaged
    file is not an untrusted one)."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if "weights_only" in text:  # torch's message for a file that is not a zip archive
        text = "not a PyTorch zip archive"
    return CheckpointError(f"{f}: unreadable ({text.split('. ')[0][:200]}); it is damaged (truncated or overwritten)")


def _tensors(tree: Any, where: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        yield where, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _tensors(v, f"{where}[{k!r}]")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _tensors(v, f"{where}[{i}]")


def first_nonfinite(tree: Any, what: str = "tensor") -> str | None:
    """Where the first NaN/Inf among the floating tensors of ``tree`` (a tensor or nested dicts and lists)
    is, e.g. ``"tensor['blocks.0.lora_A.weight'] holds 3 NaN and 0 Inf of its 96 values"``; None if all are
    finite. A sharded tensor (DTensor) is checked on this rank's shard."""
    for where, t in _tensors(tree, what):
        local = t.to_local() if hasattr(t, "to_local") else t
        if local.is_floating_point() or local.is_complex():
            finite = torch.isfinite(local)
            if not bool(finite.all()):
                nan = int(torch.isnan(local).sum())
                return (f"{where} holds {nan} NaN and {int((~finite).sum()) - nan} Inf of its {local.numel()} "
                        f"values")
    return None


def nonfinite_state(final: Path, parts: dict[str, Any], where: str = "") -> CheckpointWriteError | None:
    """The refusal to write checkpoint ``final`` when a tensor of ``parts`` (``{"weights": ..., ...}``) is NaN/Inf
    (``where`` says on which rank), else None."""
    for what, tree in parts.items():
        bad = first_nonfinite(tree, what)
        if bad is not None:
            return CheckpointWriteError(f"checkpoint {final} not written: {bad}{where} (a checkpoint never holds "
                                        f"non-finite values; the earlier checkpoints are the last good states)")
    return None


def tensor_bytes(tree: Any) -> int:
    """Bytes of the tensors in ``tree`` (about what a checkpoint of them takes on disk)."""
    total = 0
    for _, t in _tensors(tree, ""):
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


class _RecordingWriter:
    """A file object that remembers the OSError of a failed write: torch.save reports a full disk as
    ``[enforce fail at inline_container.cc] unexpected pos``, which names neither the cause nor the file."""

    def __init__(self, fh):
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.fh.flush()


def torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)``, a failed write raised as its OSError (ENOSPC, EDQUOT, ...) naming the file."""
    fh = open(path, "wb")  # noqa: SIM115 - closed below, where its final flush may fail too
    writer = _RecordingWriter(fh)
    try:
        try:
            torch.save(obj, writer)
        finally:
            fh.close()
    except RuntimeError:
        if writer.error is None:
            raise
        raise OSError(writer.error.errno, writer.error.strerror, str(path)) from None
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None


def write_failure(error: BaseException, final: Path, needed: int) -> CheckpointWriteError | None:
    """The :class:`CheckpointWriteError` saying that the disk filled up while writing checkpoint ``final``
    (how much it needed, how much is free), or None when ``error`` is another failure."""
    code = disk_full_errno(error)
    if code is None:
        return None
    try:
        free = format_bytes(shutil.disk_usage(final.parent).free)
    except OSError:
        free = "an unknown amount"
    out = CheckpointWriteError(
        f"{DISK_FULL[code][1]} writing checkpoint {final}: it needs about {format_bytes(needed)}, {free} is free "
        f"there (the partial write was removed; the earlier checkpoints are intact). Free some space or lower "
        f"train.keep_checkpoints, then continue with --resume")
    out.errno = code
    return out


# ------------------------------------------------------------------------------------------------
# RNG state
# ------------------------------------------------------------------------------------------------

def capture_rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every RNG a run may touch, as tensors and plain containers (``weights_only``-loadable)."""
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch_cpu": torch.get_rng_state(),
        "python": random.getstate(),
        # numpy's MT19937 key array goes in as an int64 tensor (weights_only forbids ndarrays)
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_cached)},
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    """Inverse of :func:`capture_rng_state`; every generator named in ``generators`` must be in it."""
    torch.set_rng_state(state["torch_cpu"].cpu())
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "torch_cuda" in state and torch.cuda.is_available():
        saved = state["torch_cuda"]
        if len(saved) != torch.cuda.device_count():
            raise RuntimeError(f"checkpoint RNG: saved the state of {len(saved)} CUDA devices, this machine has "
                               f"{torch.cuda.device_count()}; resume on the same number of GPUs")
        torch.cuda.set_rng_state_all([s.cpu() for s in saved])
    saved_gens = state.get("generators", {})
    for name, g in (generators or {}).items():
        if name not in saved_gens:
            raise KeyError(f"checkpoint RNG: no saved state for generator {name!r} (saved: {sorted(saved_gens)})")
        g.set_state(saved_gens[name].cpu())


# ------------------------------------------------------------------------------------------------
# the sharded layout (torch.distributed.checkpoint): written by every rank together
# ------------------------------------------------------------------------------------------------

def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # only the trainable weights are saved: the frozen base comes from model.path / the seed
    return StateDictOptions(ignore_frozen_params=True, strict=False, **kw)


def save_sharded(ctx: DistContext, output_dir: str | Path, step: int, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, ema: dict[str, torch.Tensor] | None, state: dict[str, Any],
                    config_yaml: str | None, keep_last: int) -> Path:
    """Write the sharded checkpoint of ``step`` (a collective: every rank calls it).

    Every rank writes its shards into ``.step_<8-digit step>.tmp-sharded/dcp``; rank 0 adds
    ``state.pt`` (with the manifest of every file and its size) and ``config.yaml`` and publishes the
    directory (:func:`publish_checkpoint`: synced, renamed into place, all but the newest
    ``keep_last`` pruned). A non-finite value on any rank, or a full disk, raises
    :class:`CheckpointWriteError` on every rank, and any failure leaves the previous
    checkpoints as they were.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    root = Path(output_dir)
    final = root / CHECKPOINT_SUBDIR / f"step_{step:08d}"
    tmp = final.parent / f".{final.name}.tmp-sharded"
    content: dict[str, Any] = {"model": get_model_state_dict(model, options=_options())}
    # an optimizer that has never stepped has no state; get_optimizer_state_dict would initialise it
    # with a zero-gradient step (moving AdamW's step count), so it is left out until it has stepped
    has_optim = bool(optimizer.state)
    if has_optim:
        content["optim"] = get_optimizer_state_dict(model, optimizer, options=_options())
    if ema is not None:
        content["ema"] = dict(ema)
    # never a checkpoint of non-finite values: each rank checks its shards, all decide together
    agree(ctx, nonfinite_state(final, content, f" on rank {ctx.rank}"), CheckpointWriteError)
    needed = int(all_reduce(ctx, torch.tensor([tensor_bytes(content)], dtype=torch.float64))[0])
    error = None
    if ctx.is_main:
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        except OSError as e:
            error = write_failure(e, final, needed) or e
    agree(ctx, error, CheckpointWriteError)
    error = None
    try:
        dcp.save(content, checkpoint_id=str(tmp / DCP_SUBDIR))
    except Exception as e:  # noqa: BLE001 - decided together below; a full disk is said to be one
        error = write_failure(e, final, needed) or e
    if error is not None and ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    agree(ctx, error, CheckpointWriteError)
    error = None
    if ctx.is_main:
        try:
            if config_yaml is not None:
                (tmp / "config.yaml").write_text(config_yaml)
            files = {f.relative_to(tmp).as_posix(): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
            torch_save({**state, "step": step, "world_size": ctx.world_size, "strategy": ctx.strategy,
                             "has_optimizer_state": has_optim, "files": files}, tmp / "state.pt")
            publish_checkpoint(tmp, final, keep_last)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            error = write_failure(e, final, needed) or e
    agree(ctx, error, CheckpointWriteError)
    return final


def _assign(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into ``target`` (a plain tensor or this rank's shard of a DTensor)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(target, DTensor):
            local = distribute_tensor(full.to(target.device, target.dtype), target.device_mesh, target.placements,
                                      src_data_rank=None)
            target.copy_(local)
        else:
            target.copy_(full.to(target.device, target.dtype))


def load_onto_ranks(ctx: DistContext, path: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    named_trainable: dict[str, torch.nn.Parameter],
                    ema: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """Load a checkpoint of either layout into ``model``/``optimizer``/``ema`` (in place, any world size,
    either strategy); returns its ``state.pt``. Every rank calls it."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    p = Path(path)
    names = list(named_trainable)
    optimizer.state.clear()  # the checkpoint's state replaces it (and a failed earlier attempt leaves nothing)
    if not is_sharded(p):
        # the single-process layout: every rank reads (and verifies) the full tensors and keeps its part
        c, error = None, None
        try:
            c = read_training_weights(p, names)
        except CheckpointError as e:
            error = e
        agree(ctx, error, CheckpointError)
        set_model_state_dict(model, {n: c["weights"][n] for n in names}, options=_options(full_state_dict=True))
        saved = c["optimizer"]
        if saved.get("state"):
            osd = {"state": {names[i]: s for i, s in saved["state"].items()},
                   "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]]}
            set_optimizer_state_dict(model, optimizer, osd, options=_options(full_state_dict=True))
        if ema is not None:
            if c["ema"] is None:
                raise ConfigError(f"checkpoint {p} has no EMA weights but train.ema.enabled is true")
            for n in names:
                _assign(ema[n], c["ema"][n])
        return c["state"]

    import torch.distributed.checkpoint as dcp

    # the sharded layout: every file the manifest lists, and the DCP metadata, before any collective read
    state, meta, error = None, None, None
    try:
        state = read_state(p)
        meta = dcp.FileSystemReader(str(p / DCP_SUBDIR)).read_metadata()
    except CheckpointError as e:
        error = e
    except Exception as e:  # noqa: BLE001 - unreadable metadata is damage
        error = unreadable(p / DCP_SUBDIR / ".metadata", e)
    agree(ctx, error, CheckpointError)
    saved_keys = {k.split(".", 1)[1] for k in meta.state_dict_metadata if k.startswith("model.")}
    _check_names(p, names, saved_keys)
    content: dict[str, Any] = {"model": get_model_state_dict(model, options=_options())}
    has_optim = bool(state.get("has_optimizer_state", True))
    if has_optim:
        content["optim"] = get_optimizer_state_dict(model, optimizer, options=_options())
    if ema is not None:
        if not any(k.startswith("ema.") for k in meta.state_dict_metadata):
            raise ConfigError(f"checkpoint {p} has no EMA weights but train.ema.enabled is true")
        content["ema"] = dict(ema)
    error = None
    try:
        with warnings.catch_warnings():  # one process loading: "assuming the intent is to load in a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(content, checkpoint_id=str(p / DCP_SUBDIR))
    except Exception as e:  # noqa: BLE001 - a shard that does not read is damage
        error = unreadable(p / DCP_SUBDIR, e)
    agree(ctx, error, CheckpointError)
    error = None
    for key in ("model", "optim", "ema"):  # every rank checks the shards it read
        bad = first_nonfinite(content.get(key), key)
        if bad is not None:
            error = CheckpointError(f"{p / DCP_SUBDIR}: {bad} (rank {ctx.rank}'s shard)")
            break
    agree(ctx, error, CheckpointError)
    set_model_state_dict(model, content["model"], options=_options())
    if has_optim:
        set_optimizer_state_dict(model, optimizer, content["optim"], options=_options())
    return state


def _check_names(path: Path, names: list[str], saved) -> None:
    missing = sorted(set(names) - set(saved))
    extra = sorted(set(saved) - set(names))
    if missing or extra:
        raise ConfigError(f"checkpoint {path}: its weights do not match this config's trainable parameters "
                          f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
                          f"{extra[:3]}{'...' if len(extra) > 3 else ''}); resume with the config that wrote it")


# ------------------------------------------------------------------------------------------------
# a training run's checkpoint: what the trainer writes and reads back (either layout, any number of ranks)
# ------------------------------------------------------------------------------------------------

def training_state(*, step: int, optimizer_steps: int, generators: dict[str, torch.Generator], sampler,
                   ema) -> dict[str, Any]:
    """Everything besides the weights and the optimizer moments that the next step depends on: every RNG, the
    prompt sampler, the counters, and the EMA's own state (its shadow weights are written beside the weights)."""
    state = {"rng": capture_rng_state(generators), "sampler": sampler.state_dict(),
             "optimizer_steps": optimizer_steps, "step": step}
    if ema is not None:
        ema_state = ema.state_dict()
        ema_state.pop("shadow_params")
        state["ema"] = ema_state
    return state


def check_training_state(path: str | Path, state: dict[str, Any]) -> None:
    """:class:`CheckpointError` when ``state`` is not a training state (a checkpoint of something else)."""
    missing = [key for key in ("rng", "sampler", "optimizer_steps") if key not in state]
    if missing:
        raise CheckpointError(f"{Path(path) / 'state.pt'}: not a training state (no {missing})")


def save_training(ctx: DistContext, output_dir: str | Path, step: int, state: dict[str, Any], *,
                  model: torch.nn.Module, named_trainable: dict[str, torch.nn.Parameter],
                  optimizer: torch.optim.Optimizer, ema, config_yaml: str, keep_last: int) -> Path:
    """Checkpoint a run after ``step`` steps: the single-process layout, or the sharded one on several ranks
    (every rank calls it). ``ema`` is the run's ``diffusers`` EMAModel or None."""
    shadow = dict(zip(named_trainable, ema.shadow_params)) if ema is not None else None
    if ctx.enabled:
        return save_sharded(ctx, output_dir, step, model=model, optimizer=optimizer, ema=shadow, state=state,
                            config_yaml=config_yaml, keep_last=keep_last)
    return save_checkpoint(output_dir, step, weights=dict(named_trainable), optimizer=optimizer.state_dict(),
                           state=state, ema=shadow, config_yaml=config_yaml, keep_last=keep_last)


def load_training(ctx: DistContext, path: str | Path, *, model: torch.nn.Module,
                  named_trainable: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer, ema, sampler,
                  generators: dict[str, torch.Generator]) -> tuple[dict[str, Any], str | None]:
    """Load the checkpoint ``path`` into the run in place (weights, optimizer, EMA, the prompt ``sampler`` and
    every RNG); returns its training state and the config it was written with. :class:`CheckpointError` (on
    every rank together) when it does not verify; :class:`otca_fast.config.ConfigError` when it does not fit
    the run's config."""
    state, config_yaml = _load_weights(ctx, Path(path), model=model, named_trainable=named_trainable,
                                       optimizer=optimizer, ema=ema)
    sampler.load_state_dict(state["sampler"])
    rng = state["rng"]
    if ctx.enabled or int(state.get("world_size", 1)) > 1:
        # rank 0's RNG states (every rank drew the same); the per-GPU CUDA states belong to one machine's devices
        # and the loop draws only from its own generators, so they are skipped
        rng = {key: value for key, value in rng.items() if key != "torch_cuda"}
    restore_rng_state(rng, generators)
    return state, config_yaml


def _load_weights(ctx: DistContext, path: Path, *, model: torch.nn.Module,
                  named_trainable: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                  ema) -> tuple[dict[str, Any], str | None]:
    if ctx.enabled or is_sharded(path):
        # any layout onto any number of ranks, either strategy: by parameter name (each rank keeps its part)
        shadow = dict(zip(named_trainable, ema.shadow_params)) if ema is not None else None
        state = load_onto_ranks(ctx, path, model=model, optimizer=optimizer, named_trainable=named_trainable,
                                ema=shadow)
        if ema is not None:
            if "ema" not in state:
                raise ConfigError(f"checkpoint {path} has no EMA weights but train.ema.enabled is true")
            ema.load_state_dict(dict(state["ema"]))  # the shadow weights were loaded in place
        config = path / "config.yaml"
        check_training_state(path, state)
        return state, config.read_text() if config.is_file() else None
    c = read_training_weights(path, list(named_trainable))
    check_training_state(path, c["state"])
    with torch.no_grad():
        for name, p in named_trainable.items():
            p.copy_(c["weights"][name].to(p.device, p.dtype))
    optimizer.load_state_dict(c["optimizer"])
    state = c["state"]
    if ema is not None:
        if c["ema"] is None or "ema" not in state:
            raise ConfigError(f"checkpoint {path} has no EMA weights but train.ema.enabled is true")
        ema_state = dict(state["ema"])
        ema_state["shadow_params"] = [c["ema"][n].to(p.device, p.dtype) for n, p in named_trainable.items()]
        ema.load_state_dict(ema_state)
    return state, c["config_yaml"]


def read_training_weights(path: str | Path, names: list[str]) -> Checkpoint:
    """The single-process layout, verified (:func:`load_checkpoint`), whose weights are exactly the trainable
    parameters ``names`` (a :class:`otca_fast.config.ConfigError` naming the difference otherwise). The one
    reader of that layout for training: a single process copies it in, ranks keep their parts of it."""
    c = load_checkpoint(path, map_location="cpu")
    _check_names(Path(path), names, c["weights"])
    return c


def config_changes(saved_yaml: str | None, now_yaml: str) -> list[str]:
    """The config keys (dotted) that differ between a checkpoint's config and the run's, leaving out those that
    cannot change the numbers (``run.``, ``eval.``, ``distributed.``, the step budget and checkpoint cadence)."""
    import yaml

    if saved_yaml is None:
        return []
    benign = {"train.max_steps", "train.checkpoint_every", "train.keep_checkpoints"}

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(yaml.safe_load(saved_yaml)), flat(yaml.safe_load(now_yaml))
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in benign
                  and not k.startswith(("run.", "eval.", "distributed.")))

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

A run on several ranks (torchrun) writes the *sharded* layout instead (``otca_fast.distributed``):

* ``dcp/``        — a ``torch.distributed.checkpoint`` directory (every rank writes its shards) holding
  ``model`` (the trainable weights by name), ``optim`` (the optimizer state keyed by parameter
  name, when the optimizer has stepped) and ``ema``;
* ``state.pt`` and ``config.yaml`` as above, written by rank 0.

Both layouts load on any number of ranks; :func:`load_checkpoint` reads either into full tensors
(the sharded optimizer state comes back in ``optimizer.state_dict()`` form, keyed 0, 1, ... in the
order of the trainable parameters).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "CHECKPOINT_SUBDIR", "DCP_SUBDIR", "save_checkpoint", "load_checkpoint", "list_checkpoints", "latest_checkpoint",
    "capture_rng_state", "restore_rng_state", "Checkpoint", "is_sharded", "read_sharded",
]

CHECKPOINT_SUBDIR = "checkpoints"
DCP_SUBDIR = "dcp"  # the sharded layout's torch.distributed.checkpoint directory
_STEP_DIR = re.compile(r"^step_(\d{8})$")


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
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step: expected an int >= 0, got {step!r}")
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"keep_last: expected an int >= 1, got {keep_last!r}")
    root = Path(output_dir)
    final = _step_dir(root, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(_contiguous(weights, "weights"), str(tmp / "weights.safetensors"), metadata={"step": str(step)})
    if ema is not None:
        save_file(_contiguous(ema, "ema"), str(tmp / "ema.safetensors"), metadata={"step": str(step)})
    torch.save(optimizer, tmp / "optimizer.pt")
    torch.save({**state, "step": step}, tmp / "state.pt")
    if config_yaml is not None:
        (tmp / "config.yaml").write_text(config_yaml)
    publish_checkpoint(tmp, final, keep_last)
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
        os.replace(tmp, final)
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


def _load_sharded(p: Path, map_location: str | torch.device) -> Checkpoint:
    state = torch.load(p / "state.pt", map_location=map_location, weights_only=True)
    data = read_sharded(p / DCP_SUBDIR)

    def move(tree):
        if isinstance(tree, torch.Tensor):
            return tree.to(map_location)
        if isinstance(tree, dict):
            return {k: move(v) for k, v in tree.items()}
        if isinstance(tree, list):
            return [move(v) for v in tree]
        return tree

    data = move(data)
    return Checkpoint(path=p, step=int(state["step"]), weights=dict(data.get("model", {})),
                      ema=dict(data["ema"]) if data.get("ema") else None,
                      optimizer=_indexed_optimizer_state(data.get("optim")), state=state,
                      config_yaml=(p / "config.yaml").read_text() if (p / "config.yaml").is_file() else None)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint directory written by :func:`save_checkpoint` (or a sharded one, see above)."""
    p = Path(path)
    if is_sharded(p) and (p / "state.pt").is_file():
        return _load_sharded(p, map_location)
    missing = [n for n in ("weights.safetensors", "optimizer.pt", "state.pt") if not (p / n).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {p}: expected files weights.safetensors, optimizer.pt and state.pt, "
                                f"missing {missing}")
    state = torch.load(p / "state.pt", map_location=map_location, weights_only=True)
    return Checkpoint(
        path=p,
        step=int(state["step"]),
        weights=load_file(str(p / "weights.safetensors"), device=str(map_location)),
        ema=load_file(str(p / "ema.safetensors"), device=str(map_location)) if (p / "ema.safetensors").is_file()
        else None,
        optimizer=torch.load(p / "optimizer.pt", map_location=map_location, weights_only=True),
        state=state,
        config_yaml=(p / "config.yaml").read_text() if (p / "config.yaml").is_file() else None,
    )


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

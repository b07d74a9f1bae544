"""Build settings for the trajectory-buffer extension, shared by setup.py, the just-in-time build in
``otca_fast.buffer`` and ``csrc/check_cuda_build.py``.

Standard library only: setup.py imports this file by path before it knows whether torch is importable.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
from pathlib import Path

CSRC_DIR = Path(__file__).resolve().parent

# Host-side core (storage, validation, written mask, multi-threaded copies) and the Python bindings:
# compiled in every variant.
CPP_SOURCES = ("trajectory_buffer.cpp", "bindings.cpp")
# Asynchronous device copies (streams, events, pinned allocation): compiled only in the CUDA variant.
CUDA_SOURCES = ("trajectory_buffer_cuda.cu",)

# No -std flag: torch.utils.cpp_extension adds the standard its headers need (C++17 up to torch 2.9,
# C++20 after), and a second one would override it.
# Hidden visibility (pybind11's recommendation): two builds of the module in one process, e.g. a stale
# otca_fast._C and its just-in-time replacement, then cannot interpose each other's symbols.
CXX_FLAGS = ["-O3", "-fvisibility=hidden"]
NVCC_FLAGS = ["-O3", "-Xcompiler=-fvisibility=hidden"]
# The .cu file holds host code only (copies go through the copy engines, see trajectory_buffer_cuda.cu),
# so the device architecture list only decides which GPUs nvcc accepts; one SASS per data-centre
# generation plus PTX for anything newer keeps the compile short.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def sources(with_cuda: bool) -> list[str]:
    """Absolute paths of the extension's sources for the CPU (``with_cuda=False``) or CUDA variant."""
    names = CPP_SOURCES + (CUDA_SOURCES if with_cuda else ())
    return [str(CSRC_DIR / name) for name in names]


# Everything that decides what the compiled module does; hashed into it (SOURCES_HASH) so that
# otca_fast.buffer can tell an extension built from older sources (a stale in-place build of an
# editable install) from a current one.
HASHED_FILES = ("trajectory_buffer.h", "trajectory_buffer.cpp", "trajectory_buffer_cuda.cu", "bindings.cpp",
                "build_config.py")


def sources_hash() -> str:
    """A short digest of the sources, usable as a preprocessor token (it starts with a letter)."""
    digest = hashlib.sha256()
    for name in HASHED_FILES:
        digest.update(name.encode())
        digest.update((CSRC_DIR / name).read_bytes())
    return "h" + digest.hexdigest()[:16]


def define_macros(with_cuda: bool) -> list[tuple[str, str]]:
    macros = [("OTCA_SOURCES_HASH", sources_hash())]
    if with_cuda:
        macros.append(("OTCA_WITH_CUDA", "1"))
    return macros


def _is_cuda_root(root: str | os.PathLike[str]) -> bool:
    """A usable toolkit root has nvcc, the runtime headers and a linkable libcudart."""
    r = Path(root)
    has_lib = any(
        (r / sub / "libcudart.so").exists() for sub in ("lib64", "lib", "targets/x86_64-linux/lib")
    )
    return (r / "bin" / "nvcc").is_file() and (r / "include" / "cuda_runtime.h").is_file() and has_lib


def _root_from_nvcc(nvcc: str) -> str | None:
    """Resolve the toolkit root from an ``nvcc`` found on PATH.

    PATH may hold a symlink (resolved with realpath) or a wrapper script such as
    ``exec /usr/local/cuda-13.0/bin/nvcc "$@"``: torch's own guess (``dirname(dirname(which nvcc))``)
    then names ``/usr/local`` and linking fails with 'cannot find -lcudart'. For a script we read the
    absolute ``.../bin/nvcc`` path it execs.
    """
    real = os.path.realpath(nvcc)
    candidate = os.path.dirname(os.path.dirname(real))
    if _is_cuda_root(candidate):
        return candidate
    try:
        with open(real, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if head.startswith(b"\x7fELF"):
        return None
    for match in re.finditer(rb"(/[^\s'\"]+)/bin/nvcc\b", head):
        root = match.group(1).decode(errors="replace")
        if _is_cuda_root(root):
            return os.path.realpath(root)
    return None


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", os.path.basename(path)))


def find_cuda_home() -> str | None:
    """The CUDA toolkit root, or None when no usable toolkit is installed.

    Order: ``CUDA_HOME`` / ``CUDA_PATH`` when they name a usable root (a set but broken value is
    reported, not silently replaced), then the ``nvcc`` on PATH (symlinks and wrapper scripts
    resolved), then ``/usr/local/cuda`` and the newest ``/usr/local/cuda-*``.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            if _is_cuda_root(value):
                return value
            raise ValueError(
                f"{var}={value!r} is not a CUDA toolkit root: expected bin/nvcc, include/cuda_runtime.h "
                "and lib64/libcudart.so under it; unset it or point it at the toolkit"
            )
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        root = _root_from_nvcc(nvcc)
        if root is not None:
            return root
    candidates = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), key=_version_key, reverse=True)
    for root in candidates:
        if _is_cuda_root(root):
            return os.path.realpath(root)
    return None


def configure_cuda_env(cuda_home: str, *, visible_gpu: bool) -> None:
    """Point torch.utils.cpp_extension at ``cuda_home`` before it is imported.

    torch reads CUDA_HOME once at import time; callers that import it earlier must also assign
    ``torch.utils.cpp_extension.CUDA_HOME``. Without a visible GPU torch cannot pick the target
    architectures itself (its list is empty and it fails), so a default list is set unless the user
    gave one.
    """
    os.environ["CUDA_HOME"] = cuda_home
    if not visible_gpu and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST

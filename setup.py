"""Build script: the pure-Python package is declared in pyproject.toml; this file adds the compiled
trajectory buffer (`otca_fast._C`, sources in csrc/) when torch is importable.

* CUDA variant (``CUDAExtension``) when torch is a CUDA build and a CUDA toolkit is found (its root is
  resolved even when ``CUDA_HOME`` is unset and the ``nvcc`` on PATH is a wrapper script), CPU variant
  (``CppExtension``) otherwise. ``OTCA_FAST_BUILD_CUDA=0`` forces the CPU variant, ``=1`` requires CUDA.
* No torch in the build environment (e.g. pip's build isolation without ``--no-build-isolation``), or
  ``OTCA_FAST_BUILD_EXT=0``: the pure-Python package is installed and ``otca_fast.buffer`` builds the
  extension just in time on first use, or falls back to its pure-torch implementation.
* The extension is optional: a failed compile prints the error and installs the rest, except with
  ``OTCA_FAST_REQUIRE_CPP=1`` (CI), where it fails the install.
* Wheels also carry the C++ sources as ``otca_fast/_csrc`` so that the just-in-time build works there.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    return value not in ("0", "false", "False", "no")


def _load_build_config():
    spec = importlib.util.spec_from_file_location("_otca_fast_build_config", CSRC / "build_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithSources(build_py):
    """Copies csrc/ into the built package as otca_fast/_csrc (for the just-in-time build)."""

    def run(self) -> None:
        super().run()
        if self.editable_mode or not (CSRC / "build_config.py").is_file():  # editable: csrc/ is beside it
            return
        target = Path(self.build_lib) / "otca_fast" / "_csrc"
        target.mkdir(parents=True, exist_ok=True)
        for name in _load_build_config().HASHED_FILES:  # everything the just-in-time build reads
            shutil.copy2(CSRC / name, target / name)


def _extension_kwargs() -> dict:
    if _env_flag("OTCA_FAST_BUILD_EXT") is False:
        print("otca_fast: OTCA_FAST_BUILD_EXT=0, not building otca_fast._C", file=sys.stderr)
        return {}
    try:
        import torch
    except ImportError:
        print("otca_fast: torch is not importable in the build environment; installing without otca_fast._C "
              "(it is built just in time on first use). Use pip install --no-build-isolation to build it now.",
              file=sys.stderr)
        return {}
    if not (CSRC / "build_config.py").is_file():  # e.g. an sdist made without csrc/
        print("otca_fast: csrc/ is missing; installing without otca_fast._C (pure-torch buffer)", file=sys.stderr)
        return {}
    config = _load_build_config()
    want_cuda = _env_flag("OTCA_FAST_BUILD_CUDA")
    cuda_home = config.find_cuda_home() if want_cuda is not False and torch.version.cuda else None
    with_cuda = cuda_home is not None
    if want_cuda and not with_cuda:
        raise RuntimeError("OTCA_FAST_BUILD_CUDA=1 but no CUDA build of torch or no CUDA toolkit was found "
                           f"(torch.version.cuda={torch.version.cuda!r}; set CUDA_HOME to the toolkit root)")
    if with_cuda:
        config.configure_cuda_env(cuda_home, visible_gpu=torch.cuda.is_available())
    from torch.utils import cpp_extension

    if with_cuda:
        cpp_extension.CUDA_HOME = cuda_home  # read at its import, maybe before CUDA_HOME was set
        ext_cls = cpp_extension.CUDAExtension
        extra = {"cxx": config.CXX_FLAGS, "nvcc": config.NVCC_FLAGS}
    else:
        ext_cls = cpp_extension.CppExtension
        extra = {"cxx": config.CXX_FLAGS}
    required = bool(_env_flag("OTCA_FAST_REQUIRE_CPP"))
    ext = ext_cls(
        name="otca_fast._C",
        sources=[os.path.relpath(p, ROOT) for p in config.sources(with_cuda)],
        depends=[os.path.relpath(CSRC / "trajectory_buffer.h", ROOT)],
        define_macros=config.define_macros(with_cuda),
        extra_compile_args=extra,
        optional=not required,
    )
    print(f"otca_fast: building otca_fast._C ({'CUDA, CUDA_HOME=' + cuda_home if with_cuda else 'CPU'} variant)",
          file=sys.stderr)

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's BuildExtension, honouring ``Extension.optional`` for ninja failures too (setuptools only
        catches distutils' own compile errors, torch raises RuntimeError)."""

        def build_extension(self, ext) -> None:
            try:
                super().build_extension(ext)
            except Exception as exc:
                if not ext.optional:
                    raise
                print(f"otca_fast: WARNING: building {ext.name} failed ({exc}); installing without it. "
                      "otca_fast.buffer will retry just in time and otherwise use its pure-torch backend.",
                      file=sys.stderr)

    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension, "build_py": BuildPyWithSources}}


kwargs = _extension_kwargs()
kwargs.setdefault("cmdclass", {"build_py": BuildPyWithSources})
setup(**kwargs)

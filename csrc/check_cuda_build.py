"""Compile and link the CUDA variant of the trajectory buffer, even on a machine without a GPU.

    python csrc/check_cuda_build.py                 # build from csrc/ into build/cuda_check, then load it
    python csrc/check_cuda_build.py --installed     # only check that otca_fast._C is the CUDA variant

CI runs this so that the .cu code cannot rot where it cannot run. After the build it imports the
module (which must work without a GPU: it then serves CPU buffers as the "cpp" backend) and runs a
bitwise put/gather round trip through it; on a machine with a GPU it also runs one on the device.
Exits non-zero, with the compiler output, on any failure.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path
from types import ModuleType

CSRC = Path(__file__).resolve().parent


def _build_config() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_otca_fast_build_config", CSRC / "build_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(build_dir: Path, verbose: bool) -> ModuleType:
    config = _build_config()
    import torch

    if torch.version.cuda is None:
        raise SystemExit(f"torch {torch.__version__} is not a CUDA build: the CUDA variant cannot be compiled")
    cuda_home = config.find_cuda_home()
    if cuda_home is None:
        raise SystemExit("no CUDA toolkit found (set CUDA_HOME to its root, the directory holding bin/nvcc)")
    config.configure_cuda_env(cuda_home, visible_gpu=torch.cuda.is_available())
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = cuda_home
    build_dir.mkdir(parents=True, exist_ok=True)
    macros = [f"-D{name}={value}" for name, value in config.define_macros(True)]
    print(f"compiling the CUDA variant: CUDA_HOME={cuda_home}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"arch list {os.environ.get('TORCH_CUDA_ARCH_LIST', '(visible GPUs)')}, into {build_dir}", flush=True)
    start = time.perf_counter()
    module = cpp_extension.load(
        name="otca_fast_buffer_cuda_check",
        sources=config.sources(True),
        extra_cflags=config.CXX_FLAGS + macros,
        extra_cuda_cflags=config.NVCC_FLAGS + macros,
        with_cuda=True,
        build_directory=str(build_dir),
        verbose=verbose,
    )
    print(f"compiled and linked in {time.perf_counter() - start:.1f} s: {module.__file__}")
    return module


def _smoke(module: ModuleType) -> None:
    """Bitwise round trip through the module's core, on the CPU and (if present) on the GPU."""
    import torch

    if not module.WITH_CUDA:
        raise SystemExit(f"{module.__name__} was built without CUDA (WITH_CUDA is False)")
    devices = [torch.device("cpu")] + ([torch.device("cuda", 0)] if torch.cuda.is_available() else [])
    for device in devices:
        pinned = device.type == "cuda"
        buf = module.TrajectoryBuffer(5, 3, [4, 6], torch.bfloat16, device, pinned)
        x = torch.randn(5, 4, 6).bfloat16()
        buf.put(2, 1, x[1:4].to(device))
        got = buf.gather(torch.tensor([3, 1, 2]), torch.tensor([2, 2, 2]))
        expected = x[[3, 1, 2]]
        if not torch.equal(got.cpu().view(torch.int16), expected.view(torch.int16)):
            raise SystemExit(f"round trip on {device} returned different bits")
        print(f"round trip on {device}: ok (backend {buf.backend!r}, pinned={buf.pinned})")
        buf.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build-dir", type=Path, default=CSRC.parent / "build" / "cuda_check",
                        help="where the objects and the .so go (reused: unchanged sources do not recompile)")
    parser.add_argument("--installed", action="store_true",
                        help="check the installed otca_fast._C instead of compiling from csrc/")
    parser.add_argument("--quiet", action="store_true", help="hide the compiler commands")
    args = parser.parse_args(argv)
    if args.installed:
        import torch  # noqa: F401  (loads libc10/libtorch, which the extension links against)

        try:
            from otca_fast import _C as module
        except ImportError as exc:
            raise SystemExit(f"otca_fast._C is not installed or does not load: {exc}") from exc
        print(f"installed module: {module.__file__}")
    else:
        module = _build(args.build_dir, verbose=not args.quiet)
    _smoke(module)
    print("CUDA build check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Test set-up: without a GPU, run the Triton kernels on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before any module that defines ``@triton.jit`` kernels is imported,
so it is set here, at collection time, before the tests import ``otca_fast``. On a machine with a
GPU the kernels compile for it instead (``tests/test_ops_gpu.py``), unless TRITON_INTERPRET=1 is
set explicitly; the CPU-kernel test modules then skip, saying so.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_report_header(config):
    cuda = torch.cuda.is_available()
    lines = [f"otca_fast tests: torch {torch.__version__}, CUDA device: "
             f"{torch.cuda.get_device_name(0) if cuda else 'none (GPU-only tests are skipped)'}",
             f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"]
    return lines


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(1234)
    yield


class _PoisonedTorch:
    """Stands in for ``torch`` inside a kernel module: fresh outputs come back full of garbage.

    ``torch.empty``/``empty_like`` are how kernel launchers allocate outputs; filling them with NaN
    (floats) or a sentinel (integers) means an element the kernel forgets to write shows up as a
    NaN or a wrong value in the comparison instead of passing silently on lucky memory.
    """

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    @staticmethod
    def _poison(t):
        if t.dtype.is_floating_point:
            return t.fill_(float("nan"))
        if t.dtype == torch.bool:
            return t.fill_(True)
        return t.fill_(-77)

    def empty(self, *args, **kwargs):
        return self._poison(self._real.empty(*args, **kwargs))

    def empty_like(self, *args, **kwargs):
        return self._poison(self._real.empty_like(*args, **kwargs))


@pytest.fixture
def poison_outputs(monkeypatch):
    """Poison every output allocated by the Triton launchers in ``otca_fast.kernels``."""
    import importlib
    import pkgutil

    import otca_fast.kernels as kernels_pkg

    for info in pkgutil.iter_modules(kernels_pkg.__path__):
        module = importlib.import_module(f"otca_fast.kernels.{info.name}")
        if getattr(module, "torch", None) is torch:
            monkeypatch.setattr(module, "torch", _PoisonedTorch(torch))
    yield

"""Triton kernels of otca_fast, installed as ``otca_fast.kernels``.

One file per op, each holding its ``@triton.jit`` kernels and the thin launch functions that size
their grids; the autograd Functions, validation and dispatch live in ``otca_fast/ops.py`` and the
math they must reproduce in ``otca_fast/reference.py``. On a machine without a GPU set
``TRITON_INTERPRET=1`` *before* importing these modules to run them in Triton's interpreter.
"""

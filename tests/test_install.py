"""The install a new user gets: nothing in the repository root shadows an installed package, and the
environment is exactly the tested lock.

`python -m`, `python -c`, `torchrun -m` and pytest put the repository root first on ``sys.path``, so a
regular package there (a folder with ``__init__.py``) wins over any installed package of the same
import name. ``kernels`` is such a name: Hugging Face's ``kernels`` package, which transformers imports
(``from kernels import CUDAProperties``). With ``kernels/__init__.py`` in the root, diffusers' Wan and
PEFT modules failed to import and the main job died before its first step. These tests run from the
repository root, in subprocesses of the installed environment, as a user's commands do.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements-lock.txt"
# the only import names the repository root may provide: the package itself and the build script
ROOT_IMPORTABLE = {"otca_fast", "setup"}
# installed distributions that are not part of the lock: the installer itself and this project
NOT_LOCKED = {"pip", "otca-fast"}
# fast-moving libraries whose next major release must be excluded until the project is tested with it
BOUNDED = ("transformers", "diffusers", "peft", "huggingface-hub")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _run_from_root(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _lock() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep, f"{LOCK.name}: expected 'name==version', got {line!r}"
        pins[_canonical(name)] = version.strip()
    return pins


def test_no_folder_in_the_repository_root_is_a_regular_package_but_otca_fast():
    importable = set()
    for entry in ROOT.iterdir():
        if entry.is_dir() and entry.name.isidentifier() and (entry / "__init__.py").exists():
            importable.add(entry.name)
        elif entry.is_file() and entry.suffix == ".py":
            importable.add(entry.stem)
    assert importable <= ROOT_IMPORTABLE, (
        f"{sorted(importable - ROOT_IMPORTABLE)} in the repository root would shadow installed packages of "
        f"that import name for every `python -m` and pytest run from a checkout; keep the folder free of "
        f"__init__.py (kernels/README.md says how kernels/ is packaged instead)")


def test_import_kernels_from_the_repository_root_is_hugging_faces_package():
    dist = metadata.distribution("kernels")  # transformers depends on it, so the lock installs it
    out = _run_from_root("-c", "import kernels; print(kernels.__file__); print(kernels.CUDAProperties.__name__)")
    assert out.returncode == 0, out.stderr[-2000:]
    path = Path(out.stdout.splitlines()[0]).resolve()
    assert ROOT / "kernels" not in path.parents, f"`import kernels` from the repository root resolved to {path}"
    assert Path(dist.locate_file("kernels")).resolve() in path.parents


def test_the_triton_kernels_import_only_as_otca_fast_kernels():
    code = ("import otca_fast.kernels.sde_step as m, sys; print(m.__file__); "
            "print('kernels.sde_step' in sys.modules)")
    out = _run_from_root("-c", code)
    assert out.returncode == 0, out.stderr[-2000:]
    file, shadow = out.stdout.split()
    assert Path(file).name == "sde_step.py" and shadow == "False"


def test_the_shapes_backbone_builds_from_the_repository_root():
    code = ("from otca_fast.models import build_backbone; b = build_backbone('shapes'); "
            "print(type(b.transformer).__name__)")
    out = _run_from_root("-c", code)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "WanTransformer3DModel"


@pytest.mark.slow
def test_one_step_of_the_main_job_from_the_repository_root(tmp_path):
    out = _run_from_root(
        "-m", "otca_fast.train", "configs/tiny_video.yaml", "--set", f"run.output_dir={tmp_path / 'run'}",
        "--set", "train.max_steps=1", "--set", "train.checkpoint_every=1", "--set", "eval.enabled=false",
        "--set", "run.progress=none", "--set", "run.tensorboard=false", "--set", "run.plot_every=0")
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 1


def test_the_environment_is_exactly_the_lock():
    """The README installs with ``-c requirements-lock.txt``; CI runs this suite in that environment."""
    pins = _lock()
    installed = {_canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    wrong = {name: (version, pins[name]) for name, version in installed.items()
             if name in pins and version != pins[name]}
    unlocked = sorted(set(installed) - set(pins) - NOT_LOCKED)
    assert not wrong and not unlocked, (
        f"this environment is not the tested lock: installed vs locked {wrong}, not in the lock {unlocked}. "
        f"Install with `pip install -c requirements-lock.txt ...` (README), or refresh the lock with "
        f".ci/refresh-lock (README, 'Dependencies')")


def test_pyproject_ranges_admit_the_lock_and_bound_the_fast_moving_libraries():
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    # the lock is the `dev` install: dev's own requirements and the extras it names (otca_fast[train,ocr])
    dev = [Requirement(r) for r in extras["dev"]]
    included = {"dev"} | {e for r in dev if _canonical(r.name) == "otca-fast" for e in r.extras}
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for name in sorted(included) for r in extras[name]
                     if _canonical(Requirement(r).name) != "otca-fast"]
    pins = _lock()
    for req in requirements:
        name = _canonical(req.name)
        if req.marker is not None and not req.marker.evaluate():
            continue
        assert name in pins, f"pyproject.toml asks for {req}, which the lock does not pin"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"pyproject.toml's range {req} excludes the locked, tested {name}=={pins[name]}")
    by_name = {_canonical(r.name): r for r in requirements}
    for name in BOUNDED:
        assert name in by_name, f"pyproject.toml does not declare {name}"
        uppers = [s for s in by_name[name].specifier if s.operator in ("<", "<=")]
        assert uppers, f"{by_name[name]}: expected an upper bound below the next, untested major release"
        untested_major = f"{int(pins[name].split('.')[0]) + 1}.0"
        assert not by_name[name].specifier.contains(untested_major), (
            f"{by_name[name]} admits {name} {untested_major}, a major release the project has not been tested with")

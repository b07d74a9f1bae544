"""The trainer as a recipe: its shape, and the small pieces the phases hand to each other.

The behaviour of the whole loop is checked in test_trainer.py, test_faults.py and test_distributed.py; here
the parts that moved out of the trainer are checked on their own, and the recipe's shape is kept (a file a
new colleague reads top to bottom: no method over 60 lines, nothing nested more than 3 deep).
"""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from otca_fast import checkpoint as ckpt
from otca_fast.timesteps import choose_timesteps, sde_steps, trainable_steps

TRAINER = Path(__file__).resolve().parents[1] / "otca_fast" / "trainer.py"
_BLOCKS = (ast.For, ast.While, ast.If, ast.With, ast.Try)


def _depth(node: ast.AST, level: int = 0) -> int:
    deepest = level
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue  # a nested function is measured on its own
        deepest = max(deepest, _depth(child, level + isinstance(child, _BLOCKS)))
    return deepest


def _functions(tree: ast.AST):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_the_depth_measure_counts_nested_blocks():
    tree = ast.parse("def f():\n for a in b:\n  if c:\n   with d:\n    while e:\n     pass\n")
    assert _depth(_functions(tree)[0]) == 4


def test_the_trainer_reads_as_a_recipe():
    source = TRAINER.read_text()
    lines = source.count("\n")
    assert lines < 750, f"otca_fast/trainer.py has {lines} lines; move what is not the GRPO loop beside it"
    tree = ast.parse(source)
    long = {f.name: f.end_lineno - f.lineno + 1 for f in _functions(tree) if f.end_lineno - f.lineno + 1 > 60}
    assert not long, f"methods over 60 lines: {long}"
    deep = {f.name: _depth(f) for f in _functions(tree) if _depth(f) > 3}
    assert not deep, f"methods nested more than 3 deep: {deep}"
    train_step = next(f for f in _functions(tree) if f.name == "train_step")
    calls = sorted((n.lineno, n.col_offset, n.func.attr) for n in ast.walk(train_step) if isinstance(n, ast.Call)
                   and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name)
                   and n.func.value.id == "self")
    called = [name for _, _, name in calls]
    phases = ["rollout", "compute_credit", "choose_timesteps", "update"]
    assert [c for c in called if c in phases] == phases, called  # in this order, each once


# --- timesteps --------------------------------------------------------------------------------------------

def _timesteps(mode: str, **kw) -> SimpleNamespace:
    return SimpleNamespace(mode=mode, fraction=kw.get("fraction", 0.5), window_start=kw.get("window_start", 0),
                           window_size=kw.get("window_size", 1))


def test_trainable_steps_drop_the_last_step_only_when_asked():
    mask = torch.tensor([True, False, True, True])
    assert trainable_steps(mask, skip_last=True).tolist() == [0, 2]
    assert trainable_steps(mask, skip_last=False).tolist() == [0, 2, 3]


def test_mode_all_trains_the_steps_the_scheme_keeps_in_step_order():
    steps = torch.tensor([0, 1, 2, 3])
    train_mask = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 0, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    out = choose_timesteps(_timesteps("all"), steps, {"train_mask": train_mask}, num_samples=3,
                           generator=torch.Generator())
    assert out.index.shape == (3, 4)
    assert out.index[0].tolist() == [0, 1, 2, 3] and out.valid[0].all()
    assert out.index[1, :2].tolist() == [1, 3] and out.valid[1].tolist() == [True, True, False, False]
    assert not out.valid[2].any()
    assert bool((out.weight == 1).all())


def test_mode_fraction_draws_int_fraction_steps_per_sample_from_the_generator():
    steps = torch.tensor([1, 3, 4, 6, 7])
    a = choose_timesteps(_timesteps("fraction", fraction=0.6), steps, {}, num_samples=4,
                         generator=torch.Generator().manual_seed(0))
    b = choose_timesteps(_timesteps("fraction", fraction=0.6), steps, {}, num_samples=4,
                         generator=torch.Generator().manual_seed(0))
    assert a.index.shape == (4, 3) and torch.equal(a.index, b.index)  # int(0.6·5) = 3, reproducible
    assert bool(torch.isin(a.index, steps).all())
    assert bool((a.index[:, 1:] > a.index[:, :-1]).all())  # in step order, no repeats


def test_mode_window_and_mode_credit():
    steps = torch.tensor([0, 1, 2, 3, 4])
    window = choose_timesteps(_timesteps("window", window_start=1, window_size=2), steps, {}, num_samples=2,
                              generator=torch.Generator())
    assert window.index.tolist() == [[1, 2], [1, 2]]
    chosen = torch.tensor([[4, 0], [2, 3]])
    credit = choose_timesteps(_timesteps("credit"), steps, {"index": chosen}, num_samples=2,
                              generator=torch.Generator())
    # the steps build_advantages chose, once: their weights are already folded into A
    assert torch.equal(credit.index, chosen) and bool(credit.valid.all()) and bool((credit.weight == 1).all())


def test_the_window_scheme_makes_its_credit_window_the_sde_steps():
    sde = SimpleNamespace(mode="all", fraction=1.0, window_size=1, window_range=None)
    mask, window = sde_steps(6, sde, "uniform", None, generator=torch.Generator(), progress=0.0)
    assert mask.all() and window is None
    from otca_fast.credit import CreditConfig

    cfg = CreditConfig(window_size=2, window_range=(0, 4), window_schedule="fixed")
    mask, window = sde_steps(6, sde, "window", cfg, generator=torch.Generator(), progress=0.0)
    assert window is not None and mask.nonzero().flatten().tolist() == list(range(*window))


# --- checkpoints --------------------------------------------------------------------------------------------

def test_config_changes_name_what_can_change_the_numbers_only():
    saved = "train:\n  lr: 1.0\n  max_steps: 10\nrun:\n  seed: 0\neval:\n  every: 5\n"
    now = "train:\n  lr: 2.0\n  max_steps: 20\nrun:\n  seed: 1\neval:\n  every: 1\nsample:\n  steps: 3\n"
    assert ckpt.config_changes(saved, now) == ["sample.steps", "train.lr"]
    assert ckpt.config_changes(None, now) == []


def test_a_checkpoint_without_the_training_state_is_refused(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match=r"not a training state \(no \['rng', 'sampler'"):
        ckpt.check_training_state(tmp_path, {"optimizer_steps": 1})

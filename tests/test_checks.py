"""The shared argument checks (otca_fast.checks) and dtype / device names (otca_fast.devices): each error names
the argument, what was expected and what was given, whichever module raises it."""

from __future__ import annotations

import pytest
import torch

from otca_fast import checks, devices


@pytest.mark.parametrize("check, args, error, message", [
    (checks.choice, ("mode", "x", ("a", "b")), ValueError, "mode: expected one of ('a', 'b'), got 'x'"),
    (checks.choice, ("mode", "x", ["a", "b"]), ValueError, "mode: expected one of ['a', 'b'], got 'x'"),
    (checks.finite_number, ("lr", float("nan")), TypeError, "lr: expected a finite number, got nan"),
    (checks.finite_number, ("lr", True), TypeError, "lr: expected a finite number, got True"),
    (checks.positive, ("eps", 0.0), ValueError, "eps: expected a value > 0, got 0.0"),
    (checks.unit_interval, ("p", 1.5), ValueError, "p: expected a value in [0, 1], got 1.5"),
    (checks.fraction, ("f", 0), ValueError, "f: expected a value in (0, 1], got 0"),
    (checks.integer, ("n", 2.0), TypeError, "n: expected an int, got 2.0"),
    (checks.integer, ("n", 0), ValueError, "n: expected an int >= 1, got 0"),
    (checks.int_at_least, ("n", "3", 1), ValueError, "n: expected an int >= 1, got '3'"),
    (checks.int_at_least, ("n", True, 0), ValueError, "n: expected an int >= 0, got True"),
    (checks.positive_int, ("height", 0), ValueError, "height: expected a positive int, got 0"),
    (checks.positive_int, ("height", False), ValueError, "height: expected a positive int, got False"),
    (checks.boolean, ("cheap", 1), TypeError, "cheap: expected a bool, got 1"),
])
def test_checks_name_the_argument(check, args, error, message):
    with pytest.raises(error) as info:
        if check is checks.integer:
            check(*args, minimum=1)
        else:
            check(*args)
    assert str(info.value) == message


def test_checks_return_the_value():
    assert checks.positive("eps", 2) == 2.0 and isinstance(checks.positive("eps", 2), float)
    assert checks.unit_interval("p", 1) == 1.0 and checks.fraction("f", 0.5) == 0.5
    assert checks.integer("n", 3, minimum=0) == 3 and checks.int_at_least("n", 1, 1) == 1
    assert checks.positive_int("n", 4) == 4 and checks.boolean("b", False) is False
    assert checks.compute_dtype(torch.bfloat16) == torch.float32
    assert checks.compute_dtype(torch.float64) == torch.float64


def test_dtype_names_and_aliases():
    assert devices.DTYPES == {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    for name, dtype in [("float32", torch.float32), ("fp32", torch.float32), ("BF16", torch.bfloat16),
                        (" bfloat16 ", torch.bfloat16), ("fp16", torch.float16), (torch.float64, torch.float64)]:
        assert devices.as_dtype("dtype", name) == dtype
    with pytest.raises(TypeError, match=r"vae_dtype: expected a floating torch.dtype or one of \['bf16', 'bfloat16', "
                                        r"'float16', 'float32', 'fp16', 'fp32'\], got 'int8'"):
        devices.as_dtype("vae_dtype", "int8")
    with pytest.raises(TypeError, match="dtype: expected a floating torch.dtype"):
        devices.as_dtype("dtype", torch.int64)


def test_resolve_device_names_the_argument(monkeypatch):
    assert devices.resolve_device("cpu") == torch.device("cpu")
    assert devices.resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"--device: expected auto, cpu, cuda or cuda:N, got 'gpu0'"):
        devices.resolve_device("gpu0", what="--device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve_device("auto") == torch.device("cpu")
    for what in ("run.device", "--device", "device"):
        with pytest.raises(ValueError, match=rf"^{what}: 'cuda:1' but no CUDA device is available \(use 'auto' or "
                                             rf"'cpu'\)$"):
            devices.resolve_device("cuda:1", what=what)


def test_distributed_setup_keeps_its_config_error(monkeypatch):
    from otca_fast import distributed
    from otca_fast.config import ConfigError

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.setup("auto").device == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"run.device: 'cuda' but no CUDA device is available"):
        distributed.setup("cuda")


def test_build_backbone_device_check(monkeypatch):
    from otca_fast.models import build_backbone

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^device: 'cuda' but no CUDA device is available"):
        build_backbone("sd3", tiny=True, device="cuda")


def test_non_empty_list_of_names_the_argument_and_the_offending_item():
    from otca_fast import checks

    assert checks.non_empty_list_of("specs", (1, 2), int) == [1, 2]
    with pytest.raises(ValueError, match=r"specs: expected at least one int, got an empty sequence"):
        checks.non_empty_list_of("specs", [], int)
    with pytest.raises(TypeError, match=r"specs\[1\]: expected a int, got str"):
        checks.non_empty_list_of("specs", [1, "x"], int)

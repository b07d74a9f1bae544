"""The README's promises: its Python example runs, and .ci/run runs exactly its quick-start commands."""

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_readme_python_examples_run():
    blocks = _blocks("python")
    assert blocks, "the README has no python example"
    for code in blocks:
        namespace: dict = {"__name__": "__readme__"}
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    assert torch.is_tensor(namespace.get("loss"))


def test_ci_runs_the_quick_start_commands_verbatim():
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = [block.strip() for block in re.findall(r"```bash\n(.*?)```", quick, flags=re.S)]
    assert len(commands) == 2, "the quick start is exactly two commands: install + main job, and the tests"
    ci = (ROOT / ".ci" / "run").read_text()
    for command in commands:
        assert command in ci, f".ci/run does not run the README command: {command}"


def test_the_quick_start_installs_the_tested_lock():
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    install = re.findall(r"```bash\n(.*?)```", quick, flags=re.S)[0]
    pip_installs = [part.strip() for part in install.split("&&") if part.strip().startswith("pip install")]
    assert pip_installs, "the first quick-start command installs nothing"
    for command in pip_installs:
        assert "-c requirements-lock.txt" in command, f"not constrained by the lock: {command}"
    assert (ROOT / "requirements-lock.txt").is_file()

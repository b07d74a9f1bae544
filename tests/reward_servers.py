"""Test helpers: a reward server in a subprocess (``python -m otca_fast.rewards.serve``) on a localhost port,
always killed on exit, and small user-defined rewards the servers load by dotted path."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
# the subprocess's first log line names the bound address (a port 0 request gets a free port, race-free)
_SERVING = re.compile(r"serving .* on (http://[\d.]+:\d+)")


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str
    log: Path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def requests_logged(self, path: str = "POST /score") -> int:
        """How many requests for ``path`` the server has logged so far."""
        return self.log.read_text().count(f'"{path}')

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


@contextlib.contextmanager
def reward_server(log: Path, *args: str, port: int = 0, token: str | None = None, startup_s: float = 180.0):
    """Start a reward server serving ``args`` (``--reward NAME ...``); yield it once it listens; kill it after."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]), "HF_HUB_OFFLINE": "1"}
    env.pop("OTCA_REWARD_TOKEN", None)
    if token is not None:
        env["OTCA_REWARD_TOKEN"] = token
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "otca_fast.rewards.serve", "--port", str(port), *args],
                                cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
    server = None
    try:
        deadline = time.monotonic() + startup_s
        while server is None:
            match = _SERVING.search(log.read_text())
            if match:
                server = ServerProcess(proc, match.group(1), log)
            elif proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the reward server did not start (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
            else:
                time.sleep(0.1)
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


# ------------------------------------------------------------------------------------------------
# user-defined rewards served by dotted path ("reward_servers:...")
# ------------------------------------------------------------------------------------------------

def nan_for_red(frames: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Mean brightness, but NaN for every prompt that mentions red."""
    scores = frames.float().mean(dim=(1, 2, 3, 4))
    bad = torch.tensor(["red" in p for p in prompts])
    return scores.masked_fill(bad, float("nan"))

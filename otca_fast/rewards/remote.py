"""``remote``: a reward scored by a reward server (``python -m otca_fast.rewards.serve``).

In a config::

    rewards:
      - name: remote
        weight: 1.0
        options: {url: "http://127.0.0.1:8000", reward: clip_score, timeout_s: 300, retries: 3}

The reward is built by asking the server's ``GET /health``: a server that does not answer fails the
run before its first step with a message naming the URL, and the reward takes the served reward's
name (its metrics read ``reward/clip_score`` as in process), role, cost flag, ``eval_only`` flag and
headline part — ``role`` and ``cheap`` may be overridden. During the run each call posts the frames
(``uint8`` by default) and gets the scores back; a server that stops answering gets ``retries`` more
attempts with exponential backoff, then the usual :class:`~otca_fast.rewards.RewardError` naming the
reward and the URL (the trainer checkpoints the last good state). Several remote rewards of one server
scored together send the frames once, in one request. The bearer token, if the server wants one, is
read from the environment (``OTCA_REWARD_TOKEN`` by default), never from the config.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch

from otca_fast import checks
from otca_fast.rewards._http import HttpClient, ServerUnavailable, bearer_token, describe
from otca_fast.rewards.protocol import (
    CONTENT_TYPE,
    FRAME_DTYPES,
    PROTOCOL,
    ProtocolError,
    decode_result,
    encode_request,
)
from otca_fast.rewards.registry import ROLES, Reward, RewardCallError, register_reward

__all__ = ["remote", "RemoteRewardFn", "RewardServerClient"]


class RewardServerClient:
    """One reward server as seen from here: its URL, the HTTP sessions, its health answer."""

    def __init__(self, url: str, *, token: str | None, timeout_s: float, retries: int, retry_backoff_s: float):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"remote: url: expected 'http://host:port' of a reward server, got {url!r}")
        self.url = url.rstrip("/")
        self.http = HttpClient(timeout_s=timeout_s, retries=retries, retry_backoff_s=retry_backoff_s, token=token,
                               what="remote")

    def health(self) -> dict[str, Any]:
        """``GET /health``; raises ``ConnectionError`` (down) or ``ValueError`` (a wrong token, not a reward
        server, another protocol version), each naming the URL."""
        try:
            response = self.http.request("GET", f"{self.url}/health", timeout_s=min(self.http.timeout_s, 30.0))
        except ServerUnavailable as e:
            raise ServerUnavailable(f"remote: the reward server {e}; start it with `python -m otca_fast.rewards.serve "
                                    f"--reward NAME --port PORT` (or fix options.url)") from None
        if response.status_code == 401:
            raise ValueError(f"remote: the reward server at {self.url} refused the bearer token (HTTP 401): "
                             f"{describe(response)}")
        try:
            info = response.json()
        except ValueError:
            info = None
        if response.status_code != 200 or not isinstance(info, dict) or not isinstance(info.get("rewards"), dict):
            raise ValueError(f"remote: {self.url}/health answered HTTP {response.status_code} "
                             f"{describe(response)!r}: not an otca_fast reward server")
        if info.get("protocol") != PROTOCOL:
            raise ValueError(f"remote: the reward server at {self.url} speaks protocol {info.get('protocol')!r}, this "
                             f"client {PROTOCOL}: run the same otca_fast version on both sides")
        return info

    def score(self, names: Sequence[str], frames: torch.Tensor, prompts: Sequence[str],
              frames_dtype: str) -> list[torch.Tensor | dict[str, torch.Tensor] | RewardCallError]:
        """One ``POST /score`` for the rewards ``names``; per reward its raw output or the server's error.
        Transport failures and refused requests raise :class:`RewardCallError` naming the URL."""
        body = encode_request(frames, prompts, names, frames_dtype=frames_dtype)
        try:
            response = self.http.request("POST", f"{self.url}/score", data=body,
                                         headers={"Content-Type": CONTENT_TYPE})
        except ServerUnavailable as e:
            raise RewardCallError(f"the reward server {e}") from None
        if response.status_code != 200:
            raise RewardCallError(f"the reward server at {self.url} refused the request (HTTP "
                                  f"{response.status_code}): {describe(response)}")
        try:
            results = response.json()["results"]
            outputs = [decode_result(results[name], len(prompts)) for name in names]
        except (ValueError, KeyError, TypeError, ProtocolError) as e:
            raise RewardCallError(f"the reward server at {self.url} sent a malformed answer ({type(e).__name__}: "
                                  f"{e})") from None
        return [RewardCallError(f"on the reward server at {self.url}: {out}", out.index)
                if isinstance(out, RewardCallError) else out for out in outputs]


_clients: dict[tuple, RewardServerClient] = {}
_clients_lock = threading.Lock()


def _client(url: str, token: str | None, timeout_s: float, retries: int, retry_backoff_s: float) -> RewardServerClient:
    """One client per server and settings, shared by the rewards built on it (their calls can then be joint)."""
    key = (str(url).rstrip("/"), token, timeout_s, retries, retry_backoff_s)
    with _clients_lock:
        if key not in _clients:
            _clients[key] = RewardServerClient(url, token=token, timeout_s=timeout_s, retries=retries,
                                               retry_backoff_s=retry_backoff_s)
        return _clients[key]


class RemoteRewardFn:
    """``(frames, prompts) -> scores`` of one served reward. Rewards of one server (same settings) share a
    ``joint_key``, so :func:`~otca_fast.rewards.score_rewards` scores them in one request."""

    def __init__(self, client: RewardServerClient, reward: str, frames_dtype: str) -> None:
        self.client, self.reward, self.frames_dtype = client, reward, frames_dtype
        self.joint_key = (id(client), frames_dtype)

    def __call__(self, frames: torch.Tensor, prompts: list[str]):
        out = self.client.score([self.reward], frames, prompts, self.frames_dtype)[0]
        if isinstance(out, RewardCallError):
            raise out
        return out

    def score_jointly(self, fns: Sequence[RemoteRewardFn], frames: torch.Tensor, prompts: list[str]) -> list:
        return self.client.score([fn.reward for fn in fns], frames, prompts, self.frames_dtype)

    def __repr__(self) -> str:
        return f"RemoteRewardFn({self.reward!r} at {self.client.url})"


@register_reward("remote", role="custom", cheap=False)
def remote(*, url: str, reward: str, timeout_s: float = 300.0, retries: int = 3, retry_backoff_s: float = 1.0,
           frames_dtype: str = "uint8", token_env: str | None = "OTCA_REWARD_TOKEN", role: str | None = None,
           cheap: bool | None = None) -> Reward:
    """A reward served by ``python -m otca_fast.rewards.serve`` at ``url``; see the module docstring.

    ``reward``: the served name; ``timeout_s`` per attempt; ``retries`` more attempts after a failed one
    (connection refused, timeout, 502/503/504), ``retry_backoff_s`` the backoff factor; ``frames_dtype``:
    ``uint8`` (8-bit frames, 4x less traffic), ``float16`` or ``float32`` (scores exactly as in process);
    ``token_env``: the environment variable holding the bearer token; ``role`` / ``cheap``: override the
    server's.
    """
    if not isinstance(reward, str) or not reward:
        raise TypeError(f"remote: reward: expected the name of a reward the server serves, got {reward!r}")
    checks.choice("remote: frames_dtype", frames_dtype, list(FRAME_DTYPES))
    if role is not None and role not in ROLES:
        raise ValueError(f"remote: role: expected one of {list(ROLES)} or None (the server's), got {role!r}")
    if cheap is not None and not isinstance(cheap, bool):
        raise TypeError(f"remote: cheap: expected a bool or None (the server's), got {cheap!r}")
    client = _client(url, bearer_token(token_env, "remote: token_env"), timeout_s, retries, retry_backoff_s)
    served = client.health()["rewards"]
    if reward not in served:
        raise ValueError(f"remote: the reward server at {client.url} does not serve {reward!r}; it serves "
                         f"{sorted(served)}")
    info = served[reward]
    return Reward(name=reward, role=role or info["role"], cheap=info["cheap"] if cheap is None else cheap,
                  fn=RemoteRewardFn(client, reward, frames_dtype), eval_only=bool(info.get("eval_only", False)),
                  headline=info.get("headline"))

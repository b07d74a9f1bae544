"""HTTP for the rewards that score out of process (``remote``, ``vlm_judge``): sessions with bounded retries.

A request that cannot connect, times out, or gets a 502/503/504 (a proxy in front of a restarting
server, a busy reward server) is retried ``retries`` times with exponential backoff (urllib3's
``Retry``: 0, 2·b, 4·b, ... seconds for a backoff b), then fails with a :class:`ServerUnavailable` that
names the URL and how long it tried. Other statuses are answers, returned to the caller as they are.
Scoring is a pure function of its input, so retrying a POST is safe.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from otca_fast import checks

__all__ = ["HttpClient", "ServerUnavailable", "bearer_token"]


class ServerUnavailable(ConnectionError):
    """A server did not answer within the retries; the message names the URL, the attempts and the cause."""


def bearer_token(env: str | None, what: str) -> str | None:
    """The token in the environment variable ``env`` (``None`` when unset or empty). Tokens never go into
    configs: those are saved with every run and checkpoint."""
    if env is None:
        return None
    if not isinstance(env, str) or not env:
        raise TypeError(f"{what}: expected the name of an environment variable or None, got {env!r}")
    return os.environ.get(env) or None


class HttpClient:
    """``requests`` sessions (one per thread: a ``Session`` is not meant to be shared) with retries."""

    def __init__(self, *, timeout_s: float, retries: int, retry_backoff_s: float, token: str | None = None,
                 what: str) -> None:
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise ValueError(f"{what}: timeout_s: expected a number of seconds > 0, got {timeout_s!r}")
        checks.int_at_least(f"{what}: retries", retries, 0)
        if isinstance(retry_backoff_s, bool) or not isinstance(retry_backoff_s, (int, float)) or retry_backoff_s < 0:
            raise ValueError(f"{what}: retry_backoff_s: expected a number of seconds >= 0, got {retry_backoff_s!r}")
        self.timeout_s, self.retries, self.retry_backoff_s = float(timeout_s), retries, float(retry_backoff_s)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._local = threading.local()

    def _session(self):
        session = getattr(self._local, "session", None)
        if session is None:
            import requests
            from requests.adapters import HTTPAdapter
            from urllib3.util.retry import Retry

            retry = Retry(total=self.retries, connect=self.retries, read=self.retries, status=self.retries,
                          other=0, backoff_factor=self.retry_backoff_s, status_forcelist=(502, 503, 504),
                          allowed_methods=None, raise_on_status=False, respect_retry_after_header=True)
            session = requests.Session()
            session.headers.update(self._headers)
            for prefix in ("http://", "https://"):
                session.mount(prefix, HTTPAdapter(max_retries=retry))
            self._local.session = session
        return session

    def request(self, method: str, url: str, *, timeout_s: float | None = None, **kwargs: Any):
        """The response (any status but exhausted 502/503/504 retries), or :class:`ServerUnavailable`."""
        import requests

        timeout_s = timeout_s or self.timeout_s
        start = time.monotonic()
        try:
            response = self._session().request(method, url, timeout=timeout_s, **kwargs)
        except requests.RequestException as e:
            raise ServerUnavailable(self._gave_up(url, start, timeout_s, _root_cause(e))) from None
        if response.status_code in (502, 503, 504):
            raise ServerUnavailable(self._gave_up(url, start, timeout_s,
                                                  f"HTTP {response.status_code}: {describe(response)}"))
        return response

    def _gave_up(self, url: str, start: float, timeout_s: float, cause: str) -> str:
        return (f"{url} did not answer after {self.retries + 1} attempt(s) over {time.monotonic() - start:.1f} s "
                f"(timeout {timeout_s:g} s each): {cause}")


def describe(response) -> str:
    """The error message of a JSON ``{"error": ...}`` answer, else the start of the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict) and "error" in body:
        error = body["error"]
        return error if isinstance(error, str) else str(error)[:300]
    return str(body)[:300]


def _root_cause(exc: BaseException) -> str:
    # requests wraps urllib3's MaxRetryError, which wraps the socket error: the innermost is the informative one
    inner = exc
    for _ in range(4):
        reason = getattr(inner, "reason", None) or (inner.args[0] if inner.args and isinstance(inner.args[0],
                                                                                               BaseException) else None)
        if not isinstance(reason, BaseException):
            break
        inner = reason
    return f"{type(inner).__name__}: {inner}"

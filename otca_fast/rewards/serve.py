"""A reward server: any registered reward (or ``package.module:callable``) in its own process, environment
and device, scored over HTTP by the trainer's ``remote`` reward.

    python -m otca_fast.rewards.serve --reward NAME [--reward NAME ...] [--options JSON] [--device DEV]
                                      [--host 127.0.0.1] [--port 8000] [--threads N]

Heavy rewards — multi-GB vision-language judges, learned video rewards, models whose dependencies
clash with training — then run beside the trainer (another GPU, another machine, another virtualenv),
as Flow-GRPO, MixGRPO and Flow-Factory run theirs.

* ``--options``: a JSON object. With several ``--reward``, keyed by reward name
  (``{"clip_score": {"path": "ckpt/clip"}, "motion_quality": {"fps": 16}}``); with one, either that form
  or the reward's options themselves (``{"path": "ckpt/clip"}``).
* ``OTCA_REWARD_TOKEN`` (environment): when set, every request must carry ``Authorization: Bearer <token>``.
* Binds 127.0.0.1 unless ``--host`` says otherwise (a warning when it listens beyond this machine without a
  token). Request bodies over ``--max-request-mb`` are refused (413) before they are read.
* Concurrent requests for the same rewards and frame size are merged into one reward call (up to
  ``--max-batch`` clips; ``--batch-window-ms`` waits that long for company). One worker thread scores, in
  arrival order: reward models are rarely thread-safe, and one device gains nothing from two at once.
* ``GET /health``: the served rewards with their role, cost flag (``cheap``), ``eval_only`` and headline
  part; ``POST /score``: see :mod:`otca_fast.rewards.protocol` (safetensors frames in, JSON scores out;
  nothing is unpickled). A malformed request gets a 4xx and a message, never a crash.
"""

from __future__ import annotations

import argparse
import dataclasses
import hmac
import ipaddress
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from otca_fast import checks
from otca_fast.devices import resolve_device
from otca_fast.rewards.protocol import (
    CONTENT_TYPE,
    PROTOCOL,
    ProtocolError,
    ScoreRequest,
    decode_request,
    encode_failure,
    encode_result,
    slice_result,
)
from otca_fast.rewards.registry import Reward, RewardCallError, RewardError, build_reward, score_metrics

__all__ = ["RewardServer", "ServerBusy", "build_served_rewards", "parse_options", "main", "TOKEN_ENV"]

TOKEN_ENV = "OTCA_REWARD_TOKEN"
logger = logging.getLogger("otca_fast.rewards.serve")


class ServerBusy(RuntimeError):
    """More requests are waiting than ``max_pending``: answered 503 (the client retries with backoff)."""


# ------------------------------------------------------------------------------------------------
# building the served rewards
# ------------------------------------------------------------------------------------------------

def parse_options(names: Sequence[str], text: str | None) -> dict[str, dict[str, Any]]:
    """``--options`` as ``{name: options}`` for every served name (see the module docstring)."""
    out: dict[str, dict[str, Any]] = {name: {} for name in names}
    if text is None:
        return out
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--options: expected a JSON object, got invalid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"--options: expected a JSON object, got {type(value).__name__}: {text!r}")
    if value and set(value) <= set(names) and all(isinstance(v, dict) for v in value.values()):
        out.update(value)   # keyed by reward name
    elif len(names) == 1:
        out[names[0]] = value   # the options of the one served reward
    else:
        unknown = sorted(set(value) - set(names))
        what = (f"keys {unknown} that are not served" if unknown
                else f"keys {sorted(value)} whose values are not objects")
        raise ValueError(f"--options: with several --reward, expected an object keyed by reward name, "
                         f"{{name: {{option: value}}}} for names among {list(names)}; got {what}")
    return out


def build_served_rewards(names: Sequence[str], options: Mapping[str, Mapping[str, Any]] | None = None,
                         imports: Sequence[str] = ()) -> dict[str, Reward]:
    """Build each served reward once (models load here, before the server answers ``/health``)."""
    import importlib

    import otca_fast.rewards  # noqa: F401  (registers the library's rewards)

    if not names:
        raise ValueError("--reward: expected at least one reward to serve")
    dup = sorted({n for n in names if list(names).count(n) > 1})
    if dup:
        raise ValueError(f"--reward: each reward is served once, got duplicates {dup}")
    for module in imports:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ValueError(f"--import {module}: {e}") from None
    if any(name.startswith("shapes_") for name in names):
        from otca_fast.toy import register_toy_rewards

        register_toy_rewards()
    options = options or {}
    served = {}
    for name in names:
        try:
            served[name] = build_reward(name, **dict(options.get(name, {})))
        except (TypeError, ValueError, ImportError) as e:
            raise ValueError(f"--reward {name}: {e}") from None
    return served


# ------------------------------------------------------------------------------------------------
# the server
# ------------------------------------------------------------------------------------------------

@dataclass(eq=False)   # jobs are compared by identity
class _Job:
    request: ScoreRequest
    future: Future = field(default_factory=Future)

    @property
    def key(self) -> tuple:
        # requests merge when they ask for the same rewards on frames of one size
        return (tuple(self.request.rewards), tuple(self.request.frames.shape[1:]))

    @property
    def batch(self) -> int:
        return self.request.frames.shape[0]


class RewardServer:
    """Serves ``rewards`` over HTTP (binds at construction; :meth:`serve_forever` or :meth:`start`)."""

    def __init__(self, rewards: Mapping[str, Reward], *, device: str | torch.device = "cpu",
                 host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
                 max_request_bytes: int = 512 * 2**20, max_batch: int = 64, max_pending: int = 32,
                 batch_window_s: float = 0.0) -> None:
        if not rewards:
            raise ValueError("rewards: expected at least one reward to serve")
        for name, value in (("max_request_bytes", max_request_bytes), ("max_batch", max_batch),
                            ("max_pending", max_pending)):
            checks.int_at_least(name, value, 1)
        if not batch_window_s >= 0:
            raise ValueError(f"batch_window_s: expected seconds >= 0, got {batch_window_s!r}")
        self.rewards = dict(rewards)
        # for merged batches: a failure is not located sample by sample there (each request is re-scored
        # alone, and locates its own failure), so a raising reward is not re-run B times for nothing
        self._unlocated = {name: dataclasses.replace(r, fn=_unlocated(r.fn)) for name, r in self.rewards.items()}
        self.device = torch.device(device)
        self.token = token or None
        self.max_request_bytes, self.max_batch, self.max_pending = max_request_bytes, max_batch, max_pending
        self.batch_window_s = float(batch_window_s)
        self._jobs: list[_Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._httpd = _HTTPServer((host, port), _Handler, self)
        self._worker = threading.Thread(target=self._work, name="otca-reward-worker", daemon=True)
        self._worker.start()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def health(self) -> dict[str, Any]:
        from otca_fast import __version__

        return {"status": "ok", "protocol": PROTOCOL, "otca_fast": __version__, "device": str(self.device),
                "max_request_bytes": self.max_request_bytes, "max_batch": self.max_batch,
                "auth": self.token is not None,
                "rewards": {name: {"role": r.role, "cheap": r.cheap, "eval_only": r.eval_only, "headline": r.headline}
                            for name, r in self.rewards.items()}}

    def pending(self) -> int:
        """Requests waiting for the worker (not counting the one it is scoring)."""
        with self._cond:
            return len(self._jobs)

    def submit(self, request: ScoreRequest) -> dict[str, dict[str, Any]]:
        """Queue a request and wait for its results (``{name: result}``); :class:`ServerBusy` when full."""
        job = _Job(request)
        with self._cond:
            if self._stopping:
                raise ServerBusy("the server is shutting down")
            if len(self._jobs) >= self.max_pending:
                raise ServerBusy(f"{len(self._jobs)} requests are already waiting (--max-pending {self.max_pending})")
            self._jobs.append(job)
            self._cond.notify_all()
        return job.future.result()

    # --- the worker: merge waiting requests, score, split -------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    for job in self._jobs:
                        job.future.set_exception(ServerBusy("the server is shutting down"))
                    self._jobs.clear()
                    return
                if self.batch_window_s:
                    deadline = time.monotonic() + self.batch_window_s
                    while (left := deadline - time.monotonic()) > 0 and self._mergeable() < self.max_batch:
                        self._cond.wait(left)
                group = self._take_group()
            try:
                self._run(group)
            except BaseException as e:  # noqa: BLE001 - a bug in scoring must answer the clients, not kill the worker
                logger.exception("scoring failed")
                for job in group:
                    if not job.future.done():
                        job.future.set_exception(e)

    def _mergeable(self) -> int:
        key = self._jobs[0].key
        return sum(job.batch for job in self._jobs if job.key == key)

    def _take_group(self) -> list[_Job]:
        first = self._jobs[0]
        group, total = [first], first.batch
        for job in self._jobs[1:]:
            if job.key == first.key and total + job.batch <= self.max_batch:
                group.append(job)
                total += job.batch
        self._jobs = [job for job in self._jobs if job not in group]
        return group

    def _run(self, group: list[_Job]) -> None:
        if len(group) > 1:
            frames = torch.cat([job.request.frames for job in group])
            prompts = [p for job in group for p in job.request.prompts]
            merged = self._score(group[0].request.rewards, frames, prompts, locate=False)
            if not any("error" in result for result in merged.values()):
                start = 0
                for job in group:
                    rows = slice(start, start + job.batch)
                    job.future.set_result({name: slice_result(result, rows) for name, result in merged.items()})
                    start = rows.stop
                return
            # a failure in the merged batch: score each request alone, so that one client's failing sample
            # never fails another client's request (and each error names its own sample)
        for job in group:
            job.future.set_result(self._score(job.request.rewards, job.request.frames, job.request.prompts))

    def _score(self, names: Sequence[str], frames: torch.Tensor, prompts: list[str], *,
               locate: bool = True) -> dict[str, dict[str, Any]]:
        frames = frames.to(self.device)
        rewards = self.rewards if locate else self._unlocated
        out = {}
        for name in names:
            try:
                values = score_metrics([rewards[name]], frames, prompts, step=0)
            except RewardError as e:
                logger.warning("reward %s failed: %s", name, e)
                out[name] = encode_failure(e)
                continue
            out[name] = encode_result(name, values)
        return out

    # --- life cycle -----------------------------------------------------------------------------------

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def start(self) -> RewardServer:
        """Serve from a background thread (tests, or embedding the server in another program)."""
        self._thread = threading.Thread(target=self.serve_forever, name="otca-reward-http", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
        self._httpd.server_close()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._worker.join(timeout=10)

    def __enter__(self) -> RewardServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _unlocated(fn):
    """``fn`` whose exceptions say that no sample was located (so the registry does not search for one)."""
    def call(frames: torch.Tensor, prompts: list[str]):
        try:
            return fn(frames, prompts)
        except RewardCallError:
            raise
        except Exception as e:  # noqa: BLE001 - re-raised, marked
            raise RewardCallError(f"{type(e).__name__}: {e}") from e

    return call


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, handler, app: RewardServer) -> None:
        self.app = app
        super().__init__(address, handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive: a client's connection serves every chunk of a run
    server_version = f"otca-reward-server/{PROTOCOL}"
    timeout = 300   # seconds a connection may stall mid-request before the server drops it

    server: _HTTPServer

    # --- routes ---------------------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 - the http.server naming
        path = self.path.split("?", 1)[0]
        if path == "/health":
            if self._authorized():
                self._send(200, self.server.app.health())
        elif path == "/score":
            self._send(405, {"error": "POST /score (GET /health lists the served rewards)"}, allow="POST")
        else:
            self._send(404, {"error": f"no such path {path!r}: GET /health, POST /score"})

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path != "/score":
            # the body was not read: close the connection rather than parse it as the next request
            if path == "/health":
                self._send(405, {"error": "GET /health"}, allow="GET", close=True)
            else:
                self._send(404, {"error": f"no such path {path!r}: GET /health, POST /score"}, close=True)
            return
        if not self._authorized(close=True):
            return
        app = self.server.app
        length = self.headers.get("Content-Length")
        if length is None:
            self._send(411, {"error": "a Content-Length header is required (chunked bodies are not accepted)"},
                       close=True)
            return
        try:
            size = int(length)
            if size < 0:
                raise ValueError
        except ValueError:
            self._send(400, {"error": f"Content-Length: expected a byte count, got {length!r}"}, close=True)
            return
        if size > app.max_request_bytes:
            self._send(413, {"error": f"request body of {size} bytes exceeds the server's limit of "
                                      f"{app.max_request_bytes} bytes (--max-request-mb); send fewer clips per "
                                      f"request (sample.batch_size) or raise the limit"}, close=True)
            return
        kind = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip()
        if kind not in (CONTENT_TYPE, "application/octet-stream"):
            self._send(415, {"error": f"Content-Type: expected {CONTENT_TYPE} (a safetensors body), got {kind!r}"},
                       close=True)
            return
        body = self.rfile.read(size)
        if len(body) != size:
            self._send(400, {"error": f"the body ended after {len(body)} of {size} bytes"}, close=True)
            return
        try:
            request = decode_request(body)
        except ProtocolError as e:
            self._send(400, {"error": str(e)})
            return
        unknown = [name for name in request.rewards if name not in app.rewards]
        if unknown:
            self._send(404, {"error": f"not served here: {unknown}; this server serves {sorted(app.rewards)}"})
            return
        try:
            results = app.submit(request)
        except ServerBusy as e:
            self._send(503, {"error": f"busy: {e}"}, retry_after=1)
            return
        except Exception as e:  # noqa: BLE001 - answer, log, keep serving
            logger.exception("internal error")
            self._send(500, {"error": f"internal error: {type(e).__name__}: {e}"})
            return
        self._send(200, {"results": results})

    def do_PUT(self) -> None:  # noqa: N802
        self._send(405, {"error": "GET /health, POST /score"}, allow="GET, POST", close=True)

    do_DELETE = do_PATCH = do_PUT

    # --- helpers ----------------------------------------------------------------------------------------

    def _authorized(self, *, close: bool = False) -> bool:
        token = self.server.app.token
        if token is None:
            return True
        given = self.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode()):
            return True
        self._send(401, {"error": f"missing or wrong bearer token: send 'Authorization: Bearer <token>' with the "
                                  f"token the server was started with (the client reads it from ${TOKEN_ENV})"},
                   close=close, authenticate=True)
        return False

    def _send(self, status: int, payload: dict[str, Any], *, allow: str | None = None, close: bool = False,
              retry_after: int | None = None, authenticate: bool = False) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if allow:
            self.send_header("Allow", allow)
        if retry_after is not None:
            self.send_header("Retry-After", str(retry_after))
        if authenticate:
            self.send_header("WWW-Authenticate", "Bearer")
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        logger.info("%s %s", self.address_string(), format % args)


# ------------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m otca_fast.rewards.serve",
        description="Serve otca_fast rewards over HTTP, for the trainer's `remote` reward. "
                    f"Set {TOKEN_ENV} to require a bearer token.",
        epilog="example: python -m otca_fast.rewards.serve --reward clip_score --reward motion_quality "
               "--options '{\"clip_score\": {\"path\": \"checkpoints/clip\"}, \"motion_quality\": {\"fps\": 16}}' "
               "--device cuda:1 --port 8000")
    parser.add_argument("--reward", dest="rewards", action="append", default=[], metavar="NAME",
                        help="a registered reward or metric, or 'package.module:callable'; repeatable")
    parser.add_argument("--options", default=None, metavar="JSON",
                        help="reward options: {name: {option: value}} (or, with one --reward, its options)")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (a package whose register_reward decorators add rewards); repeatable")
    parser.add_argument("--device", default="auto",
                        help="device the frames are scored on: auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (0: any free port)")
    parser.add_argument("--max-request-mb", type=float, default=512.0,
                        help="largest request body accepted, in MiB (bigger ones get 413 unread)")
    parser.add_argument("--max-batch", type=int, default=64,
                        help="clips per merged reward call (a larger single request is scored whole)")
    parser.add_argument("--max-pending", type=int, default=32,
                        help="requests waiting beyond this many get 503 (the client retries)")
    parser.add_argument("--batch-window-ms", type=float, default=0.0,
                        help="wait this long for concurrent requests to merge (0: merge what is already waiting)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads of the server (default: torch's; 1-2 when it shares a CPU with the "
                             "trainer, so the two do not oversubscribe the cores)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until interrupted; returns the exit status (2 for a bad command line or reward)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    try:
        if not args.rewards:
            raise ValueError("--reward: expected at least one reward to serve (e.g. --reward clip_score)")
        if not args.max_request_mb > 0:
            raise ValueError(f"--max-request-mb: expected > 0, got {args.max_request_mb}")
        device = resolve_device(args.device, what="--device")
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads: expected >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        rewards = build_served_rewards(args.rewards, parse_options(args.rewards, args.options), args.imports)
        token = os.environ.get(TOKEN_ENV) or None
        server = RewardServer(rewards, device=device, host=args.host, port=args.port, token=token,
                              max_request_bytes=int(args.max_request_mb * 2**20), max_batch=args.max_batch,
                              max_pending=args.max_pending, batch_window_s=args.batch_window_ms / 1000)
    except (ValueError, OSError) as e:
        print(f"otca-reward-server: error: {e}", file=sys.stderr)
        return 2
    if not _is_loopback(args.host) and token is None:
        logger.warning("listening on %s without a token: anyone who reaches this port can use the rewards "
                       "(set %s)", args.host, TOKEN_ENV)
    roles = ", ".join(f"{name} ({r.role}{', cheap' if r.cheap else ''}{', eval only' if r.eval_only else ''})"
                      for name, r in rewards.items())
    logger.info("serving %s on %s (device %s, %s)", roles, server.url, device,
                "bearer token required" if token else "no token")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Rollout: sample groups of trajectories with ``ops.sde_step`` into the trajectory buffer.

Per training step the trainer draws P prompts and samples G clips for each (N = P·G rows, group
ids 0..P−1, row n belongs to group n // G). Rows are sampled in chunks of ``batch_size``; each
chunk runs the whole schedule σ_0 = 1 → σ_T = 0:

    v_t   = backbone.velocity(x_t, σ_t, cond[, uncond])          (CFG batched in one forward)
    SDE:  x_{t+1}, log π_t = ops.sde_step(x_t, v_t, σ_t, σ_{t+1})  (stochastic, trainable steps)
    ODE:  x_{t+1} = x_t + (σ_{t+1} − σ_t)·v_t                      (deterministic steps; log π_t := 0)

and stores x_0..x_T in the buffer, log π in ``log_probs[N, T]`` and, when the credit scheme needs
them, the clean-sample predictions x̂0_t = x_t − σ_t·v_t (flow matching: x_t = (1−σ)x0 + σ·noise,
v = noise − x0). The chunk is then decoded and its rewards are scored — in a worker thread when
``async_rewards``, so they overlap the sampling of the next chunk.

The training pass recomputes log π_t with the same op from the same stored (x_t, x_{t+1}), the
same σ and the same batch composition, so on-policy ratios come out exactly 1.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import torch

from otca_fast import ops

__all__ = ["NonFiniteError", "Rollout", "RolloutResult", "RewardWorker", "sample_trajectories", "sde_step_mask",
           "chunks", "share_chunks", "cheap_step_reward_fn", "assemble_step_rewards", "check_training_loss"]


class NonFiniteError(RuntimeError):
    """A NaN/Inf appeared in a log-prob, a latent or the loss; the message says where."""


class RewardWorker(Executor):
    """One background thread that scores rewards while the next chunk samples (``sample.async_rewards``).

    Unlike a ``ThreadPoolExecutor``, whose worker threads the interpreter joins at exit, the thread is a
    daemon: a reward call still running when the run stops (Ctrl-C, a fatal error) is abandoned, and the
    process exits within seconds instead of waiting for a slow reward model to return. Nothing is
    recorded from an abandoned call: its future is never read. An idle worker is always joined on
    shutdown: a daemon thread still alive when the interpreter finalises is killed where it stands, and
    one waking up inside torch's C++ then aborts the process ("terminate called without an active
    exception") after a run that succeeded.
    """

    def __init__(self, name: str = "otca-rewards"):
        self._name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._busy = False  # a call is running on the thread now

    def submit(self, fn, /, *args, **kwargs) -> Future:
        if self._closed:
            raise RuntimeError("RewardWorker: submit after shutdown")
        future: Future = Future()
        self._queue.put((future, fn, args, kwargs))
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
            self._thread.start()
        return future

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            self._busy = True
            try:
                result = fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - handed to whoever reads the future
                future.set_exception(e)
            else:
                future.set_result(result)
            finally:
                self._busy = False

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking work. ``cancel_futures``: drop what has not started; ``wait``: wait for the call running
        now (the trainer never does: that call is abandoned). With no call running, the thread is joined
        either way (it exits at once)."""
        self._closed = True
        if cancel_futures:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        self._queue.put(None)
        if self._thread is not None and (wait or not self._busy):
            self._thread.join()


def _result(future: Future, poll: Callable[[], None] | None):
    """``future.result()``; while it is not ready, ``poll()`` about every 0.2 s (it may raise to stop waiting)."""
    if poll is None:
        return future.result()
    while True:
        try:
            return future.result(timeout=0.2)
        except FutureTimeout:
            poll()


def chunks(n: int, size: int) -> list[slice]:
    """``[0, n)`` cut into consecutive slices of ``size`` rows (the last may be shorter)."""
    if size < 1:
        raise ValueError(f"size: expected >= 1, got {size}")
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def share_chunks(total: int, rows: slice, size: int) -> list[tuple[slice, slice | None]]:
    """One rank's view of the global batch's chunks: ``[(global chunk, local part or None), ...]``.

    The global batch ``[0, total)`` is cut into ``chunks(total, size)``; ``rows`` is the contiguous
    share of one rank. Each global chunk comes with the rows of it that the share holds, as a slice
    *relative to the share* (``None`` when it holds none). With ``rows = slice(0, total)`` this is
    ``chunks(total, size)`` itself. Rollout and training both walk these parts, so a rank forwards the
    same rows together in both (on-policy ratios stay exactly 1).
    """
    start, stop = rows.start or 0, rows.stop
    if not 0 <= start <= stop <= total:
        raise ValueError(f"rows: expected a slice within [0, {total}), got {rows}")
    out = []
    for g in chunks(total, size):
        lo, hi = max(g.start, start), min(g.stop, stop)
        out.append((g, slice(lo - start, hi - start) if lo < hi else None))
    return out


def sde_step_mask(num_steps: int, mode: str, *, fraction: float = 1.0, window_size: int = 1,
                  window_range: tuple[int, int] | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Which of the ``num_steps`` denoising steps are stochastic: a ``[T]`` bool tensor.

    ``all``: every step. ``fraction``: the first round(fraction·T) steps — the high-noise steps,
    where exploration changes the sample most. ``window``: ``window_size`` consecutive steps whose
    start is drawn uniformly from ``[lo, hi − window_size]`` (Flow-GRPO-Fast), ODE elsewhere.
    """
    mask = torch.zeros(num_steps, dtype=torch.bool)
    if mode == "all":
        mask[:] = True
    elif mode == "fraction":
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction: expected a value in (0, 1], got {fraction}")
        mask[: max(1, round(fraction * num_steps))] = True
    elif mode == "window":
        lo, hi = window_range or (0, num_steps // 2)
        if not (0 <= lo and lo + window_size <= hi <= num_steps):
            raise ValueError(f"window_range: expected 0 <= lo, lo + window_size <= hi <= {num_steps}, got "
                             f"[{lo}, {hi}) with window_size {window_size}")
        start = lo + int(torch.randint(0, hi - window_size - lo + 1, (1,), generator=generator))
        mask[start:start + window_size] = True
    else:
        raise ValueError(f"mode: expected 'all', 'fraction' or 'window', got {mode!r}")
    return mask


@dataclass
class RolloutResult:
    """What one rollout produced (latent states live in the buffer passed in)."""

    log_probs: torch.Tensor                      # [N, T] float32 (0 on ODE steps)
    final_latents: torch.Tensor | None = None    # [N, *latent_shape] when keep_final
    rewards: torch.Tensor | None = None          # [N, K] float32 CPU, when rewards were scored
    frames: list[torch.Tensor] = field(default_factory=list)  # decoded chunks kept for clips
    step_rewards: torch.Tensor | None = None     # [N, T+1, K] float32 CPU (otca_timing)


@dataclass
class Rollout:
    """One training step's trajectories, as the trainer's later phases need them (the latent states live in the
    trainer's buffers). On several ranks this rank's share: ``rows`` of the global batch."""

    prompts: list[str]                  # this rank's prompts, one per row
    cond: object                        # their prompt embeddings (backbone.encode_prompts)
    uncond: object | None               # the negative prompt's embeddings (classifier-free guidance), else None
    sde_mask: torch.Tensor              # [T] bool: the steps sampled with noise
    window: tuple[int, int] | None      # the credit scheme ``window``'s (start, stop), else None
    log_probs: torch.Tensor             # [N/W, T] the rollout's log π (0 on ODE steps)
    rewards: torch.Tensor               # [N/W, K] this rank's rewards
    step_rewards: torch.Tensor | None   # [N/W, T+1, K] per-state rewards (otca_timing), else None
    rows: slice                         # this rank's rows of the global batch


def _check_finite_rows(name: str, values: torch.Tensor, *, step: int, t: int, rows: slice,
                       prompts: Sequence[str], offset: int = 0) -> None:
    """``values`` ``[B]`` (one number per row of the chunk ``rows``) must be finite."""
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        n = rows.start + i
        raise NonFiniteError(f"step {step}: rollout {name} is {float(values[i])} at denoising step t={t} for "
                             f"sample {offset + n} (prompt {prompts[n]!r}); the velocity or the latent went non-finite "
                             f"(try float32 weights, a smaller learning rate, or a lower noise_level)")


def check_training_loss(step: int, loss: torch.Tensor, stats: dict[str, torch.Tensor], ids: torch.Tensor,
                        t: torch.Tensor) -> None:
    """The training pass's recomputed log-prob, ratio, KL and loss (``ops.grpo_step_loss`` of rows ``ids`` at
    steps ``t``) must be finite; a :class:`NonFiniteError` names the step, the timestep and the sample."""
    for name in ("log_prob", "ratio", "kl"):
        bad = ~torch.isfinite(stats[name])
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise NonFiniteError(f"step {step}: training {name} is {float(stats[name][i])} at timestep index "
                                 f"t={int(t[i])} for sample {int(ids[i])} (the recomputed velocity went "
                                 f"non-finite)")
    if not bool(torch.isfinite(loss)):
        raise NonFiniteError(f"step {step}: the loss is {float(loss)} at timestep indices {t.tolist()} "
                             f"(samples {ids.tolist()})")


def sample_trajectories(backbone, cond, *, sigmas: torch.Tensor, sde_mask: torch.Tensor, init_noise: torch.Tensor,
                        prompts: Sequence[str], batch_size: int, dynamics: str, noise_level: float,
                        generator: torch.Generator | None, guidance_scale: float = 1.0, uncond=None,
                        buffer=None, x0_buffer=None, autocast: Callable[[], contextlib.AbstractContextManager]
                        = contextlib.nullcontext, step: int = 0, score_fn=None,
                        reward_executor: Executor | None = None, keep_frames: int = 0,
                        keep_final: bool = False, step_reward_fn: Callable | None = None,
                        on_progress: Callable[[int], None] | None = None, rows: slice | None = None,
                        total_rows: int | None = None, poll: Callable[[], None] | None = None) -> RolloutResult:
    """Sample ``init_noise.shape[0]`` trajectories; see the module docstring for the math.

    ``cond``/``uncond`` are PromptEmbeds for all N rows (uncond for one chunk is taken by index).
    ``sigmas`` ``[T+1]`` float64 CPU. ``buffer.put(t, x_t, rows)`` receives every state,
    ``x0_buffer.put(t, x̂0_t, rows)`` every clean-sample prediction. ``score_fn(frames, prompts,
    step=...)`` scores a decoded chunk (in ``reward_executor`` when given); ``step_reward_fn(rows,
    x0_preds, frames)`` gets a chunk's T clean-sample predictions and its decoded frames and returns
    whatever per-step scores the caller wants (concatenated over chunks into ``step_rewards``; the
    trainer's otca_timing hook). ``keep_frames`` decoded clips are returned for the report. Runs
    under ``torch.no_grad()``. ``on_progress(rows)`` is called after every denoising step of a chunk and
    ``poll()`` while waiting for the rewards of ``reward_executor``; either may raise to abandon the
    rollout (the trainer's stop points, :mod:`otca_fast.preemption`).

    Distributed share: with ``rows`` (and ``total_rows``) the N rows given are the global rows ``rows``
    of a batch of ``total_rows`` (one rank's contiguous share). The rows are then chunked along the
    *global* batch's chunks (:func:`share_chunks`) and the SDE noise of every global chunk is drawn from
    ``generator`` in the single-process order — the chunks of other ranks drawn and discarded — so every
    sample gets the same noise whatever the number of ranks, and ``generator`` ends in the same state on
    every rank. Row indices passed to ``buffer``, ``score_fn`` and ``step_reward_fn`` are local (0..N−1).
    """
    n = init_noise.shape[0]
    num_steps = sigmas.shape[0] - 1
    if sde_mask.shape != (num_steps,):
        raise ValueError(f"sde_mask: expected shape ({num_steps},), got {tuple(sde_mask.shape)}")
    if len(prompts) != n:
        raise ValueError(f"prompts: expected {n} (one per row of init_noise), got {len(prompts)}")
    device = init_noise.device
    if rows is None:
        rows, total_rows = slice(0, n), n
    elif total_rows is None or (rows.stop - (rows.start or 0)) != n:
        raise ValueError(f"rows / total_rows: expected the share of the {n} rows of init_noise within a batch of "
                         f"total_rows, got rows={rows}, total_rows={total_rows}")
    offset = rows.start or 0
    plan = share_chunks(total_rows, rows, batch_size)
    latent_shape = tuple(init_noise.shape[1:])
    sig = [float(s) for s in sigmas]
    # Flow-GRPO's σ = 1 rule: the schedule's second sigma stands in for σ in 1 − σ of the noise scale
    sigma_max = sig[1]
    log_probs = torch.zeros(n, num_steps, dtype=torch.float32)
    final = torch.empty_like(init_noise) if keep_final else None
    futures: list[tuple[slice, Future | torch.Tensor]] = []
    kept_frames: list[torch.Tensor] = []
    step_rewards = [] if step_reward_fn is not None else None
    with torch.no_grad():
        for g, rows in plan:
            if rows is None:
                # another rank's chunk: draw (and drop) its SDE noise, keeping the stream in step
                for t in range(num_steps):
                    if bool(sde_mask[t]):
                        torch.randn((g.stop - g.start, *latent_shape), generator=generator, device=device,
                                    dtype=torch.float32)
                continue
            x = init_noise[rows]
            b = x.shape[0]
            c = cond.index(rows)
            u = uncond.index(slice(0, b)) if uncond is not None else None
            if buffer is not None:
                buffer.put(0, x, rows)
            x0s = [] if step_reward_fn is not None else None
            for t in range(num_steps):
                sigma_b = torch.full((b,), sig[t], device=device, dtype=torch.float32)
                with autocast():
                    v = backbone.velocity(x, sigma_b, c, guidance_scale=guidance_scale, uncond=u)
                v = v.to(x.dtype)
                if x0_buffer is not None or x0s is not None:
                    x0 = (x.float() - sig[t] * v.float()).to(x.dtype)  # x̂0 = x_t − σ_t·v_t
                    if x0_buffer is not None:
                        x0_buffer.put(t, x0, rows)
                    if x0s is not None:
                        x0s.append(x0)
                if bool(sde_mask[t]):
                    # the global chunk's noise (as ops.sde_step would draw it), cut to this share's rows
                    eps = torch.randn((g.stop - g.start, *latent_shape), generator=generator, device=device,
                                      dtype=torch.float32)
                    if b != g.stop - g.start:
                        first = offset + rows.start - g.start
                        eps = eps[first:first + b]
                    x, lp, _, _ = ops.sde_step(x, v, sig[t], sig[t + 1], dynamics=dynamics, noise_level=noise_level,
                                               noise=eps, sigma_max=sigma_max)
                    _check_finite_rows("log_prob", lp, step=step, t=t, rows=rows, prompts=prompts, offset=offset)
                    log_probs[rows, t] = lp.float().cpu()
                else:
                    x = (x.float() + (sig[t + 1] - sig[t]) * v.float()).to(x.dtype)
                    # one number per row that is non-finite iff the row has a NaN/Inf anywhere
                    _check_finite_rows("latent", x.flatten(1).float().sum(1), step=step, t=t, rows=rows,
                                       prompts=prompts, offset=offset)
                if buffer is not None:
                    buffer.put(t + 1, x, rows)
                if on_progress is not None:
                    on_progress(b)
            if final is not None:
                final[rows] = x
            if score_fn is None and keep_frames <= len(kept_frames) and step_reward_fn is None:
                continue
            frames = backbone.decode(x)
            if len(kept_frames) < keep_frames:
                kept_frames.extend(frames[: keep_frames - len(kept_frames)].cpu())
            if step_reward_fn is not None:
                step_rewards.append(step_reward_fn(rows, x0s, frames))
            if score_fn is not None:
                chunk_prompts = list(prompts[rows])
                frames_cpu = frames.float().cpu()
                if reward_executor is not None:
                    futures.append((rows, reward_executor.submit(score_fn, frames_cpu, chunk_prompts, step=step)))
                else:
                    futures.append((rows, score_fn(frames_cpu, chunk_prompts, step=step)))
    result = RolloutResult(log_probs=log_probs, final_latents=final, frames=kept_frames)
    if futures:
        parts = []
        for _, f in futures:
            # .result() re-raises a RewardError from the worker thread here, in the training thread
            parts.append(_result(f, poll) if isinstance(f, Future) else f)
        result.rewards = torch.cat(parts, 0)
    if step_rewards:
        result.step_rewards = torch.cat(step_rewards, 0)
    return result


# --- otca_timing: cheap rewards on the decoded x̂0 predictions ---------------------------------------------

def cheap_step_reward_fn(backbone, cheap_score: Callable[..., torch.Tensor], prompts: Sequence[str],
                         states: Sequence[int], *, step: int):
    """The rollout's ``step_reward_fn``: ``cheap_score`` (the rewards marked cheap) on the decoded x̂0 predictions
    of ``states`` (the scored intermediate states; the final sample is scored anyway), ``[B, len(states), K_cheap]``
    per chunk."""

    def fn(rows: slice, x0s: list[torch.Tensor], _frames: torch.Tensor) -> torch.Tensor:
        chunk_prompts = prompts[rows]
        values = []
        for j in states:
            frames = backbone.decode(x0s[j]).float().cpu()
            values.append(cheap_score(frames, chunk_prompts, step=step))
        return torch.stack(values, 1)  # [B, M-1, K_cheap]

    return fn


def assemble_step_rewards(cheap_values: torch.Tensor, final: torch.Tensor, cheap: Sequence[int],
                          states: Sequence[int], num_steps: int) -> torch.Tensor:
    """[N, T+1, K]: the cheap rewards (columns ``cheap`` of ``final``) interpolated between the scored
    ``states``, the others constant.

    An objective that is not scored per step is given its final value at every state: its gains are then 0 and
    its timing uniform (credit/timing.py).
    """
    from otca_fast.credit.timing import interpolate_step_rewards

    values = torch.cat([cheap_values, final[:, None, list(cheap)]], 1)
    interp = interpolate_step_rewards(values, list(states), num_steps)
    out = final[:, None, :].repeat(1, num_steps + 1, 1)
    out[:, :, list(cheap)] = interp.to(out.dtype)
    return out

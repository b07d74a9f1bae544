"""The reward registry: names -> factories, user-defined callables, and the guarded scoring loop.

A reward maps decoded frames ``[B, F, C, H, W]`` (float, in [0, 1], ``F = 1`` for images) and the
``B`` prompts to one float score per sample. Each reward carries a *role* (which objective it feeds
in multi-objective credit) and a *cost flag* ``cheap``: a cheap reward may be evaluated on the
intermediate x̂0 predictions of every few denoising steps (``otca_timing`` credit), an expensive one
only on the final samples.

:func:`score_rewards` is the one place where rewards are called during training. It validates the
frames once, runs every reward under ``torch.no_grad()``, and turns any exception or NaN/Inf score
into a :class:`RewardError` that names the reward, the offending prompt and the training step, so the
trainer can write a checkpoint of the last good state and stop (see ``docs/rewards.md``).

Rewards scored out of process (``remote``, :mod:`otca_fast.rewards.remote`) plug in through two small
hooks: a reward that already knows which sample failed raises :class:`RewardCallError` (the batch is
then not re-run sample by sample, which for a server that is down would mean B more timeouts), and
rewards whose ``fn`` share a ``joint_key`` are scored by one ``fn.score_jointly(fns, frames, prompts)``
call (several rewards of one server: the frames travel once).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from otca_fast import checks

__all__ = [
    "ROLES", "Reward", "RewardCallError", "RewardError", "RewardFn", "register_reward", "register_metric",
    "build_reward", "list_rewards", "list_metrics", "score_rewards", "score_metrics", "check_frames",
]

ROLES: tuple[str, ...] = ("quality", "motion", "alignment", "custom")
RewardFn = Callable[[torch.Tensor, list[str]], Any]

# Decoders end with ``clamp(x / 2 + 0.5, 0, 1)``; half-precision round-off can step just outside.
_RANGE_TOL = 1e-3


@dataclass(frozen=True)
class Reward:
    """One built reward: ``fn(frames, prompts) -> scores [B]``.

    ``frames`` is ``[B, F, C, H, W]`` float in [0, 1] with ``C = 3`` (RGB), ``prompts`` a list of B
    strings. ``role`` is one of :data:`ROLES`; ``cheap`` says whether the reward is cheap enough to be
    evaluated on intermediate x̂0 predictions.

    ``eval_only`` marks a metric registered with :func:`register_metric`: a judge the trainer must never
    optimise (a config that lists it under ``rewards:`` is refused). A metric may return several parts,
    a mapping ``{part: [B]}``; ``headline`` names the part that stands for the whole (see
    :func:`score_metrics`).
    """

    name: str
    role: str
    cheap: bool
    fn: RewardFn
    eval_only: bool = False
    headline: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"Reward.name: expected a non-empty str, got {self.name!r}")
        _check_role(self.role, f"Reward {self.name!r}: role")
        if not isinstance(self.cheap, bool):
            raise TypeError(f"Reward {self.name!r}: cheap: expected a bool, got {type(self.cheap).__name__}")
        if not callable(self.fn):
            raise TypeError(f"Reward {self.name!r}: fn: expected a callable, got {type(self.fn).__name__}")


class RewardError(RuntimeError):
    """A reward raised, or returned a NaN/Inf or malformed score, during training.

    Attributes: ``reward`` (its name), ``prompt`` (the prompt of the first failing sample, or ``None``
    when the failure belongs to the whole batch, e.g. a wrong output shape), ``index`` (that sample's
    position in the batch, or ``None``), ``step`` (the training step) and ``cause`` (the exception).
    """

    def __init__(self, reward: str, prompt: str | None, step: int, cause: BaseException,
                 index: int | None = None) -> None:
        self.reward = reward
        self.prompt = prompt
        self.step = step
        self.cause = cause
        self.index = index
        where = (f"on prompt {prompt!r} (sample {index})" if prompt is not None
                 else "on the batch as a whole (not attributable to one prompt)")
        super().__init__(f"reward {reward!r} failed at step {step} {where}: "
                         f"{type(cause).__name__}: {cause}")

    def __reduce__(self):
        # Exceptions pickle through their args; keep all fields when sent across processes.
        return (type(self), (self.reward, self.prompt, self.step, self.cause, self.index))


class RewardCallError(RuntimeError):
    """Raised by a reward that knows which sample failed (``index``), or that no single sample is to blame
    (``index=None``: a reward server that does not answer, a malformed answer).

    :func:`score_rewards` takes ``index`` as given instead of re-running the batch one sample at a time
    to find the failing prompt.
    """

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index

    def __reduce__(self):
        return (type(self), (str(self), self.index))


@dataclass(frozen=True)
class _Entry:
    factory: Callable[..., RewardFn]
    role: str
    cheap: bool
    eval_only: bool = False
    headline: str | None = None


_REGISTRY: dict[str, _Entry] = {}


def _check_role(role: object, what: str) -> None:
    checks.choice(what, role, list(ROLES))


def register_reward(name: str, *, role: str, cheap: bool) -> Callable[[Callable[..., RewardFn]],
                                                                       Callable[..., RewardFn]]:
    """Decorator registering a factory ``(**options) -> fn`` under ``name``.

    ``fn(frames, prompts)`` must return ``B`` finite scores (a tensor, array or list). Registering a
    different factory under a taken name is an error (re-registering the same one, as a module reload
    does, is allowed).
    """
    return _register(name, _Entry(None, role, cheap))


def register_metric(name: str, *, headline: str | None = None, role: str = "custom",
                    cheap: bool = False) -> Callable[[Callable[..., RewardFn]], Callable[..., RewardFn]]:
    """Decorator registering an *eval-only* metric factory ``(**options) -> fn`` under ``name``.

    A metric is a judge the trainer never optimises: it can be listed under ``eval.metrics:`` but not
    under ``rewards:``. ``fn(frames, prompts)`` returns ``B`` scores, or a mapping ``{part: [B]}`` of
    several parts (each logged as ``eval/metric/<name>/<part>``), in which case ``headline`` names the part
    logged as ``eval/metric/<name>`` itself.
    """
    if headline is not None and (not isinstance(headline, str) or not headline):
        raise TypeError(f"register_metric({name!r}): headline: expected a part name or None, got {headline!r}")
    return _register(name, _Entry(None, role, cheap, eval_only=True, headline=headline))


def _register(name: str, entry: _Entry) -> Callable[[Callable[..., RewardFn]], Callable[..., RewardFn]]:
    role, cheap = entry.role, entry.cheap
    if not isinstance(name, str) or not name or any(c in name for c in ".: "):
        raise ValueError(f"register_reward: name: expected a non-empty str without '.', ':' or spaces "
                         f"(those mark dotted paths), got {name!r}")
    _check_role(role, f"register_reward({name!r}): role")
    if not isinstance(cheap, bool):
        raise TypeError(f"register_reward({name!r}): cheap: expected a bool, got {type(cheap).__name__}")

    def decorator(factory: Callable[..., RewardFn]) -> Callable[..., RewardFn]:
        if not callable(factory):
            raise TypeError(f"register_reward({name!r}): expected a callable factory, got {factory!r}")
        old = _REGISTRY.get(name)
        if old is not None and _qualname(old.factory) != _qualname(factory):
            raise ValueError(f"register_reward: the name {name!r} is already taken by "
                             f"{_qualname(old.factory)}; pick another name for {_qualname(factory)}")
        _REGISTRY[name] = _Entry(factory, role, cheap, entry.eval_only, entry.headline)
        return factory

    return decorator


def _qualname(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def list_rewards() -> dict[str, tuple[str, bool]]:
    """``{name: (role, cheap)}`` for every registered reward (eval-only metrics excluded), sorted by name."""
    return {name: (e.role, e.cheap) for name, e in sorted(_REGISTRY.items()) if not e.eval_only}


def list_metrics() -> dict[str, str | None]:
    """``{name: headline part}`` for every registered eval-only metric, sorted by name."""
    return {name: e.headline for name, e in sorted(_REGISTRY.items()) if e.eval_only}


def _parameter_names(target: Callable[..., Any]) -> list[str]:
    try:
        return list(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return []


def _check_options(target: Callable[..., Any], what: str, leading: tuple = (), /, **options: Any) -> None:
    # positional-only, so an option may be called "target" or "what"
    """Fail early, with the accepted option names, when ``options`` do not fit ``target``."""
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):  # builtins without a signature: let the call itself decide
        return
    try:
        sig.bind(*leading, **options)
    except TypeError as exc:
        accepted = [p.name for p in list(sig.parameters.values())[len(leading):]
                    if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        raise TypeError(f"{what}: options {sorted(options)} do not fit: {exc}; "
                        f"accepted options: {accepted}") from None


def build_reward(name_or_dotted_path: str, **options: Any) -> Reward:
    """Build a reward from a registry name, or from a dotted path to a user-defined callable.

    * A registry name (see :func:`list_rewards`): ``options`` go to the registered factory.
    * ``"package.module:callable"`` or ``"package.module.callable"``: a user-defined reward. ``options``
      may include ``role=`` (default ``"custom"``) and ``cheap=`` (default ``False``). If the target is a
      class it is instantiated with the remaining options and the instance must be callable as
      ``(frames, prompts)``; a function is called as ``fn(frames, prompts, **options)``.
    """
    if not isinstance(name_or_dotted_path, str) or not name_or_dotted_path.strip():
        raise TypeError(f"build_reward: name_or_dotted_path: expected a non-empty str, "
                        f"got {name_or_dotted_path!r}")
    name = name_or_dotted_path.strip()
    entry = _REGISTRY.get(name)
    if entry is not None:
        # a factory that takes role/cheap itself (a remote reward, a judge) decides them; others fix them
        fixed = sorted({"role", "cheap"} & set(options) - set(_parameter_names(entry.factory)))
        if fixed:
            raise TypeError(f"build_reward({name!r}): {fixed} are fixed for the registered reward "
                            f"(role={entry.role!r}, cheap={entry.cheap}); they can only be set for "
                            f"user-defined rewards given as a dotted path")
        _check_options(entry.factory, f"build_reward({name!r})", **options)
        fn = entry.factory(**options)
        if isinstance(fn, Reward):
            # the factory knew more than its registration: a remote reward's name, role, cost and
            # eval-only flag are the served reward's, asked from its server
            return fn
        if not callable(fn):
            raise TypeError(f"build_reward({name!r}): the factory returned {type(fn).__name__}, "
                            f"expected a callable (frames, prompts) -> scores")
        return Reward(name=name, role=entry.role, cheap=entry.cheap, fn=fn, eval_only=entry.eval_only,
                      headline=entry.headline)
    if "." not in name and ":" not in name:
        raise ValueError(f"build_reward: unknown reward {name!r}; registered rewards: "
                         f"{sorted(_REGISTRY)}; a user-defined reward is a dotted path "
                         f"'package.module:callable'")
    role = options.pop("role", "custom")
    cheap = options.pop("cheap", False)
    headline = options.pop("headline", None)
    if headline is not None and (not isinstance(headline, str) or not headline):
        raise TypeError(f"build_reward({name!r}): headline: expected the name of a part, got {headline!r}")
    _check_role(role, f"build_reward({name!r}): role")
    checks.boolean(f"build_reward({name!r}): cheap", cheap)
    target = _import_dotted(name)
    if inspect.isclass(target):
        _check_options(target, f"build_reward({name!r})", **options)
        fn = target(**options)
        if not callable(fn):
            raise TypeError(f"build_reward({name!r}): instances of {target.__qualname__} are not "
                            f"callable; define __call__(self, frames, prompts)")
    elif callable(target):
        _check_options(target, f"build_reward({name!r})", (None, None), **options)
        fn = functools.partial(target, **options) if options else target
    else:
        raise TypeError(f"build_reward({name!r}): expected a callable or a class, "
                        f"got {type(target).__name__}")
    return Reward(name=name, role=role, cheap=cheap, fn=fn, headline=headline)


def _import_dotted(path: str) -> Any:
    if ":" in path:
        module_name, _, attr_path = path.partition(":")
    else:
        module_name, _, attr_path = path.rpartition(".")
    if not module_name or not attr_path:
        raise ValueError(f"build_reward: {path!r} is not a dotted path; expected "
                         f"'package.module:callable' or 'package.module.callable'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"build_reward: cannot import module {module_name!r} of the user-defined "
                         f"reward {path!r}: {exc}") from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"build_reward: module {module_name!r} has no attribute {attr_path!r} "
                             f"(user-defined reward {path!r})") from None
    return obj


def check_frames(frames: object, prompts: object, *, what: str = "frames") -> list[str]:
    """Validate the reward input contract; return ``prompts`` as a list.

    Structure only (type, rank, channels, dtype, batch size): no pass over the data, so rewards can
    call it cheaply on every invocation. :func:`score_rewards` also checks range and finiteness.
    """
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor [B, F, C, H, W], got {type(frames).__name__}")
    if frames.ndim != 5:
        raise ValueError(f"{what}: expected 5 dims [B, F, C, H, W] (F = 1 for images), "
                         f"got shape {tuple(frames.shape)}")
    if frames.shape[2] != 3:
        raise ValueError(f"{what}: expected C = 3 (RGB) at dim 2 of [B, F, C, H, W], "
                         f"got shape {tuple(frames.shape)}")
    if not frames.is_floating_point():
        raise TypeError(f"{what}: expected a float tensor with values in [0, 1], got {frames.dtype}")
    if min(frames.shape) == 0:
        raise ValueError(f"{what}: expected no empty dimension, got shape {tuple(frames.shape)}")
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts: expected a list of {frames.shape[0]} str, got {type(prompts).__name__}")
    prompts = list(prompts)
    if len(prompts) != frames.shape[0]:
        raise ValueError(f"prompts: expected {frames.shape[0]} prompts (one per sample of {what}), "
                         f"got {len(prompts)}")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts: expected str, got {type(prompts[bad[0]]).__name__} at index {bad[0]}")
    return prompts


def _as_scores(out: object, batch: int) -> torch.Tensor:
    """A reward's output as float64 CPU ``[B]`` (float64 so a float32 overflow still shows as Inf)."""
    if isinstance(out, torch.Tensor):
        scores = out.detach().to("cpu", torch.float64)
    else:
        try:
            scores = torch.as_tensor(np.asarray(out, dtype=np.float64))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"expected a tensor, array or list of {batch} floats, "
                            f"got {type(out).__name__}") from exc
    if tuple(scores.shape) != (batch,):
        raise ValueError(f"expected scores of shape ({batch},), got {tuple(scores.shape)}")
    return scores


def score_rewards(rewards: Sequence[Reward], frames: torch.Tensor, prompts: Sequence[str], *,
                  step: int) -> torch.Tensor:
    """Evaluate every reward on the batch: ``[B, K]`` float32 on the CPU, column k = ``rewards[k]``.

    Raises :class:`RewardError` (naming the reward, the prompt and ``step``) when a reward raises,
    returns a malformed output, or returns NaN/Inf, or a score that overflows float32. When a batched
    call raises, the batch is re-run one sample at a time to find the prompt that triggers it.
    """
    if isinstance(rewards, Reward) or not isinstance(rewards, Sequence) or not rewards:
        raise TypeError(f"score_rewards: rewards: expected a non-empty sequence of Reward, "
                        f"got {type(rewards).__name__}")
    for k, r in enumerate(rewards):
        if not isinstance(r, Reward):
            raise TypeError(f"score_rewards: rewards[{k}]: expected a Reward (from build_reward), "
                            f"got {type(r).__name__}")
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"score_rewards: step: expected an int, got {type(step).__name__}")
    if step < 0:
        raise ValueError(f"score_rewards: step: expected >= 0, got {step}")
    prompts = check_frames(frames, prompts)
    _check_values(frames, prompts, step)

    batch = frames.shape[0]
    out = torch.empty(batch, len(rewards), dtype=torch.float32)
    for k, (reward, raw) in enumerate(zip(rewards, _call_all(rewards, frames, prompts, step))):
        if isinstance(raw, Mapping):
            raise RewardError(reward.name, None, step, TypeError(
                "returned a mapping of parts; a trained reward returns one score per sample (a multi-part "
                "judge belongs under eval.metrics)"))
        out[:, k] = _checked_scores(reward.name, raw, prompts, step)
    return out


def score_metrics(metrics: Sequence[Reward], frames: torch.Tensor, prompts: Sequence[str], *,
                  step: int) -> dict[str, torch.Tensor]:
    """Evaluate metrics (eval-only metrics, or rewards used as judges) on a batch.

    Returns ``{key: [B] float32}`` on the CPU. A metric that returns ``B`` scores gives the key
    ``name``; one that returns a mapping ``{part: [B]}`` gives ``name/part`` for every part and ``name``
    for its headline part (:attr:`Reward.headline`, else the first part). Failures raise
    :class:`RewardError` as in :func:`score_rewards`.
    """
    if isinstance(metrics, Reward) or not isinstance(metrics, Sequence) or not metrics:
        raise TypeError(f"score_metrics: metrics: expected a non-empty sequence of Reward, "
                        f"got {type(metrics).__name__}")
    prompts = check_frames(frames, prompts)
    _check_values(frames, prompts, step)
    for metric in metrics:
        if not isinstance(metric, Reward):
            raise TypeError(f"score_metrics: expected Reward entries (from build_reward), got {type(metric).__name__}")
    out: dict[str, torch.Tensor] = {}
    for metric, raw in zip(metrics, _call_all(metrics, frames, prompts, step)):
        if not isinstance(raw, Mapping):
            out[metric.name] = _checked_scores(metric.name, raw, prompts, step)
            continue
        if not raw:
            raise RewardError(metric.name, None, step, ValueError("returned an empty mapping of parts"))
        for part, value in raw.items():
            if not isinstance(part, str) or not part or "/" in part:
                raise RewardError(metric.name, None, step, ValueError(
                    f"part names must be non-empty str without '/', got {part!r}"))
            out[f"{metric.name}/{part}"] = _checked_scores(f"{metric.name}/{part}", value, prompts, step)
        headline = metric.headline or next(iter(raw))
        if headline not in raw:
            raise RewardError(metric.name, None, step, KeyError(
                f"its headline part {headline!r} is not among the returned parts {list(raw)}"))
        out[metric.name] = out[f"{metric.name}/{headline}"]
    return out


def _call_all(rewards: Sequence[Reward], frames: torch.Tensor, prompts: list[str], step: int):
    """Each reward's raw output, in order (a generator: the first failure raises its :class:`RewardError`).

    Rewards whose ``fn`` carry the same ``joint_key`` are scored together by one
    ``fn.score_jointly(fns, frames, prompts)``, which returns one output (or exception) per ``fn``.
    """
    groups: dict[Any, list[int]] = {}
    for k, reward in enumerate(rewards):
        key = getattr(reward.fn, "joint_key", None)
        if key is not None:
            groups.setdefault(key, []).append(k)
    joint: dict[int, object] = {}
    for members in groups.values():
        if len(members) < 2:
            continue
        fns = [rewards[k].fn for k in members]
        try:
            with torch.no_grad():
                outputs = list(fns[0].score_jointly(fns, frames, list(prompts)))
        except Exception as exc:  # noqa: BLE001 - charged to the group's first reward, as a lone call would be
            outputs = [exc] * len(members)
        joint.update(zip(members, outputs))
    for k, reward in enumerate(rewards):
        if k not in joint:
            yield _call(reward, frames, prompts, step)
            continue
        if isinstance(joint[k], BaseException):
            _raise_reward_error(reward, frames, prompts, step, joint[k])
        yield joint[k]


def _call(reward: Reward, frames: torch.Tensor, prompts: list[str], step: int) -> object:
    """``reward.fn`` on the batch; any exception becomes a :class:`RewardError` naming the prompt that
    reproduces it alone."""
    try:
        with torch.no_grad():
            raw = reward.fn(frames, list(prompts))   # a copy per reward: no reward sees another's edits
    except Exception as exc:  # noqa: BLE001 - every failure becomes a RewardError naming the reward
        _raise_reward_error(reward, frames, prompts, step, exc)
    return raw


def _raise_reward_error(reward: Reward, frames: torch.Tensor, prompts: list[str], step: int,
                        exc: BaseException) -> None:
    if isinstance(exc, RewardCallError):   # the reward located the failure itself (or says none can be)
        index = exc.index if exc.index is not None and 0 <= exc.index < len(prompts) else None
    else:
        index = _localise_failure(reward, frames, prompts)
    raise RewardError(reward.name, None if index is None else prompts[index], step, exc, index) from exc


def _checked_scores(name: str, raw: object, prompts: list[str], step: int) -> torch.Tensor:
    """``raw`` as float32 ``[B]``, or a :class:`RewardError` for a malformed or non-finite output."""
    batch = len(prompts)
    try:
        scores = _as_scores(raw, batch)
    except (TypeError, ValueError) as exc:   # the output as a whole is malformed: no prompt to blame
        raise RewardError(name, None, step, exc) from exc
    bad = (~torch.isfinite(scores)) | (scores.abs() > torch.finfo(torch.float32).max)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        cause = ValueError(f"returned a non-finite score {scores[i].item()!r} for sample {i} "
                           f"({int(bad.sum())} of {batch} samples non-finite)")
        raise RewardError(name, prompts[i], step, cause, i)
    return scores.to(torch.float32)


def _check_values(frames: torch.Tensor, prompts: list[str], step: int) -> None:
    # One pass over the batch: min/max propagate NaN and reach ±Inf, so only a failing batch pays for
    # the per-sample search.
    lo, hi = (float(v) for v in torch.aminmax(frames.detach()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        finite = torch.isfinite(frames.detach()).flatten(1).all(dim=1)
        i = int((~finite).nonzero()[0, 0])
        raise ValueError(f"score_rewards: frames of sample {i} (prompt {prompts[i]!r}) contain NaN/Inf "
                         f"at step {step}: the decoder or the sampler diverged before any reward ran")
    if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
        raise ValueError(f"score_rewards: frames: expected values in [0, 1] (decoded pixels), got "
                         f"[{lo:.4g}, {hi:.4g}]; map [-1, 1] decoder outputs with (x / 2 + 0.5).clamp(0, 1)")


def _localise_failure(reward: Reward, frames: torch.Tensor, prompts: list[str]) -> int | None:
    """Index of the first sample whose single-sample call also raises (or scores NaN/Inf), else ``None``."""
    if frames.shape[0] == 1:
        return 0
    for i in range(frames.shape[0]):
        try:
            with torch.no_grad():
                raw = reward.fn(frames[i:i + 1], [prompts[i]])
        except Exception:  # noqa: BLE001 - we are only looking for the sample that reproduces it
            return i
        try:
            value = float(_as_scores(raw, 1)[0])
        except (TypeError, ValueError):
            continue
        if not math.isfinite(value):
            return i
    return None

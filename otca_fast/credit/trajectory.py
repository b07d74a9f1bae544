"""TCD — trajectory-level credit decomposition: which denoising step moved the sample toward its end.

For a trajectory x_T … x_0 stored noise → data as ``latents[n, j]``, j = 0 … T (j = T is the final
latent), the score of a state is its cosine with the trajectory's own final latent,

    s_j = cos(x_j, x_final)                       (s_T = 1),

the *gain* of the transition j → j+1 (the step whose log-prob the policy gradient trains) is
g_j = s_{j+1} − s_j, and the credit is

    w̃_j = max(g_j, 0) + ε,      w_j = T · w̃_j / Σ_t w̃_t   (``normalize="mean"``: rows average 1)
                                 w_j =     w̃_j / Σ_t w̃_t   (``normalize="sum"``:  rows sum to 1).

The clamp says a step that moved *away* from the final sample earned nothing; ε keeps every step
trainable. ``source="x0_pred"`` scores the model's predicted clean latents x̂0_j instead of the
noisy states (CoCA's choice: x̂0 is a denoised guess, so its cosine is informative already at the
first, high-noise steps where cos(x_j, x_final) ≈ 0); ``per_frame=True`` takes the cosine per video
frame and averages, so every frame counts equally whatever its norm.

The cosines come from one streaming reduction per state (``kernels/trajectory_credit.py`` on CUDA
or under ``TRITON_INTERPRET=1``, ``otca_fast.reference.trajectory_cosines`` otherwise): the
trajectory is never copied to float32 as a whole.
"""

from __future__ import annotations

import torch

from otca_fast import checks, ops, reference
from otca_fast.credit.config import NORMALIZE, SOURCES


def state_cosines(latents: torch.Tensor, *, source: str = "latent", x0_preds: torch.Tensor | None = None,
                  per_frame: bool = False, frame_dim: int = 1) -> torch.Tensor:
    """s ``[N, T+1]``: cos(state_j, final latent) for the T scored states and the final one (s_T = 1).

    ``latents`` ``[N, T+1, ...]`` noise → data; with ``source="x0_pred"`` the T scored states are
    ``x0_preds`` ``[N, T, ...]`` (x̂0 predicted at states 0 … T−1) and only ``latents[:, -1]`` is read.
    Float32 (float64 for float64 inputs).
    """
    checks.float_tensor("latents", latents, min_dim=3)
    n, t_plus_1 = latents.shape[:2]
    if t_plus_1 < 2:
        raise ValueError(f"latents: expected [N, T+1, ...] with T >= 1 (at least two states), got shape "
                         f"{tuple(latents.shape)}")
    state_shape = tuple(latents.shape[2:])
    checks.choice("source", source, SOURCES)
    checks.boolean("per_frame", per_frame)
    if per_frame:
        if isinstance(frame_dim, bool) or not isinstance(frame_dim, int):
            raise TypeError(f"frame_dim: expected an int, got {frame_dim!r}")
        if not 0 <= frame_dim < len(state_shape):
            raise ValueError(f"frame_dim: expected an axis of one state {state_shape} (0 <= frame_dim < "
                             f"{len(state_shape)}), got {frame_dim}")
    if source == "x0_pred":
        if x0_preds is None:
            raise ValueError("x0_preds: source='x0_pred' needs the predicted clean latents [N, T, ...], "
                             "got None")
        checks.float_tensor("x0_preds", x0_preds)
        expected = (n, t_plus_1 - 1, *state_shape)
        if tuple(x0_preds.shape) != expected:
            raise ValueError(f"x0_preds: expected shape {expected} ([N, T, ...] for latents of shape "
                             f"{tuple(latents.shape)}), got {tuple(x0_preds.shape)}")
        if x0_preds.device != latents.device:
            raise ValueError(f"x0_preds: expected device {latents.device} (the device of latents), got "
                             f"{x0_preds.device}")
        states, states_name = x0_preds, "x0_preds"
    else:
        states, states_name = latents[:, :-1], "latents"
    final = latents[:, -1]
    fd = frame_dim if per_frame else None
    if ops.backend_for(states, final) == "triton":
        from otca_fast.kernels import trajectory_credit as kernel

        cos = kernel.trajectory_cosines(states, final, frame_dim=fd)
    else:
        cos = reference.trajectory_cosines(states, final, frame_dim=fd)
    # NaN/inf anywhere in a state makes its cosine non-finite (checked here, on [N, T+1] numbers,
    # rather than on the latents themselves, which would cost a second pass over the trajectory)
    bad_final = ~torch.isfinite(cos[:, -1])
    if bool(bad_final.any()):
        i = int(bad_final.nonzero()[0, 0])
        raise ValueError(f"latents: expected finite values; the final latent latents[{i}, -1] has a NaN/inf "
                         f"(its self-cosine is {float(cos[i, -1])})")
    bad = ~torch.isfinite(cos)
    if bool(bad.any()):
        i, j = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"{states_name}: expected finite values; the cosine of sample {i}, state {j} is "
                         f"{float(cos[i, j])}: a NaN/inf in {states_name}[{i}, {j}]")
    return cos


def tcd_weights(cosines: torch.Tensor, *, eps: float = 1e-3, normalize: str = "mean") -> torch.Tensor:
    """w ``[N, T]`` from the state cosines s ``[N, T+1]``: normalised max(s_{j+1} − s_j, 0) + ε."""
    checks.float_tensor("cosines", cosines, dim=2)
    if cosines.shape[1] < 2:
        raise ValueError(f"cosines: expected [N, T+1] with T >= 1, got shape {tuple(cosines.shape)}")
    eps = checks.finite_number("eps", eps)
    if eps <= 0:
        raise ValueError(f"eps: expected a value > 0 (the floor that keeps every step trainable), got {eps}")
    checks.choice("normalize", normalize, NORMALIZE)
    gain = cosines[:, 1:] - cosines[:, :-1]
    w = gain.clamp_min(0.0) + eps
    w = w / w.sum(1, keepdim=True)
    return w * gain.shape[1] if normalize == "mean" else w


def trajectory_credit(latents: torch.Tensor, *, eps: float = 1e-3, normalize: str = "mean",
                      source: str = "latent", x0_preds: torch.Tensor | None = None, per_frame: bool = False,
                      frame_dim: int = 1) -> torch.Tensor:
    """TCD step credit w ``[N, T]``; ``w[n, t]`` credits the transition from state t to t+1.

    ``latents`` ``[N, T+1, ...]`` ordered noise → data (x_T … x_0), any float dtype (bf16 video
    latents are read as-is, never upcast as a whole). ``eps`` is the floor ε of
    w̃ = max(s_{t+1} − s_t, 0) + ε; ``normalize="mean"`` scales each row to mean 1, ``"sum"`` to
    sum 1. ``source="x0_pred"`` scores ``x0_preds`` ``[N, T, ...]`` (x̂0 at states 0 … T−1) instead
    of the noisy states. ``per_frame=True`` averages per-frame cosines over axis ``frame_dim`` of a
    state (1 for ``[C, F, H, W]`` video latents). Returns float32 (float64 for float64 latents).
    """
    cos = state_cosines(latents, source=source, x0_preds=x0_preds, per_frame=per_frame, frame_dim=frame_dim)
    return tcd_weights(cos, eps=eps, normalize=normalize)


def coca_suffix_credit(cosines: torch.Tensor, *, window: int = 1) -> torch.Tensor:
    """CoCA's per-step credit ``[N, T]``: suffix sums of the normalised cosine gains.

    CoCA (Lil-Shake/CoCA, ``pipeline_with_logprob_coca.py`` and ``train_coca.py``): with s the
    cosines of x̂0_0 … x̂0_{T−1} and of the final latent, group the T scores s_1 … s_T into windows
    of ``window`` steps and average each (m_i); the gains are g_0 = m_0 − s_0, g_i = m_i − m_{i−1},
    normalised to sum to 1 (g_i / (Σ g · window)) and repeated over their window; the credit of
    step t is the suffix sum Σ_{u ≥ t} g_u (1 at the first step, only the last gain at the last).
    The gains telescope, Σ g = m_last − s_0, so the normalisation divides by the total progress;
    a trajectory with no total progress (Σ g ≤ 0: its start is already at least as close to the
    end as the end of its last window) has no direction to share out, and gets equal gains 1/T.
    """
    checks.float_tensor("cosines", cosines, dim=2)
    n, t_plus_1 = cosines.shape
    steps = t_plus_1 - 1
    checks.int_at_least("coca_window", window, 1)
    if steps % window != 0:
        raise ValueError(f"coca_window: expected a divisor of T = {steps} (CoCA averages whole windows), "
                         f"got {window}")
    m = cosines[:, 1:].reshape(n, steps // window, window).mean(2)
    prev = torch.cat([cosines[:, :1], m[:, :-1]], dim=1)
    gain = m - prev
    total = gain.sum(1, keepdim=True)
    moved = total > 0
    gain = torch.where(moved, gain / torch.where(moved, total, torch.ones_like(total)) / window,
                       torch.full_like(gain, 1.0 / steps))
    per_step = gain.repeat_interleave(window, dim=1)
    return per_step.flip(1).cumsum(1).flip(1)

"""TCD: the cosine kernel against its float64 reference, hand-computed credit, properties and errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from otca_fast import credit, reference
from otca_fast.credit import coca_suffix_credit, state_cosines, tcd_weights, trajectory_credit
from otca_fast.kernels import trajectory_credit as kernel
from otca_fast.ops import forced_backend as backend

SETTINGS = settings(max_examples=25, derandomize=True, deadline=None)




def random_trajectory(n=3, steps=4, state=(3, 5, 2, 7), dtype=torch.float64, seed=0):
    """A trajectory drifting from noise toward a random end point, so the cosines actually rise."""
    g = torch.Generator().manual_seed(seed)
    end = torch.randn(n, *state, generator=g, dtype=torch.float64)
    noise = torch.randn(n, *state, generator=g, dtype=torch.float64)
    t = torch.linspace(0, 1, steps + 1, dtype=torch.float64).view(1, -1, *([1] * len(state)))
    lat = (1 - t) * noise[:, None] + t * end[:, None] + 0.3 * torch.randn(n, steps + 1, *state, generator=g,
                                                                           dtype=torch.float64)
    lat[:, -1] = end
    return lat.to(dtype)


# ---------------------------------------------------------------------------------------------------
# the kernel against the reference
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("frame_dim", [None, 0, 1, 3])
@pytest.mark.parametrize("block", [None, 16])
def test_kernel_matches_reference_float64(frame_dim, block, poison_outputs):
    # odd sizes: 3 x 5 x 2 x 7 = 210 elements, per frame 42..105: ragged last tiles at block 16
    lat = random_trajectory(seed=1)
    out = kernel.trajectory_cosines(lat[:, :-1], lat[:, -1], frame_dim=frame_dim, block=block)
    ref = reference.trajectory_cosines(lat[:, :-1], lat[:, -1], frame_dim=frame_dim)
    assert out.dtype == torch.float64 and out.shape == (3, 5)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernel_low_precision_accumulates_in_float32(dtype, poison_outputs):
    lat = random_trajectory(n=2, steps=3, state=(4, 3, 3, 5), seed=2).to(dtype)
    out = kernel.trajectory_cosines(lat[:, :-1], lat[:, -1], frame_dim=1, block=16)
    # reference in float64 on the very same (rounded) values
    ref = reference.trajectory_cosines(lat[:, :-1].double(), lat[:, -1].double(), frame_dim=1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_kernel_reads_strided_views_and_x0_preds(poison_outputs):
    # states in a bigger buffer (non-contiguous over N and S), final from another tensor, mixed dtypes
    buf = random_trajectory(n=2, steps=6, state=(2, 3, 5), seed=3)
    states = buf[:, 1:6:2]  # stride 2 along the state axis
    final = random_trajectory(n=2, steps=1, state=(2, 3, 5), seed=4)[:, -1].float()
    assert not states.is_contiguous()
    out = kernel.trajectory_cosines(states, final, block=16)
    ref = reference.trajectory_cosines(states, final.double())
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)


def test_kernel_is_bit_deterministic(poison_outputs):
    # fixed-order partials and finalize, no atomics: the same inputs give the same bits
    lat = random_trajectory(n=2, steps=3, state=(3, 4, 5), dtype=torch.float32, seed=12)
    first = kernel.trajectory_cosines(lat[:, :-1], lat[:, -1], frame_dim=1, block=16)
    second = kernel.trajectory_cosines(lat[:, :-1], lat[:, -1], frame_dim=1, block=16)
    assert torch.equal(first, second)


def test_zero_vectors_have_cosine_zero(poison_outputs):
    lat = random_trajectory(n=2, steps=2, state=(4, 4), seed=5)
    lat[0, 1] = 0.0  # a zero state
    lat[1, -1] = 0.0  # a zero final latent: every cosine of that sample is 0
    out = kernel.trajectory_cosines(lat[:, :-1], lat[:, -1], block=16)
    ref = reference.trajectory_cosines(lat[:, :-1], lat[:, -1])
    torch.testing.assert_close(out, ref)
    assert out[0, 1] == 0 and out[0, -1] == 1
    assert torch.equal(out[1], torch.zeros(3, dtype=out.dtype))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_on_cuda_bf16_video():
    lat = random_trajectory(n=2, steps=5, state=(16, 5, 30, 52), seed=6).to("cuda", torch.bfloat16)
    for frame_dim in (None, 1):
        out = kernel.trajectory_cosines(lat[:, :-1], lat[:, -1], frame_dim=frame_dim)
        ref = reference.trajectory_cosines(lat[:, :-1].double(), lat[:, -1].double(), frame_dim=frame_dim)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_cpu_backend_is_the_reference_and_agrees_with_the_kernel():
    lat = random_trajectory(n=2, steps=4, state=(3, 4, 5), dtype=torch.float32, seed=7)
    with backend("reference"):
        ref = trajectory_credit(lat, per_frame=True)
    with backend("triton"):
        tri = trajectory_credit(lat, per_frame=True)
    torch.testing.assert_close(tri, ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# hand-computed credit
# ---------------------------------------------------------------------------------------------------

def test_hand_computed_tcd():
    # states (noise -> data): (1, 1), (1, 0), (0, 1) and the final (0, 1)
    lat = torch.tensor([[[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]], dtype=torch.float64)
    s = state_cosines(lat)
    torch.testing.assert_close(s, torch.tensor([[1 / math.sqrt(2), 0.0, 1.0, 1.0]], dtype=torch.float64))
    # gains -0.7071 (moved away: clamped to 0), 1, 0  ->  w~ = eps, 1 + eps, eps
    eps = 0.1
    w_tilde = torch.tensor([[eps, 1 + eps, eps]], dtype=torch.float64)
    torch.testing.assert_close(trajectory_credit(lat, eps=eps), 3 * w_tilde / 1.3)
    torch.testing.assert_close(trajectory_credit(lat, eps=eps, normalize="sum"), w_tilde / 1.3)


def test_hand_computed_per_frame():
    # one state [C=1, F=2, W=2]: frame 0 agrees with the final frame, frame 1 is orthogonal to it
    final = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]], dtype=torch.float64)
    state = torch.tensor([[[1.0, 0.0], [3.0, 0.0]]], dtype=torch.float64)
    lat = torch.stack([state, final])[None]  # [N=1, T+1=2, 1, 2, 2]
    flat = state_cosines(lat)
    per_frame = state_cosines(lat, per_frame=True, frame_dim=1)
    # <s, f> = 1 and both norms are sqrt(10)
    torch.testing.assert_close(flat[0, 0], torch.tensor(0.1, dtype=torch.float64))
    torch.testing.assert_close(per_frame[0, 0], torch.tensor(0.5, dtype=torch.float64))  # mean(1, 0)


def test_x0_pred_source_reads_only_x0_preds_and_the_final_latent():
    lat = random_trajectory(n=2, steps=3, state=(2, 6), seed=8)
    x0 = random_trajectory(n=2, steps=2, state=(2, 6), seed=9)
    poisoned = lat.clone()
    poisoned[:, :-1] = float("nan")  # the noisy states are never read with source="x0_pred"
    w = trajectory_credit(poisoned, source="x0_pred", x0_preds=x0)
    s = torch.stack([torch.nn.functional.cosine_similarity(x0[:, j].flatten(1), lat[:, -1].flatten(1), dim=1)
                     for j in range(3)] + [torch.ones(2, dtype=torch.float64)], 1)
    expected = tcd_weights(s, eps=1e-3)
    torch.testing.assert_close(w, expected)


def test_coca_suffix_hand_computed():
    s = torch.tensor([[0.0, 0.5, 0.25, 1.0]], dtype=torch.float64)
    # gains 0.5, -0.25, 0.75 (sum 1): suffix sums 1, 0.5, 0.75
    torch.testing.assert_close(coca_suffix_credit(s), torch.tensor([[1.0, 0.5, 0.75]], dtype=torch.float64))
    # CoCA windows of 2: means 0.3, 0.8 -> gains 0.3, 0.5 / (0.8 * 2) per step
    s = torch.tensor([[0.0, 0.2, 0.4, 0.6, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(coca_suffix_credit(s, window=2),
                               torch.tensor([[1.0, 0.8125, 0.625, 0.3125]], dtype=torch.float64))
    # a trajectory that already starts at its end has no progress to share: equal gains
    flat = torch.ones(1, 5, dtype=torch.float64)
    torch.testing.assert_close(coca_suffix_credit(flat),
                               torch.tensor([[1.0, 0.75, 0.5, 0.25]], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------
# properties (pure torch: tcd_weights is what both backends feed)
# ---------------------------------------------------------------------------------------------------

@SETTINGS
@given(cos=st.lists(st.lists(st.floats(-1, 1), min_size=3, max_size=9), min_size=1, max_size=4),
       eps=st.floats(1e-4, 0.5))
def test_normalisation_and_eps_floor(cos, eps):
    width = min(len(r) for r in cos)
    s = torch.tensor([r[:width] for r in cos], dtype=torch.float64)
    steps = width - 1
    w_mean = tcd_weights(s, eps=eps)
    w_sum = tcd_weights(s, eps=eps, normalize="sum")
    torch.testing.assert_close(w_mean.mean(1), torch.ones(s.shape[0], dtype=torch.float64))
    torch.testing.assert_close(w_sum.sum(1), torch.ones(s.shape[0], dtype=torch.float64))
    torch.testing.assert_close(w_mean, w_sum * steps)
    # every step keeps at least eps of the un-normalised mass: w_sum >= eps / sum(w~)
    gains = (s[:, 1:] - s[:, :-1]).clamp_min(0)
    total = (gains + eps).sum(1, keepdim=True)
    assert bool((w_sum >= eps / total - 1e-12).all())
    # a step that moved away from the final latent gets exactly the floor
    away = (s[:, 1:] - s[:, :-1]) <= 0
    torch.testing.assert_close(w_sum[away], (eps / total).expand_as(w_sum)[away])


@SETTINGS
@given(seed=st.integers(0, 2**16), scale=st.floats(0.01, 100.0))
def test_credit_is_invariant_to_latent_scale(seed, scale):
    lat = random_trajectory(n=2, steps=3, state=(2, 3, 4), seed=seed)
    with backend("reference"):
        scaled = trajectory_credit(lat * scale, per_frame=True)
        torch.testing.assert_close(scaled, trajectory_credit(lat, per_frame=True))


# ---------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, match", [
    (lambda lat: trajectory_credit(lat[0, 0]), r"latents: expected at least 3 dims"),
    (lambda lat: trajectory_credit(lat[:, :1]), r"latents: expected \[N, T\+1, \.\.\.\] with T >= 1"),
    (lambda lat: trajectory_credit(lat.long()), r"latents: expected dtype in"),
    (lambda lat: trajectory_credit(lat.numpy()), r"latents: expected a torch.Tensor"),
    (lambda lat: trajectory_credit(lat, normalize="max"), r"normalize: expected one of \('mean', 'sum'\)"),
    (lambda lat: trajectory_credit(lat, eps=0.0), r"eps: expected a value > 0"),
    (lambda lat: trajectory_credit(lat, source="noise"), r"source: expected one of"),
    (lambda lat: trajectory_credit(lat, source="x0_pred"), r"x0_preds: source='x0_pred' needs"),
    (lambda lat: trajectory_credit(lat, source="x0_pred", x0_preds=lat),
     r"x0_preds: expected shape \(2, 3, 4, 5\)"),
    (lambda lat: trajectory_credit(lat, per_frame=True, frame_dim=2),
     r"frame_dim: expected an axis of one state"),
    (lambda lat: trajectory_credit(lat, per_frame=1), r"per_frame: expected a bool"),
])
def test_bad_input_is_rejected(call, match):
    lat = random_trajectory(n=2, steps=3, state=(4, 5), seed=10)
    with pytest.raises((ValueError, TypeError), match=match):
        call(lat)


def test_non_finite_latents_are_reported_with_their_place():
    lat = random_trajectory(n=2, steps=3, state=(4, 5), seed=11)
    lat[1, 2, 0, 3] = float("nan")
    message = r"latents: expected finite values; the cosine of sample 1, state 2 is nan"
    with backend("reference"), pytest.raises(ValueError, match=message):
        trajectory_credit(lat)
    lat = random_trajectory(n=2, steps=3, state=(4, 5), seed=11)
    lat[0, -1, 1, 1] = float("inf")
    with pytest.raises(ValueError, match=r"the final latent latents\[0, -1\] has a NaN/inf"):
        trajectory_credit(lat)


def test_public_names():
    assert set(credit.__all__) >= {"trajectory_credit", "objective_credit", "objective_timing_credit",
                                   "select_timesteps", "build_advantages", "plot_credit", "CreditConfig"}

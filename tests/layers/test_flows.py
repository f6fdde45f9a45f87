"""Amortized planar flow: log-determinants against autograd Jacobians, pyro equivalence, shapes."""

from __future__ import annotations

import math

import pytest
import torch

from probseg.layers import AmortizedPlanarFlow, planar_step

B, FEATURES = 3, 5


def _flow(latent_dim: int, steps: int, seed: int = 0, scale: float = 0.7) -> AmortizedPlanarFlow:
    """A float64 flow whose parameter head is random enough that every step is far from identity."""
    torch.manual_seed(seed)
    flow = AmortizedPlanarFlow(FEATURES, latent_dim, steps).double()
    with torch.no_grad():
        flow.params.weight.normal_(0, scale)
        flow.params.bias.normal_(0, scale)
    return flow


def _set_params(flow: AmortizedPlanarFlow, u: float, w: float, b: float = 0.0) -> None:
    """Make every predicted u equal ``u``, every w equal ``w`` and every bias ``b``, whatever the features."""
    l, k = flow.latent_dim, flow.num_steps
    with torch.no_grad():
        flow.params.weight.zero_()
        bias = torch.tensor([u] * l + [w] * l + [b], dtype=flow.params.bias.dtype).repeat(k)
        flow.params.bias.copy_(bias)


def _autograd_logdets(flow: AmortizedPlanarFlow, features: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sign and log|det| of the Jacobian of z -> z_K for every (b, s), from autograd in float64."""
    b_, s_, l = z.shape
    signs, logabs = torch.empty(b_, s_, dtype=torch.float64), torch.empty(b_, s_, dtype=torch.float64)
    for b in range(b_):
        for s in range(s_):

            def f(v: torch.Tensor, b: int = b) -> torch.Tensor:
                return flow(features[b : b + 1], v.view(1, 1, l))[0].view(l)

            jac = torch.autograd.functional.jacobian(f, z[b, s].detach().double())
            sign, value = torch.linalg.slogdet(jac)
            signs[b, s], logabs[b, s] = sign, value
    return signs, logabs


def _docstring_u_hat(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """u_hat = u + (m(w^T u) - w^T u) w / ||w||^2, m(a) = -1 + log(1 + e^a); the correction is
    dropped where ||w||^2 is below sqrt(tiny), as documented (w is zero in effect there)."""
    wu = (w * u).sum(-1, keepdim=True)
    softplus = wu.clamp_min(0) + torch.log1p(torch.exp(-wu.abs()))  # log(1 + e^a), overflow-free
    m = -1 + softplus.clamp_min(1e-4)  # the documented floor delta
    norm2 = (w * w).sum(-1, keepdim=True)
    if bool((norm2 < torch.finfo(w.dtype).tiny ** 0.5).any()):
        return torch.where(norm2 < torch.finfo(w.dtype).tiny ** 0.5, u, u + (m - wu) * w / norm2)
    return u + (m - wu) * w / norm2


# --- log-determinant against autograd --------------------------------------------------------------


@pytest.mark.parametrize("latent_dim", [2, 3, 6])
@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("num_samples", [1, 4])
def test_log_det_matches_autograd_jacobian(latent_dim: int, steps: int, num_samples: int) -> None:
    flow = _flow(latent_dim, steps, seed=latent_dim * 10 + steps)
    g = torch.Generator().manual_seed(1)
    features = torch.randn(B, FEATURES, generator=g, dtype=torch.float64)
    z = 1.5 * torch.randn(B, num_samples, latent_dim, generator=g, dtype=torch.float64)
    z_k, log_det = flow(features, z)
    assert z_k.shape == (B, num_samples, latent_dim) and log_det.shape == (B, num_samples)
    signs, expected = _autograd_logdets(flow, features, z)
    assert torch.all(signs > 0), "a planar flow with u_hat^T w > -1 has a positive Jacobian determinant"
    torch.testing.assert_close(log_det, expected, rtol=1e-9, atol=1e-9)
    # The flow is not the identity here: the check above is not trivially 0 == 0.
    assert (z_k - z).abs().max() > 1e-2 and log_det.abs().max() > 1e-2


def test_flow_map_matches_docstring_composition() -> None:
    """z_K is the composition of f(z) = z + u_hat tanh(w^T z + b) with the step parameters, written out."""
    flow = _flow(3, 2, seed=7)
    g = torch.Generator().manual_seed(2)
    features = torch.randn(B, FEATURES, generator=g, dtype=torch.float64)
    z = torch.randn(B, 4, 3, generator=g, dtype=torch.float64)
    expected = z.clone()
    for u, w, b in flow.step_parameters(features):
        u_hat = _docstring_u_hat(u, w)
        act = torch.tanh((expected * w[:, None, :]).sum(-1) + b[:, None])
        expected = expected + u_hat[:, None, :] * act[..., None]
    torch.testing.assert_close(flow(features, z)[0], expected, rtol=1e-7, atol=1e-9)


# --- adversarial parameters ------------------------------------------------------------------------


@pytest.mark.parametrize("latent_dim", [2, 3, 6])
@pytest.mark.parametrize(
    ("u", "w", "b"),
    [(1e3, 1e-6, 0.0), (-1e3, 1e-6, 0.3), (1e3, 0.0, 0.5), (-1e3, 0.0, -0.2), (1e3, 1e-3, 0.0), (1e3, 1.0, 0.1)],
)
def test_adversarial_parameters_stay_finite_and_exact(latent_dim: int, u: float, w: float, b: float) -> None:
    flow = _flow(latent_dim, 2)
    _set_params(flow, u, w, b)
    g = torch.Generator().manual_seed(3)
    features = torch.randn(B, FEATURES, generator=g, dtype=torch.float64)
    z = torch.randn(B, 3, latent_dim, generator=g, dtype=torch.float64)
    z_k, log_det = flow(features, z)
    assert torch.isfinite(z_k).all() and torch.isfinite(log_det).all()
    for uu, ww, _ in flow.step_parameters(features):
        assert torch.all((_docstring_u_hat(uu, ww) * ww).sum(-1) > -1)
    signs, expected = _autograd_logdets(flow, features, z)
    assert torch.all(signs > 0)
    torch.testing.assert_close(log_det, expected, rtol=1e-6, atol=1e-6)
    # float32 stays finite too.
    z32, ld32 = flow.float()(features.float(), z.float())
    assert torch.isfinite(z32).all() and torch.isfinite(ld32).all()


def test_saturated_negative_wu_stays_finite() -> None:
    """w^T u = -1000 L: outputs and log-dets must still be finite (no NaN/Inf).

    Exactness is checked by test_large_negative_wu_keeps_invertibility.
    """
    flow = _flow(3, 2)
    _set_params(flow, -1e3, 1.0, 0.1)
    g = torch.Generator().manual_seed(4)
    features = torch.randn(B, FEATURES, generator=g, dtype=torch.float64)
    z = torch.randn(B, 3, 3, generator=g, dtype=torch.float64)
    z_k, log_det = flow(features, z)
    assert torch.isfinite(z_k).all() and torch.isfinite(log_det).all()
    z32, ld32 = flow.float()(features.float(), z.float())
    assert torch.isfinite(z32).all() and torch.isfinite(ld32).all()


def test_exactly_zero_w_is_a_translation_with_zero_log_det() -> None:
    flow = _flow(3, 2)
    _set_params(flow, 1e3, 0.0, 0.5)
    features = torch.randn(B, FEATURES, dtype=torch.float64)
    z = torch.randn(B, 4, 3, dtype=torch.float64)
    z_k, log_det = flow(features, z)
    # w = 0: u_hat = u, so each step adds u tanh(b).
    torch.testing.assert_close(z_k, z + 2 * 1e3 * math.tanh(0.5))
    torch.testing.assert_close(log_det, torch.zeros(B, 4, dtype=torch.float64))


@pytest.mark.parametrize(
    ("latent_dim", "u", "w"),
    [
        (2, -1e4, 1e-3),  # w^T u = -20, ||w||^2 = 2e-6: u_hat^T w = -1.10, det J < 0
        (6, -1e3, 1e-3),  # w^T u = -6, ||w||^2 = 6e-6: u_hat^T w = -1.006, det J < 0
        (3, -1e3, 1.0),  # w^T u = -3000, ||w||^2 = 3: u_hat^T w = -1 - 1e-5 (2999 * eps / 3)
    ],
)
def test_large_negative_wu_keeps_invertibility(latent_dim: int, u: float, w: float) -> None:
    flow = _flow(latent_dim, 1)
    _set_params(flow, u, w, 0.0)
    features = torch.randn(B, FEATURES, dtype=torch.float64)
    for uu, ww, _ in flow.step_parameters(features):
        # u_hat from the docstring formula
        assert torch.all((_docstring_u_hat(uu, ww) * ww).sum(-1) > -1)
    z = 0.1 * torch.randn(B, 2, latent_dim, dtype=torch.float64)
    _, log_det = flow(features, z)
    signs, expected = _autograd_logdets(flow, features, z)
    assert torch.all(signs > 0)
    torch.testing.assert_close(log_det, expected, rtol=1e-6, atol=1e-6)


# --- pyro's ConditionedPlanar ----------------------------------------------------------------------


@pytest.mark.parametrize("latent_dim", [2, 3, 6])
def test_planar_step_matches_pyro(latent_dim: int) -> None:
    from pyro.distributions.transforms.planar import ConditionedPlanar

    g = torch.Generator().manual_seed(latent_dim)
    s = 5
    z = 2 * torch.randn(B, s, latent_dim, generator=g, dtype=torch.float64)
    u = 2 * torch.randn(B, latent_dim, generator=g, dtype=torch.float64)
    w = torch.randn(B, latent_dim, generator=g, dtype=torch.float64)
    b = torch.randn(B, generator=g, dtype=torch.float64)
    # Make one image have w^T u = -3 so the reparameterization matters (u_hat != u).
    u[0] = -3 * w[0] / (w[0] * w[0]).sum()
    out, log_det = planar_step(z, u, w, b)

    def params() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return b[:, None, None], u[:, None, :], w[:, None, :]

    transform = ConditionedPlanar(params)
    y = transform(z)
    torch.testing.assert_close(out, y, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(log_det, transform.log_abs_det_jacobian(z, y), rtol=1e-6, atol=1e-7)


# --- identity, shapes, errors ----------------------------------------------------------------------


def test_zero_u_and_w_step_is_identity_for_any_bias() -> None:
    """u = 0 (with w = 0, so u_hat = u = 0): f(z) = z and log|det J| = 0 whatever b.

    With u = 0 but w != 0 the step is NOT the identity: u_hat = (m(0) - 0) w / ||w||^2 = (log 2 - 1) w / ||w||^2.
    """
    z = torch.randn(B, 4, 3, dtype=torch.float64)
    zeros = torch.zeros(B, 3, dtype=torch.float64)
    out, log_det = planar_step(z, zeros, zeros, torch.randn(B, dtype=torch.float64))
    torch.testing.assert_close(out, z, rtol=0, atol=0)
    torch.testing.assert_close(log_det, torch.zeros(B, 4, dtype=torch.float64), rtol=0, atol=0)


def test_all_zero_parameters_are_identity() -> None:
    flow = _flow(3, 2)
    with torch.no_grad():
        flow.params.weight.zero_()
        flow.params.bias.zero_()
    features = torch.randn(B, FEATURES, dtype=torch.float64)
    z = torch.randn(B, 4, 3, dtype=torch.float64)
    z_k, log_det = flow(features, z)
    torch.testing.assert_close(z_k, z, rtol=0, atol=0)
    torch.testing.assert_close(log_det, torch.zeros(B, 4, dtype=torch.float64), rtol=0, atol=0)


def test_single_sample_shape() -> None:
    flow = _flow(3, 2)
    features = torch.randn(B, FEATURES, dtype=torch.float64)
    z = torch.randn(B, 3, dtype=torch.float64)
    z_k, log_det = flow(features, z)
    assert z_k.shape == (B, 3) and log_det.shape == (B,)
    z_set, ld_set = flow(features, z[:, None])
    torch.testing.assert_close(z_k, z_set[:, 0])
    torch.testing.assert_close(log_det, ld_set[:, 0])


@pytest.mark.parametrize("shape", [(B, 4), (B + 1, 3), (B + 1, 2, 3), (B, 2, 4), (3,), (B, 1, 2, 3)])
def test_bad_z_shape_raises(shape: tuple[int, ...]) -> None:
    flow = _flow(3, 2)
    with pytest.raises(ValueError):
        flow(torch.randn(B, FEATURES, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64))


@pytest.mark.parametrize("steps", [0, -1])
def test_num_steps_below_one_raises(steps: int) -> None:
    with pytest.raises(ValueError):
        AmortizedPlanarFlow(FEATURES, 3, steps)

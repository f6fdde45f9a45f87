"""Prior / posterior Gaussian encoders and ``sample_set``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Independent, Normal

from probseg.layers import GaussianEncoder, PosteriorEncoder, PriorEncoder
from probseg.layers.gaussian import sample_set
from tests.tolerances import assert_same_kernels

FILTERS = [4, 8, 8]
L = 3


def _prior(in_channels: int = 1, bound: float = 10.0) -> PriorEncoder:
    torch.manual_seed(0)
    return PriorEncoder(in_channels, FILTERS, 1, L, log_sigma_bound=bound)


def _posterior(num_classes: int = 2) -> PosteriorEncoder:
    torch.manual_seed(0)
    return PosteriorEncoder(1, num_classes, FILTERS, 1, L)


def _assert_diag_normal(dist: object, batch: int, latent: int) -> None:
    assert isinstance(dist, Independent)
    assert isinstance(dist.base_dist, Normal)
    assert dist.batch_shape == (batch,)
    assert dist.event_shape == (latent,)


# --- prior ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("in_channels", "batch", "size"), [(1, 1, 32), (3, 4, 32), (2, 2, 64)])
def test_prior_returns_diagonal_normal_with_batch_and_event_shapes(in_channels: int, batch: int, size: int) -> None:
    enc = _prior(in_channels)
    dist = enc(torch.randn(batch, in_channels, size, size))
    _assert_diag_normal(dist, batch, L)
    assert dist.rsample().shape == (batch, L)
    assert dist.log_prob(torch.zeros(batch, L)).shape == (batch,)


def test_prior_backward_gives_finite_gradients_on_every_parameter() -> None:
    enc = _prior()
    with torch.no_grad():  # make the head matter so gradients reach the convolutions visibly
        enc.head.weight.normal_(0, 0.5)
    dist = enc(torch.randn(2, 1, 32, 32))
    loss = dist.rsample().pow(2).sum() + dist.base_dist.scale.sum() + dist.base_dist.loc.sum()
    loss.backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_prior_starts_near_standard_normal() -> None:
    dist = _prior()(torch.randn(2, 1, 32, 32))
    torch.testing.assert_close(dist.base_dist.loc, torch.zeros(2, L), atol=0.05, rtol=0)
    torch.testing.assert_close(dist.base_dist.scale, torch.ones(2, L), atol=0.05, rtol=0)


@pytest.mark.parametrize("scale", [0.0, 1e4, 1e8])
def test_sigma_stays_finite_and_positive_for_extreme_inputs(scale: float) -> None:
    enc = _prior()
    with torch.no_grad():
        enc.head.weight.normal_(0, 10.0)
    x = torch.ones(2, 1, 32, 32) * scale
    x[1] = -x[1]
    dist = enc(x)
    sigma = dist.base_dist.scale
    assert torch.isfinite(sigma).all()
    assert (sigma > 0).all()
    assert (sigma.log().abs() <= enc.log_sigma_bound + 1e-4).all()
    assert torch.isfinite(dist.base_dist.loc).all()
    assert torch.isfinite(dist.log_prob(dist.base_dist.loc)).all()


@pytest.mark.parametrize("bound", [1.0, 3.0, 10.0])
def test_log_sigma_is_soft_clamped_by_scaled_tanh(bound: float) -> None:
    enc = _prior(bound=bound)
    features = torch.randn(5, enc.feature_dim) * 3.0
    with torch.no_grad():
        enc.head.weight.normal_(0, 1.0)
        enc.head.bias.normal_(0, 1.0)
    raw = features @ enc.head.weight.T + enc.head.bias  # the head computed by hand
    mu_ref, raw_log_sigma = raw[:, :L], raw[:, L:]
    dist = enc.distribution(features)
    torch.testing.assert_close(dist.base_dist.loc, mu_ref)
    expected = bound * torch.tanh(raw_log_sigma / bound)
    torch.testing.assert_close(dist.base_dist.scale.log(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bound", [2.0, 10.0])
def test_log_sigma_never_leaves_the_bound_and_keeps_finite_gradients(bound: float) -> None:
    enc = _prior(bound=bound)
    with torch.no_grad():
        enc.head.bias[L:] = torch.tensor([1e6, -1e6, 0.0])
    features = torch.zeros(2, enc.feature_dim, requires_grad=True)
    sigma = enc.distribution(features).base_dist.scale
    log_sigma = sigma.log()
    assert (log_sigma.abs() <= bound + 1e-4).all()
    torch.testing.assert_close(log_sigma[:, 0], torch.full((2,), bound))
    torch.testing.assert_close(log_sigma[:, 1], torch.full((2,), -bound))
    sigma.sum().backward()
    assert torch.isfinite(enc.head.bias.grad).all()
    assert torch.isfinite(features.grad).all()


def test_latent_dim_must_be_positive() -> None:
    with pytest.raises(ValueError, match="latent_dim"):
        GaussianEncoder(1, FILTERS, 1, 0)


def test_prior_rejects_wrong_channels() -> None:
    with pytest.raises(ValueError, match="channel"):
        _prior(1)(torch.randn(1, 2, 32, 32))


# --- posterior --------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [2, 4])
def test_posterior_accepts_ids_and_one_hot_equally(num_classes: int) -> None:
    enc = _posterior(num_classes)
    torch.manual_seed(1)
    image = torch.randn(3, 1, 32, 32)
    ids = torch.randint(num_classes, (3, 32, 32))
    one_hot = torch.zeros(3, num_classes, 32, 32)
    for b in range(3):  # one-hot written by hand, not with F.one_hot
        for k in range(num_classes):
            one_hot[b, k] = (ids[b] == k).float()
    d_ids, d_hot = enc(image, ids), enc(image, one_hot)
    _assert_diag_normal(d_ids, 3, L)
    torch.testing.assert_close(d_ids.base_dist.loc, d_hot.base_dist.loc)
    torch.testing.assert_close(d_ids.base_dist.scale, d_hot.base_dist.scale)


def test_posterior_depends_on_the_mask() -> None:
    enc = _posterior()
    with torch.no_grad():
        enc.head.weight.normal_(0, 1.0)
    image = torch.randn(1, 1, 32, 32)
    a = enc(image, torch.zeros(1, 32, 32, dtype=torch.long)).base_dist.loc
    b = enc(image, torch.ones(1, 32, 32, dtype=torch.long)).base_dist.loc
    assert not torch.allclose(a, b)


def test_posterior_backward_gives_finite_gradients() -> None:
    enc = _posterior()
    with torch.no_grad():
        enc.head.weight.normal_(0, 0.5)
    dist = enc(torch.randn(2, 1, 32, 32), torch.randint(2, (2, 32, 32)))
    (dist.rsample().pow(2).sum() + dist.base_dist.scale.sum()).backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_posterior_float_id_mask_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="integer class ids"):
        _posterior()(torch.randn(2, 1, 32, 32), torch.zeros(2, 32, 32))


@pytest.mark.parametrize(
    "mask_shape",
    [(2, 3, 32, 32), (2, 1, 32, 32), (2, 2, 16, 32), (2, 16, 16), (2, 32), (2, 2, 32, 32, 1)],
    ids=["too-many-classes", "too-few-classes", "wrong-height", "wrong-hw-ids", "2d", "5d"],
)
def test_posterior_mismatched_mask_is_a_value_error(mask_shape: tuple[int, ...]) -> None:
    mask = torch.zeros(mask_shape, dtype=torch.long if len(mask_shape) == 3 else torch.float32)
    with pytest.raises(ValueError, match="does not match image"):
        _posterior(2)(torch.randn(2, 1, 32, 32), mask)


@pytest.mark.parametrize("mask_shape", [(3, 32, 32), (3, 2, 32, 32)], ids=["ids", "one-hot"])
def test_posterior_mask_batch_mismatch_is_a_value_error(mask_shape: tuple[int, ...]) -> None:
    mask = torch.zeros(mask_shape, dtype=torch.long)
    with pytest.raises(ValueError, match="does not match image"):
        _posterior(2)(torch.randn(2, 1, 32, 32), mask)


def test_posterior_out_of_range_class_ids_raise() -> None:
    with pytest.raises((ValueError, RuntimeError)):
        _posterior(2)(torch.randn(1, 1, 32, 32), torch.full((1, 32, 32), 2))


# --- sample_set -------------------------------------------------------------------------------


def _dist(batch: int = 2, latent: int = 3, seed: int = 0) -> Independent:
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(batch, latent, generator=g) * 2
    sigma = torch.rand(batch, latent, generator=g) * 2 + 0.1
    return Independent(Normal(mu, sigma), 1)


@pytest.mark.parametrize(("batch", "num_samples", "latent"), [(1, 1, 1), (2, 5, 3), (4, 16, 6)])
def test_sample_set_shape(batch: int, num_samples: int, latent: int) -> None:
    z = sample_set(_dist(batch, latent), num_samples)
    assert z.shape == (batch, num_samples, latent)


def test_sample_set_is_reproducible_with_a_generator() -> None:
    d = _dist()
    a = sample_set(d, 8, torch.Generator().manual_seed(3))
    b = sample_set(d, 8, torch.Generator().manual_seed(3))
    c = sample_set(d, 8, torch.Generator().manual_seed(4))
    assert_same_kernels(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a[:, 0], a[:, 1])  # the set members differ


def test_sample_set_empirical_moments_match_mu_and_sigma() -> None:
    d = _dist(batch=2, latent=3)
    s = 200_000
    z = sample_set(d, s, torch.Generator().manual_seed(0)).double()
    mu, sigma = d.base_dist.loc.double(), d.base_dist.scale.double()
    # standard errors: mean sigma/sqrt(S); std about sigma/sqrt(2S) for a Normal
    assert ((z.mean(1) - mu).abs() <= 5 * sigma / math.sqrt(s)).all()
    assert ((z.std(1) - sigma).abs() <= 5 * sigma / math.sqrt(2 * s)).all()
    # independence across latent dims (diagonal covariance)
    zc = (z - mu.unsqueeze(1)) / sigma.unsqueeze(1)
    corr = torch.einsum("bsi,bsj->bij", zc, zc) / s
    off = corr - torch.diag_embed(torch.diagonal(corr, dim1=-2, dim2=-1))
    assert off.abs().max() <= 5 / math.sqrt(s)


def test_sample_set_is_reparameterized() -> None:
    mu = torch.randn(2, 3, requires_grad=True)
    sigma = (torch.rand(2, 3) + 0.5).requires_grad_()
    z = sample_set(Independent(Normal(mu, sigma), 1), 7, torch.Generator().manual_seed(0))
    z.sum().backward()
    # d/dmu sum(mu + sigma * eps) = S; d/dsigma = sum of eps = sum((z - mu) / sigma)
    torch.testing.assert_close(mu.grad, torch.full((2, 3), 7.0))
    eps = (z.detach() - mu.detach().unsqueeze(1)) / sigma.detach().unsqueeze(1)
    torch.testing.assert_close(sigma.grad, eps.sum(1))


def test_sample_set_rejects_non_positive_num_samples() -> None:
    with pytest.raises(ValueError, match="num_samples"):
        sample_set(_dist(), 0)


def test_sample_set_mu_and_sigma_line_up_per_image() -> None:
    """Image b's samples follow image b's Normal (no mixing over the batch)."""
    mu = torch.tensor([[100.0, -100.0], [-50.0, 50.0]])
    sigma = torch.tensor([[1e-3, 1e-3], [1e-3, 1e-3]])
    z = sample_set(Independent(Normal(mu, sigma), 1), 4)
    torch.testing.assert_close(z, mu.unsqueeze(1).expand(2, 4, 2), atol=0.05, rtol=0)


def test_posterior_one_hot_helper_matches_manual() -> None:
    enc = _posterior(3)
    ids = torch.randint(3, (2, 8, 8))
    out = enc.mask_channels(ids, torch.zeros(2, 1, 8, 8, dtype=torch.float64))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, F.one_hot(ids, 3).permute(0, 3, 1, 2).double())
    assert (out.sum(1) == 1).all()

"""Stochastic Segmentation Network: draws, likelihood and options against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from torch.distributions import LowRankMultivariateNormal, MultivariateNormal

from probseg.models import MODELS
from probseg.models.ssn import SSNNetwork, low_rank_draws, ssn_log_likelihood
from tests.tolerances import network_tolerance

TINY = {"num_filters": [4, 8], "convs_per_block": 1, "rank": 3, "mc_samples": 4}


def _params(b: int = 2, n: int = 6, r: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(b, n, generator=g, dtype=torch.float64)
    factor = torch.randn(b, n, r, generator=g, dtype=torch.float64)
    diag = torch.rand(b, n, generator=g, dtype=torch.float64) + 0.1
    return loc, factor, diag


def test_draws_replay_the_reparameterization_by_hand() -> None:
    loc, factor, diag = _params()
    draws = low_rank_draws(loc, factor, diag, 5, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    eps_r = torch.randn(2, 5, 2, generator=g, dtype=torch.float64)
    eps_n = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    for b in range(2):
        for s in range(5):
            expected = loc[b] + factor[b] @ eps_r[b, s] + diag[b].sqrt() * eps_n[b, s]
            torch.testing.assert_close(draws[b, s], expected, rtol=0, atol=1e-12)


def test_draws_have_the_low_rank_mean_and_covariance() -> None:
    """Empirical moments of 200k draws against torch's LowRankMultivariateNormal."""
    loc, factor, diag = _params(b=1)
    n = 200_000
    draws = low_rank_draws(loc, factor, diag, n, torch.Generator().manual_seed(0))[0]
    reference = LowRankMultivariateNormal(loc[0], factor[0], diag[0])
    cov = reference.covariance_matrix
    sd = cov.diagonal().sqrt()
    # standard errors: mean sd / sqrt(n); covariance entries about sd_i sd_j sqrt(2 / n)
    assert ((draws.mean(0) - reference.mean).abs() <= 5 * sd / n**0.5).all()
    empirical = torch.cov(draws.T)
    assert ((empirical - cov).abs() <= 5 * torch.outer(sd, sd) * (2 / n) ** 0.5).all()


def test_antithetic_draws_mirror_each_other_about_the_mean() -> None:
    loc, factor, diag = _params()
    draws = low_rank_draws(loc, factor, diag, 6, torch.Generator().manual_seed(1), antithetic=True)
    torch.testing.assert_close(draws[:, :3] + draws[:, 3:], 2 * loc[:, None].expand(-1, 3, -1), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="even"):
        low_rank_draws(loc, factor, diag, 5, antithetic=True)


def test_log_likelihood_matches_a_brute_force_monte_carlo_average() -> None:
    g = torch.Generator().manual_seed(2)
    draws = 3 * torch.randn(2, 5, 3, 4, 4, generator=g, dtype=torch.float64)  # (B, M, K, H, W)
    hard = torch.randint(0, 3, (2, 4, 4), generator=g)
    soft = torch.rand(2, 3, 4, 4, generator=g, dtype=torch.float64).softmax(1)
    x = draws.numpy()
    log_softmax = x - logsumexp(x, axis=2, keepdims=True)
    for target in (hard, soft):
        expected = np.zeros(2)
        for b in range(2):
            per_draw = []
            for m in range(5):
                total = 0.0
                for i in range(4):
                    for j in range(4):
                        if target.ndim == 3:
                            total += log_softmax[b, m, int(target[b, i, j]), i, j]
                        else:
                            total += float((soft[b, :, i, j].numpy() * log_softmax[b, m, :, i, j]).sum())
                per_draw.append(total)
            expected[b] = logsumexp(per_draw) - np.log(5)
        np.testing.assert_allclose(ssn_log_likelihood(draws, target).numpy(), expected, rtol=1e-6)


def test_network_distribution_is_the_dense_normal_of_its_factors() -> None:
    """The flattened (K, H, W) layout of mu, P and D: log-densities of the low-rank Normal equal a
    dense float64 Normal built from P P^T + diag(D)."""
    torch.manual_seed(0)
    net = SSNNetwork(1, 2, [4, 8], 1, rank=3, eps=1e-5, roi="none").double()
    images = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    loc, factor, diag = net.parameters_of(images)
    dense = MultivariateNormal(loc, covariance_matrix=factor @ factor.transpose(1, 2) + torch.diag_embed(diag))
    draws = low_rank_draws(loc, factor, diag, 3, torch.Generator().manual_seed(0)).transpose(0, 1)  # (S, B, N)
    torch.testing.assert_close(net.distribution(images).log_prob(draws), dense.log_prob(draws), rtol=1e-8, atol=1e-8)
    # the factor's rows follow the logits' flattening: row (k, i, j) belongs to logit [k, i, j]
    samples = net.sample(images, 2, torch.Generator().manual_seed(5))
    again = low_rank_draws(loc, factor, diag, 2, torch.Generator().manual_seed(5)).view(2, 2, 2, 8, 8)
    torch.testing.assert_close(samples, again, rtol=0, atol=0)


def test_gini_values_are_the_singular_values_of_the_factor() -> None:
    torch.manual_seed(0)
    model = MODELS["ssn"](**TINY)
    images = torch.rand(2, 1, 16, 16)
    _, factor, _ = model.network.parameters_of(images)
    sigmas = model.prior_sigmas(images)
    assert sigmas.shape == (2, 3)
    for b in range(2):
        expected = np.linalg.svd(factor[b].detach().double().numpy(), compute_uv=False)
        np.testing.assert_allclose(sigmas[b].detach().numpy(), expected, rtol=1e-4, atol=1e-6)


def test_region_of_interest_keeps_the_background_at_its_mean() -> None:
    torch.manual_seed(0)
    model = MODELS["ssn"](**TINY, roi="nonzero")
    images = torch.rand(1, 1, 16, 16) + 0.1
    images[..., :8, :] = 0  # top half outside the region of interest
    with torch.no_grad():
        mean = model.network({"image": images}, None)["logits"]
        samples = model.sample(images, 4, torch.Generator().manual_seed(0))
    spread = (samples - mean[:, None]).abs()
    assert spread[..., :8, :].max() < 0.02  # sqrt(eps) = 3e-3 per logit, a few sigma
    assert spread[..., 8:, :].max() > 0.1
    uniform = torch.zeros(1, 1, 16, 16)  # all background: still finite and positive definite
    assert torch.isfinite(model.network.distribution(uniform).log_prob(torch.zeros(1, 512))).all()


def test_the_likelihood_is_the_only_training_term_and_a_loss_mix_is_refused() -> None:
    torch.manual_seed(0)
    model = MODELS["ssn"](**TINY, fusion="mean").train()
    batch = {"image": torch.rand(2, 1, 16, 16), "masks": torch.randint(0, 2, (2, 3, 16, 16))}
    terms = model.loss_terms(batch, torch.Generator().manual_seed(0))
    assert set(terms) == {"rec_ssn"} and terms["rec_ssn"].requires_grad
    for key, value in (("reconstruction", {"ce": 1.0}), ("loss_options", {"pixel_reduction": "mean"})):
        with pytest.raises(ValueError, match=f"{key} does not apply to the SSN"):
            MODELS["ssn"](**TINY, **{key: value})


def test_each_image_draws_from_its_own_generator() -> None:
    torch.manual_seed(0)
    model = MODELS["ssn"](**TINY).eval()
    images = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        pair = model.sample(images, 3, [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)])
        alone = model.sample(images[1:], 3, [torch.Generator().manual_seed(8)])
    # batch of 2 vs 1 may run other kernels: float32 rounding of the network, and the same draws
    tolerance = network_tolerance(model.network, pair.abs().max().item())
    torch.testing.assert_close(pair[1:], alone, rtol=0, atol=tolerance)
    with torch.no_grad():  # float64: the same comparison at a tight tolerance checks the draws themselves
        model64 = model.double()
        pair = model64.sample(images.double(), 3, [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)])
        alone = model64.sample(images[1:].double(), 3, [torch.Generator().manual_seed(8)])
    torch.testing.assert_close(pair[1:], alone, rtol=0, atol=1e-10)

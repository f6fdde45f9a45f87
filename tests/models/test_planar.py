"""2p-planar: Monte Carlo KL against analytic and independent estimates, loss terms, sampling, config."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import kl_divergence

from probseg.layers.gaussian import sample_set
from probseg.models import PlanarProbUNet
from probseg.models.planar import monte_carlo_kl
from tests.tolerances import assert_same_kernels

SIZE = 32


def _make_model(kwargs: dict, seed: int = 0, flow_scale: float = 0.5, **overrides) -> PlanarProbUNet:
    """Tiny model with perturbed encoder heads (prior != posterior) and a clearly non-identity flow."""
    torch.manual_seed(seed)
    model = PlanarProbUNet(**{**kwargs, **overrides})
    with torch.no_grad():
        for head in (model.network.prior.head, model.network.posterior.head):
            head.weight.normal_(0, 0.3)
            head.bias.normal_(0, 0.3)
        model.network.posterior_flow.params.weight.normal_(0, flow_scale)
        model.network.posterior_flow.params.bias.normal_(0, flow_scale)
    return model


def _batch(b: int = 2, r: int = 3, seed: int = 0, one_rater: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    rater_mask = torch.zeros(b, r, dtype=torch.bool)
    rater_mask[torch.arange(b), torch.arange(b) % r] = True  # exactly one rater per image
    return {
        "image": torch.randn(b, 1, SIZE, SIZE, generator=g),
        "masks": torch.randint(2, (b, r, SIZE, SIZE), generator=g),
        "rater_mask": rater_mask if one_rater else torch.ones(b, r, dtype=torch.bool),
    }


def _target(batch: dict) -> torch.Tensor:
    """The only available rater's mask per image (rater_mask has one True per row)."""
    idx = batch["rater_mask"].float().argmax(1)
    return batch["masks"][torch.arange(len(idx)), idx]


def _log_normal(z: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return (-0.5 * ((z - mu) / sigma) ** 2 - torch.log(sigma) - 0.5 * math.log(2 * math.pi)).sum(-1)


def _planar_map(z: torch.Tensor, steps: list) -> torch.Tensor:
    """z (L,) through the planar steps of ONE image, written out from the flow's docstring (guard eps 1e-8)."""
    for u, w, b in steps:
        wu = (w * u).sum()
        m = -1 + torch.log1p(torch.exp(wu))
        u_hat = u + (m - wu) * w / ((w * w).sum() + 1e-8)
        z = z + u_hat * torch.tanh((w * z).sum() + b)
    return z


# --- Monte Carlo KL ------------------------------------------------------------------------------


def test_identity_flow_monte_carlo_kl_converges_to_analytic(tiny_punet_kwargs: dict) -> None:
    m = 200_000
    model = _make_model(tiny_punet_kwargs)
    with torch.no_grad():
        model.network.posterior_flow.params.weight.zero_()
        model.network.posterior_flow.params.bias.zero_()
    batch = _batch()
    images, target = batch["image"], _target(batch)
    with torch.no_grad():
        q_features = model.network.posterior.features(images, target)
        base, prior = model.network.posterior.distribution(q_features), model.network.prior(images)
        g = torch.Generator().manual_seed(0)
        z0 = sample_set(base, m, g)
        z_k, log_det = model.network.posterior_flow(q_features, z0)
        assert torch.equal(z_k, z0) and torch.all(log_det == 0)
        estimate = monte_carlo_kl(base, z0, log_det, z_k, prior)
        analytic = kl_divergence(base, prior)
        # standard error from the per-sample terms, written out independently
        q, p = base.base_dist, prior.base_dist
        terms = _log_normal(z0, q.loc[:, None], q.scale[:, None]) - _log_normal(z0, p.loc[:, None], p.scale[:, None])
        se = terms.std(1) / math.sqrt(m)
    assert estimate.shape == (2,)
    assert torch.all(analytic > 0.05), "prior and posterior should differ for a meaningful check"
    assert torch.all((estimate - analytic).abs() < 4 * se), (estimate, analytic, se)


def test_loss_terms_kl_with_identity_flow_converges_to_analytic(tiny_punet_kwargs: dict) -> None:
    model = _make_model(tiny_punet_kwargs, beta=2.0, kl_samples=100_000)
    with torch.no_grad():
        model.network.posterior_flow.params.weight.zero_()
        model.network.posterior_flow.params.bias.zero_()
        batch = _batch()
        terms = model.loss_terms(batch, torch.Generator().manual_seed(1))
        analytic = kl_divergence(model.network.posterior(batch["image"], _target(batch)), model.network.prior(batch["image"]))
    # generous: 2.0 * mean of two estimates whose SE is ~1e-2 / sqrt(1e5) relative to KL ~ O(1)
    torch.testing.assert_close(terms["kl"], 2.0 * analytic.mean(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kl_samples", [1, 3])
def test_loss_terms_kl_matches_independent_estimate(tiny_punet_kwargs: dict, kl_samples: int) -> None:
    """Non-identity flow: transform the samples ourselves, log-det from autograd, densities written out."""
    model = _make_model(tiny_punet_kwargs, beta=1.5, kl_samples=kl_samples).double()
    batch = _batch()
    batch["image"] = batch["image"].double()
    g = torch.Generator().manual_seed(5)
    terms = model.loss_terms(batch, g)

    # Replay the generator: rater draw first, then the (B, M, L) latent noise.
    g = torch.Generator().manual_seed(5)
    target = model.training_target(batch, g)
    assert torch.equal(target, _target(batch))
    with torch.no_grad():
        q_features = model.network.posterior.features(batch["image"], target)
        base, prior = model.network.posterior.distribution(q_features), model.network.prior(batch["image"])
        z0 = sample_set(base, kl_samples, g)
        steps = model.network.posterior_flow.step_parameters(q_features)
    per_image = []
    for b in range(z0.shape[0]):
        image_steps = [(u[b], w[b], bb[b]) for u, w, bb in steps]
        values = []
        for s in range(kl_samples):
            z = z0[b, s]
            z_k = _planar_map(z, image_steps)
            jac = torch.autograd.functional.jacobian(lambda v: _planar_map(v, image_steps), z)
            sign, log_det = torch.linalg.slogdet(jac)
            assert sign > 0
            q, p = base.base_dist, prior.base_dist
            log_q0 = _log_normal(z, q.loc[b], q.scale[b])
            log_p = _log_normal(z_k, p.loc[b], p.scale[b])
            values.append(log_q0 - log_det - log_p)
            assert abs(log_det) > 1e-3, "the flow should not be the identity here"
        per_image.append(torch.stack(values).mean())
    expected = 1.5 * torch.stack(per_image).mean()
    torch.testing.assert_close(terms["kl"].detach(), expected, rtol=1e-7, atol=1e-9)
    # and the monte_carlo_kl function itself on those samples, per image
    z_k, log_det = model.network.posterior_flow(q_features, z0)
    torch.testing.assert_close(monte_carlo_kl(base, z0, log_det, z_k, prior).detach(), torch.stack(per_image))


def test_flowed_kl_differs_from_base_kl(tiny_punet_kwargs: dict) -> None:
    """Guard that the flow actually enters the KL estimate."""
    model = _make_model(tiny_punet_kwargs)
    batch = _batch()
    with torch.no_grad():
        q_features = model.network.posterior.features(batch["image"], _target(batch))
        base, prior = model.network.posterior.distribution(q_features), model.network.prior(batch["image"])
        z0 = sample_set(base, 4, torch.Generator().manual_seed(0))
        z_k, log_det = model.network.posterior_flow(q_features, z0)
        flowed = monte_carlo_kl(base, z0, log_det, z_k, prior)
        plain = monte_carlo_kl(base, z0, torch.zeros_like(log_det), z0, prior)
    assert (flowed - plain).abs().max() > 1e-2


# --- loss terms ----------------------------------------------------------------------------------


def test_loss_terms_keys_and_finite(tiny_punet_kwargs: dict) -> None:
    model = _make_model(tiny_punet_kwargs)
    terms = model.loss_terms(_batch(one_rater=False), torch.Generator().manual_seed(0))
    assert set(terms) == {"rec_ce", "kl"}
    assert all(t.ndim == 0 and torch.isfinite(t) for t in terms.values())


def test_kl_scales_with_beta(tiny_punet_kwargs: dict) -> None:
    batch = _batch()
    kl = {}
    for beta in (1.0, 2.5, 0.0):
        model = _make_model(tiny_punet_kwargs, beta=beta, kl_samples=4)
        with torch.no_grad():
            kl[beta] = model.loss_terms(batch, torch.Generator().manual_seed(3))["kl"]
    assert kl[1.0].abs() > 1e-3
    torch.testing.assert_close(kl[2.5], 2.5 * kl[1.0])
    assert kl[0.0] == 0


def test_more_kl_samples_lower_variance(tiny_punet_kwargs: dict) -> None:
    batch = _batch()
    spread = {}
    for m in (1, 32):
        model = _make_model(tiny_punet_kwargs, kl_samples=m)
        with torch.no_grad():
            values = torch.stack([model.loss_terms(batch, torch.Generator().manual_seed(s))["kl"] for s in range(24)])
        spread[m] = values.var()
    assert spread[32] < spread[1] / 4, spread


# --- sampling ignores the posterior flow ---------------------------------------------------------


def test_sample_ignores_posterior_flow(tiny_punet_kwargs: dict) -> None:
    model = _make_model(tiny_punet_kwargs)
    images = _batch()["image"]
    with torch.no_grad():
        before = model.sample(images, 4, torch.Generator().manual_seed(9))
        for p in model.network.posterior_flow.parameters():
            p.add_(torch.randn_like(p))
        after = model.sample(images, 4, torch.Generator().manual_seed(9))
    assert before.shape == (2, 4, 2, SIZE, SIZE)
    assert_same_kernels(before, after)


def test_posterior_flow_perturbation_changes_loss(tiny_punet_kwargs: dict) -> None:
    model = _make_model(tiny_punet_kwargs, kl_samples=2)
    batch = _batch()
    with torch.no_grad():
        before = model.loss_terms(batch, torch.Generator().manual_seed(9))
        for p in model.network.posterior_flow.parameters():
            p.add_(torch.randn_like(p))
        after = model.loss_terms(batch, torch.Generator().manual_seed(9))
    assert not torch.allclose(before["kl"], after["kl"])
    assert not torch.allclose(before["rec_ce"], after["rec_ce"])


# --- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [{"kl_samples": 0}, {"kl_samples": -2}, {"beta": -0.1}])
def test_bad_config_raises(tiny_punet_kwargs: dict, overrides: dict) -> None:
    with pytest.raises(ValueError):
        PlanarProbUNet(**tiny_punet_kwargs, **overrides)

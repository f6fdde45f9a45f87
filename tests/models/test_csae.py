"""cSAE: Sinkhorn divergence against exact optimal transport, loss terms, flow-free sampling, config."""

from __future__ import annotations

import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch.distributions import kl_divergence

from probseg.models import ConditionalSinkhornAutoencoder
from probseg.models.csae import sinkhorn_divergence
from tests.tolerances import assert_same_kernels

SIZE = 32


def _make_model(kwargs: dict, seed: int = 0, **overrides) -> ConditionalSinkhornAutoencoder:
    """Tiny cSAE with perturbed encoder heads (prior != posterior) and clearly non-identity flows."""
    torch.manual_seed(seed)
    model = ConditionalSinkhornAutoencoder(**{"num_ot_samples": 8, **kwargs, **overrides})
    with torch.no_grad():
        for head in (model.network.prior.head, model.network.posterior.head):
            head.weight.normal_(0, 0.3)
            head.bias.normal_(0, 0.3)
        for flow in (model.network.prior_flow, model.network.posterior_flow):
            flow.params.weight.normal_(0, 0.5)
            flow.params.bias.normal_(0, 0.5)
    return model


def _batch(b: int = 2, r: int = 3, seed: int = 0) -> dict:
    """Exactly one available rater per image (a different one for each image)."""
    g = torch.Generator().manual_seed(seed)
    rater_mask = torch.zeros(b, r, dtype=torch.bool)
    rater_mask[torch.arange(b), (torch.arange(b) + 1) % r] = True
    return {
        "image": torch.randn(b, 1, SIZE, SIZE, generator=g),
        "masks": torch.randint(2, (b, r, SIZE, SIZE), generator=g),
        "rater_mask": rater_mask,
    }


def _perturb(*modules: torch.nn.Module, seed: int = 123) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))


# --- Sinkhorn divergence -------------------------------------------------------------------------


def test_sinkhorn_permuting_images_permutes_values() -> None:
    g = torch.Generator().manual_seed(0)
    # images at clearly different scales so the per-image values are distinct
    scale = torch.tensor([0.5, 1.0, 2.0, 3.0])[:, None, None]
    x = scale * torch.randn(4, 8, 2, generator=g)
    y = scale * torch.randn(4, 6, 2, generator=g) + 1.0
    values = sinkhorn_divergence(x, y)
    assert values.shape == (4,)
    assert len(set(values.tolist())) == 4
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(sinkhorn_divergence(x[perm], y[perm]), values[perm], rtol=1e-5, atol=1e-6)
    # and each value is that of its image on its own
    for b in range(4):
        torch.testing.assert_close(sinkhorn_divergence(x[b : b + 1], y[b : b + 1])[0], values[b], rtol=1e-5, atol=1e-6)


def test_sinkhorn_of_identical_clouds_is_zero() -> None:
    x = torch.randn(3, 8, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sinkhorn_divergence(x, x), torch.zeros(3), rtol=0, atol=1e-5)


def test_sinkhorn_small_blur_approaches_half_squared_w2() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 8, 2, generator=g, dtype=torch.float64)
    y = 1.5 * torch.randn(3, 8, 2, generator=g, dtype=torch.float64) + torch.tensor([1.0, -0.5], dtype=torch.float64)
    values = sinkhorn_divergence(x, y, blur=1e-3, scaling=0.9)
    for b in range(3):
        cost = ((x[b, :, None, :] - y[b, None, :, :]) ** 2).sum(-1).numpy()
        rows, cols = linear_sum_assignment(cost)
        w2_squared = cost[rows, cols].mean()
        assert values[b].item() == pytest.approx(w2_squared / 2, rel=2e-2)


def test_sinkhorn_bad_shapes_raise() -> None:
    with pytest.raises(ValueError):
        sinkhorn_divergence(torch.randn(2, 8, 3), torch.randn(3, 8, 3))
    with pytest.raises(ValueError):
        sinkhorn_divergence(torch.randn(2, 8, 3), torch.randn(2, 8, 2))
    with pytest.raises(ValueError):
        sinkhorn_divergence(torch.randn(8, 3), torch.randn(8, 3))


# --- sampling ignores the flows ------------------------------------------------------------------


@pytest.mark.parametrize("reconstruct_from", ["flowed", "base"])
def test_sample_ignores_flows_but_loss_does_not(tiny_punet_kwargs: dict, reconstruct_from: str) -> None:
    model = _make_model(tiny_punet_kwargs, reconstruct_from=reconstruct_from)
    batch = _batch()
    with torch.no_grad():
        samples = model.sample(batch["image"], 4, torch.Generator().manual_seed(7))
        terms = model.loss_terms(batch, torch.Generator().manual_seed(7))
        _perturb(model.network.prior_flow, model.network.posterior_flow)
        samples_after = model.sample(batch["image"], 4, torch.Generator().manual_seed(7))
        terms_after = model.loss_terms(batch, torch.Generator().manual_seed(7))
    assert samples.shape == (2, 4, 2, SIZE, SIZE)
    assert_same_kernels(samples_after, samples)
    if reconstruct_from == "flowed":  # the flowed posterior sample reconstructs
        assert not torch.allclose(terms_after["rec_ce"], terms["rec_ce"])
    else:  # the base sample reconstructs: the flows enter the Sinkhorn term only
        assert_same_kernels(terms_after["rec_ce"], terms["rec_ce"])
    assert not torch.allclose(terms_after["sinkhorn"], terms["sinkhorn"])
    # the KL is between the base Normals: the flows do not enter it
    assert_same_kernels(terms_after["kl"], terms["kl"])


@pytest.mark.parametrize(("flow", "changes"), [("prior_flow", True), ("posterior_flow", False)])
def test_sample_through_prior_flow_uses_only_the_prior_flow(tiny_punet_kwargs: dict, flow: str, changes: bool) -> None:
    model = _make_model(tiny_punet_kwargs, sample_through_prior_flow=True)
    images = _batch()["image"]
    with torch.no_grad():
        samples = model.sample(images, 4, torch.Generator().manual_seed(7))
        _perturb(getattr(model.network, flow))
        samples_after = model.sample(images, 4, torch.Generator().manual_seed(7))
    assert samples.shape == samples_after.shape == (2, 4, 2, SIZE, SIZE)
    if changes:
        assert not torch.allclose(samples_after, samples)
    else:
        assert_same_kernels(samples_after, samples)


# --- loss terms ----------------------------------------------------------------------------------


def test_loss_terms_keys_finite_and_kl_is_base_kl(tiny_punet_kwargs: dict) -> None:
    model = _make_model(tiny_punet_kwargs, beta=3.0)
    batch = _batch()
    with torch.no_grad():
        terms = model.loss_terms(batch, torch.Generator().manual_seed(0))
        target = batch["masks"][torch.arange(2), torch.tensor([1, 2])]  # the only available raters
        expected = kl_divergence(model.network.posterior(batch["image"], target), model.network.prior(batch["image"]))
        other = kl_divergence(model.network.posterior(batch["image"], batch["masks"][:, 0]), model.network.prior(batch["image"]))
    assert set(terms) == {"rec_ce", "kl", "sinkhorn"}
    assert all(t.ndim == 0 and torch.isfinite(t) for t in terms.values())
    assert terms["sinkhorn"] > 0 and terms["rec_ce"] > 0
    torch.testing.assert_close(terms["kl"], 3.0 * expected.mean())
    # the check can tell raters apart
    assert not torch.allclose(3.0 * other.mean(), terms["kl"])


def test_sinkhorn_scales_with_gamma(tiny_punet_kwargs: dict) -> None:
    batch = _batch()
    values = {}
    for gamma in (1.0, 4.0, 0.0):
        model = _make_model(tiny_punet_kwargs, gamma=gamma)
        with torch.no_grad():
            values[gamma] = model.loss_terms(batch, torch.Generator().manual_seed(2))
    assert values[1.0]["sinkhorn"] > 1e-4
    torch.testing.assert_close(values[4.0]["sinkhorn"], 4.0 * values[1.0]["sinkhorn"])
    assert values[0.0]["sinkhorn"] == 0
    for key in ("rec_ce", "kl"):
        torch.testing.assert_close(values[4.0][key], values[1.0][key])


def test_loss_terms_sinkhorn_matches_flowed_samples(tiny_punet_kwargs: dict) -> None:
    """The Sinkhorn term compares each image's flowed posterior cloud with ITS OWN flowed prior cloud."""
    from probseg.layers.gaussian import sample_set

    model = _make_model(tiny_punet_kwargs, gamma=2.0)
    batch = _batch()
    with torch.no_grad():
        terms = model.loss_terms(batch, torch.Generator().manual_seed(4))
        g = torch.Generator().manual_seed(4)
        target = model.training_target(batch, g)
        q_features = model.network.posterior.features(batch["image"], target)
        p_features = model.network.prior.encode(batch["image"])
        zq, _ = model.network.posterior_flow(q_features, sample_set(model.network.posterior.distribution(q_features), 8, g))
        zp, _ = model.network.prior_flow(p_features, sample_set(model.network.prior.distribution(p_features), 8, g))
        per_image = torch.stack([sinkhorn_divergence(zq[b : b + 1], zp[b : b + 1])[0] for b in range(2)])
    torch.testing.assert_close(terms["sinkhorn"], 2.0 * per_image.mean(), rtol=1e-5, atol=1e-6)


# --- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"num_ot_samples": 0},
        {"num_ot_samples": -1},
        {"gamma": -1.0},
        {"beta": -0.5},
        {"sinkhorn_blur": 0.0},
        {"sinkhorn_blur": -0.05},
    ],
)
def test_bad_config_raises(tiny_punet_kwargs: dict, overrides: dict) -> None:
    with pytest.raises(ValueError):
        ConditionalSinkhornAutoencoder(**tiny_punet_kwargs, **overrides)

"""Probabilistic U-Net: KL, loss terms, sampling, reproducibility and a Lightning training run."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch.distributions import Independent, Normal

import probseg.models.punet as punet_module
from probseg.data import SyntheticDataModule
from probseg.models import ProbUNet
from probseg.models.objectives import KLDivergence
from tests.tolerances import assert_same_kernels

SIZE = 32


def _kl(posterior, prior):
    """The PU-Net's KL per image, as its objective computes it."""
    return KLDivergence.estimates({"posterior": posterior, "prior": prior})[0]


def _make_model(kwargs: dict, seed: int = 0, **overrides) -> ProbUNet:
    """A tiny ProbUNet whose encoder heads are perturbed so prior and posterior differ clearly."""
    torch.manual_seed(seed)
    model = ProbUNet(**{**kwargs, **overrides})
    with torch.no_grad():
        for head in (model.network.prior.head, model.network.posterior.head):
            head.weight.normal_(0, 0.3)
            head.bias.normal_(0, 0.3)
    return model


@pytest.fixture
def model(tiny_punet_kwargs: dict) -> ProbUNet:
    return _make_model(tiny_punet_kwargs)


def _batch(b: int = 2, r: int = 3, k: int = 2, c: int = 1, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(b, c, SIZE, SIZE, generator=g),
        "masks": torch.randint(k, (b, r, SIZE, SIZE), generator=g),
        "rater_mask": torch.ones(b, r, dtype=torch.bool),
        "id": [f"img{i}" for i in range(b)],
    }


def _params(mu: torch.Tensor, sigma: torch.Tensor) -> Independent:
    return Independent(Normal(mu, sigma), 1)


def closed_form_kl(mq, sq, mp, sp) -> torch.Tensor:
    """KL(N(mq, sq^2) || N(mp, sp^2)) summed over the last axis, written out."""
    return (torch.log(sp / sq) + (sq**2 + (mq - mp) ** 2) / (2 * sp**2) - 0.5).sum(-1)


def log_normal(z, mu, sigma) -> torch.Tensor:
    return (-0.5 * ((z - mu) / sigma) ** 2 - torch.log(sigma) - 0.5 * math.log(2 * math.pi)).sum(-1)


# --- analytic KL ---------------------------------------------------------------------------------


def _random_pair(seed: int, b: int = 3, latent: int = 4) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    mq = torch.randn(b, latent, generator=g, dtype=torch.float64)
    mp = torch.randn(b, latent, generator=g, dtype=torch.float64)
    sq = torch.rand(b, latent, generator=g, dtype=torch.float64) * 1.5 + 0.3
    sp = torch.rand(b, latent, generator=g, dtype=torch.float64) * 1.5 + 0.3
    return mq, sq, mp, sp


@pytest.mark.parametrize("seed", [0, 1])
def test_kl_matches_monte_carlo_estimate(model: ProbUNet, seed: int) -> None:
    mq, sq, mp, sp = _random_pair(seed)
    analytic = _kl(_params(mq, sq), _params(mp, sp))
    assert analytic.shape == (3,)
    n = 200_000
    g = torch.Generator().manual_seed(seed)
    z = mq + sq * torch.randn(n, *mq.shape, generator=g, dtype=torch.float64)  # z ~ q, (N, B, L)
    diff = log_normal(z, mq, sq) - log_normal(z, mp, sp)  # (N, B)
    mc, se = diff.mean(0), diff.std(0) / math.sqrt(n)
    assert ((analytic - mc).abs() <= 5 * se).all(), (analytic, mc, se)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_matches_closed_form(model: ProbUNet, seed: int) -> None:
    mq, sq, mp, sp = _random_pair(seed, b=5, latent=6)
    torch.testing.assert_close(_kl(_params(mq, sq), _params(mp, sp)), closed_form_kl(mq, sq, mp, sp))


def test_kl_is_zero_for_identical_and_positive_for_different_normals(model: ProbUNet) -> None:
    mq, sq, mp, sp = _random_pair(3)
    torch.testing.assert_close(_kl(_params(mq, sq), _params(mq, sq)), torch.zeros(3, dtype=torch.float64))
    assert (_kl(_params(mq, sq), _params(mp, sp)) > 0).all()
    # KL is not symmetric: the argument order matters (q first)
    assert not torch.allclose(_kl(_params(mq, sq), _params(mp, sp)), _kl(_params(mp, sp), _params(mq, sq)))


# --- loss terms ----------------------------------------------------------------------------------


def test_loss_terms_are_named_scalars(model: ProbUNet) -> None:
    torch.manual_seed(0)
    terms = model.loss_terms(_batch())
    assert set(terms) == {"rec_ce", "kl"}
    for name, value in terms.items():
        assert value.ndim == 0 and torch.isfinite(value), name
    assert terms["rec_ce"] > 0 and terms["kl"] > 0


def test_rec_is_pixel_summed_batch_averaged_cross_entropy_of_the_posterior_sample(
    model: ProbUNet, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = _batch(b=2, r=3)
    # only one rater per image is available, so the target is known: rater 1 for image 0, rater 2 for image 1
    batch["rater_mask"] = torch.tensor([[False, True, False], [False, False, True]])
    target = torch.stack([batch["masks"][0, 1], batch["masks"][1, 2]])
    z = torch.tensor([[0.7, -1.2, 0.3], [-0.4, 0.9, 1.5]])
    calls: list[torch.Tensor] = []

    def fixed_sample_set(dist: Independent, num_samples: int, generator=None) -> torch.Tensor:
        calls.append(dist.base_dist.loc.detach().clone())
        return z[:, None].expand(-1, num_samples, -1)

    monkeypatch.setattr(punet_module, "sample_set", fixed_sample_set)
    terms = model.loss_terms(batch)
    monkeypatch.undo()

    # the sample was drawn once, from the posterior of the chosen rater's mask
    assert len(calls) == 1
    torch.testing.assert_close(calls[0], model.network.posterior(batch["image"], target).base_dist.loc)

    with torch.no_grad():
        logits = model.network.fcomb(model.network.unet(batch["image"]), z).double()  # (B, K, H, W)
    # cross-entropy written out: log sum exp - logit of the true class, per pixel
    log_z = logits.exp().sum(1).log()
    true_logit = torch.where(target == 1, logits[:, 1], logits[:, 0])
    expected = (log_z - true_logit).flatten(1).sum(1).mean()
    torch.testing.assert_close(terms["rec_ce"].double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("beta", [1.0, 0.25, 3.0])
def test_kl_term_is_beta_times_batch_mean_of_closed_form_kl(tiny_punet_kwargs: dict, beta: float) -> None:
    model = _make_model(tiny_punet_kwargs, beta=beta)
    batch = _batch(b=3, r=2)
    batch["rater_mask"] = torch.tensor([[True, False], [False, True], [True, False]])
    target = torch.stack([batch["masks"][0, 0], batch["masks"][1, 1], batch["masks"][2, 0]])
    terms = model.loss_terms(batch)
    with torch.no_grad():
        q, p = model.network.posterior(batch["image"], target), model.network.prior(batch["image"])
    kl = closed_form_kl(q.base_dist.loc, q.base_dist.scale, p.base_dist.loc, p.base_dist.scale)
    assert kl.shape == (3,)
    torch.testing.assert_close(terms["kl"], beta * kl.mean(), rtol=1e-5, atol=1e-6)


def test_kl_term_scales_linearly_with_beta(tiny_punet_kwargs: dict) -> None:
    batch = _batch()
    values = {}
    for beta in (0.0, 1.0, 2.5, 10.0):
        model = _make_model(tiny_punet_kwargs, beta=beta)
        assert model.hparams.beta == beta
        torch.manual_seed(1)  # same rater draw for every beta
        values[beta] = model.loss_terms(batch)["kl"]
    assert values[0.0] == 0
    assert values[1.0] > 0
    torch.testing.assert_close(values[2.5], 2.5 * values[1.0])
    torch.testing.assert_close(values[10.0], 10.0 * values[1.0])


def test_loss_backward_gives_finite_gradients_on_every_parameter(model: ProbUNet) -> None:
    torch.manual_seed(0)
    terms = model.loss_terms(_batch())
    (terms["rec_ce"] + terms["kl"]).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_loss_terms_reproducible_under_manual_seed(model: ProbUNet) -> None:
    batch = _batch(r=4)
    torch.manual_seed(11)
    a = model.loss_terms(batch)
    torch.manual_seed(11)
    b = model.loss_terms(batch)
    for k in a:
        assert_same_kernels(a[k], b[k])


def test_rater_draw_is_reproducible_under_manual_seed(model: ProbUNet) -> None:
    b, r = 64, 4
    masks = torch.arange(r).view(1, r, 1, 1).expand(b, r, 2, 2).clone()  # rater r's mask is all r
    g = torch.Generator().manual_seed(0)
    rater_mask = torch.rand(b, r, generator=g) < 0.6
    rater_mask[:, 3] = True
    batch = {"image": torch.zeros(b, 1, 2, 2), "masks": masks, "rater_mask": rater_mask}
    chosen = {}
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        chosen.setdefault(seed, []).append(model.training_target(batch)[:, 0, 0])
    assert_same_kernels(chosen[5][0], chosen[5][1])
    assert not torch.equal(chosen[5][0], chosen[6][0])
    for c in (chosen[5][0], chosen[6][0]):
        assert rater_mask[torch.arange(b), c].all()


@pytest.mark.parametrize(
    ("batch", "error"),
    [
        ({"image": torch.zeros(2, 1, SIZE, SIZE)}, KeyError),
        ({"image": torch.zeros(2, 3, SIZE, SIZE), "masks": torch.zeros(2, 1, SIZE, SIZE, dtype=torch.long)}, ValueError),
        ({"image": torch.zeros(2, 1, SIZE, SIZE), "masks": torch.zeros(2, SIZE, SIZE, dtype=torch.long)}, ValueError),
        ({"image": torch.zeros(2, 1, SIZE, SIZE), "masks": torch.zeros(3, 1, SIZE, SIZE, dtype=torch.long)}, ValueError),
        ({"image": torch.zeros(2, 1, SIZE, SIZE), "masks": torch.zeros(2, 1, 16, SIZE, dtype=torch.long)}, ValueError),
    ],
)
def test_check_batch_errors(model: ProbUNet, batch: dict, error: type) -> None:
    with pytest.raises(error):
        model.check_batch(batch)


# --- sampling ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("b", "s", "in_channels", "num_classes"), [(1, 1, 1, 2), (2, 5, 1, 2), (3, 4, 3, 3)])
def test_sample_shape(tiny_punet_kwargs: dict, b: int, s: int, in_channels: int, num_classes: int) -> None:
    model = _make_model(tiny_punet_kwargs, in_channels=in_channels, num_classes=num_classes)
    images = torch.randn(b, in_channels, SIZE, SIZE)
    out = model.sample(images, s)
    assert out.shape == (b, s, num_classes, SIZE, SIZE)
    assert torch.isfinite(out).all()
    assert model(images, s).shape == (b, s, num_classes, SIZE, SIZE)  # forward is an alias


@pytest.mark.parametrize("num_samples", [1, 8, 32])
def test_sample_runs_unet_and_prior_once_per_call(model: ProbUNet, num_samples: int) -> None:
    counts = {"unet": 0, "prior": 0, "posterior": 0}

    def counter(name: str):
        def hook(module, inputs, output) -> None:
            counts[name] += 1

        return hook

    handles = [getattr(model.network, name).register_forward_hook(counter(name)) for name in counts]
    try:
        model.sample(torch.randn(2, 1, SIZE, SIZE), num_samples)
    finally:
        for h in handles:
            h.remove()
    assert counts == {"unet": 1, "prior": 1, "posterior": 0}


def test_same_generator_seed_gives_identical_samples(model: ProbUNet) -> None:
    images = torch.randn(2, 1, SIZE, SIZE)
    a = model.sample(images, 6, generator=torch.Generator().manual_seed(42))
    torch.manual_seed(999)  # the global RNG must not matter when a generator is given
    b = model.sample(images, 6, generator=torch.Generator().manual_seed(42))
    assert_same_kernels(a, b)
    c = model.sample(images, 6, generator=torch.Generator().manual_seed(43))
    assert not torch.allclose(a, c)


def test_samples_differ_when_prior_sigma_is_not_tiny(model: ProbUNet) -> None:
    images = torch.randn(2, 1, SIZE, SIZE)
    sigma = model.network.prior(images).base_dist.scale
    assert (sigma > 0.3).all()
    out = model.sample(images, 4, generator=torch.Generator().manual_seed(0))
    for i in range(1, 4):
        assert (out[:, i] - out[:, 0]).abs().amax() > 1e-3


def test_samples_collapse_to_the_prior_mean_when_prior_sigma_is_tiny(model: ProbUNet) -> None:
    latent = model.network.prior.latent_dim
    with torch.no_grad():
        model.network.prior.head.weight[latent:] = 0
        model.network.prior.head.bias[latent:] = -1e4  # log sigma -> -bound, sigma = exp(-10)
    images = torch.randn(2, 1, SIZE, SIZE)
    out = model.sample(images, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mean = model.network.prior(images).base_dist.loc
        decoded = model.network.fcomb(model.network.unet(images), mean)  # the prior mean decoded, (B, K, H, W)
    torch.testing.assert_close(out, decoded.unsqueeze(1).expand_as(out), atol=1e-3, rtol=0)


def test_samples_follow_the_prior_not_the_posterior(model: ProbUNet) -> None:
    """Shift the posterior only: samples must not change."""
    images = torch.randn(2, 1, SIZE, SIZE)
    a = model.sample(images, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.network.posterior.head.bias.add_(5.0)
    b = model.sample(images, 3, generator=torch.Generator().manual_seed(0))
    assert_same_kernels(a, b)
    with torch.no_grad():
        model.network.prior.head.bias[: model.network.prior.latent_dim].add_(5.0)
    c = model.sample(images, 3, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(a, c)


# --- Lightning -----------------------------------------------------------------------------------


def test_training_under_a_lightning_trainer_logs_rec_kl_and_loss(tiny_punet_kwargs: dict, tmp_path) -> None:
    pl.seed_everything(0, verbose=False)
    model = ProbUNet(**tiny_punet_kwargs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dm = SyntheticDataModule(image_size=SIZE, num_train=8, num_val=4, num_test=4, num_raters=3, batch_size=4)
    trainer = pl.Trainer(
        max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        limit_val_batches=1, num_sanity_val_steps=0, log_every_n_steps=1,
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2
    metrics = trainer.callback_metrics
    assert {"train/rec", "train/kl", "train/loss"} <= set(metrics), sorted(metrics)
    assert {"val/rec", "val/kl", "val/loss"} <= set(metrics), sorted(metrics)
    for key in ("train/rec", "train/kl", "train/loss"):
        assert torch.isfinite(metrics[key])
    torch.testing.assert_close(metrics["train/loss"], metrics["train/rec"] + metrics["train/kl"])
    torch.testing.assert_close(metrics["val/loss"], metrics["val/rec"] + metrics["val/kl"])
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "no parameter changed: the optimizer never stepped"

"""Posterior-collapse remedies (KL warm-up, free bits, the KL per latent dimension) of every latent
model, and the cSAE's readings (which sample reconstructs, which posterior samples enter the
Sinkhorn term), against hand formulas and sets built by hand."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from scipy import stats

from probseg.data import SyntheticDataModule
from probseg.layers.gaussian import sample_set
from probseg.models import ConditionalSinkhornAutoencoder, PlanarProbUNet, ProbUNet
from probseg.models.base import LossTerms
from probseg.models.csae import rater_slots
from probseg.models.planar import monte_carlo_kl, monte_carlo_kl_per_dim
from tests.conftest import TINY_PUNET

SIZE = 32
LATENT_MODELS = {"punet": ProbUNet, "planar": PlanarProbUNet, "csae": ConditionalSinkhornAutoencoder}


def _kl_weight(model) -> float:
    """The KL weight the model's objective uses at its current step and mode."""
    return model.kl_objective.weight(model.global_step, model.training)


def _model(name: str, seed: int = 0, **kwargs) -> ProbUNet:
    torch.manual_seed(seed)
    model = LATENT_MODELS[name](**{**TINY_PUNET, **({"num_ot_samples": 6} if name == "csae" else {}), **kwargs})
    with torch.no_grad():  # prior and posterior clearly apart, in every dimension
        for head in (model.network.prior.head, model.network.posterior.head):
            head.weight.normal_(0, 0.3)
            head.bias.normal_(0, 0.5)
    return model


def _batch(b: int = 3, r: int = 4, seed: int = 0, same_raters: bool = True) -> dict:
    """With ``same_raters`` every rater of an image draws the same mask, so the training target
    does not depend on which rater is drawn."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.randint(2, (b, 1 if same_raters else r, SIZE, SIZE), generator=g)
    return {"image": torch.randn(b, 1, SIZE, SIZE, generator=g), "masks": masks.expand(b, r, SIZE, SIZE).clone()}


def _kl_normal(mq: np.ndarray, sq: np.ndarray, mp: np.ndarray, sp: np.ndarray) -> np.ndarray:
    """KL(N(mq, sq^2) || N(mp, sp^2)) per dimension, by hand."""
    return np.log(sp / sq) + (sq**2 + (mq - mp) ** 2) / (2 * sp**2) - 0.5


def _at_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    monkeypatch.setattr(pl.LightningModule, "global_step", property(lambda self: step))


# --- KL warm-up ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LATENT_MODELS))
def test_kl_weight_anneals_linearly_in_training_and_is_beta_otherwise(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(name, beta=2.0, kl_warmup_steps=100).train()
    for step, expected in [(0, 0.0), (25, 0.5), (50, 1.0), (100, 2.0), (1000, 2.0)]:
        _at_step(monkeypatch, step)
        assert _kl_weight(model) == pytest.approx(expected)
    _at_step(monkeypatch, 25)
    assert _kl_weight(model.eval()) == 2.0  # validation and test: the full beta
    assert _kl_weight(_model(name, beta=2.0).train()) == 2.0  # no warm-up


def test_warm_up_scales_the_kl_term_and_logs_its_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    batch = _batch()
    model = _model("punet", beta=2.0, kl_warmup_steps=100).train()
    _at_step(monkeypatch, 30)
    terms = model.loss_terms(batch, torch.Generator().manual_seed(0))
    posterior = model.network.posterior(batch["image"], batch["masks"][:, 0]).base_dist
    prior = model.network.prior(batch["image"]).base_dist
    kl = _kl_normal(*(t.detach().double().numpy() for t in (posterior.loc, posterior.scale, prior.loc, prior.scale)))
    assert terms["kl"].item() == pytest.approx(2.0 * 0.3 * kl.sum(1).mean(), rel=1e-5)
    assert float(terms.diagnostics["kl_weight"]) == pytest.approx(0.6)


# --- free bits -----------------------------------------------------------------------------------


@pytest.mark.parametrize("free_bits", [0.0, 0.754, 1.0, 50.0])
def test_free_bits_floor_the_batch_mean_kl_of_each_dimension(free_bits: float) -> None:
    """beta * sum_d max(lambda, mean_b KL_bd) (Kingma et al. 2016), from the Normals by hand."""
    batch = _batch()
    model = _model("punet", beta=3.0, free_bits=free_bits)
    terms = model.loss_terms(batch, torch.Generator().manual_seed(0))
    posterior = model.network.posterior(batch["image"], batch["masks"][:, 0]).base_dist
    prior = model.network.prior(batch["image"]).base_dist
    kl = _kl_normal(*(t.detach().double().numpy() for t in (posterior.loc, posterior.scale, prior.loc, prior.scale)))
    per_dim = kl.mean(0)
    # the seed gives per-dimension KLs 0.751, 0.757, 1.460: the floors bind for 0, 1, 2 or 3 of them
    assert 0.7 < per_dim.min() < 0.754 < per_dim[np.argsort(per_dim)[1]] < 1.0 < per_dim.max() < 50
    expected = 3.0 * (np.maximum(free_bits, per_dim).sum() if free_bits else kl.sum(1).mean())
    assert terms["kl"].item() == pytest.approx(expected, rel=1e-5)
    for d in range(3):  # the diagnostics: unweighted, before the floor
        assert float(terms.diagnostics[f"kl_dim{d}"]) == pytest.approx(per_dim[d], rel=1e-5)


def test_free_bits_leave_dimensions_below_the_floor_without_kl_gradient() -> None:
    batch = _batch()
    model = _model("punet", free_bits=1e3)  # every dimension below the floor
    model.loss_terms(batch, torch.Generator().manual_seed(0))["kl"].backward()
    assert model.network.prior.head.weight.grad.abs().sum() == 0 and model.network.posterior.head.weight.grad.abs().sum() == 0
    model = _model("punet", free_bits=0.0)
    model.loss_terms(batch, torch.Generator().manual_seed(0))["kl"].backward()
    assert model.network.prior.head.weight.grad.abs().sum() > 0


def test_planar_free_bits_floor_the_monte_carlo_kl_per_dimension() -> None:
    batch = _batch()
    model = _model("planar", beta=1.5, free_bits=0.2, kl_samples=4)
    g = torch.Generator().manual_seed(0)
    terms = model.loss_terms(batch, g)
    # replay the draws: the rater draw, then the M base samples
    g = torch.Generator().manual_seed(0)
    target = model.training_target(batch, g)
    q_features = model.network.posterior.features(batch["image"], target)
    base = model.network.posterior.distribution(q_features)
    z0 = sample_set(base, 4, g)
    z_k, log_det = model.network.posterior_flow(q_features, z0)
    prior = model.network.prior(batch["image"])
    per_dim = monte_carlo_kl_per_dim(base, z0, log_det, z_k, prior)
    assert terms["kl"].item() == pytest.approx(1.5 * per_dim.detach().mean(0).clamp_min(0.2).sum().item(), rel=1e-5)


def test_planar_kl_per_dim_against_scipy_and_sums_to_the_estimate() -> None:
    g = torch.Generator().manual_seed(0)
    b, m, dim = 2, 5, 3
    mq, sq = torch.randn(b, dim, generator=g, dtype=torch.float64), torch.rand(b, dim, generator=g, dtype=torch.float64) + 0.5
    mp, sp = torch.randn(b, dim, generator=g, dtype=torch.float64), torch.rand(b, dim, generator=g, dtype=torch.float64) + 0.5
    base = torch.distributions.Independent(torch.distributions.Normal(mq, sq), 1)
    prior = torch.distributions.Independent(torch.distributions.Normal(mp, sp), 1)
    z0 = torch.randn(b, m, dim, generator=g, dtype=torch.float64)
    z_k = z0 + 0.3 * torch.tanh(z0)
    log_det = torch.randn(b, m, generator=g, dtype=torch.float64)
    got = monte_carlo_kl_per_dim(base, z0, log_det, z_k, prior)
    for i in range(b):
        for d in range(dim):
            ref = np.mean([stats.norm.logpdf(z0[i, s, d], mq[i, d], sq[i, d]) - float(log_det[i, s]) / dim
                           - stats.norm.logpdf(z_k[i, s, d], mp[i, d], sp[i, d]) for s in range(m)])
            assert float(got[i, d]) == pytest.approx(ref, rel=1e-10)
    torch.testing.assert_close(got.sum(1), monte_carlo_kl(base, z0, log_det, z_k, prior), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(LATENT_MODELS))
@pytest.mark.parametrize("option", [{"kl_warmup_steps": -1}, {"free_bits": -0.1}])
def test_bad_remedy_settings_are_refused(name: str, option: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(option))):
        _model(name, **option)


@pytest.mark.parametrize("name", list(LATENT_MODELS))
def test_kl_per_dimension_is_logged_for_every_latent_model(name: str, tmp_path) -> None:
    pl.seed_everything(0)
    model = _model(name, kl_warmup_steps=4)
    dm = SyntheticDataModule(image_size=SIZE, num_train=8, num_val=4, num_test=4, num_raters=3, batch_size=4)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=CSVLogger(str(tmp_path)), log_every_n_steps=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    header = next(tmp_path.glob("lightning_logs/version_*/metrics.csv")).read_text().splitlines()[0].split(",")
    for key in ("train/kl_dim0", "train/kl_dim2", "train/kl_weight", "val/kl_dim0", "train/kl"):
        assert key in header, key


# --- cSAE readings -------------------------------------------------------------------------------


def test_rater_slots_share_the_slots_over_the_present_raters() -> None:
    rater_mask = torch.tensor([[True, True, True, True], [False, True, False, True], [False, False, True, False],
                               [True, False, True, True]])
    for seed in range(5):
        slots = rater_slots(rater_mask, 10, torch.Generator().manual_seed(seed))
        for b in range(4):
            present = rater_mask[b].nonzero().flatten().tolist()
            counts = {r: int((slots[b] == r).sum()) for r in range(4)}
            assert all(counts[r] == 0 for r in range(4) if r not in present), "an absent rater got a slot"
            assert {counts[r] for r in present} <= {10 // len(present), -(-10 // len(present))}
            assert sum(counts.values()) == 10
            # round robin: consecutive slots go to consecutive present raters
            order = [present.index(r) for r in slots[b].tolist()]
            assert all((b2 - a) % len(present) == 1 for a, b2 in zip(order, order[1:])) or len(present) == 1
    a = rater_slots(rater_mask, 10, torch.Generator().manual_seed(3))
    assert torch.equal(a, rater_slots(rater_mask, 10, torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="present rater"):
        rater_slots(torch.tensor([[False, False]]), 4)


def test_aggregate_posterior_samples_equal_a_set_built_by_hand() -> None:
    """Slot j of image b: rater r = slots[b, j]; z0 = mu_r + sigma_r * eps[b, j]; flowed by rater
    r's amortized flow, one image and one rater at a time (float64: the same maths)."""
    model = _model("csae", sinkhorn_posterior="all_raters").double()
    batch = _batch(b=2, r=3, same_raters=False)
    batch["image"] = batch["image"].double()
    batch["rater_mask"] = torch.tensor([[True, False, True], [True, True, True]])
    got = model.network.aggregate_posterior_samples(batch, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    slots = rater_slots(batch["rater_mask"], 6, g)
    eps = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    expected = torch.empty_like(got)
    for b in range(2):
        for j in range(6):
            r = int(slots[b, j])
            features = model.network.posterior.features(batch["image"][b : b + 1], batch["masks"][b : b + 1, r])
            q = model.network.posterior.distribution(features).base_dist
            z0 = q.loc + q.scale * eps[b, j]
            expected[b, j] = model.network.posterior_flow(features, z0)[0][0]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert not bool((slots[0] == 1).any())


def test_absent_raters_never_enter_the_sinkhorn_set() -> None:
    model = _model("csae", sinkhorn_posterior="all_raters").double()
    batch = _batch(b=2, r=3, same_raters=False)
    batch["image"] = batch["image"].double()
    batch["rater_mask"] = torch.tensor([[True, False, True], [False, True, True]])
    a = model.network.aggregate_posterior_samples(batch, torch.Generator().manual_seed(1))
    changed = dict(batch, masks=batch["masks"].clone())
    changed["masks"][0, 1] = 1 - changed["masks"][0, 1]  # absent raters' masks: anything
    changed["masks"][1, 0] = 1
    b = model.network.aggregate_posterior_samples(changed, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    present = dict(batch, masks=batch["masks"].clone())
    present["masks"][0, 2] = 1 - present["masks"][0, 2]  # a present rater's mask: the set moves
    assert not torch.allclose(a, model.network.aggregate_posterior_samples(present, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("reconstruct_from", ["base", "flowed"])
@pytest.mark.parametrize("sinkhorn_posterior", ["one_rater", "all_raters"])
def test_csae_terms_per_reading_against_a_replay(reconstruct_from: str, sinkhorn_posterior: str) -> None:
    """Replays the draws of each reading by hand: the reconstructing sample and the Sinkhorn sets."""
    from probseg.models.csae import sinkhorn_divergence

    model = _model("csae", beta=2.0, gamma=3.0, reconstruct_from=reconstruct_from,
                   sinkhorn_posterior=sinkhorn_posterior).double()
    batch = _batch(b=2, r=3)
    batch["image"] = batch["image"].double()
    terms = model.loss_terms(batch, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    images = batch["image"]
    target = model.training_target(batch, g)
    features, q_features = model.network.unet(images), model.network.posterior.features(images, target)
    p_features = model.network.prior.encode(images)
    posterior, prior = model.network.posterior.distribution(q_features), model.network.prior.distribution(p_features)
    if sinkhorn_posterior == "one_rater":
        z0 = sample_set(posterior, 6, g)
        zq = model.network.posterior_flow(q_features, z0)[0]
        z_rec = zq[:, 0] if reconstruct_from == "flowed" else z0[:, 0]
    else:
        z0 = sample_set(posterior, 1, g)
        z_rec = model.network.posterior_flow(q_features, z0)[0][:, 0] if reconstruct_from == "flowed" else z0[:, 0]
        zq = model.network.aggregate_posterior_samples(batch, g)
    zp = model.network.prior_flow(p_features, sample_set(prior, 6, g))[0]
    rec = model.reconstruction_terms(model.network.fcomb(features, z_rec), target)["rec_ce"]
    torch.testing.assert_close(terms["rec_ce"], rec, rtol=1e-10, atol=1e-10)
    sinkhorn = 3.0 * sinkhorn_divergence(zq, zp).mean()  # GeomLoss computes in float32
    torch.testing.assert_close(terms["sinkhorn"].double(), sinkhorn.double(), rtol=1e-6, atol=1e-6)
    kl = 2.0 * torch.distributions.kl_divergence(posterior, prior).mean()
    torch.testing.assert_close(terms["kl"], kl, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("option", [{"reconstruct_from": "posterior"}, {"sinkhorn_posterior": "raters"}])
def test_unknown_csae_readings_are_refused(option: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(option))):
        _model("csae", **option)


@pytest.mark.parametrize("options", [{"reconstruct_from": "base"}, {"reconstruct_from": "flowed"},
                                     {"sinkhorn_posterior": "all_raters"}, {"sample_through_prior_flow": True}])
def test_sampling_is_reproducible_for_every_reading(options: dict) -> None:
    model = _model("csae", **options).eval()
    images = _batch()["image"]
    with torch.no_grad():
        a = model.sample(images, 4, torch.Generator().manual_seed(3))
        b = model.sample(images, 4, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (3, 4, 2, SIZE, SIZE)


def test_loss_terms_are_a_dict_with_diagnostics() -> None:
    terms = _model("csae").loss_terms(_batch(), torch.Generator().manual_seed(0))
    assert isinstance(terms, LossTerms) and isinstance(terms, dict)
    assert set(terms) == {"rec_ce", "kl", "sinkhorn"}
    assert set(terms.diagnostics) == {"kl_dim0", "kl_dim1", "kl_dim2"}
    assert math.isclose(sum(float(v) for v in terms.diagnostics.values()), terms["kl"].item() / 10.0, rel_tol=1e-5)


def test_sinkhorn_gradient_reaches_every_present_raters_posterior_only() -> None:
    """all_raters: the Sinkhorn term trains the posterior encoder; an absent rater's mask does not
    change the gradient (float64, the same maths on both sides)."""
    batch = _batch(b=2, r=3, same_raters=False)
    batch["image"] = batch["image"].double()
    batch["rater_mask"] = torch.tensor([[True, False, True], [False, True, True]])

    def gradient(masks: torch.Tensor) -> torch.Tensor:
        model = _model("csae", sinkhorn_posterior="all_raters", beta=0.0).double()
        terms = model.loss_terms(dict(batch, masks=masks), torch.Generator().manual_seed(0))
        terms["sinkhorn"].backward()
        return model.network.posterior.head.weight.grad.clone()

    base = gradient(batch["masks"])
    assert base.abs().sum() > 0
    changed = batch["masks"].clone()
    changed[0, 1] = 1 - changed[0, 1]  # absent
    torch.testing.assert_close(gradient(changed), base, rtol=1e-9, atol=1e-12)


def test_csae_free_bits_floor_the_base_kl_per_dimension() -> None:
    batch = _batch()
    model = _model("csae", beta=2.0, free_bits=0.9)
    terms = model.loss_terms(batch, torch.Generator().manual_seed(0))
    posterior = model.network.posterior(batch["image"], batch["masks"][:, 0]).base_dist
    prior = model.network.prior(batch["image"]).base_dist
    kl = _kl_normal(*(t.detach().double().numpy() for t in (posterior.loc, posterior.scale, prior.loc, prior.scale)))
    assert terms["kl"].item() == pytest.approx(2.0 * np.maximum(0.9, kl.mean(0)).sum(), rel=1e-5)


def test_resuming_a_release_0_1_csae_keeps_its_reading() -> None:
    """``probseg fit --ckpt_path`` builds the model from today's config (default reading), then
    Lightning calls on_load_checkpoint: the old reading is kept, with a warning."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "fixtures" / "release_0.1" / "csae.ckpt"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model = ConditionalSinkhornAutoencoder(**{k: v for k, v in checkpoint["hyper_parameters"].items()})
    assert model.network.reconstruct_from == "base"
    with pytest.warns(UserWarning, match="reconstruct_from"):
        model.on_load_checkpoint(checkpoint)
    assert model.network.reconstruct_from == "flowed" and model.hparams["reconstruct_from"] == "flowed"
    again = ConditionalSinkhornAutoencoder(**checkpoint["hyper_parameters"], reconstruct_from="flowed")
    again.on_load_checkpoint({**checkpoint, "hyper_parameters": dict(again.hparams)})  # a new checkpoint: no change
    assert again.network.reconstruct_from == "flowed"

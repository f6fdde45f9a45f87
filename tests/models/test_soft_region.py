"""The mixed objective's soft-label term (``soft_region``, :class:`probseg.models.objectives.SoftRegion`):
its value against a plain loop (prior draws, softmax, mean; the fused map and DML1 written out by
hand), where its gradient goes, that leaving it out changes nothing, that it round-trips through
YAML and checkpoints, and that bad settings are named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml

import probseg
from probseg.data import SyntheticDataModule
from probseg.data.fusion import fuse_raters
from probseg.models import MODELS, ProbSegModel
from probseg.models.objectives import SoftRegion
from tests.conftest import TINY_PUNET
from tests.helpers import HostReads, load_script
from tests.models.test_zoo import TINY_ARGS

ROOT = Path(__file__).resolve().parents[2]
LATENT = ["punet", "planar", "csae"]


def _batch(b: int = 3, r: int = 3, size: int = 16) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    rater_mask = torch.ones(b, r, dtype=torch.bool)
    rater_mask[0, 2] = rater_mask[1, 0] = False  # absent raters never count
    masks = torch.randint(0, 2, (b, r, size, size), generator=g)
    masks[2, :, : size // 2] = 0
    return {"image": torch.rand(b, 1, size, size, generator=g), "masks": masks, "rater_mask": rater_mask}


def _model(name: str = "punet", **options: Any) -> ProbSegModel:
    torch.manual_seed(0)
    return MODELS[name](**TINY_ARGS[name], **options).train()


def _mean_by_hand(masks: torch.Tensor, rater_mask: torch.Tensor, k: int) -> torch.Tensor:
    """The uniform mean of each image's present raters' one-hot maps, raters looped over."""
    fused = torch.zeros(masks.shape[0], k, *masks.shape[2:])
    for b in range(masks.shape[0]):
        present = [r for r in range(masks.shape[1]) if rater_mask[b, r]]
        for r in present:
            for c in range(k):
                fused[b, c] += (masks[b, r] == c).float() / len(present)
    return fused


def _dml1_by_hand(x: torch.Tensor, y: torch.Tensor, smooth: float, pooled: bool) -> torch.Tensor:
    """Wang et al. eq. 4, 1 - (|x + y|_1 - |x - y|_1) / |x + y|_1, with s added to numerator and
    denominator; per image and class averaged over the classes (and the images), or the
    cardinalities pooled over the batch."""
    if pooled:
        x, y = x.transpose(0, 1).flatten(1)[None], y.transpose(0, 1).flatten(1)[None]  # (1, K, B H W)
    losses = []
    for b in range(x.shape[0]):
        per_class = []
        for c in range(x.shape[1]):
            total = (x[b, c] + y[b, c]).abs().sum()
            diff = (x[b, c] - y[b, c]).abs().sum()
            per_class.append(1 - (total - diff + smooth) / (total + smooth))
        losses.append(torch.stack(per_class).mean())
    return torch.stack(losses).mean()


@pytest.mark.parametrize("recipe", ["probseg", "paper"])
def test_the_term_equals_a_plain_loop_over_prior_draws(recipe: str) -> None:
    """M = 3 prior draws from the step's generator after its rater draw and posterior draw,
    softmax, mean; against the raters' mean; DML1 with the reconstruction's recipe (probseg:
    per image, s = 1, summed over pixels; paper: pooled over the batch, s = 1 in the Tversky form,
    i.e. 2 here, pixel means)."""
    weight, samples = 0.7, 3
    model = _model(soft_region={"fusion": "mean", "weight": weight, "samples": samples},
                   loss_options={"recipe": recipe})
    batch = _batch()
    batch["masks"][0, 2] = 7  # an absent rater's slot may hold any filler
    terms = model.loss_terms(batch, torch.Generator().manual_seed(7), stage="train")

    replay = torch.Generator().manual_seed(7)
    net = model.network
    with torch.no_grad():
        target = model.reconstruction.target(batch, replay)  # the random rater of the step
        net(batch, target, replay)  # its posterior draw
        eps = torch.randn(3, samples, TINY_PUNET["latent_dim"], generator=replay)
        prior = net.prior(batch["image"])
        features = net.unet(batch["image"])
        mean = 0
        for m in range(samples):
            z = prior.base_dist.loc + prior.base_dist.scale * eps[:, m]
            mean = mean + net.fcomb(features, z).softmax(dim=1) / samples
    fused = _mean_by_hand(batch["masks"], batch["rater_mask"], 2)
    if recipe == "probseg":
        expected = weight * 16 * 16 * _dml1_by_hand(mean, fused, smooth=1.0, pooled=False)
    else:
        expected = weight * _dml1_by_hand(mean, fused, smooth=2.0, pooled=True)
    torch.testing.assert_close(terms["soft_region"], expected, rtol=1e-5, atol=1e-6)
    assert set(terms) == {"rec_ce", "kl", "soft_region"}


def test_the_weighted_mean_target_is_the_models_fusion_recipe() -> None:
    model = _model(soft_region={"fusion": "weighted_mean"}, fusion_options={"recipe": "paper"})
    (objective,) = model.extra_objectives
    batch = _batch()
    expected = fuse_raters(batch["masks"], batch["rater_mask"], 2, "weighted_mean", recipe="paper")
    torch.testing.assert_close(objective.target(batch), expected, rtol=0, atol=0)
    assert (objective.samples, objective.kind, objective.weight) == (4, "dml1", 1.0)  # the defaults


@pytest.mark.parametrize("name", LATENT)
def test_the_gradient_reaches_the_prior_and_the_combiner_and_not_the_posterior(name: str) -> None:
    extra = {"sample_through_prior_flow": True} if name == "csae" else {}
    model = _model(name, soft_region={"fusion": "mean"}, **extra)
    terms = model.loss_terms(_batch(), torch.Generator().manual_seed(1), stage="train")
    terms["soft_region"].backward()
    net = model.network
    parts = {"prior": net.prior, "fcomb": net.fcomb, "unet": net.unet, "posterior": net.posterior}
    if name == "csae":
        parts["prior_flow"] = net.prior_flow
    grads = {key: [p.grad for p in part.parameters()] for key, part in parts.items()}
    for key in set(parts) - {"posterior"}:
        assert any(g is not None and g.abs().sum() > 0 for g in grads[key]), key
    assert all(g is None or not g.any() for g in grads["posterior"])


@pytest.mark.parametrize("name", LATENT)
def test_the_predictive_from_the_training_pass_equals_a_fresh_one(name: str) -> None:
    """The PU-Net family decodes the step's U-Net features and prior: the same draws and values
    as sampling afresh (and through the prior flow when the cSAE samples through it)."""
    for extra in ([{}, {"sample_through_prior_flow": True}] if name == "csae" else [{}]):
        model = _model(name, **extra).eval()
        batch = _batch()
        with torch.no_grad():
            target = model.reconstruction.target(batch, torch.Generator().manual_seed(0))
            outputs = model.network(batch, target, torch.Generator().manual_seed(0))
            reused = model.network.predictive_log_probabilities(batch["image"], 5, torch.Generator().manual_seed(2),
                                                                outputs=outputs)
            fresh = model.predictive_log_probabilities(batch["image"], 5, torch.Generator().manual_seed(2))
        assert torch.equal(reused, fresh)


def _first_step(model: ProbSegModel, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    terms = model.loss_terms(batch, torch.Generator().manual_seed(3), stage="train")
    torch.stack(list(terms.values())).sum().backward()
    optimizer.step()
    return {k: v.detach() for k, v in terms.items()}, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", LATENT)
def test_leaving_the_option_out_changes_nothing(name: str) -> None:
    """Key absent and ``soft_region: null`` give bitwise the same first step (terms and weights);
    with the option the model's own terms stay bitwise the same and the new one adds."""
    batch = _batch()
    absent_terms, absent_params = _first_step(_model(name), batch)
    none_terms, none_params = _first_step(_model(name, soft_region=None), batch)
    assert absent_terms.keys() == none_terms.keys() and "soft_region" not in absent_terms
    assert all(torch.equal(absent_terms[k], none_terms[k]) for k in absent_terms)
    assert all(torch.equal(a, b) for a, b in zip(absent_params, none_params))
    mixed_terms, _ = _first_step(_model(name, soft_region={"fusion": "mean"}), batch)
    assert set(mixed_terms) == set(absent_terms) | {"soft_region"}
    assert all(torch.equal(absent_terms[k], mixed_terms[k]) for k in absent_terms)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_takes_the_term(name: str) -> None:
    model = _model(name, soft_region={"fusion": "weighted_mean", "weight": 0.5, "samples": 2})
    terms = model.loss_terms(_batch(), torch.Generator().manual_seed(0), stage="val")
    assert terms["soft_region"].ndim == 0 and torch.isfinite(terms["soft_region"])
    terms["soft_region"].backward()
    assert any(p.grad is not None and p.grad.any() for p in model.parameters())


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_a_step_with_the_term_reads_the_host_no_more_often() -> None:
    """The term re-fuses the checked batch without its own rater checks: two host reads per
    training step, as without it (the batch contract and the non-finite guard)."""
    model = _model(soft_region={"fusion": "weighted_mean"})
    with HostReads() as counter:
        model.training_step(_batch(), 0)
    assert len(counter.reads) == 2, counter.reads


def test_yaml_round_trip_checkpoint_reload_and_logging(tmp_path: Path) -> None:
    option = {"fusion": "weighted_mean", "weight": 0.5, "loss": "dml2", "samples": 2}
    model = _model(soft_region=option)
    again = MODELS["punet"](**yaml.safe_load(yaml.safe_dump(dict(model.hparams))))
    assert again.hparams.soft_region == option

    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         limit_val_batches=1, val_check_interval=2, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=SyntheticDataModule(image_size=16, num_train=4, num_val=2, num_test=2, batch_size=2))
    assert {"train/soft_region", "val/soft_region"} <= set(trainer.callback_metrics)
    path = tmp_path / "mixed.ckpt"
    trainer.save_checkpoint(path)
    assert torch.load(path, weights_only=True)["hyper_parameters"]["soft_region"] == option
    loaded = probseg.load_model(path)
    (objective,) = loaded.extra_objectives
    assert isinstance(objective, SoftRegion) and (objective.fusion, objective.weight, objective.kind,
                                                   objective.samples) == ("weighted_mean", 0.5, "dml2", 2)
    batch = _batch()
    model.eval()
    with torch.no_grad():
        values = [m.loss_terms(batch, torch.Generator().manual_seed(4), stage="val")["soft_region"]
                  for m in (model, loaded)]
    torch.testing.assert_close(values[0], values[1], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("option", "error", "match"),
    [
        ("mean", TypeError, r"soft_region must be a mapping"),
        ({"sample": 4}, ValueError, r"unknown soft_region keys \['sample'\]"),
        ({"fusion": "random"}, ValueError, r"soft_region\.fusion must be one of \('mean', 'weighted_mean'\)"),
        ({"fusion": "majority"}, ValueError, r"soft_region\.fusion"),
        ({"weight": 0}, ValueError, r"soft_region\.weight must be positive"),
        ({"weight": -1.0}, ValueError, r"soft_region\.weight must be positive"),
        ({"weight": float("inf")}, ValueError, r"soft_region\.weight"),
        ({"weight": "1"}, TypeError, r"soft_region\.weight must be a number"),
        ({"weight": True}, TypeError, r"soft_region\.weight must be a number"),
        ({"loss": "ce"}, ValueError, r"soft_region\.loss must be a region loss"),
        ({"samples": 0}, ValueError, r"soft_region\.samples must be at least 1"),
        ({"samples": 2.0}, TypeError, r"soft_region\.samples must be an integer"),
        ({"samples": True}, TypeError, r"soft_region\.samples must be an integer"),
    ],
)
def test_bad_settings_name_their_key(option: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        MODELS["punet"](**TINY_PUNET, soft_region=option)


def test_the_mean_of_m_draws_costs_spread_in_expectation() -> None:
    """Why the term also pulls towards collapse (README, "the mixed objective"): two raters who
    disagree on half an image (fused map 0.5 there), a model whose hypotheses are exactly the two
    raters (its predictive mean is the fused map) against a collapsed one predicting 0.5. Over
    the binomial count of M draws, the expected DML1 of the M-draw mean is 0.419 / 0.140 / 0.067 /
    0.033 at M = 1 / 4 / 16 / 64 (about 1 / sqrt(M)); the collapsed model's is 0."""
    from math import comb

    from probseg.losses.functional import region_loss

    def maps(p: float) -> torch.Tensor:
        fg = torch.zeros(1, 1, 1, 100)
        fg[..., :50] = p
        return torch.cat([1 - fg, fg], dim=1)

    fused = maps(0.5)
    expected = {m: sum(comb(m, k) / 2**m * float(region_loss(maps(k / m), fused, "dml1", smooth=0))
                       for k in range(m + 1)) for m in (1, 4, 16, 64)}
    assert [round(v, 3) for v in expected.values()] == [0.419, 0.140, 0.067, 0.033]
    assert float(region_loss(fused, fused, "dml1", smooth=0)) == 0


def test_the_soft_label_study_has_the_mixed_rows() -> None:
    study = load_script(ROOT / "benchmarks" / "soft_label_study.py")
    rows = {variant: study.model_args(variant, latent=True, lr=1e-3) for variant in study.mixed_variants()}
    assert {v: args["soft_region"] for v, (_, args) in rows.items()} == {
        "punet-random+soft": {"fusion": "mean", "weight": 1.0},
        "punet-random+soft0.1": {"fusion": "mean", "weight": 0.1},
        "punet-random+soft-m16": {"fusion": "mean", "weight": 1.0, "samples": 16}}
    assert all(name == "punet" and args["fusion"] == "random" for name, args in rows.values())

"""One parametrized test over every registered model: build, loss, sample, checkpoint round trip.

A new model joins by adding tiny constructor arguments to TINY_ARGS; the test fails for a
registered model that has none, so no model escapes it.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

import probseg
from probseg.data import SyntheticDataModule
from probseg.models import MODELS
from tests.conftest import TINY_PUNET

TINY_ARGS = {
    "punet": TINY_PUNET,
    "planar": {**TINY_PUNET, "kl_samples": 2},
    "csae": {**TINY_PUNET, "num_ot_samples": 4},
    "unet": {"num_filters": TINY_PUNET["num_filters"], "convs_per_block": 1, "dropout": 0.2},
    "ssn": {"num_filters": TINY_PUNET["num_filters"], "convs_per_block": 1, "rank": 3, "mc_samples": 4},
    "phiseg": {"num_filters": [4, 8, 8], "convs_per_block": 1, "latent_levels": 2},
    "hpunet": {"num_filters": [4, 8, 8], "convs_per_block": 1, "latent_levels": 2},
    "mose": {"num_filters": TINY_PUNET["num_filters"], "convs_per_block": 1, "num_experts": 2, "samples_per_expert": 2},
}


def _batch(b: int = 2, r: int = 3, size: int = 32) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.rand(b, 1, size, size, generator=g),
        "masks": torch.randint(0, 2, (b, r, size, size), generator=g),
        "rater_mask": torch.ones(b, r, dtype=torch.bool),
    }


def fit_one_step(model: pl.LightningModule, path: Path) -> Path:
    """One training step on tiny synthetic data, then the checkpoint saved at ``path``."""
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=path.parent,
                         limit_val_batches=0)
    trainer.fit(model, datamodule=SyntheticDataModule(image_size=32, num_train=4, num_val=2, num_test=2, batch_size=4))
    trainer.save_checkpoint(path)
    return path


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_model(name: str, tmp_path: Path) -> None:
    assert name in TINY_ARGS, f"add tiny constructor arguments for {name!r} to TINY_ARGS"
    torch.manual_seed(0)
    model = MODELS[name](**TINY_ARGS[name])
    assert model.registry_name == name

    terms = model.loss_terms(_batch())
    assert terms and all(v.ndim == 0 and torch.isfinite(v) for v in terms.values())
    torch.stack(list(terms.values())).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)

    samples = model.sample(_batch()["image"], 4)
    assert samples.shape == (2, 4, model.num_classes, 32, 32)

    loaded = probseg.load_model(fit_one_step(model, tmp_path / f"{name}.ckpt"))
    assert type(loaded) is type(model)
    x = _batch()["image"]
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    with torch.no_grad():
        torch.testing.assert_close(loaded.sample(x, 2, generator=g1), model.eval().sample(x, 2, generator=g2))


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda b: b.update(masks=b["masks"] + 1), ValueError, r"class ids in \[1, 2\]"),
        (lambda b: b.update(masks=b["masks"] - 1), ValueError, r"outside \[0, 1\]"),
        (lambda b: b.update(masks=b["masks"].float()), TypeError, "integer class ids"),
        (lambda b: b.update(rater_mask=torch.ones(2, 2, dtype=torch.bool)), ValueError, "rater_mask"),
        (lambda b: b.update(rater_mask=torch.ones(2, 3)), ValueError, "rater_mask"),
        (lambda b: b.pop("masks"), KeyError, "masks"),
    ],
)
@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_bad_batches_give_clear_errors(change, error: type, match: str) -> None:
    model = MODELS["punet"](**TINY_ARGS["punet"])
    batch = _batch()
    change(batch)
    with pytest.raises(error, match=match):
        model.training_step(batch, 0)


SOFT = {"fusion": "weighted_mean", "reconstruction": {"ce": 0.25, "dml1": 0.75},
        "loss_options": {"classes": "present", "smooth": 1.0}}


RECONSTRUCTING = sorted(name for name, cls in MODELS.items() if cls.reconstructs)
"""Models trained with the task's reconstruction loss (the SSN's own likelihood replaces it)."""
MIX_ARGS = {"hpunet": {"top_k": 0, "geco": False}}
"""What a model needs to train on the task's reconstruction (the HPU-Net's top-k CE replaces it)."""


@pytest.mark.parametrize("fusion", ["random", "majority", "mean", "weighted_mean", "label_smoothing"])
@pytest.mark.parametrize("name", RECONSTRUCTING)
def test_every_model_trains_on_every_fusion_with_a_loss_mix(name: str, fusion: str, tmp_path: Path) -> None:
    """Each component is its own term; the CE term equals 0.25 x the cross-entropy of the fused
    target, whose soft maps sum to 1 and reach the posterior encoder; the mix reloads from a
    checkpoint (plain dicts in the hyperparameters)."""
    torch.manual_seed(0)
    model = MODELS[name](**TINY_ARGS[name], **MIX_ARGS.get(name, {}), **{**SOFT, "fusion": fusion})
    batch = _batch()
    terms = model.loss_terms(batch, torch.Generator().manual_seed(0))
    assert {"rec_ce", "rec_dml1"} | ({"kl"} if name != "unet" else set()) <= set(terms)  # unet: no latent
    torch.stack(list(terms.values())).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    target = model.training_target(batch, torch.Generator().manual_seed(0))
    hard = fusion in ("random", "majority")
    assert target.shape == ((2, 32, 32) if hard else (2, 2, 32, 32))
    if not hard:
        torch.testing.assert_close(target.sum(1), torch.ones(2, 32, 32))
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         limit_val_batches=0, callbacks=[])
    trainer.fit(model, datamodule=SyntheticDataModule(image_size=32, num_train=4, num_val=2, num_test=2, batch_size=4))
    path = tmp_path / "soft.ckpt"
    trainer.save_checkpoint(path)
    loaded = probseg.load_model(path)
    assert loaded.fusion == fusion and loaded.reconstruction.weights == {"ce": 0.25, "dml1": 0.75}
    assert loaded.reconstruction.region_options == {"classes": "present", "smooth": 1.0}
    assert loaded.reconstruction.resolved_region_options == loaded.reconstruction.loss.resolved_region_options
    assert {"classes": "present", "smooth": 1.0}.items() <= loaded.reconstruction.resolved_region_options.items()


def test_the_ce_term_of_a_soft_target_is_the_soft_cross_entropy() -> None:
    """rec_ce with mean fusion = 0.25 * sum over pixels of -sum_c y_c log softmax(logits)_c,
    y the raters' mean, computed here from the masks directly."""
    torch.manual_seed(0)
    model = MODELS["punet"](**TINY_ARGS["punet"], **{**SOFT, "fusion": "mean"})
    batch = _batch()
    captured = {}
    original = model.network.fcomb.forward

    def spy(features, z):
        captured["logits"] = original(features, z)
        return captured["logits"]

    model.network.fcomb.forward = spy
    terms = model.loss_terms(batch, torch.Generator().manual_seed(0))
    y = torch.stack([(batch["masks"] == c).float().mean(1) for c in range(2)], dim=1)
    ce = -(y * captured["logits"].log_softmax(1)).sum(1).flatten(1).sum(1).mean()
    torch.testing.assert_close(terms["rec_ce"], 0.25 * ce)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fusion": "median"}, "unknown fusion"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"reconstruction": {"ce": 0.5, "dice": 0.5}}, "unknown reconstruction components"),
        ({"reconstruction": {"ce": 0.0}}, "one positive"),
        ({"loss_options": {"classes": "some"}}, "classes"),
        ({"loss_options": {"temperature": 2}}, "unknown loss options"),
    ],
)
def test_bad_loss_configuration_fails_at_construction(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MODELS["punet"](**TINY_ARGS["punet"], **kwargs)

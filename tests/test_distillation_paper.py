"""Knowledge distillation with ``recipe: paper`` (Wang et al.'s reference code) against an
independent computation of its loss, 0.5 (0.25 CE + 0.75 DML1)(p, label) + 0.5 (0.25 CE + 0.75
DML1)(p, teacher), and of its KDE target (unweighted, per image, hard key labels); plus the
warnings that say when a configuration is not the reference's."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import probseg.checkpoint
from probseg.data.fusion import majority_vote
from probseg.distillation import Distillation
from probseg.models import ProbUNet, UNetBaseline
from tests.calibration.test_kde_paper import ref_image_kde
from tests.conftest import TINY_PUNET
from tests.losses.test_paper_recipe import ref_pixel_mean_ce, ref_tversky_loss
from tests.test_distillation import TINY_UNET, _distillation_terms, _teacher_probs, teacher_ckpt  # noqa: F401

PAPER = {"fusion": "majority", "reconstruction": {"ce": 0.125, "dml1": 0.375}, "loss_options": {"recipe": "paper"}}
"""The model arguments of the reference's KD recipe (experiments/synthetic/unet_kd_paper.yaml)."""


def _batch(raters: int, b: int = 2, size: int = 16) -> dict:
    g = torch.Generator().manual_seed(1)
    fg = torch.zeros(b, 1, size, size, dtype=torch.long)
    fg[:, :, 4:11, 3:12] = 1
    noise = (torch.rand(b, raters, size, size, generator=g) < 0.1).long()
    return {"image": torch.rand(b, 1, size, size, generator=g), "masks": fg ^ noise,
            "rater_mask": torch.ones(b, raters, dtype=torch.bool)}


def test_kd_loss_is_half_label_half_teacher(teacher_ckpt: Path) -> None:  # noqa: F811
    """One rater (LiTS / KiTS have one label): every term against the python loops of the
    reference's loss, pixel-mean CE and batch-pooled DML1 (present classes on the hard label, all
    on the teacher, s = 1 in the Tversky form)."""
    torch.manual_seed(0)
    model = UNetBaseline(**TINY_UNET, teacher=str(teacher_ckpt), **PAPER,
                         distillation={"recipe": "paper", "kde": False})
    batch = _batch(raters=1)
    batch["masks"][1] = 0  # image 1 has no foreground: the pooled DML1 still counts class 1
    terms = model.loss_terms(batch)
    terms.update(_distillation_terms(model, batch))
    logits = model.network.logits(batch["image"], 1, dropout=False)[:, 0].detach().double()
    p, t = logits.softmax(1).numpy(), _teacher_probs(teacher_ckpt, batch["image"]).double().numpy()
    y = torch.nn.functional.one_hot(batch["masks"][:, 0], 2).permute(0, 3, 1, 2).double().numpy()
    want = {
        "rec_ce": 0.5 * 0.25 * ref_pixel_mean_ce(logits.numpy(), y),
        "kd_ce": 0.5 * 0.25 * ref_pixel_mean_ce(logits.numpy(), t),
        "rec_dml1": 0.5 * 0.75 * ref_tversky_loss(p, y, hard=True),
        "kd_dml1": 0.5 * 0.75 * ref_tversky_loss(p, t, hard=False),
    }
    assert set(terms) == set(want)
    for name, value in want.items():
        assert float(terms[name].detach()) == pytest.approx(value, rel=1e-4, abs=1e-6), name


def test_kde_target_is_unweighted_per_image_with_the_majority_vote(teacher_ckpt: Path) -> None:  # noqa: F811
    """Three raters: the key points' labels are their majority vote (hard), each image is
    calibrated from its own pixels, unweighted (n_key above the image's pixels: every pixel is a
    key point, so the reference loop of eq. 30-31 gives the same numbers)."""
    model = UNetBaseline(**TINY_UNET, teacher=str(teacher_ckpt), **PAPER,
                         distillation={"recipe": "paper", "kde": {"bandwidth": 0.05, "n_key": 4096}})
    d = model.distiller
    assert (d.kde.importance_weights, d.kde.key_scope, d.kde_labels) == (False, "image", "majority")
    batch = _batch(raters=3)
    raw, target = d.targets(batch, torch.Generator().manual_seed(0))
    vote = majority_vote(batch["masks"]).numpy()
    for b in range(2):
        want = ref_image_kde(raw[b, 1].double().numpy(), vote[b], 0.05)
        np.testing.assert_allclose(target[b, 1].numpy(), want, rtol=1e-4, atol=1e-5)
    assert (target - raw).abs().max() > 1e-3  # the calibration moved the target


def test_paper_defaults_and_what_stays_explicit() -> None:
    d = Distillation("t.ckpt", 2, 1, recipe="paper", loss_options={"recipe": "paper"})
    assert d.weights == {"ce": 0.125, "dml1": 0.375} and d.kde_labels == "majority"
    assert (d.kde.importance_weights, d.kde.key_scope, d.kde.bandwidth) == (False, "image", 1e-3)
    mixed = Distillation("t.ckpt", 2, 1, recipe="paper", kde={"importance_weights": True, "n_key": 64},
                         kde_labels="mean", weights={"ce": 1.0}, loss_options={"recipe": "paper"})
    assert (mixed.kde.importance_weights, mixed.kde.key_scope, mixed.kde.n_key) == (True, "image", 64)
    assert mixed.kde_labels == "mean" and mixed.weights == {"ce": 1.0}
    probseg = Distillation("t.ckpt", 2, 1)
    assert probseg.weights == {"ce": 1.0, "dml1": 1.0} and probseg.kde_labels == "mean"
    assert (probseg.kde.importance_weights, probseg.kde.key_scope) == (True, "batch")
    with pytest.raises(ValueError, match="distillation.recipe must be one of"):
        Distillation("t.ckpt", 2, 1, recipe="wang")
    with pytest.raises(ValueError, match="kde_labels must be one of"):
        Distillation("t.ckpt", 2, 1, kde_labels="random")


def test_a_configuration_that_is_not_the_reference_warns() -> None:
    with pytest.warns(UserWarning, match="reconstruction .* differs .*; the model's loss_options have no recipe"):
        UNetBaseline(**TINY_UNET, teacher="t.ckpt", distillation={"recipe": "paper"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        UNetBaseline(**TINY_UNET, teacher="t.ckpt", **PAPER, distillation={"recipe": "paper"})
        UNetBaseline(**TINY_UNET, teacher="t.ckpt", distillation={"weights": {"ce": 2.0}})  # probseg: no check


def test_a_probabilistic_teacher_warns_under_the_paper_recipe(teacher_ckpt: Path,  # noqa: F811
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probseg.checkpoint, "load_model", lambda path: ProbUNet(**TINY_PUNET))
    d = Distillation(teacher_ckpt, 2, 1, recipe="paper", loss_options={"recipe": "paper"},
                     reconstruction={"ce": 0.125, "dml1": 0.375})
    with pytest.warns(UserWarning, match="teacher .* is probabilistic"):
        d.teacher_model()

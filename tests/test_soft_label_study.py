"""benchmarks/soft_label_study.py: every row carries the paper's recipe and its own fusion, the
evaluation pools Dice and ECE over the whole test split (checked against a numpy loop over every
pixel), and a tiny run writes its rows and summary."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "soft_label_study.py"


def _module():
    return load_script(SCRIPT)


def test_rows_set_their_fusion_and_the_paper_recipe() -> None:
    study = _module()
    from probseg.models import MODELS

    fusions = {}
    for variant in study.all_variants(latent=True):
        name, args = study.model_args(variant, latent=True, lr=1e-3)
        assert args["reconstruction"] == {"ce": 0.25, "dml1": 0.75}
        assert args["loss_options"] == {"recipe": "paper"} and args["fusion_options"] == {"recipe": "paper"}
        assert ("latent_dim" in args) == (name != "unet")
        if name != "unet":  # CE as 0.25 x the pixel mean: the KL scaled alike keeps the ELBO's balance
            assert args["beta"] == pytest.approx(0.25 / 64**2)
        fusions[variant] = args["fusion"]
        MODELS[name](**args)  # every row builds
    assert {v: fusions[v] for v in study.VARIANTS} == {
        "majority": "majority", "random": "random", "mean": "mean", "weighted_mean": "weighted_mean",
        "label_smoothing": "label_smoothing"}
    assert study.model_args("label_smoothing", latent=False, lr=1e-3)[1]["label_smoothing"] == 0.5


class _FixedModel:
    """A deterministic 'model' whose foreground logit is a fixed function of the image."""

    deterministic = True

    def sample(self, images: torch.Tensor, num_samples: int, generator=None) -> torch.Tensor:
        fg = 12.0 * (images[:, :1] - 0.45)
        return torch.stack([torch.zeros_like(fg), fg], dim=2).expand(-1, num_samples, -1, -1, -1)


def test_pooled_dice_and_ece_equal_a_loop_over_every_pixel_of_the_split() -> None:
    """40 test images (two evaluation batches): Dice and ECE against the majority vote (ties to
    background), pooled over every pixel, and the per-image means, from numpy."""
    study = _module()
    from probseg.data import SyntheticDataModule

    dm = SyntheticDataModule(image_size=32, num_train=4, num_val=2, num_test=40, num_raters=4, seed=1, batch_size=8)
    dm.setup("test")
    got = study.evaluate(_FixedModel(), dm, num_samples=4)
    ds = dm.dataset("test")
    tp = pred_sum = gt_sum = 0.0
    conf_all, correct_all, dice_each = [], [], []
    for i in range(len(ds)):
        item = ds[i]
        logit = 12.0 * (item["image"][0].double().numpy() - 0.45)
        p = 1.0 / (1.0 + np.exp(-logit))
        present = item["rater_mask"].numpy()
        votes = item["masks"].numpy()[present].sum(0)
        majority = votes * 2 > present.sum()  # a tie goes to background
        pred = p > 0.5
        tp += (pred & majority).sum()
        pred_sum += pred.sum()
        gt_sum += majority.sum()
        both = pred.sum() + majority.sum()
        dice_each.append(1.0 if both == 0 else 2 * (pred & majority).sum() / both)
        conf_all.append(np.maximum(p, 1 - p).ravel())
        correct_all.append((pred == majority).ravel())
    conf, correct = np.concatenate(conf_all), np.concatenate(correct_all)
    bins = np.minimum((conf * 15).astype(int), 14)
    ece = sum(abs(correct[bins == m].mean() - conf[bins == m].mean()) * (bins == m).mean()
              for m in range(15) if (bins == m).any())
    assert got["dice_pooled"] == pytest.approx(2 * tp / (pred_sum + gt_sum), abs=1e-6)
    assert got["ece_pooled"] == pytest.approx(ece, abs=1e-5)
    assert got["dice"] == pytest.approx(np.mean(dice_each), abs=1e-6)
    assert np.isnan(got["ged"])  # set metrics only for latent models


@pytest.mark.slow
def test_a_tiny_study_writes_rows_and_a_summary(tmp_path: Path) -> None:
    out = tmp_path / "study"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dataset", "synthetic", "--variants", "mean", "punet-random", "--latent",
         "--seeds", "0", "--steps", "5", "--num-samples", "2", "--jobs", "1", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "runs.csv", newline="") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["mean", "punet-random"]
    for row in rows.values():
        assert 0 <= float(row["dice"]) <= 1 and 0 <= float(row["ece_pooled"]) <= 1 and float(row["wall_s"]) > 0
    assert rows["mean"]["ged"] == "nan" and 0 <= float(rows["punet-random"]["ged"]) <= 2
    summary = (out / "summary.md").read_text()
    assert "| mean | 1 |" in summary and "in %" in summary


def test_unknown_rows_and_a_missing_lidc_file_are_named(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--variants", "punet-mean"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode != 0 and "punet-mean" in done.stderr and "--latent" in done.stderr
    done = subprocess.run([sys.executable, str(SCRIPT), "--lidc", str(tmp_path / "none.npz")], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert done.returncode != 0 and "none.npz" in done.stderr

"""Figures: the plot helpers write real PNGs from logs and hypotheses, and fail clearly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from probseg.viz import loss_panels, plot_loss_curves, plot_metric_curves, plot_reliability_diagram, plot_sample_grid


def _csv(path: Path, rows: list[dict]) -> Path:
    keys = sorted({k for r in rows for k in r})
    path.write_text(",".join(keys) + "\n" + "\n".join(",".join(str(r.get(k, "")) for k in keys) for r in rows) + "\n")
    return path


def _png(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size


def test_gini_curves_of_several_runs(tmp_path: Path) -> None:
    runs = {name: _csv(tmp_path / f"{name}.csv", [{"step": s, "train/gini": g * s / 10} for s in range(1, 11)])
            for name, g in (("punet", 0.5), ("csae", 0.2))}
    width, height = _png(plot_metric_curves(runs, tmp_path / "gini.png"))
    assert width > 100 and height > 100
    with pytest.raises(ValueError, match="has no 'val/ged' series"):
        plot_metric_curves(runs, tmp_path / "x.png", key="val/ged")


def test_loss_curves_plot_loss_terms_only(tmp_path: Path) -> None:
    rows = [{"step": s, "train/loss": 10 - s, "train/rec_ce": 9 - s, "train/gini": 0.1} for s in range(5)]
    rows.append({"step": 4, "val/loss": 6.0, "val/hm_iou": 0.3})
    assert _png(plot_loss_curves(_csv(tmp_path / "m.csv", rows), tmp_path / "loss.png"))[0] > 100
    # A run too short to log a training step still gets its validation curves.
    assert _png(plot_loss_curves(_csv(tmp_path / "v.csv", [{"step": 1, "val/loss": 1.0}]), tmp_path / "val.png"))[0] > 100
    with pytest.raises(ValueError, match="no train"):
        plot_loss_curves(_csv(tmp_path / "e.csv", [{"step": 1, "other": 1.0}]), tmp_path / "none.png")


def test_kl_per_dimension_shares_one_panel_and_schedules_are_left_out(tmp_path: Path) -> None:
    rows = [{"step": s, "train/loss": 10 - s, "train/kl": 1.0, "train/rec_ce": 5.0, "train/kl_weight": s / 4,
             "train/gini": 0.1, **{f"train/kl_dim{d}": 0.1 * d for d in range(12)}} for s in range(5)]
    rows.append({"step": 4, "val/loss": 6.0, "val/kl_dim0": 0.2})
    path = _csv(tmp_path / "m.csv", rows)
    from probseg.viz import read_metrics_csv

    panels = loss_panels(read_metrics_csv(path))
    assert [title for title, _ in panels] == ["loss", "kl", "rec_ce", "KL per latent dimension"]
    assert panels[-1][1] == [f"train/kl_dim{d}" for d in range(12)]  # numeric order, training only
    assert _png(plot_loss_curves(path, tmp_path / "loss.png"))[0] > 100


def test_reliability_diagram_and_sample_grid(tmp_path: Path) -> None:
    probs = torch.rand(2, 4, 16, 16)
    raters = (torch.rand(2, 3, 16, 16) > 0.5).long()
    assert _png(plot_reliability_diagram(probs, raters, tmp_path / "rel.png"))[0] > 100
    image = np.random.rand(1, 16, 16)
    assert _png(plot_sample_grid(tmp_path / "grid.png", image, probs[0].numpy(), raters[0].numpy()))[0] > 100


def test_training_log_skips_test_runs(tmp_path: Path) -> None:
    from probseg.viz import training_log

    fit, test = tmp_path / "logs/version_0/metrics.csv", tmp_path / "logs/version_1/metrics.csv"
    for path, key in ((fit, "train/gini"), (test, "test/ged")):
        path.parent.mkdir(parents=True)
        _csv(path, [{"step": 1, key: 0.5}])
    assert training_log(tmp_path) == fit
    with pytest.raises(FileNotFoundError, match="'val/x'"):
        training_log(tmp_path, key="val/x")

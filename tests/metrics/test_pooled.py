"""Dataset-pooled ECE and Dice (``ece_pooled``, ``dice_pooled``) next to the per-image means:
against a plain numpy loop over every pixel of the dataset, with padded DDP repeats, where they
must differ from the per-image means, per subset of images and in the written results tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from probseg.callbacks.evaluation import subset_pooling
from probseg.metrics import POOLED_NAMES, HypothesisMetrics, MeanPredictionMetrics
from probseg.metrics import functional as F
from probseg.metrics.functional import calibration_error_from_bins, dice_from_statistics
from probseg.metrics.hypotheses import mean_prediction_statistics, mean_prediction_values
from probseg.results import markdown_table, read_results, subset_rows, write_results

N, S, R, H, W = 5, 3, 4, 12, 10
BATCHES = [[0, 1], [2, 3, 4]]


def _dataset(k: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, S, K, H, W) class probabilities, (N, R, H, W) rater masks with images of very different
    foreground sizes, (N, R) present raters (rater 0 always present)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(N, S, k, H, W)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)
    target = np.zeros((N, R, H, W), dtype=np.int64)
    for i in range(N):
        size = 1 + 2 * i  # structures of 1x1 to 9x9 pixels
        for r in range(R):
            top, left = rng.integers(0, H - size + 1), rng.integers(0, W - size + 1)
            target[i, r, top:top + size, left:left + size] = rng.integers(1, k)
    present = rng.random((N, R)) < 0.7
    present[:, 0] = True
    return probs, target, present


def _pooled_by_loop(probs: np.ndarray, target: np.ndarray, present: np.ndarray, num_bins: int) -> dict[str, float]:
    """The pooled ECE and Dice, one pixel of the dataset at a time."""
    k = probs.shape[2]
    count, confidence, correct = np.zeros(num_bins), np.zeros(num_bins), np.zeros(num_bins)
    overlap, predicted, voted = np.zeros(k), np.zeros(k), np.zeros(k)
    for i in range(probs.shape[0]):
        for y in range(probs.shape[3]):
            for x in range(probs.shape[4]):
                mean = probs[i, :, :, y, x].mean(axis=0)
                label = int(np.argmax(mean))
                votes = [sum(1 for r in range(target.shape[1]) if present[i, r] and target[i, r, y, x] == c)
                         for c in range(k)]
                vote = int(np.argmax(votes))  # the first maximum: ties to the lower class
                m = min(int(mean[label] * num_bins), num_bins - 1)
                count[m] += 1
                confidence[m] += mean[label]
                correct[m] += label == vote
                predicted[label] += 1
                voted[vote] += 1
                overlap[label] += label == vote
    ece = np.abs(correct - confidence).sum() / count.sum()
    dice = [2 * overlap[c] / (predicted[c] + voted[c]) if predicted[c] + voted[c] else 1.0 for c in range(1, k)]
    return {"ece_pooled": float(ece), "dice_pooled": float(np.mean(dice))}


def _feed(metric, probs: np.ndarray, target: np.ndarray, present: np.ndarray, batches=BATCHES) -> None:
    for batch in batches:
        args = [torch.as_tensor(probs[batch]), torch.as_tensor(target[batch]), torch.as_tensor(present[batch])]
        if isinstance(metric, HypothesisMetrics):
            metric.update(*args, index=torch.as_tensor(batch), sigma=torch.ones(len(batch), 2))
        else:
            metric.update(*args, index=torch.as_tensor(batch))


@pytest.mark.parametrize("k", [2, 3])
def test_pooled_values_match_a_loop_over_every_pixel_of_the_dataset(k: int) -> None:
    probs, target, present = _dataset(k, seed=k)
    expected = _pooled_by_loop(probs, target, present, num_bins=10)
    metric = HypothesisMetrics(num_classes=k, kernels=["iou"], num_bins=10)
    _feed(metric, probs, target, present)
    got = metric.compute()
    for name in POOLED_NAMES:
        assert got[name].item() == pytest.approx(expected[name], abs=1e-12), name
    # A teacher's (B, K, H, W) mean prediction pools the same way.
    teacher = MeanPredictionMetrics(num_bins=10)
    _feed(teacher, probs.mean(axis=1), target, present)
    for name in POOLED_NAMES:
        assert teacher.compute()[name].item() == pytest.approx(expected[name], abs=1e-12), name


def test_padded_repeats_are_pooled_once() -> None:
    """DistributedSampler pads with repeated images: a repeated index must not count twice."""
    probs, target, present = _dataset(2, seed=5)
    once, padded = HypothesisMetrics(kernels=["iou"]), HypothesisMetrics(kernels=["iou"])
    _feed(once, probs, target, present)
    _feed(padded, probs, target, present, batches=[[0, 1, 2], [3, 4, 0], [1]])
    for name in POOLED_NAMES:
        assert padded.compute()[name].item() == pytest.approx(once.compute()[name].item(), abs=1e-12), name


def _hard(foreground: np.ndarray, confidence: float = 1.0) -> torch.Tensor:
    """(B, H, W) predicted masks -> (B, 1, 2, H, W) class probabilities of that confidence."""
    fg = np.where(foreground, confidence, 1 - confidence)
    return torch.as_tensor(np.stack([1 - fg, fg], axis=1)[:, None])


def test_dice_weighs_images_alike_and_pooled_dice_weighs_pixels_alike() -> None:
    """Image 0: a 10x10 structure, half of it found (Dice 2/3). Image 1: a one-pixel structure,
    found exactly (Dice 1). Mean over images 5/6; pooled 2 (50 + 1) / (50 + 1 + 100 + 1)."""
    target = np.zeros((2, 1, 16, 16), dtype=np.int64)
    target[0, 0, :10, :10] = 1
    target[1, 0, 3, 3] = 1
    pred = target[:, 0].copy()
    pred[0, 5:10] = 0
    metric = HypothesisMetrics(kernels=["iou"], gini=False)
    metric.update(_hard(pred), torch.as_tensor(target), index=torch.tensor([0, 1]))
    got = metric.compute()
    assert got["dice"].item() == pytest.approx((2 / 3 + 1) / 2)
    assert got["dice_pooled"].item() == pytest.approx(2 * 51 / 152)


def test_over_and_under_confidence_cancel_only_in_the_pooled_ece() -> None:
    """Every pixel predicted at confidence 0.9; image 0 right everywhere (gap +0.1), image 1 right
    on 80% of its pixels (gap -0.1): each image's ECE is 0.1, the pooled bin's gap is 0."""
    target = np.zeros((2, 1, 10, 10), dtype=np.int64)
    pred = np.zeros((2, 10, 10), dtype=bool)
    pred[1, :2] = True  # 20 of image 1's 100 pixels wrong
    metric = MeanPredictionMetrics(num_bins=10)
    metric.update(_hard(pred, 0.9)[:, 0], torch.as_tensor(target), index=torch.tensor([0, 1]))
    got = metric.compute()
    assert got["ece"].item() == pytest.approx(0.1)
    assert got["ece_pooled"].item() == pytest.approx(0.0, abs=1e-12)


def test_each_images_values_match_the_pixel_loop_on_that_image_alone() -> None:
    """The per-image ``ece`` and ``dice`` (and the statistics stored with them) against the pixel
    loop run on one image at a time: pooling a single image gives its own values."""
    probs, target, present = _dataset(3, seed=9)
    metric = HypothesisMetrics(num_classes=3, kernels=["iou"], gini=False)
    _feed(metric, probs, target, present)
    values, statistics, index = metric.per_image_with_statistics()
    assert index.tolist() == list(range(N)) and statistics["ece"].shape == (N, 15, 3)
    assert statistics["dice"].shape == (N, 2, 2)
    for i in range(N):
        alone = _pooled_by_loop(probs[i:i + 1], target[i:i + 1], present[i:i + 1], num_bins=15)
        assert values["ece"][i].item() == pytest.approx(alone["ece_pooled"], abs=1e-12), i
        assert values["dice"][i].item() == pytest.approx(alone["dice_pooled"], abs=1e-12), i
        assert calibration_error_from_bins(statistics["ece"][i]).item() == pytest.approx(alone["ece_pooled"], abs=1e-12)
        assert dice_from_statistics(statistics["dice"][i]).item() == pytest.approx(alone["dice_pooled"], abs=1e-12)


def test_mean_prediction_values_keep_their_dict_and_the_statistics_come_separately() -> None:
    """``mean_prediction_values`` returns ``{ece, dice, bdice}`` as before the pooled metrics;
    ``mean_prediction_statistics`` adds the statistics; both equal the separate functionals."""
    probs, target, present = (torch.as_tensor(a) for a in _dataset(3, seed=4))
    values = mean_prediction_values(probs, target, present)
    assert isinstance(values, dict) and sorted(values) == ["bdice", "dice", "ece"]
    both, statistics = mean_prediction_statistics(probs, target, present)
    for name in values:
        torch.testing.assert_close(both[name], values[name])
    torch.testing.assert_close(values["ece"], F.expected_calibration_error(probs, target, present))
    torch.testing.assert_close(values["dice"], F.dice_score(probs, target, present))
    torch.testing.assert_close(values["bdice"], F.binarized_dice(probs, target, present))
    torch.testing.assert_close(statistics["ece"], F.calibration_statistics(probs, target, present))
    torch.testing.assert_close(statistics["dice"], F.dice_statistics(probs, target, present))


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_no_image_pools_to_nan() -> None:
    got = HypothesisMetrics(kernels=["iou"], gini=False).compute()
    assert all(torch.isnan(got[name]) for name in POOLED_NAMES)


def test_results_rows_pool_each_subset_and_the_tables_show_the_pooled_columns(tmp_path: Path) -> None:
    probs, target, present = _dataset(2, seed=11)
    metric = HypothesisMetrics(kernels=["iou"], gini=False)
    _feed(metric, probs, target, present)
    values, statistics, index = metric.per_image_with_statistics()
    marking = torch.tensor([0.0, 0.5, 1.0, 1.0, 0.25], dtype=torch.float64)
    rows = subset_rows({"model": "unet", "dataset": "d", "source": "model", "num_samples": S}, values, marking,
                       subset_pooling(metric, statistics))
    by = {row["subset"]: row for row in rows}
    assert by["all"]["dice_pooled"] == pytest.approx(metric.compute()["dice_pooled"].item())
    alone = HypothesisMetrics(kernels=["iou"], gini=False)  # only the images every rater marks
    _feed(alone, probs, target, present, batches=[[2, 3]])
    for name in POOLED_NAMES:
        assert by["all_raters"][name] == pytest.approx(alone.compute()[name].item(), abs=1e-12), name
    write_results(tmp_path, rows)
    header = (tmp_path / "test_results.md").read_text().splitlines()[0]
    assert "| ece | ece_pooled | dice | dice_pooled | bdice |" in header
    read = read_results(tmp_path / "test_results.csv")
    assert read[0]["ece_pooled"] == pytest.approx(by["all"]["ece_pooled"])
    assert f"| {by['all']['dice_pooled']:.3f} |" in markdown_table(read[:1]), "one value, no spread"

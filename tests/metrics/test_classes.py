"""torchmetrics classes: per-image values and means against the brute-force references of
``_reference`` (LP transport on per-pair costs, GED loops, ECE/BDice loops, classic Gini), fed in
several batches, with repeated dataset indices (DistributedSampler padding), reset, and the
composite ``HypothesisMetrics`` for K = 2 and K = 3."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from probseg.metrics import (
    BinarizedDice,
    DiceScore,
    EmpiricalWasserstein,
    ExpectedCalibrationError,
    GeneralizedEnergyDistance,
    GiniIndex,
    HypothesisMetrics,
    MeanPredictionMetrics,
    SampleDiversity,
)
from tests.metrics._reference import (
    mixed_masks,
    perturbed,
    ref_bdice,
    ref_dice,
    ref_ce,
    ref_cost,
    ref_ece,
    ref_ged,
    ref_gini_mad,
    ref_iou,
    ref_ot_lp,
    ref_within,
)

N, S, R, H, W = 6, 4, 3, 14, 16
BATCHES = [[0, 1], [2, 3, 4], [5]]


def _data(seed: int = 0) -> dict[str, np.ndarray]:
    """N images: binary hypotheses, foreground probabilities, rater masks, rater_mask, sigmas."""
    rng = np.random.default_rng(seed)
    target = mixed_masks(rng, (N, R, H, W))
    pred = mixed_masks(rng, (N, S, H, W))
    for i in range(N):
        pred[i, 0] = perturbed(rng, target[i, 0], 0.05)
    prob = np.clip(0.7 * pred + 0.3 * rng.random(pred.shape), 0, 1)
    present = rng.random((N, R)) < 0.7
    present[:, 0] = True
    return {
        "pred": pred,
        "prob": prob,
        "target": target.astype(np.int64),
        "present": present,
        "sigma": rng.gamma(0.5, 1.0, (N, 5)) + 1e-3,
    }


D = _data()
T = {k: torch.as_tensor(v) for k, v in D.items()}


def _ew_ref(kernel: str):
    def ref(i: int) -> float:
        src = D["prob"] if kernel == "ce" else D["pred"]
        return ref_ot_lp(ref_cost(src[i : i + 1], D["target"][i : i + 1, D["present"][i]], kernel)[0])

    return ref


# name -> (constructor, update arguments for images idx, brute-force value of image i)
CASES = {
    "ew_iou": (lambda: EmpiricalWasserstein("iou"), lambda ix: (T["pred"][ix], T["target"][ix], T["present"][ix]), _ew_ref("iou")),
    "ew_hausdorff": (
        lambda: EmpiricalWasserstein("hausdorff"),
        lambda ix: (T["pred"][ix], T["target"][ix], T["present"][ix]),
        _ew_ref("hausdorff"),
    ),
    "ew_ce": (lambda: EmpiricalWasserstein("ce"), lambda ix: (T["prob"][ix], T["target"][ix], T["present"][ix]), _ew_ref("ce")),
    "ged": (
        lambda: GeneralizedEnergyDistance(),
        lambda ix: (T["pred"][ix], T["target"][ix], T["present"][ix]),
        lambda i: ref_ged(D["pred"][i], D["target"][i], D["present"][i], True),
    ),
    "ged_distinct": (
        lambda: GeneralizedEnergyDistance(self_pairs=False),
        lambda ix: (T["pred"][ix], T["target"][ix], T["present"][ix]),
        lambda i: ref_ged(D["pred"][i], D["target"][i], D["present"][i], False),
    ),
    "diversity": (lambda: SampleDiversity(), lambda ix: (T["pred"][ix],), lambda i: ref_within(list(D["pred"][i]), True)),
    "ece": (
        lambda: ExpectedCalibrationError(num_bins=10),
        lambda ix: (T["prob"][ix], T["target"][ix], T["present"][ix]),
        lambda i: ref_ece(D["prob"][i], D["target"][i], D["present"][i], 10),
    ),
    "dice": (
        lambda: DiceScore(),
        lambda ix: (T["prob"][ix], T["target"][ix], T["present"][ix]),
        lambda i: ref_dice(D["prob"][i], D["target"][i], D["present"][i]),
    ),
    "bdice": (
        lambda: BinarizedDice(),
        lambda ix: (T["prob"][ix], T["target"][ix], T["present"][ix]),
        lambda i: ref_bdice(D["prob"][i], D["target"][i], D["present"][i]),
    ),
    "gini": (lambda: GiniIndex(), lambda ix: (T["sigma"][ix],), lambda i: ref_gini_mad(D["sigma"][i])),
}
REFS = {name: np.array([case[2](i) for i in range(N)]) for name, case in CASES.items()}
TOL = 1e-5


@pytest.mark.parametrize("name", list(CASES))
def test_compute_is_mean_of_brute_force_over_batches(name: str) -> None:
    """Three batches without index: compute() = mean of the per-image references, per_image() in order."""
    make, args, _ = CASES[name]
    metric = make()
    for ix in BATCHES:
        metric.update(*args(ix))
    assert metric.compute().item() == pytest.approx(REFS[name].mean(), abs=TOL)
    values, index = metric.per_image()
    np.testing.assert_allclose(values["value"].numpy(), REFS[name], atol=TOL)
    assert (index == -1).all()


@pytest.mark.parametrize("name", list(CASES))
def test_repeated_index_counts_once_and_per_image_is_sorted(name: str) -> None:
    """Shuffled batches with image 2 and 5 repeated (as DistributedSampler pads): each index counts once,
    per_image() comes back sorted by index; the same as feeding each image once."""
    make, args, _ = CASES[name]
    metric = make()
    for ix in ([4, 2, 0], [5, 2], [1, 3, 5]):
        metric.update(*args(ix), index=torch.tensor(ix))
    values, index = metric.per_image()
    assert index.tolist() == list(range(N))
    np.testing.assert_allclose(values["value"].numpy(), REFS[name], atol=TOL)
    assert metric.compute().item() == pytest.approx(REFS[name].mean(), abs=TOL)


def test_without_index_every_value_counts() -> None:
    """No index: a repeated image counts twice (single-process behaviour)."""
    metric = GiniIndex()
    metric.update(T["sigma"][[0, 1]])
    metric.update(T["sigma"][[1]])
    ref = REFS["gini"]
    assert metric.compute().item() == pytest.approx((ref[0] + 2 * ref[1]) / 3, abs=1e-12)


def test_reset() -> None:
    """After reset, only the images fed afterwards count; with none, compute() is NaN."""
    metric = GiniIndex()
    metric.update(T["sigma"][:3], index=torch.arange(3))
    metric.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.isnan(metric.compute())
    metric.update(T["sigma"][3:], index=torch.arange(3, N))
    assert metric.compute().item() == pytest.approx(REFS["gini"][3:].mean(), abs=1e-12)
    assert metric.per_image()[1].tolist() == list(range(3, N))


def test_index_shape_is_checked() -> None:
    with pytest.raises(ValueError, match="index"):
        GiniIndex().update(T["sigma"][:3], index=torch.arange(2))


def test_class_argument_errors() -> None:
    with pytest.raises(ValueError, match="unknown kernel"):
        EmpiricalWasserstein("l1")
    with pytest.raises(ValueError, match="num_bins"):
        ExpectedCalibrationError(num_bins=0)


# ----------------------------------------------------------------------------- HypothesisMetrics


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _hypotheses(k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, S, K, H, W) class probabilities that follow the raters, and (N, R, H, W) class ids."""
    rng = np.random.default_rng(seed)
    target = np.zeros((N, R, H, W), dtype=np.int64)
    for c in range(1, k):
        target[mixed_masks(rng, (N, R, H, W))] = c
    onehot = np.eye(k)[target[:, rng.integers(0, R, S)]].transpose(0, 1, 4, 2, 3)  # (N, S, K, H, W)
    probs = _softmax(3 * onehot + rng.normal(size=onehot.shape) * 1.5, axis=2)
    return probs, target


def _hm_reference(probs: np.ndarray, target: np.ndarray, present: np.ndarray, sigma: np.ndarray | None) -> dict:
    """Every HypothesisMetrics value of each image from the references: hypotheses binarized by
    arg-max, per-class one-vs-rest costs averaged over the foreground classes."""
    k = probs.shape[2]
    labels = probs.argmax(axis=2)
    out: dict[str, list[float]] = {}
    for i in range(N):
        keep = present[i]
        lab, tgt = labels[i], target[i][keep]
        for kernel in ("iou", "dice", "hausdorff"):
            cost = np.mean([ref_cost((lab == c)[None], (tgt == c)[None], kernel)[0] for c in range(1, k)], axis=0)
            out.setdefault(f"hm_{kernel}", []).append(ref_ot_lp(cost))
        ce = np.mean(
            [[[ref_ce(probs[i, s, c], tgt[r] == c) for r in range(len(tgt))] for s in range(S)] for c in range(1, k)], axis=0
        )
        out.setdefault("hm_ce", []).append(ref_ot_lp(ce))

        def dist(a, b):
            return np.mean([ref_iou(a == c, b == c) for c in range(1, k)])

        out.setdefault("ged", []).append(ref_ged(lab, target[i], keep, True, dist))
        out.setdefault("diversity", []).append(ref_within(list(lab), True, dist))
        out.setdefault("ece", []).append(ref_ece(probs[i], target[i], keep, 15))
        out.setdefault("dice", []).append(ref_dice(probs[i], target[i], keep))
        out.setdefault("bdice", []).append(ref_bdice(probs[i], target[i], keep))
        if sigma is not None:
            out.setdefault("gini", []).append(ref_gini_mad(sigma[i]))
    return {name: np.array(v) for name, v in out.items()}


@pytest.mark.parametrize("k", [2, 3])
def test_hypothesis_metrics_match_references(k: int) -> None:
    """All values per image (fed in shuffled batches with a repeat) vs the references; means too."""
    probs, target = _hypotheses(k, seed=k)
    present, sigma = D["present"], D["sigma"]
    expect = _hm_reference(probs, target, present, sigma)
    metric = HypothesisMetrics(num_classes=k)
    for ix in ([3, 0], [5, 1, 3], [2, 4]):
        metric.update(
            torch.as_tensor(probs[ix]), torch.as_tensor(target[ix]), torch.as_tensor(present[ix]),
            index=torch.tensor(ix), sigma=torch.as_tensor(sigma[ix]),
        )
    values, index = metric.per_image()
    assert index.tolist() == list(range(N))
    assert set(values) == set(expect)
    for name, ref in expect.items():
        np.testing.assert_allclose(values[name].numpy(), ref, atol=TOL, err_msg=name)
    means = metric.compute()
    for name, ref in expect.items():
        assert means[name].item() == pytest.approx(ref.mean(), abs=TOL), name


def test_hypothesis_metrics_binary_hypotheses_are_foreground_where_p_above_half() -> None:
    """K = 2: the hm_iou of the hypotheses equals the LP on 1 - IoU of (p1 > 0.5) masks."""
    probs, target = _hypotheses(2, seed=9)
    metric = HypothesisMetrics(num_classes=2, kernels=("iou",), gini=False)
    metric.update(torch.as_tensor(probs), torch.as_tensor(target))
    values, _ = metric.per_image()
    fg = probs[:, :, 1] > 0.5
    ref = [ref_ot_lp(ref_cost(fg[i : i + 1], target[i : i + 1] == 1, "iou")[0]) for i in range(N)]
    np.testing.assert_allclose(values["hm_iou"].numpy(), ref, atol=TOL)


def test_hypothesis_metrics_kernel_subset_and_no_gini() -> None:
    """kernels=("hausdorff",), gini=False: only those names; GED still uses 1 - IoU."""
    probs, target = _hypotheses(2, seed=4)
    metric = HypothesisMetrics(num_classes=2, kernels=("hausdorff",), gini=False)
    metric.update(torch.as_tensor(probs), torch.as_tensor(target))
    values, _ = metric.per_image()
    assert set(values) == {"hm_hausdorff", "ged", "diversity", "ece", "dice", "bdice"}
    labels = probs.argmax(axis=2)
    ged = [ref_ged(labels[i] == 1, target[i] == 1) for i in range(N)]
    np.testing.assert_allclose(values["ged"].numpy(), ged, atol=TOL)


def test_hypothesis_metrics_errors() -> None:
    probs, target = _hypotheses(3, seed=1)
    p, t = torch.as_tensor(probs), torch.as_tensor(target)
    with pytest.raises(ValueError, match="sigma"):
        HypothesisMetrics(num_classes=3).update(p, t)
    with pytest.raises(ValueError, match=r"\(B, S, 2, H, W\)"):
        HypothesisMetrics(num_classes=2, gini=False).update(p, t)
    with pytest.raises(ValueError, match="integer class ids"):
        HypothesisMetrics(num_classes=3, gini=False).update(p, t.float())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        HypothesisMetrics(num_classes=3, gini=False).update(p * 2, t)
    with pytest.raises(ValueError, match="unknown kernels"):
        HypothesisMetrics(kernels=("iou", "emd"))
    with pytest.raises(ValueError, match="num_classes"):
        HypothesisMetrics(num_classes=1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sigma": None}, r"pass sigma = \(B, L\) prior sigmas with B = 2, got None"),
        ({"sigma": torch.ones(3, 4)}, r"with B = 2, got \(3, 4\)"),
        ({"probs": torch.full((2, 3, 2, 8, 8), 0.3)}, "sum to 1 over the class dimension"),
        ({"target": torch.zeros(2, 2, 8, 9, dtype=torch.long)}, r"probs \(2, 3, 2, 8, 8\) and target \(2, 2, 8, 9\)"),
        ({"index": torch.tensor([0.5, 1.7])}, "integer dataset indices"),
    ],
)
def test_hypothesis_metrics_input_errors(kwargs: dict, match: str) -> None:
    args = {
        "probs": torch.full((2, 3, 2, 8, 8), 0.5),
        "target": torch.zeros(2, 2, 8, 8, dtype=torch.long),
        "index": torch.tensor([0, 1]),
        "sigma": torch.ones(2, 4),
        **kwargs,
    }
    with pytest.raises((ValueError, TypeError), match=match):
        HypothesisMetrics().update(args["probs"], args["target"], index=args["index"], sigma=args["sigma"])


@pytest.mark.parametrize("k", [2, 3])
def test_mean_prediction_metrics_match_references(k: int) -> None:
    """ECE, Dice and BDice of (B, K, H, W) maps (a calibrated teacher) vs the loop references."""
    probs, target = _hypotheses(k, seed=20 + k)
    mean = probs.mean(axis=1)  # (B, K, H, W)
    present = D["present"]
    metric = MeanPredictionMetrics(num_bins=15)
    metric.update(torch.as_tensor(mean), torch.as_tensor(target), torch.as_tensor(present), index=torch.arange(N))
    values, index = metric.per_image()
    assert set(values) == {"ece", "dice", "bdice"} and index.tolist() == list(range(N))
    for i in range(N):
        one = mean[i][None]  # one hypothesis, the map itself
        assert values["ece"][i].item() == pytest.approx(ref_ece(one, target[i], present[i], 15), abs=TOL)
        assert values["dice"][i].item() == pytest.approx(ref_dice(one, target[i], present[i]), abs=TOL)
        assert values["bdice"][i].item() == pytest.approx(ref_bdice(one, target[i], present[i]), abs=TOL)


@pytest.mark.parametrize("k", [2, 3])
def test_hypothesis_metrics_with_integer_weights_equal_the_repeated_set(k: int) -> None:
    """Weights n_i (integers) give every value of the set where hypothesis i appears n_i times
    (the weighted optimal transport, weighted GED and diversity, the weighted mean prediction);
    uniform weights give the unweighted values."""
    probs, target = _hypotheses(k, seed=20 + k)
    present = D["present"]
    counts = np.random.default_rng(k).integers(1, 4, (N, S))
    weighted = HypothesisMetrics(num_classes=k, gini=False)
    weighted.update(torch.as_tensor(probs), torch.as_tensor(target), torch.as_tensor(present),
                    sample_weight=torch.as_tensor(counts, dtype=torch.float64))
    got, _ = weighted.per_image()
    for i in range(N):
        repeated = HypothesisMetrics(num_classes=k, gini=False)
        repeated.update(torch.as_tensor(np.repeat(probs[i : i + 1], counts[i], axis=1)), torch.as_tensor(target[i : i + 1]),
                        torch.as_tensor(present[i : i + 1]))
        expect, _ = repeated.per_image()
        for name, value in expect.items():
            assert got[name][i].item() == pytest.approx(value.item(), abs=TOL), (name, i)
    uniform = HypothesisMetrics(num_classes=k, gini=False)
    uniform.update(torch.as_tensor(probs), torch.as_tensor(target), torch.as_tensor(present),
                   sample_weight=torch.full((N, S), 3.0))
    plain = HypothesisMetrics(num_classes=k, gini=False)
    plain.update(torch.as_tensor(probs), torch.as_tensor(target), torch.as_tensor(present))
    for name, value in plain.per_image()[0].items():
        torch.testing.assert_close(uniform.per_image()[0][name], value, atol=TOL, rtol=0, msg=name)


@pytest.mark.parametrize("matching", ["tile", "rectangular"])
def test_hypothesis_metrics_matching_convention(matching: str) -> None:
    """The class's hm values use its matching convention (here against the functional path on the
    same binarised hypotheses); GED does not depend on it."""
    from probseg.metrics.functional import matched_cost, pairwise_cost

    probs, target = _hypotheses(2, seed=31)
    probs, target = probs[:, :5], target[:, :3]  # R = 3 does not divide S = 5
    metric = HypothesisMetrics(num_classes=2, kernels=("iou",), gini=False, matching=matching)
    metric.update(torch.as_tensor(probs), torch.as_tensor(target))
    default = HypothesisMetrics(num_classes=2, kernels=("iou",), gini=False)
    default.update(torch.as_tensor(probs), torch.as_tensor(target))
    cost = pairwise_cost(torch.as_tensor(probs[:, :, 1] > probs[:, :, 0]), torch.as_tensor(target == 1), "iou")
    values = metric.per_image()[0]
    torch.testing.assert_close(values["hm_iou"], matched_cost(cost, matching=matching).to(values["hm_iou"].dtype))
    torch.testing.assert_close(values["ged"], default.per_image()[0]["ged"])
    with pytest.raises(ValueError, match="matching must be one of"):
        HypothesisMetrics(matching="hungarian")


def test_hypothesis_metrics_ce_reading() -> None:
    """The class's hm_ce uses its CE reading: "binarized" is the matched 100 x mismatch rate."""
    from probseg.metrics.functional import matched_cost, pairwise_cost

    probs, target = _hypotheses(2, seed=32)
    metric = HypothesisMetrics(num_classes=2, kernels=("ce",), gini=False, ce_reading="binarized")
    metric.update(torch.as_tensor(probs), torch.as_tensor(target))
    cost = pairwise_cost(torch.as_tensor(probs[:, :, 1]), torch.as_tensor(target == 1), "ce", ce_reading="binarized")
    got = metric.per_image()[0]["hm_ce"]
    torch.testing.assert_close(got, matched_cost(cost).to(got.dtype))
    with pytest.raises(ValueError, match="ce_reading must be one of"):
        HypothesisMetrics(ce_reading="pixel")


def test_hypothesis_metrics_hausdorff_nan_rule_leaves_images_out_of_the_means() -> None:
    """hausdorff_empty="nan": an image with a hypothesis or rater empty next to a non-empty one
    stores NaN; compute() and the results summary average the other images and count the
    undefined ones; the other metrics are unchanged."""
    from probseg.results import summarize

    probs, target = _hypotheses(2, seed=33)
    probs[0, :, 1], probs[0, :, 0] = 0.0, 1.0  # image 0: every hypothesis empty
    target[0, 0, 3:6, 3:6] = 1  # ... and a rater that marks something
    target[1:] = 0
    target[1:, :, 4:8, 4:8] = 1  # the other images: every rater marks the same square
    probs[1:, :, 1] = 0.0
    probs[1:, :, 1, 4:8, 4:8] = 1.0
    probs[1:, :, 0] = 1 - probs[1:, :, 1]
    nan_rule = HypothesisMetrics(num_classes=2, kernels=("hausdorff",), gini=False, hausdorff_empty="nan")
    default = HypothesisMetrics(num_classes=2, kernels=("hausdorff",), gini=False)
    for metric in (nan_rule, default):
        metric.update(torch.as_tensor(probs), torch.as_tensor(target))
    values = nan_rule.per_image()[0]
    assert torch.isnan(values["hm_hausdorff"][0]) and not torch.isnan(values["hm_hausdorff"][1:]).any()
    assert float(default.per_image()[0]["hm_hausdorff"][0]) > 0
    torch.testing.assert_close(values["ged"], default.per_image()[0]["ged"])
    assert float(nan_rule.compute()["hm_hausdorff"]) == pytest.approx(float(values["hm_hausdorff"][1:].mean()))
    summary = summarize(values)
    assert summary["hm_hausdorff_undefined"] == 1 and "ged_undefined" not in summary
    assert summary["hm_hausdorff_mean"] == pytest.approx(float(values["hm_hausdorff"][1:].double().mean()))
    with pytest.raises(ValueError, match="hausdorff_empty must be one of"):
        HypothesisMetrics(hausdorff_empty="inf")

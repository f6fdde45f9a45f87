"""Independent reference implementations for the metric tests: plain numpy / python loops /
scipy, written from the documented definitions and never calling ``probseg.metrics``.

Also the random test masks: "blob" masks (a few discs and rectangles, often touching the
border), random-pixel masks and empty masks.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
from scipy.optimize import linprog
from scipy.spatial.distance import directed_hausdorff

# ----------------------------------------------------------------------------- masks


def blob_mask(rng: np.random.Generator, h: int, w: int, max_blobs: int = 3) -> np.ndarray:
    """(H, W) bool: the union of 1..max_blobs discs / rectangles placed anywhere (may be clipped
    by the border)."""
    yy, xx = np.mgrid[:h, :w]
    out = np.zeros((h, w), dtype=bool)
    for _ in range(int(rng.integers(1, max_blobs + 1))):
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        if rng.random() < 0.5:
            radius = rng.uniform(0.5, max(1.0, min(h, w) / 4))
            out |= (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        else:
            out[cy : cy + int(rng.integers(1, h // 3 + 2)), cx : cx + int(rng.integers(1, w // 3 + 2))] = True
    return out


def mixed_masks(rng: np.random.Generator, shape: tuple[int, ...], p_empty: float = 0.15) -> np.ndarray:
    """(..., H, W) bool: each mask is empty, a blob mask or a random-pixel mask."""
    *lead, h, w = shape
    out = np.zeros((int(np.prod(lead)), h, w), dtype=bool)
    for i in range(out.shape[0]):
        u = rng.random()
        if u < p_empty:
            continue
        if u < 0.65:
            out[i] = blob_mask(rng, h, w)
        else:
            out[i] = rng.random((h, w)) < rng.uniform(0.02, 0.5)
    return out.reshape(shape)


def perturbed(rng: np.random.Generator, base: np.ndarray, flip: float = 0.1) -> np.ndarray:
    """``base`` with a fraction of pixels flipped (correlated sets, so costs are not all ~1)."""
    return base ^ (rng.random(base.shape) < flip)


# ----------------------------------------------------------------------------- pair costs


def ref_iou(a: np.ndarray, b: np.ndarray) -> float:
    """1 - |A & B| / |A | B|; 0 when both are empty."""
    a, b = a.astype(bool), b.astype(bool)
    union = int(np.logical_or(a, b).sum())
    return 0.0 if union == 0 else 1.0 - int(np.logical_and(a, b).sum()) / union


def ref_dice(a: np.ndarray, b: np.ndarray) -> float:
    """1 - 2 |A & B| / (|A| + |B|); 0 when both are empty."""
    a, b = a.astype(bool), b.astype(bool)
    total = int(a.sum()) + int(b.sum())
    return 0.0 if total == 0 else 1.0 - 2 * int(np.logical_and(a, b).sum()) / total


def ref_hausdorff(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric Hausdorff distance of the foreground pixel coordinates (scipy, both ways);
    0 when both are empty, the image diagonal when exactly one is."""
    pa, pb = np.argwhere(a.astype(bool)), np.argwhere(b.astype(bool))
    if len(pa) == 0 and len(pb) == 0:
        return 0.0
    if len(pa) == 0 or len(pb) == 0:
        return math.hypot(*a.shape)
    return max(directed_hausdorff(pa, pb)[0], directed_hausdorff(pb, pa)[0])


def ref_ce(p: np.ndarray, t: np.ndarray, eps: float = 1e-7) -> float:
    """Mean per-pixel binary cross-entropy, probabilities clamped to [eps, 1 - eps], written as
    a python loop over pixels; 0 when the target is empty and every probability is exactly 0."""
    p, t = np.asarray(p, dtype=np.float64).ravel(), np.asarray(t).astype(bool).ravel()
    if not t.any() and not p.any():
        return 0.0
    total = 0.0
    for pi, ti in zip(p, t):
        pc = min(max(float(pi), eps), 1 - eps)
        total -= math.log(pc) if ti else math.log(1 - pc)
    return total / len(p)


REF_KERNELS = {"iou": ref_iou, "dice": ref_dice, "hausdorff": ref_hausdorff, "ce": ref_ce}


def ref_cost(pred: np.ndarray, target: np.ndarray, kernel: str, **kw) -> np.ndarray:
    """(B, S, R) costs, one reference call per pair."""
    fn = REF_KERNELS[kernel]
    b, s, r = pred.shape[0], pred.shape[1], target.shape[1]
    out = np.zeros((b, s, r))
    for i in range(b):
        for j in range(s):
            for k in range(r):
                out[i, j, k] = fn(pred[i, j], target[i, k], **kw)
    return out


# ----------------------------------------------------------------------------- transport


def ref_ot_lp(cost: np.ndarray) -> float:
    """Optimal transport cost between uniform measures on the rows (mass 1/S each) and columns
    (mass 1/R each) of ``cost``, by linear programming."""
    s, r = cost.shape
    a_eq = np.zeros((s + r, s * r))
    for i in range(s):
        a_eq[i, i * r : (i + 1) * r] = 1  # row sums
    for j in range(r):
        a_eq[s + j, j::r] = 1  # column sums
    b_eq = np.concatenate([np.full(s, 1 / s), np.full(r, 1 / r)])
    res = linprog(cost.ravel(), A_eq=a_eq, b_eq=b_eq, bounds=(0, None), method="highs")
    assert res.status == 0, res.message
    return float(res.fun)


# ----------------------------------------------------------------------------- energy distance


def ref_within(members: list[np.ndarray], self_pairs: bool, dist=ref_iou) -> float:
    """Mean distance over ordered pairs (i, j) of one set, with or without i = j."""
    pairs = [(i, j) for i in range(len(members)) for j in range(len(members)) if self_pairs or i != j]
    if not pairs:
        return 0.0
    return sum(dist(members[i], members[j]) for i, j in pairs) / len(pairs)


def ref_ged(pred: np.ndarray, target: np.ndarray, present=None, self_pairs: bool = True, dist=ref_iou) -> float:
    """2 E d(S, Y) - E d(S, S') - E d(Y, Y') of one image, from the definition."""
    raters = [target[k] for k in range(len(target)) if present is None or present[k]]
    samples = list(pred)
    cross = sum(dist(p, y) for p in samples for y in raters) / (len(samples) * len(raters))
    return 2 * cross - ref_within(samples, self_pairs, dist) - ref_within(raters, self_pairs, dist)


# ----------------------------------------------------------------------------- calibration


def ref_class_probs(pred: np.ndarray) -> np.ndarray:
    """(S, H, W) foreground probabilities -> (S, 2, H, W); (S, K, H, W) unchanged."""
    pred = np.asarray(pred, dtype=np.float64)
    return np.stack([1 - pred, pred], axis=1) if pred.ndim == 3 else pred


def ref_majority_vote(target: np.ndarray, present=None, num_classes: int | None = None) -> np.ndarray:
    """(R, H, W) class ids -> (H, W): the most frequent class among present raters, ties to the
    lowest id (python loops over pixels)."""
    r, h, w = target.shape
    k = int(target.max()) + 1 if num_classes is None else num_classes
    out = np.zeros((h, w), dtype=np.int64)
    for y in range(h):
        for x in range(w):
            counts = [0] * k
            for j in range(r):
                if present is None or present[j]:
                    counts[int(target[j, y, x])] += 1
            out[y, x] = counts.index(max(counts))  # first maximum
    return out


def ref_bin(conf: float, m: int) -> int:
    """Bin of a confidence with exact rational comparisons: [i/M, (i+1)/M), last holds 1."""
    return min(math.floor(Fraction(conf) * m), m - 1)


def ref_ece(pred: np.ndarray, target: np.ndarray, present=None, num_bins: int = 15) -> float:
    """Top-label ECE of one image with a loop over bins."""
    probs = ref_class_probs(pred).mean(axis=0)  # (K, H, W)
    conf = probs.max(axis=0).ravel()
    label = probs.argmax(axis=0).ravel()  # numpy: first maximum
    correct = label == ref_majority_vote(np.asarray(target), present, probs.shape[0]).ravel()
    bins = np.array([ref_bin(c, num_bins) for c in conf])
    ece = 0.0
    for m in range(num_bins):
        sel = bins == m
        if sel.any():
            ece += sel.sum() / conf.size * abs(correct[sel].mean() - conf[sel].mean())
    return ece


def ref_dice(pred: np.ndarray, target: np.ndarray, present=None) -> float:
    """Dice of one image: arg-max of the mean prediction vs the majority vote, per foreground
    class with python set counting (both empty = 1), mean over the foreground classes."""
    probs = ref_class_probs(pred).mean(axis=0)  # (K, H, W)
    label = probs.argmax(axis=0)  # numpy: first maximum
    vote = ref_majority_vote(np.asarray(target), present, probs.shape[0])
    scores = []
    for c in range(1, probs.shape[0]):
        p = {(y, x) for y, x in zip(*np.nonzero(label == c))}
        g = {(y, x) for y, x in zip(*np.nonzero(vote == c))}
        scores.append(1.0 if not p and not g else 2 * len(p & g) / (len(p) + len(g)))
    return float(np.mean(scores))


def ref_bdice(pred: np.ndarray, target: np.ndarray, present=None, thresholds=tuple(i / 10 for i in range(1, 10))) -> float:
    """BDice of one image: the rater mean compared with exact fractions, Dice per level (both
    empty = 1), mean over levels, then over foreground classes."""
    probs = ref_class_probs(pred).mean(axis=0)  # (K, H, W)
    target = np.asarray(target)
    keep = [j for j in range(target.shape[0]) if present is None or present[j]]
    per_class = []
    for c in range(1, probs.shape[0]):
        votes = sum((target[j] == c).astype(int) for j in keep)
        dices = []
        for t in thresholds:
            ft = Fraction(str(t))
            fg_pred = probs[c] > t
            fg_target = np.vectorize(lambda v: Fraction(int(v), len(keep)) > ft)(votes).astype(bool)
            total = int(fg_pred.sum() + fg_target.sum())
            dices.append(1.0 if total == 0 else 2 * int((fg_pred & fg_target).sum()) / total)
        per_class.append(np.mean(dices))
    return float(np.mean(per_class))


# ----------------------------------------------------------------------------- gini


def ref_gini_mad(x: np.ndarray) -> float:
    """Classic Gini coefficient: sum_i sum_j |x_i - x_j| / (2 L^2 mean(x))."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    return sum(abs(a - b) for a in x for b in x) / (2 * n * n * x.mean())

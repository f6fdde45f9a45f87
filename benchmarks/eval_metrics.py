"""Evaluation engine vs the per-pair loops peers write, measured in one run.

Workload (default): B = 32 images, S = 16 hypotheses, R = 4 raters, 128 x 128, with some empty
masks, on two mask distributions: "blobs" (ellipses of radius 4-20 px, a lung nodule's scale) and
"large" (radius 20-50 px: structures covering up to half the image). For each kernel (1 - IoU,
1 - Dice, Hausdorff, CE) the Hungarian-matched empirical Wasserstein metric is computed, plus GED:

* engine: ``probseg.metrics.functional`` (batched pairwise costs, one distance transform per mask
  on a cropped window, scipy's assignment per image);
* baseline: a Python loop over the S x R pairs of every image: numpy IoU / Dice / CE per pair,
  ``scipy.spatial.distance.directed_hausdorff`` both ways per pair, the same assignment, and GED
  from loops over all pairs;
* MONAI's ``compute_hausdorff_distance`` on the S x R pairs as a second Hausdorff baseline, when
  MONAI is installed.

Values must agree to 1e-5 (the script stops otherwise). Engine and baseline are both warmed up and
timed in interleaved rounds (medians). Printed: milliseconds and speed-up per step and overall, and
the share of the engine's time spent in each step.

Usage:
    python benchmarks/eval_metrics.py [--batch 32 --samples 16 --raters 4 --size 128 --repeats 5]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
from typing import Callable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import directed_hausdorff

from _timing import interleaved

from probseg.metrics.functional import (
    CE_EPS,
    KERNELS,
    energy_distance_from_costs,
    generalized_energy_distance,
    matched_cost,
    pairwise_cost,
    pairwise_costs,
)



DISTRIBUTIONS = {"blobs": (4.0, 20.0), "large": (20.0, 50.0)}
"""Radius range (px, at 128 x 128; scaled with the image) of the base ellipse of each distribution."""


def blobs(rng: np.random.Generator, b: int, n: int, size: int, empty: float = 0.1,
          radius: tuple[float, float] = DISTRIBUTIONS["blobs"]) -> tuple[np.ndarray, np.ndarray]:
    """(b, n, size, size) binary masks and matching foreground probabilities: per image a base
    ellipse (radius in ``radius``, px at 128 x 128) that each member perturbs (scale, shift,
    optional lobe); a share ``empty`` of the members is empty."""
    lo, hi = (r * size / 128 for r in radius)
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    masks = np.zeros((b, n, size, size), dtype=bool)
    signed = np.zeros((b, n, size, size))
    for i in range(b):
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        ry, rx = rng.uniform(lo, hi, 2)
        for j in range(n):
            sy, sx = rng.normal(0, 1.5, 2)
            scale = rng.uniform(0.8, 1.2)
            d = np.sqrt(((yy - cy - sy) / (ry * scale)) ** 2 + ((xx - cx - sx) / (rx * scale)) ** 2)
            if rng.uniform() < 0.4:  # a lobe some members include
                ly, lx = cy + ry * rng.uniform(-1.2, 1.2), cx + rx * rng.uniform(-1.2, 1.2)
                d = np.minimum(d, np.hypot(yy - ly, xx - lx) / 5.0)
            signed[i, j] = 1 - d
            masks[i, j] = d <= 1
            if rng.uniform() < empty:
                masks[i, j] = False
                signed[i, j] = -1.0
    probs = 1 / (1 + np.exp(-6 * signed - rng.normal(0, 0.3, signed.shape)))
    probs[~masks & (signed == -1.0)] = 0.0  # empty members: certain background
    return masks, probs


def engine(pred: torch.Tensor, probs: torch.Tensor, target: torch.Tensor) -> dict[str, np.ndarray]:
    """Everything at once, as the evaluation callback runs it: the four kernels share one window
    per image and one intersection product, and GED reuses the 1 - IoU costs."""
    costs = pairwise_costs(pred, target, KERNELS, probs=probs)
    out = {kernel: matched_cost(cost).numpy() for kernel, cost in costs.items()}
    within = pairwise_cost(pred, pred, "iou"), pairwise_cost(target, target, "iou")
    out["ged"] = energy_distance_from_costs(costs["iou"], *within).numpy()
    return out


# --- the per-pair baseline, written the way peers write it -----------------------------------

def iou_cost(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 0.0 if union == 0 else 1.0 - np.logical_and(a, b).sum() / union


def dice_cost(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 0.0 if total == 0 else 1.0 - 2.0 * np.logical_and(a, b).sum() / total


def hausdorff_cost(a: np.ndarray, b: np.ndarray) -> float:
    pa, pb = np.argwhere(a), np.argwhere(b)
    if len(pa) == 0 and len(pb) == 0:
        return 0.0
    if len(pa) == 0 or len(pb) == 0:
        return math.hypot(*a.shape)
    return max(directed_hausdorff(pa, pb)[0], directed_hausdorff(pb, pa)[0])


def ce_cost(p: np.ndarray, t: np.ndarray) -> float:
    if not p.any() and not t.any():
        return 0.0
    p = np.clip(p, CE_EPS, 1 - CE_EPS)
    return float(-np.mean(t * np.log(p) + (1 - t) * np.log(1 - p)))


PAIR = {"iou": iou_cost, "dice": dice_cost, "hausdorff": hausdorff_cost, "ce": ce_cost}


def hungarian(cost: np.ndarray) -> float:
    s, r = cost.shape
    full = np.repeat(cost, s // r, axis=1)
    rows, cols = linear_sum_assignment(full)
    return float(full[rows, cols].mean())


def baseline_kernel(kernel: str, pred: np.ndarray, probs: np.ndarray, target: np.ndarray) -> np.ndarray:
    fn = PAIR[kernel]
    source = probs if kernel == "ce" else pred
    out = np.empty(len(pred))
    for i in range(len(pred)):
        cost = np.array([[fn(source[i, s], target[i, r]) for r in range(target.shape[1])] for s in range(pred.shape[1])])
        out[i] = hungarian(cost)
    return out


def baseline_ged(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    out = np.empty(len(pred))
    for i in range(len(pred)):
        cross = np.mean([iou_cost(a, b) for a in pred[i] for b in target[i]])
        within_p = np.mean([iou_cost(a, b) for a in pred[i] for b in pred[i]])
        within_t = np.mean([iou_cost(a, b) for a in target[i] for b in target[i]])
        out[i] = 2 * cross - within_p - within_t
    return out


def monai_hausdorff(pred: np.ndarray, target: np.ndarray) -> Callable[[], np.ndarray] | None:
    """A closure computing the Hungarian Hausdorff metric with MONAI's per-pair distance."""
    try:
        from monai.metrics import compute_hausdorff_distance
    except ImportError:
        return None
    b, s, h, w = pred.shape
    r = target.shape[1]

    def run() -> np.ndarray:
        p = torch.from_numpy(pred)[:, :, None].expand(b, s, r, h, w).reshape(-1, 1, h, w)
        t = torch.from_numpy(target)[:, None].expand(b, s, r, h, w).reshape(-1, 1, h, w)
        onehot = lambda m: torch.cat([~m, m], dim=1).float()  # noqa: E731
        d = compute_hausdorff_distance(onehot(p), onehot(t), include_background=False).view(b, s, r).double()
        p_empty, t_empty = ~p.flatten(1).any(1).view(b, s, r), ~t.flatten(1).any(1).view(b, s, r)
        d = torch.where(p_empty & t_empty, 0.0, torch.where(p_empty ^ t_empty, math.hypot(h, w), d))
        return np.array([hungarian(c) for c in d.numpy()])

    return run


def run_distribution(name: str, args: argparse.Namespace) -> tuple[float, float]:
    """Time engine and baseline on one mask distribution; print its table; return the totals."""
    rng = np.random.default_rng(args.seed)
    radius = DISTRIBUTIONS[name]
    pred_np, probs_np = blobs(rng, args.batch, args.samples, args.size, radius=radius)
    target_np, _ = blobs(rng, args.batch, args.raters, args.size, radius=radius)
    pred, probs, target = torch.from_numpy(pred_np), torch.from_numpy(probs_np).float(), torch.from_numpy(target_np)
    probs_np = probs.double().numpy()  # the baseline sees the same float32 probabilities
    cover = pred_np.reshape(len(pred_np), args.samples, -1).mean(-1)
    print(f"\n{name}: radius {radius[0]:.0f}-{radius[1]:.0f} px at 128x128, foreground {cover.mean():.1%} of the image "
          f"(largest {cover.max():.0%}); empty: {int((~pred_np.any((2, 3))).sum())} of {pred_np.shape[0] * pred_np.shape[1]} "
          f"hypotheses, {int((~target_np.any((2, 3))).sum())} of {target_np.shape[0] * target_np.shape[1]} raters\n")

    steps = {k: (lambda k=k: matched_cost(pairwise_cost(probs if k == "ce" else pred, target, k)).numpy()) for k in KERNELS}
    steps["ged"] = lambda: generalized_energy_distance(pred, target).numpy()
    base = {k: (lambda k=k: baseline_kernel(k, pred_np, probs_np, target_np)) for k in KERNELS}
    base["ged"] = lambda: baseline_ged(pred_np, target_np)
    fns = {**{f"engine {k}": f for k, f in steps.items()}, **{f"base {k}": f for k, f in base.items()},
           "engine all": lambda: engine(pred, probs, target)}
    values = {label: fn() for label, fn in fns.items()}
    times = interleaved(fns, args.repeats, torch.device("cpu"))
    rows = []
    for name_ in (*KERNELS, "ged"):
        err = float(np.max(np.abs(values[f"engine {name_}"] - values[f"base {name_}"])))
        if err > 1e-5:
            raise SystemExit(f"{name_}: engine and baseline differ by {err:.3g} (> 1e-5)")
        rows.append((name_, times[f"base {name_}"], times[f"engine {name_}"], err))
    for name_, v in values["engine all"].items():  # the shared-work path gives the same values as the single steps
        if not np.allclose(v, values[f"engine {name_}"], atol=1e-6, rtol=0):
            raise SystemExit(f"{name_}: the combined engine differs from the single-kernel call")
    total_base, t_all = sum(r[1] for r in rows), times["engine all"]
    print("| step | per-pair baseline (ms) | engine (ms) | speed-up | max abs diff | engine time share |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    engine_sum = sum(r[2] for r in rows)
    for name_, tb, te, err in rows:
        label = f"hm_{name_}" if name_ != "ged" else "ged"
        print(f"| {label} | {1e3 * tb:.1f} | {1e3 * te:.1f} | {tb / te:.1f}x | {err:.1e} | {te / engine_sum:.0%} |")
    print(f"| **all four kernels + GED** | {1e3 * total_base:.1f} | {1e3 * t_all:.1f} | **{total_base / t_all:.1f}x** | | |")

    monai_run = monai_hausdorff(pred_np, target_np)
    if monai_run is None:
        print("\nMONAI not installed: its Hausdorff baseline is skipped (pip install 'probseg[monai]').")
    else:
        t_monai = interleaved({"monai": monai_run}, 1, torch.device("cpu"))["monai"]
        hd = next(r for r in rows if r[0] == "hausdorff")
        err = float(np.max(np.abs(monai_run() - values["engine hausdorff"])))
        if err > 1e-5:
            raise SystemExit(f"MONAI Hausdorff differs from the engine by {err:.3g} (> 1e-5)")
        print(f"\nMONAI compute_hausdorff_distance (per pair) + assignment: {1e3 * t_monai:.1f} ms; "
              f"engine {1e3 * hd[2]:.1f} ms: {t_monai / hd[2]:.1f}x (max abs diff {err:.1e})")
    return total_base, t_all


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--raters", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of engine and baseline (medians)")
    parser.add_argument("--distributions", nargs="+", choices=sorted(DISTRIBUTIONS), default=list(DISTRIBUTIONS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.samples % args.raters:
        parser.error("--samples must be a multiple of --raters (the baseline repeats raters S/R times)")
    print(f"eval_metrics: B={args.batch} S={args.samples} R={args.raters} {args.size}x{args.size}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), medians of {args.repeats} interleaved rounds after a warm-up")
    for name in args.distributions:
        run_distribution(name, args)


if __name__ == "__main__":
    main()

"""The figures the README and :mod:`probseg.calibration.kde` quote for Wang et al.'s recipe against probseg's.

1. Dice-weighted mean fusion: the raters' weights under ``recipe: paper`` (a Dice <= 0 weighs 1,
   the reference code's guard) and ``recipe: probseg`` (a Dice of 0 weighs 0), over random binary
   rater sets (2-5 raters of 3 x 4 pixels, each set with foreground density 0.05, 0.2 or 0.5, so
   disjoint raters and empty majority votes occur): in how many sets they differ, and by how much
   at most (the largest difference of one rater's normalized weight).
2. KDE recalibration of a calibrated network with a rare foreground: f = 0.05 at every pixel and
   labels drawn as Bernoulli(0.05), so E[y | f] is the batch's foreground share (about 0.05).
   Every kernel value is then equal, and each reading's estimate is the (weighted) foreground
   share of its key points: the unweighted estimator with class-balanced key points is biased
   towards 0.5; per image it is capped by the image's foreground pixels.

Usage:
    python benchmarks/paper_recipe.py      # 400 rater sets; 8 images of 64 x 64, n_key 1024, h 1e-3 (seed 0)
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from probseg.calibration import kde_calibrate
from probseg.data.fusion import fusion_options, rater_weights

KDE_READINGS = (
    ("unweighted, balanced, per batch", {"importance_weights": False, "key_scope": "batch"}),
    ("unweighted, balanced, per image (paper recipe)", {"importance_weights": False, "key_scope": "image"}),
    ("weighted, balanced, per batch (probseg)", {"importance_weights": True, "key_scope": "batch"}),
    ("weighted, balanced, per image", {"importance_weights": True, "key_scope": "image"}),
    ("unweighted, proportional, per batch", {"importance_weights": False, "key_sampling": "proportional"}),
    ("unweighted, proportional, per image", {"importance_weights": False, "key_sampling": "proportional",
                                             "key_scope": "image"}),
)
"""The KDE's readings: name and :func:`probseg.calibration.kde_calibrate` options."""


def random_rater_sets(num_sets: int, seed: int = 0) -> list[np.ndarray]:
    """``num_sets`` binary (R, 3, 4) rater sets, R in 2..5, foreground density 0.05, 0.2 or 0.5."""
    rng = np.random.default_rng(seed)
    sets = []
    for _ in range(num_sets):
        r = int(rng.integers(2, 6))
        sets.append((rng.random((r, 3, 4)) < rng.choice([0.05, 0.2, 0.5])).astype(np.int64))
    return sets


def recipe_weights(raters: np.ndarray, recipe: str) -> np.ndarray:
    """(R,) normalized Dice weights of one (R, H, W) binary rater set under a fusion ``recipe``."""
    masks = torch.from_numpy(raters)[None]
    return rater_weights(masks, None, 2, zero_dice=fusion_options(recipe)["zero_dice"])[0].double().numpy()


def weight_disagreement(sets: list[np.ndarray], tol: float = 1e-6) -> tuple[int, float]:
    """How many rater sets get weights differing by more than ``tol`` under the two recipes, and
    the largest difference of one rater's weight."""
    gaps = [float(np.abs(recipe_weights(s, "paper") - recipe_weights(s, "probseg")).max()) for s in sets]
    return sum(gap > tol for gap in gaps), max(gaps)


def calibrated_rare_foreground(num_images: int, size: int, rate: float,
                               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2, H, W) probabilities f = ``rate`` everywhere and (B, H, W) labels ~ Bernoulli(rate)."""
    gen = torch.Generator().manual_seed(seed)
    labels = (torch.rand(num_images, size, size, generator=gen, dtype=torch.float64) < rate).long()
    fg = torch.full((num_images, size, size), rate, dtype=torch.float64)
    return torch.stack([1 - fg, fg], 1), labels


def kde_estimates(probs: torch.Tensor, labels: torch.Tensor, n_key: int = 1024, bandwidth: float = 1e-3,
                  seed: int = 0) -> dict[str, float]:
    """Each reading's mean recalibrated foreground probability over every pixel."""
    out = {}
    for name, options in KDE_READINGS:
        calibrated = kde_calibrate(probs, labels, bandwidth, n_key, region="all",
                                   generator=torch.Generator().manual_seed(seed), **options)
        out[name] = float(calibrated[:, 1].mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", type=int, default=400, help="random rater sets")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--n-key", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    differ, largest = weight_disagreement(random_rater_sets(args.sets, args.seed))
    print(f"Dice-weighted mean, {args.sets} random rater sets (seed {args.seed}): the weights of recipe paper and "
          f"probseg differ in {differ} of {args.sets} sets, by up to {largest:.2f}")

    probs, labels = calibrated_rare_foreground(args.images, args.size, 0.05, args.seed)
    share = float(labels.double().mean())
    per_image = float(labels.flatten(1).sum(1).double().mean())
    print(f"KDE at a calibrated f = 0.05: {args.images} images of {args.size} x {args.size}, n_key {args.n_key}, "
          f"h 1e-3, E[y | f] = {share:.3f} (foreground pixels per image {per_image:.0f})")
    for name, estimate in kde_estimates(probs, labels, args.n_key, seed=args.seed).items():
        print(f"  {name:<48} {estimate:.3f}")


if __name__ == "__main__":
    main()

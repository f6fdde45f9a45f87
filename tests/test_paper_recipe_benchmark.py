"""benchmarks/paper_recipe.py, which prints the figures the README and probseg.calibration.kde quote:
its functions on a small case, against a numpy loop of the two recipes' rater weights and the key
points' class shares that the KDE estimates reduce to when every pixel has the same f."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "paper_recipe.py"


def _ref_weights(raters: np.ndarray, zero_dice_weighs_one: bool) -> np.ndarray:
    """Each rater's Dice against the strict majority, normalized; an empty pair scores 1; with the
    reference's guard a Dice <= 0 weighs 1; all weights 0 fall back to uniform."""
    r = raters.shape[0]
    majority = raters.sum(0) >= r // 2 + 1
    dice = []
    for a in raters.astype(bool):
        total = a.sum() + majority.sum()
        d = 1.0 if total == 0 else 2 * (a & majority).sum() / total
        dice.append(1.0 if zero_dice_weighs_one and d <= 0 else d)
    dice = np.array(dice, dtype=float)
    return dice / dice.sum() if dice.sum() > 0 else np.full(r, 1 / r)


def test_weight_disagreement_counts_the_sets_a_numpy_loop_finds() -> None:
    bench = load_script(SCRIPT)
    sets = bench.random_rater_sets(60, seed=3)
    assert {s.shape[0] for s in sets} <= {2, 3, 4, 5} and all(s.shape[1:] == (3, 4) for s in sets)
    gaps = [np.abs(_ref_weights(s, True) - _ref_weights(s, False)).max() for s in sets]
    differ, largest = bench.weight_disagreement(sets)
    assert differ == sum(g > 1e-6 for g in gaps) and 0 < differ < len(sets)
    assert largest == pytest.approx(max(gaps), abs=1e-6)


def test_kde_estimates_are_the_key_points_foreground_shares() -> None:
    """f = 0.05 everywhere: every estimate is the (weighted) foreground share of its key points,
    ceil(n_key / 2) per class (at most the class's pixels) or ceil(n_key n_c / n) per class."""
    bench = load_script(SCRIPT)
    n_key = 128
    probs, labels = bench.calibrated_rare_foreground(2, 32, 0.05, seed=1)
    got = bench.kde_estimates(probs, labels, n_key)
    assert list(got) == [name for name, _ in bench.KDE_READINGS]
    fg = labels.flatten(1).sum(1).tolist()  # per image
    n = labels[0].numel()

    def balanced(fg_count: int, total: int) -> float:
        half = math.ceil(n_key / 2)
        m1, m0 = min(fg_count, half), min(total - fg_count, half)
        return m1 / (m0 + m1)

    def proportional(fg_count: int, total: int) -> float:
        m1, m0 = math.ceil(n_key * fg_count / total), math.ceil(n_key * (total - fg_count) / total)
        return m1 / (m0 + m1)

    share = sum(fg) / (2 * n)
    want = {
        "unweighted, balanced, per batch": balanced(sum(fg), 2 * n),
        "unweighted, balanced, per image (paper recipe)": np.mean([balanced(c, n) for c in fg]),
        "weighted, balanced, per batch (probseg)": share,
        "weighted, balanced, per image": share,
        "unweighted, proportional, per batch": proportional(sum(fg), 2 * n),
        "unweighted, proportional, per image": np.mean([proportional(c, n) for c in fg]),
    }
    for name, value in want.items():
        assert got[name] == pytest.approx(value, abs=1e-9), name
    assert got["unweighted, balanced, per batch"] == pytest.approx(0.5)


def test_the_script_prints_both_figures() -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--sets", "20", "--images", "2", "--size", "16",
                             "--n-key", "64"], capture_output=True, text=True, check=True, timeout=120)
    assert "differ in" in result.stdout and "of 20 sets" in result.stdout
    assert "unweighted, balanced, per image (paper recipe)" in result.stdout

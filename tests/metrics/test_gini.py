"""``gini_index`` against the closed forms and the classic mean-absolute-difference Gini coefficient.

Derivation (why the two must agree exactly). With x sorted ascending, T = sum x and weights
(L - k + 1/2) / L:

    1 - 2 sum_k (x_k / T)(L - k + 1/2) / L
      = 1 - (2L + 1)/L + 2 sum_k k x_k / (L T)
      = 2 sum_k k x_k / (L T) - (L + 1) / L,

and the classic G = sum_i sum_j |x_i - x_j| / (2 L^2 mean x) = sum_{i<j} (x_j - x_i) / (L T)
= sum_k (2k - L - 1) x_k / (L T), the same expression. So the midpoint formula IS the classic Gini.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probseg.metrics.functional import gini_index
from tests.metrics._reference import ref_gini_mad


def _formula_loop(x: np.ndarray) -> float:
    """The documented formula, written as a python loop (k = 1..L, ascending sort)."""
    xs = sorted(float(v) for v in x)
    n, total = len(xs), sum(xs)
    return 1 - 2 * sum(xs[k - 1] / total * (n - k + 0.5) / n for k in range(1, n + 1))


@pytest.mark.parametrize("length", [1, 2, 3, 8, 33])
def test_gini_matches_formula_and_classic_gini(length: int) -> None:
    """Random rows (some with zeros, one constant row): package == formula loop == classic MAD Gini."""
    rng = np.random.default_rng(length)
    sigma = rng.gamma(0.7, 1.0, (6, length))
    sigma[1, : length // 2] = 0.0
    sigma[2] = 0.37
    got = gini_index(torch.as_tensor(sigma)).numpy()
    for i in range(6):
        assert got[i] == pytest.approx(_formula_loop(sigma[i]), abs=1e-12)
        assert got[i] == pytest.approx(ref_gini_mad(sigma[i]), abs=1e-12)


def test_gini_by_hand() -> None:
    """[3, 1, 2]: sum |x_i - x_j| = 8 over ordered pairs, / (2 * 9 * 2) = 2/9; [0, 5, 0]: 2/3;
    [1, 1, 2, 4]: sum |x_i - x_j| = 2 * (0 + 1 + 3 + 1 + 3 + 2) = 20, / (2 * 16 * 2) = 5/16. [0, 0, 0, 5]: 3/4."""
    got = gini_index(torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 0.0]], dtype=torch.float64))
    assert got[0].item() == pytest.approx(2 / 9, abs=1e-12)
    assert got[1].item() == pytest.approx(2 / 3, abs=1e-12)
    assert gini_index(torch.tensor([[4.0, 1.0, 2.0, 1.0]], dtype=torch.float64)).item() == pytest.approx(5 / 16, abs=1e-12)
    assert gini_index(torch.tensor([[0.0, 0.0, 0.0, 5.0]], dtype=torch.float64)).item() == pytest.approx(0.75, abs=1e-12)


@pytest.mark.parametrize("length", [1, 2, 5, 16])
def test_gini_extremes(length: int) -> None:
    """Equal sigmas -> 0; exactly one non-zero -> 1 - 1/L (the maximum)."""
    equal = torch.full((2, length), 0.8, dtype=torch.float64)
    assert torch.allclose(gini_index(equal), torch.zeros(2, dtype=torch.float64), atol=1e-12)
    one = torch.zeros(length, length, dtype=torch.float64)
    one[torch.arange(length), torch.arange(length)] = torch.arange(1, length + 1, dtype=torch.float64)
    assert torch.allclose(gini_index(one), torch.full((length,), 1 - 1 / length, dtype=torch.float64), atol=1e-12)


def test_gini_is_permutation_and_scale_invariant() -> None:
    rng = np.random.default_rng(0)
    sigma = torch.as_tensor(rng.random((5, 10)))
    base = gini_index(sigma)
    perm = gini_index(sigma[:, torch.as_tensor(rng.permutation(10))])
    assert torch.allclose(base, perm, atol=1e-12)
    assert torch.allclose(base, gini_index(sigma * 123.4), atol=1e-12)
    assert torch.allclose(base, gini_index(sigma * 1e-6), atol=1e-10)
    assert ((base >= 0) & (base <= 1 - 1 / 10 + 1e-12)).all()


def test_gini_float32() -> None:
    sigma = torch.tensor([[1.0, 2.0, 3.0]])
    out = gini_index(sigma)
    assert out.dtype == torch.float32 and out.item() == pytest.approx(2 / 9, abs=1e-6)


@pytest.mark.parametrize(
    "sigma,match",
    [
        (torch.tensor([[1.0, -0.1, 2.0]]), "non-negative"),
        (torch.tensor([[1.0, 2.0], [0.0, 0.0]]), "all zeros"),
        (torch.tensor([1.0, 2.0]), r"\(B, L\)"),
        (torch.ones(1, 2, 3), r"\(B, L\)"),
        (torch.tensor([[1, 2, 3]]), "floating"),
        (torch.tensor([[1.0, float("nan")]]), "finite"),
        (torch.tensor([[1.0, float("inf")]]), "finite"),
        ([[1.0, 2.0]], r"\(B, L\)"),
    ],
)
def test_gini_errors(sigma, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        gini_index(sigma)


def test_the_variance_reading_is_the_gini_of_the_squared_sigmas_and_never_smaller() -> None:
    """gini_of="variance" takes the covariance's singular values sigma^2: against the mean
    absolute difference form on the squares; squaring spreads positive values, so its Gini is at
    least the sigma reading's."""
    from probseg.metrics.functional import singular_values

    sigma = torch.rand(50, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.01
    var = singular_values(sigma, "variance")
    ref = (var[:, :, None] - var[:, None, :]).abs().sum((1, 2)) / (2 * 6**2 * var.mean(1))
    torch.testing.assert_close(gini_index(var), ref)
    assert bool((gini_index(var) >= gini_index(singular_values(sigma, "sigma")) - 1e-12).all())
    with pytest.raises(ValueError, match="gini_of must be one of"):
        singular_values(sigma, "std")

"""The rounding bounds the suite compares float32 code paths with (tests/tolerances.py) hold for
sums and networks evaluated in many orders, and are not vacuous."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.tolerances import (
    assert_same_kernels,
    assert_within,
    gamma,
    network_tolerance,
    relu_network_bound,
    unit_roundoff,
)


def test_unit_roundoff_and_gamma_by_hand() -> None:
    assert unit_roundoff(torch.float32) == 2.0**-24
    assert unit_roundoff(torch.float64) == 2.0**-53
    u = 2.0**-24
    assert gamma(10, torch.float32) == pytest.approx(10 * u / (1 - 10 * u), rel=1e-15)
    with pytest.raises(ValueError, match="exceed"):
        gamma(2**24, torch.float32)


def _orders(x: np.ndarray) -> list[float]:
    """float32 sums of x in several orders: forward, backward, sorted both ways, pairwise, blocked."""
    def seq(v: np.ndarray) -> float:
        total = np.float32(0)
        for value in v:
            total = np.float32(total + value)
        return float(total)

    def pairwise(v: np.ndarray) -> float:
        if len(v) == 1:
            return float(v[0])
        half = len(v) // 2
        return float(np.float32(np.float32(pairwise(v[:half])) + np.float32(pairwise(v[half:]))))

    blocks = [np.float32(seq(x[i : i + 7])) for i in range(0, len(x), 7)]
    return [seq(x), seq(x[::-1]), seq(np.sort(x)), seq(np.sort(x)[::-1]), pairwise(x), seq(np.array(blocks))]


@pytest.mark.parametrize("n", [3, 50, 1000])
def test_higham_sum_bound_holds_for_every_order(n: int) -> None:
    rng = np.random.default_rng(n)
    for scale in (1.0, 1e3):
        x = (rng.standard_normal(n) * scale).astype(np.float32)
        exact = math.fsum(x.astype(np.float64))
        # Higham: any order of summation is off by at most gamma_{n-1} times the sum of |x_i|
        bound = gamma(n - 1, torch.float32) * float(np.abs(x.astype(np.float64)).sum())
        for got in _orders(x):
            assert abs(got - exact) <= bound
        # not vacuous: within a few hundred roundings of the magnitude
        assert bound < 2 * n * unit_roundoff(torch.float32) * np.abs(x).sum()


def _mlp(net: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    return net(x)


def test_relu_network_bound_holds_for_other_batchings_and_float64() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                              torch.nn.Linear(64, 3))
    x = torch.randn(16, 40)
    whole = net(x)
    bound = relu_network_bound(net, _mlp, x)
    exact = net.double()(x.double())
    net.float()
    for rows in (1, 3, 16):
        parts = torch.cat([net(x[i : i + rows]) for i in range(0, 16, rows)])
        assert_within(parts, whole, bound)
        assert_within(parts, exact, bound / 2)  # one path against the exact value: half the bound
    # worst case, so loose (about 1% of the output through three layers here: the reason deep
    # networks use network_tolerance), but a bug moving the output by 5% shows
    assert bound.max() < 0.01 * whole.abs().max()
    with pytest.raises(AssertionError, match="rounding bound"):
        assert_within(whole + 0.05 * whole.abs().max(), whole, bound)


def test_network_tolerance_holds_for_a_small_conv_net_in_other_batchings() -> None:
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, padding=1),
                              torch.nn.ReLU(), torch.nn.Conv2d(16, 2, 1))
    x = torch.randn(6, 3, 12, 12)
    whole = net(x)
    tol = network_tolerance(net, whole.abs().max().item())
    alone = torch.cat([net(x[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(alone, whole, rtol=0, atol=tol)
    exact = net.double()(x.double())
    assert (whole.double() - exact).abs().max() <= tol / 2
    assert tol < 1e-4 * whole.abs().max().item()  # float32 precision, not a loose check


def test_assert_same_kernels_is_bitwise() -> None:
    a = torch.tensor([1.0, 2.0])
    assert_same_kernels(a, a.clone())
    with pytest.raises(AssertionError):
        assert_same_kernels(a, a + torch.finfo(torch.float32).eps)
    # and it is meant for same-path runs: a 1x1 conv and a matmul may differ in the last bit
    x, w = torch.randn(2, 5, 4, 4), torch.randn(3, 5, 1, 1)
    torch.testing.assert_close(F.conv2d(x, w), torch.einsum("bchw,oc->bohw", x, w[:, :, 0, 0]), rtol=1e-5, atol=1e-5)

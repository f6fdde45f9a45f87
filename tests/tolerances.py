"""Tolerances for comparing two floating-point code paths, derived from rounding.

Two different code paths (chunked vs whole, batched vs per-image, split vs concatenated layers,
compiled vs eager, one process vs several) round differently, and by how much depends on the CPU's
kernels: how a matmul blocks its sums, the SIMD width, the thread count. A tolerance near the
dtype's epsilon passes on one machine and fails on the next. The helpers here give the textbook
forward-error bound instead (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed.,
eq. 3.5: a sum of n terms computed in any order is off by at most gamma_{n-1} times the sum of
the terms' absolute values, gamma_n = n u / (1 - n u), u the unit roundoff).

Bitwise comparisons (:func:`assert_same_kernels`) are kept for one thing only: the same code path
run twice in one process (or in two processes with the same thread count on the same machine),
where the same kernels add in the same order.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = 2^-(mantissa bits + 1): 2^-24 for float32, 2^-53 for float64."""
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of n roundings."""
    nu = n * unit_roundoff(dtype)
    if nu >= 1:
        raise ValueError(f"n = {n} roundings exceed the precision of {dtype}")
    return nu / (1 - nu)


def assert_same_kernels(a: torch.Tensor, b: torch.Tensor, msg: str | None = None) -> None:
    """Bitwise equality, for two runs of the SAME code path in one process (a seeded generator
    drawn twice, a module whose unused parameters changed): the same kernels add in the same
    order, so any difference is a bug, not rounding. Never use it across code paths."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, msg=msg)


def relu_network_bound(
    module: torch.nn.Module, run: Callable[..., torch.Tensor], *inputs: torch.Tensor, gain: float = 1.0
) -> torch.Tensor:
    """Elementwise bound on how far two float32 evaluations of a network of convolutions, ReLUs,
    average pooling, bilinear resizing and concatenation (a U-Net, a combiner) can be apart, in any
    batching and any order of the sums.

    To first order, each of the n layers with parameters adds gamma_{m+1} times what the same
    network computes on |W|, |b| and |x| (Higham's bound for a matrix-vector product, m the
    largest fan-in; the positive resampling weights and 1-Lipschitz ReLUs pass the errors on
    without growing them); two evaluations are apart by twice one's error. ``run(module, *inputs)``
    evaluates the network; it is called here on a float64 copy with |parameters| and |inputs|.
    ``gain`` multiplies in what the |.| network leaves out (e.g. inverted-dropout scaling).
    """
    absolute = copy.deepcopy(module).double()
    with torch.no_grad():
        for p in absolute.parameters():
            p.abs_()
        magnitude = run(absolute, *(x.double().abs() for x in inputs))
    layers = [m for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    fan_in = max(m.weight[0].numel() for m in layers)
    return 2 * len(layers) * gamma(fan_in + 4, torch.float32) * gain * magnitude


def network_tolerance(module: torch.nn.Module, scale: float, lam: float = 8.0) -> float:
    """Tolerance between two float32 evaluations of a deep network (batched vs one image, a
    decoder loop vs the batched decoder) whose output is of size ``scale``.

    The worst-case bound (:func:`relu_network_bound`) grows with the |W| network and is too loose
    through a U-Net to catch anything, so this uses the probabilistic one of Higham and Mary
    (SIAM J. Sci. Comput. 41(5), 2019): a sum of m terms is off by at most lam sqrt(m) u of its
    magnitude with probability at least 1 - 2m exp(-lam^2 / 2) (lam = 8: below 1e-11 for m in the
    hundreds), per layer, for each of the two paths, and initialised layers keep the scale of
    their activations, so ``scale`` stands for every layer's. Pair it with a float64 check of the
    same comparison at a tight tolerance: that one checks the maths, this one the float32 path.
    """
    layers = [m for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    fan_in = max(m.weight[0].numel() for m in layers)
    return 2 * len(layers) * lam * fan_in**0.5 * unit_roundoff(torch.float32) * scale


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor | float) -> None:
    """|actual - expected| <= bound elementwise (a rounding bound from this module)."""
    excess = (actual.double() - expected.double()).abs() - bound
    assert bool((excess <= 0).all()), (
        f"the two paths differ by more than their rounding bound (worst excess {excess.max().item():.3g})"
    )

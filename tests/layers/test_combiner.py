"""The combiner ("fcomb") against a naive tile-concatenate-convolve reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from probseg.layers import Combiner
from tests.tolerances import assert_within, relu_network_bound


def naive_fcomb(comb: Combiner, features: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Kohl et al.'s fcomb written the obvious way: tile z over H x W, concatenate, 1x1 convs.

    ``features`` (B, F, H, W), ``z`` (B, L) -> (B, K, H, W). ReLU between the convolutions,
    none after the last one.
    """
    b, _, h, w = features.shape
    tiled = z[:, :, None, None].expand(b, z.shape[1], h, w)
    x = torch.cat([features, tiled], dim=1)
    for i, conv in enumerate(comb.convs):
        if i > 0:
            x = torch.relu(x)
        x = F.conv2d(x, conv.weight, conv.bias)
    return x


def naive_fcomb_set(comb: Combiner, features: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The naive combiner once per member of a latent set (B, S, L) -> (B, S, K, H, W)."""
    return torch.stack([naive_fcomb(comb, features, z[:, s]) for s in range(z.shape[1])], dim=1)


def _combiner(num_layers: int, hidden: int | None, feat: int = 4, latent: int = 3, classes: int = 2) -> Combiner:
    torch.manual_seed(0)
    comb = Combiner(feat, latent, classes, num_layers, hidden)
    with torch.no_grad():  # larger weights so that every ReLU matters
        for p in comb.parameters():
            p.normal_(0, 0.7)
    return comb


CASES = [(1, None, 2), (2, None, 2), (4, None, 3), (3, 5, 4)]


@pytest.mark.parametrize(("num_layers", "hidden", "classes"), CASES)
def test_combiner_single_latent_equals_naive_tiling(num_layers: int, hidden: int | None, classes: int) -> None:
    comb = _combiner(num_layers, hidden, classes=classes)
    torch.manual_seed(1)
    features = torch.randn(2, 4, 6, 5)
    z = torch.randn(2, 3)
    out = comb(features, z)
    assert out.shape == (2, classes, 6, 5)
    # float32: split (combiner) vs tiled (naive) sums round differently, within the rounding bound
    assert_within(out, naive_fcomb(comb, features, z), relu_network_bound(comb, naive_fcomb, features, z))
    # float64: the two paths are the same maths, so they agree to float64 rounding
    comb64 = comb.double()
    torch.testing.assert_close(comb64(features.double(), z.double()), naive_fcomb(comb64, features.double(), z.double()),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("num_layers", "hidden", "classes"), CASES)
@pytest.mark.parametrize("num_samples", [1, 4])
def test_combiner_latent_set_equals_naive_tiling_per_sample(
    num_layers: int, hidden: int | None, classes: int, num_samples: int
) -> None:
    comb = _combiner(num_layers, hidden, classes=classes)
    torch.manual_seed(2)
    features = torch.randn(3, 4, 5, 7)
    z = torch.randn(3, num_samples, 3)
    out = comb(features, z)
    assert out.shape == (3, num_samples, classes, 5, 7)
    expected = naive_fcomb_set(comb, features, z)
    assert_within(out, expected, relu_network_bound(comb, naive_fcomb_set, features, z))
    comb64, features64, z64 = comb.double(), features.double(), z.double()
    torch.testing.assert_close(comb64(features64, z64), naive_fcomb_set(comb64, features64, z64), rtol=1e-12, atol=1e-12)


def test_combiner_default_hidden_width_and_layer_count() -> None:
    comb = Combiner(6, 2, 3, num_layers=4)
    widths = [(c.in_channels, c.out_channels, c.kernel_size) for c in comb.convs]
    assert widths == [(8, 6, (1, 1)), (6, 6, (1, 1)), (6, 6, (1, 1)), (6, 3, (1, 1))]


def test_combiner_backward_gives_finite_gradients_on_every_parameter_and_inputs() -> None:
    comb = _combiner(3, 5)
    features = torch.randn(2, 4, 6, 6, requires_grad=True)
    z = torch.randn(2, 3, 3, requires_grad=True)
    comb(features, z).pow(2).mean().backward()
    for name, p in comb.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert torch.isfinite(features.grad).all() and features.grad.abs().sum() > 0
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_combiner_gradient_matches_naive_reference() -> None:
    comb = _combiner(2, None)
    features = torch.randn(2, 4, 5, 5)
    z = torch.randn(2, 3, requires_grad=True)
    (g_fast,) = torch.autograd.grad(comb(features, z).sin().sum(), z)
    (g_ref,) = torch.autograd.grad(naive_fcomb(comb, features, z).sin().sum(), z)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-5)


def test_combiner_rejects_zero_layers() -> None:
    with pytest.raises(ValueError, match="num_layers"):
        Combiner(4, 3, 2, num_layers=0)


@pytest.mark.parametrize(
    ("features_shape", "z_shape"),
    [
        ((2, 5, 6, 6), (2, 3)),  # wrong feature channels
        ((2, 4, 6), (2, 3)),  # 3D features
        ((2, 4, 6, 6), (2, 4)),  # wrong latent dim
        ((2, 4, 6, 6), (3, 3)),  # batch mismatch, single latent
        ((2, 4, 6, 6), (3, 2, 3)),  # batch mismatch, latent set
        ((2, 4, 6, 6), (3,)),  # 1D z
        ((2, 4, 6, 6), (2, 2, 2, 3)),  # 4D z
    ],
)
def test_combiner_bad_shapes_are_clear_value_errors(
    features_shape: tuple[int, ...], z_shape: tuple[int, ...]
) -> None:
    comb = _combiner(2, None)
    with pytest.raises(ValueError, match="expected"):
        comb(torch.randn(features_shape), torch.randn(z_shape))


def _assert_naive_with_gradients(run, seed: int) -> None:
    """``run(comb, features, z)`` equals the naive combiner on a latent set (S = 5), forward and
    backward (inputs and every parameter), in float64."""
    comb = _combiner(4, 8).double()
    torch.manual_seed(seed)
    features = torch.randn(3, 4, 5, 7, dtype=torch.float64, requires_grad=True)
    z = torch.randn(3, 5, 3, dtype=torch.float64, requires_grad=True)
    out = run(comb, features, z)
    expected = naive_fcomb_set(comb, features, z)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out.sin().sum(), [features, z, *comb.parameters()])
    ref = torch.autograd.grad(expected.sin().sum(), [features, z, *comb.parameters()])
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("threads", [1, 2])  # the products' head and the convolutions' head
@pytest.mark.parametrize("cache_bytes", [1, 3 * 8 * 35 * 8])  # 1 and 3 hypotheses (8 channels x 35 pixels) per chunk
def test_combiner_chunked_cpu_path_equals_naive_tiling_with_gradients(cache_bytes: int, threads: int,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU path that sends the hypotheses through the layers in cache-sized chunks (S = 5 is
    not a multiple of 3) computes the naive combiner, forward and backward, in float64."""
    import probseg.layers.combiner as module

    monkeypatch.setattr(module, "CACHE_BYTES", cache_bytes // threads)
    monkeypatch.setattr(module.torch, "get_num_threads", lambda: threads)
    _assert_naive_with_gradients(lambda comb, features, z: comb(features, z), seed=3)


def test_combiner_batched_gpu_path_equals_naive_tiling_with_gradients() -> None:
    """The path other devices take (every hypothesis in one batch of channels-first matrix
    products), run on CPU tensors: the naive combiner, forward and backward, in float64."""
    def batched(comb: Combiner, features: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        first = comb.convs[0]
        return comb._batched(features, z, first.weight[:, :4], first.weight.flatten(1)[:, 4:])

    _assert_naive_with_gradients(batched, seed=4)


def test_combiner_accepts_channels_last_features() -> None:
    comb = _combiner(4, None)
    features = torch.randn(2, 4, 6, 5).contiguous(memory_format=torch.channels_last)
    z = torch.randn(2, 3, 3)
    torch.testing.assert_close(comb(features, z), comb(features.contiguous(), z))

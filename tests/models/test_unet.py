"""The deterministic U-Net baseline and its MC-dropout hypotheses, against explicit computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from probseg.layers import channel_dropout_masks
from probseg.models import UNetBaseline
from tests.tolerances import assert_within, network_tolerance, relu_network_bound

TINY = {"num_filters": [4, 8, 8], "convs_per_block": 1}


def _images(b: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 1, size, size, generator=torch.Generator().manual_seed(seed))


def _head(head: torch.nn.Conv2d, features: torch.Tensor) -> torch.Tensor:
    return F.conv2d(features, head.weight, head.bias)


def test_without_dropout_every_hypothesis_is_the_network_output() -> None:
    torch.manual_seed(0)
    model = UNetBaseline(**TINY).eval()
    x = _images()
    expected = F.conv2d(model.network.unet(x), model.network.head.weight, model.network.head.bias)
    samples = model.sample(x, 5)
    assert samples.shape == (3, 5, 2, 16, 16)
    assert model.deterministic
    # the same U-Net kernels; the head's sums may be ordered differently than the 1x1 conv's
    bound = relu_network_bound(model.network.head, _head, model.network.unet(x))
    for s in range(5):
        assert_within(samples[:, s], expected, bound)


def test_head_dropout_equals_masking_the_features_then_the_1x1_head() -> None:
    torch.manual_seed(0)
    model = UNetBaseline(**TINY, dropout=0.3).eval()
    x = _images()
    samples = model.sample(x, 4, generator=torch.Generator().manual_seed(5))
    masks = channel_dropout_masks(3, 4, 4, 0.3, torch.Generator().manual_seed(5))  # the same draws
    features = model.network.unet(x)
    for s in range(4):
        masked = features * masks[:, s, :, None, None]
        assert_within(samples[:, s], _head(model.network.head, masked), relu_network_bound(model.network.head, _head, masked))
    assert not model.deterministic
    assert (samples[:, 0] - samples[:, 1]).abs().max() > 0


def test_head_dropout_hypotheses_average_to_the_deterministic_logits() -> None:
    # Inverted dropout keeps the expectation and the head is linear: E[logits] = head(features).
    torch.manual_seed(0)
    model = UNetBaseline(**TINY, dropout=0.5).eval()
    x = _images(1)
    with torch.no_grad():
        mean = model.sample(x, 20000, generator=torch.Generator().manual_seed(0)).mean(1)
        exact = model.network.logits(x, 1, dropout=False)[:, 0]
    torch.testing.assert_close(mean, exact, rtol=0, atol=0.03 * exact.abs().max().item())


@pytest.mark.parametrize("position", ["head", "decoder"])
def test_per_image_generators_make_hypotheses_independent_of_the_batch(position: str) -> None:
    torch.manual_seed(0)
    model = UNetBaseline(**TINY, dropout=0.4, dropout_position=position).eval()
    x = _images(3)
    with torch.no_grad():
        batch = model.sample(x, 3, generator=[torch.Generator().manual_seed(10 + i) for i in range(3)])
        alone = model.sample(x[1:2], 3, generator=[torch.Generator().manual_seed(11)])
    # batch of 3 vs 1: the CPU may block the convolutions' sums differently
    tol = network_tolerance(model, alone.abs().max().item())
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=tol)
    with torch.no_grad():  # float64: the same maths, so float64 rounding only
        model.double()
        batch = model.sample(x.double(), 3, generator=[torch.Generator().manual_seed(10 + i) for i in range(3)])
        alone = model.sample(x[1:2].double(), 3, generator=[torch.Generator().manual_seed(11)])
    torch.testing.assert_close(batch[1:2], alone, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decoder_dropout_equals_an_explicit_decoder_loop(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = UNetBaseline(**TINY, dropout=0.25, dropout_position="decoder").eval().to(dtype)
    x = _images(2).to(dtype)
    with torch.no_grad():
        got = model.sample(x, 3, generator=torch.Generator().manual_seed(1))
        # Rebuild: the same masks in the same order (one (B, S, C) draw per up block, then the head).
        g = torch.Generator().manual_seed(1)
        skips = model.network.unet.down(x)
        expected = torch.empty_like(got)
        channels = [8 + 8, 8 + 4, 4]  # up-block inputs (deeper + skip), then the last feature map
        masks = [channel_dropout_masks(2, 3, c, 0.25, g, dtype=dtype) for c in channels]
        for b in range(2):
            for s in range(3):
                h = skips[2][b:b + 1]
                for i, block in enumerate(model.network.unet.up):
                    skip = skips[1 - i][b:b + 1]
                    h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
                    h = block(torch.cat([h, skip], 1) * masks[i][b, s, :, None, None])
                h = h * masks[2][b, s, :, None, None]
                expected[b, s] = model.network.head(h)[0]
    # the batched decoder (B * S images at once) against one image at a time: float64 checks
    # the maths, float32 that rounding stays within its (probabilistic) bound
    tol = 1e-12 if dtype == torch.float64 else network_tolerance(model, expected.abs().max().item())
    torch.testing.assert_close(got, expected, rtol=0, atol=tol)


def test_dropout_is_on_for_training_and_sampling_off_for_the_validation_loss() -> None:
    torch.manual_seed(0)
    model = UNetBaseline(**TINY, dropout=0.5)
    batch = {"image": _images(2), "masks": torch.randint(0, 2, (2, 3, 16, 16), generator=torch.Generator().manual_seed(1))}
    batch["masks"][:, 1:] = batch["masks"][:, :1]  # every rater agrees: the target is fixed
    model.train()
    train = [model.loss_terms(batch, torch.Generator().manual_seed(s))["rec_ce"].item() for s in range(2)]
    assert train[0] != train[1]
    model.eval()
    val = [model.loss_terms(batch, torch.Generator().manual_seed(s))["rec_ce"].item() for s in range(2)]
    assert val[0] == val[1]
    samples = model.sample(batch["image"], 2)
    assert (samples[:, 0] - samples[:, 1]).abs().max() > 0


def test_channel_dropout_masks() -> None:
    m = channel_dropout_masks(4, 50, 64, 0.25, torch.Generator().manual_seed(0))
    assert m.shape == (4, 50, 64)
    values = m.unique().tolist()
    assert len(values) == 2 and values[0] == 0 and values[1] == pytest.approx(1 / 0.75)
    assert (m == 0).float().mean().item() == pytest.approx(0.25, abs=0.02)
    assert channel_dropout_masks(2, 1, 3, 0.0).eq(1).all()
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        channel_dropout_masks(2, 1, 3, 1.0)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        channel_dropout_masks(3, 1, 3, 0.5, [torch.Generator(), torch.Generator()])


@pytest.mark.parametrize(("option", "value", "message"), [
    ("dropout", -0.1, "dropout must be in"),
    ("dropout", 1.0, "dropout must be in"),
    ("dropout_position", "encoder", "dropout_position must be one of"),
])
def test_bad_arguments(option: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UNetBaseline(**TINY, **{option: value})

"""U-Net generator, its blocks and ``check_image``: shapes, wiring, gradients and input errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from probseg.layers import DownPath, UNet, check_image, conv_block


def _assert_finite_grads(module: torch.nn.Module) -> None:
    for name, p in module.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient (not connected?)"


@pytest.mark.parametrize(
    ("in_channels", "num_filters", "convs_per_block", "size"),
    [
        (1, [4], 1, (17, 13)),  # depth 1: any size, no up path
        (1, [4, 8], 1, (32, 32)),
        (3, [4, 8, 8], 2, (32, 32)),
        (2, [2, 4, 4, 8], 1, (64, 32)),  # non-square
    ],
)
def test_unet_output_shape_and_finite_gradients(
    in_channels: int, num_filters: list[int], convs_per_block: int, size: tuple[int, int]
) -> None:
    torch.manual_seed(0)
    net = UNet(in_channels, num_filters, convs_per_block)
    x = torch.randn(2, in_channels, *size)
    out = net(x)
    assert out.shape == (2, num_filters[0], *size)
    assert net.out_channels == num_filters[0]
    assert net.downsampling == 2 ** (len(num_filters) - 1)
    (out**2).mean().backward()
    _assert_finite_grads(net)


@pytest.mark.parametrize("convs_per_block", [1, 2, 3])
def test_unet_has_expected_number_of_convolutions(convs_per_block: int) -> None:
    num_filters = [4, 8, 8]
    net = UNet(1, num_filters, convs_per_block)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    # depth blocks down + (depth - 1) blocks up, each with convs_per_block 3x3 convs
    assert len(convs) == (2 * len(num_filters) - 1) * convs_per_block
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)


def test_unet_matches_a_hand_written_two_level_forward() -> None:
    """Contract (avg-pool, block), expand (bilinear upsample, concat [deep, skip], block)."""
    torch.manual_seed(1)
    net = UNet(2, [3, 5], convs_per_block=1)
    x = torch.randn(2, 2, 16, 12)

    def block(seq: torch.nn.Sequential, h: torch.Tensor) -> torch.Tensor:
        conv = seq[0]
        return torch.clamp(F.conv2d(h, conv.weight, conv.bias, padding=1), min=0)

    skip = block(net.down.blocks[0], x)
    pooled = torch.stack(
        [skip[..., i::2, j::2] for i in range(2) for j in range(2)]
    ).mean(0)  # 2x2 average pooling written by hand
    deep = block(net.down.blocks[1], pooled)
    up = F.interpolate(deep, size=(16, 12), mode="bilinear", align_corners=False)
    expected = block(net.up[0], torch.cat([up, skip], dim=1))
    torch.testing.assert_close(net(x), expected)


def test_unet_features_depend_on_the_deep_path() -> None:
    """Changing only the deepest block's weights must change the output (the skip is not all)."""
    torch.manual_seed(2)
    net = UNet(1, [4, 8, 8], 1)
    x = torch.randn(1, 1, 32, 32)
    before = net(x)
    with torch.no_grad():
        net.down.blocks[-1][0].bias.add_(1.0)
    assert not torch.allclose(before, net(x))


def test_unet_wrong_channel_count_is_a_clear_error() -> None:
    net = UNet(3, [4, 8], 1)
    with pytest.raises(ValueError, match="3 image channel"):
        net(torch.randn(1, 1, 32, 32))


@pytest.mark.parametrize("size", [(30, 32), (32, 30), (34, 34)])
def test_unet_non_divisible_size_is_a_clear_error(size: tuple[int, int]) -> None:
    net = UNet(1, [4, 8, 8], 1)  # divisor 4
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(1, 1, *size))


@pytest.mark.parametrize("shape", [(1, 32, 32), (32, 32), (1, 1, 1, 32, 32)])
def test_unet_wrong_ndim_is_a_clear_error(shape: tuple[int, ...]) -> None:
    net = UNet(1, [4, 8], 1)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        net(torch.randn(*shape))


def test_check_image_rejects_integer_images_and_accepts_valid_ones() -> None:
    with pytest.raises(TypeError, match="floating-point"):
        check_image(torch.zeros(1, 1, 8, 8, dtype=torch.long), 1)
    check_image(torch.zeros(2, 3, 8, 12), 3, divisor=4)  # no error


def test_conv_block_and_down_path_arguments() -> None:
    with pytest.raises(ValueError, match="num_convs"):
        conv_block(1, 4, 0)
    with pytest.raises(ValueError, match="num_filters"):
        DownPath(1, [], 1)
    torch.manual_seed(0)
    feats = DownPath(2, [3, 5, 7], 1)(torch.randn(2, 2, 16, 16))
    assert [tuple(f.shape) for f in feats] == [(2, 3, 16, 16), (2, 5, 8, 8), (2, 7, 4, 4)]
    assert all((f >= 0).all() for f in feats)  # every block ends in a ReLU

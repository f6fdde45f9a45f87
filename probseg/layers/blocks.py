"""Convolution blocks shared by the U-Net generator and the Gaussian encoders."""

from __future__ import annotations

from torch import nn


def conv_block(in_channels: int, out_channels: int, num_convs: int) -> nn.Sequential:
    """``num_convs`` 3x3 convolutions (padding 1) each followed by ReLU.

    Args:
        in_channels: channels entering the first convolution.
        out_channels: channels of every convolution's output.
        num_convs: number of conv + ReLU pairs (at least 1).

    Shape:
        (B, in_channels, H, W) -> (B, out_channels, H, W)
    """
    if num_convs < 1:
        raise ValueError(f"num_convs must be at least 1, got {num_convs}")
    layers: list[nn.Module] = []
    for i in range(num_convs):
        layers += [nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class DownPath(nn.Module):
    """Contracting path: level 0 keeps the resolution, every later level halves it first.

    Args:
        in_channels: channels of the input.
        num_filters: output channels per level; its length is the depth.
        convs_per_block: 3x3 convolutions per level.

    Shape:
        (B, in_channels, H, W) -> list of (B, num_filters[i], H / 2**i, W / 2**i)
    """

    def __init__(self, in_channels: int, num_filters: list[int], convs_per_block: int) -> None:
        super().__init__()
        if not num_filters:
            raise ValueError("num_filters must name at least one level")
        channels = [in_channels, *num_filters]
        self.blocks = nn.ModuleList(
            conv_block(channels[i], channels[i + 1], convs_per_block) for i in range(len(num_filters))
        )
        # Average pooling, as in Kohl et al.'s reference implementation.
        self.pool = nn.AvgPool2d(2, 2, ceil_mode=True)

    @property
    def downsampling(self) -> int:
        """Factor by which the deepest level is smaller than the input."""
        return 2 ** (len(self.blocks) - 1)

    def forward(self, x):
        features = []
        for i, block in enumerate(self.blocks):
            if i > 0:
                x = self.pool(x)
            x = block(x)
            features.append(x)
        return features

"""U-Net generator (Ronneberger et al. 2015) as used by the Probabilistic U-Net (Kohl et al. 2018).

The generator returns its last feature map, not logits: the combiner (``combiner.py``) maps features
and a latent code to logits, so the U-Net runs once per image however many hypotheses are drawn.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from probseg.layers.blocks import DownPath, conv_block


class UNet(nn.Module):
    """Configurable U-Net returning the full-resolution feature map of its last block.

    Args:
        in_channels: image channels.
        num_filters: channels per level, shallow to deep (depth = ``len(num_filters)``). Kohl et
            al. use ``[32, 64, 128, 192]``.
        convs_per_block: 3x3 convolutions per block (Kohl et al.: 3).

    Shape:
        (B, in_channels, H, W) -> (B, num_filters[0], H, W). H and W must be divisible by
        ``2 ** (depth - 1)``.
    """

    def __init__(self, in_channels: int = 1, num_filters: list[int] = (32, 64, 128, 192), convs_per_block: int = 3) -> None:
        super().__init__()
        num_filters = list(num_filters)
        self.in_channels = in_channels
        self.out_channels = num_filters[0]
        self.bottleneck_channels = num_filters[-1]  # of the deepest features (``self.down(x)[-1]``)
        self.down = DownPath(in_channels, num_filters, convs_per_block)
        # Up level i takes the upsampled deeper features concatenated with the skip of level i.
        self.up = nn.ModuleList(
            conv_block(num_filters[i + 1] + num_filters[i], num_filters[i], convs_per_block)
            for i in reversed(range(len(num_filters) - 1))
        )

    @property
    def downsampling(self) -> int:
        """H and W must be divisible by this factor."""
        return self.down.downsampling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x, self.in_channels, self.downsampling)
        return self.decode(self.down(x))

    def decode(
        self, skips: list[torch.Tensor], transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The expanding path from the contracting path's features (``self.down(x)``).

        Args:
            skips: features per level, shallow to deep, as returned by ``self.down``.
            transform: optional map applied to the input of every up block (the upsampled deeper
                features concatenated with the skip), e.g. MC dropout.
        """
        skips = list(skips)
        x = skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = torch.cat([x, skip], dim=1)
            x = block(x if transform is None else transform(x))
        return x


def check_image(x: torch.Tensor, in_channels: int, divisor: int = 1) -> None:
    """Raise a clear error when ``x`` is not a (B, in_channels, H, W) batch with H, W divisible."""
    if x.ndim != 4:
        raise ValueError(f"expected an image batch of shape (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(
            f"the model expects {in_channels} image channel(s), got {x.shape[1]} (input shape {tuple(x.shape)})"
        )
    h, w = x.shape[-2:]
    if h % divisor or w % divisor:
        raise ValueError(
            f"image height and width must be divisible by {divisor} for this network depth, got {h}x{w}"
        )
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point image, got dtype {x.dtype}")

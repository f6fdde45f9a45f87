"""The combiner ("fcomb") of the Probabilistic U-Net (Kohl et al. 2018).

A latent code z is tiled over the U-Net's last feature map, concatenated to it, and a stack of 1x1
convolutions maps the result to logits. Drawing S hypotheses therefore costs S passes of these 1x1
convolutions and none of the U-Net.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Combiner(nn.Module):
    """1x1-convolution head over [features, tiled z].

    The first convolution acts on a concatenation, so it splits into a feature part computed once
    per image and a latent part that is a per-sample bias:

    .. math::
        W [f; z] + b = W_f f + (W_z z + b)

    which gives the same result as tiling z and avoids S copies of the feature map in the first
    layer. The parameters are ordinary ``nn.Conv2d`` 1x1 kernels; the forward pass applies them as
    channels-last matrix products.

    Args:
        feature_channels: channels of the U-Net feature map.
        latent_dim: L.
        num_classes: K, logits per pixel.
        num_layers: 1x1 convolutions in total, the last producing logits (Kohl et al.: 4).
        hidden_channels: width of the hidden 1x1 convolutions (default: feature_channels).

    Shape:
        features (B, F, H, W) and z (B, L) -> logits (B, K, H, W);
        features (B, F, H, W) and z (B, S, L) -> logits (B, S, K, H, W).
    """

    def __init__(
        self,
        feature_channels: int,
        latent_dim: int,
        num_classes: int,
        num_layers: int = 4,
        hidden_channels: int | None = None,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        hidden = hidden_channels or feature_channels
        self.feature_channels = feature_channels
        self.latent_dim = latent_dim
        widths = [feature_channels + latent_dim] + [hidden] * (num_layers - 1) + [num_classes]
        self.convs = nn.ModuleList(nn.Conv2d(widths[i], widths[i + 1], 1) for i in range(num_layers))

    def forward(self, features: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if features.ndim != 4 or features.shape[1] != self.feature_channels:
            raise ValueError(
                f"expected features of shape (B, {self.feature_channels}, H, W), got {tuple(features.shape)}"
            )
        per_sample = z.ndim == 3
        if z.ndim == 2:
            z = z.unsqueeze(1)
        if z.ndim != 3 or z.shape[0] != features.shape[0] or z.shape[-1] != self.latent_dim:
            raise ValueError(
                f"expected z of shape (B, {self.latent_dim}) or (B, S, {self.latent_dim}) with "
                f"B={features.shape[0]}, got {tuple(z.shape)}"
            )
        # 1x1 convolutions are matrix products over channels; computed channels-last they run as a
        # few large matmuls, much faster than conv2d with 1x1 kernels on many small images.
        first = self.convs[0]
        weight = first.weight.flatten(1)  # (out, F + L)
        w_feat, w_z = weight[:, : self.feature_channels], weight[:, self.feature_channels :]
        feat = torch.einsum("bfhw,of->bhwo", features, w_feat)  # (B, H, W, out), once per image
        bias = z @ w_z.T + first.bias  # (B, S, out)
        x = feat.unsqueeze(1) + bias[:, :, None, None, :]  # (B, S, H, W, out)
        for conv in self.convs[1:]:
            # In place is safe: neither the add nor F.linear needs its own output for backward.
            x = F.linear(torch.relu_(x), conv.weight.flatten(1), conv.bias)
        logits = x.permute(0, 1, 4, 2, 3).contiguous()  # (B, S, K, H, W)
        return logits if per_sample else logits.squeeze(1)

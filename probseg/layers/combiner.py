"""The combiner ("fcomb") of the Probabilistic U-Net (Kohl et al. 2018).

A latent code z is tiled over the U-Net's last feature map, concatenated to it, and a stack of 1x1
convolutions maps the result to logits. Drawing S hypotheses therefore costs S passes of these 1x1
convolutions and none of the U-Net.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CACHE_BYTES = 2 << 20
"""Activations of one chunk of hypotheses in the CPU path, per thread (one 128x128 hypothesis at 32
channels; the best chunk measured at 1 and 2 threads)."""


class Combiner(nn.Module):
    """1x1-convolution head over [features, tiled z].

    The first convolution acts on a concatenation, so it splits into a feature part computed once
    per image and a latent part that is a per-sample bias:

    .. math::
        W [f; z] + b = W_f f + (W_z z + b)

    which gives the same result as tiling z and avoids S copies of the feature map in the first
    layer. The parameters are ordinary ``nn.Conv2d`` 1x1 kernels. On GPUs the forward pass applies
    them as channels-first matrix products over the flattened pixels, every hypothesis at once; on
    CPU over chunks of hypotheses of about :data:`CACHE_BYTES` of activations per thread,
    so that a chunk stays in cache between layers (the work is memory-bound).

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
        first = self.convs[0]
        w_feat, w_z = first.weight[:, : self.feature_channels], first.weight.flatten(1)[:, self.feature_channels :]
        path = self._chunked if features.device.type == "cpu" else self._batched
        logits = path(features, z, w_feat, w_z)
        return logits if per_sample else logits.squeeze(1)

    def _batched(self, features: torch.Tensor, z: torch.Tensor, w_feat: torch.Tensor,
                 w_z: torch.Tensor) -> torch.Tensor:
        """The GPU path: channels-first matrix products over the flattened pixels, (out, F) @ (F, HW)
        once per image, then per hypothesis a bias and the remaining layers, every hypothesis in
        one batch; each layer's output is already in the (K, H, W) layout of the logits."""
        b, _, h, w = features.shape
        feat = torch.matmul(w_feat.flatten(1), features.flatten(2))  # (B, out, HW)
        bias = z @ w_z.T + self.convs[0].bias  # (B, S, out)
        x = self._head((feat.unsqueeze(1) + bias[..., None]).flatten(0, 1))
        return x.view(b, z.shape[1], -1, h, w)

    def _chunked(self, features: torch.Tensor, z: torch.Tensor, w_feat: torch.Tensor,
                 w_z: torch.Tensor) -> torch.Tensor:
        """The CPU path: chunks of hypotheses of about :data:`CACHE_BYTES` of activations per thread, so a
        chunk stays in cache between layers (the work is memory-bound); the layers as 1x1
        convolutions (oneDNN), or with one thread as batched matrix products (MKL). Mixing MKL's
        thread pool with the convolutions' costs more than the products on a few cores."""
        b, _, h, w = features.shape
        s = z.shape[1]
        feat = F.conv2d(features, w_feat)  # (B, out, H, W), once per image
        bias = (z[..., None] * w_z.T).sum(-2) + self.convs[0].bias  # (B, S, out), without a matmul
        per_hypothesis = feat.shape[1] * h * w * feat.element_size()
        chunk = max(1, CACHE_BYTES * torch.get_num_threads() // per_hypothesis)
        # One thread: MKL's batched products are the fastest head. Several: oneDNN's convolutions,
        # since MKL's thread pool and oneDNN's would take turns spinning on the same cores.
        products = torch.get_num_threads() == 1
        pieces = []
        for i in range(b):
            for j in range(0, s, chunk):
                x = feat[i].unsqueeze(0) + bias[i, j : j + chunk, :, None, None]
                if products:
                    pieces.append(self._head(x.flatten(2)).view(x.shape[0], -1, h, w))
                    continue
                for conv in self.convs[1:]:
                    # In place is safe: neither the add nor the convolution needs its own output for backward.
                    x = F.conv2d(torch.relu_(x), conv.weight, conv.bias)
                pieces.append(x)
        return torch.cat(pieces).contiguous().view(b, s, -1, h, w)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """(N, out, HW) first-layer pre-activations -> (N, K, HW) logits."""
        for conv in self.convs[1:]:
            # In place is safe: neither the add nor baddbmm needs its own output for backward.
            w = conv.weight.flatten(1)
            x = torch.baddbmm(conv.bias[:, None], w.expand(x.shape[0], -1, -1), torch.relu_(x))
        return x

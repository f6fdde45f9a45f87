"""Axis-aligned Gaussian prior p(z|x) and posterior q(z|x,y) of the Probabilistic U-Net.

Kohl et al. 2018, "A Probabilistic U-Net for Segmentation of Ambiguous Images": each encoder is
the contracting half of a U-Net, globally average-pooled, followed by a 1x1 convolution giving the
mean and log standard deviation of an L-dimensional Normal with diagonal covariance.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Independent, Normal

from probseg.layers.blocks import DownPath
from probseg.layers.unet import check_image

Generators = torch.Generator | Sequence[torch.Generator] | None
"""A torch.Generator, one generator per image of the batch, or None (torch's global RNG)."""


class GaussianEncoder(nn.Module):
    """Encoder returning ``Independent(Normal(mu, sigma), 1)`` over an L-dimensional latent.

    The log standard deviation is soft-clamped to ``[-log_sigma_bound, log_sigma_bound]`` with a
    scaled tanh, so sigma never underflows to 0 nor overflows while gradients still flow:

    .. math::
        \\log\\sigma = b \\tanh(s / b)

    Args:
        in_channels: input channels (image channels, plus classes for the posterior).
        num_filters: channels per level of the contracting path.
        convs_per_block: 3x3 convolutions per level.
        latent_dim: L, the latent dimension (Kohl et al.: 6).
        log_sigma_bound: b above.

    Shape:
        (B, in_channels, H, W) -> distribution with batch shape (B,) and event shape (L,).
    """

    def __init__(
        self,
        in_channels: int,
        num_filters: list[int],
        convs_per_block: int,
        latent_dim: int,
        log_sigma_bound: float = 10.0,
    ) -> None:
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be positive, got {latent_dim}")
        self.in_channels = in_channels
        self.latent_dim = latent_dim
        self.log_sigma_bound = log_sigma_bound
        self.down = DownPath(in_channels, list(num_filters), convs_per_block)
        self.feature_dim = list(num_filters)[-1]
        self.head = nn.Linear(self.feature_dim, 2 * latent_dim)
        # Start near N(0, I), as the 1x1 conv of Kohl et al. with small initial weights would.
        nn.init.normal_(self.head.weight, std=1e-3)
        nn.init.zeros_(self.head.bias)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features, (B, C, H, W) -> (B, feature_dim). Flow heads amortize from these."""
        check_image(x, self.in_channels)
        return self.down(x)[-1].mean(dim=(-2, -1))

    def distribution(self, features: torch.Tensor) -> Independent:
        """Normal with diagonal covariance from pooled features (B, feature_dim)."""
        # The latent statistics stay float32 under mixed precision: KL terms, log-densities and
        # the Gini index of sigma are sensitive to bf16's 8-bit mantissa.
        features = full_precision(features)  # (before leaving autocast: it asks whether autocast is on)
        with torch.autocast(device_type=features.device.type, enabled=False):
            mu, raw_log_sigma = self.head(features).chunk(2, dim=-1)
        b = self.log_sigma_bound
        log_sigma = b * torch.tanh(raw_log_sigma / b)
        # No argument validation: sigma = exp(bounded) is positive by construction, and the
        # validation reads values back to the host (a synchronisation per distribution and per
        # log_prob); a non-finite mu surfaces as a non-finite loss term, which the task names.
        return Independent(Normal(mu, log_sigma.exp(), validate_args=False), 1, validate_args=False)

    def forward(self, x: torch.Tensor) -> Independent:
        return self.distribution(self.encode(x))


class PriorEncoder(GaussianEncoder):
    """p(z | x): sees the image only. Shape: (B, C, H, W) -> batch (B,), event (L,)."""


class PosteriorEncoder(GaussianEncoder):
    """q(z | x, y): sees the image concatenated with the one-hot segmentation.

    Args:
        image_channels: C of the image.
        num_classes: K; the mask is one-hot encoded into K channels.
        (other arguments as in :class:`GaussianEncoder`)

    Shape:
        image (B, C, H, W) and mask (B, H, W) integer class ids (or (B, K, H, W) one-hot or soft
        labels) -> batch (B,), event (L,).
    """

    def __init__(
        self,
        image_channels: int,
        num_classes: int,
        num_filters: list[int],
        convs_per_block: int,
        latent_dim: int,
        log_sigma_bound: float = 10.0,
    ) -> None:
        super().__init__(image_channels + num_classes, num_filters, convs_per_block, latent_dim, log_sigma_bound)
        self.num_classes = num_classes

    def features(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pooled features of image and mask, (B, feature_dim). Flow heads amortize from these."""
        return self.encode(torch.cat([image, self.mask_channels(mask, image)], dim=1))

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> Independent:  # type: ignore[override]
        return self.distribution(self.features(image, mask))

    def mask_channels(self, mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """(B, H, W) class ids -> (B, K, H, W) one-hot in the image dtype; (B, K, H, W) passes through."""
        if mask.ndim == 3:
            if mask.is_floating_point():
                raise TypeError(f"a (B, H, W) mask must hold integer class ids, got dtype {mask.dtype}")
            mask = F.one_hot(mask.long(), self.num_classes).permute(0, 3, 1, 2)
        if (
            mask.ndim != 4
            or mask.shape[0] != image.shape[0]
            or mask.shape[1] != self.num_classes
            or mask.shape[-2:] != image.shape[-2:]
        ):
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not match image {tuple(image.shape)} with "
                f"{self.num_classes} classes: expected (B, H, W) ids or (B, {self.num_classes}, H, W)"
            )
        return mask.to(image.dtype)


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 when autocast made it half precision (a model whose weights are half
    precision, e.g. ``bf16-true``, keeps its dtype; float64 stays float64)."""
    half = x.dtype in (torch.float16, torch.bfloat16)
    return x.float() if half and torch.is_autocast_enabled(x.device.type) else x


def sample_set(distribution: Independent, num_samples: int, generator: Generators = None) -> torch.Tensor:
    """Reparameterized draws from a diagonal Normal with the set axis after the batch axis.

    Unlike ``distribution.rsample((S,))`` this accepts a torch.Generator and returns (B, S, L).

    Args:
        distribution: ``Independent(Normal(mu, sigma), 1)`` with batch (B,) and event (L,).
        num_samples: S.
        generator: optional torch.Generator on the distribution's device, or a sequence of B
            generators, one per image: image b's draws then depend on its own generator only,
            not on the batch it sits in (evaluation seeds them by dataset index, so results do
            not depend on batching or on the number of processes).

    Returns:
        (B, S, L) samples ``mu + sigma * eps``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    base = distribution.base_dist
    mu, sigma = base.loc, base.scale
    shape = (mu.shape[0], num_samples, mu.shape[-1])
    if generator is None or isinstance(generator, torch.Generator):
        eps = torch.randn(shape, generator=generator, device=mu.device, dtype=mu.dtype)
    else:
        generators = list(generator)
        if len(generators) != mu.shape[0]:
            raise ValueError(f"got {len(generators)} generators for a batch of {mu.shape[0]} images")
        eps = torch.stack([torch.randn(shape[1:], generator=g, device=mu.device, dtype=mu.dtype) for g in generators])
    return mu.unsqueeze(1) + sigma.unsqueeze(1) * eps

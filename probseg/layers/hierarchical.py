"""Hierarchical latents at several resolutions: the prior and posterior of PHiSeg and HPU-Net.

Baumgartner et al. 2019, "PHiSeg: Capturing Uncertainty in Medical Image Segmentation" (MICCAI);
Kohl et al. 2019, "A Hierarchical Probabilistic U-Net for Modeling Multi-Scale Ambiguities".

A contracting path gives features f_r at resolution levels r = 0 (input size) ... R - 1 (the
coarsest). The latents sit at the coarsest ``latent_levels`` levels; they are drawn top-down,
each level conditioned on the level above:

.. math::
    z_{R-1} \\sim \\mathcal N\\big(\\mu(f_{R-1}), \\sigma(f_{R-1})\\big), \\qquad
    z_r \\sim \\mathcal N\\big(\\mu(h_r), \\sigma(h_r)\\big), \\quad
    h_r = \\mathrm{block}\\big([\\, f_r, \\; \\mathrm{up}(c_{r+1}) \\,]\\big)

Each z_r is a spatial map, (B, latent_dim, H / 2^r, W / 2^r), with an axis-aligned Normal
(event: all of its entries). What is passed down, c_{r+1}, is the model's choice:

* ``carry_state=False`` (PHiSeg): the latent alone, refined by two convolutions after the
  upsampling, so p(z_r | z_{r+1}, x) is Markov in the latents;
* ``carry_state=True`` (HPU-Net): the decoder state and the latent, [z_{r+1}, h_{r+1}] (the top
  state is f_{R-1}), so the hierarchy is the decoder of a U-Net whose coarse levels inject
  latents; the state continues to full resolution as the HPU-Net's likelihood.

Standard deviations: ``"softplus"`` (PHiSeg) or ``"exp"`` (HPU-Net) of a 1x1 convolution; the
exp is soft-bounded (log sigma in [-10, 10], as every Gaussian head of the zoo) and softplus gets
a floor of 1e-6, so no KL divides by 0.

The posterior is the same module with the one-hot segmentation concatenated to the image. In
training the prior is run on the posterior's draws (``given``), so its level-l distribution is
p(z_l | z_{l+1} ~ q, x), the term the per-level KL compares with q(z_l | z_{l+1}, x, y).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Independent, Normal

from probseg.layers.blocks import DownPath, conv_block
from probseg.layers.gaussian import Generators, full_precision

SIGMA_ACTIVATIONS = ("softplus", "exp")
LOG_SIGMA_BOUND = 10.0
SOFTPLUS_FLOOR = 1e-6


def spatial_normal(mu: torch.Tensor, sigma: torch.Tensor) -> Independent:
    """Axis-aligned Normal over a (B, d, h, w) latent map: batch (B,), event (d, h, w)."""
    return Independent(Normal(mu, sigma, validate_args=False), 3, validate_args=False)


def draw(distribution: Independent, generator: Generators = None) -> torch.Tensor:
    """One reparameterized draw mu + sigma * eps; ``generator``: one, one per image, or None."""
    mu, sigma = distribution.base_dist.loc, distribution.base_dist.scale
    if generator is None or isinstance(generator, torch.Generator):
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    else:
        generators = list(generator)
        if len(generators) != mu.shape[0]:
            raise ValueError(f"got {len(generators)} generators for {mu.shape[0]} latent maps")
        eps = torch.stack([torch.randn(mu.shape[1:], generator=g, device=mu.device, dtype=mu.dtype)
                           for g in generators])
    return mu + sigma * eps


class HierarchicalLatents(nn.Module):
    """Contracting path plus top-down latent levels (see the module docstring).

    Args:
        in_channels: input channels (image, plus classes for a posterior).
        num_filters: channels per resolution level; R = its length.
        convs_per_block: 3x3 convolutions per block.
        latent_levels: latent levels at the coarsest resolutions, 1 <= latent_levels <= R.
        latent_dim: channels of every latent map (PHiSeg and HPU-Net: 2 and 1).
        carry_state: pass the decoder state down with the latent (HPU-Net) or the latent only
            (PHiSeg).
        sigma_activation: "softplus" (PHiSeg) or "exp" (HPU-Net).

    Forward: ``(distributions, latents, state)``, the lists coarse to fine (level index R - 1
    first); ``state`` is the decoder state at the finest latent level (carry_state only, else
    None). A caller that decodes further passes the contracting path's features (``skips``).
    """

    def __init__(self, in_channels: int, num_filters: Sequence[int], convs_per_block: int, latent_levels: int,
                 latent_dim: int, carry_state: bool, sigma_activation: str) -> None:
        super().__init__()
        num_filters = list(num_filters)
        depth = len(num_filters)
        if not 1 <= latent_levels <= depth:
            raise ValueError(f"latent_levels must be between 1 and the {depth} resolution levels of num_filters, "
                             f"got {latent_levels}")
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be positive, got {latent_dim}")
        if sigma_activation not in SIGMA_ACTIVATIONS:
            raise ValueError(f"sigma_activation must be one of {SIGMA_ACTIVATIONS}, got {sigma_activation!r}")
        self.latent_levels = latent_levels
        self.latent_dim = latent_dim
        self.carry_state = carry_state
        self.sigma_activation = sigma_activation
        self.down = DownPath(in_channels, num_filters, convs_per_block)
        top = depth - 1
        self.resolutions = list(range(top, top - latent_levels, -1))  # coarse to fine
        self.heads = nn.ModuleList()
        self.conditioners = nn.ModuleList()  # level r < top: what comes down from r + 1
        self.blocks = nn.ModuleList()
        for r in self.resolutions:
            if r < top:
                if carry_state:
                    self.conditioners.append(nn.Identity())
                    down_channels = latent_dim + num_filters[r + 1]
                else:  # PHiSeg: two convolutions refine the upsampled latent
                    self.conditioners.append(conv_block(latent_dim, num_filters[r], 2))
                    down_channels = num_filters[r]
                self.blocks.append(conv_block(num_filters[r] + down_channels, num_filters[r], convs_per_block))
            head = nn.Conv2d(num_filters[r], 2 * latent_dim, 1)
            # Start prior and posterior at the same Normal (KL near 0), as the zoo's other heads.
            nn.init.normal_(head.weight, std=1e-3)
            nn.init.zeros_(head.bias)
            self.heads.append(head)
        self.state_channels = num_filters[self.resolutions[-1]]

    def distribution(self, level: int, features: torch.Tensor) -> Independent:
        """The Normal of latent level ``level`` (0 = the coarsest) from its features."""
        features = full_precision(features)
        with torch.autocast(device_type=features.device.type, enabled=False):
            mu, raw = self.heads[level](features).chunk(2, dim=1)
        if self.sigma_activation == "softplus":
            sigma = F.softplus(raw) + SOFTPLUS_FLOOR
        else:
            sigma = (LOG_SIGMA_BOUND * torch.tanh(raw / LOG_SIGMA_BOUND)).exp()
        return spatial_normal(mu, sigma)

    def forward(self, x: torch.Tensor, given: Sequence[torch.Tensor] | None = None, generator: Generators = None,
                skips: list[torch.Tensor] | None = None, use_mean: bool = False,
                ) -> tuple[list[Independent], list[torch.Tensor], torch.Tensor | None]:
        """Top-down pass.

        Args:
            x: (B, C, H, W) input (ignored when ``skips`` is given).
            given: latents to condition on, coarse to fine (e.g. the posterior's draws); each
                level then uses these instead of its own draw.
            generator: source of the draws.
            skips: the contracting path's features of ``x`` (``self.down(x)``), when already
                computed (e.g. tiled for several hypotheses).
            use_mean: draw nothing; each level's latent is its mean.
        """
        if skips is None:
            skips = self.down(x)
        top = len(skips) - 1
        distributions: list[Independent] = []
        latents: list[torch.Tensor] = []
        state = skips[top]
        for level, r in enumerate(self.resolutions):
            if r < top:
                below = latents[-1] if not self.carry_state else torch.cat([latents[-1], state.to(latents[-1].dtype)], 1)
                below = F.interpolate(below, size=skips[r].shape[-2:], mode="bilinear", align_corners=False)
                state = self.blocks[level - 1](torch.cat([skips[r], self.conditioners[level - 1](below.to(skips[r].dtype))], 1))
            distribution = self.distribution(level, state)
            distributions.append(distribution)
            if given is not None:
                z = given[level]
            elif use_mean:
                z = distribution.base_dist.loc
            else:
                z = draw(distribution, generator)
            latents.append(z)
        return distributions, latents, (state if self.carry_state else None)

    def sigmas(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, d h w) standard deviations of each level, coarse to fine, each level conditioned on
        the means of the levels above (deterministic: no random number is drawn)."""
        distributions, _, _ = self(x, use_mean=True)
        return [d.base_dist.scale.flatten(1) for d in distributions]


def per_image_generators(generator: Generators, num_samples: int, batch_size: int | None = None) -> Generators:
    """Generators for S draws per image laid out image-major (B * S rows): a sequence of B
    generators becomes B * S entries, image b's repeated S times. Rows draw in order, so image b's
    S draws are successive draws of its own stream, whatever batch it sits in. With
    ``batch_size``, a sequence of another length is refused."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    generators = list(generator)
    if batch_size is not None and len(generators) != batch_size:
        raise ValueError(f"got {len(generators)} generators for a batch of {batch_size} images")
    return [g for g in generators for _ in range(num_samples)]

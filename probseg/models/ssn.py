"""Stochastic Segmentation Networks.

Monteiro et al. 2020, "Stochastic Segmentation Networks: Modelling Spatially Correlated Aleatoric
Uncertainty", NeurIPS.

The U-Net's last features give, per pixel, a mean mu, a log variance log D and a rank-r factor P
of one low-rank multivariate Normal over ALL N = K H W logits of the image:

.. math::
    \\eta \\sim \\mathcal N\\big(\\mu, \\; P P^\\top + \\mathrm{diag}(D)\\big), \\qquad
    \\eta = \\mu + P \\varepsilon_r + \\sqrt{D} \\odot \\varepsilon_N, \\quad
    \\varepsilon_r \\sim \\mathcal N(0, I_r), \\; \\varepsilon_N \\sim \\mathcal N(0, I_N)

(the reparameterization of ``torch.distributions.LowRankMultivariateNormal``; no covariance is
ever formed). Training maximizes the Monte Carlo estimate of the marginal likelihood over M
draws:

.. math::
    \\mathcal L = -\\log \\frac{1}{M} \\sum_{m=1}^{M} \\exp\\Big(\\sum_{\\text{pixels}}
        \\log p(y \\mid \\eta_m)\\Big)
        = -\\Big(\\operatorname{logsumexp}_m \\textstyle\\sum_{\\text{pixels}} \\log
        \\operatorname{softmax}(\\eta_m)_y - \\log M\\Big)

per image, averaged over the batch (for a soft target y, :math:`\\sum_k y_k \\log
\\operatorname{softmax}(\\eta_m)_k` per pixel). With ``antithetic=True`` half of the draws are the
mirror images 2 mu - eta of the other half, as in the authors' code.

Hypotheses cost one network pass and S cheap draws (an (N, r) x (r, S) product and a noise map).

The Gini index of an SSN is taken over the singular values of its low-rank factor P (r per
image), the spread of its structured covariance; the diagonal D is pixel-independent noise.

Region of interest (``roi="nonzero"``, the authors' BraTS code): outside the pixels where any
image channel is non-zero, P and D are zeroed, so the logits there are the mean mu exactly; a
floor ``eps`` on D keeps the covariance positive definite in uniform (all-background) images.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.distributions import LowRankMultivariateNormal

from probseg.layers import build_generator
from probseg.layers.generators import without_weights_file
from probseg.layers.gaussian import Generators
from probseg.models.base import ProbSegModel
from probseg.models.network import Network, NetworkOutput
from probseg.models.objectives import LossTerms, Objective, StepContext
from probseg.models.registry import register_model

ROIS = ("none", "nonzero")
LOG_DIAG_BOUND = 20.0
"""|log D| stays below this (a soft bound, tanh): D in [2e-9, 5e8], finite in float32."""


def low_rank_draws(loc: torch.Tensor, factor: torch.Tensor, diag: torch.Tensor, num_samples: int,
                   generator: Generators = None, antithetic: bool = False) -> torch.Tensor:
    """S reparameterized draws of N(loc, factor factor^T + diag(diag)), per image.

    Args:
        loc: (B, N) means.
        factor: (B, N, r) low-rank factor P.
        diag: (B, N) positive diagonal D.
        num_samples: S (even when ``antithetic``).
        generator: one torch.Generator, or one per image (each image's draws then do not depend on
            the batch it sits in); None uses the global RNG.
        antithetic: the second half of the draws mirror the first, 2 loc - eta.

    Returns:
        (B, S, N) draws.
    """
    b, n, r = factor.shape
    half = num_samples // 2 if antithetic else num_samples
    if antithetic and num_samples % 2:
        raise ValueError(f"antithetic draws come in pairs: num_samples must be even, got {num_samples}")

    def noise(*shape: int) -> torch.Tensor:
        if isinstance(generator, (list, tuple)):
            if len(generator) != b:
                raise ValueError(f"got {len(generator)} generators for a batch of {b} images")
            return torch.stack([torch.randn(*shape[1:], generator=g, device=loc.device, dtype=loc.dtype)
                                for g in generator])
        return torch.randn(*shape, generator=generator, device=loc.device, dtype=loc.dtype)

    eps_r, eps_n = noise(b, half, r), noise(b, half, n)
    # P eps_r + sqrt(D) eps_n in two passes over the (B, half, N) output: a batched matmul, then
    # a fused multiply-add (S draws cost little next to the network's one pass).
    offsets = torch.bmm(eps_r, factor.transpose(1, 2)).addcmul_(diag.sqrt()[:, None], eps_n)
    if antithetic:
        return torch.cat([loc[:, None] + offsets, loc[:, None] - offsets], dim=1)
    return offsets.add_(loc[:, None])


class SSNNetwork(Network):
    """U-Net features -> per-pixel mean, log variance and rank-r factor of the logits' Normal.

    Args:
        in_channels, num_classes, num_filters, convs_per_block, rank, eps, roi: as in
            :class:`StochasticSegmentationNetwork`.
        generator, generator_options: the encoder-decoder, see
            :func:`~probseg.layers.generators.build_generator`.

    Forward outputs: ``logits`` (the mean mu, (B, K, H, W)), ``loc`` (B, N), ``factor`` (B, N, r)
    and ``diag`` (B, N), N = K H W.
    """

    def __init__(self, in_channels: int, num_classes: int, num_filters: list[int], convs_per_block: int,
                 rank: int, eps: float, roi: str, generator: str = "unet",
                 generator_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.rank = rank
        self.eps = eps
        self.roi = roi
        self.unet = build_generator(in_channels, num_filters, convs_per_block, generator, generator_options)
        width = self.unet.out_channels
        self.mean = nn.Conv2d(width, num_classes, 1)
        self.log_diag = nn.Conv2d(width, num_classes, 1)
        self.factor = nn.Conv2d(width, num_classes * rank, 1)

    def parameters_of(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loc (B, N), factor (B, N, r), diag (B, N)) of an image batch; N = K H W, ordered as
        (K, H, W) flattened."""
        features = self.unet(images)
        b, _, h, w = features.shape
        k, r = self.num_classes, self.rank
        loc = self.mean(features).flatten(1)
        factor = self.factor(features).view(b, k, r, h, w).permute(0, 1, 3, 4, 2).reshape(b, k * h * w, r)
        # log D soft-bounded to [-LOG_DIAG_BOUND, LOG_DIAG_BOUND]: exp of an unbounded head (the
        # authors' code) overflows to inf for extreme inputs, and inf * 0 noise is NaN.
        raw = self.log_diag(features).flatten(1)
        diag = (LOG_DIAG_BOUND * torch.tanh(raw / LOG_DIAG_BOUND)).exp()
        if self.roi == "nonzero":
            inside = (images != 0).any(dim=1, keepdim=True).expand(b, k, h, w).flatten(1).to(loc.dtype)
            factor = factor * inside[..., None]
            diag = diag * inside
        return loc, factor, diag + self.eps

    def distribution(self, images: torch.Tensor) -> LowRankMultivariateNormal:
        """The Normal over the flattened logits, as a torch distribution (for log-densities)."""
        loc, factor, diag = self.parameters_of(images)
        return LowRankMultivariateNormal(loc, factor, diag, validate_args=False)

    def forward(self, batch: dict[str, Any], target: torch.Tensor,
                generator: torch.Generator | None = None) -> NetworkOutput:
        images = batch["image"]
        loc, factor, diag = self.parameters_of(images)
        return {"logits": loc.view(images.shape[0], self.num_classes, *images.shape[-2:]),
                "loc": loc, "factor": factor, "diag": diag}

    def sample(self, images: torch.Tensor, num_samples: int = 16, generator: Generators = None) -> torch.Tensor:
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        loc, factor, diag = self.parameters_of(images)
        draws = low_rank_draws(loc, factor, diag, num_samples, generator)
        return draws.view(images.shape[0], num_samples, self.num_classes, *images.shape[-2:])

    def prior_sigmas(self, images: torch.Tensor) -> torch.Tensor:
        """Singular values of the low-rank factor P, (B, r): the scales of the structured part of
        the logits' covariance (see the module docstring)."""
        _, factor, _ = self.parameters_of(images)
        return torch.linalg.svdvals(factor.float())


def ssn_log_likelihood(draws: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """log (1/M) sum_m exp(sum_pixels log p(y | eta_m)) per image.

    Args:
        draws: (B, M, K, H, W) logits eta_m.
        target: (B, H, W) class ids or (B, K, H, W) probabilities.

    Returns:
        (B,) Monte Carlo log-likelihoods.
    """
    log_probs = draws.float().log_softmax(dim=2)
    if target.ndim == 3:
        per_pixel = log_probs.gather(2, target[:, None, None].long().expand(-1, draws.shape[1], 1, -1, -1))[:, :, 0]
    else:
        per_pixel = (target[:, None].to(log_probs.dtype) * log_probs).sum(2)
    per_draw = per_pixel.flatten(2).sum(-1)  # (B, M)
    return per_draw.logsumexp(dim=1) - math.log(draws.shape[1])


class SSNLikelihood(Objective):
    """The SSN's training loss: term ``rec_ssn``, minus the Monte Carlo log-likelihood of the
    target over M draws (:func:`ssn_log_likelihood`), mean over the batch.

    Args:
        num_samples: M.
        antithetic: mirrored draw pairs (M even).
    """

    name = "ssn_likelihood"

    def __init__(self, num_samples: int = 20, antithetic: bool = False) -> None:
        if num_samples < 1 or (antithetic and num_samples % 2):
            raise ValueError(f"mc_samples must be positive (and even with antithetic draws), got {num_samples}")
        self.num_samples = num_samples
        self.antithetic = antithetic

    def __call__(self, context: StepContext) -> LossTerms:
        out = context.outputs
        draws = low_rank_draws(out["loc"], out["factor"], out["diag"], self.num_samples, context.generator,
                               self.antithetic)
        draws = draws.view(*draws.shape[:2], *out["logits"].shape[1:])
        return LossTerms({"rec_ssn": -ssn_log_likelihood(draws, context.target).mean()})


@register_model("ssn")
class StochasticSegmentationNetwork(ProbSegModel):
    """Stochastic Segmentation Network (registry name ``"ssn"``).

    Args:
        num_filters: U-Net channels per level.
        convs_per_block: 3x3 convolutions per level.
        rank: r, the rank of the covariance factor (Monteiro et al.: 10).
        mc_samples: M, Monte Carlo draws of the training loss (Monteiro et al.: 20).
        antithetic: draw M / 2 pairs eta, 2 mu - eta (the authors' code).
        eps: floor added to the diagonal D (the authors' code: 1e-5).
        roi: ``"none"`` or ``"nonzero"``: zero P and D outside the pixels where the image is
            non-zero (the authors' BraTS code).
        generator, generator_options: the encoder-decoder: ``"unet"`` (the zoo's, sized by
            ``num_filters`` and ``convs_per_block``) or ``"smp"`` with options such as
            ``{"encoder_name": "resnet18"}`` (:mod:`probseg.layers.generators`).
        **kwargs: the shared options of :class:`~probseg.models.base.ProbSegModel`. The SSN's
            likelihood replaces the reconstruction loss, so ``reconstruction`` and
            ``loss_options`` are refused; ``fusion`` chooses the target as for every model.

    Loss terms: ``rec_ssn`` (minus the Monte Carlo marginal log-likelihood, pixel sum, batch mean).
    """

    reconstructs = False

    def __init__(
        self,
        *,
        num_filters: list[int] = [32, 64, 128, 192],  # noqa: B006 (plain list for YAML and hparams)
        convs_per_block: int = 3,
        rank: int = 10,
        mc_samples: int = 20,
        antithetic: bool = False,
        eps: float = 1e-5,
        roi: str = "none",
        generator: str = "unet",
        generator_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        for key in ("reconstruction", "loss_options"):
            if kwargs.get(key):
                raise ValueError(f"{key} does not apply to the SSN: its Monte Carlo likelihood is its reconstruction loss")
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        if roi not in ROIS:
            raise ValueError(f"roi must be one of {ROIS}, got {roi!r}")
        likelihood = SSNLikelihood(mc_samples, antithetic)
        super().__init__(**kwargs)
        self.objectives = [likelihood]
        self.network = SSNNetwork(self.in_channels, self.num_classes, num_filters, convs_per_block, rank, eps, roi,
                                  generator, generator_options)
        self.hparams["generator_options"] = without_weights_file(generator_options)

"""Hierarchical Probabilistic U-Net (HPU-Net).

Kohl et al. 2019, "A Hierarchical Probabilistic U-Net for Modeling Multi-Scale Ambiguities".

A U-Net whose coarsest decoder levels inject latent maps: the prior is the U-Net itself, its
decoder state at level r giving p(z_r | z_{>r}, x), and [z_r, state] going up to the next level
(:mod:`probseg.layers.hierarchical`, ``carry_state=True``); below the finest latent level the
decoder continues deterministically to full resolution and a 1x1 convolution gives the logits. The
posterior is a second network of the same architecture on the image and the one-hot segmentation.
In training the prior's decoder runs on the posterior's draws, and its output is the one
likelihood of the model:

.. math::
    \\mathcal L = \\mathrm{CE}_{\\text{top-}k}\\big(y, f(x, z_{q})\\big)
        + \\beta \\sum_l \\mathrm{KL}\\big(q(z_l \\mid z_{>l}, x, y) \\,\\|\\, p(z_l \\mid z_{>l}, x)\\big)

with the KL of each level summed over its map, unweighted across levels, and the reconstruction
the stochastic top-k cross-entropy of the paper (``top_k=0.02``: 2% of the batch's pixels, drawn
without replacement with probability proportional to their cross-entropy, via Gumbel top-k; the
gradient flows through the selected pixels' CE only). ``top_k=0`` uses the task's reconstruction
(``rec_ce`` summed over all pixels, or any ``reconstruction`` mix).

As in the paper, the reconstruction is trained under a GECO constraint by default
(:class:`GECO`: lambda times the top-k CE minus kappa = 0.05 nats per selected pixel, lambda
adapted every step); ``geco=False`` gives the plain ELBO above (the official code's other
option), with which the latents collapse on the synthetic data (the top-k sum over 2% of the
pixels is small next to the KL). The paper's lambda is trained by its optimizer (the sign of
its gradient flipped); here it follows the multiplicative update of Rezende & Viola, which does
not depend on the optimizer. The zoo's blocks are plain conv + ReLU stacks, not the paper's
pre-activation residual blocks; upsampling is bilinear, not nearest-neighbour.

Gini: as for :mod:`probseg.models.phiseg`, per level and for the whole model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from probseg.layers.blocks import conv_block
from probseg.layers.gaussian import Generators
from probseg.models.base import ProbSegModel
from probseg.models.network import NetworkOutput
from probseg.models.objectives import HierarchicalKL, LossTerms, Objective, StepContext
from probseg.models.phiseg import HierarchicalNetwork
from probseg.models.registry import register_model


def pixel_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, H, W) cross-entropy of (B, K, H, W) logits against class ids or probabilities."""
    if target.ndim == 3:
        return F.cross_entropy(logits.float(), target.long(), reduction="none")
    return -(target.float() * logits.float().log_softmax(dim=1)).sum(dim=1)


def top_k_mask(ce: torch.Tensor, fraction: float, generator: torch.Generator | None = None,
               deterministic: bool = False) -> torch.Tensor:
    """(B, H, W) 0/1 mask of the k = max(1, floor(fraction B H W)) pixels of the batch kept by the
    top-k cross-entropy: the k largest (``deterministic``) or k drawn without replacement with
    probability proportional to their CE (Gumbel top-k of log CE)."""
    flat = ce.detach().flatten()
    k = max(1, math.floor(fraction * flat.numel()))
    score = flat.clamp_min(torch.finfo(flat.dtype).tiny).log()
    if not deterministic:
        uniform = torch.rand(flat.shape, generator=generator, device=flat.device, dtype=flat.dtype)
        score = score - (-uniform.clamp_min(torch.finfo(flat.dtype).tiny).log()).log()
    mask = torch.zeros_like(flat)
    mask[score.topk(k).indices] = 1
    return mask.view_as(ce)


class TopKCrossEntropy(Objective):
    """The HPU-Net's reconstruction: term ``rec_topk``, the cross-entropy summed over the selected
    pixels of each image (:func:`top_k_mask`), mean over the batch.

    Args:
        fraction: k as a fraction of the batch's pixels (the paper: 0.02).
        deterministic: keep the k largest instead of drawing them.
    """

    name = "top_k_cross_entropy"

    def __init__(self, fraction: float, deterministic: bool = False) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"top_k must be in (0, 1], got {fraction}")
        self.fraction = fraction
        self.deterministic = deterministic

    def __call__(self, context: StepContext) -> LossTerms:
        ce = pixel_cross_entropy(context.outputs["logits"], context.target)
        mask = top_k_mask(ce, self.fraction, context.generator, self.deterministic)
        return LossTerms({"rec_topk": (ce * mask).flatten(1).sum(1).mean()})


class GECOState(nn.Module):
    """GECO's state as float32 buffers of the task, so checkpoints carry it and a resumed run
    continues the same schedule: ``multiplier`` (lambda), ``average`` (the constraint's moving
    average) and ``started``. They stay float32 when the model is cast to half precision (a
    bf16 lambda would round its small multiplicative steps away)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("multiplier", torch.ones(()))
        self.register_buffer("average", torch.zeros(()))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    def _apply(self, fn: Any, recurse: bool = True) -> GECOState:
        super()._apply(fn, recurse)
        for name in ("multiplier", "average"):
            if self._buffers[name].dtype != torch.float32:
                self._buffers[name] = self._buffers[name].float()
        return self


class GECO(Objective):
    """The HPU-Net's reconstruction under a GECO constraint (Rezende & Viola 2018, "Taming VAEs";
    Kohl et al. 2019): in training, term ``rec_topk`` is lambda times the constraint

    .. math::
        C = \\frac{1}{B} \\sum_b \\Big(\\sum_{i \\in \\text{top-}k_b} \\mathrm{CE}_i - \\kappa\\, k_b\\Big),

    whose value in the loss is its moving average (rate 0.99) while its gradient is the current
    batch's. After every training forward pass (each micro-batch under gradient accumulation)
    lambda is multiplied by exp(rate * C_ma / k), C_ma / k the averaged constraint per selected
    pixel: it grows while the mean CE of the selected pixels is above kappa and shrinks once
    below, so the KL cannot trade the reconstruction away. A non-finite constraint leaves the
    state as it was (the task then stops on the non-finite loss). Under DDP the buffers follow
    rank 0 (DDP broadcasts buffers at every forward pass).

    In validation and test ``rec_topk`` is the plain top-k CE sum (no lambda, nothing updated):
    lambda drifts over training and can make lambda * C negative, so ``val/loss`` would not
    compare checkpoints. Diagnostics: ``geco_lambda`` and ``geco_constraint`` (per selected pixel).

    Args:
        fraction, deterministic: as in :class:`TopKCrossEntropy`.
        kappa: the target mean CE per selected pixel, nats (the paper: 0.05).
        rate: the step size of log lambda (per nat of constraint per pixel).
        state: the task's :class:`GECOState` (read at every call, so casts and loads apply).
    """

    name = "geco"

    def __init__(self, fraction: float, deterministic: bool, kappa: float, rate: float, state: GECOState) -> None:
        if kappa < 0 or rate <= 0:
            raise ValueError(f"geco_kappa must be non-negative and geco_rate positive, got {kappa} and {rate}")
        self.top_k = TopKCrossEntropy(fraction, deterministic)
        self.kappa, self.rate = kappa, rate
        self.state = state

    def __call__(self, context: StepContext) -> LossTerms:
        ce = pixel_cross_entropy(context.outputs["logits"], context.target)
        mask = top_k_mask(ce, self.top_k.fraction, context.generator, self.top_k.deterministic)
        selected = mask.flatten(1).sum(1)
        total = (ce * mask).flatten(1).sum(1)
        constraint = (total - self.kappa * selected).mean()
        state = self.state
        if not context.training:  # validation and test: the plain top-k CE, nothing updated
            return LossTerms({"rec_topk": total.mean()},
                             {"geco_lambda": state.multiplier.detach().clone(),
                              "geco_constraint": constraint.detach() / selected.mean()})
        finite = torch.isfinite(constraint.detach())
        with torch.no_grad():  # the first step starts the average at its value (no host read)
            value = constraint.detach().float()
            moved = torch.where(state.started, 0.99 * state.average + 0.01 * value, value)
            state.average.copy_(torch.where(finite, moved, state.average))
            state.started.logical_or_(finite)
        used = state.multiplier.detach().clone()
        term = used.to(constraint.dtype) * (constraint + (state.average.to(constraint.dtype) - constraint).detach())
        per_pixel = state.average.detach() / selected.mean().float()
        with torch.no_grad():
            step = torch.where(finite, torch.exp(self.rate * per_pixel), torch.ones_like(per_pixel))
            state.multiplier.mul_(step).clamp_(1e-6, 1e6)
        return LossTerms({"rec_topk": term}, {"geco_lambda": used, "geco_constraint": per_pixel})


class HPUNetNetwork(HierarchicalNetwork):
    """The HPU-Net's prior U-Net (with its latent levels and the rest of its decoder) and its
    posterior.

    Forward outputs: ``logits``, ``posteriors`` and ``priors`` (per level, coarse to fine).
    """

    def __init__(self, in_channels: int, num_classes: int, num_filters: list[int], convs_per_block: int,
                 latent_levels: int, latent_dim: int) -> None:
        super().__init__(in_channels, num_classes, num_filters, convs_per_block, latent_levels, latent_dim,
                         carry_state=True, sigma_activation="exp")
        num_filters = list(num_filters)
        finest = len(num_filters) - latent_levels  # resolution of the finest latent level
        channels = latent_dim + num_filters[finest]
        self.up = nn.ModuleList()
        for r in reversed(range(finest)):
            self.up.append(conv_block(num_filters[r] + channels, num_filters[r], convs_per_block))
            channels = num_filters[r]
        self.head = nn.Conv2d(channels, num_classes, 1)

    def decode(self, latent: torch.Tensor, state: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        """The decoder below the finest latent level: [z, state] up to full resolution -> logits."""
        h = torch.cat([latent.to(state.dtype), state], dim=1)
        finest = len(skips) - self.prior.latent_levels
        for block, r in zip(self.up, reversed(range(finest))):
            h = F.interpolate(h, size=skips[r].shape[-2:], mode="bilinear", align_corners=False)
            h = block(torch.cat([skips[r], h], dim=1))
        return self.head(h)

    def forward(self, batch: dict[str, Any], target: torch.Tensor,
                generator: torch.Generator | None = None) -> NetworkOutput:
        images = batch["image"]
        posteriors, z_q = self.posterior_draws(images, target, generator)
        skips = self.prior.down(images)
        priors, _, state = self.prior(images, given=z_q, skips=skips)
        return {"logits": self.decode(z_q[-1], state, skips), "posteriors": posteriors, "priors": priors}

    def sample(self, images: torch.Tensor, num_samples: int = 16, generator: Generators = None) -> torch.Tensor:
        z_p, state, skips = self.prior_draws(images, num_samples, generator)
        logits = self.decode(z_p[-1], state, skips)
        return logits.view(images.shape[0], num_samples, *logits.shape[1:])


@register_model("hpunet")
class HierarchicalProbUNet(ProbSegModel):
    """Hierarchical Probabilistic U-Net (registry name ``"hpunet"``).

    Args:
        num_filters: channels per resolution level (the paper, 128x128: [24, 48, 96, 192, 192,
            192, 192, 192], 8 levels down to 1x1); H and W must be divisible by 2^(levels - 1).
        convs_per_block: 3x3 convolutions per block (the paper: 3 residual blocks of 3).
        latent_levels: latent levels at the coarsest resolutions (the paper: 4, at 1x1 ... 8x8).
        latent_dim: channels of each latent map (the paper: 1).
        beta: weight of the KL sum.
        top_k: fraction of the batch's pixels in the stochastic top-k cross-entropy (the paper:
            0.02); 0 uses every pixel (the task's reconstruction, without GECO).
        deterministic_top_k: keep the pixels of largest CE instead of drawing them.
        geco: train under the GECO constraint (the paper, :class:`GECO`); False: the ELBO
            ``rec_topk + beta * KL`` (the official code's other option).
        geco_kappa: the constraint's target mean CE per selected pixel (the paper: 0.05).
        geco_rate: the step size of log lambda per nat of constraint.
        kl_warmup_steps, free_bits: as for :class:`~probseg.models.punet.ProbUNet`.
        **kwargs: the shared options of :class:`~probseg.models.base.ProbSegModel`
            (``reconstruction`` only with ``top_k=0``).

    Loss terms: ``rec_topk`` (or ``rec_<component>`` with ``top_k=0``) and ``kl``; diagnostics
    ``kl_level<l>`` and, with GECO, ``geco_lambda`` and ``geco_constraint``.
    """

    def __init__(
        self,
        *,
        num_filters: list[int] = [24, 48, 96, 192, 192, 192, 192, 192],  # noqa: B006 (plain list for YAML and hparams)
        convs_per_block: int = 3,
        latent_levels: int = 4,
        latent_dim: int = 1,
        beta: float = 1.0,
        top_k: float = 0.02,
        deterministic_top_k: bool = False,
        geco: bool = True,
        geco_kappa: float = 0.05,
        geco_rate: float = 0.01,
        kl_warmup_steps: int = 0,
        free_bits: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if top_k and (kwargs.get("reconstruction") or kwargs.get("loss_options")):
            raise ValueError("top_k replaces the reconstruction loss: set top_k: 0 to train with reconstruction "
                             "or loss_options")
        if not top_k and geco:
            raise ValueError("geco constrains the top-k cross-entropy: set geco: false with top_k: 0")
        if top_k:
            TopKCrossEntropy(top_k, deterministic_top_k)  # checks the fraction before anything is built
        super().__init__(**kwargs)
        objectives: list[Objective] = []
        if geco:
            self.geco_state = GECOState()
            objectives.append(GECO(top_k, deterministic_top_k, geco_kappa, geco_rate, self.geco_state))
        elif top_k:
            objectives.append(TopKCrossEntropy(top_k, deterministic_top_k))
        self.reconstructs = not top_k
        self.network = HPUNetNetwork(self.in_channels, self.num_classes, num_filters, convs_per_block, latent_levels,
                                     latent_dim)
        self.objectives = [*objectives, HierarchicalKL([1.0] * latent_levels, beta, kl_warmup_steps, free_bits)]

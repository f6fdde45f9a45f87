"""Mixture of Stochastic Experts (MoSE).

Gao et al., ICLR 2023, "Modeling Multimodal Aleatoric Uncertainty in Segmentation with Mixture of
Stochastic Experts".

K stochastic experts share one U-Net: expert k is a Normal over an L-dimensional latent,
N(mu_k, sigma_k), whose draws modulate the U-Net's last features (FiLM: (u + a(z)) * (b(z) +
1e-5), then three 1x1 convolutions to the logits). A gating network on the pooled deepest
encoder features gives the expert weights pi(x) per image. Hypotheses carry weights: S draws are
shared out over the experts (S / K each, the "compact" form), a draw of expert k weighing
pi_k / S_k; :meth:`MoSENetwork.sample` instead draws each hypothesis's expert from pi (weights
1 / S).

Training: the weighted set of N = K S_train predictions of an image against its raters, by
optimal transport with a relaxed marginal (the paper's constraint relaxation):

.. math::
    P^\\star = \\arg\\min_{P \\ge 0} \\langle P, C \\rangle \\quad \\text{s.t.} \\quad
        P^\\top \\mathbf 1 = q, \\quad P \\mathbf 1 \\le \\gamma, \\qquad
    \\mathcal L = \\langle P^\\star, C \\rangle
        + \\beta \\, \\mathrm{KL}\\big(P^\\star \\mathbf 1 \\,\\|\\, w(x)\\big)

with C_nm = 1 - soft IoU of prediction n's probabilities and rater m (foreground classes, +1
smoothing), q uniform over the image's raters, w the predictions' weights pi_k / S_train, and
P* held fixed (no gradient): the first term trains the predictions, the second the gate. gamma
starts at ``relaxation`` (each prediction takes at most gamma of the mass) and becomes 1 after
``relaxation_steps`` training steps.

Readings of the official code, where it differs from the paper's statement, offered as options:

* ``coupling="exact"`` (default) solves the relaxed problem above exactly (a linear program
  per image on the host); ``"greedy"`` is the code's heuristic (raters in order of their best
  cost, each pouring its mass into its cheapest predictions up to the cap), optimal for
  gamma = 1 but not in general.
* ``gate_kl_reduction="sum"`` (default) is the KL of each image, batch mean; ``"mean"`` is the
  code's ``F.kl_div(reduction="mean")``, which also divides by N (beta / N per image).
* ``experts="learned"`` (default, the code): mu_k and sigma_k are parameters, the same for every
  image; ``"conditional"``: a linear head on the pooled features gives them per image.
* The code switches gamma to 1 when the training loss plateaus; here it switches at a fixed step,
  so runs are reproducible. The code applies batch normalisation and a ReLU to the logits; the
  zoo's blocks have no normalisation and the logits are linear.

Gini: the experts' sigmas side by side, (B, K L).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from probseg._ops import one_hot
from probseg.layers import build_generator, check_image
from probseg.layers.generators import without_weights_file
from probseg.layers.gaussian import Generators
from probseg.models.base import ProbSegModel
from probseg.models.network import Network, NetworkOutput
from probseg.models.objectives import LossTerms, Objective, StepContext
from probseg.models.registry import register_model

COUPLINGS = ("exact", "greedy")
EXPERT_KINDS = ("learned", "conditional")
GATE_KL_REDUCTIONS = ("sum", "mean")
LOG_SIGMA_BOUND = 10.0


def expert_counts(num_samples: int, num_experts: int) -> list[int]:
    """Draws per expert when S draws are shared out over K experts (the first S mod K get one more)."""
    if num_samples < num_experts:
        raise ValueError(f"weighted sampling draws at least one hypothesis per expert: num_samples must be >= "
                         f"{num_experts} experts, got {num_samples}")
    return [num_samples // num_experts + (k < num_samples % num_experts) for k in range(num_experts)]


def initial_means(num_experts: int, latent_dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(K, L) initial expert means: the corners of {0, 1}^L first, the rest uniform in [0, 1)
    (the official code's initialisation, which spreads the experts apart)."""
    means = torch.rand(num_experts, latent_dim, generator=generator)
    corners = min(num_experts, 2**latent_dim)
    bits = (torch.arange(corners)[:, None] >> torch.arange(latent_dim)) & 1
    means[:corners] = bits.float()
    return means


def soft_iou_cost(probs: torch.Tensor, masks: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """(B, N, M) 1 - soft IoU between prediction probabilities and rater masks, averaged over the
    foreground classes.

    Args:
        probs: (B, N, K, H, W) class probabilities.
        masks: (B, M, H, W) rater class ids.
        smooth: added to intersection and union (the official code: 1).
    """
    k = probs.shape[2]
    p = probs[:, :, 1:].flatten(3).float()  # (B, N, K-1, P)
    y = one_hot(masks, k)[:, :, 1:].flatten(3)  # (B, M, K-1, P)
    inter = torch.einsum("bnkp,bmkp->bnmk", p, y)
    union = p.sum(-1)[:, :, None] + y.sum(-1)[:, None] - inter
    return 1 - ((inter + smooth) / (union + smooth)).mean(-1)


def relaxed_coupling(cost: np.ndarray, rater_mass: np.ndarray, cap: float, method: str = "exact") -> np.ndarray:
    """The coupling P (N, M) of one image: min <P, C> s.t. column sums = ``rater_mass``, row sums
    <= ``cap``, P >= 0 ("exact": an assignment when the cap is a whole number of uniform rater
    masses, else the linear program; "lp": always the linear program), or the official code's
    greedy fill ("greedy")."""
    if method not in (*COUPLINGS, "lp"):
        raise ValueError(f"method must be one of {(*COUPLINGS, 'lp')}, got {method!r}")
    n, m = cost.shape
    if method == "greedy":
        plan = np.zeros((n, m))
        for j in np.argsort(cost.min(axis=0), kind="stable"):
            remaining = rater_mass[j]
            for i in np.argsort(cost[:, j], kind="stable"):
                if remaining <= 0:
                    break
                pour = min(cap - plan[i].sum(), remaining)
                if pour > 0:
                    plan[i, j] += pour
                    remaining -= pour
        return plan
    units = cap * m
    uniform = np.allclose(rater_mass, 1 / m, rtol=0, atol=1e-12)
    if method == "exact" and uniform and units >= 1 and abs(units - round(units)) < 1e-9:
        # Raters of mass 1/M and a cap of c/M, c an integer: in units of 1/M the problem is an
        # assignment of each rater to one of c slots per prediction (its matrix is totally
        # unimodular, so an integral plan is optimal): the Hungarian method on (N c, M).
        from scipy.optimize import linear_sum_assignment

        slots = min(round(units), m)
        rows, cols = linear_sum_assignment(np.repeat(cost, slots, axis=0))
        plan = np.zeros((n, m))
        plan[rows // slots, cols] = 1 / m
        return plan
    from scipy.optimize import linprog

    rows = np.kron(np.eye(n), np.ones(m))
    cols = np.kron(np.ones(n), np.eye(m))
    result = linprog(cost.ravel(), A_ub=rows, b_ub=np.full(n, cap), A_eq=cols, b_eq=rater_mass, bounds=(0, None),
                     method="highs")
    if not result.success:
        raise RuntimeError(f"the relaxed transport linear program failed: {result.message}")
    return result.x.reshape(n, m)


class MoSENetwork(Network):
    """MoSE's shared U-Net, experts, latent injection and gate.

    Arguments as in :class:`MixtureOfStochasticExperts`; ``generator`` and ``generator_options``
    choose the U-Net (:func:`~probseg.layers.generators.build_generator`), whose deepest features
    feed the gate.

    Forward outputs: ``logits`` (log of the weighted mixture's probabilities, (B, K, H, W)),
    ``sample_logits`` (B, N, K, H, W) and ``sample_weights`` (B, N) of the N = K S_train training
    draws (differentiable in the gate).
    """

    weighted = True

    def __init__(self, in_channels: int, num_classes: int, num_filters: list[int], convs_per_block: int,
                 num_experts: int, latent_dim: int, samples_per_expert: int, experts: str, generator: str = "unet",
                 generator_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        if num_experts < 1 or latent_dim < 1 or samples_per_expert < 1:
            raise ValueError(f"num_experts, latent_dim and samples_per_expert must be positive, got {num_experts}, "
                             f"{latent_dim} and {samples_per_expert}")
        if experts not in EXPERT_KINDS:
            raise ValueError(f"experts must be one of {EXPERT_KINDS}, got {experts!r}")
        num_filters = list(num_filters)
        self.in_channels, self.num_classes = in_channels, num_classes
        self.num_experts, self.latent_dim, self.samples_per_expert = num_experts, latent_dim, samples_per_expert
        self.experts = experts
        self.unet = build_generator(in_channels, num_filters, convs_per_block, generator, generator_options)
        width, pooled = self.unet.out_channels, self.unet.bottleneck_channels
        self.gate = nn.Sequential(nn.Linear(pooled, pooled), nn.ReLU(), nn.Linear(pooled, pooled), nn.ReLU(),
                                  nn.Linear(pooled, num_experts, bias=False))
        if experts == "learned":
            self.expert_mu = nn.Parameter(initial_means(num_experts, latent_dim))
            self.expert_log_sigma = nn.Parameter(torch.full((num_experts, latent_dim), math.log(1 / 8)))
        else:
            self.expert_head = nn.Linear(pooled, 2 * num_experts * latent_dim)
            nn.init.normal_(self.expert_head.weight, std=1e-3)
            with torch.no_grad():
                self.expert_head.bias.copy_(torch.cat([initial_means(num_experts, latent_dim).flatten(),
                                                       torch.full((num_experts * latent_dim,), math.log(1 / 8))]))
        self.shift = nn.Linear(latent_dim, width)
        self.scale = nn.Linear(latent_dim, width)
        for layer in (self.shift, self.scale):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.decoder = nn.Sequential(nn.Conv2d(width, width, 1), nn.ReLU(), nn.Conv2d(width, width, 1), nn.ReLU(),
                                     nn.Conv2d(width, num_classes, 1))
        self.downsampling = self.unet.downsampling

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(features (B, F, H, W), pi (B, K), expert means (B, K, L), expert sigmas (B, K, L))."""
        check_image(images, self.in_channels, self.downsampling)
        skips = self.unet.down(images)
        features = self.unet.decode(skips)
        pooled = skips[-1].mean(dim=(-2, -1))
        pi = self.gate(pooled).float().softmax(dim=-1)
        b, k, l = images.shape[0], self.num_experts, self.latent_dim
        if self.experts == "learned":
            mu, log_sigma = self.expert_mu.expand(b, k, l), self.expert_log_sigma.expand(b, k, l)
        else:
            mu, log_sigma = self.expert_head(pooled).float().view(b, 2, k, l).unbind(1)
        sigma = (LOG_SIGMA_BOUND * torch.tanh(log_sigma / LOG_SIGMA_BOUND)).exp()
        return features, pi, mu, sigma

    def decode(self, features: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Features (B, F, H, W) and latents (B, N, L) -> (B, N, K, H, W) logits."""
        b, n = z.shape[:2]
        shift = self.shift(z.to(features.dtype))[..., None, None]
        scale = self.scale(z.to(features.dtype))[..., None, None]
        h = (features[:, None] + shift) * (scale + 1e-5)
        return self.decoder(h.flatten(0, 1)).view(b, n, self.num_classes, *features.shape[-2:])

    @staticmethod
    def _noise(shape: tuple[int, ...], like: torch.Tensor, generator: Generators) -> torch.Tensor:
        if generator is None or isinstance(generator, torch.Generator):
            return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)
        generators = list(generator)
        if len(generators) != shape[0]:
            raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]} images")
        return torch.stack([torch.randn(shape[1:], generator=g, device=like.device, dtype=like.dtype)
                            for g in generators])

    def _stratified(self, images: torch.Tensor, counts: list[int], generator: Generators
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draws of each expert k (counts[k] of them, expert-major) and their weights pi_k / counts[k]."""
        features, pi, mu, sigma = self.encode(images)
        index = torch.repeat_interleave(torch.arange(self.num_experts, device=images.device),
                                        torch.tensor(counts, device=images.device))
        eps = self._noise((images.shape[0], len(index), self.latent_dim), mu, generator)
        z = mu[:, index] + sigma[:, index] * eps
        weights = pi[:, index] / torch.tensor(counts, device=pi.device, dtype=pi.dtype)[index]
        return self.decode(features, z), weights

    def forward(self, batch: dict[str, Any], target: torch.Tensor,
                generator: torch.Generator | None = None) -> NetworkOutput:
        logits, weights = self._stratified(batch["image"], [self.samples_per_expert] * self.num_experts, generator)
        mixture = (weights[:, :, None, None, None] * logits.float().softmax(dim=2)).sum(1)
        return {"logits": mixture.clamp_min(1e-12).log(), "sample_logits": logits, "sample_weights": weights}

    def sample_weighted(self, images: torch.Tensor, num_samples: int = 16,
                        generator: Generators = None) -> tuple[torch.Tensor, torch.Tensor]:
        """S draws shared out over the experts, each weighing pi_k / S_k (see the module
        docstring); with fewer draws than experts, S draws of :meth:`sample` weighing 1 / S."""
        if num_samples < self.num_experts:
            logits = self.sample(images, num_samples, generator)
            return logits, torch.full(logits.shape[:2], 1 / num_samples, device=logits.device)
        logits, weights = self._stratified(images, expert_counts(num_samples, self.num_experts), generator)
        return logits, weights.float()

    def sample(self, images: torch.Tensor, num_samples: int = 16, generator: Generators = None) -> torch.Tensor:
        """S hypotheses, each from an expert drawn from pi(x): equally weighted draws of the mixture."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        features, pi, mu, sigma = self.encode(images)
        b = images.shape[0]
        if generator is None or isinstance(generator, torch.Generator):
            experts = torch.multinomial(pi, num_samples, replacement=True, generator=generator)
        else:
            experts = torch.stack([torch.multinomial(p, num_samples, replacement=True, generator=g)
                                   for p, g in zip(pi, generator)])
        eps = self._noise((b, num_samples, self.latent_dim), mu, generator)
        rows = torch.arange(b, device=images.device)[:, None]
        z = mu[rows, experts] + sigma[rows, experts] * eps
        return self.decode(features, z)

    def predictive_log_probabilities(self, images: torch.Tensor, num_samples: int = 16, generator: Generators = None,
                                     outputs: NetworkOutput | None = None) -> torch.Tensor:
        """Log of the weighted mixture's pixel-wise probabilities, from :meth:`sample_weighted`."""
        logits, weights = self.sample_weighted(images, max(num_samples, self.num_experts), generator)
        mixture = (weights[:, :, None, None, None] * logits.float().softmax(dim=2)).sum(1)
        return mixture.clamp_min(1e-12).log()

    def prior_sigmas(self, images: torch.Tensor) -> torch.Tensor:
        """The experts' sigmas side by side, (B, K L)."""
        return self.encode(images)[3].flatten(1)


class MoSEOptimalTransport(Objective):
    """MoSE's objective (see the module docstring): terms ``rec_ot`` (the transport cost of the
    coupling, per image, batch mean) and ``gate_kl`` (beta times the KL of the coupling's row
    marginals to the predictions' weights); diagnostic ``relaxation`` (the current cap gamma).

    Args:
        relaxation: gamma, the cap on each prediction's mass (N gamma >= 1).
        relaxation_steps: training steps after which gamma becomes 1 (None: never).
        beta: weight of the gate's KL.
        coupling: "exact" or "greedy".
        gate_kl_reduction: "sum" or "mean".
    """

    name = "mose_ot"

    def __init__(self, relaxation: float = 0.5, relaxation_steps: int | None = None, beta: float = 1.0,
                 coupling: str = "exact", gate_kl_reduction: str = "sum") -> None:
        if not 0 < relaxation <= 1:
            raise ValueError(f"relaxation must be in (0, 1], got {relaxation}")
        if coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {COUPLINGS}, got {coupling!r}")
        if gate_kl_reduction not in GATE_KL_REDUCTIONS:
            raise ValueError(f"gate_kl_reduction must be one of {GATE_KL_REDUCTIONS}, got {gate_kl_reduction!r}")
        if beta < 0:
            raise ValueError(f"beta must be non-negative, got {beta}")
        self.relaxation, self.relaxation_steps = relaxation, relaxation_steps
        self.beta, self.coupling, self.gate_kl_reduction = beta, coupling, gate_kl_reduction

    def cap(self, step: int, training: bool) -> float:
        """gamma at a step: in training ``relaxation`` until ``relaxation_steps`` steps, then 1;
        in validation and test always 1, so ``val/loss`` means the same before and after the
        switch (each rater's cost to its nearest prediction)."""
        if not training or (self.relaxation_steps is not None and step >= self.relaxation_steps):
            return 1.0
        return self.relaxation

    def couplings(self, cost: torch.Tensor, rater_mask: torch.Tensor, cap: float) -> torch.Tensor:
        """(B, N, M) couplings of a batch (no gradient)."""
        n = cost.shape[1]
        if n * cap < 1 - 1e-9:
            raise ValueError(f"{n} predictions with a cap of {cap} cannot carry the raters' mass: relaxation must be "
                             f">= 1 / {n}")
        # one host transfer for both (the coupling is solved on the host)
        b, _, m = cost.shape
        host = torch.cat([cost.detach().double().flatten(), rater_mask.double().flatten()]).cpu().numpy()
        costs, present = host[: cost.numel()].reshape(cost.shape), host[cost.numel():].reshape(b, m) > 0
        plans = np.zeros_like(costs)
        for b, (c, keep) in enumerate(zip(costs, present)):
            mass = np.full(int(keep.sum()), 1 / keep.sum())
            plans[b][:, keep] = relaxed_coupling(c[:, keep], mass, cap, self.coupling)
        return torch.as_tensor(plans, dtype=cost.dtype, device=cost.device)

    def __call__(self, context: StepContext) -> LossTerms:
        out, batch = context.outputs, context.batch
        masks = batch["masks"]
        rater_mask = batch.get("rater_mask")
        if rater_mask is None:
            rater_mask = torch.ones(masks.shape[:2], dtype=torch.bool, device=masks.device)
        cost = soft_iou_cost(out["sample_logits"].float().softmax(dim=2), masks)
        cap = self.cap(context.step, context.training)
        plan = self.couplings(cost, rater_mask, cap)
        transport = (plan * cost).sum(dim=(1, 2)).mean()
        marginal = plan.sum(-1)  # (B, N), sums to 1
        weights = out["sample_weights"].float()
        kl = torch.where(marginal > 0, marginal * (marginal.clamp_min(1e-30).log() - weights.clamp_min(1e-30).log()),
                         torch.zeros_like(marginal)).sum(-1)
        if self.gate_kl_reduction == "mean":
            kl = kl / marginal.shape[1]
        return LossTerms({"rec_ot": transport, "gate_kl": self.beta * kl.mean()},
                         {"relaxation": torch.tensor(cap, device=cost.device)})


@register_model("mose")
class MixtureOfStochasticExperts(ProbSegModel):
    """Mixture of Stochastic Experts (registry name ``"mose"``).

    Args:
        num_filters: U-Net channels per level (the authors' LIDC code: [32, 64, 128, 192, 192,
            192, 192]; the paper's lighter [32, 64, 128, 192]).
        convs_per_block: 3x3 convolutions per level (3).
        num_experts: K (LIDC: 4).
        latent_dim: L of each expert's Normal (LIDC: 1).
        samples_per_expert: draws per expert in training, N = K samples_per_expert (LIDC: 4).
        experts: "learned" or "conditional" (module docstring).
        relaxation: gamma, the initial cap on a prediction's transported mass (LIDC: 1/2).
        relaxation_steps: training steps after which gamma becomes 1 (None: never).
        beta: weight of the gate's KL (LIDC: 1).
        coupling: "exact" (the relaxed problem solved exactly) or "greedy" (the authors' code).
        gate_kl_reduction: "sum" (KL per image) or "mean" (the code's, also divided by N).
        generator, generator_options: the encoder-decoder: ``"unet"`` (the zoo's, sized by
            ``num_filters`` and ``convs_per_block``) or ``"smp"`` with options such as
            ``{"encoder_name": "resnet18"}`` (:mod:`probseg.layers.generators`).
        **kwargs: the shared options of :class:`~probseg.models.base.ProbSegModel`; MoSE learns
            from every rater at once, so ``reconstruction``, ``loss_options``, ``fusion`` and
            ``fusion_options`` are refused.

    Loss terms: ``rec_ot`` and ``gate_kl``; diagnostic ``relaxation``. Hypotheses carry weights:
    use :meth:`~probseg.models.base.ProbSegModel.sample_weighted` (evaluation does).
    """

    reconstructs = False

    def __init__(
        self,
        *,
        num_filters: list[int] = [32, 64, 128, 192, 192, 192, 192],  # noqa: B006 (plain list for YAML and hparams)
        convs_per_block: int = 3,
        num_experts: int = 4,
        latent_dim: int = 1,
        samples_per_expert: int = 4,
        experts: str = "learned",
        relaxation: float = 0.5,
        relaxation_steps: int | None = None,
        beta: float = 1.0,
        coupling: str = "exact",
        gate_kl_reduction: str = "sum",
        generator: str = "unet",
        generator_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        for key in ("reconstruction", "loss_options"):
            if kwargs.get(key):
                raise ValueError(f"{key} does not apply to MoSE: its transport cost against every rater is its loss")
        if kwargs.get("fusion", "random") != "random":
            raise ValueError("fusion does not apply to MoSE: it is trained against every rater of an image at once")
        if kwargs.get("fusion_options"):
            raise ValueError("fusion_options does not apply to MoSE: it is trained against every rater of an image at "
                             "once, with no fused target")
        objective = MoSEOptimalTransport(relaxation, relaxation_steps, beta, coupling, gate_kl_reduction)
        if num_experts * samples_per_expert * relaxation < 1 - 1e-9:
            raise ValueError(f"{num_experts} experts x {samples_per_expert} draws with relaxation {relaxation} cannot carry "
                             f"the raters' mass: relaxation must be >= 1 / {num_experts * samples_per_expert}")
        super().__init__(**kwargs)
        self.objectives = [objective]
        self.network = MoSENetwork(self.in_channels, self.num_classes, num_filters, convs_per_block, num_experts,
                                   latent_dim, samples_per_expert, experts, generator, generator_options)
        self.hparams["generator_options"] = without_weights_file(generator_options)

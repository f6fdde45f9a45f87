"""Objectives: small objects that turn a network's outputs and the batch into named, weighted
scalar loss terms.

The task (:class:`probseg.models.base.ProbSegModel`) runs, in this order, its
:class:`Reconstruction` (every model), the model's own objectives (:class:`KLDivergence` for the
latent models, :class:`SinkhornDivergence` for the cSAE) and the optional objectives its
configuration adds (:func:`optional_objectives`: the mixed objective's :class:`SoftRegion` term,
distillation). Each returns :class:`LossTerms`; the training loss is the sum of all terms.

Monte Carlo KL of a flowed posterior (Valiuddin et al. 2021, 2p-planar):

.. math::
    \\mathrm{KL}(q_K \\,\\|\\, p) \\approx \\frac{1}{M} \\sum_{m}
        \\Big[\\log q_0(z_0^m) - \\sum_k \\log|\\det J_k(z_{k-1}^m)| - \\log p(z_K^m)\\Big]

Free bits (Kingma et al. 2016, eq. 15) replace beta * mean_b KL_b by

.. math::
    \\beta \\sum_{d=1}^{L} \\max\\big(\\lambda, \\tfrac{1}{B} \\textstyle\\sum_b \\mathrm{KL}_{b,d}\\big)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.distributions import Independent, kl_divergence

from probseg.data.fusion import FUSIONS, fuse_raters, training_target
from probseg.data.fusion import fusion_options as resolve_fusion_options
from probseg.losses import functional as L
from probseg.losses.reconstruction import ReconstructionLoss

if TYPE_CHECKING:
    from probseg.models.network import Network, NetworkOutput


class LossTerms(dict):
    """The named, weighted scalar loss terms of a batch (a dict: the training loss is their sum),
    plus ``diagnostics``: scalars that are logged as ``"{stage}/{name}"`` but not added to the loss
    (e.g. the KL per latent dimension, the current KL weight)."""

    def __init__(self, terms: Mapping[str, torch.Tensor] | None = None,
                 diagnostics: Mapping[str, torch.Tensor] | None = None) -> None:
        super().__init__(terms or {})
        self.diagnostics: dict[str, torch.Tensor] = dict(diagnostics or {})

    def add(self, other: Mapping[str, torch.Tensor]) -> None:
        """Add another objective's terms (and its diagnostics, if any)."""
        self.update(other)
        self.diagnostics.update(getattr(other, "diagnostics", {}))


@dataclass
class StepContext:
    """What an objective sees of one step.

    Attributes:
        batch: the batch dict.
        target: the fused training target ((B, H, W) class ids or (B, K, H, W) probabilities).
        outputs: the network's forward outputs.
        network: the network (an objective may draw hypotheses from it).
        generator: source of every random draw (None: torch's global RNG).
        training: the task is in training mode (validation and test are not).
        step: the trainer's global step (0 outside a trainer).
        stage: "train", "val" or "test"; None outside a trainer step.
        checked: the batch passed :func:`probseg.data.batch.check_batch` (an objective that fuses
            its raters again skips the rater checks and their host synchronisation).
    """

    batch: dict[str, Any]
    target: torch.Tensor
    outputs: NetworkOutput
    network: Network
    generator: torch.Generator | None = None
    training: bool = False
    step: int = 0
    stage: str | None = None
    checked: bool = False


class Objective:
    """Turns a step's :class:`StepContext` into weighted :class:`LossTerms`.

    The hooks below let an objective that holds outside state (e.g. a teacher checkpoint) take
    part in the run without the task knowing what it is; they do nothing by default.
    """

    name: str = ""
    """What the objective is called in errors and lookups."""

    def __call__(self, context: StepContext) -> LossTerms:
        raise NotImplementedError

    def setup(self, device: torch.device) -> None:
        """Called when training starts: load what the objective needs (fail before step 1)."""

    def checkpoint_metadata(self) -> dict[str, Any]:
        """Entries for the checkpoint's ``probseg`` metadata (plain strings and numbers)."""
        return {}

    def load_checkpoint_metadata(self, metadata: Mapping[str, Any]) -> None:
        """Read back what :meth:`checkpoint_metadata` wrote, when a checkpoint is loaded."""


def resolved_fusion_options(fusion_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """A model's ``fusion_options`` with its recipe's defaults filled in and checked: ``recipe``
    plus the options of :func:`probseg.data.fusion.fuse_raters` it sets."""
    options = dict(fusion_options or {})
    recipe = options.pop("recipe", "probseg")
    return {"recipe": recipe, **resolve_fusion_options(recipe, **options)}


class Reconstruction(Objective):
    """The reconstruction of the fused training target from ``outputs["logits"]``: terms
    ``rec_<component>``.

    Args:
        num_classes: K.
        fusion: one of :data:`probseg.data.fusion.FUSIONS` (see
            :func:`probseg.data.fusion.training_target`).
        label_smoothing: eps of ``fusion="label_smoothing"``.
        weights: component -> weight (default ``{"ce": 1.0}``), as in :class:`ReconstructionLoss`.
        loss_options: the other options of :class:`ReconstructionLoss` (``recipe``: "probseg" or
            "paper" sets their defaults).
        fusion_options: ``recipe`` ("probseg" or "paper") and the fusion options it sets
            (``zero_dice``, ``smoothing_label``, ``smoothing_region``, ``boundary_width``; see
            :func:`probseg.data.fusion.fuse_raters`).

    Attributes:
        loss: the :class:`ReconstructionLoss` (its ``weights`` and ``region_options`` are also
            readable here).
    """

    name = "reconstruction"

    def __init__(self, num_classes: int, fusion: str = "random", label_smoothing: float = 0.1,
                 weights: Mapping[str, float] | None = None, loss_options: Mapping[str, Any] | None = None,
                 fusion_options: Mapping[str, Any] | None = None) -> None:
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; expected one of {FUSIONS}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.loss = ReconstructionLoss(weights, **dict(loss_options or {}))
        self.num_classes = num_classes
        self.fusion = fusion
        self.label_smoothing = label_smoothing
        self.fusion_options = resolved_fusion_options(fusion_options)  # checked here

    @property
    def weights(self) -> dict[str, float]:
        return self.loss.weights

    @property
    def region_options(self) -> dict[str, Any]:
        """The region options as given (the model's ``loss_options`` less recipe and pixel reduction)."""
        return self.loss.region_options

    @property
    def resolved_region_options(self) -> dict[str, Any]:
        """The region options applied: the recipe's, with those given over them."""
        return self.loss.resolved_region_options

    def target(self, batch: Mapping[str, Any], generator: torch.Generator | None = None, *,
               checked: bool = False) -> torch.Tensor:
        """The training target of a batch by ``fusion`` (``checked``: the batch passed
        :func:`probseg.data.batch.check_batch`, so the fusion skips its own value checks)."""
        return training_target(batch["masks"], batch.get("rater_mask"), self.num_classes, self.fusion,
                               self.label_smoothing, generator, checked=checked, **self.fusion_options)

    def __call__(self, context: StepContext) -> LossTerms:
        return LossTerms(self.loss(context.outputs["logits"], context.target))


def monte_carlo_kl(
    base: Independent, z0: torch.Tensor, log_det: torch.Tensor, z_k: torch.Tensor, prior: Independent
) -> torch.Tensor:
    """KL(q_K || p) per image from M flowed samples: mean of log q0(z0) - log|det J| - log p(zK).

    Args:
        base: q_0, batch (B,), event (L,).
        z0: (B, M, L) samples of q_0.
        log_det: (B, M) summed log|det J| of the flow at z0.
        z_k: (B, M, L) flowed samples.
        prior: p, batch (B,), event (L,).

    Returns:
        (B,) estimates.
    """
    # log_prob broadcasts a (M, B, L) value against batch (B,): move the set axis first.
    log_q0 = base.log_prob(z0.transpose(0, 1)).transpose(0, 1)
    log_p = prior.log_prob(z_k.transpose(0, 1)).transpose(0, 1)
    return (log_q0 - log_det - log_p).mean(1)


def monte_carlo_kl_per_dim(
    base: Independent, z0: torch.Tensor, log_det: torch.Tensor, z_k: torch.Tensor, prior: Independent
) -> torch.Tensor:
    """The estimate of :func:`monte_carlo_kl` shared out over the L latent dimensions, (B, L).

    A convention, not the KL of any one dimension: log q0(z0_d) and log p(zK_d) are the
    axis-aligned densities' own terms, but a planar step mixes the dimensions, so its log|det J|
    is shared out evenly (log_det / L each). The rows sum to :func:`monte_carlo_kl`. Used for the
    per-dimension diagnostics and the free-bits floor; with few Monte Carlo samples an entry can
    be negative, and the floor then acts on a noisy estimate.
    """
    log_q0 = base.base_dist.log_prob(z0.transpose(0, 1)).transpose(0, 1)  # (B, M, L)
    log_p = prior.base_dist.log_prob(z_k.transpose(0, 1)).transpose(0, 1)
    return (log_q0 - log_det.unsqueeze(-1) / z0.shape[-1] - log_p).mean(1)


class KLDivergence(Objective):
    """beta * KL(q || p) of a latent model: term ``kl``; diagnostics ``kl_dim<d>`` (unweighted KL
    per latent dimension, batch mean) and, during a warm-up, ``kl_weight``.

    Reads ``outputs["posterior"]`` and ``outputs["prior"]`` (axis-aligned Normals, batch (B,),
    event (L,)): the KL in closed form; or, when the network returns
    ``outputs["posterior_flow"] = (z0, log_det, z_k)`` (samples of a flowed posterior whose base
    is ``outputs["posterior"]``), the Monte Carlo estimate :func:`monte_carlo_kl`.

    Args:
        beta: weight of the KL.
        warmup_steps: anneal the weight linearly from 0 to ``beta`` over this many training steps
            (0: no warm-up; Bowman et al. 2016). Validation and test use ``beta``.
        free_bits: lambda, a floor in nats on the batch-mean KL of each latent dimension (0: off).
    """

    name = "kl"

    def __init__(self, beta: float = 1.0, warmup_steps: int = 0, free_bits: float = 0.0) -> None:
        if beta < 0:
            raise ValueError(f"beta must be non-negative, got {beta}")
        if warmup_steps < 0:
            raise ValueError(f"kl_warmup_steps must be non-negative, got {warmup_steps}")
        if free_bits < 0:
            raise ValueError(f"free_bits must be non-negative (nats per latent dimension), got {free_bits}")
        self.beta = beta
        self.warmup_steps = warmup_steps
        self.free_bits = free_bits

    def weight(self, step: int, training: bool) -> float:
        """``beta * min(1, step / warmup_steps)`` in training with a warm-up, ``beta`` otherwise."""
        if not training or self.warmup_steps == 0:
            return self.beta
        return self.beta * min(1.0, step / self.warmup_steps)

    @staticmethod
    def estimates(outputs: NetworkOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """(per image (B,), per image and latent dimension (B, L)) KL estimates of the outputs."""
        posterior, prior = outputs["posterior"], outputs["prior"]
        if "posterior_flow" in outputs:
            z0, log_det, z_k = outputs["posterior_flow"]
            return (monte_carlo_kl(posterior, z0, log_det, z_k, prior),
                    monte_carlo_kl_per_dim(posterior, z0, log_det, z_k, prior))
        # Axis-aligned Normals: the KL is the sum over d of the per-dimension KLs.
        return kl_divergence(posterior, prior), kl_divergence(posterior.base_dist, prior.base_dist)

    def terms(self, per_image: torch.Tensor, per_dim: torch.Tensor, step: int = 0, training: bool = False) -> LossTerms:
        """The weighted ``kl`` term and its diagnostics.

        Args:
            per_image: (B,) KL estimate per image (the loss without free bits).
            per_dim: (B, L) the same split over latent dimensions (its sum over L is ``per_image``);
                the free-bits floor applies to its batch mean per dimension.
        """
        weight = self.weight(step, training)
        dims = per_dim.mean(0)
        if self.free_bits > 0:
            kl = weight * dims.clamp_min(self.free_bits).sum()
        else:
            kl = weight * per_image.mean()
        diagnostics = {f"kl_dim{d}": value for d, value in enumerate(dims.detach().unbind())}
        if self.warmup_steps and training:  # outside training the weight is beta
            diagnostics["kl_weight"] = torch.tensor(weight, device=per_image.device)
        return LossTerms({"kl": kl}, diagnostics)

    def __call__(self, context: StepContext) -> LossTerms:
        return self.terms(*self.estimates(context.outputs), context.step, context.training)


class HierarchicalKL(KLDivergence):
    """beta * sum_l w_l KL(q_l || p_l) over the latent levels of a hierarchical model (PHiSeg,
    HPU-Net): term ``kl``; diagnostics ``kl_level<l>`` (unweighted, batch mean; level 0 is the
    finest) and, during a warm-up, ``kl_weight``.

    Reads ``outputs["posteriors"]`` and ``outputs["priors"]``: per level, coarse to fine,
    axis-aligned Normals over the level's latent map (batch (B,)), the prior conditioned on the
    posterior's draws of the levels above. Each KL is in closed form, summed over the map.

    Args:
        level_weights: w_l, finest level first (PHiSeg: 4^l, HPU-Net: all 1).
        beta, warmup_steps: as in :class:`KLDivergence`.
        free_bits: a floor in nats on the batch-mean KL of each latent entry (each channel and
            pixel of each level's map, the analogue of a PU-Net's latent dimension; 0: off).
    """

    def __init__(self, level_weights: list[float], beta: float = 1.0, warmup_steps: int = 0,
                 free_bits: float = 0.0) -> None:
        super().__init__(beta, warmup_steps, free_bits)
        if any(w < 0 for w in level_weights):
            raise ValueError(f"level weights must be non-negative, got {level_weights}")
        self.level_weights = list(level_weights)

    def __call__(self, context: StepContext) -> LossTerms:
        posteriors, priors = context.outputs["posteriors"], context.outputs["priors"]
        if len(posteriors) != len(self.level_weights) or len(priors) != len(posteriors):
            raise ValueError(f"expected {len(self.level_weights)} latent levels, got {len(posteriors)} posteriors "
                             f"and {len(priors)} priors")
        # coarse to fine in the outputs; level 0 (weight w_0) is the finest
        pairs = list(zip(posteriors[::-1], priors[::-1]))
        per_level = torch.stack([kl_divergence(q, p) for q, p in pairs], dim=1)  # (B, L)
        if self.free_bits > 0:  # floor every latent entry's batch-mean KL, then sum each map
            means = torch.stack([kl_divergence(q.base_dist, p.base_dist).mean(0).clamp_min(self.free_bits).sum()
                                 for q, p in pairs])
        else:
            means = per_level.mean(0)
        weights = torch.as_tensor(self.level_weights, dtype=means.dtype, device=means.device)
        weight = self.weight(context.step, context.training)
        diagnostics = {f"kl_level{l}": value for l, value in enumerate(per_level.mean(0).detach().unbind())}
        if self.warmup_steps and context.training:
            diagnostics["kl_weight"] = torch.tensor(weight, device=means.device)
        return LossTerms({"kl": weight * (weights * means).sum()}, diagnostics)


def sinkhorn_divergence(
    x: torch.Tensor, y: torch.Tensor, blur: float = 0.05, diameter: float | None = 100.0, scaling: float = 0.5
) -> torch.Tensor:
    """Per-image Sinkhorn divergence S_eps between point clouds, GeomLoss with p = 2.

    GeomLoss's p = 2 ground cost is |x - y|^2 / 2, so for a small blur S approaches half the squared
    2-Wasserstein distance. Computed in float32 whatever the input precision.

    Args:
        x, y: (B, N, L) and (B, M, L) point clouds, uniform weights; image b of x is only compared
            with image b of y.
        blur, diameter, scaling: GeomLoss's ``SamplesLoss`` settings (eps = blur ** p).

    Returns:
        (B,) divergences.
    """
    from geomloss import SamplesLoss

    if x.ndim != 3 or y.ndim != 3 or x.shape[0] != y.shape[0] or x.shape[-1] != y.shape[-1]:
        raise ValueError(f"expected point clouds (B, N, L) and (B, M, L), got {tuple(x.shape)} and {tuple(y.shape)}")
    loss = SamplesLoss("sinkhorn", p=2, blur=blur, diameter=diameter, scaling=scaling, backend="tensorized")
    with torch.autocast(device_type=x.device.type, enabled=False):  # float32 under mixed precision too
        return loss(x.float(), y.float())


class SinkhornDivergence(Objective):
    """gamma * S_eps between the flowed posterior and prior samples of each image (the cSAE's
    eq. 12): term ``sinkhorn``, batch mean. Reads ``outputs["ot_posterior"]`` and
    ``outputs["ot_prior"]``, (B, N_OT, L) each.

    Args:
        gamma: weight.
        blur, diameter, scaling: GeomLoss settings (:func:`sinkhorn_divergence`).
    """

    name = "sinkhorn"

    def __init__(self, gamma: float = 1.0, blur: float = 0.05, diameter: float = 100.0, scaling: float = 0.5) -> None:
        if gamma < 0:
            raise ValueError(f"gamma must be non-negative, got {gamma}")
        if blur <= 0 or not 0 < scaling < 1:
            raise ValueError(f"sinkhorn_blur must be positive and sinkhorn_scaling in (0, 1), got {blur} and {scaling}")
        self.gamma = gamma
        self.blur = blur
        self.diameter = diameter
        self.scaling = scaling

    def __call__(self, context: StepContext) -> LossTerms:
        outputs = context.outputs
        divergence = sinkhorn_divergence(outputs["ot_posterior"], outputs["ot_prior"], self.blur, self.diameter,
                                         self.scaling)
        return LossTerms({"sinkhorn": self.gamma * divergence.mean()})


OptionalObjectiveFactory = Callable[[Mapping[str, Any]], "Objective | None"]

OPTIONAL_OBJECTIVES: dict[str, OptionalObjectiveFactory] = {}
"""Objectives a configuration can add to any model: name -> factory reading the model's
hyperparameters (e.g. the shared ``teacher`` and ``distillation``) and returning the objective or
None (not asked for). :mod:`probseg.distillation` registers ``"distillation"``."""


def register_optional_objective(name: str) -> Callable[[OptionalObjectiveFactory], OptionalObjectiveFactory]:
    """Decorator adding a factory to :data:`OPTIONAL_OBJECTIVES` (registering a factory of the same
    module and name again, e.g. after a module reload, replaces it).

    An objective is a plain object, not a submodule of the task: anything trainable it holds stays
    out of the optimizer, the state dict and DDP's gradient sync (a teacher, which must stay
    frozen, is the intended case). Trainable parts belong in the network.
    """

    def add(factory: OptionalObjectiveFactory) -> OptionalObjectiveFactory:
        known = OPTIONAL_OBJECTIVES.get(name)
        if known is not None and known is not factory and known.__qualname__ != factory.__qualname__:
            raise ValueError(f"an optional objective named {name!r} is already registered ({known.__qualname__})")
        OPTIONAL_OBJECTIVES[name] = factory
        return factory

    return add


def optional_objectives(options: Mapping[str, Any]) -> list[Objective]:
    """The objectives a model's hyperparameters ``options`` ask for, in registration order."""
    found = (factory(options) for factory in OPTIONAL_OBJECTIVES.values())
    return [objective for objective in found if objective is not None]


SOFT_REGION_KEYS = ("fusion", "weight", "loss", "samples")
"""Keys of a model's ``soft_region:`` mapping (:class:`SoftRegion`)."""

SOFT_REGION_FUSIONS = ("mean", "weighted_mean")
"""Fused maps of all raters a :class:`SoftRegion` term can aim at."""


class SoftRegion(Objective):
    """The mixed objective's soft-label term (issue 21, item 5): a region loss between the
    model's predictive mean and the fused map of all raters, term ``soft_region``.

    Fused targets collapse a latent model's hypotheses: a target that is the same at every step
    gives the posterior nothing to tell apart. The mixed objective keeps the model's own target
    (``fusion: random``, one rater per image per step) for the posterior and the reconstruction,
    so the latent still separates the raters, and adds

    .. math::
        w \\, \\Delta\\big(\\bar p, \\bar y\\big), \\qquad
        \\bar p = \\frac{1}{M} \\sum_{m=1}^{M} \\mathrm{softmax}\\big(f(x, z_m)\\big), \\quad
        z_m \\sim p(z \\mid x)

    with Delta a region loss (DML1 by default: Wang et al., "Dice Semimetric Losses", eq. 4) and
    y-bar the fused map of the image's present raters (uniform or Dice-weighted mean).

    Why the prior and not the posterior: at test time there is no label, the hypotheses are prior
    draws and the predictive mean the metrics score is their mean, so the term shapes exactly
    that. Posterior draws are conditioned on the one rater of the step: their mean is that
    rater's map, not the raters' spread, and pulling it towards the fused map would teach the
    posterior to ignore its label, the collapse the mixed objective avoids. The draws are
    reparameterized, so the gradient reaches the prior net, the combiner and the U-Net; the
    posterior gets none from this term.

    Cost: the network's :meth:`~probseg.models.network.Network.predictive_log_probabilities`
    with this step's outputs; the PU-Net family (punet, planar, csae) reuses the U-Net features
    and the prior of the training pass, so only the combiner runs M more times. Other networks
    draw M hypotheses afresh (a second pass).

    The loss has the reconstruction's ``loss_options`` (its recipe, pixel reduction and region
    options), so the weight is on the reconstruction's scale; the fusion has the model's
    ``fusion_options``. The term is computed at every stage (``val/soft_region`` and
    ``test/soft_region`` too).

    Args:
        num_classes: K.
        fusion: the fused map, one of :data:`SOFT_REGION_FUSIONS`.
        weight: w, positive.
        loss: a region loss of :data:`probseg.losses.functional.REGION_LOSSES`.
        samples: M, prior hypotheses averaged into the predictive mean.
        loss_options: the model's ``loss_options``.
        fusion_options: the model's ``fusion_options``.
    """

    name = "soft_region"

    def __init__(self, num_classes: int, fusion: str = "mean", weight: float = 1.0, loss: str = "dml1",
                 samples: int = 4, loss_options: Mapping[str, Any] | None = None,
                 fusion_options: Mapping[str, Any] | None = None) -> None:
        if fusion not in SOFT_REGION_FUSIONS:
            raise ValueError(f"soft_region.fusion must be one of {SOFT_REGION_FUSIONS} (a fused map of all raters; "
                             f"the posterior and the reconstruction keep the model's fusion), got {fusion!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise TypeError(f"soft_region.weight must be a number, got {weight!r}")
        if not 0 < weight < float("inf"):
            raise ValueError(f"soft_region.weight must be positive and finite (leave soft_region out to turn the "
                             f"term off), got {weight}")
        if loss not in L.REGION_LOSSES:
            raise ValueError(f"soft_region.loss must be a region loss, one of {L.REGION_LOSSES}, got {loss!r}")
        if isinstance(samples, bool) or not isinstance(samples, int):
            raise TypeError(f"soft_region.samples must be an integer, got {samples!r}")
        if samples < 1:
            raise ValueError(f"soft_region.samples must be at least 1, got {samples}")
        self.num_classes = num_classes
        self.fusion = fusion
        self.weight = float(weight)
        self.kind = loss
        self.samples = samples
        self.loss = ReconstructionLoss({loss: self.weight}, **dict(loss_options or {}))
        self.fusion_options = resolved_fusion_options(fusion_options)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None, num_classes: int,
                    loss_options: Mapping[str, Any] | None = None,
                    fusion_options: Mapping[str, Any] | None = None) -> SoftRegion | None:
        """The term a model's ``soft_region`` argument asks for (None: off)."""
        if config is None:
            return None
        if not isinstance(config, Mapping):
            raise TypeError(f"soft_region must be a mapping with keys from {SOFT_REGION_KEYS}, e.g. "
                            f"{{'fusion': 'mean', 'weight': 1.0}}, got {config!r}")
        unknown = sorted(set(config) - set(SOFT_REGION_KEYS))
        if unknown:
            raise ValueError(f"unknown soft_region keys {unknown}; expected names from {SOFT_REGION_KEYS}")
        return cls(num_classes, loss_options=loss_options, fusion_options=fusion_options, **config)

    def target(self, batch: Mapping[str, Any], checked: bool = False) -> torch.Tensor:
        """The fused map of each image's present raters, (B, K, H, W) float32."""
        return fuse_raters(batch["masks"], batch.get("rater_mask"), self.num_classes, self.fusion, checked=checked,
                           **self.fusion_options)

    def __call__(self, context: StepContext) -> LossTerms:
        log_probs = context.network.predictive_log_probabilities(context.batch["image"], self.samples,
                                                                 context.generator, outputs=context.outputs)
        target = self.target(context.batch, context.checked).to(log_probs.dtype)
        # log p-bar is a logit vector of p-bar (softmax(log p) = p): the reconstruction's loss applies as it is.
        (value,) = self.loss(log_probs, target).values()
        return LossTerms({"soft_region": value})


@register_optional_objective("soft_region")
def soft_region_from_options(options: Mapping[str, Any]) -> SoftRegion | None:
    """The :class:`SoftRegion` term a model's shared options (``soft_region``, ``num_classes``,
    ``loss_options``, ``fusion_options``) ask for, or None."""
    return SoftRegion.from_config(options.get("soft_region"), options["num_classes"], options.get("loss_options"),
                                  options.get("fusion_options"))

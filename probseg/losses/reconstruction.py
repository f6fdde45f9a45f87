"""The reconstruction term of every zoo model: a weighted sum of losses configured in YAML.

``{"ce": 0.25, "dml1": 0.75}`` is the Dice semimetric paper's mix. Components:

* ``"ce"``: cross-entropy from the logits (stable log-softmax), hard or soft targets;
* a region loss of :data:`~probseg.losses.functional.REGION_LOSSES` on the softmax probabilities;
* ``"uniform_kl"``: per pixel -mean_c log p_c (pulls predictions towards uniform; no target);
* ``"mse"``: per-pixel squared error of the probabilities.

Scale. With ``pixel_reduction="sum"`` (the zoo's default) the cross-entropy is summed over pixels
as in the PU-Net's ELBO, and every per-pixel-averaged component (region losses, uniform_kl, mse)
is multiplied by the number of pixels, so the weights keep their ratio while the KL weight beta
keeps its meaning. ``pixel_reduction="mean"`` averages over pixels instead (the paper's scale).

Recipes. ``recipe="probseg"`` (default) and ``recipe="paper"`` (the reductions of the Dice
semimetric paper's reference code, JDTLosses) set the defaults of the options below; an option
given explicitly wins:

===================  ===========  ====================  ============================================
option               probseg      paper                 why probseg's default differs
===================  ===========  ====================  ============================================
``pixel_reduction``  ``"sum"``    ``"mean"``            the PU-Net's ELBO scale: beta keeps its meaning
``per_image``        True         False (batch-pooled)  one loss per image (``reduction="none"``),
                                                        independent of the other images in the batch
``classes``          ``"all"``    ``"auto"``            per image, "present" would not penalise false
                                                        positives on an image without the class
``smooth_form``      ``"loss"``   ``"tversky"``         s added to N and D as ``region_loss`` writes
                                                        them (reference s = 1 is smooth = 2 for DML1)
===================  ===========  ====================  ============================================

``classes="auto"`` is the reference's rule: ``"present"`` when the target is given as class ids
(hard labels: the classes that occur in the batch, or the image), ``"all"`` for probability maps
(soft labels, a teacher). ``smooth`` is 1 in both (with ``smooth_form="tversky"``, the reference's
s = 1). With ``per_image=False`` a region loss is one value for the batch (see
:func:`~probseg.losses.functional.region_loss`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from probseg._ops import one_hot, resolve_recipe
from probseg.losses import functional as L

COMPONENTS = ("ce", *L.REGION_LOSSES, "uniform_kl", "mse")
"""Names accepted as reconstruction components."""

REGION_OPTIONS = ("alpha", "beta", "gamma", "smooth", "classes", "per_image", "smooth_form")

LOSS_RECIPES: dict[str, dict[str, Any]] = {
    "probseg": {"pixel_reduction": "sum", "per_image": True, "classes": "all", "smooth_form": "loss"},
    "paper": {"pixel_reduction": "mean", "per_image": False, "classes": "auto", "smooth_form": "tversky"},
}
"""Defaults of :class:`ReconstructionLoss` per ``recipe`` (see the module docstring)."""


class ReconstructionLoss(nn.Module):
    """Weighted sum of reconstruction components, returned per component.

    Args:
        weights: component name -> weight (non-negative, at least one positive), e.g.
            ``{"ce": 0.25, "dml1": 0.75}``.
        pixel_reduction: "sum" or "mean" (see the module docstring); None: the recipe's ("sum").
        eps: probability floor inside the logs of "uniform_kl".
        recipe: "probseg" (default) or "paper": the defaults of ``pixel_reduction`` and of the
            region options (see the module docstring).
        **region_options: options of the region losses: alpha, beta (Tversky), gamma (focal),
            smooth, classes ("all" | "present" | "auto"), per_image, smooth_form.
    """

    def __init__(self, weights: Mapping[str, float] | None = None, pixel_reduction: str | None = None,
                 eps: float = 1e-7, recipe: str = "probseg", **region_options: Any) -> None:
        super().__init__()
        weights = dict(weights or {"ce": 1.0})
        unknown = sorted(set(weights) - set(COMPONENTS))
        if unknown:
            raise ValueError(f"unknown reconstruction components {unknown}; expected names from {COMPONENTS}")
        if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
            raise ValueError(f"reconstruction weights must be non-negative with one positive, got {weights}")
        resolved = resolve_recipe(LOSS_RECIPES, recipe, {"pixel_reduction": pixel_reduction, **region_options},
                                  prefix="loss ", known=(*REGION_OPTIONS, "pixel_reduction", "eps"))
        pixel_reduction = resolved.pop("pixel_reduction")
        if pixel_reduction not in ("sum", "mean"):
            raise ValueError(f"pixel_reduction must be 'sum' or 'mean', got {pixel_reduction!r}")
        self.weights = {k: float(v) for k, v in weights.items() if v > 0}
        self.pixel_reduction = pixel_reduction
        self.eps = eps
        self.recipe = recipe
        self.region_options = region_options  # as given
        self._resolved_options = resolved  # with the recipe's defaults
        probe = torch.full((1, 2, 1, 1), 0.5)
        for name in [k for k in self.weights if k in L.REGION_LOSSES] or ["dml1"]:
            # bad option values fail here, not at step 1
            L.region_loss(probe, probe, name, **self._region_options(hard=False))

    @property
    def resolved_region_options(self) -> dict[str, Any]:
        """The region options applied: the recipe's defaults with the options given over them
        (``region_options`` holds only those given). ``classes="auto"`` is resolved at each call:
        ``"present"`` for class-id targets, ``"all"`` for probability maps."""
        return dict(self._resolved_options)

    def _region_options(self, hard: bool) -> dict[str, Any]:
        """The region options of a call, ``classes="auto"`` resolved by the target's kind."""
        if self._resolved_options["classes"] != "auto":
            return self._resolved_options
        return {**self._resolved_options, "classes": "present" if hard else "all"}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weighted components, batch means: ``{"rec_<name>": weight * loss}``.

        Args:
            logits: (B, K, H, W).
            target: (B, K, H, W) target probabilities, or (B, H, W) class ids (hard labels; the
                cross-entropy then reads them directly, the other components one-hot encode them).
        """
        hard = target.shape == logits.shape[:1] + logits.shape[2:]
        if not hard and target.shape != logits.shape:
            raise ValueError(
                f"target {tuple(target.shape)} must be (B, K, H, W) probabilities or (B, H, W) class ids "
                f"matching logits {tuple(logits.shape)}"
            )
        pixels = logits.shape[-2] * logits.shape[-1]
        scale = pixels if self.pixel_reduction == "sum" else 1
        probs = None
        maps = one_hot(target, logits.shape[1], logits.dtype) if hard and set(self.weights) - {"ce"} else target
        terms = {}
        for name, weight in self.weights.items():
            if name == "ce":
                value = L.cross_entropy(logits, target, "mean", self.pixel_reduction)
            else:
                probs = logits.softmax(dim=1) if probs is None else probs
                if name in L.REGION_LOSSES:
                    value = L.region_loss(probs, maps, name, check=False, **self._region_options(hard))
                elif name == "uniform_kl":  # from the logits: log_softmax stays finite where p underflows
                    value = -F.log_softmax(logits, dim=1).clamp_min(math.log(self.eps)).mean(1).mean()
                else:  # mse
                    value = (probs - maps).square().sum(1).mean()
                value = value * scale
            terms[f"rec_{name}"] = weight * value
        return terms

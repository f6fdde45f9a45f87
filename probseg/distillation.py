"""Knowledge distillation from a (KDE-calibrated) teacher checkpoint, for any zoo student.

Wang et al., "Dice Semimetric Losses: Optimizing the Dice Score with Soft Labels", Sec. 3.5 and
Appendix E. The student's loss is its own loss (reconstruction against the fused raters, plus KL
terms for latent models) plus distillation terms against the teacher's probabilities t:

.. math::
    \\mathcal{L}_{KD} = w_{CE} \\, \\mathrm{CE}(t, \\bar p) + w_{DML} \\, \\Delta_{DML}(\\bar p, t) + \\dots

* t: the teacher's pixel-wise predictive probabilities, the mean of the softmax of its S hypotheses
  (one map for a deterministic teacher), recalibrated by the kernel density estimate of
  E[y | f(x)] (:mod:`probseg.calibration.kde`) on each batch and optionally label-smoothed;
* p-bar: the student's predictive probabilities: for a deterministic student its prediction in
  this step, for a latent-variable student the mean softmax of ``student_samples`` hypotheses
  drawn from its prior (reparameterized, so the prior net learns from the teacher too), which
  leaves the posterior reconstruction of the individual raters untouched.

The key points' labels y_i of the KDE are the raters' mean (one-hot for a single rater): with y a
random rater, E[y | f] is the same function, estimated with less variance.

Terms are on the scale of the student's reconstruction (its ``loss_options``, e.g. pixel sums)
and are logged as ``{stage}/kd_<name>``.

Recipes. ``recipe: paper`` sets the defaults of the distillation to the reference code's
(JDTLosses, ``train_kd.py``, ``models/segmentor.py``, ``kde.py``); ``recipe: probseg`` (default)
keeps probseg's. An option given explicitly wins.

=================  ==========================  ==================================================
option             probseg                     paper (reference code)
=================  ==========================  ==================================================
``weights``        ``{ce: 1.0, dml1: 1.0}``    ``{ce: 0.125, dml1: 0.375}``: the teacher half,
                                               ``teacher_weight`` 0.5 x (0.25 CE + 0.75 DML1)
``kde``            importance-weighted, key    unweighted (``importance_weights: false``), key
                   points from the batch       points from each image (``key_scope: image``)
``kde_labels``     ``mean`` (raters' mean)     ``majority`` (a hard label; one rater: its mask)
=================  ==========================  ==================================================

The reference's KD loss is ``0.5 L(p, y) + 0.5 L(p, t)`` with ``L = 0.25 CE + 0.75 DML1``: the
label half is the model's own reconstruction, so the paper's recipe also needs the model's
``reconstruction: {ce: 0.125, dml1: 0.375}`` and ``loss_options: {recipe: paper}`` (a warning says
when either differs; ``experiments/synthetic/unet_kd_paper.yaml`` sets all of it). Its teacher is
one deterministic network; a probabilistic teacher's mean over ``teacher_samples`` hypotheses is
probseg's extension (a warning says so under the paper's recipe). Why probseg's defaults differ:
the importance weights make the KDE consistent (the unweighted estimator with class-balanced key
points is biased towards balanced classes: :mod:`probseg.calibration.kde`); the raters' mean as
key labels estimates the same E[y | f] as a random rater with less variance, and a majority vote
is a different function of the raters; the weights are the student's own scale (pixel sums).
"""

from __future__ import annotations

import hashlib
import numbers
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from probseg._ops import resolve_recipe
from probseg.calibration import KDECalibration
from probseg.data.fusion import fuse_raters, majority_vote
from probseg.losses.reconstruction import ReconstructionLoss
from probseg.models.objectives import (
    LossTerms,
    Objective,
    StepContext,
    register_optional_objective,
)

if TYPE_CHECKING:
    from probseg.models.base import ProbSegModel

DISTILLATION_KEYS = ("recipe", "weights", "kde", "kde_labels", "teacher_samples", "student_samples",
                     "label_smoothing")
"""Keys of a model's ``distillation:`` mapping."""

DEFAULT_WEIGHTS = {"ce": 1.0, "dml1": 1.0}
"""The paper's two distillation terms (Table 7: CE and DML between teacher and student)."""

DISTILLATION_RECIPES: dict[str, dict[str, Any]] = {
    "probseg": {"weights": DEFAULT_WEIGHTS, "kde": {}, "kde_labels": "mean"},
    "paper": {"weights": {"ce": 0.125, "dml1": 0.375}, "kde": {"importance_weights": False, "key_scope": "image"},
              "kde_labels": "majority"},
}
"""Defaults per ``recipe`` (see the module docstring): the weights, the KDE options a ``kde: true``
or a ``kde`` mapping starts from, and the key points' labels."""

KDE_LABELS = ("mean", "majority")
"""Labels of the KDE's key points: the raters' mean (soft) or their majority vote (hard)."""


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(16 * 2**20), b""):
            digest.update(block)
    return digest.hexdigest()


class Distillation(Objective):
    """A teacher checkpoint, its calibration and the distillation loss of a student: the optional
    objective ``"distillation"`` of every zoo model (terms ``kd_<component>``, in training and
    validation; the test loss is the model's own).

    Args:
        teacher: path of a zoo checkpoint (any model; a deterministic ``unet`` is the usual one).
            Loaded lazily (:meth:`teacher_model`), so a student checkpoint reloads without it.
        num_classes: K of the student (the teacher must match).
        in_channels: C of the student (the teacher must match).
        weights: distillation components -> weights, names as in
            :class:`~probseg.losses.ReconstructionLoss` (default: the recipe's,
            ``{"ce": 1.0, "dml1": 1.0}`` for probseg).
        kde: KDE calibration of the teacher: True (default: the recipe's options, bandwidth 1e-3
            as in the paper's Table 8), False / None (raw teacher), or a mapping of
            :class:`~probseg.calibration.KDECalibration` options (over the recipe's).
        teacher_samples: hypotheses of a probabilistic teacher averaged into t (a deterministic
            teacher is run once).
        student_samples: prior hypotheses of a latent-variable student averaged into p-bar.
        label_smoothing: eps of t <- (1 - eps) t + eps / K, applied after the KDE (0: off).
        loss_options: the student's reconstruction options (pixel_reduction, region options).
        recipe: ``"probseg"`` (default) or ``"paper"``: the defaults of ``weights``, ``kde`` and
            ``kde_labels`` (see the module docstring).
        kde_labels: labels of the KDE's key points, ``"mean"`` (the raters' mean) or
            ``"majority"`` (their majority vote, a hard label); None: the recipe's.
        reconstruction: the student's reconstruction weights, only compared with the reference's
            recipe under ``recipe="paper"`` (a warning when they differ); None: not compared.
    """

    name = "distillation"

    def __init__(
        self,
        teacher: str | os.PathLike,
        num_classes: int,
        in_channels: int,
        weights: Mapping[str, float] | None = None,
        kde: bool | Mapping[str, Any] | None = True,
        teacher_samples: int = 16,
        student_samples: int = 1,
        label_smoothing: float = 0.0,
        loss_options: Mapping[str, Any] | None = None,
        recipe: str = "probseg",
        kde_labels: str | None = None,
        reconstruction: Mapping[str, float] | None = None,
    ) -> None:
        if not teacher or not isinstance(teacher, (str, os.PathLike)):
            raise ValueError(f"distillation needs a teacher checkpoint path (model argument 'teacher'), got {teacher!r}")
        for key, value in (("teacher_samples", teacher_samples), ("student_samples", student_samples)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"distillation.{key} must be an integer, got {value!r}")
        if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real):
            raise TypeError(f"distillation.label_smoothing must be a number, got {label_smoothing!r}")
        resolved = resolve_recipe(DISTILLATION_RECIPES, recipe, {"weights": weights, "kde_labels": kde_labels},
                                  {"kde_labels": KDE_LABELS}, prefix="distillation.")
        if weights is not None and (not isinstance(weights, Mapping) or not weights):
            raise ValueError(f"distillation.weights must name at least one component, e.g. {DEFAULT_WEIGHTS}, got {weights!r}")
        if teacher_samples < 1:
            raise ValueError(f"distillation.teacher_samples must be positive, got {teacher_samples}")
        if student_samples < 1:
            raise ValueError(f"distillation.student_samples must be positive, got {student_samples}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"distillation.label_smoothing must be in [0, 1), got {label_smoothing}")
        self.teacher_path = Path(teacher)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.recipe = recipe
        self.kde_labels = resolved["kde_labels"]
        self.weights = dict(resolved["weights"])
        try:
            self.loss = ReconstructionLoss(self.weights, **dict(loss_options or {}))
        except (TypeError, ValueError) as err:
            raise ValueError(f"distillation.weights: {err}") from None
        if kde is True or isinstance(kde, Mapping):
            kde = {**resolved["kde"], **(kde if isinstance(kde, Mapping) else {})}
        try:
            self.kde = KDECalibration.from_config(kde)
        except (TypeError, ValueError) as err:
            raise ValueError(f"distillation.kde: {err}") from None
        if self.kde is not None:
            try:
                self.kde.check_num_classes(num_classes)
            except ValueError as err:
                raise ValueError(f"distillation.kde: {err}") from None
        self.teacher_samples = int(teacher_samples)
        self.student_samples = int(student_samples)
        self.label_smoothing = float(label_smoothing)
        self._teacher: ProbSegModel | None = None
        self.fingerprint: str | None = None  # sha256 of the teacher file, once loaded
        self.expected_fingerprint: str | None = None  # the one a student checkpoint recorded
        if recipe == "paper":
            self._check_paper_recipe(reconstruction)

    def _check_paper_recipe(self, reconstruction: Mapping[str, float] | None) -> None:
        """Warn where the student's own loss is not the label half of the reference's KD loss."""
        problems = []
        if reconstruction is not None and {k: float(v) for k, v in reconstruction.items() if v} != self.weights:
            problems.append(f"the model's reconstruction {dict(reconstruction)} differs from the distillation weights "
                            f"{self.weights} (the reference puts the same mix on the label and on the teacher, half "
                            "each: set reconstruction to the distillation weights)")
        if self.loss.recipe != "paper":
            problems.append("the model's loss_options have no recipe: paper (the reference's pixel means, batch-pooled "
                            "region losses, present classes for hard labels and Tversky-form smoothing)")
        if problems:
            warnings.warn("distillation recipe 'paper' is not the reference's KD loss: " + "; ".join(problems),
                          stacklevel=4)

    @classmethod
    def from_config(cls, teacher: str | None, config: Mapping[str, Any] | None, num_classes: int,
                    in_channels: int, loss_options: Mapping[str, Any] | None = None,
                    reconstruction: Mapping[str, float] | None = None) -> Distillation | None:
        """The distillation a model's ``teacher`` and ``distillation`` arguments ask for, or None.

        A ``distillation`` mapping without a ``teacher`` is refused: it would silently train
        without the teacher. ``reconstruction`` (the model's weights, default ``{"ce": 1.0}``) is
        compared with the reference's recipe under ``recipe: paper``.
        """
        if config is not None and not isinstance(config, Mapping):
            raise ValueError(f"distillation must be a mapping of {DISTILLATION_KEYS}, got {config!r}")
        if not teacher:
            if config:
                raise ValueError(
                    "distillation is configured but no teacher checkpoint is given: set the model argument "
                    "'teacher' (e.g. --model.init_args.teacher runs/teacher/checkpoints/last.ckpt)"
                )
            return None
        config = dict(config or {})
        unknown = sorted(set(config) - set(DISTILLATION_KEYS))
        if unknown:
            raise ValueError(f"unknown distillation keys {unknown}; expected names from {DISTILLATION_KEYS}")
        return cls(teacher, num_classes, in_channels, loss_options=loss_options, reconstruction=reconstruction,
                   **config)

    def __repr__(self) -> str:
        return (f"Distillation(teacher={str(self.teacher_path)!r}, recipe={self.recipe!r}, weights={self.weights}, "
                f"kde={self.kde!r}, kde_labels={self.kde_labels!r}, teacher_samples={self.teacher_samples}, "
                f"student_samples={self.student_samples}, label_smoothing={self.label_smoothing})")

    # --- the teacher ---------------------------------------------------------------------------

    def teacher_model(self, device: torch.device | str | None = None) -> ProbSegModel:
        """The teacher in eval mode with frozen weights, on ``device``; loaded on first use.

        It is kept outside the student's modules: not in its state dict, optimizer or DDP wrapper.
        """
        if self._teacher is None:
            from probseg.checkpoint import load_model

            if not self.teacher_path.is_file():
                raise FileNotFoundError(
                    f"teacher checkpoint not found: {self.teacher_path} (model argument 'teacher'); train the "
                    "teacher first, e.g. `probseg fit --config experiments/synthetic/base.yaml "
                    "--config experiments/synthetic/unet_teacher.yaml`"
                )
            # Built in float32 even inside a bf16-true step (Lightning sets the default dtype there).
            default = torch.get_default_dtype()
            torch.set_default_dtype(torch.float32)
            try:
                teacher = load_model(self.teacher_path)
            finally:
                torch.set_default_dtype(default)
            if teacher.num_classes != self.num_classes or teacher.in_channels != self.in_channels:
                raise ValueError(
                    f"teacher {self.teacher_path} has num_classes={teacher.num_classes}, in_channels="
                    f"{teacher.in_channels}; the student has num_classes={self.num_classes}, in_channels={self.in_channels}"
                )
            teacher.requires_grad_(False)
            if self.recipe == "paper" and not teacher.deterministic:
                warnings.warn(f"distillation recipe 'paper': the teacher {self.teacher_path} is probabilistic; the "
                              f"reference distils one deterministic network, here t is the mean of "
                              f"{self.teacher_samples} hypotheses (probseg's extension)", stacklevel=2)
            self.fingerprint = file_sha256(self.teacher_path)
            self.check_fingerprint()
            self._teacher = teacher
        if device is not None and self._teacher.device != torch.device(device):
            self._teacher.to(device)
        return self._teacher

    def check_fingerprint(self) -> None:
        """Warn when the teacher file is not the one a resumed or reloaded student was trained
        with (e.g. the teacher's ``last.ckpt`` was overwritten by a new teacher run)."""
        if self.fingerprint and self.expected_fingerprint and self.fingerprint != self.expected_fingerprint:
            warnings.warn(
                f"the teacher checkpoint {self.teacher_path} has changed since this student was trained with it "
                f"(sha256 {self.fingerprint[:12]}... now, {self.expected_fingerprint[:12]}... then): the student is "
                "distilled from, or evaluated against, a different teacher",
                stacklevel=3,
            )

    @torch.no_grad()
    def teacher_probabilities(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The teacher's predictive probabilities (B, K, H, W), float32, before calibration."""
        teacher = self.teacher_model(images.device)
        dtype = next(teacher.parameters()).dtype
        log_probs = teacher.predictive_log_probabilities(images.to(dtype), self.teacher_samples, generator)
        return log_probs.float().exp()

    @torch.no_grad()
    def calibrate(self, probs: torch.Tensor, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        """KDE-calibrate (when configured) and smooth (when configured) teacher probabilities,
        with the batch's raters' mean (``kde_labels: mean``) or majority vote (``majority``) as
        the key points' labels."""
        if self.kde is not None:
            masks, rater_mask = batch["masks"], batch.get("rater_mask")
            if self.kde_labels == "majority":
                labels = majority_vote(masks, rater_mask, self.num_classes)
            else:
                labels = fuse_raters(masks, rater_mask, self.num_classes, "mean").to(probs.dtype)
            probs = self.kde(probs, labels, generator=generator)
        if self.label_smoothing:
            probs = (1 - self.label_smoothing) * probs + self.label_smoothing / self.num_classes
        return probs

    def targets(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw, calibrated) teacher probabilities of a batch, (B, K, H, W) each."""
        raw = self.teacher_probabilities(batch["image"], generator)
        return raw, self.calibrate(raw, batch, generator)

    # --- the loss ------------------------------------------------------------------------------

    def terms(self, student_log_probs: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weighted distillation terms ``{"kd_<name>": ...}`` of the student's predictive
        log-probabilities (B, K, H, W) against the teacher's probabilities (B, K, H, W)."""
        if student_log_probs.shape != target.shape:
            raise ValueError(
                f"student predictions {tuple(student_log_probs.shape)} and teacher probabilities "
                f"{tuple(target.shape)} differ in shape"
            )
        # log p is a valid logit vector of p (softmax(log p) = p), so the reconstruction's
        # components apply unchanged, on the student's scale.
        terms = self.loss(student_log_probs, target.to(student_log_probs.dtype))
        return {f"kd_{name.removeprefix('rec_')}": value for name, value in terms.items()}

    # --- the objective -------------------------------------------------------------------------

    def __call__(self, context: StepContext) -> LossTerms:
        """The ``kd_*`` terms of a step against the (calibrated) teacher; none at test.

        At validation the diagnostics add the teacher's ECE (``teacher_ece``) and, with a KDE, the
        ECE of the distillation target after calibration (and label smoothing, if set),
        ``teacher_kde_ece``.
        """
        if context.stage == "test":  # test reports the model's own loss
            return LossTerms()
        batch, generator = context.batch, context.generator
        raw, target = self.targets(batch, generator)
        log_probs = context.network.predictive_log_probabilities(batch["image"], self.student_samples, generator,
                                                                 outputs=context.outputs)
        diagnostics = {}
        if context.stage == "val":
            from probseg.metrics.functional import expected_calibration_error

            masks, rater_mask = batch["masks"], batch.get("rater_mask")
            maps = {"teacher_ece": raw, **({"teacher_kde_ece": target} if self.kde is not None else {})}
            diagnostics = {k: expected_calibration_error(v[:, None], masks, rater_mask).mean() for k, v in maps.items()}
        return LossTerms(self.terms(log_probs, target), diagnostics)

    def setup(self, device: torch.device) -> None:
        self.teacher_model(device)  # a missing or mismatched teacher fails before step 1

    def checkpoint_metadata(self) -> dict[str, Any]:
        """Which teacher file the student learnt from (its sha256)."""
        fingerprint = self.fingerprint or self.expected_fingerprint
        return {"teacher_sha256": fingerprint} if fingerprint else {}

    def load_checkpoint_metadata(self, metadata: Mapping[str, Any]) -> None:
        self.expected_fingerprint = metadata.get("teacher_sha256")
        self.check_fingerprint()


@register_optional_objective("distillation")
def distillation_from_options(options: Mapping[str, Any]) -> Distillation | None:
    """The distillation a model's shared options (``teacher``, ``distillation``, ``num_classes``,
    ``in_channels``, ``loss_options``, ``reconstruction``) ask for, or None."""
    return Distillation.from_config(options.get("teacher"), options.get("distillation"), options["num_classes"],
                                    options["in_channels"], options.get("loss_options"),
                                    options.get("reconstruction") or {"ce": 1.0})

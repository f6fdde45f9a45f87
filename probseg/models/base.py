"""Base LightningModule of the zoo: steps, logging, optimizer, checkpoint metadata.

A zoo model implements three things:

* ``__init__``: build its networks from plain arguments (scalars, strings, lists) and call
  ``self.save_hyperparameters()``, so checkpoints reload with ``weights_only=True``;
* :meth:`ProbSegModel.loss_terms`: a dict of named, already weighted scalar loss terms; the base
  class sums them into ``loss`` and logs each as ``"{stage}/{name}"``;
* :meth:`ProbSegModel.sample`: S segmentation hypotheses per image as (B, S, K, H, W) logits.

Knowledge distillation (``teacher`` + ``distillation`` arguments, :mod:`probseg.distillation`)
is added here for every model: the base class adds the ``kd_*`` terms to the model's terms.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch

from probseg.data.fusion import FUSIONS, fuse_raters, majority_vote, random_rater
from probseg.distillation import Distillation
from probseg.layers.gaussian import Generators
from probseg.losses.reconstruction import ReconstructionLoss

CHECKPOINT_KEY = "probseg"
"""Key of the metadata dict a zoo checkpoint carries (model name, class path, version)."""


class LossTerms(dict):
    """The named, weighted scalar loss terms of a batch (a dict: the training loss is their sum),
    plus ``diagnostics``: scalars that are logged as ``"{stage}/{name}"`` but not added to the loss
    (e.g. the KL per latent dimension, the current KL weight)."""

    def __init__(self, terms: dict[str, torch.Tensor] | None = None,
                 diagnostics: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__(terms or {})
        self.diagnostics: dict[str, torch.Tensor] = dict(diagnostics or {})


class ProbSegModel(pl.LightningModule):
    """Shared training plumbing for probabilistic segmentation models.

    Args:
        in_channels: image channels C.
        num_classes: classes K (binary = 2).
        lr: Adam learning rate.
        weight_decay: Adam weight decay (L2, as in the cSAE paper's setup).
        num_predict_samples: hypotheses per image drawn by ``predict``.
        fusion: how the raters of an image become its training target, one of
            :data:`probseg.data.fusion.FUSIONS` ("random": one rater per image per step, the
            PU-Net convention; "mean" / "weighted_mean": soft labels; see
            :func:`probseg.data.fusion.fuse_raters`).
        label_smoothing: eps of ``fusion="label_smoothing"``.
        reconstruction: weights of the reconstruction components, e.g. ``{"ce": 0.25,
            "dml1": 0.75}`` (default ``{"ce": 1.0}``); see :class:`probseg.losses.ReconstructionLoss`.
        loss_options: options of :class:`probseg.losses.ReconstructionLoss` (``pixel_reduction``,
            and for region losses ``classes``, ``smooth``, ``per_image``, ``alpha``, ``beta``,
            ``gamma``).
        teacher: path of a zoo checkpoint to distil from (see :mod:`probseg.distillation`);
            loaded when training starts, so a missing file fails before the first step.
        distillation: options of the distillation (``weights``, ``kde``, ``teacher_samples``,
            ``student_samples``, ``label_smoothing``); with a teacher and no options: CE + DML1
            against the KDE-calibrated teacher. Options without a teacher are refused.

    Gradient clipping is a Trainer setting (``trainer.gradient_clip_val``).
    """

    registry_name: ClassVar[str] = ""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        lr: float = 1e-4,
        weight_decay: float = 5e-5,
        num_predict_samples: int = 16,
        fusion: str = "random",
        label_smoothing: float = 0.1,
        reconstruction: dict[str, float] | None = None,
        loss_options: dict[str, Any] | None = None,
        teacher: str | None = None,
        distillation: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if type(self) is ProbSegModel:
            from probseg.models.registry import MODELS

            raise TypeError(
                "ProbSegModel is the base class; choose a zoo model, e.g. one of: " + ", ".join(sorted(MODELS))
            )
        if in_channels < 1:
            raise ValueError(f"in_channels must be positive, got {in_channels}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2 (binary = 2), got {num_classes}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.lr = lr
        self.weight_decay = weight_decay
        self.num_predict_samples = num_predict_samples
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; expected one of {FUSIONS}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.fusion = fusion
        self.label_smoothing = label_smoothing
        self.reconstruction = ReconstructionLoss(reconstruction, **(loss_options or {}))
        # A plain object, not a submodule: the teacher stays out of the state dict and optimizer.
        self.distiller = Distillation.from_config(teacher, distillation, num_classes, in_channels, loss_options)
        self._predictive: tuple[torch.Tensor, torch.Tensor] | None = None

    # --- what a model implements -------------------------------------------------------------

    def loss_terms(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Named, weighted scalar loss terms of a batch; their sum is the training loss. A model
        may return :class:`LossTerms` to log diagnostics next to them.

        Args:
            batch: a batch dict (see :mod:`probseg.data.base`).
            generator: source of every random draw (rater choice, latent samples); None uses
                torch's global RNG, which Lightning seeds.
        """
        raise NotImplementedError

    def sample(
        self, images: torch.Tensor, num_samples: int = 16, generator: Generators = None
    ) -> torch.Tensor:
        """Draw segmentation hypotheses.

        Args:
            images: (B, C, H, W).
            num_samples: S.
            generator: optional torch.Generator for reproducible draws, or one generator per
                image (then each image's hypotheses do not depend on the batch it sits in).

        Returns:
            (B, S, K, H, W) logits.
        """
        raise NotImplementedError

    @property
    def deterministic(self) -> bool:
        """True when every hypothesis of an image is the same (e.g. a U-Net without dropout)."""
        return False

    def predictive_log_probabilities(
        self, images: torch.Tensor, num_samples: int = 16, generator: Generators = None
    ) -> torch.Tensor:
        """Log of the pixel-wise predictive probabilities, the mean softmax of ``num_samples``
        hypotheses (one for a deterministic model), (B, K, H, W), differentiable.

        Within a training step, a model that cached this step's predictions with
        :meth:`remember_predictive` gets them back instead of running again.
        """
        cached, self._predictive = self._predictive, None
        if cached is not None and cached[0] is images:
            return cached[1]
        samples = self.sample(images, 1 if self.deterministic else num_samples, generator)
        log_probs = samples.float().log_softmax(dim=2)
        return log_probs[:, 0] if log_probs.shape[1] == 1 else log_probs.logsumexp(dim=1) - math.log(log_probs.shape[1])

    def remember_predictive(self, images: torch.Tensor, log_probs: torch.Tensor) -> None:
        """Cache this step's predictive log-probabilities of ``images`` (for a deterministic
        student, the distillation terms then reuse the reconstruction's forward pass)."""
        self._predictive = (images, log_probs) if self.distiller is not None else None

    def distillation_terms(
        self, batch: dict[str, Any], generator: torch.Generator | None = None, stage: str = "train"
    ) -> dict[str, torch.Tensor]:
        """The ``kd_*`` terms of a batch against the (calibrated) teacher.

        At validation it also logs the teacher's ECE (``val/teacher_ece``) and, with a KDE, the
        ECE of the distillation target after calibration (and label smoothing, if set) as
        ``val/teacher_kde_ece``.
        """
        assert self.distiller is not None
        images = batch["image"]
        raw, target = self.distiller.targets(batch, generator)
        log_probs = self.predictive_log_probabilities(images, self.distiller.student_samples, generator)
        if stage == "val":
            from probseg.metrics.functional import expected_calibration_error

            masks, rater_mask = batch["masks"], batch.get("rater_mask")
            ece = {f"{stage}/teacher_ece": raw}
            if self.distiller.kde is not None:
                ece[f"{stage}/teacher_kde_ece"] = target
            self.log_dict({k: expected_calibration_error(v[:, None], masks, rater_mask).mean() for k, v in ece.items()},
                          on_epoch=True, batch_size=images.shape[0], sync_dist=True)
        return self.distiller.terms(log_probs, target)

    def prior_sigmas(self, images: torch.Tensor) -> torch.Tensor | None:
        """Singular values of the prior p(z|x), (B, L), for the Gini index; None for a model
        without a latent prior."""
        return None

    # --- shared plumbing ---------------------------------------------------------------------

    def forward(self, images: torch.Tensor, num_samples: int = 1) -> torch.Tensor:
        """Alias of :meth:`sample`: (B, C, H, W) -> (B, S, K, H, W) logits."""
        return self.sample(images, num_samples)

    def training_target(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        """The target the model learns from in this step, by ``fusion``: (B, H, W) class ids for
        the hard fusions "random" and "majority", (B, K, H, W) probabilities otherwise."""
        masks, rater_mask = batch["masks"], batch.get("rater_mask")
        if self.fusion == "random":
            return random_rater(masks, rater_mask, generator)
        if self.fusion == "majority":
            return majority_vote(masks, rater_mask, self.num_classes)
        return fuse_raters(masks, rater_mask, self.num_classes, self.fusion, self.label_smoothing, generator)

    def reconstruction_terms(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The weighted reconstruction components ``rec_<name>`` of logits against a target."""
        return self.reconstruction(logits, target)

    def check_batch(self, batch: dict[str, Any]) -> None:
        """Raise a clear error when a batch does not follow the library's batch format."""
        missing = [k for k in ("image", "masks") if k not in batch]
        if missing:
            raise KeyError(f"batch is missing {missing}; batches are dicts with 'image' and 'masks'")
        image, masks = batch["image"], batch["masks"]
        if image.ndim != 4 or image.shape[1] != self.in_channels:
            raise ValueError(
                f"batch['image'] must be (B, {self.in_channels}, H, W), got {tuple(image.shape)}"
            )
        if masks.ndim != 4 or masks.shape[0] != image.shape[0] or masks.shape[-2:] != image.shape[-2:]:
            raise ValueError(
                f"batch['masks'] must be (B, R, H, W) matching image {tuple(image.shape)}, got {tuple(masks.shape)}"
            )
        if masks.is_floating_point() or masks.dtype == torch.bool:
            raise TypeError(f"batch['masks'] must hold integer class ids, got dtype {masks.dtype}")
        low, high = torch.stack(torch.aminmax(masks)).tolist()  # one reduction, one host sync
        if low < 0 or high >= self.num_classes:
            raise ValueError(
                f"batch['masks'] holds class ids in [{low}, {high}], outside [0, {self.num_classes - 1}] "
                f"for num_classes={self.num_classes}"
            )
        if not image.is_floating_point():
            raise TypeError(f"batch['image'] must be floating point, got dtype {image.dtype}")
        finite = torch.isfinite(image.flatten(1)).all(dim=1)
        if not bool(finite.all()):
            i = int((~finite).nonzero()[0])
            name = batch["id"][i] if isinstance(batch.get("id"), (list, tuple)) else f"number {i} of the batch"
            raise ValueError(f"batch['image'] of image {name} holds NaN or Inf")
        rater_mask = batch.get("rater_mask")
        if rater_mask is not None and (rater_mask.shape != masks.shape[:2] or rater_mask.dtype != torch.bool):
            raise ValueError(
                f"batch['rater_mask'] must be a (B, R) = {tuple(masks.shape[:2])} bool tensor, got "
                f"{tuple(rater_mask.shape)} {rater_mask.dtype}"
            )

    def _step(self, batch: dict[str, Any], stage: str, batch_idx: int) -> torch.Tensor:
        self.check_batch(batch)
        generator = None
        if stage != "train":
            # Evaluation draws from its own generator, seeded per batch: val/loss is the same for
            # the same weights (fair checkpoint selection), and validating does not consume the
            # training RNG, so validation settings never change the training run.
            generator = torch.Generator(device=batch["image"].device).manual_seed(batch_idx)
        terms = self.loss_terms(batch, generator)
        if self.distiller is not None and stage != "test":  # test reports the model's own loss
            terms.update(self.distillation_terms(batch, generator, stage))
        self._predictive = None
        values = torch.stack(list(terms.values()))
        loss = values.sum()
        if stage == "train":
            finite = bool(torch.isfinite(values).all())  # one host sync per step
            trainer = getattr(self, "_trainer", None)
            if trainer is not None and trainer.world_size > 1:  # every rank stops together, or none
                finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
            if not finite:
                self._stop_on_non_finite(terms, batch)
        on_step = stage == "train"
        logged = {f"{stage}/{name}": value.detach() for name, value in terms.items()}
        logged.update({f"{stage}/{name}": value.detach() for name, value in getattr(terms, "diagnostics", {}).items()})
        rec = [value.detach() for name, value in terms.items() if name.startswith("rec_")]
        if rec:  # the whole reconstruction term, next to its components
            logged[f"{stage}/rec"] = torch.stack(rec).sum()
        batch_size = batch["image"].shape[0]
        self.log_dict(logged, on_step=on_step, on_epoch=not on_step, batch_size=batch_size, sync_dist=not on_step)
        self.log(f"{stage}/loss", loss.detach(), on_step=on_step, on_epoch=not on_step, prog_bar=True,
                 batch_size=batch_size, sync_dist=not on_step)
        return loss

    def _stop_on_non_finite(self, terms: dict[str, torch.Tensor], batch: dict[str, Any]) -> None:
        """Stop training on a NaN/Inf loss term, naming it, after saving the last good weights.

        The check runs before backward: when the weights are still finite they are the last good
        state and go to ``{default_root_dir}/checkpoints/non-finite-step<N>.ckpt``; when an update
        already made them non-finite, nothing is written and ``last.ckpt`` stays the good state.
        """
        import os

        bad = {name: float(value.detach()) for name, value in terms.items() if not bool(torch.isfinite(value))}
        trainer = getattr(self, "_trainer", None)
        step = trainer.global_step if trainer is not None else -1
        saved = ""
        if trainer is not None:
            callback = trainer.checkpoint_callback
            folder = getattr(callback, "dirpath", None) or os.path.join(trainer.default_root_dir, "checkpoints")
            if all(bool(torch.isfinite(p).all()) for p in self.parameters()):
                path = os.path.join(folder, f"non-finite-step{step}.ckpt")
                trainer.save_checkpoint(path)
                saved = f"; the last good state is saved to {path}"
            else:
                saved = (f"; the weights are already non-finite, so nothing was saved: the last good state is the "
                         f"latest checkpoint in {folder} (last.ckpt)")
        ids = batch.get("id")
        raise FloatingPointError(
            f"non-finite loss at training step {step}: {', '.join(f'{k} = {v}' for k, v in bad.items())}"
            + (f" (batch images {list(ids)[:8]})" if ids is not None else "") + saved
        )

    def setup(self, stage: str) -> None:
        if stage == "fit":
            # Same weights on every rank (initialized under one seed), different training draws.
            from probseg.distributed import diverge_per_rank

            diverge_per_rank(torch.initial_seed())
            if self.distiller is not None:  # a missing or mismatched teacher fails before step 1
                self.distiller.teacher_model(self.device)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train", batch_idx)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val", batch_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test", batch_idx)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        samples = self.sample(batch["image"], self.num_predict_samples)
        return {"id": batch.get("id"), "samples": samples}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from probseg import __version__

        from probseg.models.registry import MODELS

        if not self.hparams:
            raise RuntimeError(
                f"{type(self).__qualname__} saved no hyperparameters: call self.save_hyperparameters() "
                "in __init__ so probseg.load_model can rebuild it"
            )
        cls = type(self)
        # A subclass inherits registry_name; only a registered class may claim its name.
        registered = MODELS.get(self.registry_name) is cls
        checkpoint[CHECKPOINT_KEY] = {
            "model": self.registry_name if registered else "",
            "class_path": f"{cls.__module__}.{cls.__qualname__}",
            "version": __version__,
        }
        if self.distiller is not None:  # which teacher file this student learnt from
            fingerprint = self.distiller.fingerprint or self.distiller.expected_fingerprint
            if fingerprint:
                checkpoint[CHECKPOINT_KEY]["teacher_sha256"] = fingerprint

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.distiller is not None:
            self.distiller.expected_fingerprint = checkpoint.get(CHECKPOINT_KEY, {}).get("teacher_sha256")
            self.distiller.check_fingerprint()

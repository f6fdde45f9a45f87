"""The task: the one LightningModule of the zoo, composing a network and objectives.

A zoo model is a small subclass (one file per model, see :mod:`probseg.models.punet`) that
declares only its own arguments, builds its :class:`~probseg.models.network.Network` as
``self.network`` and lists its own :class:`~probseg.models.objectives.Objective`s in
``self.objectives``; everything shared is declared here once:

* the shared training options (below), saved with the model's own ones as flat hyperparameters,
  so checkpoints reload with ``weights_only=True`` and YAML configs stay flat;
* the step: one batch check (:func:`probseg.data.batch.check_batch`), the fused target and the
  reconstruction (:class:`~probseg.models.objectives.Reconstruction`), the model's objectives, the
  optional objectives its configuration adds (e.g. distillation), each term logged as
  ``"{stage}/{name}"``;
* the optimizer, the non-finite guard and the checkpoint metadata.

The shared options reach this class through the subclass's ``**kwargs``; ``probseg fit --help``
lists the model's own arguments and the shared ones, each with its documentation.
"""

from __future__ import annotations

import inspect
import os
import warnings
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from torch import nn

from probseg.checkpoint import CHECKPOINT_KEY
from probseg.data.batch import check_batch
from probseg.layers.gaussian import Generators
from probseg.models.network import Network
from probseg.models.objectives import (
    LossTerms,
    Objective,
    Reconstruction,
    StepContext,
    optional_objectives,
)

__all__ = ["CHECKPOINT_KEY", "LossTerms", "ProbSegModel"]


class ProbSegModel(pl.LightningModule):
    """The task shared by every zoo model.

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
        loss_options: options of :class:`probseg.losses.ReconstructionLoss` (``recipe``,
            ``pixel_reduction``, and for region losses ``classes``, ``smooth``, ``smooth_form``,
            ``per_image``, ``alpha``, ``beta``, ``gamma``).
        teacher: path of a zoo checkpoint to distil from (see :mod:`probseg.distillation`);
            loaded when training starts, so a missing file fails before the first step.
        distillation: options of the distillation (``recipe``, ``weights``, ``kde``, ``kde_labels``,
            ``teacher_samples``, ``student_samples``, ``label_smoothing``); with a teacher and no
            options: CE + DML1 against the KDE-calibrated teacher. Options without a teacher are
            refused.
        channels_last: keep the network's convolution weights (and so its activations) in the
            channels-last memory format (default True): the same maths with faster convolution
            kernels on CPU (1.4-1.9x a training step at the paper config) and on GPUs. False keeps
            PyTorch's default layout.
        fusion_options: ``recipe`` ("probseg" or "paper": Wang et al.'s reference code) and the
            fusion details it sets: ``zero_dice``, ``smoothing_label``, ``smoothing_region``,
            ``boundary_width`` (see :func:`probseg.data.fusion.fuse_raters`).
        soft_region: the mixed objective's soft-label term (:class:`~probseg.models.objectives.SoftRegion`),
            e.g. ``{"fusion": "mean", "weight": 1.0}``: a region loss (``loss``, default "dml1", with
            ``loss_options``) between the predictive mean of ``samples`` (default 4) prior
            hypotheses and the fused map of all raters (``fusion``: "mean" or "weighted_mean"),
            logged as ``{stage}/soft_region``; the posterior and the reconstruction keep ``fusion``
            (for a latent model, "random"). None (default): off.

    Gradient clipping is a Trainer setting (``trainer.gradient_clip_val``).
    """

    registry_name: ClassVar[str] = ""
    reconstructs: ClassVar[bool] = True
    """Whether the task's :class:`~probseg.models.objectives.Reconstruction` adds ``rec_*`` terms
    (a model whose own objective is its likelihood, like the SSN's, sets False; the fused target
    is computed either way)."""
    LEGACY_DEFAULTS: ClassVar[dict[str, Any]] = {}
    """Hyperparameters a checkpoint written before they existed did not save, with the value that
    gives the behaviour it was trained with; :func:`probseg.load_model` fills them in."""

    network: Network

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("loss_terms")
        if own is not None and "stage" not in inspect.signature(own).parameters:
            raise TypeError(
                f"{cls.__qualname__} overrides loss_terms(batch, generator), the model contract of release 0.1. "
                "Since 0.2 a model builds self.network (a probseg.models.network.Network whose forward returns "
                "the tensors its objectives need) and appends its own objectives to self.objectives; the task "
                "computes the terms. See README, Layout."
            )

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Release 0.1 kept the network's parts and methods on the model (model.unet, model.logits).
            modules = self.__dict__.get("_modules") or {}  # (not yet set while __init__ runs)
            network = modules.get("network")
            if network is None or name.startswith("_") or not hasattr(network, name):
                raise
            warnings.warn(f"model.{name} moved to model.network.{name} in release 0.2", DeprecationWarning,
                          stacklevel=2)
            return getattr(network, name)

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
        channels_last: bool = True,
        fusion_options: dict[str, Any] | None = None,
        soft_region: dict[str, Any] | None = None,
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
        # The shared arguments and the subclass's own (the frames above this one): flat hparams.
        self.save_hyperparameters()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.lr = lr
        self.weight_decay = weight_decay
        self.num_predict_samples = num_predict_samples
        self.reconstruction = Reconstruction(num_classes, fusion, label_smoothing, reconstruction, loss_options,
                                             fusion_options)
        self.objectives: list[Objective] = []  # the model's own, set by the subclass
        # Plain objects, not submodules: a teacher stays out of the state dict and optimizer.
        self.extra_objectives = optional_objectives(dict(self.hparams))
        self.register_load_state_dict_pre_hook(_nest_release_0_1_keys)
        self.channels_last = channels_last

    def __setattr__(self, name: str, value: Any) -> None:
        # The subclass assigns its network last in __init__: give it the chosen memory format then
        # (conv weights channels-last; the activations follow them through every convolution).
        if name == "network" and isinstance(value, nn.Module) and self.__dict__.get("channels_last", False):
            value = value.to(memory_format=torch.channels_last)
        super().__setattr__(name, value)

    @property
    def fusion(self) -> str:
        return self.reconstruction.fusion

    @property
    def label_smoothing(self) -> float:
        return self.reconstruction.label_smoothing

    @property
    def distiller(self) -> Objective | None:
        """The distillation objective (:class:`probseg.distillation.Distillation`), if configured."""
        return next((o for o in self.extra_objectives if o.name == "distillation"), None)

    # --- what the network answers ------------------------------------------------------------

    def sample(self, images: torch.Tensor, num_samples: int = 16, generator: Generators = None) -> torch.Tensor:
        """Draw segmentation hypotheses.

        Args:
            images: (B, C, H, W).
            num_samples: S.
            generator: optional torch.Generator for reproducible draws, or one generator per
                image (then each image's hypotheses do not depend on the batch it sits in).

        Returns:
            (B, S, K, H, W) logits.
        """
        return self.network.sample(images, num_samples, generator)

    def sample_weighted(self, images: torch.Tensor, num_samples: int = 16,
                        generator: Generators = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw hypotheses with their weights, for models whose hypotheses are not equally likely
        (a mixture of experts); every other model gives the uniform weights 1 / S.

        Args:
            images, num_samples, generator: as in :meth:`sample`.

        Returns:
            (B, S, K, H, W) logits and (B, S) float32 weights summing to 1 per image.
        """
        return self.network.sample_weighted(images, num_samples, generator)

    @property
    def weighted(self) -> bool:
        """True when :meth:`sample_weighted` gives non-uniform weights."""
        return self.network.weighted

    def forward(self, images: torch.Tensor, num_samples: int = 1) -> torch.Tensor:
        """Alias of :meth:`sample`: (B, C, H, W) -> (B, S, K, H, W) logits."""
        return self.sample(images, num_samples)

    @property
    def deterministic(self) -> bool:
        """True when every hypothesis of an image is the same (e.g. a U-Net without dropout)."""
        return self.network.deterministic

    def prior_sigmas(self, images: torch.Tensor) -> torch.Tensor | None:
        """Singular values of the prior p(z|x), (B, L), for the Gini index; None for a model
        without a latent prior."""
        return self.network.prior_sigmas(images)

    def predictive_log_probabilities(self, images: torch.Tensor, num_samples: int = 16,
                                     generator: Generators = None) -> torch.Tensor:
        """Log of the pixel-wise predictive probabilities, the mean softmax of ``num_samples``
        hypotheses (one for a deterministic model), (B, K, H, W), differentiable."""
        return self.network.predictive_log_probabilities(images, num_samples, generator)

    # --- loss terms --------------------------------------------------------------------------

    def training_target(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        """The target the model learns from in this step, by ``fusion``: (B, H, W) class ids for
        the hard fusions "random" and "majority", (B, K, H, W) probabilities otherwise."""
        return self.reconstruction.target(batch, generator)

    def reconstruction_terms(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The weighted reconstruction components ``rec_<name>`` of logits against a target."""
        return self.reconstruction.loss(logits, target)

    def check_batch(self, batch: dict[str, Any]) -> None:
        """Raise a clear error when a batch does not follow the batch contract
        (:mod:`probseg.data.batch`); one host synchronisation."""
        check_batch(batch, self.in_channels, self.num_classes)

    def loss_terms(self, batch: dict[str, Any], generator: torch.Generator | None = None, *,
                   stage: str | None = None, checked: bool = False) -> LossTerms:
        """Named, weighted scalar loss terms of a batch; their sum is the training loss.

        Args:
            batch: a batch dict (see :mod:`probseg.data.batch`).
            generator: source of every random draw (rater choice, latent samples); None uses
                torch's global RNG, which Lightning seeds.
            stage: "train", "val" or "test" adds the optional objectives (e.g. distillation) for
                that stage; None (default) gives the model's own terms only.
            checked: the batch already passed :meth:`check_batch`.
        """
        target = self.reconstruction.target(batch, generator, checked=checked)
        outputs = self.network(batch, target, generator)
        context = StepContext(batch, target, outputs, self.network, generator, self.training, self.global_step, stage,
                              checked)
        terms = LossTerms()
        own = [self.reconstruction] if self.reconstructs else []
        for objective in [*own, *self.objectives, *(self.extra_objectives if stage else ())]:
            terms.add(objective(context))
        return terms

    # --- shared plumbing ---------------------------------------------------------------------

    def _step(self, batch: dict[str, Any], stage: str, batch_idx: int) -> torch.Tensor:
        self.check_batch(batch)
        generator = None
        if stage != "train":
            # Evaluation draws from its own generator, seeded per batch: val/loss is the same for
            # the same weights (fair checkpoint selection), and validating does not consume the
            # training RNG, so validation settings never change the training run.
            generator = torch.Generator(device=batch["image"].device).manual_seed(batch_idx)
        terms = self.loss_terms(batch, generator, stage=stage, checked=True)
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
        logged.update({f"{stage}/{name}": value.detach() for name, value in terms.diagnostics.items()})
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
        if "network" not in self._modules:
            raise TypeError(f"{type(self).__qualname__} has no network: build self.network in __init__ (README, Layout)")
        if stage == "fit":
            # Same weights on every rank (initialized under one seed), different training draws.
            from probseg.distributed import diverge_per_rank

            diverge_per_rank(torch.initial_seed())
            for objective in self.extra_objectives:
                objective.setup(self.device)

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

        cls = type(self)
        # A subclass inherits registry_name; only a registered class may claim its name.
        registered = MODELS.get(self.registry_name) is cls
        checkpoint[CHECKPOINT_KEY] = {
            "model": self.registry_name if registered else "",
            "class_path": f"{cls.__module__}.{cls.__qualname__}",
            "version": __version__,
        }
        for objective in self.extra_objectives:  # e.g. which teacher file a student learnt from
            checkpoint[CHECKPOINT_KEY].update(objective.checkpoint_metadata())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for objective in self.extra_objectives:
            objective.load_checkpoint_metadata(checkpoint.get(CHECKPOINT_KEY, {}))


def _nest_release_0_1_keys(module: torch.nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load a release-0.1 state dict, whose network parts sat on the model itself (``unet.*``),
    into today's layout (``network.unet.*``): a load_state_dict pre-hook of the task."""
    network = getattr(module, "network", None)
    if network is None:
        return
    parts = {name for name, _ in network.named_children()}
    for key in [k for k in state_dict if k.startswith(prefix)]:
        first = key[len(prefix):].split(".", 1)[0]
        if first in parts:
            state_dict[f"{prefix}network.{key[len(prefix):]}"] = state_dict.pop(key)

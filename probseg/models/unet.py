"""Deterministic U-Net baseline, optionally with MC-dropout hypotheses.

Ronneberger et al. 2015, "U-Net: Convolutional Networks for Biomedical Image Segmentation";
MC dropout: Gal & Ghahramani 2016, Kendall et al. 2017 (Bayesian SegNet), the usual sampling
baseline next to latent-variable models.

The zoo's U-Net generator followed by a 1x1 convolution to K logits, trained with the same
reconstruction losses and rater fusion as the latent models. Without dropout, ``sample`` returns S
identical predictions; with ``dropout > 0`` each hypothesis draws its own channel-dropout masks
(dropout is then active at training and sampling time, off for the validation loss). It is the
usual teacher of knowledge distillation (:mod:`probseg.distillation`,
``experiments/synthetic/unet_teacher.yaml``) and the deterministic reference row of result tables.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from probseg.layers import UNet, channel_dropout_masks, check_image
from probseg.layers.gaussian import Generators
from probseg.models.base import ProbSegModel
from probseg.models.registry import register_model

DROPOUT_POSITIONS = ("head", "decoder")


@register_model("unet")
class UNetBaseline(ProbSegModel):
    """U-Net with a 1x1 head (registry name ``"unet"``).

    Args:
        in_channels: image channels C.
        num_classes: K (binary = 2).
        num_filters: channels per level (the zoo's PU-Net generator: [32, 64, 128, 192]).
        convs_per_block: 3x3 convolutions per level.
        dropout: channel-dropout probability of MC dropout (0: deterministic).
        dropout_position: "head" (the last feature map only: the U-Net runs once per image and
            the S hypotheses cost one 1x1 convolution each) or "decoder" (also the input of every
            up block: the decoder runs once per hypothesis, on a batch of B * S).
        fusion, label_smoothing, reconstruction, loss_options, teacher, distillation, lr,
            weight_decay, num_predict_samples: see :class:`ProbSegModel`.

    Loss terms: ``rec_<component>`` (and ``kd_<component>`` when distilling).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        num_filters: list[int] = [32, 64, 128, 192],  # noqa: B006 (plain list for YAML and hparams)
        convs_per_block: int = 3,
        dropout: float = 0.0,
        dropout_position: str = "head",
        fusion: str = "random",
        label_smoothing: float = 0.1,
        reconstruction: dict[str, float] | None = None,
        loss_options: dict[str, Any] | None = None,
        lr: float = 1e-4,
        weight_decay: float = 5e-5,
        num_predict_samples: int = 16,
        teacher: str | None = None,
        distillation: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(in_channels, num_classes, lr, weight_decay, num_predict_samples, fusion=fusion,
                         label_smoothing=label_smoothing, reconstruction=reconstruction, loss_options=loss_options,
                         teacher=teacher, distillation=distillation)
        self.save_hyperparameters()
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if dropout_position not in DROPOUT_POSITIONS:
            raise ValueError(f"dropout_position must be one of {DROPOUT_POSITIONS}, got {dropout_position!r}")
        self.dropout = float(dropout)
        self.dropout_position = dropout_position
        self.unet = UNet(in_channels, list(num_filters), convs_per_block)
        self.head = nn.Conv2d(self.unet.out_channels, num_classes, 1)

    @property
    def deterministic(self) -> bool:
        return self.dropout == 0

    def logits(self, images: torch.Tensor, num_samples: int = 1, generator: Generators = None,
               dropout: bool = True) -> torch.Tensor:
        """(B, C, H, W) -> (B, S, K, H, W) logits; ``dropout=False`` (or rate 0) gives S identical maps."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if not dropout or self.dropout == 0:
            return self.head(self.unet(images)).unsqueeze(1).expand(-1, num_samples, -1, -1, -1)
        b = images.shape[0]
        if self.dropout_position == "decoder":
            check_image(images, self.in_channels, self.unet.downsampling)
            skips = [s.repeat_interleave(num_samples, dim=0) for s in self.unet.down(images)]

            def drop(x: torch.Tensor) -> torch.Tensor:
                masks = channel_dropout_masks(b, num_samples, x.shape[1], self.dropout, generator, x.device, x.dtype)
                return x * masks.flatten(0, 1)[:, :, None, None]

            features = drop(self.unet.decode(skips, drop)).unflatten(0, (b, num_samples))  # (B, S, F, H, W)
            return self.head(features.flatten(0, 1)).unflatten(0, (b, num_samples))
        features = self.unet(images)  # (B, F, H, W), once per image
        masks = channel_dropout_masks(b, num_samples, features.shape[1], self.dropout, generator,
                                      features.device, features.dtype)
        # The head is linear: head(f * m_s) = (W * m_s) f + b, so each hypothesis is one small matmul.
        weight = self.head.weight[:, :, 0, 0].to(features.dtype)  # (K, F)
        logits = torch.einsum("bsf,kf,bfhw->bskhw", masks, weight, features)
        return logits + self.head.bias.to(features.dtype)[None, None, :, None, None]

    def loss_terms(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        target = self.training_target(batch, generator)
        images = batch["image"]
        logits = self.logits(images, 1, generator, dropout=self.training)[:, 0]
        # The distillation terms reuse this forward pass instead of running the network again,
        # when it is the predictive: deterministic, or one MC-dropout draw asked for.
        if self.deterministic or (self.distiller is not None and self.distiller.student_samples == 1):
            self.remember_predictive(images, logits.float().log_softmax(dim=1))
        return self.reconstruction_terms(logits, target)

    def sample(self, images: torch.Tensor, num_samples: int = 16, generator: Generators = None) -> torch.Tensor:
        return self.logits(images, num_samples, generator, dropout=True)

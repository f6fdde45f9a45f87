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

from probseg.layers import build_generator, channel_dropout_masks, check_image
from probseg.layers.generators import without_weights_file
from probseg.layers.gaussian import Generators
from probseg.models.base import ProbSegModel
from probseg.models.network import Network, NetworkOutput
from probseg.models.registry import register_model

DROPOUT_POSITIONS = ("head", "decoder")


class UNetNetwork(Network):
    """The zoo's U-Net generator and a 1x1 head, with optional MC-dropout hypotheses.

    Args:
        in_channels, num_classes, num_filters, convs_per_block, dropout, dropout_position: as in
            :class:`UNetBaseline`.
        generator, generator_options: the encoder-decoder, see
            :func:`~probseg.layers.generators.build_generator`.

    Forward outputs: ``logits`` (B, K, H, W), with one dropout draw in training mode and none in
    evaluation mode.
    """

    def __init__(self, in_channels: int, num_classes: int, num_filters: list[int], convs_per_block: int,
                 dropout: float = 0.0, dropout_position: str = "head", generator: str = "unet",
                 generator_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if dropout_position not in DROPOUT_POSITIONS:
            raise ValueError(f"dropout_position must be one of {DROPOUT_POSITIONS}, got {dropout_position!r}")
        self.in_channels = in_channels
        self.dropout = float(dropout)
        self.dropout_position = dropout_position
        self.unet = build_generator(in_channels, num_filters, convs_per_block, generator, generator_options)
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

    def forward(self, batch: dict[str, Any], target: torch.Tensor,
                generator: torch.Generator | None = None) -> NetworkOutput:
        return {"logits": self.logits(batch["image"], 1, generator, dropout=self.training)[:, 0]}

    def sample(self, images: torch.Tensor, num_samples: int = 16, generator: Generators = None) -> torch.Tensor:
        return self.logits(images, num_samples, generator, dropout=True)

    def predictive_log_probabilities(self, images: torch.Tensor, num_samples: int = 16, generator: Generators = None,
                                     outputs: NetworkOutput | None = None) -> torch.Tensor:
        """As :meth:`Network.predictive_log_probabilities`; this step's training pass is reused
        when it is the predictive: a deterministic network, or one MC-dropout draw asked for."""
        if outputs is not None and (self.deterministic or num_samples == 1):
            return outputs["logits"].float().log_softmax(dim=1)
        return super().predictive_log_probabilities(images, num_samples, generator)


@register_model("unet")
class UNetBaseline(ProbSegModel):
    """U-Net with a 1x1 head (registry name ``"unet"``).

    Args:
        num_filters: channels per level (the zoo's PU-Net generator: [32, 64, 128, 192]).
        convs_per_block: 3x3 convolutions per level.
        dropout: channel-dropout probability of MC dropout (0: deterministic).
        dropout_position: "head" (the last feature map only: the U-Net runs once per image and
            the S hypotheses cost one 1x1 convolution each) or "decoder" (also the input of every
            up block: the decoder runs once per hypothesis, on a batch of B * S).
        generator, generator_options: the encoder-decoder: ``"unet"`` (the zoo's, sized by
            ``num_filters`` and ``convs_per_block``) or ``"smp"`` with options such as
            ``{"encoder_name": "resnet18"}`` (:mod:`probseg.layers.generators`).
        **kwargs: the shared options of :class:`~probseg.models.base.ProbSegModel` (``in_channels``,
            ``num_classes``, ``fusion``, ``reconstruction``, ``lr``, ``teacher``, ...).

    Loss terms: ``rec_<component>`` (and ``kd_<component>`` when distilling).
    """

    def __init__(
        self,
        *,
        num_filters: list[int] = [32, 64, 128, 192],  # noqa: B006 (plain list for YAML and hparams)
        convs_per_block: int = 3,
        dropout: float = 0.0,
        dropout_position: str = "head",
        generator: str = "unet",
        generator_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.network = UNetNetwork(self.in_channels, self.num_classes, num_filters, convs_per_block, dropout,
                                   dropout_position, generator, generator_options)
        self.hparams["generator_options"] = without_weights_file(generator_options)

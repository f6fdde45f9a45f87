"""Plain ``nn.Module`` building blocks (no Lightning): U-Net and other generators, Gaussian encoders,
combiner, flows, dropout."""

from probseg.layers.blocks import DownPath, conv_block
from probseg.layers.combiner import Combiner
from probseg.layers.dropout import channel_dropout_masks
from probseg.layers.flows import AmortizedPlanarFlow, planar_step
from probseg.layers.gaussian import GaussianEncoder, PosteriorEncoder, PriorEncoder
from probseg.layers.generators import GENERATORS, build_generator
from probseg.layers.unet import UNet, check_image

__all__ = [
    "AmortizedPlanarFlow",
    "Combiner",
    "DownPath",
    "GENERATORS",
    "GaussianEncoder",
    "PosteriorEncoder",
    "PriorEncoder",
    "UNet",
    "build_generator",
    "channel_dropout_masks",
    "check_image",
    "conv_block",
    "planar_step",
]

"""Plain ``nn.Module`` building blocks (no Lightning): U-Net, Gaussian encoders, combiner."""

from probseg.layers.blocks import DownPath, conv_block
from probseg.layers.combiner import Combiner
from probseg.layers.gaussian import GaussianEncoder, PosteriorEncoder, PriorEncoder
from probseg.layers.unet import UNet, check_image

__all__ = [
    "Combiner",
    "DownPath",
    "GaussianEncoder",
    "PosteriorEncoder",
    "PriorEncoder",
    "UNet",
    "check_image",
    "conv_block",
]

"""The zoo: :data:`MODELS` maps registry names to LightningModule classes."""

import probseg.distillation  # noqa: F401  (registers the optional objective "distillation")
from probseg.models.base import ProbSegModel
from probseg.models.csae import ConditionalSinkhornAutoencoder
from probseg.models.planar import PlanarProbUNet
from probseg.models.punet import ProbUNet
from probseg.models.registry import MODELS, class_path, get_model_class, register_model
from probseg.models.unet import UNetBaseline

__all__ = [
    "MODELS",
    "ConditionalSinkhornAutoencoder",
    "PlanarProbUNet",
    "ProbSegModel",
    "ProbUNet",
    "UNetBaseline",
    "class_path",
    "get_model_class",
    "register_model",
]

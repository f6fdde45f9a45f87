"""The zoo: :data:`MODELS` maps registry names to LightningModule classes."""

from probseg.models.base import ProbSegModel
from probseg.models.csae import ConditionalSinkhornAutoencoder
from probseg.models.planar import PlanarProbUNet
from probseg.models.hpunet import HierarchicalProbUNet
from probseg.models.mose import MixtureOfStochasticExperts
from probseg.models.phiseg import PHiSeg
from probseg.models.punet import ProbUNet
from probseg.models.registry import MODELS, class_path, get_model_class, register_model
from probseg.models.ssn import StochasticSegmentationNetwork
from probseg.models.unet import UNetBaseline

__all__ = [
    "MODELS",
    "ConditionalSinkhornAutoencoder",
    "HierarchicalProbUNet",
    "MixtureOfStochasticExperts",
    "PHiSeg",
    "PlanarProbUNet",
    "ProbSegModel",
    "ProbUNet",
    "StochasticSegmentationNetwork",
    "UNetBaseline",
    "class_path",
    "get_model_class",
    "register_model",
]

# Last, once the zoo is bound: registers the optional objective "distillation" (it imports
# probseg.models.objectives, below the models).
import probseg.distillation  # noqa: F401

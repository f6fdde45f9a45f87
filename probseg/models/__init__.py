"""The zoo: :data:`MODELS` maps registry names to LightningModule classes."""

from probseg.models.base import ProbSegModel
from probseg.models.punet import ProbUNet
from probseg.models.registry import MODELS, class_path, get_model_class, register_model

__all__ = ["MODELS", "ProbSegModel", "ProbUNet", "class_path", "get_model_class", "register_model"]

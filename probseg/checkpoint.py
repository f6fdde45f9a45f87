"""Loading zoo checkpoints safely and as their concrete model class.

Lightning's ``ProbSegModel.load_from_checkpoint`` would build the base class, not the model that
was trained; :func:`load_model` reads the model name the checkpoint carries and builds that class.
Checkpoints are read with ``torch.load(weights_only=True)``: a file holding pickled objects that
could run code is refused instead of executed.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from probseg.models.base import CHECKPOINT_KEY, ProbSegModel
from probseg.models.registry import MODELS, get_model_class


class CheckpointError(ValueError):
    """A file is not a loadable probseg checkpoint."""


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint dict with ``weights_only=True`` and check it is a probseg checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} was refused: it holds objects that torch.load(weights_only=True) will not "
            f"unpickle, so loading it could run code. Original error: {str(err).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    if CHECKPOINT_KEY not in checkpoint:
        raise CheckpointError(
            f"{path} is not a probseg checkpoint (no '{CHECKPOINT_KEY}' metadata); it was not written "
            "by a probseg model"
        )
    return checkpoint


def load_model(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", strict: bool = True
) -> ProbSegModel:
    """Load any zoo checkpoint as its concrete model class, in eval mode.

    Args:
        path: a ``.ckpt`` written by training a probseg model.
        map_location: device to load the tensors onto.
        strict: require the state dict to match the model exactly.

    Returns:
        The model (e.g. :class:`probseg.models.ProbUNet`), in eval mode.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is not a probseg checkpoint or cannot be loaded safely.
        KeyError: the checkpoint names a model that is not registered.
    """
    checkpoint = read_checkpoint(path, map_location)
    meta = checkpoint[CHECKPOINT_KEY]
    name = meta.get("model", "")
    if name not in MODELS:
        known = ", ".join(sorted(MODELS)) or "none"
        raise KeyError(f"{path} holds a model named {name!r}, which is not registered; registered models: {known}")
    cls = get_model_class(name)
    hparams = {k: v for k, v in dict(checkpoint.get("hyper_parameters", {})).items() if not k.startswith("_")}
    try:
        model = cls(**hparams)
    except TypeError as err:
        raise CheckpointError(f"{path}: the saved hyperparameters do not fit {cls.__qualname__}: {err}") from None
    model.load_state_dict(checkpoint["state_dict"], strict=strict)
    return model.eval()

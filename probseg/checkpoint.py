"""Loading zoo checkpoints safely and as their concrete model class.

Lightning's ``ProbSegModel.load_from_checkpoint`` would build the base class, not the model that
was trained; :func:`load_model` reads the model name the checkpoint carries and builds that class.
Checkpoints are read with ``torch.load(weights_only=True)``: a file holding pickled objects that
could run code is refused instead of executed.
"""

from __future__ import annotations

import inspect
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from probseg.models.base import ProbSegModel

CHECKPOINT_KEY = "probseg"
"""Key of the metadata dict a zoo checkpoint carries (model name, class path, version)."""


class CheckpointError(ValueError):
    """A file is not a loadable probseg checkpoint."""


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint dict onto the CPU with ``weights_only=True`` and check it is a probseg
    checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch's safe unpickler raises many types on foreign files
        message = str(err)
        if isinstance(err, pickle.UnpicklingError) and "GLOBAL" in message:
            refused = next((line.strip() for line in message.splitlines() if "GLOBAL" in line), message)
            raise CheckpointError(
                f"{path} was refused: it holds pickled objects that torch.load(weights_only=True) "
                f"will not load, because loading them could run code ({refused})"
            ) from None
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint ({type(err).__name__}: {message.splitlines()[0] if message else ''})"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    if not isinstance(checkpoint.get(CHECKPOINT_KEY), dict):
        raise CheckpointError(
            f"{path} is not a probseg checkpoint (no '{CHECKPOINT_KEY}' metadata); it was not written "
            "by a probseg model"
        )
    return checkpoint


def load_model(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    strict: bool = True,
    model_class: type[ProbSegModel] | None = None,
) -> ProbSegModel:
    """Load any zoo checkpoint as its concrete model class, in eval mode.

    Args:
        path: a ``.ckpt`` written by training a probseg model.
        map_location: device the returned model lives on (the file is always read onto the CPU).
        strict: require the state dict to match the model exactly.
        model_class: build this class instead of the registered one the checkpoint names; for
            checkpoints of your own, unregistered subclasses.

    Returns:
        The model (e.g. :class:`probseg.models.ProbUNet`), in eval mode.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is not a probseg checkpoint or cannot be loaded safely.
        KeyError: the checkpoint names a model that is not registered.
    """
    from probseg.models.registry import (  # the zoo: imported when a model is built
        MODELS,
        get_model_class,
    )

    device = torch.device(map_location)  # a bad device string fails here, before any reading
    checkpoint = read_checkpoint(path)
    meta = checkpoint[CHECKPOINT_KEY]
    name = meta.get("model", "")
    if model_class is not None:
        cls = model_class
    elif name in MODELS:
        cls = get_model_class(name)
    else:
        known = ", ".join(sorted(MODELS)) or "none"
        what = f"a model named {name!r}" if name else f"an unregistered model class {meta.get('class_path')!r}"
        raise KeyError(
            f"{path} holds {what}; registered models: {known}. Register the class with "
            "@register_model or pass model_class= to load_model"
        )
    hparams = {k: v for k, v in dict(checkpoint.get("hyper_parameters", {})).items() if not k.startswith("_")}
    # Options added after a checkpoint was written default to what it was trained with.
    accepted = inspect.signature(cls).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in accepted.values())  # forwards the rest up the chain
    legacy = {k: v for k, v in getattr(cls, "LEGACY_DEFAULTS", {}).items() if takes_any or k in accepted}
    hparams = {**legacy, **hparams}
    try:
        model = cls(**hparams)
    except TypeError as err:
        raise CheckpointError(f"{path}: the saved hyperparameters do not fit {cls.__qualname__}: {err}") from None
    try:
        model.load_state_dict(checkpoint["state_dict"], strict=strict)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: the weights do not fit {cls.__qualname__}: {err}") from None
    model.on_load_checkpoint(checkpoint)  # as Lightning's load_from_checkpoint does
    return model.to(device).eval()

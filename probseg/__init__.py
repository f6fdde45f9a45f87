"""probseg: a model zoo for probabilistic image segmentation.

Public API: :func:`probseg.load_model`, ``model.sample(images, num_samples)``, the registry
:data:`probseg.models.MODELS`, the data modules in :mod:`probseg.data` and the losses in
:mod:`probseg.losses`. Submodules import lazily so that ``probseg --help`` stays quick.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0.dev0"

_LAZY = {
    "load_model": ("probseg.checkpoint", "load_model"),
    "CheckpointError": ("probseg.checkpoint", "CheckpointError"),
    "MODELS": ("probseg.models", "MODELS"),
}
_SUBMODULES = {"callbacks", "checkpoint", "data", "io", "layers", "losses", "models", "sampling", "viz"}

__all__ = ["__version__", *_LAZY, *sorted(_SUBMODULES)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name in _SUBMODULES:
        return importlib.import_module(f"probseg.{name}")
    raise AttributeError(f"module 'probseg' has no attribute {name!r}")

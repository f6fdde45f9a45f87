"""Registry of zoo models: a short name ("punet") -> LightningModule class."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from probseg.models.base import ProbSegModel

MODELS: dict[str, type[ProbSegModel]] = {}


def register_model(name: str) -> Callable[[type[ProbSegModel]], type[ProbSegModel]]:
    """Class decorator adding a model to :data:`MODELS` under ``name``."""

    def add(cls: type[ProbSegModel]) -> type[ProbSegModel]:
        if name in MODELS and MODELS[name] is not cls:
            raise ValueError(f"model name {name!r} is already registered to {MODELS[name].__qualname__}")
        cls.registry_name = name
        MODELS[name] = cls
        return cls

    return add


def get_model_class(name: str) -> type[ProbSegModel]:
    """The model class registered as ``name``, with a clear error listing the known names."""
    try:
        return MODELS[name]
    except KeyError:
        known = ", ".join(sorted(MODELS)) or "none"
        raise KeyError(f"unknown model name {name!r}; registered models: {known}") from None


def class_path(cls: type) -> str:
    """Import path of a class, as used in YAML ``class_path`` entries."""
    return f"{cls.__module__}.{cls.__qualname__}"

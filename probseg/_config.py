"""Building optional components from YAML-friendly settings (``false`` / ``true`` / a mapping)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Collection, TypeVar

T = TypeVar("T")


def optional_component(
    config: bool | Mapping[str, Any] | T | None,
    cls: type[T],
    what: str,
    options: Collection[str],
    convert: Callable[[Any], Any] | None = None,
) -> T | None:
    """None or False -> None (off); True -> ``cls()`` (defaults); an instance of ``cls`` -> itself;
    a mapping -> ``cls(**mapping)`` after checking its keys.

    Args:
        config: the setting.
        cls: the component class.
        what: its name in error messages, e.g. "augmentation".
        options: the keys a mapping may hold.
        convert: applied to every mapping value first (e.g. YAML lists -> tuples).

    Raises:
        TypeError: ``config`` is of another type.
        ValueError: a key that is not one of ``options`` (named, with the allowed keys).
    """
    if config is None or config is False:
        return None
    if config is True:
        return cls()
    if isinstance(config, cls):
        return config
    if not isinstance(config, Mapping):
        raise TypeError(f"{what} config must be None, a bool or a dict, got {type(config).__name__}: {config!r}")
    unknown = sorted(set(config) - set(options))
    if unknown:
        raise ValueError(f"unknown {what} option {unknown[0]!r}; allowed: {sorted(options)}")
    return cls(**{k: convert(v) if convert else v for k, v in config.items()})

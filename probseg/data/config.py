"""Build a data module from the ``data:`` section of an experiment YAML, without a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def datamodule_from_config(path: str) -> Any:
    """The data module of ``path``'s ``data`` section (class path and init args, as in
    ``probseg fit --config``). Errors name the file."""
    import yaml
    from jsonargparse import ArgumentParser

    import probseg.data  # noqa: F401  (registers the data modules for short class names)
    from probseg.data.base import ProbSegDataModule

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"data config not found: {path}")
    try:
        config = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(config, dict) or "data" not in config:
        raise ValueError(f"{path}: no 'data' section to build a data module from")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(ProbSegDataModule, "data")
    # jsonargparse renamed instantiate_classes to instantiate in 4.49.
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    try:
        return instantiate(parser.parse_object({"data": config["data"]})).data
    except Exception as err:
        raise ValueError(f"{path}: invalid 'data' section: {err}") from None

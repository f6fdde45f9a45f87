"""The probseg LightningCLI: zoo models and data modules in subclass mode, default loggers and
callbacks, a deterministic default seed, registry names ("punet") wherever a model is named.

Registry names are resolved while jsonargparse reads each config document (the YAML loader of
:data:`PARSER_MODE`), so users' files are read as they are: never copied or rewritten.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import jsonargparse
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import probseg.data  # noqa: F401  (registers data modules for short class names)
import probseg.models  # noqa: F401  (registers zoo models for short class names)
from probseg.callbacks import (
    EvaluationCallback,
    FitSummary,
    GiniCallback,
    HypothesisWriter,
    RunCheckpoint,
)
from probseg.data.base import ProbSegDataModule
from probseg.models.base import ProbSegModel

WANDB_MODES = ("offline", "online", "disabled")
PARSER_MODE = "probseg_yaml"
"""jsonargparse parser mode: YAML, with registry names of models resolved (:func:`load_config`)."""


def model_name_typo(name: str) -> str | None:
    """A message when ``name`` is a bare word close to a registry or zoo class name but neither
    (a typo), naming the close ones; None otherwise (import paths, files and other class names are
    left to jsonargparse)."""
    import difflib
    from pathlib import Path

    from probseg.models import MODELS

    names = list(MODELS) + [cls.__name__ for cls in MODELS.values()]
    if not name.isidentifier() or name in names or Path(name).exists():
        return None
    close = difflib.get_close_matches(name, names, n=3)
    if not close:
        return None
    return (f"unknown model {name!r}; registered models: {', '.join(sorted(MODELS))}. "
            f"Did you mean {' or '.join(repr(c) for c in close)}?")


class ModelNameError(yaml.YAMLError):
    """A config names a model by a typo of a registry name (a YAML error to jsonargparse, which
    then reports it with the file)."""


def _resolve_class_path(name: Any, check_typo: bool) -> Any:
    from probseg.models import MODELS, class_path

    if not isinstance(name, str):
        return name
    if name in MODELS:
        return class_path(MODELS[name])
    typo = model_name_typo(name) if check_typo else None
    if typo:
        raise ModelNameError(typo)
    return name


def resolve_model_names(value: Any, top_level: bool = True) -> Any:
    """``value`` (a loaded config document) with every ``class_path`` that is a registry name
    replaced by its class path, and a top-level ``model: <name>`` by ``{"class_path": ...}``.

    Typos are looked for only where a model is named: the top-level ``model`` entry, and the
    ``class_path`` of a document that is itself a class (a model file given to ``--model`` or
    ``model: file.yaml``); nested class paths (callbacks, optimizers) resolve exact names only.

    Raises:
        ModelNameError: a model name is a typo of a registry name.
    """
    if isinstance(value, dict):
        resolved = {k: resolve_model_names(v, top_level=False) for k, v in value.items()}
        if "class_path" in resolved:
            resolved["class_path"] = _resolve_class_path(resolved["class_path"], check_typo=top_level)
        model = resolved.get("model")
        if top_level and isinstance(model, dict) and "class_path" in model:
            model["class_path"] = _resolve_class_path(model["class_path"], check_typo=True)
        if top_level and isinstance(model, str) and not model.endswith((".yaml", ".yml")):
            name = _resolve_class_path(model, check_typo=True)
            resolved["model"] = {"class_path": name} if name != model else model
        return resolved
    if isinstance(value, list):
        return [resolve_model_names(v, top_level=False) for v in value]
    return value


def load_config(text: str) -> Any:
    """jsonargparse's YAML loader, then :func:`resolve_model_names`."""
    return resolve_model_names(jsonargparse.get_loader("yaml")(text))


jsonargparse.set_loader(PARSER_MODE, load_config, exceptions=(yaml.YAMLError,))


def default_loggers(root: str, wandb_mode: str) -> list[Any]:
    """CSV logs under ``{root}/logs`` and, unless disabled, W&B under ``{root}/wandb``."""
    from lightning.pytorch.loggers import CSVLogger

    loggers: list[Any] = [CSVLogger(save_dir=root, name="logs")]
    if wandb_mode != "disabled":
        from lightning.pytorch.loggers import WandbLogger

        os.makedirs(root, exist_ok=True)
        loggers.append(WandbLogger(save_dir=root, project="probseg", offline=wandb_mode == "offline"))
    return loggers


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be read (a torch zip archive with intact CRCs), or None."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        return f"{type(err).__name__}: {err}"
    return f"damaged member {bad}" if bad else None


def readable_last_checkpoint(trainer: Trainer) -> str | None:
    """What ``--ckpt_path last`` resumes from: ``last.ckpt`` of the run's checkpoint folder when it
    reads; an unreadable one is renamed aside (``last.ckpt.unreadable``) with a warning naming it,
    and the newest readable checkpoint of the folder is used instead (none: a fresh start). "last"
    itself when the folder holds no last.ckpt (Lightning's own rules apply)."""
    folders = [Path(c.dirpath) for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
    for folder in folders:
        last = folder / "last.ckpt"
        if not last.is_file():
            continue
        problem = checkpoint_problem(last)
        if problem is None:
            return "last"
        aside = last.with_name("last.ckpt.unreadable")
        os.replace(last, aside)
        others = sorted((p for p in folder.glob("*.ckpt") if checkpoint_problem(p) is None),
                        key=lambda p: p.stat().st_mtime, reverse=True)
        fallback = str(others[0]) if others else None
        warnings.warn(f"{last} is unreadable ({problem}); kept as {aside.name}. Resuming from "
                      f"{fallback or 'scratch (no other readable checkpoint in the folder)'}", stacklevel=2)
        return fallback
    return "last"


class ProbSegCLI(LightningCLI):
    """``probseg fit|validate|test|predict``; see :mod:`probseg.cli` for the defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("trainer_defaults", {"default_root_dir": "runs"})
        parser_kwargs = kwargs.setdefault("parser_kwargs", {})
        for key in ("", *self.subcommands()):  # the main parser and each subcommand's
            (parser_kwargs.setdefault(key, {}) if key else parser_kwargs).setdefault("parser_mode", PARSER_MODE)
        super().__init__(ProbSegModel, ProbSegDataModule, *args, subclass_mode_model=True, subclass_mode_data=True, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--wandb",
            type=str,
            default="offline",
            choices=WANDB_MODES,
            help="W&B mode of the default loggers: offline (default, no login), online or disabled",
        )

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if subcommand == "fit" and kwargs.get("ckpt_path") == "last":
            kwargs["ckpt_path"] = readable_last_checkpoint(self.trainer)
        return kwargs

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self._get(self.config_init, "trainer", default={})
        root = config.get("default_root_dir") or os.getcwd()
        if config.get("logger") in (None, True):
            kwargs.setdefault("logger", default_loggers(root, self._get(self.config, "wandb", "offline")))
        callbacks = list(config.get("callbacks") or [])
        for callback in callbacks:
            # dirpath now, not at setup: `--ckpt_path last` is resolved before callbacks are set up.
            if isinstance(callback, RunCheckpoint) and callback.dirpath is None:
                callback.dirpath = os.path.realpath(os.path.join(root, "checkpoints"))
        if config.get("enable_checkpointing") is not False and not any(
            isinstance(c, ModelCheckpoint) for c in callbacks
        ):
            callbacks.append(RunCheckpoint(dirpath=os.path.join(root, "checkpoints")))
        # Evaluation metrics and the Gini curve are part of every run unless configured otherwise.
        for default in (EvaluationCallback, GiniCallback, FitSummary):
            if not any(isinstance(c, default) for c in callbacks):
                callbacks.append(default())
        if not any(isinstance(c, BasePredictionWriter) for c in callbacks):
            callbacks.append(HypothesisWriter())
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)

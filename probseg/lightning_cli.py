"""The probseg LightningCLI: zoo models and data modules in subclass mode, default loggers and
callbacks, a deterministic default seed."""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import probseg.data  # noqa: F401  (registers data modules for short class names)
import probseg.models  # noqa: F401  (registers zoo models for short class names)
from probseg.callbacks import EvaluationCallback, FitSummary, GiniCallback, HypothesisWriter, RunCheckpoint
from probseg.data.base import ProbSegDataModule
from probseg.models.base import ProbSegModel

WANDB_MODES = ("offline", "online", "disabled")


def default_loggers(root: str, wandb_mode: str) -> list[Any]:
    """CSV logs under ``{root}/logs`` and, unless disabled, W&B under ``{root}/wandb``."""
    from lightning.pytorch.loggers import CSVLogger

    loggers: list[Any] = [CSVLogger(save_dir=root, name="logs")]
    if wandb_mode != "disabled":
        from lightning.pytorch.loggers import WandbLogger

        os.makedirs(root, exist_ok=True)
        loggers.append(WandbLogger(save_dir=root, project="probseg", offline=wandb_mode == "offline"))
    return loggers


class ProbSegCLI(LightningCLI):
    """``probseg fit|validate|test|predict``; see :mod:`probseg.cli` for the defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("trainer_defaults", {"default_root_dir": "runs"})
        super().__init__(ProbSegModel, ProbSegDataModule, *args, subclass_mode_model=True, subclass_mode_data=True, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--wandb",
            type=str,
            default="offline",
            choices=WANDB_MODES,
            help="W&B mode of the default loggers: offline (default, no login), online or disabled",
        )

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

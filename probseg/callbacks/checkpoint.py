"""Checkpointing with a predictable place: ``{trainer.default_root_dir}/checkpoints``."""

from __future__ import annotations

import os

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also keeps ``last.ckpt`` and, without an explicit ``dirpath``, writes to
    ``{default_root_dir}/checkpoints`` instead of a logger-dependent folder. A later run in the
    same folder overwrites ``last.ckpt`` (no ``-v1`` copies).

    Args:
        monitor: metric selecting the best checkpoint (default "val/loss").
        save_last: keep ``last.ckpt`` (default True).
        (other arguments as in Lightning's ModelCheckpoint)
    """

    def __init__(self, *args, monitor: str | None = "val/loss", save_last: bool | None = True, **kwargs) -> None:
        kwargs.setdefault("filename", "epoch{epoch:03d}-step{step:06d}")
        # A new run in the same folder replaces last.ckpt instead of writing last-v1.ckpt beside
        # an out-of-date last.ckpt.
        kwargs.setdefault("enable_version_counter", False)
        kwargs.setdefault("auto_insert_metric_name", False)
        super().__init__(*args, monitor=monitor, save_last=save_last, **kwargs)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        super().setup(trainer, pl_module, stage)

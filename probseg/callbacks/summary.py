"""End-of-fit summary: writes the loss-curve figure and prints where every output is."""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only


def csv_metrics_file(trainer: pl.Trainer) -> Path | None:
    """The metrics.csv of the trainer's CSVLogger, flushed to disk, or None without one."""
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            logger.save()
            path = Path(logger.experiment.metrics_file_path)
            return path if path.is_file() else None
    return None


class FitSummary(Callback):
    """After ``fit``: plot the loss curves next to metrics.csv and print the run's outputs.

    Args:
        plot: write ``loss_curves.png`` (needs matplotlib; skipped with a note otherwise).
    """

    def __init__(self, plot: bool = True) -> None:
        self.plot = plot

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        lines = []
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint):
                if cb.last_model_path:
                    lines.append(("last checkpoint", cb.last_model_path))
                if cb.best_model_path:
                    lines.append(("best checkpoint", cb.best_model_path))
        metrics = csv_metrics_file(trainer)
        if metrics is not None:
            lines.append(("metrics (CSV)", str(metrics)))
            if self.plot:
                try:
                    from probseg.viz import plot_loss_curves

                    lines.append(("loss curves", str(plot_loss_curves(metrics, metrics.parent / "loss_curves.png"))))
                except (ImportError, ValueError) as err:
                    lines.append(("loss curves", f"not written ({err})"))
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger" and logger.save_dir:
                lines.append(("W&B run files", os.path.join(logger.save_dir, "wandb")))
        if lines:
            width = max(len(k) for k, _ in lines)
            print("\nprobseg fit outputs:")
            for key, value in lines:
                print(f"  {key:<{width}}  {value}")

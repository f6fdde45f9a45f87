"""Writes the hypotheses of ``probseg predict`` to disk, one ``.npz`` (and optional PNG grid) per image."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter


class HypothesisWriter(BasePredictionWriter):
    """Save each predicted image's hypotheses as ``<id>.npz`` (the format of ``probseg sample``).

    Args:
        output_dir: folder to write to (default ``{trainer.default_root_dir}/predictions``).
        plot: also write a PNG grid per image (slow for large test sets).
    """

    def __init__(self, output_dir: str | None = None, plot: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.plot = plot
        self.count = 0

    def folder(self, trainer: pl.Trainer) -> Path:
        return Path(self.output_dir or os.path.join(trainer.default_root_dir, "predictions"))

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        from probseg.io import write_outputs

        samples = prediction["samples"].detach().float().cpu()
        ids = prediction.get("id") or [f"batch{batch_idx:05d}-{i:03d}" for i in range(len(samples))]
        images = batch["image"].detach().float().cpu().numpy()
        masks = batch.get("masks")
        rater_mask = batch.get("rater_mask")
        for i, key in enumerate(ids):
            raters = None
            if masks is not None:
                raters = masks[i].cpu()
                if rater_mask is not None:
                    raters = raters[rater_mask[i].cpu()]
                raters = raters.numpy()
            write_outputs(self.folder(trainer), str(key), images[i], samples[i], raters, plot=self.plot)
            self.count += 1

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.count:
            print(f"\nprobseg predict: wrote hypotheses of {self.count} images to {self.folder(trainer)}")

"""Figures of hypotheses during training: image / raters / samples / mean / std, as PNG and W&B."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

from probseg.callbacks.evaluation import per_image_generators


class SampleGridCallback(Callback):
    """After every ``every_n_epochs``-th validation, draw hypotheses for the first ``num_images``
    images of ``split`` and save one grid per image (:func:`probseg.viz.plot_sample_grid`) as
    ``{output_dir}/epoch{E}_{id}.png``; logged to W&B as ``"{split}/samples"`` when a W&B logger
    is attached (with several validations per epoch, the epoch's last grids stay on disk). Needs
    matplotlib (``probseg[viz]``).

    Args:
        num_images: images shown.
        num_samples: hypotheses per image.
        every_n_epochs: interval in epochs.
        split: data split the images come from.
        seed: seed of the hypotheses (the same images and noise every epoch, so grids compare).
        output_dir: PNG folder (default ``{default_root_dir}/sample_grids``).
    """

    def __init__(self, num_images: int = 4, num_samples: int = 8, every_n_epochs: int = 1, split: str = "val",
                 seed: int = 0, output_dir: str | None = None) -> None:
        if num_images < 1 or num_samples < 1 or every_n_epochs < 1:
            raise ValueError("num_images, num_samples and every_n_epochs must be positive")
        self.num_images, self.num_samples, self.every_n_epochs = num_images, num_samples, every_n_epochs
        self.split, self.seed, self.output_dir = split, seed, output_dir
        self.written: list[Path] = []

    @rank_zero_only
    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "item"):
            return
        from probseg.io import foreground
        from probseg.viz import plot_sample_grid

        count = min(self.num_images, len(datamodule.dataset(self.split)))
        items = [datamodule.item(self.split, i) for i in range(count)]
        images = torch.stack([it["image"] for it in items]).to(pl_module.device)
        index = torch.tensor([it.get("index", i) for i, it in enumerate(items)])
        logits = pl_module.sample(images, self.num_samples, generator=per_image_generators(index, self.seed, images.device))
        probs = logits.float().softmax(dim=2).cpu().numpy()
        folder = Path(self.output_dir or os.path.join(trainer.default_root_dir, "sample_grids"))
        paths = []
        for item, p in zip(items, probs):
            key = str(item.get("id", len(paths)))
            raters = item["masks"].numpy()
            if "rater_mask" in item:
                raters = raters[item["rater_mask"].numpy()]
            path = folder / f"epoch{trainer.current_epoch:03d}_{key}.png"
            paths.append(plot_sample_grid(path, item["image"].numpy(), foreground(p), raters,
                                          title=f"{key}, epoch {trainer.current_epoch}"))
        self.written.extend(paths)
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_image(key=f"{self.split}/samples", images=[str(p) for p in paths],
                                 caption=[p.stem for p in paths], step=trainer.global_step)

"""Gini index of the prior's singular values over training (the cSAE paper's Figures 3-4)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

from probseg.metrics.functional import gini_index, singular_values


class GiniCallback(Callback):
    """Log ``train/gini``, the mean Gini index of the prior sigmas of the current training batch,
    every ``every_n_steps`` optimizer steps, straight to the loggers (so the curve does not depend
    on ``log_every_n_steps``). Models without a latent prior are skipped; hierarchical models
    (PHiSeg, HPU-Net) also log ``train/gini_level<l>``, each latent level's own (0: the finest),
    next to the whole model's.

    Args:
        every_n_steps: logging interval in optimizer steps.
        of: the Gini index of the prior's "sigma" (default) or "variance" (see
            :mod:`probseg.metrics.functional.gini`).
    """

    def __init__(self, every_n_steps: int = 25, of: str = "sigma") -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be positive, got {every_n_steps}")
        singular_values(torch.ones(1, 1), of)  # checks the name
        self.every_n_steps = every_n_steps
        self.of = of
        self.history: list[tuple[int, float]] = []

    @rank_zero_only
    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every_n_steps != 0 and step != 1:
            return
        if self.history and self.history[-1][0] == step:  # gradient accumulation: one value per step
            return
        network = getattr(pl_module, "network", None)
        per_level = network.prior_sigmas_per_level(batch["image"]) if network is not None else None
        # hierarchical models: one curve per level, and every level's sigmas together (one prior pass)
        sigma = torch.cat(list(per_level.values()), dim=1) if per_level else pl_module.prior_sigmas(batch["image"])
        if sigma is None:
            return
        value = float(gini_index(singular_values(sigma.float(), self.of)).mean())
        self.history.append((step, value))
        values = {"train/gini": value}
        for level, level_sigma in (per_level or {}).items():
            values[f"train/gini_{level}"] = float(gini_index(singular_values(level_sigma.float(), self.of)).mean())
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)

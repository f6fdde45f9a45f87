"""Opt-in fast paths: channels-last memory format and ``torch.compile`` of the generator.

Both cost start-up time or help only on some hardware, so they are off unless asked for in YAML::

    trainer:
      callbacks:
        - class_path: probseg.callbacks.FastPaths
          init_args: {channels_last: true, compile: true}

Mixed precision is Lightning's ``trainer.precision: bf16-mixed`` (GPU); the latent statistics,
the flows' log-determinants and the Sinkhorn divergence stay in float32 under it.
``benchmarks/throughput.py`` measures what each option buys on the machine at hand.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback


def to_channels_last(batch: Any) -> Any:
    """The batch with its (B, C, H, W) image in channels-last memory format (values unchanged)."""
    if isinstance(batch, dict) and isinstance(batch.get("image"), torch.Tensor) and batch["image"].ndim == 4:
        batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
    return batch


class FastPaths(Callback):
    """Apply the opt-in fast paths to the model before training or evaluation.

    Args:
        channels_last: convolution weights and input images in channels-last format (NHWC), which
            the tensor-core and oneDNN convolution kernels prefer.
        compile: ``torch.compile`` the U-Net generator in place (state-dict keys unchanged, so
            checkpoints stay interchangeable); the first steps pay the compile time.
    """

    def __init__(self, channels_last: bool = False, compile: bool = False) -> None:
        self.channels_last = channels_last
        self.compile = compile
        self._applied = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._applied:
            return
        if self.channels_last:
            pl_module.to(memory_format=torch.channels_last)
        if self.compile and hasattr(getattr(pl_module, "network", None), "unet"):
            pl_module.network.unet.compile()
        self._applied = True

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.channels_last:
            to_channels_last(batch)

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.channels_last:
            to_channels_last(batch)

    on_test_batch_start = on_validation_batch_start

"""Shared test settings: tiny networks, no display, W&B offline and quiet."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# Lightning 2.6 calls jsonargparse APIs deprecated in jsonargparse 4.49; not ours to fix.
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")

TINY_PUNET = {"num_filters": [4, 8, 8], "convs_per_block": 1, "latent_dim": 3, "fcomb_layers": 2}


@pytest.fixture
def tiny_punet_kwargs() -> dict:
    """Constructor arguments of a ProbUNet small enough for 32x32 CPU tests."""
    return dict(TINY_PUNET)

"""Build any zoo model from a filter list, as the benchmarks compare them."""

from __future__ import annotations

from typing import Any

from probseg.models import MODELS


def latent_levels_for(name: str, depth: int) -> dict[str, Any]:
    """The hierarchical models' latent levels for a network of ``depth`` resolution levels, in the
    papers' proportions (PHiSeg: all but the two finest, 5 of 7; HPU-Net: the coarser half, 4 of
    8); nothing for the other models."""
    if name == "phiseg":
        return {"latent_levels": max(1, depth - 2)}
    if name == "hpunet":
        return {"latent_levels": max(1, depth // 2)}
    return {}


def build(name: str, filters: list[int], convs: int, **kwargs: Any) -> Any:
    """``MODELS[name]`` with these U-Net filters and convolutions per block."""
    return MODELS[name](num_filters=filters, convs_per_block=convs, **latent_levels_for(name, len(filters)), **kwargs)

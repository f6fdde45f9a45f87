"""Losses: pure functions in :mod:`probseg.losses.functional`; the zoo's configurable
reconstruction term in :mod:`probseg.losses.reconstruction`."""

from probseg.losses.functional import (
    REGION_LOSSES,
    cftl,
    cross_entropy,
    ctl,
    dml1,
    dml2,
    jml1,
    jml2,
    mse,
    reduce_batch,
    region_loss,
    sdl,
    sjl,
    soft_cross_entropy,
    uniform_kl,
)
from probseg.losses.reconstruction import COMPONENTS, ReconstructionLoss

__all__ = [
    "COMPONENTS",
    "REGION_LOSSES",
    "ReconstructionLoss",
    "cftl",
    "cross_entropy",
    "ctl",
    "dml1",
    "dml2",
    "jml1",
    "jml2",
    "mse",
    "reduce_batch",
    "region_loss",
    "sdl",
    "sjl",
    "soft_cross_entropy",
    "uniform_kl",
]

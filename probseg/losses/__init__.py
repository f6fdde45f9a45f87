"""Losses: pure functions in :mod:`probseg.losses.functional`."""

from probseg.losses.functional import cross_entropy, reduce_batch

__all__ = ["cross_entropy", "reduce_batch"]

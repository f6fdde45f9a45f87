"""Per-process random streams under multi-process training.

Lightning's ``seed_everything`` gives every DDP rank the same seed, which is what model
initialization needs (identical weights) but not what training needs: ranks would draw the same
raters, latent noise and augmentations for their different images. After setup, ranks other
than 0 move to their own torch stream, derived from the base seed and the rank; rank 0 (and a
single process) keeps its stream, so single-process runs are unchanged. Checkpoints gather every
rank's generators (:func:`gather_from_ranks`), so a resumed DDP run continues each rank's own.
"""

from __future__ import annotations

from typing import Any

import torch


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without an initialized process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def rank_seed(base: int, rank: int) -> int:
    """The seed of ``rank``'s stream."""
    return (int(base) + 1_000_003 * int(rank)) % (1 << 63)


def diverge_per_rank(base: int) -> int:
    """Reseed torch's global RNG for this rank (ranks > 0 only); returns the rank."""
    rank, world = rank_and_world_size()
    if world > 1 and rank > 0:
        torch.manual_seed(rank_seed(base, rank))
    return rank


def gather_from_ranks(obj: Any) -> list[Any] | None:
    """Every rank's ``obj``, in rank order, on every rank; None in a single process.

    A collective: under DDP every rank must call it at the same point (checkpoint saves do, since
    Lightning builds the checkpoint on every rank), or the callers wait for each other forever.
    """
    world = rank_and_world_size()[1]
    if world == 1:
        return None
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, obj)
    return gathered

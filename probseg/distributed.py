"""Per-process random streams under multi-process training.

Lightning's ``seed_everything`` gives every DDP rank the same seed, which is what model
initialization needs (identical weights) but not what training needs: ranks would draw the same
raters, latent noise and augmentations for their different images. After setup, ranks other
than 0 move to their own torch stream, derived from the base seed and the rank; rank 0 (and a
single process) keeps its stream, so single-process runs are unchanged. Checkpoints gather every
rank's generators (:func:`gather_from_ranks`), so a resumed DDP run continues each rank's own
(:func:`select_rank_state`).
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


def is_fitting(trainer: Any) -> bool:
    """Whether ``trainer`` runs ``fit`` (Lightning's ``TrainerFn.FITTING``); False without a trainer
    or its state. A checkpoint loaded by ``validate``/``test``/``predict`` trains on nothing, so
    warnings about how a resumed run continues concern fitting only."""
    from lightning.pytorch.trainer.states import TrainerFn

    return getattr(getattr(trainer, "state", None), "fn", None) == TrainerFn.FITTING


def select_rank_state(per_rank: list[Any] | None, rank0_state: Any, what: str, warn: bool = True) -> tuple[Any, bool]:
    """The saved state this rank restores, from a checkpoint's per-rank list (``per_rank``, None
    when the checkpoint has none) and rank 0's state in the one-process format (``rank0_state``).

    Returns (state, own): this rank's own state and True when ``per_rank`` has one state per rank
    of this run (exact); otherwise ``rank0_state`` and False, for the caller to give to rank 0
    only or to reseed the other ranks after. The fallback (another number of processes, or a
    checkpoint with rank 0's state only under DDP) warns once, on rank 0, that ``what`` (e.g.
    "random generators") will not repeat an uninterrupted run, when ``warn`` (pass
    :func:`is_fitting`) and there is a state to restore.
    """
    rank, world = rank_and_world_size()
    if per_rank is not None and len(per_rank) == world:
        return per_rank[rank], True
    if warn and rank0_state is not None and (per_rank is not None or world > 1):
        from lightning.pytorch.utilities import rank_zero_warn

        saved = f"{len(per_rank)} processes" if per_rank is not None else "one process (or an older probseg)"
        rank_zero_warn(f"the checkpoint's {what} were saved by {saved} and the run resumes on {world} "
                       f"process{'es' if world > 1 else ''}: rank 0 continues rank 0's streams and the other ranks "
                       "start new ones, so the run will not repeat an uninterrupted one exactly")
    return rank0_state, False

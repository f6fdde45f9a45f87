"""Base LightningDataModule: batching, loaders and the batch format every zoo model reads.

Batches are dicts: ``image`` (B, C, H, W) float, ``masks`` (B, R, H, W) long class ids,
``rater_mask`` (B, R) bool, ``id`` (list of B strings) and ``index`` (B,) long, each image's
position in its split. Evaluation seeds each image's hypotheses by ``index`` and counts each
index once, so metrics do not depend on batching or on the number of processes (DDP pads uneven
splits with repeated items).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

SPLITS = ("train", "val", "test")


def _sampler_split(trainer: Any) -> tuple[int, int]:
    """(replicas, rank) the training order is split over: Lightning's distributed-sampler
    arguments, unless there are none (one device) or the user turned Lightning's distributed
    sampling off (``use_distributed_sampler=False``: every rank then iterates the whole order)."""
    kwargs = getattr(trainer, "distributed_sampler_kwargs", None) if trainer is not None else None
    connector = getattr(trainer, "_accelerator_connector", None)
    if not kwargs or not getattr(connector, "use_distributed_sampler", True):
        return 1, 0
    return int(kwargs.get("num_replicas", 1)), int(kwargs.get("rank", 0))


class EpochSampler(DistributedSampler):
    """Training order that depends only on (seed, epoch), split over DDP ranks, and that can skip
    the batches a resumed run already trained on.

    Lightning calls :meth:`set_epoch` at every epoch start; the permutation of epoch e is drawn
    from a generator seeded by (seed, e), and the loader's own generator (which seeds worker
    processes) is reseeded the same way, so the data of an epoch is the same whether the run was
    interrupted or not. Nothing here draws from torch's global RNG.

    With ``num_replicas`` > 1 each rank iterates its share of that permutation, padded and
    interleaved as :class:`torch.utils.data.DistributedSampler` (``shuffle=False``) splits a
    dataset: rank r gets items r, r + n, r + 2n, ... of the permutation followed by its first
    items again up to an even share. Being a ``DistributedSampler``, it is not wrapped again by
    Lightning, so the skip on resume applies to this rank's share. With one replica the order is
    the whole permutation.

    Under DDP this order differs from probseg's before per-rank resume: Lightning then wrapped the
    one-process sampler in ``DistributedSamplerWrapper(shuffle=True)``, which shuffled the
    permutation again with ``PL_GLOBAL_SEED`` before dealing it out. A DDP checkpoint written by
    that version therefore restarts its epoch (see :meth:`ProbSegDataModule.train_dataloader`).

    Args:
        size: number of items.
        seed: base seed.
        loader_generator: the DataLoader's generator, reseeded per epoch.
        num_replicas: number of ranks sharing the epoch.
        rank: this process's rank.
    """

    def __init__(self, size: int, seed: int, loader_generator: torch.Generator | None = None, num_replicas: int = 1,
                 rank: int = 0) -> None:
        # The base class only needs a sized dataset for the share sizes; it never sees our order.
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=False, seed=seed, drop_last=False)
        self.size, self.seed, self.loader_generator = size, seed, loader_generator
        self.epoch, self.skip, self.skip_epoch = 0, 0, -1
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.loader_generator is not None:
            self.loader_generator.manual_seed(self._seed(1))

    def skip_next(self, count: int, epoch: int) -> None:
        """Leave out the first ``count`` items of this rank's share when ``epoch`` is iterated
        (resuming mid-epoch); a run that moves on to the next epoch instead (an end-of-epoch
        checkpoint) skips nothing."""
        self.skip, self.skip_epoch = count, epoch

    def _seed(self, stream: int) -> int:
        return (self.seed * 1_000_003 + self.epoch * 2 + stream) % (1 << 63)

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self._seed(0))).tolist()
        if self.num_replicas > 1 and order:
            # Repeat the permutation up to an even share per rank, then deal it out by rank.
            order = (order * math.ceil(self.total_size / len(order)))[: self.total_size]
            order = order[self.rank :: self.num_replicas]
        skip = self.skip if self.epoch == self.skip_epoch else 0
        self.skip = 0
        return iter(order[skip:])

    def __len__(self) -> int:
        return self.num_samples


class ProbSegDataModule(pl.LightningDataModule):
    """Owns loaders; subclasses implement :meth:`make_dataset` for each split.

    Args:
        batch_size: images per batch.
        num_workers: data-loader worker processes (0 loads in the main process).
        num_classes: K, classes in the masks (binary = 2).
        in_channels: C, image channels.
        augmentation: training-time augmentation on the device, in the batch: None or False (off),
            True (the cSAE paper's Table 5 ranges), or a dict of ranges for
            :class:`probseg.data.transforms.PaperAugmentation` (a part set to None is off).
    """

    def __init__(self, batch_size: int = 16, num_workers: int = 0, num_classes: int = 2, in_channels: int = 1,
                 augmentation: bool | dict[str, Any] | None = None) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        from probseg.data.transforms import build_augmentation

        self.batch_size = batch_size
        self.num_workers = num_workers
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.augmentation = build_augmentation(augmentation)
        # Taken now, under Lightning's seed and before ranks diverge: every rank must shuffle the
        # training order alike for the distributed sampler to split it without overlap.
        self.order_seed = torch.initial_seed()
        self.datasets: dict[str, Dataset] = {}

    def make_dataset(self, split: str) -> Dataset:
        """Build the dataset of ``split`` (one of "train", "val", "test")."""
        raise NotImplementedError

    def dataset(self, split: str) -> Dataset:
        """The dataset of ``split``, built once."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if split not in self.datasets:
            self.datasets[split] = self.make_dataset(split)
        return self.datasets[split]

    def setup(self, stage: str | None = None) -> None:
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in needed.get(stage, SPLITS):
            self.dataset(split)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(self.order_seed),  # never the global RNG
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),  # faster host-to-GPU copies; pointless on CPU
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled per epoch by :class:`EpochSampler` and split over the DDP ranks; a run resumed
        mid-epoch skips the batches it already trained on, so the remaining ones are those of the
        uninterrupted run. Except: a DDP checkpoint without ``train_replicas`` in this module's
        state (written by probseg before the sampler split the order itself, when the order under
        DDP was another) skips nothing and restarts its epoch, as that version did, with a warning."""
        dataset = self.dataset("train")
        generator = torch.Generator()
        trainer = getattr(self, "trainer", None)
        replicas, rank = _sampler_split(trainer)
        sampler = self._train_sampler = EpochSampler(len(dataset), self.order_seed, generator, replicas, rank)
        if trainer is not None and getattr(trainer, "fit_loop", None) is not None:
            # Before Lightning iterates (worker processes start prefetching at once).
            sampler.set_epoch(trainer.current_epoch)
            if trainer.fit_loop.restarting:
                # Batches of the restored epoch whose training step ran (a checkpoint written in
                # on_train_batch_end counts its own batch as processed but not yet completed), on
                # every rank alike.
                done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
                saved_replicas = getattr(self, "_saved_train_replicas", None)
                if saved_replicas is None and getattr(trainer, "world_size", 1) > 1:
                    # No ``train_replicas``: a checkpoint written before this sampler split the
                    # order itself, when Lightning's shuffling wrapper dealt out another order under
                    # DDP. Skipping would leave out items of the wrong order (some trained twice,
                    # others never); restart the epoch instead, as that version did.
                    if done:
                        rank_zero_warn("the checkpoint does not record how many ranks shared the training order "
                                       "(written by an older probseg, whose order under DDP differs), so the "
                                       "interrupted epoch restarts from its first batch: its batches before the "
                                       "checkpoint are trained on again and the run will not repeat an "
                                       "uninterrupted one exactly")
                else:
                    # Together the ranks used the front of the epoch's dealt-out order; resumed on
                    # another number of ranks, that front is left out (rounded down: fewer than one
                    # item per rank is trained on twice). One process and no ``train_replicas`` (an
                    # older checkpoint): the one-process order is unchanged, so skip as before.
                    sampler.skip_next(done * self.batch_size * (saved_replicas or replicas) // replicas,
                                      epoch=trainer.current_epoch)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=False,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Augment whole training batches on their device (one geometry per image for the image and
        # all its raters); randomness from torch's RNG, which Lightning seeds.
        trainer = getattr(self, "trainer", None)
        if self.augmentation is not None and trainer is not None and trainer.training:
            batch = self.augmentation(batch, generator=self._augmentation_generator(batch["image"].device, trainer))
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: the augmentation generators, so a resumed run draws on, and the
        number of ranks the training order was split over.

        Under DDP every rank's generator is gathered (a collective: Lightning builds checkpoints
        on every rank, so every rank calls this); ``augmentation_rng`` stays rank 0's, the format
        of one process.
        """
        from probseg.distributed import gather_from_ranks

        generator = getattr(self, "_aug_generator", None)
        own = None if generator is None else generator.get_state()
        state: dict[str, Any] = {}
        sampler = getattr(self, "_train_sampler", None)
        if sampler is not None:
            state["train_replicas"] = sampler.num_replicas
        per_rank = gather_from_ranks(own)
        if per_rank is not None:
            state["augmentation_rng_per_rank"] = per_rank
        if own is not None:
            state["augmentation_rng"] = own
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from probseg.distributed import is_fitting, rank_and_world_size, select_rank_state

        self._saved_train_replicas = state_dict.get("train_replicas")
        saved, own = select_rank_state(state_dict.get("augmentation_rng_per_rank"), state_dict.get("augmentation_rng"),
                                       "augmentation generators", warn=is_fitting(getattr(self, "trainer", None)))
        # Each rank continues its own stream; one process, an older checkpoint or another number of
        # ranks: rank 0 continues the saved stream of rank 0 and the other ranks start theirs afresh.
        self._aug_rng_to_load = saved if own or rank_and_world_size()[0] == 0 else None

    def _augmentation_generator(self, device: torch.device, trainer: Any) -> torch.Generator:
        """One generator per process, seeded from torch's (Lightning-seeded) initial seed and the
        rank: DDP ranks draw different augmentations instead of repeating each other's."""
        generator = getattr(self, "_aug_generator", None)
        if generator is None or generator.device != device:
            from probseg.distributed import rank_seed

            seed = rank_seed(self.order_seed + 1, getattr(trainer, "global_rank", 0))
            generator = self._aug_generator = torch.Generator(device=device).manual_seed(seed)
            saved = getattr(self, "_aug_rng_to_load", None)
            if saved is not None:  # this rank's saved state (see load_state_dict)
                generator.set_state(saved)
                self._aug_rng_to_load = None
        return generator

    def item(self, split: str, index: int) -> dict[str, Any]:
        """One sample of ``split`` by index, with a clear error when out of range."""
        ds = self.dataset(split)
        if not 0 <= index < len(ds):
            raise IndexError(f"index {index} is out of range for the {split} split of {len(ds)} images")
        return ds[index]

"""The training sampler: one process sees the (seed, epoch) permutation as before; DDP ranks get
the DistributedSampler(shuffle=False) split of that permutation, from a sampler Lightning does not
wrap again (an order other than the one Lightning's shuffling wrapper gave before), and a resume
skips the batches each rank already trained on, except from a DDP checkpoint of the older order,
which restarts its epoch. The datamodule's checkpoint state keeps every rank's augmentation stream
and falls back to rank 0's on another number of ranks."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
from lightning.pytorch.trainer.states import RunningStage
from torch.utils.data import DataLoader, DistributedSampler

import probseg.distributed
from probseg.data import SyntheticDataModule
from probseg.data.base import EpochSampler


def _permutation(size: int, seed: int, epoch: int) -> list[int]:
    """The order one process has always seen (written out, so a change to it fails here)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 2) % (1 << 63))
    return torch.randperm(size, generator=generator).tolist()


@pytest.mark.parametrize("epoch", [0, 3])
def test_one_process_iterates_the_epoch_permutation(epoch: int) -> None:
    sampler = EpochSampler(13, seed=5)
    sampler.set_epoch(epoch)
    assert list(sampler) == _permutation(13, 5, epoch) and len(sampler) == 13


@pytest.mark.parametrize("size", [1, 7, 14, 15, 16])
@pytest.mark.parametrize("replicas", [2, 3])
def test_rank_shares_split_the_epoch_permutation(size: int, replicas: int) -> None:
    """Rank r's share is DistributedSampler(shuffle=False)'s split applied to the (seed, epoch)
    permutation; dealt back out by rank, the shares give the permutation followed by its first
    items again, up to an even share per rank (each item at least once, none more than once
    beyond that padding)."""
    for epoch in (0, 2):
        permutation = _permutation(size, 9, epoch)
        shares = []
        for rank in range(replicas):
            sampler = EpochSampler(size, seed=9, num_replicas=replicas, rank=rank)
            sampler.set_epoch(epoch)
            split = DistributedSampler(range(size), num_replicas=replicas, rank=rank, shuffle=False)
            shares.append(list(sampler))
            assert shares[-1] == [permutation[i] for i in split] and len(sampler) == len(split)
        total = -(-size // replicas) * replicas
        interleaved = [shares[i % replicas][i // replicas] for i in range(total)]
        assert interleaved == (permutation * replicas)[:total]


def test_under_ddp_the_order_is_not_the_one_lightnings_wrapper_gave(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before EpochSampler split the order itself, Lightning wrapped it for training as
    _process_dataloader does (shuffle=True, seed PL_GLOBAL_SEED), which reshuffled the permutation:
    the shares changed, so a DDP checkpoint of that version must not skip into the new order
    (test_an_older_ddp_checkpoint_restarts_its_epoch)."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    for rank in range(2):
        ours = EpochSampler(15, seed=9, num_replicas=2, rank=rank)
        loader = DataLoader(range(15), sampler=EpochSampler(15, seed=9))
        old = _get_distributed_sampler(loader, shuffle=True, overfit_batches=0, mode=RunningStage.TRAINING,
                                       num_replicas=2, rank=rank)
        old.set_epoch(0)
        assert len(list(old)) == len(ours) == 8
        assert list(old) != list(ours)


def test_it_is_a_distributed_sampler_so_lightning_does_not_wrap_it() -> None:
    """Lightning 2.x wraps a loader's sampler under DDP unless it is a DistributedSampler
    (DataConnector._requires_distributed_sampler)."""
    assert isinstance(EpochSampler(4, seed=0, num_replicas=2, rank=1), DistributedSampler)
    with pytest.raises(ValueError):
        EpochSampler(4, seed=0, num_replicas=2, rank=2)


def test_skip_leaves_out_the_front_of_the_ranks_share_once() -> None:
    sampler = EpochSampler(15, seed=1, num_replicas=2, rank=1)
    sampler.set_epoch(4)
    share = list(sampler)
    sampler.skip_next(3, epoch=4)
    assert list(sampler) == share[3:]
    assert list(sampler) == share, "the skip applies to one iteration"
    sampler.skip_next(3, epoch=4)
    sampler.set_epoch(5)  # an end-of-epoch checkpoint: the next epoch starts whole
    assert len(list(sampler)) == len(share)


def _restarting_trainer(replicas: int, rank: int, epoch: int, done: int) -> SimpleNamespace:
    """What train_dataloader reads from a trainer resuming mid-epoch."""
    progress = SimpleNamespace(current=SimpleNamespace(processed=done))
    return SimpleNamespace(
        world_size=replicas, state=SimpleNamespace(fn="fit"),
        distributed_sampler_kwargs={"num_replicas": replicas, "rank": rank} if replicas > 1 else None,
        _accelerator_connector=SimpleNamespace(use_distributed_sampler=True), current_epoch=epoch,
        fit_loop=SimpleNamespace(restarting=True, epoch_loop=SimpleNamespace(batch_progress=progress)))


def _ids(loader) -> list[int]:
    return [int(i) for batch in loader for i in batch["index"]]


@pytest.mark.parametrize(("saved", "resumed"), [(2, 2), (2, 1), (1, 2)])
def test_a_resumed_loader_continues_the_epoch(saved: int, resumed: int) -> None:
    """Same number of ranks: each rank's remaining batches exactly. Another number: the items the
    saved ranks trained on are left out, and the rest of the epoch is split over the new ranks."""
    def datamodule(trainer: SimpleNamespace | None, saved_replicas: int | None = None) -> SyntheticDataModule:
        dm = SyntheticDataModule(image_size=16, num_train=16, num_val=2, num_test=2, batch_size=2)
        dm.order_seed = 11
        dm.trainer = trainer
        if saved_replicas is not None:
            dm.load_state_dict({"train_replicas": saved_replicas})
        return dm

    epoch, done = 1, 2
    full = [_ids(datamodule(_restarting_trainer(saved, r, epoch, 0)).train_dataloader()) for r in range(saved)]
    trained = {i for share in full for i in share[: done * 2]}
    rest = [_ids(datamodule(_restarting_trainer(resumed, r, epoch, done), saved).train_dataloader())
            for r in range(resumed)]
    if saved == resumed:
        assert rest == [share[done * 2:] for share in full]
    assert not trained & {i for share in rest for i in share}
    assert trained | {i for share in rest for i in share} == set(range(16))


def _datamodule(trainer: SimpleNamespace | None = None, **kwargs) -> SyntheticDataModule:
    dm = SyntheticDataModule(image_size=16, num_train=16, num_val=2, num_test=2, batch_size=2, **kwargs)
    dm.order_seed = 11
    dm.trainer = trainer
    return dm


def test_an_older_ddp_checkpoint_restarts_its_epoch() -> None:
    """A checkpoint without ``train_replicas`` (probseg before the sampler split the order) resumed
    on 2 ranks: its epoch's order is another, so nothing is skipped (each rank's whole share, as
    the previous release restarted the epoch), with one warning."""
    epoch, done = 1, 2
    for rank in range(2):
        whole = _ids(_datamodule(_restarting_trainer(2, rank, epoch, 0)).train_dataloader())
        dm = _datamodule(_restarting_trainer(2, rank, epoch, done))
        dm.load_state_dict({"augmentation_rng": _state(0)})  # the older format (no per-rank list)
        with pytest.warns(UserWarning, match="interrupted epoch restarts from its first batch") as caught:
            assert _ids(dm.train_dataloader()) == whole
        assert sum("restarts from its first batch" in str(w.message) for w in caught) == 1


@pytest.mark.parametrize("state", [{"train_replicas": 2}, {}], ids=["new-format", "older-no-datamodule-state"])
def test_the_restart_depends_on_the_saved_state(state: dict) -> None:
    """Only a missing ``train_replicas`` restarts; an older checkpoint without any datamodule state
    (no augmentation: Lightning saves no empty state, load_state_dict never runs) restarts too."""
    dm = _datamodule(_restarting_trainer(2, 0, 1, 2))
    if state:
        dm.load_state_dict(state)
    whole = _ids(_datamodule(_restarting_trainer(2, 0, 1, 0)).train_dataloader())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _ids(dm.train_dataloader()) == (whole[4:] if state else whole)
    assert any("restarts from its first batch" in str(w.message) for w in caught) == (not state)


def test_an_older_one_process_checkpoint_still_skips() -> None:
    """One process: the order never changed, so an older checkpoint skips as before, silently."""
    dm = _datamodule(_restarting_trainer(1, 0, 1, 2))
    whole = _ids(_datamodule(_restarting_trainer(1, 0, 1, 0)).train_dataloader())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _ids(dm.train_dataloader()) == whole[4:]


def _state(seed: int) -> torch.Tensor:
    return torch.Generator().manual_seed(seed).get_state()


def test_every_ranks_augmentation_stream_is_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    dm = SyntheticDataModule(image_size=16, num_train=4, num_val=2, num_test=2, batch_size=2, augmentation=True)
    trainer = SimpleNamespace(global_rank=1)
    monkeypatch.setattr(probseg.distributed, "rank_and_world_size", lambda: (1, 2))
    dm.load_state_dict({"augmentation_rng": _state(0), "augmentation_rng_per_rank": [_state(0), _state(1)]})
    assert torch.equal(dm._augmentation_generator(torch.device("cpu"), trainer).get_state(), _state(1))


@pytest.mark.parametrize(("state", "rank", "world"), [
    ({"augmentation_rng": _state(0), "augmentation_rng_per_rank": [_state(0), _state(1)]}, 1, 3),
    ({"augmentation_rng": _state(0)}, 1, 2),  # an older checkpoint, or one process, resumed under DDP
], ids=["other-world-size", "rank-0-only"])
def test_without_a_state_for_each_rank_only_rank_0_continues(monkeypatch: pytest.MonkeyPatch, state: dict,
                                                             rank: int, world: int) -> None:
    for r in (0, rank):
        dm = SyntheticDataModule(image_size=16, num_train=4, num_val=2, num_test=2, batch_size=2, augmentation=True)
        dm.trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"))
        monkeypatch.setattr(probseg.distributed, "rank_and_world_size", lambda r=r: (r, world))
        with pytest.warns(UserWarning, match="augmentation generators were saved by .* rank 0 continues rank 0's"):
            dm.load_state_dict(state)
        generator = dm._augmentation_generator(torch.device("cpu"), SimpleNamespace(global_rank=r))
        assert torch.equal(generator.get_state(), _state(0)) == (r == 0)


@pytest.mark.parametrize("fn", ["validate", "test", "predict"])
def test_loading_for_evaluation_does_not_warn_about_resuming(monkeypatch: pytest.MonkeyPatch, fn: str) -> None:
    """``validate``/``test --ckpt_path`` under DDP load the state too, but train on nothing."""
    dm = SyntheticDataModule(image_size=16, num_train=4, num_val=2, num_test=2, batch_size=2, augmentation=True)
    dm.trainer = SimpleNamespace(state=SimpleNamespace(fn=fn))
    monkeypatch.setattr(probseg.distributed, "rank_and_world_size", lambda: (0, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm.load_state_dict({"augmentation_rng": _state(0)})


def test_one_process_state_keeps_its_format() -> None:
    """One process: ``augmentation_rng`` as before, no per-rank list; an older state loads."""
    dm = SyntheticDataModule(image_size=16, num_train=4, num_val=2, num_test=2, batch_size=2, augmentation=True)
    dm.train_dataloader()
    generator = dm._augmentation_generator(torch.device("cpu"), SimpleNamespace(global_rank=0))
    torch.rand(3, generator=generator)
    state = dm.state_dict()
    assert set(state) == {"augmentation_rng", "train_replicas"} and state["train_replicas"] == 1
    fresh = SyntheticDataModule(image_size=16, num_train=4, num_val=2, num_test=2, batch_size=2, augmentation=True)
    fresh.load_state_dict({"augmentation_rng": state["augmentation_rng"]})
    restored = fresh._augmentation_generator(torch.device("cpu"), SimpleNamespace(global_rank=0))
    assert torch.equal(restored.get_state(), generator.get_state())

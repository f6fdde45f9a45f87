"""Exact resume under DDP: a 2-process CPU run (gloo, ``probseg fit`` as a subprocess) killed
mid-epoch by SIGKILL on every rank and resumed with ``--ckpt_path last`` ends with bitwise the
weights of the uninterrupted 2-process run, and each rank trains on the same images with the same
random draws after the resume. Also: the checkpoint's per-rank generator entries, and the fallback
(rank 0's generators, new streams elsewhere, a warning) for another number of processes or an
older checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

import probseg.distributed
from probseg.callbacks import RunCheckpoint
from probseg.callbacks.checkpoint import RNG_KEY, RNG_RANKS_KEY, rng_state, set_rng_state
from tests.conftest import TINY_PUNET

REPO = Path(__file__).resolve().parents[1]
PROBSEG = [str(Path(sys.executable).parent / "probseg")]
# 15 training images over 2 ranks: 8 per rank (one padded repeat), 4 batches of 2 per epoch.
MAX_STEPS, SAVE_EVERY, KILL_AT = 10, 3, 7  # last save at step 6: epoch 1, after 2 of its 4 batches
RUN_TIMEOUT = 150


def _config(root: Path, name: str, kill: bool = False) -> Path:
    callbacks = [
        {"class_path": "probseg.callbacks.RunCheckpoint", "init_args": {"every_n_train_steps": SAVE_EVERY}},
        {"class_path": "tests.helpers.RecordDraws", "init_args": {"folder": str(root / f"draws-{name}")}},
    ]
    if kill:  # runs on every rank: each kills itself right after the same optimizer step
        callbacks.append({"class_path": "tests.helpers.KillAtStep", "init_args": {"step": KILL_AT}})
    config = {
        "seed_everything": 7,
        "model": {"class_path": "punet", "init_args": {**TINY_PUNET, "lr": 1e-2}},
        "data": {"class_path": "probseg.data.SyntheticDataModule",
                 "init_args": {"image_size": 32, "num_train": 15, "num_val": 4, "num_test": 4, "num_raters": 3,
                               "batch_size": 2, "augmentation": True}},
        "trainer": {"default_root_dir": str(root / "run"), "max_steps": MAX_STEPS, "accelerator": "cpu", "devices": 2,
                    "strategy": "ddp", "log_every_n_steps": 1, "enable_model_summary": False,
                    "enable_progress_bar": False, "limit_val_batches": 1, "callbacks": callbacks},
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _live_in_group(group: int) -> list[int]:
    """Processes of a process group that are not yet dead (zombies excluded), from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # exited meanwhile
            if int(fields[2]) == group and fields[0] not in "ZX":
                pids.append(int(entry.name))
    return pids


def _wait_group_gone(group: int, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while (live := _live_in_group(group)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return live


def _fit(config: Path, *extra: str) -> tuple[int, str, list[int]]:
    """Run ``probseg fit`` in its own process group (both ranks: Lightning starts rank 1 as a child
    of rank 0); returns the exit code, stderr, and the processes of the group still alive once
    rank 0 exited. Whatever is left is SIGKILLed, so no rank outlives the test."""
    # Bitwise comparisons hold for the same kernels in the same order: same machine, same threads.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(PROBSEG + ["fit", "--config", str(config), "--wandb", "disabled", *extra],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=config.parent,
                               env=env, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=RUN_TIMEOUT)
        survivors = _wait_group_gone(process.pid, 20)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
    assert not _wait_group_gone(process.pid, 10), "a rank outlived the test's SIGKILL"
    return process.returncode, stderr, survivors


def _draws(root: Path, name: str) -> list[dict[int, dict]]:
    """Per rank: training step -> what the rank trained on and drew (tests.helpers.RecordDraws)."""
    per_rank = []
    for rank in (0, 1):
        lines = (root / f"draws-{name}" / f"rank{rank}.jsonl").read_text().splitlines()
        per_rank.append({record["step"]: record for record in map(json.loads, lines)})
    return per_rank


def _checkpoint(root: Path) -> dict:
    return torch.load(root / "run/checkpoints/last.ckpt", map_location="cpu", weights_only=True)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the run's processes in /proc (Linux)")
def test_a_killed_ddp_run_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    """Tolerance: bitwise (torch.equal) for the weights, exact equality for each rank's batch ids,
    augmented-image digests, losses and next global-RNG draw at every step after the resume."""
    code, stderr, _ = _fit(_config(tmp_path / "whole", "whole"))
    assert code == 0, stderr[-3000:]

    killed = tmp_path / "killed"
    code, stderr, survivors = _fit(_config(killed, "killed", kill=True))
    assert code == -signal.SIGKILL, f"rank 0 must die by SIGKILL, got {code}: {stderr[-2000:]}"
    assert not survivors, f"rank processes {survivors} outlived the killed run"
    saved = _checkpoint(killed)
    assert saved["global_step"] == (KILL_AT // SAVE_EVERY) * SAVE_EVERY
    assert len(saved[RNG_RANKS_KEY]) == 2 and not torch.equal(saved[RNG_RANKS_KEY][0]["torch"],
                                                              saved[RNG_RANKS_KEY][1]["torch"])
    assert len(saved["SyntheticDataModule"]["augmentation_rng_per_rank"]) == 2

    code, stderr, _ = _fit(_config(killed, "resumed"), "--ckpt_path", "last")
    assert code == 0, stderr[-3000:]

    whole, resumed = _checkpoint(tmp_path / "whole"), _checkpoint(killed)
    assert whole["global_step"] == resumed["global_step"] == MAX_STEPS
    a, b = whole["state_dict"], resumed["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"

    expected, before, after = _draws(tmp_path / "whole", "whole"), _draws(killed, "killed"), _draws(killed, "resumed")
    for rank in (0, 1):
        assert sorted(expected[rank]) == list(range(MAX_STEPS))
        assert sorted(after[rank]) == list(range(saved["global_step"], MAX_STEPS)), "the resume restarted elsewhere"
        assert after[rank] == {s: expected[rank][s] for s in after[rank]}, \
            f"rank {rank} trained on other images or drew otherwise after the resume"
        assert all(before[rank][s] == expected[rank][s] for s in range(saved["global_step"]))
    assert "the run resumes on" not in stderr, "the per-rank state must restore without the fallback"
    first = saved["global_step"]
    assert after[0][first]["draw"] != after[1][first]["draw"], "the ranks' streams must differ"
    assert not set(after[0][first]["ids"]) & set(after[1][first]["ids"])


@pytest.fixture(autouse=True)
def _keep_global_generators():
    """The generator tests below set this process's global generators: put them back after."""
    state = rng_state()
    yield
    set_rng_state(state)


def _checkpoint_with_ranks(world: int) -> dict:
    states = []
    for rank in range(world):
        torch.manual_seed(100 + rank)
        states.append(rng_state())
    return {RNG_KEY: states[0], RNG_RANKS_KEY: states}


def _trainer(step: int, fn: str = "fit") -> SimpleNamespace:
    return SimpleNamespace(global_step=step, state=SimpleNamespace(fn=fn))


def test_each_rank_restores_its_own_generators(monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = _checkpoint_with_ranks(2)
    monkeypatch.setattr(probseg.distributed, "rank_and_world_size", lambda: (1, 2))
    RunCheckpoint().on_load_checkpoint(_trainer(6), None, checkpoint)
    assert torch.equal(torch.get_rng_state(), checkpoint[RNG_RANKS_KEY][1]["torch"])


@pytest.mark.parametrize("saved_ranks", [2, None], ids=["other-world-size", "rank-0-only"])
def test_without_generators_for_each_rank_rank_0_continues_and_others_diverge(
        monkeypatch: pytest.MonkeyPatch, saved_ranks: int | None) -> None:
    """Resumed on 3 processes from a 2-process checkpoint, or from one with rank 0's generators only
    (one process, or probseg before per-rank states): rank 0 restores those, the others reseed."""
    checkpoint = _checkpoint_with_ranks(saved_ranks or 1)
    if saved_ranks is None:
        del checkpoint[RNG_RANKS_KEY]
    restored = {}
    for rank in (0, 1):
        monkeypatch.setattr(probseg.distributed, "rank_and_world_size", lambda rank=rank: (rank, 3))
        with pytest.warns(UserWarning, match="random generators were saved by .* rank 0 continues rank 0's streams"):
            RunCheckpoint().on_load_checkpoint(_trainer(6), None, checkpoint)
        restored[rank] = torch.get_rng_state()
    assert torch.equal(restored[0], checkpoint[RNG_KEY]["torch"])
    assert not torch.equal(restored[1], checkpoint[RNG_KEY]["torch"])


@pytest.mark.parametrize("fn", ["validate", "test"])
def test_evaluating_from_a_checkpoint_does_not_warn_about_resuming(monkeypatch: pytest.MonkeyPatch, fn: str) -> None:
    """``validate``/``test --ckpt_path`` on 2 processes from a one-process checkpoint: the same
    restore (rank 0's generators, rank 1 diverges), but no warning about repeating a run."""
    checkpoint = _checkpoint_with_ranks(1)
    del checkpoint[RNG_RANKS_KEY]
    for rank in (0, 1):
        monkeypatch.setattr(probseg.distributed, "rank_and_world_size", lambda rank=rank: (rank, 2))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            RunCheckpoint().on_load_checkpoint(_trainer(6, fn), None, checkpoint)
        assert torch.equal(torch.get_rng_state(), checkpoint[RNG_KEY]["torch"]) == (rank == 0)


def test_one_process_checkpoints_keep_their_format(monkeypatch: pytest.MonkeyPatch) -> None:
    """One process: rank 0's generators under RNG_KEY alone, as before, restored with no warning."""
    checkpoint: dict = {}
    RunCheckpoint().on_save_checkpoint(SimpleNamespace(), None, checkpoint)
    assert set(checkpoint) == {RNG_KEY}
    expected = torch.get_rng_state()
    torch.rand(5)
    RunCheckpoint().on_load_checkpoint(_trainer(3), None, checkpoint)
    assert torch.equal(torch.get_rng_state(), expected)


def test_lightning_loads_checkpoint_state_knowing_whether_it_fits(tmp_path: Path) -> None:
    """The fallback warnings are gated by probseg.distributed.is_fitting(trainer): a real Trainer
    restoring the datamodule's and the callbacks' state reports ``fit`` for ``fit --ckpt_path`` and
    not for ``validate --ckpt_path``."""
    import lightning.pytorch as pl

    from probseg.data import SyntheticDataModule
    from probseg.distributed import is_fitting
    from probseg.models import ProbUNet

    seen: list[bool] = []

    class Recording(SyntheticDataModule):
        def load_state_dict(self, state_dict: dict) -> None:
            seen.append(is_fitting(self.trainer))
            super().load_state_dict(state_dict)

    def trainer(steps: int) -> pl.Trainer:
        return pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                          limit_val_batches=1)

    def datamodule() -> Recording:
        return Recording(image_size=32, num_train=4, num_val=2, num_test=2, num_raters=3, batch_size=2,
                         augmentation=True)

    pl.seed_everything(0, verbose=False)
    first = trainer(1)
    first.fit(ProbUNet(**TINY_PUNET), datamodule=datamodule())
    path = tmp_path / "one.ckpt"
    first.save_checkpoint(path)
    trainer(1).validate(ProbUNet(**TINY_PUNET), datamodule=datamodule(), ckpt_path=path, verbose=False)
    trainer(2).fit(ProbUNet(**TINY_PUNET), datamodule=datamodule(), ckpt_path=path)
    assert seen == [False, True]

"""Checkpoint saves under storage faults: a writer failing mid-file, a full disk, a read-only
folder, an unreadable last.ckpt. None leaves a truncated checkpoint as the only state; each names
the file and the cause, and a resume loses at most one save interval."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from probseg.callbacks.checkpoint import AtomicCheckpointIO, CheckpointWriteError
from tests.conftest import TINY_PUNET
from tests.helpers import TINY_DATA

REPO = Path(__file__).resolve().parents[1]
PROBSEG = [str(Path(sys.executable).parent / "probseg")]


def _good(path: Path) -> dict:
    AtomicCheckpointIO().save_checkpoint({"global_step": 4, "weights": torch.arange(5.0)}, path)
    return torch.load(path, weights_only=True)


def test_a_writer_failing_mid_file_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoints" / "last.ckpt"
    before = _good(path)
    original = path.read_bytes()

    def half_then_full_disk(obj, fh, *args, **kwargs):
        fh.write(original[: len(original) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", half_then_full_disk)
    with pytest.raises(CheckpointWriteError, match=rf"could not write the checkpoint {path} \(No space left on device\); "
                                                   "the previous file is kept"):
        AtomicCheckpointIO().save_checkpoint({"global_step": 8}, path)
    assert path.read_bytes() == original and torch.load(path, weights_only=True)["global_step"] == before["global_step"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"], "a temporary file was left behind"


def test_a_read_only_folder_is_named_and_the_previous_file_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated (the tests may run as root, who writes anyway): the rename into place fails as on
    a read-only file system."""
    path = tmp_path / "last.ckpt"
    _good(path)
    original = path.read_bytes()

    def read_only(src, dst):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "replace", read_only)
    with pytest.raises(CheckpointWriteError, match=r"last.ckpt \(Read-only file system\)") as info:
        AtomicCheckpointIO().save_checkpoint({"global_step": 8}, path)
    assert info.value.errno == errno.EROFS
    assert path.read_bytes() == original and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_the_atomic_save_writes_what_torch_load_reads(tmp_path: Path) -> None:
    checkpoint = {"state_dict": {"w": torch.randn(3, 3)}, "global_step": 7}
    path = tmp_path / "deeper" / "x.ckpt"
    AtomicCheckpointIO().save_checkpoint(checkpoint, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["global_step"] == 7 and torch.equal(loaded["state_dict"]["w"], checkpoint["state_dict"]["w"])


def _config(tmp_path: Path, max_steps: int, callbacks: list) -> Path:
    config = {
        "seed_everything": 1,
        "model": {"class_path": "punet", "init_args": dict(TINY_PUNET)},
        "data": {"class_path": "probseg.data.SyntheticDataModule", "init_args": dict(TINY_DATA)},
        "trainer": {"default_root_dir": str(tmp_path / "run"), "max_steps": max_steps, "accelerator": "cpu",
                    "devices": 1, "enable_model_summary": False, "enable_progress_bar": False, "limit_val_batches": 0,
                    "callbacks": [{"class_path": "probseg.callbacks.RunCheckpoint",
                                   "init_args": {"every_n_train_steps": 2}}, *callbacks]},
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _fit(config: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(PROBSEG + ["fit", "--config", str(config), "--wandb", "disabled", *extra],
                          capture_output=True, text=True, cwd=config.parent, env=env, timeout=300, check=False)


@pytest.mark.slow
def test_a_full_disk_mid_run_stops_it_cleanly_and_the_resume_loses_one_interval(tmp_path: Path) -> None:
    failing = {"class_path": "tests.helpers.FailSavesFrom", "init_args": {"step": 3}}
    done = _fit(_config(tmp_path, 6, [failing]))
    assert done.returncode == 1, done.stderr[-3000:]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert f"probseg fit: [Errno {errno.ENOSPC}] could not write the checkpoint" in done.stderr
    assert "No space left on device" in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 2, "the last good save (step 2) must survive the failed one (step 4)"
    assert not list(last.parent.glob(".*.tmp"))
    resumed = _fit(_config(tmp_path, 6, []), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(last, weights_only=True)["global_step"] == 6


@pytest.mark.slow
def test_ckpt_path_last_skips_an_unreadable_file_with_a_warning_naming_it(tmp_path: Path) -> None:
    config = _config(tmp_path, 4, [])
    assert _fit(config).returncode == 0
    folder = tmp_path / "run" / "checkpoints"
    last = folder / "last.ckpt"
    good = folder / "epoch000-step000002.ckpt"
    good.write_bytes(b"")  # placeholder replaced below by a readable copy of an earlier state
    state = torch.load(last, weights_only=True)
    torch.save(state, good)
    last.write_bytes(last.read_bytes()[:1000])  # truncated, as by a crash of a non-atomic writer
    resumed = _fit(_config(tmp_path, 6, []), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{last} is unreadable" in resumed.stderr and "kept as last.ckpt.unreadable" in resumed.stderr
    assert f"Resuming from {good}" in resumed.stderr
    assert (folder / "last.ckpt.unreadable").stat().st_size == 1000
    assert torch.load(last, weights_only=True)["global_step"] == 6

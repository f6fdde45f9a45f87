"""Crash and resume: a CPU training run killed with SIGKILL part way, resumed with
``--ckpt_path last``, ends with exactly the weights and losses of an uninterrupted run; the same
seed gives the same run; two runs cannot share a checkpoint folder."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from probseg.callbacks import RunCheckpoint
from probseg.callbacks.checkpoint import RunLockedError
from tests.conftest import TINY_PUNET

REPO = Path(__file__).resolve().parents[1]
PROBSEG = [str(Path(sys.executable).parent / "probseg")]
MAX_STEPS = 10  # 4 batches per epoch
THREADS = 2


def _config(root: Path, kill_at: int | None = None, save_every: int = 3) -> Path:
    callbacks = [
        {"class_path": "probseg.callbacks.RunCheckpoint", "init_args": {"every_n_train_steps": save_every}},
        {"class_path": "lightning.pytorch.callbacks.EarlyStopping",
         "init_args": {"monitor": "val/loss", "patience": 50, "check_on_train_epoch_end": False}},
        {"class_path": "probseg.callbacks.EvaluationCallback", "init_args": {"num_samples": 2, "kernels": ["iou"]}},
    ]
    if kill_at is not None:
        callbacks.append({"class_path": "tests.helpers.KillAtStep", "init_args": {"step": kill_at}})
    config = {
        "seed_everything": 7,
        "model": {"class_path": "punet", "init_args": {**TINY_PUNET, "lr": 1e-2}},
        "data": {"class_path": "probseg.data.SyntheticDataModule",
                 "init_args": {"image_size": 32, "num_train": 16, "num_val": 4, "num_test": 4, "num_raters": 3,
                               "batch_size": 4, "augmentation": True}},
        "trainer": {"default_root_dir": str(root / "run"), "max_steps": MAX_STEPS, "accelerator": "cpu", "devices": 1,
                    "log_every_n_steps": 1, "enable_model_summary": False, "enable_progress_bar": False,
                    "limit_val_batches": 1, "callbacks": callbacks},
    }
    path = root / f"config{'' if kill_at is None else '-kill'}.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def _fit(config: Path, *extra: str) -> subprocess.CompletedProcess:
    # Bitwise comparisons between runs hold because every run uses the same kernels in the same
    # order: same machine and the same thread count, set here for every run (not inherited).
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(THREADS)}
    return subprocess.run(PROBSEG + ["fit", "--config", str(config), "--wandb", "disabled", *extra],
                          capture_output=True, text=True, cwd=config.parent, env=env, timeout=300)


def _weights(root: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(root / "run/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == MAX_STEPS
    return checkpoint["state_dict"]


def _train_losses(root: Path) -> dict[int, str]:
    losses = {}
    for log in sorted((root / "run/logs").glob("version_*/metrics.csv")):
        with open(log, newline="") as f:
            losses.update({int(r["step"]): r["train/loss_step"] if "train/loss_step" in r else r["train/loss"]
                           for r in csv.DictReader(f) if r.get("train/loss")})
    return losses


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    done = _fit(_config(root))
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def test_the_same_seed_gives_bitwise_the_same_run(uninterrupted: Path, tmp_path: Path) -> None:
    """Bitwise: one process, CPU kernels with a fixed thread count and no atomics, every draw
    from seeded generators."""
    done = _fit(_config(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _weights(uninterrupted), _weights(tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _train_losses(uninterrupted) == _train_losses(tmp_path)


@pytest.mark.parametrize(("save_every", "kill_at"), [(3, 7), (4, 9)], ids=["mid-epoch", "epoch-end"])
def test_a_killed_run_resumes_to_the_uninterrupted_result(uninterrupted: Path, tmp_path: Path, save_every: int,
                                                          kill_at: int) -> None:
    """Killed at step 7 (last save at step 6, mid-epoch 1) or 9 (last save at step 8, the end of
    epoch 1): the resumed run reproduces the uninterrupted one bitwise."""
    killed = _fit(_config(tmp_path, kill_at=kill_at, save_every=save_every))
    assert killed.returncode == -9, "the run must die by SIGKILL"
    saved = torch.load(tmp_path / "run/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == (kill_at // save_every) * save_every, "at most one interval is lost"
    assert (tmp_path / "run/checkpoints/.lock").exists(), "the crash left its lock behind"
    resumed = _fit(_config(tmp_path, save_every=save_every), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _weights(uninterrupted), _weights(tmp_path)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    expected, got = _train_losses(uninterrupted), _train_losses(tmp_path)
    assert {s: got[s] for s in expected} == expected
    assert not (tmp_path / "run/checkpoints/.lock").exists()


def test_a_second_run_in_the_same_folder_is_refused_while_the_first_runs(tmp_path: Path) -> None:
    """The lock is an flock held for the run's life (per open file, so a second one in this process
    is refused too); a leftover file whose holder is gone is taken over; releasing removes it."""
    folder = tmp_path / "checkpoints"
    first = RunCheckpoint(dirpath=str(folder))
    first._acquire(folder)
    assert (folder / ".lock").read_text() == str(os.getpid())
    with pytest.raises(RunLockedError, match=rf"another probseg run \(process {os.getpid()}\) is writing checkpoints"):
        RunCheckpoint(dirpath=str(folder))._acquire(folder)
    first._release()
    assert not (folder / ".lock").exists()
    (folder / ".lock").write_text("999999999")  # left by a crashed run: nobody holds it
    second = RunCheckpoint(dirpath=str(folder))
    second._acquire(folder)
    assert (folder / ".lock").read_text() == str(os.getpid())
    second._release()


def test_without_flock_an_exclusive_create_stands_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import probseg.callbacks.checkpoint as module

    monkeypatch.setattr(module, "fcntl", None)
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / ".lock").write_text(str(os.getppid()))  # a live process other than this one
    with pytest.raises(RunLockedError, match=rf"process {os.getppid()}"):
        RunCheckpoint(dirpath=str(folder))._acquire(folder)
    (folder / ".lock").write_text("999999999")  # a process that no longer exists
    RunCheckpoint(dirpath=str(folder))._acquire(folder)
    assert (folder / ".lock").read_text() == str(os.getpid())

"""One run per checkpoint folder: runs started together on one folder (exactly one trains, the
others stop with a message naming its process, no traceback), and under DDP every rank stops
when the folder is held."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_PUNET
from tests.helpers import TINY_DATA

REPO = Path(__file__).resolve().parents[1]
PROBSEG = [str(Path(sys.executable).parent / "probseg")]

pytestmark = pytest.mark.slow


def _config(tmp_path: Path, release: Path, **trainer: object) -> Path:
    config = {
        "model": {"class_path": "punet", "init_args": dict(TINY_PUNET)},
        "data": {"class_path": "probseg.data.SyntheticDataModule", "init_args": dict(TINY_DATA)},
        "trainer": {"default_root_dir": str(tmp_path / "run"), "max_steps": 2, "accelerator": "cpu", "devices": 1,
                    "enable_model_summary": False, "enable_progress_bar": False, "limit_val_batches": 0,
                    "callbacks": [{"class_path": "tests.helpers.HoldUntilFile", "init_args": {"path": str(release)}}],
                    **trainer},
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("round_", [0, 1])
def test_of_four_runs_started_together_exactly_one_trains(tmp_path: Path, round_: int) -> None:
    release = tmp_path / "release"
    config = _config(tmp_path, release)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = PROBSEG + ["fit", "--config", str(config), "--wandb", "disabled"]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
             for _ in range(4)]
    deadline = time.monotonic() + 240
    while sum(p.poll() is not None for p in procs) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)  # the refused runs end on their own; the owner waits for the release file
    release.touch()
    outputs = [p.communicate(timeout=240) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 1, 1, 1], [(c, err[-1500:]) for c, (_, err) in zip(codes, outputs)]
    owner = procs[codes.index(0)].pid
    for code, (_, err) in zip(codes, outputs):
        if code == 1:
            assert f"another probseg run (process {owner}) is writing checkpoints to" in err
            assert "Traceback" not in err, err[-2000:]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "run" / "checkpoints" / ".lock").exists()


def test_under_ddp_every_rank_stops_when_the_folder_is_held(tmp_path: Path) -> None:
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    with open(folder / ".lock", "w") as held:  # this process holds the folder, as a live run would
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write(str(os.getpid()))
        held.flush()
        config = _config(tmp_path, tmp_path / "release", devices=2, strategy="ddp")
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        started = time.monotonic()
        done = subprocess.run(PROBSEG + ["fit", "--config", str(config), "--wandb", "disabled"], capture_output=True,
                              text=True, cwd=tmp_path, env=env, timeout=180, check=False)
        elapsed = time.monotonic() - started
    assert done.returncode == 1, done.stderr[-3000:]
    assert f"another probseg run (process {os.getpid()}) is writing checkpoints to" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert elapsed < 120, f"the ranks took {elapsed:.0f} s to stop"
    assert not (folder / "last.ckpt").exists()

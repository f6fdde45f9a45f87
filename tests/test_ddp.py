"""Training under Lightning's DDP on CPU (gloo, 2 processes, run as a subprocess): it trains,
writes one set of checkpoints and logs, and the ranks draw different training randomness for
different images. (Evaluation under DDP equals 1 process: tests/callbacks/test_evaluation.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import TINY_PUNET

REPO = Path(__file__).resolve().parents[1]
PROBSEG = [str(Path(sys.executable).parent / "probseg")]


def test_two_process_training_splits_the_data_and_the_random_streams(tmp_path: Path) -> None:
    config = {
        "seed_everything": 3,
        "model": {"class_path": "punet", "init_args": TINY_PUNET},
        "data": {"class_path": "probseg.data.SyntheticDataModule",
                 "init_args": {"image_size": 32, "num_train": 14, "num_val": 5, "num_test": 5, "batch_size": 2,
                               "augmentation": True}},
        "trainer": {"default_root_dir": str(tmp_path / "run"), "max_steps": 3, "accelerator": "cpu", "devices": 2,
                    "strategy": "ddp", "log_every_n_steps": 1, "enable_model_summary": False,
                    "enable_progress_bar": False, "limit_val_batches": 2,
                    "callbacks": [{"class_path": "tests.helpers.RecordFirstDraw",
                                   "init_args": {"folder": str(tmp_path / "draws")}}]},
    }
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(PROBSEG + ["fit", "--config", str(path), "--wandb", "disabled"], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    draws = [(tmp_path / "draws" / f"rank{r}.txt").read_text().split("\n") for r in (0, 1)]
    assert draws[0][0] != draws[1][0], "ranks drew the same training randomness"
    assert not set(draws[0][1].split(",")) & set(draws[1][1].split(",")), "ranks trained on the same images"
    checkpoints = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    assert checkpoints.count("last.ckpt") == 1 and not any("-v1" in name for name in checkpoints)
    assert len(list((tmp_path / "run/logs").glob("version_*/metrics.csv"))) == 1, "rank 0 logs alone"

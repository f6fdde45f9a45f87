"""Splits saved with the run: written once into the run folder, read back by a later process
even when the data file's order changes, refused when another split is asked for there."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest

from probseg.data import ArrayDataModule
from probseg.data.arrays import SPLIT_FILE, read_split_file


def _write_npz(path: Path, order: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    n = len(order)
    images = rng.random((n, 1, 8, 8)).astype(np.float32)
    masks = (rng.random((n, 2, 8, 8)) > 0.5).astype(np.uint8)
    ids = np.array([f"img{i:02d}" for i in range(n)])
    patients = np.array([f"p{i // 2}" for i in range(n)])
    np.savez(path, images=images[order], masks=masks[order], ids=ids[order], patients=patients[order])


def _attached(path: Path, root: Path, **kwargs) -> ArrayDataModule:
    dm = ArrayDataModule(str(path), split_mode="random", batch_size=4, **kwargs)
    dm.trainer = pl.Trainer(default_root_dir=str(root), logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    return dm


def _ids(dm: ArrayDataModule, split: str) -> list[str]:
    return sorted(dm.arrays.ids[i] for i in dm.split_indices()[split])


def test_the_split_is_written_to_the_run_folder_and_read_back_after_the_data_is_reordered(tmp_path: Path) -> None:
    data = tmp_path / "data.npz"
    _write_npz(data, np.arange(20))
    first = _attached(data, tmp_path / "run", seed=3)
    test_ids = _ids(first, "test")
    saved = json.loads((tmp_path / "run" / SPLIT_FILE).read_text())
    assert sorted(saved["test"]) == test_ids and saved["recipe"]["seed"] == 3
    # another process, the data file rewritten in another order: the same images are held out
    _write_npz(data, np.random.default_rng(1).permutation(20))
    later = _attached(data, tmp_path / "run", seed=3)
    assert _ids(later, "test") == test_ids
    assert [later.dataset("test")[i]["id"] for i in range(len(later.dataset("test")))] == [
        later.arrays.ids[i] for i in later.split_indices()["test"]]
    # without a run folder the split is computed from the (new) order: other images
    detached = ArrayDataModule(str(data), split_mode="random", seed=3)
    assert _ids(detached, "test") != test_ids


def test_another_split_in_the_same_run_folder_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data.npz"
    _write_npz(data, np.arange(20))
    _attached(data, tmp_path / "run", seed=3).split_indices()
    with pytest.raises(ValueError, match=r"splits.json holds the splits of .* \(differs in \['seed'\]\)"):
        _attached(data, tmp_path / "run", seed=4).split_indices()


def test_an_explicit_split_file_and_its_errors(tmp_path: Path) -> None:
    data = tmp_path / "data.npz"
    _write_npz(data, np.arange(20))
    split_file = tmp_path / "my_split.json"
    dm = ArrayDataModule(str(data), split_mode="random", seed=0, split_file=str(split_file))
    test_ids = _ids(dm, "test")
    assert split_file.is_file()
    again = ArrayDataModule(str(data), split_mode="random", seed=0, split_file=str(split_file))
    assert _ids(again, "test") == test_ids
    content = json.loads(split_file.read_text())
    content["test"].append("img99")
    split_file.write_text(json.dumps(content))
    with pytest.raises(ValueError, match="does not hold.*img99"):
        read_split_file(split_file, dm.arrays.ids)
    content["test"][-1] = content["train"][0]
    split_file.write_text(json.dumps(content))
    with pytest.raises(ValueError, match="two splits"):
        read_split_file(split_file, dm.arrays.ids)
    split_file.write_text("{not json")
    with pytest.raises(ValueError, match="not a readable split file"):
        read_split_file(split_file, dm.arrays.ids)

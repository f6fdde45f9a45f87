"""LIDC-IDRI in its four on-disk formats, generated here in exactly those formats: the PU-Net
port's pickle, the converted .npz, PHiSeg's HDF5 and DeepMind's PNG crops; patient splits."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from probseg.cli import main
from probseg.data import LIDCDataModule
from probseg.data import lidc as lidc_module
from probseg.data.lidc import read_lidc_pickle

SIZE = 16


def _entries(n: int = 6, patients: int = 3, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        image = rng.random((SIZE, SIZE)).astype(np.float32)
        masks = [(image > t).astype(np.uint8) for t in (0.3, 0.4, 0.5, 0.6)]
        out[f"slice{i:02d}"] = {"image": image, "masks": masks, "series_uid": f"1.3.6.{i % patients}"}
    return out


def _write_pickle(path: Path, entries: dict) -> Path:
    with open(path, "wb") as f:
        pickle.dump(entries, f)
    return path


def test_pickle_needs_allow_pickle_and_names_the_file(tmp_path: Path) -> None:
    path = _write_pickle(tmp_path / "data_lidc.pickle", _entries())
    with pytest.raises(PermissionError, match="data_lidc.pickle: reading a pickle executes code"):
        LIDCDataModule(str(path), format="pickle").dataset("train")


def test_pickle_is_read_with_its_values_and_series_uids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entries = _entries()
    first = _write_pickle(tmp_path / "a.pickle", dict(list(entries.items())[:4]))
    _write_pickle(tmp_path / "b.pickle", dict(list(entries.items())[4:]))
    monkeypatch.setattr(lidc_module, "_CHUNK", 1000)  # reads of at most 1000 bytes: the >2 GiB path
    arrays = read_lidc_pickle([tmp_path], allow_pickle=True)
    assert arrays.images.shape == (6, 1, SIZE, SIZE) and arrays.masks.shape == (6, 4, SIZE, SIZE)
    assert arrays.ids == list(entries) and arrays.patients == [e["series_uid"] for e in entries.values()]
    assert arrays.series == [e["series_uid"] for e in entries.values()]
    for i, entry in enumerate(entries.values()):
        np.testing.assert_array_equal(arrays.images[i, 0], entry["image"])
        np.testing.assert_array_equal(arrays.masks[i], np.stack(entry["masks"]))
    assert first.exists()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda e: e["slice01"]["masks"].__setitem__(2, np.full((SIZE, SIZE), 2)), "slice01.*non-binary"),
        (lambda e: e["slice03"].pop("series_uid"), r"slice03.*series_uid"),
        (lambda e: e["slice00"].__setitem__("masks", [np.zeros((SIZE, 8))] * 4), "slice00.*shape"),
    ],
)
def test_bad_pickle_entries_are_named(tmp_path: Path, change, match: str) -> None:
    entries = _entries()
    change(entries)
    path = _write_pickle(tmp_path / "bad.pickle", entries)
    with pytest.raises(ValueError, match=match):
        read_lidc_pickle([path], allow_pickle=True)


def test_convert_writes_a_pickle_free_npz_that_the_default_format_reads(tmp_path: Path, capsys) -> None:
    entries = _entries()
    path = _write_pickle(tmp_path / "data_lidc.pickle", entries)
    out = tmp_path / "lidc.npz"
    assert main(["convert", "lidc-pickle", str(path), str(out)]) == 0
    assert "only convert files you trust" in capsys.readouterr().err
    with np.load(out, allow_pickle=False) as data:  # no object arrays inside
        assert set(data.files) >= {"images", "masks", "patients", "ids", "rater_mask", "series"}
        assert data["series"].tolist() == [e["series_uid"] for e in entries.values()]
    dm = LIDCDataModule(str(out), split_mode="random", fractions=(0.34, 0.33, 0.33), batch_size=2)
    items = {it["id"]: it for split in ("train", "val", "test") for it in dm.dataset(split)}
    assert sorted(items) == sorted(entries)
    for key, entry in entries.items():
        torch.testing.assert_close(items[key]["image"][0], torch.from_numpy(entry["image"]))
        assert torch.equal(items[key]["masks"], torch.from_numpy(np.stack(entry["masks"]).astype(np.int64)))
    assert main(["convert", "lidc-pickle", str(tmp_path / "missing.pickle"), str(out)]) == 1


def _write_hdf5(path: Path) -> dict:
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(1)
    groups = {}
    with h5py.File(path, "w") as f:
        for split, n in (("train", 5), ("val", 2), ("test", 3)):
            images = rng.random((n, SIZE, SIZE)).astype(np.float32)
            labels = np.stack([(images > t) for t in (0.2, 0.4, 0.6, 0.8)], axis=-1).astype(np.uint8)
            uids = np.array([f"{split}-patient{i // 2}".encode() for i in range(n)])
            g = f.create_group(split)
            g["images"], g["labels"], g["uids"] = images, labels, uids
            groups[split] = (images, labels, uids)
    return groups


def test_hdf5_keeps_its_splits_and_moves_the_rater_axis(tmp_path: Path) -> None:
    groups = _write_hdf5(tmp_path / "lidc.hdf5")
    dm = LIDCDataModule(str(tmp_path / "lidc.hdf5"), format="hdf5", batch_size=2)
    for split, (images, labels, uids) in groups.items():
        ds = dm.dataset(split)
        assert len(ds) == len(images)
        for i in range(len(images)):
            item = ds[i]
            torch.testing.assert_close(item["image"][0], torch.from_numpy(images[i]))
            assert torch.equal(item["masks"], torch.from_numpy(np.moveaxis(labels[i], -1, 0).astype(np.int64)))
    patients = dm.arrays.patients
    assert patients[0] == "train-patient0" and patients[-1] == "test-patient1"


def test_hdf5_without_labels_is_a_clear_error(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "bad.hdf5", "w") as f:
        f.create_group("train")["images"] = np.zeros((2, SIZE, SIZE))
    with pytest.raises(KeyError, match=r"group 'train' lacks \['labels', 'uids'\]"):
        LIDCDataModule(str(tmp_path / "bad.hdf5"), format="hdf5").dataset("train")


def _write_png_tree(root: Path, raters_from: int = 0, size: int = 180) -> dict:
    from PIL import Image

    rng = np.random.default_rng(2)
    truth = {}
    for split, patients in (("train", ["LIDC-0001", "LIDC-0002"]), ("val", ["LIDC-0003"]), ("test", ["LIDC-0004"])):
        for patient in patients:
            for z in ("-120.5", "-118.0"):
                image = (rng.random((size, size)) * 255).astype(np.uint8)
                image_dir, gt_dir = root / split / "images" / patient, root / split / "gt" / patient
                image_dir.mkdir(parents=True, exist_ok=True)
                gt_dir.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(image_dir / f"z-{z}_c0.png")
                masks = []
                for r in range(4):
                    mask = (image > 60 * (r + 1)).astype(np.uint8) * 255
                    Image.fromarray(mask).save(gt_dir / f"z-{z}_c0_l{r + raters_from}.png")
                    masks.append(mask > 0)
                truth[f"{split}/{patient}/z-{z}_c0"] = (image / 255.0, np.stack(masks))
    return truth


@pytest.mark.parametrize("raters_from", [0, 1])
def test_png_crops_are_centre_cropped_for_evaluation(tmp_path: Path, raters_from: int) -> None:
    truth = _write_png_tree(tmp_path, raters_from)
    dm = LIDCDataModule(str(tmp_path), format="png", batch_size=2)
    assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [4, 2, 2]
    for split in ("val", "test"):
        for item in dm.dataset(split):
            image, masks = truth[item["id"]]
            assert item["image"].shape == (1, 128, 128) and item["masks"].shape == (4, 128, 128)
            torch.testing.assert_close(item["image"][0], torch.from_numpy(image[26:154, 26:154]).float())
            assert torch.equal(item["masks"], torch.from_numpy(masks[:, 26:154, 26:154].astype(np.int64)))


def test_png_training_crops_are_random_and_aligned(tmp_path: Path) -> None:
    truth = _write_png_tree(tmp_path)
    dm = LIDCDataModule(str(tmp_path), format="png", batch_size=2)
    torch.manual_seed(0)
    offsets = set()
    for _ in range(5):
        item = dm.dataset("train")[0]
        image, masks = truth[item["id"]]
        # Locate the crop in the full image and check the masks come from the same window.
        crop = item["image"][0].numpy()
        hits = [(r, c) for r in range(53) for c in range(53) if np.allclose(image[r : r + 128, c : c + 128], crop)]
        assert len(hits) == 1
        r, c = hits[0]
        offsets.add((r, c))
        assert np.array_equal(item["masks"].numpy(), masks[:, r : r + 128, c : c + 128])
    assert len(offsets) > 1, "the training crop should move"


def test_png_with_a_missing_rater_names_the_file(tmp_path: Path) -> None:
    _write_png_tree(tmp_path)
    (tmp_path / "val" / "gt" / "LIDC-0003" / "z--118.0_c0_l2.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"val/images/LIDC-0003/z--118.0_c0.png: expected 4 rater masks"):
        LIDCDataModule(str(tmp_path), format="png").dataset("val")


def test_png_with_a_non_binary_mask_names_the_file(tmp_path: Path) -> None:
    from PIL import Image

    _write_png_tree(tmp_path)
    Image.fromarray(np.full((180, 180), 7, dtype=np.uint8)).save(tmp_path / "test/gt/LIDC-0004/z--120.5_c0_l0.png")
    with pytest.raises(ValueError, match=r"z--120.5_c0_l0.png: rater mask is not binary"):
        LIDCDataModule(str(tmp_path), format="png").dataset("test")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"root": "/nonexistent/lidc.npz"}, FileNotFoundError, "LIDC root not found"),
        ({"root": "x", "format": "dicom"}, ValueError, "unknown LIDC format"),
        ({"root": "/nonexistent", "format": "png"}, FileNotFoundError, "LIDC PNG root not found"),
        ({"root": "/nonexistent.hdf5", "format": "hdf5"}, FileNotFoundError, "HDF5 file not found"),
    ],
)
def test_missing_roots_and_unknown_formats(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        LIDCDataModule(**kwargs).dataset("train")


@pytest.mark.parametrize("fmt", ["npz", "pickle", "hdf5", "png"])
def test_every_format_trains_and_summarizes_through_the_cli(fmt: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    init: dict = {"format": fmt, "batch_size": 2}
    if fmt in ("npz", "pickle"):
        path = _write_pickle(tmp_path / "data_lidc.pickle", _entries(n=10, patients=5))
        if fmt == "npz":
            assert main(["convert", "lidc-pickle", str(path), str(tmp_path / "lidc.npz")]) == 0
            path = tmp_path / "lidc.npz"
        init.update(root=str(path), split_mode="paper", fold=1, allow_pickle=fmt == "pickle")
        # 5 patients: the first 20% (1 patient, 2 slices) is the test set; 4 patients in 3 folds.
        expected = "| test | 2 | 1 | 4 / 4.00 / 4 | 1x16x16 |"
    elif fmt == "hdf5":
        _write_hdf5(tmp_path / "lidc.hdf5")
        init.update(root=str(tmp_path / "lidc.hdf5"))
        expected = "| test | 3 | 2 | 4 / 4.00 / 4 | 1x16x16 |"
    else:
        _write_png_tree(tmp_path / "png")
        init.update(root=str(tmp_path / "png"))
        expected = "| test | 2 | 1 | 4 / 4.00 / 4 | 1x128x128 |"
    config = {
        "model": {"class_path": "punet", "init_args": {"num_filters": [4, 8, 8], "convs_per_block": 1,
                                                       "latent_dim": 3, "fcomb_layers": 2}},
        "data": {"class_path": "probseg.data.LIDCDataModule", "init_args": init},
        "trainer": {"default_root_dir": str(tmp_path / "run"), "max_steps": 2, "accelerator": "cpu",
                    "devices": 1, "enable_model_summary": False, "limit_val_batches": 1,
                    "log_every_n_steps": 1, "val_check_interval": 2},
    }
    cfg = tmp_path / "lidc.yaml"
    cfg.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main(["data", "summary", "--config", str(cfg)]) == 0
    assert expected in capsys.readouterr().out
    assert main(["fit", "--config", str(cfg), "--wandb", "disabled"]) == 0
    assert (tmp_path / "run/checkpoints/last.ckpt").is_file()


def test_pickle_patients_come_from_the_lidc_key_prefix(tmp_path: Path) -> None:
    """Keys "LIDC-IDRI-0001_..." name the patient; a patient with two CT series stays one patient."""
    entries = _entries(n=4)
    renamed = {f"LIDC-IDRI-000{1 + i // 2}_slice{i}": dict(v, series_uid=f"series-{i}") for i, v in enumerate(entries.values())}
    arrays = read_lidc_pickle([_write_pickle(tmp_path / "p.pickle", renamed)], allow_pickle=True)
    assert arrays.patients == ["LIDC-IDRI-0001", "LIDC-IDRI-0001", "LIDC-IDRI-0002", "LIDC-IDRI-0002"]


def test_sixteen_bit_png_images_are_scaled_not_saturated(tmp_path: Path) -> None:
    from PIL import Image

    truth = _write_png_tree(tmp_path)
    key = next(k for k in truth if k.startswith("val/"))
    ramp = (np.arange(180 * 180).reshape(180, 180) % 65536).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / f"{key}.png".replace("val/", "val/images/"))
    item = next(it for it in LIDCDataModule(str(tmp_path), format="png").dataset("val") if it["id"] == key)
    np.testing.assert_allclose(item["image"][0].numpy(), ramp[26:154, 26:154] / 65535.0, rtol=1e-6)

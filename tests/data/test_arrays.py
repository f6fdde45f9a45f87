"""Multi-rater arrays: validation naming the source, patient-level splits, your own .npz data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from probseg.data import ArrayDataModule, MultiRaterArrays, split_by_patient
from probseg.data.arrays import PAPER_FOLDS, save_npz

PATIENTS = [f"p{i // 3}" for i in range(30)] + [f"q{i}" for i in range(7)]  # 10 patients x 3 slices, 7 x 1


@pytest.mark.parametrize("mode", ["random", "paper"])
@pytest.mark.parametrize("seed", [0, 1])
def test_splits_are_patient_disjoint_complete_and_reproducible(mode: str, seed: int) -> None:
    splits = split_by_patient(PATIENTS, mode, seed=seed)
    assert sorted(np.concatenate(list(splits.values())).tolist()) == list(range(len(PATIENTS)))
    owners = {s: {PATIENTS[i] for i in idx} for s, idx in splits.items()}
    assert not (owners["train"] & owners["val"]) and not (owners["train"] & owners["test"])
    assert not (owners["val"] & owners["test"])
    again = split_by_patient(PATIENTS, mode, seed=seed)
    assert all(np.array_equal(splits[s], again[s]) for s in splits)


def test_random_split_fractions_count_patients() -> None:
    splits = split_by_patient(PATIENTS, "random", seed=3, fractions=(0.6, 0.2, 0.2))
    counts = {s: len({PATIENTS[i] for i in idx}) for s, idx in splits.items()}
    assert counts == {"train": 10, "val": 3, "test": 4}  # of 17 patients, rounded
    assert not np.array_equal(splits["test"], split_by_patient(PATIENTS, "random", seed=4)["test"])


def test_paper_protocol_first_fifth_is_test_and_folds_partition_the_rest() -> None:
    order = list(dict.fromkeys(PATIENTS))
    test_patients = set(order[: int(np.ceil(0.2 * len(order)))])  # the first 20%, in order of appearance
    vals = []
    for fold in range(PAPER_FOLDS):
        splits = split_by_patient(PATIENTS, "paper", seed=0, fold=fold)
        assert {PATIENTS[i] for i in splits["test"]} == test_patients
        vals.append({PATIENTS[i] for i in splits["val"]})
        assert {PATIENTS[i] for i in splits["train"]} == set(order) - test_patients - vals[-1]
    assert set.union(*vals) == set(order) - test_patients
    assert all(not (a & b) for i, a in enumerate(vals) for b in vals[i + 1 :])
    with pytest.raises(ValueError, match="fold must be in 0..2"):
        split_by_patient(PATIENTS, "paper", fold=3)


def _arrays(n: int = 6, r: int = 3) -> MultiRaterArrays:
    rng = np.random.default_rng(0)
    return MultiRaterArrays(rng.random((n, 2, 8, 8)).astype(np.float32), rng.integers(0, 2, (n, r, 8, 8)).astype(np.uint8),
                            patients=[f"pat{i // 2}" for i in range(n)], ids=[f"img{i}" for i in range(n)], source="test.npz")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda a: a.images.__setitem__((3, 0, 0, 0), np.nan), "test.npz: image img3 holds NaN"),
        (lambda a: a.masks.__setitem__((2, 1, 0, 0), 5), r"test.npz: masks of image img2 hold values \[0, 1, 5\]"),
        (lambda a: setattr(a, "masks", a.masks[:, :, :7]), r"masks \(6, 3, 7, 8\) do not match images"),
        (lambda a: setattr(a, "images", a.images[:, 0]), r"images must be \(N, C, H, W\)"),
        (lambda a: a.rater_mask.__setitem__(4, False), "test.npz: image img4 has no rater mask"),
        (lambda a: setattr(a, "ids", ["same"] * 6), "not unique"),
    ],
)
def test_validation_names_the_source_and_the_image(change, match: str) -> None:
    arrays = _arrays()
    change(arrays)
    with pytest.raises(ValueError, match=match):
        arrays.validate(num_classes=2)


def test_array_datamodule_reads_every_optional_key(tmp_path: Path) -> None:
    arrays = _arrays()
    arrays.rater_mask[1, 2] = False
    arrays.masks[1, 2] = 0
    path = save_npz(tmp_path / "mine.npz", arrays, split=["train"] * 4 + ["val", "test"])
    dm = ArrayDataModule(str(path), in_channels=2, batch_size=2)
    assert [len(dm.dataset(s)) for s in ("train", "val", "test")] == [4, 1, 1]
    item = dm.dataset("train")[1]
    assert item["id"] == "img1" and item["index"] == 1
    assert item["rater_mask"].tolist() == [True, True, False]
    torch.testing.assert_close(item["image"], torch.from_numpy(arrays.images[1]))
    assert torch.equal(item["masks"], torch.from_numpy(arrays.masks[1].astype(np.int64)))
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 2, 8, 8) and batch["masks"].dtype == torch.int64


def test_array_datamodule_refuses_pickled_objects_and_names_missing_arrays(tmp_path: Path) -> None:
    np.savez(tmp_path / "objects.npz", images=np.zeros((2, 1, 4, 4)), masks=np.zeros((2, 1, 4, 4), dtype=np.uint8),
             ids=np.array([{"a": 1}, {"b": 2}], dtype=object))
    with pytest.raises(ValueError, match="objects.npz: holds pickled objects, which are never loaded"):
        ArrayDataModule(str(tmp_path / "objects.npz")).dataset("train")
    np.savez(tmp_path / "nomasks.npz", images=np.zeros((2, 1, 4, 4)))
    with pytest.raises(KeyError, match=r"nomasks.npz: missing arrays \['masks'\]"):
        ArrayDataModule(str(tmp_path / "nomasks.npz")).dataset("train")
    with pytest.raises(FileNotFoundError, match="no such data file"):
        ArrayDataModule(str(tmp_path / "absent.npz")).dataset("train")
    (tmp_path / "garbage.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="garbage.npz: not a readable .npz"):
        ArrayDataModule(str(tmp_path / "garbage.npz")).dataset("train")


def test_channel_count_and_empty_splits_are_clear_errors(tmp_path: Path) -> None:
    path = save_npz(tmp_path / "mine.npz", _arrays())
    with pytest.raises(ValueError, match="images have 2 channels, the data module was configured with in_channels=1"):
        ArrayDataModule(str(path)).dataset("train")
    one_patient = _arrays()
    one_patient.patients = ["same"] * 6
    path = save_npz(tmp_path / "one.npz", one_patient)
    with pytest.raises(ValueError, match="the val split is empty"):
        ArrayDataModule(str(path), in_channels=2, split_mode="random").dataset("val")


def test_summary_reports_an_empty_split_and_is_the_same_at_every_run(tmp_path: Path) -> None:
    from probseg.data.summary import summarize

    path = save_npz(tmp_path / "mine.npz", _arrays(), split=["train"] * 4 + ["val"] * 2)
    dm = ArrayDataModule(str(path), in_channels=2, crop=(4, 4))
    first, second = summarize(dm, progress=False), summarize(dm, progress=False)
    assert first["test"]["images"] == 0 and first["train"]["images"] == 4
    assert (first["train"], first["val"]) == (second["train"], second["val"]), "training crops are central in the summary"


def test_ids_may_be_numpy_arrays() -> None:
    arrays = MultiRaterArrays(np.zeros((2, 1, 4, 4), np.float32), np.zeros((2, 1, 4, 4), np.uint8),
                              ids=np.array(["a", "b"]))
    assert arrays.ids == ["a", "b"] and arrays.patients == ["a", "b"]


# --- the published LIDC splits (PHiSeg, MoSE) ------------------------------------------------------

SERIES = [f"1.3.6.{i % 11}" for i in range(40)]  # 11 series, interleaved slices
SERIES_PATIENTS = [f"p{int(s.rsplit('.', 1)[1]) // 2}" for s in SERIES]  # two series per patient


def _sklearn_split(series: list[str], seed: int) -> dict[str, set[str]]:
    """The published recipe, with scikit-learn itself: two train_test_split(test_size=0.2) cuts of
    the sorted unique series ids."""
    from sklearn.model_selection import train_test_split

    train_val, test = train_test_split(np.unique(series), test_size=0.2, random_state=seed)
    train, val = train_test_split(train_val, test_size=0.2, random_state=seed)
    return {"train": set(train), "val": set(val), "test": set(test)}


@pytest.mark.parametrize("seed", [0, 3, 17])
def test_phiseg_split_is_scikit_learns_two_cuts_of_the_series(seed: int) -> None:
    with pytest.warns(UserWarning, match="cuts by CT series"):
        splits = split_by_patient(SERIES_PATIENTS, "phiseg", seed=seed, series=SERIES)
    expect = _sklearn_split(SERIES, seed)
    for name, idx in splits.items():
        assert {SERIES[i] for i in idx} == expect[name], name
        assert all(SERIES[i] in expect[name] for i in idx)
    assert sorted(np.concatenate(list(splits.values())).tolist()) == list(range(len(SERIES)))


def test_mose_split_is_the_phiseg_split_with_seed_zero_and_patients_stand_in_for_series() -> None:
    with pytest.warns(UserWarning):
        mose = split_by_patient(SERIES_PATIENTS, "mose", seed=5, series=SERIES)
    with pytest.warns(UserWarning):
        phiseg = split_by_patient(SERIES_PATIENTS, "phiseg", seed=0, series=SERIES)
    assert all(np.array_equal(mose[s], phiseg[s]) for s in mose)
    # Without series ids the patients are the units (and no patient can leak).
    splits = split_by_patient(PATIENTS, "mose")
    expect = _sklearn_split(PATIENTS, 0)
    assert all({PATIENTS[i] for i in idx} == expect[name] for name, idx in splits.items())


def test_series_split_warns_about_patients_on_both_sides() -> None:
    """Two series of one patient cut apart: the warning counts and names the patient."""
    series = ["s0", "s1", "s2", "s3", "s4"]
    with pytest.warns(UserWarning, match=r"\d+ patient\(s\) have series in two splits"):
        split_by_patient(["same"] * 5, "phiseg", series=series)


def test_array_datamodule_splits_by_the_npz_series(tmp_path: Path) -> None:
    """The npz's optional ``series`` round-trips and drives split_mode="phiseg"; the split file
    records the mode."""
    n = len(SERIES)
    rng = np.random.default_rng(0)
    arrays = MultiRaterArrays(rng.random((n, 1, 8, 8)).astype(np.float32), rng.integers(0, 2, (n, 2, 8, 8)).astype(np.uint8),
                              patients=SERIES, ids=[f"img{i}" for i in range(n)], series=SERIES, source="s.npz")
    path = save_npz(tmp_path / "series.npz", arrays)
    split_file = tmp_path / "splits.json"
    dm = ArrayDataModule(str(path), split_mode="phiseg", seed=3, split_file=str(split_file))
    expect = _sklearn_split(SERIES, 3)
    for name in ("train", "val", "test"):
        assert {SERIES[int(it["id"][3:])] for it in dm.dataset(name)} == expect[name]
    assert '"split_mode": "phiseg"' in split_file.read_text()
    bad = MultiRaterArrays(arrays.images, arrays.masks, series=SERIES[:-1], source="s.npz")
    with pytest.raises(ValueError, match="s.npz: 'series' holds 39 ids for 40 images"):
        bad.validate()

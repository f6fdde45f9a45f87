"""QUBIQ loader on tiny trees written with nibabel in the challenge's own layouts (2020 and 2021).

Every rater mask is written as ``image > threshold`` on the original grid, so after loading it must
equal the nearest-neighbour resampling of that mask, and the loaded image must still look like the
original resampled at the same pixel centers (no transposed, flipped or mixed-up slices).
"""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from probseg.cli import main
from probseg.data.qubiq import DATASETS, QUBIQDataModule

SIZE = 32  # image_size of the tests
H, W = 20, 24  # 2D images: not square, so a transposed axis cannot go unnoticed
THRESHOLDS = np.linspace(0.3, 0.7, 7)  # rater r segments image > THRESHOLDS[r]


def save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4)), str(path))


def blob(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A smooth off-center bump in [0, 1] with a little noise, float32."""
    rows, cols = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    cr, cc = rng.uniform(0.25, 0.75) * shape[0], rng.uniform(0.25, 0.75) * shape[1]
    bump = np.exp(-(((rows - cr) / (0.3 * shape[0])) ** 2 + ((cols - cc) / (0.3 * shape[1])) ** 2))
    return (bump + rng.normal(0, 0.01, shape)).astype(np.float32)


def write_case(folder: Path, image: np.ndarray, task_masks: dict[int, list[np.ndarray | None]], ext: str = ".nii.gz",
               odd_encodings: bool = False) -> None:
    """``image.nii.gz`` and ``taskTT_segRR`` files (None: that rater is absent)."""
    save(folder / f"image{ext}", image)
    for task, masks in task_masks.items():
        for r, mask in enumerate(masks):
            if mask is None:
                continue
            stored = mask.astype(np.float32)
            if odd_encodings and r == 1:
                stored = (mask * 255).astype(np.uint8)  # 0/255
            elif odd_encodings and r == 2:
                stored = mask * np.float32(0.7)  # another foreground value, still > 0
            save(folder / f"task{task:02d}_seg{r + 1:02d}{ext}", stored)


def make_2d(root: Path, dataset: str, cases: dict[str, str], raters: int, tasks: int = 1, channels: int = 1,
            release: str = "training_data_v2", ext: str = ".nii.gz", seed: int = 0,
            missing: dict[str, int] | None = None, image_shape: tuple[int, ...] | None = None) -> dict[str, dict]:
    """2D cases ``{name: "Training"/"Validation"}`` in the 2020 layout; returns the originals by case name.

    2020 keeps the validation cases in a sibling ``validation_data_*`` folder; the masks of task t
    threshold channel 0 at ``THRESHOLDS[r] + 0.05 (t - 1)``; ``missing[name]`` raters exist in that case.
    """
    rng = np.random.default_rng(seed)
    originals = {}
    for name, split in cases.items():
        base = root / (release if split == "Training" else release.replace("training", "validation"))
        channel_images = np.stack([blob((H, W), rng) for _ in range(channels)], axis=-1)  # (H, W, C)
        present = (missing or {}).get(name, raters)
        task_masks = {t: [channel_images[..., 0] > THRESHOLDS[r] + 0.05 * (t - 1) if r < present else None
                          for r in range(raters)] for t in range(1, tasks + 1)}
        stored = channel_images[..., 0] if channels == 1 else channel_images
        if image_shape is not None:
            stored = stored.reshape(image_shape)
        write_case(base / dataset / split / name, stored, task_masks, ext, odd_encodings=dataset == "brain-growth")
        originals[name] = {"image": channel_images, "masks": task_masks}
    return originals


def pancreas_slices(i: int) -> tuple[set[int], set[int]]:
    """Annotated slices of rater 1 and rater 2 in the i-th pancreas case (depth 6)."""
    return {i % 6, (i + 1) % 6}, {(i + 3) % 6}


def make_pancreas(root: Path, num_cases: int = 2, release: str = "training_data_v3", level: str | None = "Training",
                  seed: int = 0) -> dict[str, dict]:
    """2021 3D cases (16 x 16 x 6), 2 raters annotating only some slices; returns the originals."""
    rng = np.random.default_rng(seed)
    originals = {}
    for i in range(num_cases):
        name = f"case{i + 1:02d}"
        volume = np.stack([blob((16, 16), rng) for _ in range(6)], axis=-1)  # a different bump in every slice
        masks = []
        for r, slices in enumerate(pancreas_slices(i)):
            mask = np.zeros(volume.shape, dtype=bool)
            for z in slices:
                mask[..., z] = volume[..., z] > THRESHOLDS[r]
            masks.append(mask)
        folder = root / release / "pancreas" / (level or "") / name
        write_case(folder, volume, {1: masks})
        originals[name] = {"image": volume, "masks": masks}
    return originals


def nearest_rows_cols(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Source rows and columns that nearest-neighbour resampling to SIZE x SIZE reads (pixel centers)."""
    return tuple(np.minimum(((np.arange(SIZE) + 0.5) * n / SIZE).astype(int), n - 1) for n in shape)


def resample(array: np.ndarray) -> np.ndarray:
    rows, cols = nearest_rows_cols(array.shape[:2])
    return array[rows][:, cols]


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


BRAIN_GROWTH = {"case01": "Training", "case02": "Training", "case03": "Training",
                "case04": "Validation", "case05": "Validation"}


@pytest.fixture
def brain_growth(tmp_path: Path) -> tuple[Path, dict[str, dict]]:
    return tmp_path, make_2d(tmp_path, "brain-growth", BRAIN_GROWTH, raters=7)


def test_brain_growth_2020_shapes_ids_and_validation_pool(brain_growth: tuple[Path, dict]) -> None:
    root, _ = brain_growth
    dm = QUBIQDataModule(str(root), "brain-growth", image_size=SIZE)
    a = dm.arrays
    assert dm.in_channels == 1 and dm.num_classes == 2
    assert a.images.shape == (5, 1, SIZE, SIZE) and a.images.dtype == np.float32
    assert a.masks.shape == (5, 7, SIZE, SIZE) and a.masks.dtype == np.uint8
    assert a.rater_mask.shape == (5, 7) and a.rater_mask.all()
    assert a.ids == [f"brain-growth-case{i:02d}" for i in range(1, 6)] and a.patients == a.ids
    assert "training_data_v2" in a.source
    without = QUBIQDataModule(str(root), "brain-growth", image_size=SIZE, include_validation=False).arrays
    assert without.ids == a.ids[:3]
    np.testing.assert_array_equal(without.images, a.images[:3])


def test_masks_are_binary_and_aligned_with_the_image(brain_growth: tuple[Path, dict]) -> None:
    root, originals = brain_growth
    a = QUBIQDataModule(str(root), "brain-growth", image_size=SIZE).arrays
    assert set(np.unique(a.masks)) == {0, 1}  # 0/255 and 0/0.7 files binarized too
    for i, name in enumerate(BRAIN_GROWTH):
        original = originals[name]
        for r in range(7):
            np.testing.assert_array_equal(a.masks[i, r], resample(original["masks"][1][r]), err_msg=f"{name} r{r}")
        assert correlation(a.images[i, 0], resample(original["image"][..., 0])) > 0.95
        # Raters disagree as generated: lower thresholds segment more.
        assert (a.masks[i].sum(axis=(1, 2))[:-1] >= a.masks[i].sum(axis=(1, 2))[1:]).all()


def test_per_image_normalization(brain_growth: tuple[Path, dict]) -> None:
    root, _ = brain_growth
    images = QUBIQDataModule(str(root), "brain-growth", image_size=SIZE).arrays.images.astype(np.float64)
    np.testing.assert_allclose(images.mean(axis=(2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(images.std(axis=(2, 3)), 1, atol=1e-4)


@pytest.mark.parametrize("task", [1, 2, 3])
def test_brain_tumor_has_four_channels_and_three_tasks(tmp_path: Path, task: int) -> None:
    cases = {"case01": "Training", "case02": "Training"}
    originals = make_2d(tmp_path, "brain-tumor", cases, raters=3, tasks=3, channels=4)
    dm = QUBIQDataModule(str(tmp_path), "brain-tumor", task=task, image_size=SIZE)
    assert dm.in_channels == 4
    a = dm.arrays
    assert a.images.shape == (2, 4, SIZE, SIZE) and a.masks.shape == (2, 3, SIZE, SIZE)
    np.testing.assert_allclose(a.images.mean(axis=(2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(a.images.std(axis=(2, 3)), 1, atol=1e-4)
    for i, name in enumerate(cases):
        image = originals[name]["image"]
        # Channel c is modality c: it matches its own original best (channels last on disk).
        for c in range(4):
            scores = [correlation(a.images[i, c], resample(image[..., k])) for k in range(4)]
            assert int(np.argmax(scores)) == c and scores[c] > 0.95
        for r in range(3):
            np.testing.assert_array_equal(a.masks[i, r], resample(originals[name]["masks"][task][r]))


@pytest.mark.parametrize("task", [1, 2])
def test_prostate_case_with_five_of_six_raters(tmp_path: Path, task: int) -> None:
    cases = {"case01": "Training", "case02": "Training", "case03": "Training"}
    originals = make_2d(tmp_path, "prostate", cases, raters=6, tasks=2, ext=".nii", missing={"case02": 5})
    a = QUBIQDataModule(str(tmp_path), "prostate", task=task, image_size=SIZE).arrays
    assert a.masks.shape == (3, 6, SIZE, SIZE)
    assert a.rater_mask.tolist() == [[True] * 6, [True] * 5 + [False], [True] * 6]
    assert not a.masks[1, 5].any()
    for r in range(5):
        np.testing.assert_array_equal(a.masks[1, r], resample(originals["case02"]["masks"][task][r]))


def test_kidney_hw1_images_and_constant_image(tmp_path: Path) -> None:
    cases = {"case01": "Training", "case02": "Training"}
    make_2d(tmp_path, "kidney", cases, raters=3, image_shape=(H, W, 1))
    case02 = tmp_path / "training_data_v2" / "kidney" / "Training" / "case02"
    save(case02 / "image.nii.gz", np.full((H, W, 1), 7.0, dtype=np.float32))  # no contrast at all
    a = QUBIQDataModule(str(tmp_path), "kidney", image_size=SIZE).arrays
    assert a.images.shape == (2, 1, SIZE, SIZE)
    assert np.isfinite(a.images).all() and not a.images[1].any(), "a constant image must become zeros"
    assert a.images[0].std() == pytest.approx(1, abs=1e-4)


def test_image_size_equal_to_the_data_keeps_the_pixels(tmp_path: Path) -> None:
    make_2d(tmp_path, "kidney", {"case01": "Training"}, raters=3)
    mask = np.zeros((SIZE, SIZE), np.float32)
    mask[3:9, 20:30] = 1
    case = tmp_path / "training_data_v2/kidney/Training/case01"
    save(case / "image.nii.gz", mask * 5)
    for r in range(3):
        save(case / f"task01_seg{r + 1:02d}.nii.gz", mask)
    a = QUBIQDataModule(str(tmp_path), "kidney", image_size=SIZE, include_validation=False).arrays
    np.testing.assert_array_equal(a.masks[0, 0], mask)
    np.testing.assert_array_equal(a.images[0, 0] > 0, mask > 0)


@pytest.mark.parametrize(("release", "level"), [("training_data_v3", "Training"), ("training_data_v3", None),
                                                 ("training_data_v3_QC", "Training")])
def test_pancreas_volumes_become_annotated_slices(tmp_path: Path, release: str, level: str | None) -> None:
    originals = make_pancreas(tmp_path, num_cases=2, release=release, level=level)
    a = QUBIQDataModule(str(tmp_path), "pancreas", image_size=SIZE).arrays
    expected = [(name, z) for i, name in enumerate(originals) for z in sorted(set.union(*pancreas_slices(i)))]
    assert len(expected) == 6  # 3 of the 6 slices of each case
    assert a.ids == [f"pancreas-{name}-z{z:03d}" for name, z in expected]
    assert a.patients == [f"pancreas-{name}" for name, _ in expected]
    assert a.images.shape == (6, 1, SIZE, SIZE) and a.masks.shape == (6, 2, SIZE, SIZE)
    assert a.rater_mask.all() and a.masks.reshape(6, -1).any(axis=1).all()
    for k, (name, z) in enumerate(expected):
        volume, masks = originals[name]["image"], originals[name]["masks"]
        assert correlation(a.images[k, 0], resample(volume[..., z])) > 0.95
        for r in range(2):
            np.testing.assert_array_equal(a.masks[k, r], resample(masks[r][..., z]), err_msg=f"{name} z{z} r{r}")
    np.testing.assert_allclose(a.images.mean(axis=(2, 3)), 0, atol=1e-5)


def test_2021_release_with_2d_data_and_validation_level_is_preferred(tmp_path: Path) -> None:
    make_2d(tmp_path, "brain-growth", BRAIN_GROWTH, raters=7)  # 2020, 5 cases
    three = {"case01": "Training", "case02": "Training", "case03": "Validation"}
    make_2d(tmp_path / "v3", "brain-growth", three, raters=7, release="training_data_v3")
    # 2021 keeps the Validation level inside the dataset folder of the training release.
    (tmp_path / "v3/validation_data_v3/brain-growth/Validation").rename(
        tmp_path / "v3/training_data_v3/brain-growth/Validation")
    (tmp_path / "v3/training_data_v3").rename(tmp_path / "training_data_v3")
    a = QUBIQDataModule(str(tmp_path), "brain-growth", image_size=SIZE).arrays
    assert "training_data_v3" in a.source and len(a.ids) == 3
    assert len(QUBIQDataModule(str(tmp_path), "brain-growth", include_validation=False).arrays.ids) == 2


def test_repeated_case_names_carry_their_source(tmp_path: Path) -> None:
    make_2d(tmp_path, "kidney", {"case01": "Training", "case02": "Training"}, raters=3)
    make_2d(tmp_path, "kidney", {"case01": "Validation"}, raters=3, seed=1)
    a = QUBIQDataModule(str(tmp_path), "kidney", image_size=SIZE).arrays
    assert a.ids == ["kidney-training-case01", "kidney-training-case02", "kidney-validation-case01"]
    assert a.patients == a.ids


def test_splits_keep_every_slice_of_a_case_together_and_are_seeded(tmp_path: Path) -> None:
    make_pancreas(tmp_path, num_cases=6)
    kwargs = {"image_size": SIZE, "fractions": (0.5, 0.25, 0.25), "batch_size": 4}
    dm = QUBIQDataModule(str(tmp_path), "pancreas", **kwargs)
    splits = dm.split_indices()
    patients = np.asarray(dm.arrays.patients)
    assert sorted(np.concatenate(list(splits.values())).tolist()) == list(range(len(patients)))
    owner = {p: s for s, idx in splits.items() for p in patients[idx]}
    for s, idx in splits.items():
        assert len(idx) and all(owner[p] == s for p in patients[idx])
    assert [len(set(patients[idx])) for idx in splits.values()] == [3, 2, 1]

    def assignment(seed: int, mode: str = "random") -> dict[str, list[int]]:
        other = QUBIQDataModule(str(tmp_path), "pancreas", split_mode=mode, seed=seed, **kwargs)
        return {s: idx.tolist() for s, idx in other.split_indices().items()}

    assert assignment(0) == {s: idx.tolist() for s, idx in splits.items()}
    assert assignment(0, "given") == assignment(0), "QUBIQ has no test labels: given means random"
    assert any(assignment(seed) != assignment(0) for seed in (1, 2, 3))
    assert assignment(5, "paper") == assignment(5, "paper")

    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape[1:] == (1, SIZE, SIZE) and batch["image"].dtype == torch.float32
    assert batch["masks"].shape[1:] == (2, SIZE, SIZE) and batch["rater_mask"].dtype == torch.bool


def test_the_table_of_datasets() -> None:
    assert {n: (d.tasks, d.in_channels, d.volumetric) for n, d in DATASETS.items()} == {
        "brain-growth": (1, 1, False), "brain-tumor": (3, 4, False), "kidney": (1, 1, False),
        "prostate": (2, 1, False), "pancreas": (1, 1, True), "pancreatic-lesion": (1, 1, True)}


# ----------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"dataset": "liver"}, "unknown QUBIQ dataset 'liver'"),
    ({"dataset": "brain-tumor", "task": 4}, "task 4 is out of range for QUBIQ brain-tumor, which has tasks 1..3"),
    ({"dataset": "prostate", "task": 0}, "task 0 is out of range for QUBIQ prostate"),
    ({"image_size": 0}, "image_size must be positive"),
])
def test_bad_arguments_fail_at_construction(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        QUBIQDataModule(str(tmp_path), **kwargs)


def test_missing_root_and_release_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(f"QUBIQ root {tmp_path / 'nope'} does not exist")):
        _ = QUBIQDataModule(str(tmp_path / "nope")).arrays
    (tmp_path / "other").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no QUBIQ release folder .*found \['other'\]"):
        _ = QUBIQDataModule(str(tmp_path)).arrays


def test_missing_dataset_folder_lists_the_datasets_found(brain_growth: tuple[Path, dict]) -> None:
    root, _ = brain_growth
    with pytest.raises(FileNotFoundError, match=r"no QUBIQ dataset folder 'kidney'.*datasets found: "
                                                r"\{'training_data_v2': \['brain-growth'\]\}"):
        _ = QUBIQDataModule(str(root), "kidney").arrays


def _case(root: Path, name: str = "case02", dataset: str = "brain-growth") -> Path:
    return root / "training_data_v2" / dataset / "Training" / name


def _truncate_seg02(case: Path) -> None:
    """An interrupted copy: the header is complete, the voxels are not."""
    (case / "task01_seg02.nii.gz").unlink()
    save(case / "task01_seg02.nii", np.ones((H, W), np.float32))
    data = (case / "task01_seg02.nii").read_bytes()
    (case / "task01_seg02.nii").write_bytes(data[: len(data) - 100])


@pytest.mark.parametrize(("damage", "error", "message"), [
    (lambda c: (c / "image.nii.gz").unlink(), FileNotFoundError,
     r"case02: case case02 has no image file \(image.nii.gz or image.nii\); files present: \['task01_seg01"),
    (lambda c: [p.unlink() for p in c.glob("task01_*")], FileNotFoundError,
     r"case02: case case02 has no segmentation of task 1 .*files present: \['image.nii.gz'\]"),
    (lambda c: save(c / "task01_seg03.nii.gz", np.zeros((H, H), np.float32)), ValueError,
     r"task01_seg03.nii.gz: segmentation of shape \(20, 20\) does not match the image image.nii.gz of shape "
     r"\(20, 24\)"),
    (lambda c: (c / "image.nii.gz").write_bytes(b"not a nifti"), ValueError,
     r"case02/image.nii.gz: not a readable NIfTI file"),
    (_truncate_seg02, ValueError, r"case02/task01_seg02.nii: not a readable NIfTI file \(OSError: Expected"),
    (lambda c: save(c / "task01_seg04.nii", np.zeros((H, W), np.float32)), ValueError,
     r"case02: rater 4 of task 1 is stored twice \(task01_seg04.nii and task01_seg04.nii.gz\)"),
    (lambda c: save(c / "image.nii.gz", np.zeros((H, W, 3), np.float32)), ValueError,
     r"case02/image.nii.gz: image of shape \(20, 24, 3\); expected \(H, W\) or \(H, W, 1\) for QUBIQ brain-growth"),
    (lambda c: save(c / "image.nii.gz", np.full((H, W), np.nan, np.float32)), ValueError,
     r"case02/image.nii.gz: image holds NaN or Inf"),
])
def test_bad_case_files_are_named(brain_growth: tuple[Path, dict], damage, error: type, message: str) -> None:
    root, _ = brain_growth
    damage(_case(root))
    with pytest.raises(error, match=message):
        _ = QUBIQDataModule(str(root), "brain-growth").arrays


def test_missing_task_names_the_case_and_the_task(tmp_path: Path) -> None:
    make_2d(tmp_path, "prostate", {"case01": "Training", "case02": "Training"}, raters=6, tasks=2)
    for path in _case(tmp_path, "case02", "prostate").glob("task02_*"):
        path.unlink()
    QUBIQDataModule(str(tmp_path), "prostate", task=1).arrays  # task 1 is complete
    with pytest.raises(FileNotFoundError, match=r"case case02 has no segmentation of task 2 \(task02_segRR.nii\[.gz\]\)"
                                                r"; files present: \['image.nii.gz', 'task01_seg01.nii.gz'"):
        _ = QUBIQDataModule(str(tmp_path), "prostate", task=2).arrays


def test_brain_tumor_needs_four_channels(tmp_path: Path) -> None:
    make_2d(tmp_path, "brain-tumor", {"case01": "Training"}, raters=3, tasks=3, channels=4)
    save(_case(tmp_path, "case01", "brain-tumor") / "image.nii.gz", np.zeros((H, W, 3), np.float32))
    with pytest.raises(ValueError, match=r"image of shape \(20, 24, 3\); expected \(H, W, 4\) for QUBIQ brain-tumor"):
        _ = QUBIQDataModule(str(tmp_path), "brain-tumor").arrays


def test_volumes_without_annotation_and_folders_without_cases(tmp_path: Path) -> None:
    make_pancreas(tmp_path, num_cases=1)
    case = tmp_path / "training_data_v3/pancreas/Training/case01"
    for r in (1, 2):
        save(case / f"task01_seg{r:02d}.nii.gz", np.zeros((16, 16, 6), np.float32))
    with pytest.raises(ValueError, match=r"QUBIQ pancreas task 1 \(.*\): no slice of any case is annotated"):
        _ = QUBIQDataModule(str(tmp_path), "pancreas").arrays
    (tmp_path / "training_data_v3/pancreatic-lesion/Training").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"pancreatic-lesion/Training: holds no case folders"):
        _ = QUBIQDataModule(str(tmp_path), "pancreatic-lesion").arrays


# -------------------------------------------------------------------------------------------- CLI


def test_probseg_fit_on_qubiq_through_the_cli(tmp_path: Path) -> None:
    cases = {"case01": "Training", "case02": "Training", "case03": "Validation", "case04": "Validation"}
    make_2d(tmp_path / "qubiq", "brain-tumor", cases, raters=3, tasks=3, channels=4)
    config = {
        "model": {"class_path": "punet", "init_args": {"num_filters": [4, 8, 8], "convs_per_block": 1,
                                                       "latent_dim": 3, "fcomb_layers": 2, "in_channels": 4}},
        "data": {"class_path": "probseg.data.qubiq.QUBIQDataModule",
                 "init_args": {"root": str(tmp_path / "qubiq"), "dataset": "brain-tumor", "task": 2,
                               "image_size": SIZE, "fractions": [0.5, 0.25, 0.25], "batch_size": 2}},
        "trainer": {"default_root_dir": str(tmp_path / "run"), "max_steps": 2, "accelerator": "cpu", "devices": 1,
                    "enable_model_summary": False, "limit_val_batches": 1, "log_every_n_steps": 1},
    }
    path = tmp_path / "qubiq.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(path), "--wandb", "disabled"]) == 0
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint["global_step"] == 2
    assert checkpoint["datamodule_hyper_parameters"]["dataset"] == "brain-tumor"


def test_results_label_names_dataset_and_task(tmp_path: Path) -> None:
    """Results tables tell tasks apart (each task has its own oracle row)."""
    from probseg.callbacks.evaluation import dataset_name

    labels = {dataset_name(QUBIQDataModule(str(tmp_path), dataset="brain-tumor", task=t)) for t in (1, 2, 3)}
    assert labels == {"qubiq-brain-tumor-task1", "qubiq-brain-tumor-task2", "qubiq-brain-tumor-task3"}

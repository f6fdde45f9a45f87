"""QUBIQ: the MICCAI 2020/2021 challenge "Quantification of Uncertainties in Biomedical Image Quantification".

Every case is one folder holding ``image.nii[.gz]`` and one binary segmentation per rater and
task, ``taskTT_segRR.nii[.gz]`` (TT, RR = 01, 02, ...). :class:`QUBIQDataModule` reads the
release folders as unpacked under ``root``:

* 2020: ``training_data_v2/<dataset>/Training/caseNN/`` and, for the validation cases (which are
  labelled too), ``validation_data_v2/<dataset>/Validation/caseNN/``;
* 2021: ``training_data_v3/<dataset>/`` (or ``training_data_v3_QC``) with the case folders
  directly under ``<dataset>/`` or under a ``Training/`` (and ``Validation/``) level; a sibling
  ``validation_data_v3[_QC]`` folder is read like the 2020 one.

When several releases hold the dataset, the newest is read (``training_data_v3_QC``, then
``training_data_v3``, then ``training_data_v2``); the releases are never mixed.

========================  =====  ======  ========  ====================================
dataset                   tasks  raters  channels  image
========================  =====  ======  ========  ====================================
``brain-growth``          1      7       1         2D MR
``brain-tumor``           3      3       4         2D MR, (H, W, 4): 4 modalities
``kidney``                1      3       1         2D CT
``prostate``              2      6 (5)   1         2D MR (one case has 5 raters)
``pancreas``              1      2       1         3D CT (H, W, D), 2021
``pancreatic-lesion``     1      2       1         3D CT (H, W, D), 2021
========================  =====  ======  ========  ====================================

Conventions:

* 3D volumes are cut into 2D slices along the last axis and only the slices that at least one
  rater annotated (on the original grid) are kept; 2D images are all kept, annotated or not.
* Images are resampled to ``image_size`` x ``image_size`` (bilinear, antialiased; the aspect
  ratio is not kept), then normalized per image and channel to mean 0 and std 1 (an image of one
  constant value becomes zeros). Voxels are used in their stored order, without reorientation.
* Rater segmentations are binarized as ``value > 0`` (files hold 0/1, 0/255 or float 0/1; any
  other positive value also counts as foreground) and resampled by nearest neighbour. Rater
  slots follow the rater numbers RR found in the dataset; a case that lacks a rater gets a zero
  mask there and ``rater_mask`` False.
* Ids are ``<dataset>-caseNN`` (2D) or ``<dataset>-caseNN-zZZZ`` (slice ZZZ of a volume); the
  patient of an image is ``<dataset>-caseNN``, so splits never separate a volume's slices. When
  the same case name occurs in the training and the validation cases, every name carries its
  source: ``<dataset>-training-caseNN`` and ``<dataset>-validation-caseNN``.
* QUBIQ publishes no test labels, so there are no given splits: the labelled cases (training,
  plus validation with ``include_validation``) are pooled and split by patient, and
  ``split_mode="given"`` behaves like ``"random"``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from probseg.data.arrays import MultiRaterArrays, MultiRaterDataModule


@dataclass(frozen=True)
class QUBIQDataset:
    """What is fixed about one QUBIQ dataset.

    Attributes:
        tasks: number of segmentation tasks (numbered 1..tasks).
        in_channels: image channels (the last image axis when > 1).
        volumetric: images are 3D volumes (H, W, D), cut into 2D slices.
    """

    tasks: int
    in_channels: int = 1
    volumetric: bool = False


DATASETS: dict[str, QUBIQDataset] = {
    "brain-growth": QUBIQDataset(tasks=1),
    "brain-tumor": QUBIQDataset(tasks=3, in_channels=4),
    "kidney": QUBIQDataset(tasks=1),
    "prostate": QUBIQDataset(tasks=2),
    "pancreas": QUBIQDataset(tasks=1, volumetric=True),
    "pancreatic-lesion": QUBIQDataset(tasks=1, volumetric=True),
}

# Training release folders, newest first; each has a validation sibling named "validation_data_*".
RELEASES = ("training_data_v3_QC", "training_data_v3", "training_data_v2")
TRAINING, VALIDATION = "Training", "Validation"
_SPLIT_FOLDERS = {TRAINING, VALIDATION, "Test", "Testing"}
_IMAGE_NAMES = ("image.nii.gz", "image.nii")
_SEGMENTATION = re.compile(r"^task(\d+)_seg(\d+)\.nii(\.gz)?$", re.IGNORECASE)


@dataclass(frozen=True)
class _Case:
    split: str  # "training" or "validation"
    name: str  # case folder name, e.g. "case03"
    folder: Path


class QUBIQDataModule(MultiRaterDataModule):
    """QUBIQ multi-rater segmentations of one dataset and task, split by patient.

    See the module docstring for the folder layouts and the conventions (ids, normalization,
    binarization, slice filtering).

    Args:
        root: the folder holding the unpacked release folders (``training_data_v2`` ...).
        dataset: one of :data:`DATASETS`.
        task: the task, 1-based (``brain-tumor`` has 3, ``prostate`` 2, the others 1).
        image_size: images and masks are resampled to ``image_size`` x ``image_size``.
        include_validation: pool the (labelled) validation cases with the training cases.
        split_mode: "random" or "paper"; "given" behaves like "random" (no official test labels).
        seed: split seed.
        fractions: train, val, test patient fractions of "random".
        fold: validation fold of "paper".
        batch_size: images per batch.
        num_workers: data-loader worker processes.
        augmentation: training augmentation (see :class:`~probseg.data.base.ProbSegDataModule`).
        split_file: the JSON file of the split's image ids (default: ``splits.json`` in the run
            folder; see :mod:`probseg.data.arrays`).
    """

    def __init__(
        self,
        root: str,
        dataset: str = "brain-growth",
        task: int = 1,
        image_size: int = 128,
        include_validation: bool = True,
        split_mode: str = "random",
        seed: int = 0,
        fractions: Sequence[float] = (0.7, 0.1, 0.2),
        fold: int = 0,
        batch_size: int = 16,
        num_workers: int = 0,
        augmentation: bool | dict[str, Any] | None = None,
        split_file: str | None = None,
    ) -> None:
        if dataset not in DATASETS:
            raise ValueError(f"unknown QUBIQ dataset {dataset!r}; expected one of {sorted(DATASETS)}")
        spec = DATASETS[dataset]
        if not 1 <= task <= spec.tasks:
            raise ValueError(f"task {task} is out of range for QUBIQ {dataset}, which has tasks 1..{spec.tasks}")
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        super().__init__(split_mode=split_mode, seed=seed, fractions=fractions, fold=fold, crop=None,
                         batch_size=batch_size, num_workers=num_workers, num_classes=2,
                         in_channels=spec.in_channels, augmentation=augmentation, split_file=split_file)
        self.save_hyperparameters()
        self.root, self.qubiq_dataset, self.task = Path(root), dataset, task
        self.dataset_name = f"qubiq-{dataset}-task{task}"  # the label of results tables
        self.image_size, self.include_validation = image_size, include_validation
        self.spec = spec

    def dataset_folder(self) -> Path:
        """The ``<release>/<dataset>`` folder that is read (the newest release holding it)."""
        root, name = self.root, self.qubiq_dataset
        if not root.is_dir():
            raise FileNotFoundError(f"QUBIQ root {root} does not exist or is not a folder")
        releases = [root / r for r in RELEASES if (root / r).is_dir()]
        if not releases:
            found = sorted(p.name for p in root.iterdir())
            raise FileNotFoundError(f"{root}: holds no QUBIQ release folder (one of {list(RELEASES)}); found {found}")
        for release in releases:
            if (release / name).is_dir():
                return release / name
        found = {r.name: sorted(p.name for p in r.iterdir() if p.is_dir()) for r in releases}
        raise FileNotFoundError(f"{root}: no QUBIQ dataset folder {name!r} in {[r.name for r in releases]}; "
                                f"datasets found: {found}")

    def _case_folders(self, folder: Path) -> list[_Case]:
        """The training (and validation) cases of the dataset folder, in natural order."""
        sources = [("training", folder / TRAINING if (folder / TRAINING).is_dir() else folder)]
        if self.include_validation:
            sibling = folder.parent.parent / folder.parent.name.replace("training", "validation", 1) / folder.name
            for candidate in (folder / VALIDATION, sibling / VALIDATION, sibling):
                if candidate.is_dir():
                    sources.append(("validation", candidate))
                    break
        cases = []
        for split, source in sources:
            found = [p for p in source.iterdir()
                     if p.is_dir() and not p.name.startswith((".", "__")) and p.name not in _SPLIT_FOLDERS]
            if not found:
                raise FileNotFoundError(f"{source}: holds no case folders (expected caseNN/ with image.nii.gz)")
            cases += [_Case(split, p.name, p) for p in sorted(found, key=lambda p: _natural_key(p.name))]
        return cases

    def _segmentations(self, case: _Case) -> dict[int, Path]:
        """Rater number -> segmentation file of the requested task in ``case``."""
        files: dict[int, Path] = {}
        for path in sorted(case.folder.iterdir()):
            match = _SEGMENTATION.match(path.name)
            if match is None or int(match.group(1)) != self.task:
                continue
            rater = int(match.group(2))
            if rater in files:
                raise ValueError(f"{case.folder}: rater {rater} of task {self.task} is stored twice "
                                 f"({files[rater].name} and {path.name})")
            files[rater] = path
        if not files:
            present = sorted(p.name for p in case.folder.iterdir())
            raise FileNotFoundError(f"{case.folder}: case {case.name} has no segmentation of task {self.task} "
                                    f"(task{self.task:02d}_segRR.nii[.gz]); files present: {present}")
        return files

    def load_arrays(self) -> MultiRaterArrays:
        """Read, resample and normalize every case of the dataset and task (see the module docstring)."""
        folder = self.dataset_folder()
        cases = self._case_folders(folder)
        seg_files = [self._segmentations(case) for case in cases]
        # Rater slots by rater number, so a rater keeps its slot in every case.
        slot = {rater: i for i, rater in enumerate(sorted({r for files in seg_files for r in files}))}
        names = [case.name for case in cases]
        tagged = len(set(names)) < len(names)  # the same case name in training and validation
        images, masks, rater_masks, patients, ids = [], [], [], [], []
        for case, files in zip(cases, seg_files):
            patient = f"{self.qubiq_dataset}-{case.split}-{case.name}" if tagged else f"{self.qubiq_dataset}-{case.name}"
            image, segs = self._read_case(case, files)
            present = np.zeros(len(slot), dtype=bool)
            slots = [slot[r] for r in sorted(files)]  # the order of the rows of segs
            present[slots] = True
            full = np.zeros((len(image), len(slot), *image.shape[2:]), dtype=bool)
            full[:, slots] = segs
            if self.spec.volumetric:
                keep = np.flatnonzero(segs.any(axis=(1, 2, 3)))  # slices annotated by at least one rater
                image, full = image[keep], full[keep]
                ids += [f"{patient}-z{z:03d}" for z in keep]
            else:
                ids.append(patient)
            if len(image):
                image, full = _resize(image, full, self.image_size)
                images.append(_normalize(image))
                masks.append(full)
                rater_masks.append(np.repeat(present[None], len(image), axis=0))
                patients += [patient] * len(image)
        source = f"QUBIQ {self.qubiq_dataset} task {self.task} ({folder})"
        if not images:
            raise ValueError(f"{source}: no slice of any case is annotated")
        return MultiRaterArrays(
            images=np.concatenate(images),
            masks=np.concatenate(masks),
            rater_mask=np.concatenate(rater_masks),
            patients=patients,
            ids=ids,
            source=source,
        )

    def _read_case(self, case: _Case, files: dict[int, Path]) -> tuple[np.ndarray, np.ndarray]:
        """The case's images (N, C, H, W) float32 and binary masks (N, R_case, H, W), N = 1 or D."""
        image_path = next((case.folder / n for n in _IMAGE_NAMES if (case.folder / n).is_file()), None)
        if image_path is None:
            present = sorted(p.name for p in case.folder.iterdir())
            raise FileNotFoundError(f"{case.folder}: case {case.name} has no image file ({' or '.join(_IMAGE_NAMES)}); "
                                    f"files present: {present}")
        raw = _read_nifti(image_path)
        if raw.size == 0:
            raise ValueError(f"{image_path}: image of shape {raw.shape} holds no voxels")
        image = _drop_unit_axes(raw)
        channels = self.spec.in_channels
        if self.spec.volumetric:
            if image.ndim not in (2, 3):
                raise ValueError(f"{image_path}: image of shape {raw.shape}; expected a volume (H, W, D) "
                                 f"for QUBIQ {self.qubiq_dataset}")
            volume = image.reshape(*image.shape[:2], -1)  # (H, W, D)
            spatial = image.shape
            images = np.moveaxis(volume, -1, 0)[:, None]  # (D, 1, H, W)
        else:
            if not (image.ndim == 2 and channels == 1 or image.ndim == 3 and image.shape[2] == channels):
                expected = "(H, W) or (H, W, 1)" if channels == 1 else f"(H, W, {channels})"
                raise ValueError(f"{image_path}: image of shape {raw.shape}; expected {expected} "
                                 f"for QUBIQ {self.qubiq_dataset}")
            spatial = image.shape[:2]
            images = image.reshape(*spatial, channels).transpose(2, 0, 1)[None]  # (1, C, H, W)
        if not np.isfinite(images).all():
            raise ValueError(f"{image_path}: image holds NaN or Inf")
        segs = []
        for rater in sorted(files):
            seg_raw = _read_nifti(files[rater])
            seg = _drop_unit_axes(seg_raw)
            if seg.shape != spatial:
                raise ValueError(f"{files[rater]}: segmentation of shape {seg_raw.shape} does not match the image "
                                 f"{image_path.name} of shape {raw.shape} (spatial shape {spatial})")
            segs.append(seg > 0)  # NaN counts as background
        stacked = np.stack(segs)  # (R, H, W) or (R, H, W, D)
        if self.spec.volumetric:
            stacked = stacked.reshape(*stacked.shape[:3], -1).transpose(3, 0, 1, 2)  # (D, R, H, W)
        else:
            stacked = stacked[None]
        return np.ascontiguousarray(images, dtype=np.float32), stacked


def _natural_key(name: str) -> list[object]:
    """Sort key that puts case2 before case10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


_DEFLATE_MAX_RATIO = 1032
"""No gzip (deflate) stream expands by more than this factor: a bound on what a ``.nii.gz`` can hold."""


def _read_nifti(path: Path) -> np.ndarray:
    """The voxels of a NIfTI file as float32, with nibabel's errors naming the file.

    The header is checked before any voxel is read: a declared size above
    :data:`~probseg.data.arrays.MAX_MEMBER_BYTES` (as float32), or beyond what the file can hold,
    is refused unread.
    """
    import nibabel as nib  # heavy import kept out of module import

    from probseg.data.arrays import MAX_MEMBER_BYTES

    try:
        image = nib.load(str(path))
        shape = tuple(int(n) for n in image.header.get_data_shape())
        dtype = np.dtype(image.get_data_dtype())
        offset = int(getattr(image.dataobj, "offset", image.header.get_data_offset()))
    except Exception as err:  # ImageFileError, HeaderDataError, EOFError, zlib.error, OSError, ...
        raise ValueError(f"{path}: not a readable NIfTI file ({type(err).__name__}: {err})") from err
    count = 1
    for n in shape:
        count *= n
    if any(n < 0 for n in shape) or dtype.itemsize == 0:
        raise ValueError(f"{path}: NIfTI header declares shape {shape} of {dtype}, which no image has")
    if dtype.kind not in "biuf" or dtype.fields is not None:
        raise ValueError(f"{path}: NIfTI voxels of dtype {dtype}; expected real numbers (complex and RGB voxels "
                         "are not read)")
    stored, loaded = count * dtype.itemsize, count * max(dtype.itemsize, 4)
    if loaded > MAX_MEMBER_BYTES:
        raise ValueError(f"{path}: NIfTI header declares shape {shape} of {dtype} ({loaded} bytes as float32), above "
                         f"the limit of {MAX_MEMBER_BYTES} bytes (MAX_MEMBER_BYTES); refused unread")
    try:
        size = path.stat().st_size
        capacity = size * _DEFLATE_MAX_RATIO if path.name.lower().endswith(".gz") else size - offset
        if stored > capacity:  # refused before nibabel allocates the declared size
            raise OSError(f"Expected {stored} bytes of voxels (shape {shape} of {dtype}), more than the file can hold "
                          f"({size} bytes); truncated or corrupt")
        with np.errstate(over="raise"):
            return np.asarray(image.get_fdata(dtype=np.float32))
    except FloatingPointError as err:
        raise ValueError(f"{path}: NIfTI voxels beyond the float32 range ({err})") from err
    except Exception as err:  # EOFError, zlib.error, OSError, complex data, ...
        raise ValueError(f"{path}: not a readable NIfTI file ({type(err).__name__}: {err})") from err


def _drop_unit_axes(array: np.ndarray) -> np.ndarray:
    """Drop size-1 axes after the first two: (H, W, 1) -> (H, W), (H, W, 1, 4) -> (H, W, 4)."""
    return array.reshape(array.shape[:2] + tuple(n for n in array.shape[2:] if n != 1))


def _resize(images: np.ndarray, masks: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resample (N, C, H, W) images (bilinear) and (N, R, H, W) binary masks (nearest) to size x size."""
    if images.shape[-2:] == (size, size):
        return images, masks.astype(np.uint8)
    out = F.interpolate(torch.from_numpy(images), size=(size, size), mode="bilinear", align_corners=False,
                        antialias=True)  # antialiasing avoids aliasing when shrinking 512 px CT slices
    # "nearest-exact" samples at pixel centers, matching bilinear's grid ("nearest" is shifted).
    mask_out = F.interpolate(torch.from_numpy(masks.astype(np.float32)), size=(size, size), mode="nearest-exact")
    return out.numpy(), mask_out.numpy().astype(np.uint8)


def _normalize(images: np.ndarray) -> np.ndarray:
    """Per image and channel: subtract the mean, divide by the std (constant channels become zeros)."""
    mean = images.mean(axis=(2, 3), keepdims=True, dtype=np.float64)
    std = images.std(axis=(2, 3), keepdims=True, dtype=np.float64)
    # Resampling a constant image leaves float noise, which must not be blown up to unit variance.
    flat = std <= 1e-6 * np.maximum(1.0, np.abs(mean))
    return ((images - mean) / np.where(flat, np.inf, std)).astype(np.float32)

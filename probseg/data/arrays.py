"""Multi-rater data held as arrays, patient-level splits, and the data module of your own data.

Every real dataset loader reads its on-disk format into :class:`MultiRaterArrays` (images,
rater masks, which raters annotated each image, patient and image ids), validated once with errors
that name the source. :func:`split_by_patient` splits by patient, never by image, so no patient's
slices leak across splits:

* ``"random"``: patients shuffled with ``seed``, then cut by ``fractions`` (train, val, test);
* ``"paper"``: the cSAE paper's protocol: the first 20% of the patients (in order of first
  appearance) are the test set and the rest is cut into 3 folds (after a seeded shuffle);
  ``fold`` k is the validation set and the other two folds the training set;
* ``"phiseg"``: the split of PHiSeg's LIDC preprocessing, which MoSE and later LIDC papers
  reuse: the sorted unique CT series ids (the data's ``series``; its patients when it has none)
  are shuffled and cut 80/20 into train+val and test, then train+val is shuffled and cut 80/20
  into train and val, each cut drawn the way scikit-learn's ``train_test_split`` draws it
  (``numpy.random.RandomState(seed).permutation``, the first ceil(20%) are the held-out part).
  PHiSeg's code passes no seed, so its published split cannot be rebuilt; ``seed`` picks one;
* ``"mose"``: ``"phiseg"`` with seed 0, the seed MoSE's copy of that preprocessing fixes
  (``seed`` is ignored).

The two published splits cut by CT series, not by patient: a patient scanned twice can have
series on both sides of a cut (a leak the ``"random"`` and ``"paper"`` modes never make); a
warning counts such patients.

:class:`ArrayDataModule` serves your own data from one ``.npz`` file (see its docstring).

Splits saved with the run: a data module attached to a trainer writes the image ids of each
split to ``{default_root_dir}/splits.json`` (or ``split_file``) the first time it splits, and
reads them back from there afterwards, so a later ``probseg test`` on the same run folder
evaluates exactly the images the run held out, even if the data file's order changes. The file
records how the split was made (mode, seed, fold, fractions); a run that asks for another split
in the same folder is refused, naming the file.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from probseg.data.base import SPLITS, ProbSegDataModule

SPLIT_MODES = ("given", "random", "paper", "phiseg", "mose")
SPLIT_FILE = "splits.json"
"""The file of a run folder that holds the image ids of each split."""
PAPER_TEST_FRACTION = 0.2
PAPER_FOLDS = 3


@dataclass
class MultiRaterArrays:
    """Images and their rater masks.

    Attributes:
        images: (N, C, H, W) float32.
        masks: (N, R, H, W) integer class ids (uint8 keeps big sets small).
        rater_mask: (N, R) bool, True where the rater annotated the image.
        patients: N patient ids (splits never separate a patient's images).
        ids: N image ids, unique.
        series: N CT series ids (optional; the published LIDC splits cut by series, see
            :func:`split_by_patient`); None when the source does not record them.
        source: where the arrays came from, for error messages.
    """

    images: np.ndarray
    masks: np.ndarray
    rater_mask: np.ndarray | None = None
    patients: Sequence[str] | None = None
    ids: Sequence[str] | None = None
    source: str = "arrays"
    splits: dict[str, np.ndarray] = field(default_factory=dict)  # given splits: name -> indices
    series: Sequence[str] | None = None

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.rater_mask is None:
            self.rater_mask = np.ones(self.masks.shape[:2], dtype=bool)
        self.ids = [str(i) for i in (self.ids if self.ids is not None else range(n))]
        self.patients = [str(p) for p in (self.patients if self.patients is not None else self.ids)]
        if self.series is not None:
            self.series = [str(x) for x in self.series]

    def validate(self, num_classes: int = 2) -> MultiRaterArrays:
        """Check shapes, dtypes and values; errors name :attr:`source` and the first bad image."""
        src, images, masks = self.source, self.images, self.masks
        if images.ndim != 4:
            raise ValueError(f"{src}: images must be (N, C, H, W), got shape {images.shape}")
        if masks.ndim != 4:
            raise ValueError(f"{src}: masks must be (N, R, H, W), got shape {masks.shape}")
        if len(images) == 0:
            raise ValueError(f"{src}: no images")
        if masks.shape[0] != images.shape[0] or masks.shape[2:] != images.shape[2:]:
            raise ValueError(f"{src}: masks {masks.shape} do not match images {images.shape} (N and H, W must agree)")
        if self.rater_mask.shape != masks.shape[:2]:
            raise ValueError(f"{src}: rater_mask must be (N, R) = {masks.shape[:2]}, got {self.rater_mask.shape}")
        if len(self.patients) != len(images) or len(self.ids) != len(images):
            raise ValueError(f"{src}: need one patient id and one image id per image ({len(images)})")
        if self.series is not None and len(self.series) != len(images):
            raise ValueError(f"{src}: 'series' holds {len(self.series)} ids for {len(images)} images")
        if len(set(self.ids)) != len(self.ids):
            raise ValueError(f"{src}: image ids are not unique")
        if not np.issubdtype(masks.dtype, np.integer) and masks.dtype != bool:
            if not np.all(masks == np.round(masks)):
                raise ValueError(f"{src}: masks must hold integer class ids, got dtype {masks.dtype} with fractions")
        # Cheap global checks first; per-image temporaries only to name the culprit.
        if not np.isfinite(images.sum(dtype=np.float64)):
            finite = np.array([np.isfinite(im).all() for im in images])
            if not finite.all():  # (a huge but finite sum overflows without a bad value)
                raise ValueError(f"{src}: image {self.ids[int(np.argmin(finite))]} holds NaN or Inf")
        if masks.min() < 0 or masks.max() >= num_classes:
            bad = np.array([m.min() < 0 or m.max() >= num_classes for m in masks])
            i = int(np.argmax(bad))
            raise ValueError(
                f"{src}: masks of image {self.ids[i]} hold values {np.unique(masks[i]).tolist()}, outside the "
                f"class ids 0..{num_classes - 1}"
            )
        if not self.rater_mask.any(axis=1).all():
            i = int(np.argmin(self.rater_mask.any(axis=1)))
            raise ValueError(f"{src}: image {self.ids[i]} has no rater mask")
        return self


def split_by_patient(
    patients: Sequence[str],
    mode: str = "random",
    seed: int = 0,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    fold: int = 0,
    series: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Image indices of each split, with every patient's images in one split only (for
    "phiseg" and "mose": every CT series').

    Args:
        patients: patient id of each image.
        mode: "random", "paper", "phiseg" or "mose" (see the module docstring).
        seed: shuffling seed (same seed, same splits; "mose" always uses 0).
        fractions: train, val, test fractions of the patients ("random").
        fold: validation fold 0..2 ("paper").
        series: CT series id of each image ("phiseg", "mose"; default: the patients).

    Returns:
        ``{"train": indices, "val": indices, "test": indices}``, each sorted.
    """
    if mode in ("phiseg", "mose"):
        return _published_lidc_split(patients, series, 0 if mode == "mose" else seed)
    order = list(dict.fromkeys(patients))  # unique, in order of first appearance
    rng = np.random.default_rng(seed)
    if mode == "random":
        if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1):
            raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {fractions}")
        shuffled = [order[i] for i in rng.permutation(len(order))]
        n_train = int(round(fractions[0] * len(order)))
        n_val = int(round(fractions[1] * len(order)))
        groups = {"train": shuffled[:n_train], "val": shuffled[n_train : n_train + n_val],
                  "test": shuffled[n_train + n_val :]}
    elif mode == "paper":
        if not 0 <= fold < PAPER_FOLDS:
            raise ValueError(f"fold must be in 0..{PAPER_FOLDS - 1}, got {fold}")
        n_test = int(np.ceil(PAPER_TEST_FRACTION * len(order)))
        rest = order[n_test:]
        rest = [rest[i] for i in rng.permutation(len(rest))]
        folds = np.array_split(np.arange(len(rest)), PAPER_FOLDS)
        groups = {"test": order[:n_test], "val": [rest[i] for i in folds[fold]],
                  "train": [rest[i] for k in range(PAPER_FOLDS) if k != fold for i in folds[k]]}
    else:
        raise ValueError(f"unknown split mode {mode!r}; expected 'random', 'paper', 'phiseg' or 'mose'")
    member = {p: split for split, group in groups.items() for p in group}
    assignment = np.array([member[p] for p in patients])
    return {split: np.flatnonzero(assignment == split) for split in SPLITS}


PUBLISHED_HELD_OUT = 0.2
"""The held-out share of each of the two cuts of the PHiSeg / MoSE LIDC split."""


def _held_out_cut(units: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out) of ``units``: a RandomState(seed) permutation, whose first
    ceil(20%) are held out (the draw of scikit-learn's ``train_test_split(test_size=0.2)``)."""
    n_out = int(np.ceil(PUBLISHED_HELD_OUT * len(units)))
    order = np.random.RandomState(seed).permutation(len(units))
    return units[order[n_out:]], units[order[:n_out]]


def _published_lidc_split(patients: Sequence[str], series: Sequence[str] | None, seed: int) -> dict[str, np.ndarray]:
    """The PHiSeg / MoSE split (module docstring): two 80/20 cuts of the sorted series ids."""
    unit_of = np.asarray(list(series) if series is not None else list(patients), dtype=str)
    train_val, test = _held_out_cut(np.unique(unit_of), seed)
    train, val = _held_out_cut(train_val, seed)
    member = {u: name for name, group in (("train", train), ("val", val), ("test", test)) for u in group}
    assignment = np.array([member[u] for u in unit_of])
    split_of_patient: dict[str, set[str]] = {}
    for patient, name in zip(patients, assignment):
        split_of_patient.setdefault(str(patient), set()).add(str(name))
    leaking = sorted(p for p, names in split_of_patient.items() if len(names) > 1)
    if leaking:
        warnings.warn(f"the published LIDC split cuts by CT series: {len(leaking)} patient(s) have series in two "
                      f"splits, e.g. {leaking[:3]} (split_mode 'random' or 'paper' never separate a patient)",
                      stacklevel=3)
    return {name: np.flatnonzero(assignment == name) for name in SPLITS}


def write_split_file(path: str | os.PathLike, ids: Sequence[str], splits: dict[str, np.ndarray],
                     recipe: dict[str, Any]) -> Path:
    """Write the image ids of each split and how the split was made (``recipe``) as JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {"recipe": recipe, **{split: [ids[i] for i in splits[split]] for split in SPLITS}}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(content, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_split_file(path: str | os.PathLike, ids: Sequence[str], recipe: dict[str, Any] | None = None
                    ) -> dict[str, np.ndarray]:
    """The split indices of ``ids`` named by a file of :func:`write_split_file`.

    Raises a ValueError naming the file when its recipe differs from ``recipe`` (another split was
    asked for), when it names an image the data does not hold, or when an image is in two splits.
    """
    path = Path(path)
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable split file ({err})") from err
    if not isinstance(content, dict) or not all(isinstance(content.get(s), list) for s in SPLITS):
        raise ValueError(f"{path}: a split file holds a list of image ids for each of {SPLITS}")
    saved = content.get("recipe", {})
    if recipe is not None and saved and saved != recipe:
        changed = sorted(k for k in set(saved) | set(recipe) if saved.get(k) != recipe.get(k))
        raise ValueError(f"{path} holds the splits of {saved}; this run asks for {recipe} (differs in {changed}). "
                         "Use another run folder (default_root_dir) or split_file, or delete the file")
    position = {image: i for i, image in enumerate(ids)}
    out, seen = {}, set()
    for split in SPLITS:
        unknown = [image for image in content[split] if image not in position]
        if unknown:
            raise ValueError(f"{path}: the {split} split names images the data does not hold, e.g. {unknown[:3]} "
                             "(written for other data? use another run folder or split_file)")
        twice = seen.intersection(content[split])
        if twice:
            raise ValueError(f"{path}: images in two splits, e.g. {sorted(twice)[:3]}")
        seen.update(content[split])
        out[split] = np.sort(np.array([position[image] for image in content[split]], dtype=np.int64))
    return out


class ArrayDataset(Dataset):
    """Items of a :class:`MultiRaterArrays` subset, in the library's item format.

    Args:
        arrays: the data.
        indices: the images of this split (positions in ``arrays``).
        crop: optional (h, w) crop: random for training (``random_crop=True``), central otherwise.
        random_crop: draw the crop position per item from torch's RNG (which Lightning seeds).
    """

    def __init__(self, arrays: MultiRaterArrays, indices: Sequence[int], crop: tuple[int, int] | None = None,
                 random_crop: bool = False) -> None:
        self.arrays = arrays
        self.indices = np.asarray(indices, dtype=np.int64)
        self.crop = crop
        self.random_crop = random_crop
        if crop is not None and (crop[0] > arrays.images.shape[2] or crop[1] > arrays.images.shape[3]):
            raise ValueError(f"{arrays.source}: crop {crop} is larger than the images {arrays.images.shape[2:]}")

    def __len__(self) -> int:
        return len(self.indices)

    def _window(self, h: int, w: int) -> tuple[slice, slice]:
        ch, cw = self.crop
        if self.random_crop:
            top = int(torch.randint(h - ch + 1, ()).item())
            left = int(torch.randint(w - cw + 1, ()).item())
        else:
            top, left = (h - ch) // 2, (w - cw) // 2
        return slice(top, top + ch), slice(left, left + cw)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self.indices):
            raise IndexError(f"index {index} is out of range for {len(self.indices)} images")
        i = int(self.indices[index])
        a = self.arrays
        image, masks = a.images[i], a.masks[i]
        if self.crop is not None:
            rows, cols = self._window(*image.shape[1:])
            image, masks = image[:, rows, cols], masks[:, rows, cols]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "masks": torch.from_numpy(np.ascontiguousarray(masks).astype(np.int64)),
            "rater_mask": torch.from_numpy(a.rater_mask[i].copy()),
            "id": a.ids[i],
            "index": index,
        }


class MultiRaterDataModule(ProbSegDataModule):
    """Base of the array-backed data modules: load once, validate, split by patient.

    Subclasses implement :meth:`load_arrays`. Formats that ship their own splits put them in
    ``MultiRaterArrays.splits`` and ``split_mode="given"`` uses them.

    Args:
        split_mode: "given" (the format's own splits), "random", "paper", "phiseg" or "mose"
            (see the module docstring); "given" falls back to "random" for formats without splits.
        seed: split seed ("mose" always uses 0).
        fractions: train, val, test patient fractions of "random".
        fold: validation fold of "paper".
        crop: (h, w) crop size (random for training, central for evaluation), or None.
        batch_size, num_workers, num_classes, in_channels, augmentation: see
            :class:`ProbSegDataModule`.
        split_file: the JSON file of the split's image ids (see the module docstring); default:
            ``splits.json`` in the trainer's ``default_root_dir`` when a trainer is attached.
    """

    def __init__(self, split_mode: str = "given", seed: int = 0, fractions: Sequence[float] = (0.7, 0.1, 0.2),
                 fold: int = 0, crop: Sequence[int] | None = None, batch_size: int = 16, num_workers: int = 0,
                 num_classes: int = 2, in_channels: int = 1, augmentation: bool | dict[str, Any] | None = None,
                 split_file: str | None = None) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, num_classes=num_classes,
                         in_channels=in_channels, augmentation=augmentation)
        if split_mode not in SPLIT_MODES:
            raise ValueError(f"unknown split_mode {split_mode!r}; expected one of {SPLIT_MODES}")
        self.split_mode, self.seed, self.fractions, self.fold = split_mode, seed, tuple(fractions), fold
        self.split_file = split_file
        self.crop = None if crop is None else (int(crop[0]), int(crop[-1]))
        self._arrays: MultiRaterArrays | None = None
        self._splits: dict[str, np.ndarray] | None = None

    def load_arrays(self) -> MultiRaterArrays:
        """Read the data from disk (called once)."""
        raise NotImplementedError

    @property
    def arrays(self) -> MultiRaterArrays:
        """The whole data set, loaded and validated on first use."""
        if self._arrays is None:
            arrays = self.load_arrays().validate(self.num_classes)
            if arrays.images.shape[1] != self.in_channels:
                raise ValueError(f"{arrays.source}: images have {arrays.images.shape[1]} channels, the data module "
                                 f"was configured with in_channels={self.in_channels}")
            self._arrays = arrays
        return self._arrays

    def split_recipe(self) -> dict[str, Any]:
        """How this module splits: what a saved split file must match."""
        recipe: dict[str, Any] = {"split_mode": self.split_mode, "seed": self.seed, "fold": self.fold}
        if self.split_mode != "paper":
            recipe["fractions"] = list(self.fractions)
        return recipe

    def split_path(self) -> Path | None:
        """The split file of this run: ``split_file``, else the attached trainer's run folder's."""
        if self.split_file is not None:
            return Path(self.split_file)
        trainer = getattr(self, "trainer", None)
        return Path(trainer.default_root_dir) / SPLIT_FILE if trainer is not None else None

    def split_indices(self) -> dict[str, np.ndarray]:
        """Image indices of each split (read from the run's split file when it exists)."""
        if self._splits is None:
            arrays = self.arrays
            path = self.split_path()
            if path is not None and path.is_file():
                self._splits = read_split_file(path, arrays.ids, self.split_recipe())
                return self._splits
            if self.split_mode == "given" and arrays.splits:
                self._splits = {s: np.asarray(arrays.splits.get(s, []), dtype=np.int64) for s in SPLITS}
            else:
                mode = "random" if self.split_mode == "given" else self.split_mode
                self._splits = split_by_patient(arrays.patients, mode, self.seed, self.fractions, self.fold,
                                                series=arrays.series)
            trainer = getattr(self, "trainer", None)
            if path is not None and (trainer is None or trainer.is_global_zero):
                write_split_file(path, arrays.ids, self._splits, self.split_recipe())
        return self._splits

    def make_dataset(self, split: str) -> ArrayDataset:
        indices = self.split_indices()[split]
        if len(indices) == 0:
            raise ValueError(f"{self.arrays.source}: the {split} split is empty (split_mode={self.split_mode!r})")
        return ArrayDataset(self.arrays, indices, self.crop, random_crop=split == "train" and self.crop is not None)


class ArrayDataModule(MultiRaterDataModule):
    """Your own multi-rater data from one ``.npz`` file, no loader to write.

    The file (``numpy.savez``; read without pickle) holds:

    * ``images``: (N, C, H, W) float;
    * ``masks``: (N, R, H, W) integer class ids (0 = background);
    * optional ``rater_mask``: (N, R) bool, False where rater r did not annotate image n (its
      mask slot is ignored);
    * optional ``patients``: (N,) strings or integers; images of a patient stay in one split
      (default: every image is its own patient);
    * optional ``ids``: (N,) unique strings;
    * optional ``split``: (N,) strings "train" / "val" / "test" (used by ``split_mode="given"``);
    * optional ``series``: (N,) CT series ids (used by ``split_mode="phiseg"`` and ``"mose"``).

    Args:
        path: the ``.npz`` file.
        (other arguments as in :class:`MultiRaterDataModule`)
    """

    def __init__(self, path: str, split_mode: str = "given", seed: int = 0,
                 fractions: Sequence[float] = (0.7, 0.1, 0.2), fold: int = 0, crop: Sequence[int] | None = None,
                 batch_size: int = 16, num_workers: int = 0, num_classes: int = 2, in_channels: int = 1,
                 augmentation: bool | dict[str, Any] | None = None, split_file: str | None = None) -> None:
        super().__init__(split_mode, seed, fractions, fold, crop, batch_size, num_workers, num_classes, in_channels,
                         augmentation, split_file)
        self.save_hyperparameters()
        self.path = path

    def load_arrays(self) -> MultiRaterArrays:
        return load_npz(self.path)


MAX_MEMBER_BYTES = 8 << 30
"""The most bytes one array of an ``.npz`` may declare (its shape times its item size, 8 GiB):
:func:`load_npz` reads each member's ``.npy`` header first and refuses a larger one before
allocating anything, as it refuses one that declares more bytes than the member holds."""

_NPZ_KINDS = {
    "images": ("biuf", "real numbers"),
    "masks": ("biuf", "integer class ids"),
    "rater_mask": ("biuf", "booleans"),
    "patients": ("USbiuf", "strings or integers"),
    "ids": ("USbiuf", "strings or integers"),
    "series": ("USbiuf", "strings or integers"),
    "split": ("US", "strings"),
}
"""The arrays :func:`load_npz` reads (other members are ignored, never read) and the dtype kinds
each may have."""
_READ_CHUNK = 64 << 20
_DEFLATE_MAX_RATIO = 1032
"""No deflate stream expands by more than this factor."""


def _npz_error(path: Path, key: str, what: str) -> ValueError:
    return ValueError(f"{path}: {key!r} {what}")


def _read_npz_member(path: Path, archive: Any, info: Any, key: str) -> np.ndarray:
    """One ``.npy`` member of an open zip, its header checked before any allocation."""
    import zipfile

    from probseg.io import npy_header

    kinds, wanted = _NPZ_KINDS[key]
    with archive.open(info) as handle:
        try:
            shape, fortran, dtype = npy_header(handle)
            header_end = handle.tell()
        except Exception as err:  # bad magic, version or header; zip errors
            raise _npz_error(path, key, f"is not a readable .npy array ({type(err).__name__}: {err})") from err
        if dtype.hasobject:
            raise ValueError(f"{path}: holds pickled objects, which are never loaded (in {key!r}; executing them "
                             "could run code); store ids and patients as string arrays")
        if dtype.kind not in kinds or dtype.fields is not None or dtype.subdtype is not None:
            raise _npz_error(path, key, f"has dtype {dtype}; expected {wanted}")
        if any(int(n) < 0 for n in shape):
            raise _npz_error(path, key, f"declares the invalid shape {shape}")
        if dtype.itemsize == 0:
            raise _npz_error(path, key, f"has the zero-width dtype {dtype}")
        count = 1
        for n in shape:
            count *= int(n)
        declared = count * dtype.itemsize
        if declared > MAX_MEMBER_BYTES:
            raise _npz_error(path, key, f"declares shape {shape} of {dtype} ({declared} bytes), above the limit of "
                                        f"{MAX_MEMBER_BYTES} bytes per array (MAX_MEMBER_BYTES); refused unread")
        # What the member can hold: its uncompressed size as the zip records it, which a stored member's
        # bytes and a deflated member's (at most _DEFLATE_MAX_RATIO times its compressed bytes) also bound.
        ratio = {zipfile.ZIP_STORED: 1, zipfile.ZIP_DEFLATED: _DEFLATE_MAX_RATIO}.get(info.compress_type)
        capacity = info.file_size if ratio is None else min(info.file_size, info.compress_size * ratio)
        available = capacity - header_end
        if declared > available:
            raise _npz_error(path, key, f"declares shape {shape} of {dtype} ({declared} bytes) but the member holds "
                                        f"{max(available, 0)} bytes of data (truncated or corrupt)")
        buffer = bytearray(declared)
        view, done = memoryview(buffer), 0
        try:
            while done < declared:
                chunk = handle.read(min(_READ_CHUNK, declared - done))
                if not chunk:
                    break
                view[done : done + len(chunk)] = chunk
                done += len(chunk)
        except Exception as err:  # BadZipFile (CRC), zlib.error, EOFError, OSError, ...
            raise _npz_error(path, key, f"cannot be read ({type(err).__name__}: {err})") from err
        if done < declared:
            raise _npz_error(path, key, f"holds {done} of the {declared} bytes its shape {shape} declares (truncated)")
    array = np.frombuffer(buffer, dtype=dtype, count=count)
    return array.reshape(shape, order="F" if fortran else "C")


def _npz_strings(path: Path, key: str, array: np.ndarray, length: int | None = None) -> list[str]:
    """A 1-D id array as strings (bytes decoded as UTF-8), with errors naming the file and the key."""
    if array.ndim != 1:
        raise _npz_error(path, key, f"must be 1-D (one entry per image), got shape {array.shape}")
    if length is not None and len(array) != length:
        raise _npz_error(path, key, f"holds {len(array)} entries for {length} images")
    try:
        if array.dtype.kind == "S":
            return [item.decode("utf-8") for item in array.tolist()]
        return [str(item) for item in array.tolist()]
    except (UnicodeError, ValueError, OverflowError) as err:
        raise _npz_error(path, key, f"holds entries that are not text ({type(err).__name__}: {err})") from err


def _to_float32(source: str | os.PathLike, key: str, array: np.ndarray) -> np.ndarray:
    """Real image values as float32; a finite value beyond the float32 range is an error naming
    ``source`` and ``key`` (it would become Inf). NaN and Inf are left to :meth:`MultiRaterArrays.validate`."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = array.astype(np.float32)
    if array.dtype.kind == "f" and array.dtype.itemsize > 4:
        finite = np.isfinite(out)
        if not finite.all() and np.isfinite(array[~finite]).any():
            raise ValueError(f"{source}: {key!r} holds values beyond the float32 range (dtype {array.dtype})")
    return out


def load_npz(path: str | os.PathLike) -> MultiRaterArrays:
    """Read a multi-rater ``.npz`` (the :class:`ArrayDataModule` format) without unpickling.

    Only the known arrays are read; each member's ``.npy`` header is checked first (dtype, and a
    declared size within :data:`MAX_MEMBER_BYTES` and within the member's bytes). Every error is
    a ValueError (KeyError for missing arrays) that starts with the file and names the array.
    """
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a readable .npz file (an .npz is a zip archive of .npy arrays)")
    try:
        archive = zipfile.ZipFile(path)
    except Exception as err:  # BadZipFile, OSError, NotImplementedError, ...
        raise ValueError(f"{path}: not a readable .npz file ({type(err).__name__}: {err})") from err
    content: dict[str, np.ndarray] = {}
    with archive:
        members: dict[str, Any] = {}
        for info in archive.infolist():
            key = info.filename[: -len(".npy")] if info.filename.endswith(".npy") else info.filename
            if key in members:
                raise ValueError(f"{path}: holds the array {key!r} twice")
            members[key] = info
        missing = [k for k in ("images", "masks") if k not in members]
        if missing:
            raise KeyError(f"{path}: missing arrays {missing}; found {sorted(members)}")
        for key in _NPZ_KINDS:
            if key in members:
                try:
                    content[key] = _read_npz_member(path, archive, members[key], key)
                except ValueError:
                    raise
                except Exception as err:  # BadZipFile, NotImplementedError (compression), RuntimeError (password)
                    raise _npz_error(path, key, f"cannot be read ({type(err).__name__}: {err})") from err
    for key in ("images", "masks"):
        shape = content[key].shape
        if len(shape) != 4:
            layout = "(N, C, H, W)" if key == "images" else "(N, R, H, W)"
            raise _npz_error(path, key, f"must be {layout}, got shape {shape}")
        if 0 in shape:
            raise _npz_error(path, key, f"has shape {shape}, with an empty axis")
    n = len(content["images"])
    images = _to_float32(path, "images", content["images"])
    splits = {}
    if "split" in content:
        split = np.asarray(_npz_strings(path, "split", content["split"], n), dtype=str)
        unknown = sorted(set(split.tolist()) - set(SPLITS))
        if unknown:
            raise ValueError(f"{path}: 'split' holds {unknown}; expected values in {SPLITS}")
        splits = {s: np.flatnonzero(split == s) for s in SPLITS}
    return MultiRaterArrays(
        images=images,
        masks=content["masks"],
        rater_mask=content["rater_mask"].astype(bool) if "rater_mask" in content else None,
        patients=_npz_strings(path, "patients", content["patients"]) if "patients" in content else None,
        ids=_npz_strings(path, "ids", content["ids"]) if "ids" in content else None,
        source=str(path),
        splits=splits,
        series=_npz_strings(path, "series", content["series"]) if "series" in content else None,
    )


def save_npz(path: str | os.PathLike, arrays: MultiRaterArrays, split: Sequence[str] | None = None) -> Path:
    """Write ``arrays`` in the :class:`ArrayDataModule` format (strings as unicode arrays, no pickle)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {} if split is None else {"split": np.asarray(split, dtype=str)}
    if arrays.series is not None:
        extra["series"] = np.asarray(arrays.series, dtype=str)
    np.savez(path, images=arrays.images, masks=arrays.masks, rater_mask=arrays.rater_mask,
             patients=np.asarray(arrays.patients, dtype=str), ids=np.asarray(arrays.ids, dtype=str), **extra)
    return path

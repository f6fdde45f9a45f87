"""LIDC-IDRI: 128x128 CT crops around lung nodules, four raters each, in the formats people share.

``LIDCDataModule(root, format=...)`` reads:

* ``"npz"`` (default): the safe array file written by ``probseg convert lidc-pickle`` (or any
  file in the :class:`~probseg.data.arrays.ArrayDataModule` format);
* ``"pickle"``: ``data_lidc.pickle`` of the PyTorch PU-Net port, one or more ``*.pickle`` files
  (a folder: every ``*.pickle`` in it, all trusted by the one ``allow_pickle``),
  each a dict ``key -> {"image": (128, 128) float in [0, 1], "masks": 4 binary (128, 128)
  arrays, "series_uid": str}``. Unpickling executes code from the file, so it needs an explicit
  ``allow_pickle=True``; convert once and read the ``.npz`` instead. Files above 2 GiB are read
  in chunks (a single ``read`` of more than 2 GiB fails on some platforms);
* ``"hdf5"``: the PHiSeg file, groups ``train`` / ``val`` / ``test`` holding ``images``
  (N, 128, 128), ``labels`` (N, 128, 128, 4) and ``uids`` (N,) (needs ``h5py``:
  ``pip install 'probseg[hdf5]'``);
* ``"png"``: the DeepMind crops, ``<split>/images/<patient>/z-<Z>_c<k>.png`` and
  ``<split>/gt/<patient>/z-<Z>_c<k>_l<r>.png`` with raters r in 0..3 (or 1..4), 180x180: cropped
  to 128x128, at random for training and centrally for evaluation.

The patient is the ``LIDC-IDRI-NNNN`` prefix of the pickle keys (else the series uid), the HDF5
``uids``, or the patient folder (png); splits never separate a patient's slices. ``split_mode="given"`` keeps the splits of hdf5 and png files; ``"random"``
and ``"paper"`` (first 20% of the patients as test, 3-fold cross-validation on the rest, ``fold``)
split by patient with ``seed``; ``"phiseg"`` and ``"mose"`` rebuild the published PHiSeg / MoSE
split by CT series (:mod:`probseg.data.arrays`): the pickle records each slice's series uid
(kept by ``probseg convert`` as the ``.npz``'s ``series``). PHiSeg's HDF5 file already holds the
split it was written with (``"given"``).
"""

from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from probseg.data.arrays import MultiRaterArrays, MultiRaterDataModule, load_npz, save_npz

FORMATS = ("npz", "pickle", "hdf5", "png")
NUM_RATERS = 4
_CHUNK = 1 << 30  # bytes per read: below the 2 GiB limit of a single read on some platforms
_PNG_IMAGE = re.compile(r"^z-(?P<z>-?[\d.]+)_c(?P<c>\d+)\.png$")
_PNG_LABEL = re.compile(r"^z-(?P<z>-?[\d.]+)_c(?P<c>\d+)_l(?P<r>\d+)\.png$")
_PATIENT_KEY = re.compile(r"^(LIDC-IDRI-\d{4})")


class _ChunkedReader(io.RawIOBase):
    """A binary file whose reads never ask the OS for more than 1 GiB at once."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        total = 0
        while total < len(view):
            n = self.handle.readinto(view[total : total + _CHUNK])
            if not n:
                break
            total += n
        return total


def _files(root: Path, suffixes: tuple[str, ...], what: str) -> list[Path]:
    if not root.exists():
        raise FileNotFoundError(f"LIDC root not found: {root}")
    if root.is_file():
        return [root]
    found = sorted(p for p in root.iterdir() if p.suffix in suffixes)
    if not found:
        raise FileNotFoundError(f"no {what} files ({', '.join(suffixes)}) in {root}")
    return found


def read_lidc_pickle(paths: Sequence[str | os.PathLike], allow_pickle: bool = False) -> MultiRaterArrays:
    """Read ``data_lidc.pickle`` file(s) (see the module docstring).

    Args:
        paths: pickle files (a folder: its ``*.pickle`` files).
        allow_pickle: must be True: unpickling runs code from the file; only read files you trust.
    """
    files = [f for p in paths for f in _files(Path(p), (".pickle", ".pkl"), "pickle")]
    if not allow_pickle:
        raise PermissionError(
            f"{files[0]}: reading a pickle executes code from the file. Pass allow_pickle=True for files you "
            "trust, or convert once with `probseg convert lidc-pickle IN OUT.npz` and read the .npz (format 'npz')"
        )
    images, masks, patients, ids, series = [], [], [], [], []
    for path in files:
        with open(path, "rb") as handle:
            try:
                data = pickle.load(io.BufferedReader(_ChunkedReader(handle), buffer_size=1 << 20))
            except Exception as err:
                raise ValueError(f"{path}: not a readable pickle ({type(err).__name__}: {err})") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a dict key -> {{'image', 'masks', 'series_uid'}}, got {type(data).__name__}")
        for key, item in data.items():
            missing = [k for k in ("image", "masks", "series_uid") if not isinstance(item, dict) or k not in item]
            if missing:
                raise ValueError(f"{path}: entry {key!r} lacks {missing}")
            image = np.asarray(item["image"], dtype=np.float32)
            rater = np.stack([np.asarray(m) for m in item["masks"]])
            if rater.shape[1:] != image.shape:
                raise ValueError(f"{path}: entry {key!r} has masks of shape {rater.shape[1:]}, image {image.shape}")
            if not np.isin(rater, (0, 1)).all():
                raise ValueError(f"{path}: entry {key!r} has non-binary masks (values {np.unique(rater)[:5].tolist()})")
            if images and image.shape != images[0].shape[1:]:
                raise ValueError(f"{path}: entry {key!r} has an image of shape {image.shape}, the first entry "
                                 f"{images[0].shape[1:]}")
            if rater.shape[0] != NUM_RATERS:
                raise ValueError(f"{path}: entry {key!r} has {rater.shape[0]} masks, expected {NUM_RATERS}")
            images.append(image[None])
            masks.append(rater.astype(np.uint8))
            # A patient can have several CT series: group by the patient id the keys start with
            # ("LIDC-IDRI-0001_..."), else by the series uid.
            match = _PATIENT_KEY.match(str(key))
            patients.append(match.group(1) if match else str(item["series_uid"]))
            series.append(str(item["series_uid"]))
            ids.append(str(key))
    if not images:
        raise ValueError(f"{files[0]}: no entries")
    return MultiRaterArrays(np.stack(images), np.stack(masks), patients=patients, ids=ids, source=str(files[0]),
                            series=series)


def convert_lidc_pickle(inputs: Sequence[str | os.PathLike], output: str | os.PathLike) -> Path:
    """Convert trusted ``data_lidc.pickle`` file(s) to the safe ``.npz`` format the loader reads."""
    arrays = read_lidc_pickle(inputs, allow_pickle=True)
    return save_npz(output, arrays)


def _hdf5_call(path: Path, where: str, call: Any) -> Any:
    """``call()``, with h5py's errors on a damaged file (OSError, KeyError, RuntimeError, ...) as a
    ValueError naming the file and the object."""
    try:
        return call()
    except Exception as err:
        raise ValueError(f"{path}: {where} cannot be read ({type(err).__name__}: {err})") from err


def _hdf5_array(path: Path, group: Any, where: str, key: str, kinds: str, wanted: str) -> np.ndarray:
    """Dataset ``key`` of ``group`` as an array, its type and declared size checked before reading."""
    import h5py

    from probseg.data.arrays import MAX_MEMBER_BYTES

    name = f"{where}/{key}"
    obj = _hdf5_call(path, name, lambda: group[key])
    if not isinstance(obj, h5py.Dataset):
        raise ValueError(f"{path}: {name} is not an array ({type(obj).__name__})")
    dtype, shape = _hdf5_call(path, name, lambda: (obj.dtype, obj.shape))
    if shape is None:
        raise ValueError(f"{path}: {name} is an empty (null) dataset")
    kind = "S" if h5py.check_string_dtype(dtype) is not None else dtype.kind
    if kind not in kinds or dtype.fields is not None or dtype.subdtype is not None:
        raise ValueError(f"{path}: {name} has dtype {dtype}; expected {wanted}")
    count = 1
    for n in shape:
        count *= int(n)
    declared = count * max(dtype.itemsize, 1)
    if declared > MAX_MEMBER_BYTES:
        raise ValueError(f"{path}: {name} declares shape {shape} of {dtype} ({declared} bytes), above the limit of "
                         f"{MAX_MEMBER_BYTES} bytes per array (MAX_MEMBER_BYTES); refused unread")
    return np.asarray(_hdf5_call(path, name, lambda: obj[()]))


def _hdf5_uids(path: Path, name: str, uids: np.ndarray, count: int) -> list[str]:
    if uids.ndim != 1 or len(uids) != count:
        raise ValueError(f"{path}: {name} must hold one id per image ({count}), got shape {uids.shape}")
    try:
        return [u.decode("utf-8") if isinstance(u, bytes) else str(u) for u in uids.tolist()]
    except UnicodeError as err:
        raise ValueError(f"{path}: {name} holds ids that are not UTF-8 text ({err})") from err


def read_lidc_hdf5(path: str | os.PathLike) -> MultiRaterArrays:
    """Read a PHiSeg-style LIDC HDF5 file; its train/val/test groups become the given splits.

    Each dataset's type and declared size are checked before it is read (at most
    :data:`~probseg.data.arrays.MAX_MEMBER_BYTES` each); every error names the file and the
    dataset (``group/key``).
    """
    try:
        import h5py
    except ImportError as err:
        raise ImportError("format 'hdf5' needs h5py: pip install 'probseg[hdf5]'") from err
    from probseg.data.arrays import _to_float32

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LIDC HDF5 file not found: {path}")
    images, masks, patients, splits = [], [], [], {}
    try:
        handle = h5py.File(path, "r")
    except Exception as err:  # OSError, and others on a damaged superblock
        raise ValueError(f"{path}: not a readable HDF5 file ({type(err).__name__}: {err})") from err
    with handle:
        groups = _hdf5_call(path, "the root group", lambda: [g for g in ("train", "val", "test") if g in handle])
        if not groups:
            found = _hdf5_call(path, "the root group", lambda: sorted(handle))
            raise KeyError(f"{path}: no train/val/test groups; found {found}")
        count = 0
        for group in groups:
            g = _hdf5_call(path, f"group {group!r}", lambda: handle[group])
            if not isinstance(g, h5py.Group):
                raise ValueError(f"{path}: {group!r} is not a group ({type(g).__name__})")
            missing = _hdf5_call(path, f"group {group!r}", lambda: [k for k in ("images", "labels", "uids")
                                                                   if k not in g])
            if missing:
                raise KeyError(f"{path}: group {group!r} lacks {missing}")
            raw = _hdf5_array(path, g, group, "images", "biuf", "real numbers")
            label = _hdf5_array(path, g, group, "labels", "biuf", "binary rater masks")
            if raw.ndim != 3 or 0 in raw.shape[1:]:
                raise ValueError(f"{path}: {group}/images must be (N, H, W) with H, W > 0, got shape {raw.shape}")
            image = _to_float32(path, f"{group}/images", raw)
            if label.ndim != 4 or label.shape[:3] != image.shape or label.shape[3] == 0:
                raise ValueError(f"{path}: {group}/labels {label.shape} must be (N, H, W, R) matching images {image.shape}")
            if not np.isin(label, (0, 1)).all():
                raise ValueError(f"{path}: {group}/labels are not binary (values {np.unique(label)[:5].tolist()})")
            uids = _hdf5_uids(path, f"{group}/uids", _hdf5_array(path, g, group, "uids", "SUiu", "strings"),
                              len(image))
            images.append(image[:, None])
            masks.append(np.moveaxis(label, -1, 1).astype(np.uint8))
            patients += uids
            splits[group] = np.arange(count, count + len(image))
            count += len(image)
    ids = [f"{p}-{i:05d}" for i, p in enumerate(patients)]
    return MultiRaterArrays(np.concatenate(images), np.concatenate(masks), patients=patients, ids=ids,
                            source=str(path), splits=splits)


def _read_png(path: Path, binary: bool) -> np.ndarray:
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():  # above Pillow's MAX_IMAGE_PIXELS: refused before decoding
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit: convert("L") would saturate
                array, scale = np.asarray(img), 65535.0
            elif img.mode in ("L", "P", "RGB", "RGBA", "LA", "1"):
                array, scale = np.asarray(img.convert("L")), 255.0
            else:
                raise ValueError(f"unsupported PNG mode {img.mode!r}")
    except Exception as err:
        raise ValueError(f"{path}: not a readable PNG ({err})") from err
    if not binary:
        return array.astype(np.float32) / scale
    values = np.unique(array)
    if not (np.isin(values, (0, 1)).all() or np.isin(values, (0, int(scale))).all()):
        raise ValueError(f"{path}: rater mask is not binary (values {values[:5].tolist()})")
    return (array > 0).astype(np.uint8)


def read_lidc_png(root: str | os.PathLike) -> MultiRaterArrays:
    """Read the DeepMind LIDC crops (see the module docstring); split folders become given splits."""
    from tqdm.auto import tqdm

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"LIDC PNG root not found: {root}")
    split_dirs = [s for s in ("train", "val", "test") if (root / s).is_dir()]
    if not split_dirs:
        raise FileNotFoundError(f"{root}: no train/val/test folders")
    images, masks, patients, ids, splits = [], [], [], [], {}
    for split in split_dirs:
        image_dir, gt_dir = root / split / "images", root / split / "gt"
        for d in (image_dir, gt_dir):
            if not d.is_dir():
                raise FileNotFoundError(f"{d} is missing")
        start = len(images)
        files = sorted(image_dir.glob("*/*.png"))
        for path in tqdm(files, desc=f"LIDC png {split}", disable=None, leave=False):
            match = _PNG_IMAGE.match(path.name)
            if match is None:
                continue
            patient = path.parent.name
            labels = {}
            for label in (gt_dir / patient).glob(f"{path.stem}_l*.png"):
                m = _PNG_LABEL.match(label.name)
                if m is not None:
                    labels[int(m["r"])] = label
            raters = sorted(labels)
            if raters not in (list(range(NUM_RATERS)), list(range(1, NUM_RATERS + 1))):
                raise FileNotFoundError(
                    f"{path}: expected {NUM_RATERS} rater masks {gt_dir / patient / (path.stem + '_l<r>.png')} with r in "
                    f"0..3 or 1..4, found raters {raters}"
                )
            image = _read_png(path, binary=False)
            if images and image.shape != images[0].shape[1:]:
                raise ValueError(f"{path}: image of shape {image.shape}, the others are {images[0].shape[1:]}")
            rater = [_read_png(labels[r], binary=True) for r in raters]
            for r, mask in zip(raters, rater):
                if mask.shape != image.shape:
                    raise ValueError(f"{labels[r]}: mask shape {mask.shape} differs from the image {image.shape}")
            rater = np.stack(rater)
            images.append(image[None])
            masks.append(rater)
            patients.append(patient)
            ids.append(f"{split}/{patient}/{path.stem}")
        if len(images) == start:
            raise FileNotFoundError(f"{image_dir}: no z-<Z>_c<k>.png images")
        splits[split] = np.arange(start, len(images))
    return MultiRaterArrays(np.stack(images), np.stack(masks), patients=patients, ids=ids, source=str(root),
                            splits=splits)


class LIDCDataModule(MultiRaterDataModule):
    """LIDC-IDRI in any of :data:`FORMATS` (see the module docstring).

    Args:
        root: the file or folder of the chosen format.
        format: "npz" (default), "pickle", "hdf5" or "png".
        allow_pickle: required for ``format="pickle"`` (unpickling runs code from the file).
        crop: crop size; default 128 for "png" (its 180x180 crops), none otherwise.
        (other arguments as in :class:`~probseg.data.arrays.MultiRaterDataModule`)
    """

    dataset_name = "lidc"

    def __init__(self, root: str, format: str = "npz", allow_pickle: bool = False, split_mode: str = "given",
                 seed: int = 0, fractions: Sequence[float] = (0.7, 0.1, 0.2), fold: int = 0,
                 crop: Sequence[int] | None = None, batch_size: int = 32, num_workers: int = 0,
                 augmentation: bool | dict[str, Any] | None = None, split_file: str | None = None) -> None:
        if format not in FORMATS:
            raise ValueError(f"unknown LIDC format {format!r}; expected one of {FORMATS}")
        if crop is None and format == "png":
            crop = (128, 128)
        super().__init__(split_mode, seed, fractions, fold, crop, batch_size, num_workers, num_classes=2, in_channels=1,
                         augmentation=augmentation, split_file=split_file)
        self.save_hyperparameters()
        self.root, self.format, self.allow_pickle = root, format, allow_pickle

    def load_arrays(self) -> MultiRaterArrays:
        if self.format == "npz":
            files = _files(Path(self.root), (".npz",), "npz")
            if len(files) != 1:
                raise ValueError(f"{self.root}: holds {len(files)} .npz files; give the file itself")
            return load_npz(files[0])
        if self.format == "pickle":
            return read_lidc_pickle([self.root], self.allow_pickle)
        if self.format == "hdf5":
            return read_lidc_hdf5(self.root)
        return read_lidc_png(self.root)

"""Readers and writers of images and hypotheses, shared by ``probseg sample`` and the callbacks.

Readers: ``.npy`` (H, W), (C, H, W) or (H, W, C), used as stored; ``.png`` scaled to [0, 1]
(palette images become RGB, or grayscale when the palette is gray; the alpha channel is
dropped); ``.nii``/``.nii.gz`` (2D, or a 3D volume with a slice index), used as stored. Errors
name the file (:class:`InputError`).

Writers: for one image, ``<key>.npz`` (``samples``: (S, H, W) class ids; ``probabilities``:
(S, K, H, W) softmax of each hypothesis; ``mean`` and ``std``: (K, H, W) pixel-wise over the
hypotheses; ``image``; ``raters`` (R, H, W) when known) and ``<key>.png``, a grid of the image,
the raters, the hypotheses and the mean and std of the foreground probability.

numpy and torch are imported inside the functions that need them so that commands' ``-h`` stays
quick.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch


class InputError(ValueError):
    """An input image or a command-line setting cannot be used with the model."""


MAX_IMAGE_BYTES = 8 << 30
"""The most bytes an input file may declare for its pixels (shape times item size, as float32 for
NIfTI; 8 GiB, as :data:`probseg.data.arrays.MAX_MEMBER_BYTES`): a ``.npy`` or NIfTI header
declaring more, or more than the file can hold, is refused before anything is allocated."""
_DEFLATE_MAX_RATIO = 1032
"""No gzip (deflate) stream expands by more than this factor: a bound on what a ``.nii.gz`` can hold."""


def _check_declared(source: str, shape: tuple[int, ...], dtype: np.dtype, loaded_itemsize: int, capacity: int) -> None:
    """Refuse a header whose declared pixels exceed :data:`MAX_IMAGE_BYTES` or ``capacity`` bytes."""
    count = 1
    for n in shape:
        if int(n) < 0:
            raise InputError(f"{source}: could not read the file (its header declares the invalid shape {shape})")
        count *= int(n)
    loaded = count * max(dtype.itemsize, loaded_itemsize, 1)
    if loaded > MAX_IMAGE_BYTES:
        raise InputError(f"{source}: its header declares shape {shape} of {dtype} ({loaded} bytes), above the limit "
                         f"of {MAX_IMAGE_BYTES} bytes (MAX_IMAGE_BYTES); refused unread")
    if count * dtype.itemsize > capacity:
        raise InputError(f"{source}: could not read the file (its header declares shape {shape} of {dtype}, "
                         f"{count * dtype.itemsize} bytes, more than the file holds: truncated or corrupt)")


def npy_header(handle: Any) -> tuple[tuple[int, ...], bool, Any]:
    """(shape, fortran order, dtype) from the header of a ``.npy`` stream, which is left at the
    start of the data; a ValueError for anything that is not a .npy header of version 1 or 2."""
    from numpy.lib import format as npformat

    version = npformat.read_magic(handle)
    if version == (1, 0):
        return npformat.read_array_header_1_0(handle)
    if version == (2, 0):
        return npformat.read_array_header_2_0(handle)
    raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")


def _load_npy(path: Path, source: str) -> np.ndarray:
    """A ``.npy`` array, its header checked (a .npy, not pickled, declared size) before the data is read."""
    import numpy as np
    from numpy.lib import format as npformat

    with open(path, "rb") as handle:
        try:
            shape, _, dtype = npy_header(handle)
        except ValueError as err:
            raise InputError(f"{source}: could not read the file (not a .npy array: {err})") from None
        if dtype.hasobject:
            raise InputError(f"{source}: holds pickled objects, which are never loaded; save a numeric array")
        _check_declared(source, shape, dtype, 4, os.fstat(handle.fileno()).st_size - handle.tell())
    return np.load(path, allow_pickle=False)


def _load_nifti(path: Path, source: str) -> np.ndarray:
    """NIfTI voxels as float32, the header's declared size checked before any voxel is read."""
    import nibabel as nib
    import numpy as np

    image = nib.load(str(path))
    shape = tuple(int(n) for n in image.header.get_data_shape())
    dtype = np.dtype(image.get_data_dtype())
    size = path.stat().st_size
    offset = int(getattr(image.dataobj, "offset", image.header.get_data_offset()))
    if dtype.kind not in "biuf" or dtype.fields is not None:
        raise InputError(f"{source}: expected numeric image data (integers or real numbers), got NIfTI voxels of "
                         f"dtype {dtype}")
    _check_declared(source, shape, dtype, 4,
                    size * _DEFLATE_MAX_RATIO if path.name.lower().endswith(".gz") else size - offset)
    try:
        with np.errstate(over="raise"):
            return np.asarray(image.get_fdata(dtype=np.float32))
    except FloatingPointError as err:
        raise InputError(f"{source}: the image holds values beyond the float32 range ({err})") from None


def _to_chw(array: np.ndarray, in_channels: int, source: str) -> np.ndarray:
    """(H, W), (C, H, W) or (H, W, C) -> (C, H, W) float32 with C == ``in_channels``.

    For a 3D array the channel axis is the first axis when it has ``in_channels`` entries, else the
    last axis when that one has; otherwise the smaller of the two is reported as the image's
    channel count.
    """
    import numpy as np

    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3:
        if array.shape[0] != in_channels and array.shape[-1] == in_channels:
            array = np.moveaxis(array, -1, 0)
    else:
        raise InputError(f"{source}: expected a 2D image, (C, H, W) or (H, W, C); got shape {array.shape}")
    if array.shape[0] != in_channels:
        shape = array.shape
        channels = min(shape[0], shape[-1])
        raise InputError(
            f"{source}: the model expects {in_channels} channel(s) but the image has {channels} (shape {shape})"
        )
    if array.size == 0:
        raise InputError(f"{source}: the image is empty (shape {array.shape})")
    if not np.isfinite(array).all():
        raise InputError(f"{source}: the image contains NaN or infinite values")
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(out).all():
        raise InputError(f"{source}: the image holds values beyond the float32 range (dtype {array.dtype})")
    return out


# Pillow modes a PNG can open as, and the mode its pixels are read in.
_PNG_MODES = {"1": "L", "LA": "L", "La": "L", "RGBA": "RGB", "RGBa": "RGB"}


def _png_array(img: Any) -> np.ndarray:
    """A Pillow image as an array scaled to [0, 1]: (H, W) for gray modes, (H, W, 3) for colour."""
    import numpy as np

    mode = img.mode
    if mode in ("P", "PA"):
        indices = np.unique(np.asarray(img))
        palette = np.asarray(img.getpalette() or [], dtype=np.int64).reshape(-1, 3)
        used = palette[indices[indices < len(palette)]]
        gray = len(used) > 0 and bool((used == used[:, :1]).all())
        img = img.convert("RGBA" if mode == "PA" else "RGB").convert("L" if gray else "RGB")
    elif mode in _PNG_MODES:
        img = img.convert(_PNG_MODES[mode])
    array = np.asarray(img)
    # PNG holds 1 to 16 bits per channel; Pillow opens 16-bit gray as uint16 ("I;16") or int32 ("I").
    kind, size = array.dtype.kind, array.dtype.itemsize
    scale = 255.0 if (kind, size) == ("u", 1) else 65535.0 if kind in "ui" else 1.0
    return array.astype(np.float32) / scale


def load_image_file(path: str | os.PathLike, in_channels: int, slice_index: int | None = None) -> np.ndarray:
    """Read an image file as a (C, H, W) float32 array for a model with ``in_channels`` channels.

    Errors name the file as it was given.

    Raises:
        FileNotFoundError: no such file.
        InputError: unreadable file, unsupported format, wrong shape or channel count.
    """
    import numpy as np

    source = os.fspath(path)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input image not found: {source}")
    name = path.name.lower()
    try:
        if name.endswith(".npy"):
            array = _load_npy(path, source)
        elif name.endswith(".png"):
            import warnings

            from PIL import Image

            with warnings.catch_warnings():  # above Pillow's MAX_IMAGE_PIXELS: refused before decoding
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(path)
            with img:
                array = _png_array(img)
        elif name.endswith((".nii", ".nii.gz")):
            array = _load_nifti(path, source)
            if array.ndim == 3 and array.shape[-1] == 1:
                array = array[..., 0]
            elif array.ndim == 3:
                if slice_index is None:
                    raise InputError(f"{source}: a 3D volume of shape {array.shape}; choose a slice with --slice")
                if not -array.shape[-1] <= slice_index < array.shape[-1]:
                    raise InputError(f"{source}: --slice {slice_index} is outside the {array.shape[-1]} slices")
                array = array[..., slice_index]
        else:
            raise InputError(f"{source}: unsupported file type; use .npy, .png, .nii or .nii.gz")
    except InputError:
        raise
    except Exception as err:  # any reader failure: name the file, keep the reader's reason
        raise InputError(f"{source}: could not read the file ({type(err).__name__}: {err})") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "iuf":
        got = f"dtype {array.dtype}" if isinstance(array, np.ndarray) else type(array).__name__
        raise InputError(f"{source}: expected numeric image data (integers or real numbers), got {got}")
    return _to_chw(array, in_channels, source)


def file_key(path: str | os.PathLike) -> str:
    """The output id of an input file: its name without the image extension (``mri.nii.gz`` -> ``mri``)."""
    name = Path(path).name
    for ext in (".nii.gz", ".npy", ".png", ".nii"):
        if name.lower().endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return Path(name).stem or name


def unique_keys(keys: list[str]) -> list[str]:
    """Make output ids unique, in order: the first ``x`` stays ``x``, later ones become ``x-1``, ``x-2``, ...

    Ids differing only in case count as equal (they collide on case-insensitive file systems), and a
    renamed id never takes an id that another input has as its own.
    """
    own = {key.casefold() for key in keys}
    used: set[str] = set()
    result = []
    for key in keys:
        candidate, n = key, 0
        while candidate.casefold() in used or (n and candidate.casefold() in own):
            n += 1
            candidate = f"{key}-{n}"
        used.add(candidate.casefold())
        result.append(candidate)
    return result


def summarize(logits: torch.Tensor, weights: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """(S, K, H, W) logits of one image -> samples, probabilities, weights (S,), mean and std as
    numpy arrays. With ``weights`` (S,) (a mixture's hypotheses) the mean and std are weighted."""
    import torch

    probs = logits.float().softmax(dim=1)
    s = probs.shape[0]
    if weights is None:
        weights = torch.full((s,), 1 / s)
        mean, std = probs.mean(0), probs.std(0, unbiased=False)
    else:
        from probseg.metrics.functional.sets import sample_weights

        weights = sample_weights(weights.detach().float().cpu()[None], (1, s), "weights")[0]  # checked, sum 1
        w = weights[:, None, None, None]
        mean = (w * probs).sum(0)
        std = (w * (probs - mean) ** 2).sum(0).sqrt()
    return {
        "samples": probs.argmax(dim=1).to(torch.uint8).numpy(),
        "probabilities": probs.numpy(),
        "weights": weights.numpy(),
        "mean": mean.numpy(),
        "std": std.numpy(),
    }


def foreground(probabilities: np.ndarray) -> np.ndarray:
    """(S, K, H, W) -> (S, H, W) probability of any non-background class."""
    return 1.0 - probabilities[:, 0]


def write_outputs(
    out: Path, key: str, image: np.ndarray, logits: torch.Tensor, raters: np.ndarray | None, *, plot: bool = True,
    weights: torch.Tensor | None = None,
) -> list[Path]:
    """Write ``<key>.npz`` and (with ``plot``) ``<key>.png`` for one image; return the paths written.

    The npz holds ``image``, ``samples`` (S, H, W), ``probabilities`` (S, K, H, W), ``weights``
    (S,) (1 / S each unless the model weights its hypotheses), ``mean``, ``std`` and, when known,
    ``raters``."""
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    arrays = summarize(logits, weights)
    extra = {} if raters is None else {"raters": raters}
    npz = out / f"{key}.npz"
    np.savez_compressed(npz, image=image, **arrays, **extra)
    written = [npz]
    if not plot:
        return written
    try:
        from probseg.viz import plot_sample_grid
    except ImportError:
        return written
    try:
        written.append(
            plot_sample_grid(out / f"{key}.png", image, foreground(arrays["probabilities"]), raters, title=key)
        )
    except ImportError as err:
        print(f"probseg sample: PNG grid not written for {key}: {err}", file=sys.stderr)
    return written

"""``probseg sample``: draw hypotheses from a checkpoint for image files or data-module images.

For every image it writes ``<id>.npz`` (``samples``: (S, H, W) class ids; ``probabilities``:
(S, K, H, W) softmax of each hypothesis; ``mean`` and ``std``: (K, H, W) pixel-wise over the
hypotheses; ``image``; ``raters`` (R, H, W) when known) and ``<id>.png``, a grid of the image, the
raters, the hypotheses and the mean and std of the foreground probability.

Input files: ``.npy`` (H, W), (C, H, W) or (H, W, C), used as stored; ``.png`` scaled to [0, 1];
``.nii``/``.nii.gz`` (2D, or a 3D volume with ``--slice``), used as stored.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch


class InputError(ValueError):
    """An input image cannot be used with the model."""


def _to_chw(array: np.ndarray, in_channels: int, path: Path) -> np.ndarray:
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3 and array.shape[0] != in_channels and array.shape[-1] == in_channels:
        array = np.moveaxis(array, -1, 0)
    if array.ndim != 3:
        raise InputError(f"{path}: expected a 2D image, (C, H, W) or (H, W, C); got shape {array.shape}")
    if array.shape[0] != in_channels:
        raise InputError(
            f"{path}: the model expects {in_channels} channel(s) but the image has {array.shape[0]} "
            f"(shape {array.shape})"
        )
    if not np.isfinite(array).all():
        raise InputError(f"{path}: the image contains NaN or infinite values")
    return np.ascontiguousarray(array, dtype=np.float32)


def load_image_file(path: str | os.PathLike, in_channels: int, slice_index: int | None = None) -> np.ndarray:
    """Read an image file as a (C, H, W) float32 array for a model with ``in_channels`` channels.

    Raises:
        FileNotFoundError: no such file.
        InputError: unreadable file, unsupported format, wrong shape or channel count.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input image not found: {path}")
    name = path.name.lower()
    try:
        if name.endswith(".npy"):
            array = np.load(path, allow_pickle=False)
        elif name.endswith(".png"):
            from PIL import Image

            with Image.open(path) as img:
                array = np.asarray(img)
            scale = 65535.0 if array.dtype == np.uint16 else 255.0 if array.dtype == np.uint8 else 1.0
            array = array.astype(np.float32) / scale
        elif name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            array = np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))
            if array.ndim == 3 and array.shape[-1] == 1:
                array = array[..., 0]
            elif array.ndim == 3:
                if slice_index is None:
                    raise InputError(f"{path}: a 3D volume of shape {array.shape}; choose a slice with --slice")
                if not -array.shape[-1] <= slice_index < array.shape[-1]:
                    raise InputError(f"{path}: --slice {slice_index} is outside the {array.shape[-1]} slices")
                array = array[..., slice_index]
        else:
            raise InputError(f"{path}: unsupported file type; use .npy, .png, .nii or .nii.gz")
    except InputError:
        raise
    except Exception as err:  # any reader failure: name the file, keep the reader's reason
        raise InputError(f"{path}: could not read the file ({type(err).__name__}: {err})") from None
    if array.dtype == object or not np.issubdtype(array.dtype, np.number):
        raise InputError(f"{path}: expected numeric image data, got dtype {array.dtype}")
    return _to_chw(array, in_channels, path)


def summarize(logits: torch.Tensor) -> dict[str, np.ndarray]:
    """(S, K, H, W) logits of one image -> samples, probabilities, mean and std as numpy arrays."""
    probs = logits.float().softmax(dim=1)
    return {
        "samples": probs.argmax(dim=1).to(torch.uint8).numpy(),
        "probabilities": probs.numpy(),
        "mean": probs.mean(0).numpy(),
        "std": probs.std(0, unbiased=False).numpy(),
    }


def foreground(probabilities: np.ndarray) -> np.ndarray:
    """(S, K, H, W) -> (S, H, W) probability of any non-background class."""
    return 1.0 - probabilities[:, 0]


def write_outputs(out: Path, key: str, image: np.ndarray, logits: torch.Tensor, raters: np.ndarray | None) -> list[Path]:
    """Write ``<key>.npz`` and ``<key>.png`` for one image; return the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    arrays = summarize(logits)
    extra = {} if raters is None else {"raters": raters}
    npz = out / f"{key}.npz"
    np.savez_compressed(npz, image=image, **arrays, **extra)
    written = [npz]
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


def _datamodule_from_config(path: str) -> Any:
    import yaml
    from jsonargparse import ArgumentParser

    from probseg.data.base import ProbSegDataModule

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"data config not found: {file}")
    config = yaml.safe_load(file.read_text())
    if not isinstance(config, dict) or "data" not in config:
        raise InputError(f"{file}: no 'data' section to build a data module from")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(ProbSegDataModule, "data")
    # jsonargparse renamed instantiate_classes to instantiate in 4.49.
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    try:
        return instantiate(parser.parse_object({"data": config["data"]})).data
    except Exception as err:
        raise InputError(f"{file}: invalid 'data' section: {err}") from None


def collect_inputs(args: argparse.Namespace, in_channels: int) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """(key, image (C, H, W), raters (R, H, W) or None) for every requested image."""
    items: list[tuple[str, np.ndarray, np.ndarray | None]] = []
    for path in args.input or []:
        key = Path(path).name.split(".")[0]
        items.append((key, load_image_file(path, in_channels, args.slice), None))
    if args.data_config:
        dm = _datamodule_from_config(args.data_config)
        for index in args.index or [0]:
            item = dm.item(args.split, index)
            image = item["image"].numpy()
            if image.shape[0] != in_channels:
                raise InputError(
                    f"{args.data_config}: the data has {image.shape[0]} channel(s) but the model expects {in_channels}"
                )
            raters = item["masks"].numpy()
            if "rater_mask" in item:
                raters = raters[item["rater_mask"].numpy()]
            items.append((str(item.get("id", f"{args.split}-{index}")), image, raters))
    return items


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="probseg sample",
        description="Draw segmentation hypotheses from a checkpoint; write <id>.npz and <id>.png per image.",
    )
    parser.add_argument("--ckpt", required=True, help="checkpoint written by probseg fit")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-samples", type=int, default=16, help="hypotheses per image (default 16)")
    parser.add_argument("--input", nargs="+", help="image files: .npy, .png, .nii, .nii.gz")
    parser.add_argument("--slice", type=int, default=None, help="slice of a 3D NIfTI volume (last axis)")
    parser.add_argument("--data-config", help="YAML whose 'data' section builds a data module")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"), help="split for --data-config")
    parser.add_argument("--index", type=int, nargs="+", help="image indices for --data-config (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latent draws (default 0)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    return parser


def run(args: argparse.Namespace) -> list[Path]:
    """Sample for every input of ``args`` and return the files written."""
    from probseg.checkpoint import load_model

    if args.num_samples < 1:
        raise InputError(f"--num-samples must be positive, got {args.num_samples}")
    if not args.input and not args.data_config:
        raise InputError("give images with --input FILE ... or --data-config CFG --index I ...")
    model = load_model(args.ckpt, map_location=args.device)
    items = collect_inputs(args, model.in_channels)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    out = Path(args.out)
    written: list[Path] = []
    with torch.inference_mode():
        for key, image, raters in items:
            batch = torch.from_numpy(image)[None].to(args.device)
            try:
                logits = model.sample(batch, args.num_samples, generator=generator)[0].cpu()
            except (ValueError, TypeError) as err:
                raise InputError(f"{key}: {err}") from None
            written += write_outputs(out, key, image, logits, raters)
    return written


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        written = run(args)
    except (FileNotFoundError, InputError, IndexError, KeyError, ValueError) as err:
        message = err.args[0] if isinstance(err, (KeyError, IndexError)) and err.args else err
        print(f"probseg sample: error: {message}", file=sys.stderr)
        return 1
    print(f"probseg sample: wrote {len(written)} files to {args.out}")
    for path in written:
        print(f"  {path}")
    return 0

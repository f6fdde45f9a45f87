"""``probseg sample``: draw hypotheses from a checkpoint for image files or data-module images.

A thin command over :mod:`probseg.io`, which reads the inputs and writes, for every image,
``<id>.npz`` and ``<id>.png`` (see there). The id of a file is its name without the extension;
when two inputs share an id (``a/x.npy b/x.npy`` or ``x.npy x.png``) the later ones get ``x-1``,
``x-2``, ... in the order given. Input files: ``.npy``, ``.png``, ``.nii``/``.nii.gz`` (a 3D
volume with ``--slice``).

numpy and torch are imported inside the functions that need them so that ``probseg sample -h``
stays quick.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from probseg.io import (
    InputError,
    file_key,
    foreground,
    load_image_file,
    summarize,
    unique_keys,
    write_outputs,
)

if TYPE_CHECKING:
    import numpy as np
    import torch

# (file_key ... write_outputs: the readers and writers of release 0.1, now in probseg.io)
__all__ = [
    "InputError",
    "SampleInput",
    "SamplingError",
    "build_parser",
    "collect_inputs",
    "file_key",
    "foreground",
    "load_image_file",
    "main",
    "run",
    "summarize",
    "unique_keys",
    "write_outputs",
]


class SamplingError(RuntimeError):
    """Drawing hypotheses failed at run time (e.g. out of device memory) for one input."""


class SampleInput(NamedTuple):
    """One image to sample: output ``key``, human-readable ``source``, (C, H, W) ``image``, raters."""

    key: str
    source: str
    image: np.ndarray
    raters: np.ndarray | None


def _datamodule_from_config(path: str) -> Any:
    from probseg.data.config import datamodule_from_config

    try:
        return datamodule_from_config(path)
    except FileNotFoundError:
        raise
    except ValueError as err:
        raise InputError(str(err)) from None


def collect_inputs(args: argparse.Namespace, in_channels: int) -> list[SampleInput]:
    """Every requested image, with a unique output key and a source label for messages."""
    items: list[SampleInput] = []
    for path in args.input or []:
        source = os.fspath(path)
        items.append(SampleInput(file_key(path), source, load_image_file(path, in_channels, args.slice), None))
    if args.data_config:
        dm = _datamodule_from_config(args.data_config)
        for index in args.index or [0]:
            source = f"{args.data_config} split {args.split} index {index}"
            try:
                item = dm.item(args.split, index)
            except IndexError as err:
                raise InputError(f"{source}: {err.args[0] if err.args else err}") from None
            image = item["image"].numpy()
            if image.shape[0] != in_channels:
                raise InputError(
                    f"{source}: the data has {image.shape[0]} channel(s) but the model expects {in_channels}"
                )
            raters = item["masks"].numpy()
            if "rater_mask" in item:
                raters = raters[item["rater_mask"].numpy()]
            items.append(SampleInput(str(item.get("id", f"{args.split}-{index}")), source, image, raters))
    keys = unique_keys([item.key for item in items])
    for item, key in zip(items, keys):
        if key != item.key:
            print(printable(f"probseg sample: {item.source} is written as {key} ({item.key} is taken)"), file=sys.stderr)
    return [item._replace(key=key) for item, key in zip(items, keys)]


def resolve_device(spec: str) -> torch.device:
    """Parse ``--device`` and check that it can be used here.

    Raises:
        InputError: not a torch device string, or a device this machine does not have.
    """
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError, ValueError) as err:
        raise InputError(f"--device {spec!r} is not a torch device ({err})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise InputError(
                f"--device {spec}: CUDA is not available here (torch.cuda.is_available() is False; "
                f"torch {torch.__version__}, {build}); use --device cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise InputError(f"--device {spec}: this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {spec}: MPS is not available here (torch.backends.mps.is_available() is False)")
    return device


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
    parser.add_argument(
        "--seed", type=int, default=0,
        help="seed of the latent draws (default 0); the same seed gives different draws on different devices",
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda or cuda:1 (default cpu)")
    return parser


def run(args: argparse.Namespace) -> list[Path]:
    """Sample for every input of ``args`` and return the files written."""
    import torch

    from probseg.checkpoint import load_model

    if args.num_samples < 1:
        raise InputError(f"--num-samples must be positive, got {args.num_samples}")
    if not args.input and not args.data_config:
        raise InputError("give images with --input FILE ... or --data-config CFG --index I ...")
    device = resolve_device(args.device)
    try:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    except RuntimeError as err:
        raise InputError(f"--device {args.device}: cannot draw random numbers on this device ({err})") from None
    model = load_model(args.ckpt, map_location=device)
    items = collect_inputs(args, model.in_channels)
    out = Path(args.out)
    written: list[Path] = []
    with torch.inference_mode():
        for item in items:
            try:
                batch = torch.from_numpy(item.image)[None].to(device)
                weights = None
                if model.weighted:  # a mixture's hypotheses carry weights
                    logits, weights = model.sample_weighted(batch, args.num_samples, generator=generator)
                    weights = weights[0].cpu()
                else:
                    logits = model.sample(batch, args.num_samples, generator=generator)
                logits = logits[0].cpu()
            except (ValueError, TypeError) as err:
                raise InputError(f"{item.source}: {err}") from None
            except RuntimeError as err:  # e.g. out of device memory, or a kernel missing on this device
                oom = isinstance(err, torch.cuda.OutOfMemoryError)
                hint = " (try fewer --num-samples or --device cpu)" if oom else ""
                raise SamplingError(f"{item.source}: sampling on {device} failed{hint}: {err}") from None
            written += write_outputs(out, item.key, item.image, logits, item.raters, weights=weights)
    return written


def printable(text: str) -> str:
    """``text`` with what UTF-8 cannot encode (the surrogates Python gives to non-UTF-8 bytes in file
    names) written as backslash escapes, so printing it never fails."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        written = run(args)
    except (FileNotFoundError, InputError, SamplingError, IndexError, KeyError, ValueError) as err:
        message = err.args[0] if isinstance(err, (KeyError, IndexError)) and err.args else err
        print(printable(f"probseg sample: error: {message}"), file=sys.stderr)
        return 1
    print(printable(f"probseg sample: wrote {len(written)} files to {args.out}"))
    for path in written:
        print(printable(f"  {path}"))
    return 0

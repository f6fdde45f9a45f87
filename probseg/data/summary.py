"""``probseg data summary``: what a data set holds, split by split; the first thing to run on new data."""

from __future__ import annotations

from typing import Any

import numpy as np

from probseg.data.base import SPLITS


def pairwise_rater_dice(masks: np.ndarray, present: np.ndarray) -> float | None:
    """Mean Dice of the foreground (any non-zero class) over all pairs of present raters of one
    image (both empty = 1); None with fewer than two raters."""
    fg = masks[present].reshape(int(present.sum()), -1) > 0
    if len(fg) < 2:
        return None
    sizes = fg.sum(1)
    inter = fg.astype(np.float64) @ fg.T.astype(np.float64)
    denom = sizes[:, None] + sizes[None, :]
    dice = np.where(denom > 0, 2 * inter / np.maximum(denom, 1), 1.0)
    upper = np.triu_indices(len(fg), k=1)
    return float(dice[upper].mean())


def summarize_split(dataset: Any, patients: list[str] | None = None, progress: bool = True) -> dict[str, Any]:
    """Counts and statistics of one split's items (image, masks, rater_mask)."""
    from tqdm.auto import tqdm

    raters, empty, dice, shapes = [], [], [], set()
    low, high = np.inf, -np.inf
    for i in tqdm(range(len(dataset)), desc="summary", disable=None if progress else True, leave=False):
        item = dataset[i]
        image, masks = item["image"].numpy(), item["masks"].numpy()
        present = item["rater_mask"].numpy() if "rater_mask" in item else np.ones(len(masks), dtype=bool)
        shapes.add(tuple(image.shape))
        low, high = min(low, float(image.min())), max(high, float(image.max()))
        raters.append(int(present.sum()))
        empty += [not m.any() for m in masks[present]]
        value = pairwise_rater_dice(masks, present)
        if value is not None:
            dice.append(value)
    return {
        "images": len(dataset),
        "patients": len(set(patients)) if patients is not None else None,
        "raters": (min(raters), float(np.mean(raters)), max(raters)) if raters else None,
        "shape": sorted(shapes),
        "intensity": (low, high) if shapes else (float("nan"), float("nan")),
        "empty": float(np.mean(empty)) if empty else float("nan"),
        "dice": float(np.mean(dice)) if dice else float("nan"),
    }


def summarize(datamodule: Any, progress: bool = True) -> dict[str, dict[str, Any]]:
    """:func:`summarize_split` of every split of ``datamodule``; an empty split has 0 images.
    Training crops are taken centrally here, so the summary is the same at every run."""
    out = {}
    for split in SPLITS:
        patients = None
        if hasattr(datamodule, "split_indices"):
            indices = datamodule.split_indices()[split]
            patients = [datamodule.arrays.patients[i] for i in indices]
            if len(indices) == 0:
                out[split] = summarize_split([], [], progress)
                continue
        dataset = datamodule.dataset(split)
        random_crop = getattr(dataset, "random_crop", False)
        if random_crop:
            dataset.random_crop = False
        try:
            out[split] = summarize_split(dataset, patients, progress)
        finally:
            if random_crop:
                dataset.random_crop = True
    return out


def format_summary(summary: dict[str, dict[str, Any]], title: str = "") -> str:
    """A Markdown table of :func:`summarize`'s output."""
    head = "| split | images | patients | raters per image (min / mean / max) | image (C, H, W) | intensity range | empty rater masks | inter-rater Dice |"
    lines = ([f"{title}", ""] if title else []) + [head, "| --- | ---: | ---: | ---: | --- | --- | ---: | ---: |"]
    for split, s in summary.items():
        raters = "-" if s["raters"] is None else f"{s['raters'][0]} / {s['raters'][1]:.2f} / {s['raters'][2]}"
        shape = ", ".join("x".join(map(str, t)) for t in s["shape"])
        patients = "-" if s["patients"] is None else str(s["patients"])
        lines.append(
            f"| {split} | {s['images']} | {patients} | {raters} | {shape} | [{s['intensity'][0]:.3g}, "
            f"{s['intensity'][1]:.3g}] | {s['empty']:.1%} | {s['dice']:.3f} |"
        )
    return "\n".join(lines) + "\n"

"""Figures: sample grids with pixel-wise mean/std maps, and loss curves from a CSV log.

matplotlib is an optional extra (``pip install probseg[viz]``); it is imported on first use, with
the non-interactive Agg backend so figures render on machines without a display.
"""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("figures need matplotlib: pip install 'probseg[viz]'") from err
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _show(ax: Any, array: np.ndarray, title: str, cmap: str = "gray", vmin: float = 0.0, vmax: float = 1.0, colorbar: bool = False) -> None:
    im = ax.imshow(array, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    if colorbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)


def plot_sample_grid(
    path: str | os.PathLike,
    image: np.ndarray,
    samples: np.ndarray,
    raters: np.ndarray | None = None,
    title: str | None = None,
    columns: int = 8,
) -> Path:
    """Save a grid: image and raters, the hypotheses, and their pixel-wise mean and std.

    Args:
        path: PNG to write.
        image: (C, H, W) or (H, W); the first channel is shown.
        samples: (S, H, W) foreground probabilities (or hard 0/1 masks) of the hypotheses.
        raters: optional (R, H, W) rater masks (foreground where > 0).
        title: figure title.
        columns: panels per row.

    Returns:
        The path written.
    """
    plt = _pyplot()
    image = np.asarray(image)
    image = image[0] if image.ndim == 3 else image
    samples = np.asarray(samples, dtype=np.float32)
    raters = None if raters is None else np.asarray(raters)
    top = 1 + (0 if raters is None else len(raters))
    s = len(samples)
    rows = math.ceil(top / columns) + math.ceil(s / columns) + 1
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.7 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    flat_top = axes[: math.ceil(top / columns)].flat
    ax = next(flat_top)
    ax.axis("on")
    _show(ax, image, "image", vmin=float(image.min()), vmax=float(image.max()))
    for r in range(0 if raters is None else len(raters)):
        ax = next(flat_top)
        ax.axis("on")
        _show(ax, (raters[r] > 0).astype(np.float32), f"rater {r}")
    first = math.ceil(top / columns)
    sample_axes = axes[first : first + math.ceil(s / columns)].flat
    for i in range(s):
        ax = next(sample_axes)
        ax.axis("on")
        _show(ax, samples[i], f"sample {i}")
    last = axes[-1]
    for ax, data, name, cmap, vmax in (
        (last[0], samples.mean(0), "mean", "viridis", 1.0),
        (last[1], samples.std(0), "std", "magma", 0.5),
    ):
        ax.axis("on")
        _show(ax, data, name, cmap=cmap, vmax=vmax, colorbar=True)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def read_metrics_csv(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read a Lightning CSVLogger ``metrics.csv`` into {key: (steps, values)}, skipping blanks."""
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if step in (None, ""):
                continue
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                series[key].append((float(step), float(value)))
    return {k: (np.array([s for s, _ in v]), np.array([x for _, x in v])) for k, v in series.items()}


def plot_loss_curves(metrics_csv: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Plot every logged ``{stage}/{name}`` loss term against the training step.

    One panel per term name (``loss``, ``rec``, ``kl``, ...), train and val overlaid.

    Args:
        metrics_csv: a CSVLogger ``metrics.csv``.
        path: PNG to write.

    Returns:
        The path written.
    """
    plt = _pyplot()
    series = read_metrics_csv(metrics_csv)
    names = sorted({k.split("/", 1)[1] for k in series if "/" in k and k.split("/", 1)[0] in ("train", "val")})
    if not names:
        raise ValueError(f"{metrics_csv} holds no train/* or val/* series to plot")
    names.sort(key=lambda n: (n != "loss", n))
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        for stage, style in (("train", "-"), ("val", "o-")):
            key = f"{stage}/{name}"
            if key in series:
                steps, values = series[key]
                ax.plot(steps, values, style, label=stage, markersize=3, linewidth=1)
        ax.set_title(name)
        ax.set_xlabel("step")
        positive = all((series[k][1] > 0).all() for k in (f"train/{name}", f"val/{name}") if k in series)
        if positive:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

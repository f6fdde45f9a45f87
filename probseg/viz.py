"""Figures: sample grids with pixel-wise mean/std maps, loss curves and metric curves (e.g. the Gini
index over training) from CSV logs, and reliability diagrams for the ECE.

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
    return _save(fig, path)


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


def training_log(run: str | os.PathLike, key: str = "train/gini") -> Path:
    """The newest ``metrics.csv`` of a run folder that logged ``key`` (``probseg test`` writes its
    own log version, which holds no training series)."""
    logs = [p for p in Path(run).glob("logs/version_*/metrics.csv") if key in p.read_text().splitlines()[0].split(",")]
    if not logs:
        raise FileNotFoundError(f"no logs/version_*/metrics.csv with {key!r} under {run}")
    return max(logs, key=os.path.getmtime)


def loss_panels(series: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """The panels of :func:`plot_loss_curves`: (title, logged keys) each.

    One panel per loss term name (``loss`` first, then ``rec``, ``kl``, ...), train and val
    overlaid; the KL per latent dimension (``kl_dim<d>``) shares one panel, training only, so a
    collapsing dimension shows against the others. The Gini index and the KL weight schedule are
    not loss terms and are left out.
    """
    stage = "train" if any(k.startswith("train/") for k in series) else "val"  # a run too short to log train
    names = sorted({k.split("/", 1)[1] for k in series if k.startswith(f"{stage}/")} - {"gini", "kl_weight"})
    dims = sorted((n for n in names if n.startswith("kl_dim")), key=lambda n: int(n[len("kl_dim"):] or 0))
    terms = sorted((n for n in names if n not in dims), key=lambda n: (n != "loss", n))
    panels = [(name, [f"train/{name}", f"val/{name}"]) for name in terms]
    if dims:
        panels.append(("KL per latent dimension", [f"{stage}/{d}" for d in dims]))
    return panels


def plot_loss_curves(metrics_csv: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Plot every logged ``{stage}/{name}`` loss term against the training step (panels:
    :func:`loss_panels`).

    Args:
        metrics_csv: a CSVLogger ``metrics.csv``.
        path: PNG to write.

    Returns:
        The path written.
    """
    plt = _pyplot()
    series = read_metrics_csv(metrics_csv)
    panels = loss_panels(series)
    if not panels:
        raise ValueError(f"{metrics_csv} holds no train/* or val/* series to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        present = [k for k in keys if k in series]
        by_stage = len({k.split("/", 1)[1] for k in keys}) == 1  # one term, train and val: label the stage
        for key in present:
            stage, name = key.split("/", 1)
            steps, values = series[key]
            ax.plot(steps, values, "o-" if stage == "val" else "-", label=stage if by_stage else name,
                    markersize=3, linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        if present and all((series[k][1] > 0).all() for k in present):
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def plot_metric_curves(
    runs: dict[str, str | os.PathLike], path: str | os.PathLike, key: str = "train/gini", title: str | None = None
) -> Path:
    """One curve per run of a logged metric against the training step, e.g. the Gini index of the
    prior's singular values over training (the cSAE paper's Figures 3-4).

    Args:
        runs: label -> the run's CSVLogger ``metrics.csv``.
        path: PNG to write.
        key: the logged series.
        title: figure title (default: the key).

    Returns:
        The path written.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for label, csv_path in runs.items():
        series = read_metrics_csv(csv_path)
        if key not in series:
            raise ValueError(f"{csv_path} has no {key!r} series (logged: {sorted(series)[:10]} ...)")
        steps, values = series[key]
        ax.plot(steps, values, label=label, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(key.split("/", 1)[-1])
    ax.set_title(title or key)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_reliability_diagram(
    pred: Any, target: Any, path: str | os.PathLike, rater_mask: Any = None, num_bins: int = 15
) -> Path:
    """Reliability diagram of hypotheses against the raters' majority vote, pooled over images:
    accuracy per confidence bin against the diagonal, with the pooled ECE in the title (the
    convention of :func:`probseg.metrics.functional.expected_calibration_error`).

    Args:
        pred: (B, S, H, W) foreground or (B, S, K, H, W) class probabilities (torch tensor).
        target: (B, R, H, W) rater class ids.
        path: PNG to write.
        rater_mask: optional (B, R) bool.
        num_bins: confidence bins.

    Returns:
        The path written.
    """
    from probseg.data.fusion import majority_vote
    from probseg.metrics.functional import calibration_bins, class_probabilities

    plt = _pyplot()
    probs = class_probabilities(pred.detach().cpu()).mean(dim=1)
    target = target.detach().cpu()
    rater_mask = None if rater_mask is None else rater_mask.detach().cpu()
    confidence, label = probs.max(dim=1)
    vote = majority_vote(target, rater_mask, num_classes=probs.shape[1])
    stats = calibration_bins(confidence.flatten(1), (label == vote).flatten(1), num_bins).sum(0).numpy()
    count, conf, correct = stats[:, 0], stats[:, 1], stats[:, 2]
    used = count > 0
    ece = float(np.abs(correct - conf).sum() / count.sum())
    edges = np.linspace(0, 1, num_bins + 1)
    fig, ax = plt.subplots(figsize=(3.6, 3.4))
    ax.bar(edges[:-1][used], (correct / np.maximum(count, 1))[used], width=1 / num_bins, align="edge",
           edgecolor="black", linewidth=0.5, label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="calibrated")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"ECE (pooled) = {ece:.4f}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return _save(fig, path)

"""Results tables: per-run CSV and Markdown written by ``probseg test``, and the paper's Table 1
layout gathered from several runs (``probseg results``).

A run's ``test_results.csv`` has one row per source (the model; for data with a known rater
distribution the ``oracle``; for a distilled student its ``teacher`` and ``teacher_kde``), with columns ``model``, ``dataset``, ``source``, ``num_images``,
``num_samples`` and ``<metric>_mean`` / ``<metric>_std`` (mean and sample standard deviation
over images) for every metric of :data:`probseg.metrics.METRIC_NAMES` that was measured, and one
column per dataset-pooled value (:data:`probseg.metrics.POOLED_NAMES`, e.g. ``ece_pooled``: the
ECE of all pixels of the row's images together), placed next to its per-image metric.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from probseg.metrics.hypotheses import METRIC_NAMES

POOLED_SUFFIX = "_pooled"
"""A results column ``<metric>_pooled`` holds one dataset-pooled value (no mean or std)."""

TABLE1_COLUMNS = {"hm_iou": "1 - IoU", "hm_dice": "1 - Dice", "hm_hausdorff": "Hausdorff", "hm_ce": "CE", "gini": "Gini"}
"""Table 1 of Valiuddin et al.: the empirical Wasserstein metric per kernel and the Gini index."""

RESULTS_FILE = "test_results.csv"

SUBSETS = {"all": "all images", "any_rater": "some rater marks a structure",
           "all_raters": "every rater marks a structure"}
"""The image subsets of a results table (HPU-Net's "subset B" is ``all_raters``). Images where
every rater's mask is empty score perfectly (GED 0, matched cost 0) and pull the means of "all"
down; the "all" rows report their share as ``all_empty_fraction``."""


def conventions_label(self_pairs: bool = True, matching: str = "lcm", ce_reading: str = "mean",
                      gini_of: str = "sigma", hausdorff_empty: str = "diagonal") -> str:
    """The evaluation conventions of a results row in one cell (``conventions`` column), e.g.
    ``"ged self-pairs; matching lcm; ce mean; gini sigma; hausdorff-empty diagonal"``."""
    pairs = "self-pairs" if self_pairs else "distinct pairs"
    return (f"ged {pairs}; matching {matching}; ce {ce_reading}; gini {gini_of}; "
            f"hausdorff-empty {hausdorff_empty}")


def subset_mask(raters_marking: torch.Tensor, subset: str) -> torch.Tensor:
    """(N,) bool: the images of ``subset`` from each image's fraction of raters that mark a
    structure (:class:`probseg.metrics.hypotheses.RaterCoverage`)."""
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {tuple(SUBSETS)}, got {subset!r}")
    if subset == "all":
        return torch.ones_like(raters_marking, dtype=torch.bool)
    return raters_marking > 0 if subset == "any_rater" else raters_marking >= 1


Pooling = Callable[[torch.Tensor], dict[str, float]]
"""The dataset-pooled values (``{"ece_pooled": ...}``) of the images an (N,) bool mask keeps."""


def subset_rows(common: dict, values: dict[str, torch.Tensor], raters_marking: torch.Tensor,
                pooled: Pooling | None = None) -> list[dict]:
    """One results row per subset of :data:`SUBSETS` from per-image values (aligned with
    ``raters_marking``); a subset without images is left out.

    Args:
        common: the cells every row shares (model, dataset, source, ...).
        values: (N,) per-image values per metric.
        raters_marking: (N,) fraction of each image's raters that mark a structure.
        pooled: the pooled values of a subset's images, added to its row (None: none).
    """
    rows = []
    for subset in SUBSETS:
        keep = subset_mask(raters_marking, subset)
        if not bool(keep.any()):
            continue
        row = {**common, "subset": subset, "num_images": int(keep.sum()),
               **summarize({name: v[keep] for name, v in values.items()}), **(pooled(keep) if pooled else {})}
        if subset == "all":
            row["all_empty_fraction"] = float((raters_marking == 0).double().mean())
        rows.append(row)
    return rows


def summarize(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-image values -> ``{name}_mean`` and ``{name}_std`` (sample std; NaN for one image).

    NaN values (undefined for that image, e.g. ``hausdorff_empty="nan"``) are left out of both,
    and ``{name}_undefined`` counts them (only present when some are)."""
    out: dict[str, float] = {}
    for name, v in values.items():
        v = v.double()
        defined = v[~torch.isnan(v)]
        out[f"{name}_mean"] = defined.mean().item() if defined.numel() else math.nan
        out[f"{name}_std"] = defined.std().item() if defined.numel() > 1 else math.nan
        if defined.numel() < v.numel():
            out[f"{name}_undefined"] = v.numel() - defined.numel()
    return out


def _metric_names(rows: Sequence[dict]) -> list[str]:
    """The metric columns of ``rows`` in table order, each pooled value right after its metric."""
    present = {key[: -len("_mean")] for row in rows for key in row if key.endswith("_mean")}
    pooled = {key for row in rows for key in row if key.endswith(POOLED_SUFFIX)}
    names = [name for name in METRIC_NAMES if name in present] + sorted(present - set(METRIC_NAMES))
    ordered = []
    for name in names:
        ordered += [name] + ([name + POOLED_SUFFIX] if name + POOLED_SUFFIX in pooled else [])
    return ordered + sorted(pooled - set(ordered))


def _cell(row: dict, name: str, digits: int = 3) -> str:
    if name.endswith(POOLED_SUFFIX):  # one value, no spread over images
        mean, std = row.get(name), None
    else:
        mean, std = row.get(f"{name}_mean"), row.get(f"{name}_std")
    if mean in (None, "") or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    mean = float(mean)
    if std in (None, "") or math.isnan(float(std)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {float(std):.{digits}f}"


SOURCE_LABELS = {"oracle": "oracle", "teacher": "{model}: teacher", "teacher_kde": "{model}: teacher + KDE"}
"""Row labels of the sources other than the model itself."""


def row_label(row: dict) -> str:
    """The first cell of a results row: the model, "oracle", or the teacher of a distilled model,
    with the subset of images when it is not all of them."""
    source = row.get("source", "model") or "model"
    label = str(row["model"]) if source == "model" else SOURCE_LABELS.get(source, source).format(model=row["model"])
    subset = row.get("subset") or "all"
    return label if subset == "all" else f"{label} ({SUBSETS.get(subset, subset)})"


def markdown_table(rows: Sequence[dict], metrics: Sequence[str] | None = None, headers: dict[str, str] | None = None) -> str:
    """A Markdown table with one row per result row and "mean ± std" cells."""
    metrics = list(metrics or _metric_names(rows))
    headers = headers or {}
    head = ["model", "dataset", "images"] + [headers.get(m, m) for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([" --- "] * 3 + [" ---: "] * len(metrics)) + "|"]
    for row in rows:
        label = row_label(row)
        cells = [label, str(row.get("dataset", "")), str(row.get("num_images", ""))]
        lines.append("| " + " | ".join(cells + [_cell(row, m) for m in metrics]) + " |")
    return "\n".join(lines) + "\n"


def write_results(directory: str | os.PathLike, rows: Sequence[dict], per_image: Sequence[dict] | None = None) -> list[Path]:
    """Write ``test_results.csv``, ``test_results.md`` and (optionally) ``test_per_image.csv``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metrics = _metric_names(rows)
    fields = ["model", "dataset", "source", "subset", "num_images", "num_samples", "all_empty_fraction",
              "conventions"]
    fields += [f for m in metrics for f in ([m] if m.endswith(POOLED_SUFFIX) else [f"{m}_mean", f"{m}_std"])]
    fields += [f"{m}_undefined" for m in metrics if any(f"{m}_undefined" in row for row in rows)]
    csv_path = directory / RESULTS_FILE
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    md_path = csv_path.with_suffix(".md")
    md_path.write_text(markdown_table(rows, metrics))
    written = [csv_path, md_path]
    if per_image:
        path = directory / "test_per_image.csv"
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(per_image[0]))
            writer.writeheader()
            writer.writerows(per_image)
        written.append(path)
    return written


def read_results(path: str | os.PathLike) -> list[dict]:
    """Rows of a ``test_results.csv`` (numbers as floats)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no results file at {path} (written by `probseg test`)")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "model" not in rows[0]:
        raise ValueError(f"{path} is not a probseg results file (no 'model' column)")
    for row in rows:
        for key, value in row.items():
            if key.endswith(("_mean", "_std", "_undefined", POOLED_SUFFIX)) or key in ("num_images", "num_samples",
                                                                          "all_empty_fraction"):
                row[key] = float(value) if value not in ("", None) else math.nan
                if key in ("num_images", "num_samples") and not math.isnan(row[key]):
                    row[key] = int(row[key])
        row["subset"] = row.get("subset") or "all"  # files written before subsets existed
    return rows


def find_results(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Results files named by ``paths``: files as given, folders searched recursively."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            hits = sorted(p.rglob(RESULTS_FILE))
            if not hits:
                raise FileNotFoundError(f"no {RESULTS_FILE} under {p}; run `probseg test` first")
            found.extend(hits)
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    return found


def gather(paths: Iterable[str | os.PathLike], table1: bool = True, subset: str = "all") -> str:
    """One Markdown table from several runs: every model row, and one oracle row per dataset.

    Args:
        paths: results files or folders holding them.
        table1: the paper's Table 1 columns (1 - IoU, 1 - Dice, Hausdorff, CE, Gini); False
            keeps every metric.
        subset: the images of the table, one of :data:`SUBSETS`.
    """
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {tuple(SUBSETS)}, got {subset!r}")
    rows: list[dict] = []
    oracles: dict[str, dict] = {}
    for path in find_results(paths):
        for row in read_results(path):
            if row["subset"] != subset:
                continue
            if row.get("source") == "oracle":
                oracles.setdefault(row.get("dataset", ""), row)
            else:
                rows.append(row)
    order = {"model": 0, "teacher": 1, "teacher_kde": 2}
    rows.sort(key=lambda r: (r.get("dataset", ""), r["model"], order.get(r.get("source", "model"), 3)))
    rows += [oracles[d] for d in sorted(oracles)]
    if table1:
        return markdown_table(rows, list(TABLE1_COLUMNS), TABLE1_COLUMNS)
    return markdown_table(rows)

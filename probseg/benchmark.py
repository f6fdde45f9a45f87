"""``probseg benchmark``: fit and test every model on every cross-validation fold, then write the
cSAE paper's Table 1 (models x kernels + GED + Gini) with the conventions it used.

Layout of the output folder ``OUT``::

    OUT/benchmark.json          the plan (configs, folds, seed, budget); a rerun must match it
    OUT/<model>/fold<k>/        the run folder of one fit + test (checkpoints, logs, splits.json,
                                results/test_results.csv, results/test_per_image.csv,
                                fit.log, test.log, done.json once tested)
    OUT/folds.csv               one row per model (and oracle) and fold: means and stds over images
    OUT/table1.csv, table1.md   mean ± std over folds, and mean ± std over all test images of all folds
    OUT/table1.png              the fold means with their spread (needs matplotlib)

Every model gets the same shared configs, seed (``seed_everything``), training budget
(``--max-steps``, overriding the configs' epochs) and folds. Each fold is tested on the best
checkpoint by ``val/loss`` (the papers' early-stopping protocol; ``--checkpoint last`` for the
last one); a run that never validated is tested on its last checkpoint. Folds come from the data module:
array-backed data (LIDC, QUBIQ, your own ``.npz``) use ``split_mode: paper`` (the first 20% of
the patients are the test set; the rest is cut into 3 folds, fold k validates); the synthetic
data uses ``fold`` (3-fold cross-validation of its training pool; fixed test images).

Resumable: a (model, fold) with ``done.json`` is skipped; an interrupted fit resumes from its
``last.ckpt`` (``--ckpt_path last``); a finished fit whose test was interrupted is only tested.
The tables are rebuilt from the per-fold results files at the end of every run.
"""

from __future__ import annotations

import csv
import importlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from probseg.results import RESULTS_FILE, read_results

PLAN_FILE = "benchmark.json"
CHECKPOINTS = ("best", "last")
DONE_FILE = "done.json"
FOLDS = (0, 1, 2)
TABLE_COLUMNS = {"hm_iou": "1 - IoU", "hm_dice": "1 - Dice", "hm_hausdorff": "Hausdorff", "hm_ce": "CE",
                 "ged": "GED", "gini": "Gini"}
"""Table 1's columns: the Hungarian-matched metric per kernel, GED and the Gini index."""


class BenchmarkError(RuntimeError):
    """A benchmark that cannot run or continue (the message names the file or run at fault)."""


# --- the plan ------------------------------------------------------------------------------------


def model_names(models: Sequence[str]) -> dict[str, Path]:
    """``NAME=PATH`` or ``PATH`` (named by the file's stem) -> {name: path}; names must be unique."""
    out: dict[str, Path] = {}
    for entry in models:
        name, eq, path = entry.partition("=")
        if not eq:
            name, path = Path(entry).stem, entry
        if not Path(path).is_file():
            raise BenchmarkError(f"model config not found: {path}")
        if not name.replace("-", "_").replace(".", "_").isidentifier():
            raise BenchmarkError(f"model name {name!r} (from {entry!r}) must be letters, digits, '-', '_' or '.'")
        if name in out:
            raise BenchmarkError(f"two model configs are named {name!r} ({out[name]} and {path}); "
                                 "name them: --models NAME=PATH ...")
        out[name] = Path(path)
    return out


def data_class_path(configs: Sequence[Path | str]) -> str:
    """The ``data.class_path`` of the configs (the last one that sets it, as the CLI merges them)."""
    import yaml

    found = None
    for path in configs:
        try:
            content = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise BenchmarkError(f"{path}: not a readable YAML config ({err})") from None
        data = content.get("data") if isinstance(content, dict) else None
        if isinstance(data, dict) and data.get("class_path"):
            found = str(data["class_path"])
    if found is None:
        raise BenchmarkError(f"none of {[str(c) for c in configs]} has a 'data' section with a class_path")
    return found


def fold_arguments(class_path: str, fold: int) -> list[str]:
    """The CLI options that select cross-validation ``fold`` of the data module ``class_path``."""
    import inspect

    from probseg.data.arrays import MultiRaterDataModule

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module or "probseg.data"), name)
    except (ImportError, AttributeError) as err:
        raise BenchmarkError(f"data class {class_path!r} cannot be imported ({err})") from None
    if isinstance(cls, type) and issubclass(cls, MultiRaterDataModule):
        return ["--data.init_args.split_mode", "paper", "--data.init_args.fold", str(fold)]
    if "fold" in inspect.signature(cls).parameters:
        return ["--data.init_args.fold", str(fold)]
    raise BenchmarkError(f"data class {class_path} has no cross-validation folds (no 'fold' argument)")


def make_plan(configs: Sequence[str], models: Sequence[str], folds: Sequence[int], seed: int, max_steps: int,
              extra: Sequence[str], checkpoint: str = "best") -> dict[str, Any]:
    """The benchmark's plan, as stored in ``benchmark.json`` (paths as given)."""
    if checkpoint not in CHECKPOINTS:
        raise BenchmarkError(f"--checkpoint must be one of {CHECKPOINTS}, got {checkpoint!r}")
    if max_steps < 1:
        raise BenchmarkError(f"--max-steps must be positive, got {max_steps}")
    bad = [f for f in folds if f not in FOLDS]
    if bad or not folds:
        raise BenchmarkError(f"folds must be a non-empty subset of {list(FOLDS)}, got {list(folds)}")
    for path in configs:
        if not Path(path).is_file():
            raise BenchmarkError(f"config not found: {path}")
    named = model_names(models)
    class_path = data_class_path([*configs, *named.values()])
    fold_arguments(class_path, folds[0])  # checks that the data has folds
    return {"configs": [str(c) for c in configs], "models": {k: str(v) for k, v in named.items()},
            "folds": sorted(set(folds)), "seed": seed, "max_steps": max_steps, "extra": list(extra),
            "data": class_path, "checkpoint": checkpoint}


def check_plan(out: Path, plan: dict[str, Any]) -> None:
    """Write the plan, or check that the one already in ``out`` is the same benchmark (a rerun
    resumes it; other models or folds may be added, the rest must match)."""
    path = out / PLAN_FILE
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise BenchmarkError(f"{path}: not a readable benchmark plan ({err})") from None
        fixed = ("configs", "seed", "max_steps", "extra", "data", "checkpoint")
        changed = [k for k in fixed if saved.get(k) != plan[k]]
        renamed = [m for m in set(saved.get("models", {})) & set(plan["models"]) if saved["models"][m] != plan["models"][m]]
        if changed or renamed:
            raise BenchmarkError(f"{path} holds another benchmark (differs in {changed + renamed}); use another "
                                 "output folder, or the same settings to resume it")
        plan = {**plan, "models": {**saved.get("models", {}), **plan["models"]},
                "folds": sorted(set(saved.get("folds", [])) | set(plan["folds"]))}
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{PLAN_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(plan, indent=1) + "\n")
    os.replace(tmp, path)


# --- running ---------------------------------------------------------------------------------------


def run_folder(out: Path, model: str, fold: int) -> Path:
    return out / model / f"fold{fold}"


def lightning_args(plan: dict[str, Any], model: str, fold: int, run: Path) -> list[str]:
    """The options shared by the fit and the test of one (model, fold)."""
    args = [a for c in plan["configs"] for a in ("--config", c)] + ["--config", plan["models"][model]]
    args += ["--trainer.default_root_dir", str(run), "--seed_everything", str(plan["seed"])]
    args += fold_arguments(plan["data"], fold)
    return args + list(plan["extra"])


def budget_args(plan: dict[str, Any]) -> list[str]:
    """The equal training budget of every run: ``max_steps`` steps, whatever the configs' epochs."""
    return ["--trainer.max_steps", str(plan["max_steps"]), "--trainer.max_epochs", "-1"]


def _run(command: list[str], log: Path) -> None:
    """Run a probseg command with its output in ``log``; a failure names the log and quotes its end."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as fh:
        fh.write(f"\n$ {' '.join(command)}\n")
        fh.flush()
        code = subprocess.call(command, stdout=fh, stderr=subprocess.STDOUT)
    if code != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise BenchmarkError(f"{' '.join(command[2:4])} failed (exit code {code}); log: {log}\n{tail}")


def run_one(plan: dict[str, Any], out: Path, model: str, fold: int, echo: Any = print) -> bool:
    """Fit and test one (model, fold) unless done; returns whether anything ran."""
    run = run_folder(out, model, fold)
    if (run / DONE_FILE).is_file() and (run / "results" / RESULTS_FILE).is_file():
        echo(f"  {model} fold {fold}: done, skipped")
        return False
    probseg = [sys.executable, "-m", "probseg"]
    common = lightning_args(plan, model, fold, run)
    started = time.time()
    if not (run / "fit.done").is_file():
        resume = (run / "checkpoints" / "last.ckpt").is_file()
        echo(f"  {model} fold {fold}: fit{' (resuming from last.ckpt)' if resume else ''}, log {run / 'fit.log'}")
        _run(probseg + ["fit", *common, *budget_args(plan), "--ckpt_path", "last"], run / "fit.log")
        (run / "fit.done").write_text(f"{time.time() - started:.1f}\n")
    checkpoint = tested_checkpoint(run, plan.get("checkpoint", "best"))
    echo(f"  {model} fold {fold}: test {checkpoint.name}, log {run / 'test.log'}")
    _run(probseg + ["test", *common, "--ckpt_path", str(checkpoint)], run / "test.log")
    done = {"seconds": round(time.time() - started, 1), "checkpoint": str(checkpoint)}
    (run / DONE_FILE).write_text(json.dumps(done) + "\n")
    return True


def tested_checkpoint(run: Path, which: str) -> Path:
    """The checkpoint a fold is tested on: ``last.ckpt``, or for "best" the best by the run's
    monitored metric as recorded in ``last.ckpt`` (last when the run never validated)."""
    import torch

    last = run / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise BenchmarkError(f"{run}: the fit wrote no checkpoints/last.ckpt to test")
    if which == "last":
        return last
    try:
        state = torch.load(last, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: name it
        raise BenchmarkError(f"{last}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    for key, value in (state.get("callbacks") or {}).items():
        best = value.get("best_model_path") if isinstance(value, dict) else None
        checkpointing = "ModelCheckpoint" in str(key) or "RunCheckpoint" in str(key)
        if checkpointing and best and (run / "checkpoints" / Path(best).name).is_file():
            return run / "checkpoints" / Path(best).name
    return last


# --- tables ----------------------------------------------------------------------------------------


def fold_rows(plan: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """The all-images results rows of every finished (model, fold), with ``fold`` and ``label``
    ("model" or "oracle"): one oracle row per fold, from the first model's run."""
    rows = []
    for i, model in enumerate(plan["models"]):
        for fold in plan["folds"]:
            path = run_folder(out, model, fold) / "results" / RESULTS_FILE
            if not path.is_file():
                continue
            for row in read_results(path):
                if row["subset"] != "all" or row.get("source") not in ("model", "oracle"):
                    continue
                if row["source"] == "oracle" and any(r["label"] == "oracle" and r["fold"] == fold for r in rows):
                    continue
                label = model if row["source"] == "model" else "oracle"
                rows.append({**row, "label": label, "fold": fold, "run": str(path.parent.parent)})
    return rows


def pooled(counts: Sequence[int], means: Sequence[float], stds: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std of the union of groups given their sizes, means and sample stds."""
    keep = [(n, m, 0.0 if (n < 2 or math.isnan(s)) else s) for n, m, s in zip(counts, means, stds)
            if n > 0 and not math.isnan(m)]
    total = sum(n for n, _, _ in keep)
    if total == 0:
        return math.nan, math.nan
    mean = sum(n * m for n, m, _ in keep) / total
    if total < 2:
        return mean, math.nan
    ss = sum((n - 1) * s * s + n * (m - mean) ** 2 for n, m, s in keep)
    return mean, math.sqrt(ss / (total - 1))


def summary_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per label: ``{metric}_fold_mean/_fold_std`` (over the fold means) and
    ``{metric}_image_mean/_image_std`` (over every test image of every fold)."""
    out = []
    labels = list(dict.fromkeys(r["label"] for r in rows))
    labels.sort(key=lambda label: label == "oracle")  # the reference row last
    for label in labels:
        mine = [r for r in rows if r["label"] == label]
        summary: dict[str, Any] = {"model": label, "folds": len(mine), "images": sum(r["num_images"] for r in mine),
                                   "num_samples": mine[0].get("num_samples"), "conventions": mine[0].get("conventions", "")}
        for metric in TABLE_COLUMNS:
            means = [r.get(f"{metric}_mean", math.nan) for r in mine]
            means = [m for m in means if isinstance(m, float) and not math.isnan(m)]
            if not means:
                continue
            summary[f"{metric}_fold_mean"] = sum(means) / len(means)
            summary[f"{metric}_fold_std"] = (
                math.sqrt(sum((m - summary[f"{metric}_fold_mean"]) ** 2 for m in means) / (len(means) - 1))
                if len(means) > 1 else math.nan)
            counts = [r["num_images"] - int(r.get(f"{metric}_undefined") or 0) for r in mine]
            stds = [r.get(f"{metric}_std", math.nan) for r in mine]
            summary[f"{metric}_image_mean"], summary[f"{metric}_image_std"] = pooled(
                counts, [r.get(f"{metric}_mean", math.nan) for r in mine], stds)
        out.append(summary)
    return out


def _cell(row: dict[str, Any], metric: str, over: str) -> str:
    mean, std = row.get(f"{metric}_{over}_mean"), row.get(f"{metric}_{over}_std")
    if mean is None or math.isnan(mean):
        return "–"
    return f"{mean:.3f}" if std is None or math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def conventions_note(plan: dict[str, Any], summaries: Sequence[dict[str, Any]]) -> str:
    """The sentence under the table that states how it was made."""
    conventions = sorted({s["conventions"] for s in summaries if s.get("conventions")})
    samples = sorted({str(s["num_samples"]) for s in summaries if s.get("num_samples") not in (None, "")})
    return (f"Conventions: {'; '.join(conventions) or 'not recorded'}; S = {', '.join(samples) or '?'} hypotheses "
            f"per image; all test images. Folds {plan['folds']} of the data's 3-fold cross-validation "
            f"({plan['data']}), seed {plan['seed']}, {plan['max_steps']} training steps per model and fold, "
            f"tested on the {plan.get('checkpoint', 'best')} checkpoint{' by val/loss (else the last)' if plan.get('checkpoint', 'best') == 'best' else ''}; "
            f"shared configs {plan['configs']}.")


def markdown(plan: dict[str, Any], summaries: Sequence[dict[str, Any]]) -> str:
    head = "| model | folds | " + " | ".join(TABLE_COLUMNS.values()) + " |"
    rule = "| --- | ---: | " + " | ".join("---:" for _ in TABLE_COLUMNS) + " |"
    parts = []
    for over, title in (("fold", "mean ± std over folds"), ("image", "mean ± std over the test images of all folds")):
        lines = [f"**{title}**", "", head, rule]
        for s in summaries:
            lines.append(f"| {s['model']} | {s['folds']} | " + " | ".join(_cell(s, m, over) for m in TABLE_COLUMNS) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n\n" + conventions_note(plan, summaries) + "\n"


def write_tables(plan: dict[str, Any], out: Path, echo: Any = print) -> list[Path]:
    """folds.csv, table1.csv, table1.md and (with matplotlib) table1.png from the per-fold files."""
    rows = fold_rows(plan, out)
    if not rows:
        raise BenchmarkError(f"{out}: no finished (model, fold) to tabulate")
    fold_fields = ["label", "fold", "num_images", "num_samples", "conventions", "run"]
    fold_fields += [f"{m}_{s}" for m in TABLE_COLUMNS for s in ("mean", "std")]
    written = [_write_csv(out / "folds.csv", rows, fold_fields)]
    summaries = summary_rows(rows)
    table_fields = ["model", "folds", "images", "num_samples", "conventions"]
    table_fields += [f"{m}_{o}_{s}" for m in TABLE_COLUMNS for o in ("fold", "image") for s in ("mean", "std")]
    written.append(_write_csv(out / "table1.csv", summaries, table_fields))
    (out / "table1.md").write_text(markdown(plan, summaries))
    written.append(out / "table1.md")
    figure = _figure(out / "table1.png", rows, summaries)
    if figure is None:
        echo("  table1.png skipped: matplotlib is not installed (pip install 'probseg[viz]')")
    else:
        written.append(figure)
    return written


def _write_csv(path: Path, rows: Sequence[dict[str, Any]], fields: list[str]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _figure(path: Path, rows: Sequence[dict[str, Any]], summaries: Sequence[dict[str, Any]]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    metrics = [m for m in TABLE_COLUMNS if any(f"{m}_fold_mean" in s for s in summaries)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.6 * len(metrics), 3.0), squeeze=False)
    labels = [s["model"] for s in summaries]
    for ax, metric in zip(axes[0], metrics):
        means = [s.get(f"{metric}_fold_mean", math.nan) for s in summaries]
        ax.bar(range(len(labels)), means, color="#9ecae1")
        for x, label in enumerate(labels):  # every fold's value, so the spread is visible
            values = [r.get(f"{metric}_mean", math.nan) for r in rows if r["label"] == label]
            ax.plot([x] * len(values), values, "k.", markersize=5)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_title(TABLE_COLUMNS[metric])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- entry point -------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    """``probseg benchmark``; returns the exit code."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="probseg benchmark",
        description="Fit and test every model on every fold with equal seeds and budgets, then write Table 1 "
        "(CSV, Markdown, figure) and per-fold files. Rerun the same command to resume. Other options "
        "(e.g. --data.init_args.num_train 200, --wandb disabled) go to every fit and test.",
    )
    parser.add_argument("--config", "-c", action="append", required=True,
                        help="shared config(s) with the data, trainer and callbacks (repeat for several)")
    parser.add_argument("--models", nargs="+", required=True, help="model configs, PATH or NAME=PATH")
    parser.add_argument("--out", required=True, help="output folder (one run folder per model and fold)")
    parser.add_argument("--folds", nargs="+", type=int, default=list(FOLDS), help="folds to run (default 0 1 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed_everything of every run (default 0)")
    parser.add_argument("--max-steps", type=int, default=2000,
                        help="training steps of every model and fold (default 2000; replaces the configs' epochs)")
    parser.add_argument("--checkpoint", choices=CHECKPOINTS, default="best",
                        help="test each fold on the best checkpoint by val/loss (default; the last when the run "
                        "never validated) or on the last one")
    parser.add_argument("--tables-only", action="store_true", help="rewrite the tables from the finished runs")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the configs and print every fit and test command, running and writing nothing")
    args, extra = parser.parse_known_args(argv)
    out = Path(args.out)
    try:
        plan = make_plan(args.config, args.models, args.folds, args.seed, args.max_steps, extra, args.checkpoint)
        if args.dry_run:
            for model in plan["models"]:
                for fold in plan["folds"]:
                    run = run_folder(out, model, fold)
                    common = lightning_args(plan, model, fold, run)
                    print(" ".join(["probseg", "fit", *common, *budget_args(plan), "--ckpt_path", "last"]))
                    print(" ".join(["probseg", "test", *common, "--ckpt_path", f"<{plan['checkpoint']} checkpoint of {run}>"]))
            return 0
        check_plan(out, plan)
        plan = json.loads((out / PLAN_FILE).read_text())
        if not args.tables_only:
            jobs = [(m, f) for m in plan["models"] for f in plan["folds"]]
            print(f"probseg benchmark: {len(plan['models'])} model(s) x {len(plan['folds'])} fold(s) in {out}")
            for i, (model, fold) in enumerate(jobs, 1):
                print(f"[{i}/{len(jobs)}] {model} fold {fold}", flush=True)
                run_one(plan, out, model, fold)
        written = write_tables(plan, out)
    except BenchmarkError as err:
        print(f"probseg benchmark: {err}", file=sys.stderr)
        return 1
    print((out / "table1.md").read_text(), end="")
    for path in written:
        print(f"written: {path}")
    return 0

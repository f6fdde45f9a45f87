"""Command-line entry point ``probseg``.

* ``probseg fit|validate|test|predict --config CFG``: Lightning's CLI. The model is chosen in YAML
  by registry name (``model: punet`` or ``class_path: punet``), class name or import path.
* ``probseg sample --ckpt PATH ...``: draw hypotheses from a checkpoint (see ``probseg sample -h``).
* ``probseg results RUN_DIR ...``: gather the ``test_results.csv`` of several runs into one
  Markdown table (see ``probseg results -h``).
* ``probseg benchmark --config CFG --models M1.yaml M2.yaml --out DIR``: fit and test every model
  on every cross-validation fold and write Table 1 (see :mod:`probseg.benchmark`).
* ``probseg data summary --config CFG``: counts and statistics of a data set, split by split.
* ``probseg convert lidc-pickle IN OUT.npz``: convert trusted pickles to the safe array format.
* ``probseg models``: list the registered models.

Logging defaults: a CSVLogger (``{default_root_dir}/logs``) and W&B in offline mode
(``{default_root_dir}/wandb``, no login, no network). ``--wandb online`` logs to the W&B server,
``--wandb disabled`` turns W&B off; offline runs upload later with ``wandb sync DIR``. Setting
``trainer.logger`` yourself replaces both.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

USAGE = """usage: probseg <command> [options]

Probabilistic image segmentation model zoo.

commands:
  fit        train a model            (probseg fit --config experiments/synthetic/base.yaml
                                        --config experiments/synthetic/punet.yaml)
  validate   evaluate on the validation split
  test       evaluate on the test split
  predict    draw hypotheses for the predict split
  sample     draw hypotheses from a checkpoint and write .npz files and PNG grids
  results    gather test results of several runs into one table (the cSAE paper's Table 1)
  benchmark  fit + test models over 3 cross-validation folds and write Table 1 (resumable)
  data       inspect a data set: 'probseg data summary --config CFG'
  convert    convert a data set to the safe array format: 'probseg convert lidc-pickle IN OUT.npz'
  models     list the registered models

Run 'probseg <command> --help' for the options of a command.
"""

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``probseg <command>``; returns the process exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command = args[0]
    if command in ("-V", "--version"):
        from probseg import __version__

        print(f"probseg {__version__}")
        return 0
    if command == "sample":
        from probseg.sampling import main as sample_main

        return sample_main(args[1:])
    if command == "results":
        return results_main(args[1:])
    if command == "benchmark":
        from probseg.benchmark import main as benchmark_main

        return benchmark_main(args[1:])
    if command == "data":
        return data_main(args[1:])
    if command == "convert":
        return convert_main(args[1:])
    if command == "models":
        from probseg.models import MODELS, class_path

        for name, cls in sorted(MODELS.items()):
            print(f"{name:<10} {class_path(cls)}")
        return 0
    if command in LIGHTNING_COMMANDS:
        from probseg.callbacks.checkpoint import CheckpointWriteError, RunLockedError

        try:
            run_lightning(args)
        except (RunLockedError, CheckpointWriteError) as err:  # expected conditions: a message, no traceback
            print(f"probseg {command}: {err}", file=sys.stderr)
            return 1
        return 0
    print(f"probseg: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def data_main(argv: list[str]) -> int:
    """``probseg data summary --config CFG``: counts and statistics of every split."""
    import argparse

    parser = argparse.ArgumentParser(prog="probseg data", description="Inspect the data of an experiment config.")
    sub = parser.add_subparsers(dest="action", required=True)
    summary = sub.add_parser("summary", help="images, patients, raters, sizes, intensities, empty masks and "
                             "inter-rater Dice per split")
    summary.add_argument("--config", "-c", required=True, help="experiment YAML with a 'data' section")
    args = parser.parse_args(argv)
    from probseg.data.config import datamodule_from_config
    from probseg.data.summary import format_summary, summarize

    try:
        datamodule = datamodule_from_config(args.config)
        table = format_summary(summarize(datamodule), title=f"{type(datamodule).__name__} ({args.config})")
    except (FileNotFoundError, ValueError, KeyError, PermissionError, ImportError) as err:
        print(f"probseg data summary: {err}", file=sys.stderr)
        return 1
    print(table, end="")
    return 0


def convert_main(argv: list[str]) -> int:
    """``probseg convert lidc-pickle IN [IN ...] OUT.npz``."""
    import argparse

    parser = argparse.ArgumentParser(prog="probseg convert", description="Convert a data set to the safe .npz format "
                                     "that the loaders read by default (no pickle).")
    sub = parser.add_subparsers(dest="kind", required=True)
    lidc = sub.add_parser("lidc-pickle", help="data_lidc.pickle file(s) of the PyTorch PU-Net port -> .npz. "
                          "Unpickling executes code from the file: convert only files you trust.")
    lidc.add_argument("inputs", nargs="+", help="pickle files or folders of *.pickle files")
    lidc.add_argument("output", help="the .npz to write")
    args = parser.parse_args(argv)
    from probseg.data.lidc import convert_lidc_pickle

    print("probseg convert: unpickling executes code from the input files; only convert files you trust.",
          file=sys.stderr)
    try:
        path = convert_lidc_pickle(args.inputs, args.output)
    except (OSError, ValueError) as err:
        print(f"probseg convert: {err}", file=sys.stderr)
        return 1
    print(f"written: {path}")
    return 0


def results_main(argv: list[str]) -> int:
    """``probseg results``: print (and optionally write) the gathered results table."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="probseg results",
        description="Gather the test_results.csv written by `probseg test` (files, or run folders searched "
        "recursively) into one Markdown table: one row per model run and one oracle row per dataset.",
    )
    parser.add_argument("paths", nargs="+", help="results files or run folders")
    parser.add_argument("--all-metrics", action="store_true",
                        help="every metric (default: the paper's Table 1: 1-IoU, 1-Dice, Hausdorff, CE, Gini)")
    parser.add_argument("--out", help="also write the table to this Markdown file")
    parser.add_argument("--subset", default="all", choices=("all", "any_rater", "all_raters"),
                        help="the images: all (default), those where some rater / every rater marks a structure")
    args = parser.parse_args(argv)
    from probseg.results import gather

    try:
        table = gather(args.paths, table1=not args.all_metrics, subset=args.subset)
    except (FileNotFoundError, ValueError) as err:
        print(f"probseg results: {err}", file=sys.stderr)
        return 1
    print(table, end="")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table)
        print(f"written: {args.out}")
    return 0


def run_lightning(args: list[str]) -> Any:
    """Run Lightning's CLI on ``args`` (subcommand first), registry names resolved."""
    failed = True
    try:
        result = build_cli(resolve_model_names(args))
        failed = False
        return result
    finally:
        # Close the W&B run, so a later command in the same process (a notebook) starts its own.
        wandb = sys.modules.get("wandb")
        if wandb is not None and getattr(wandb, "run", None) is not None:
            wandb.finish(exit_code=1 if failed else 0)


def build_cli(args: list[str], run: bool = True) -> Any:
    """Construct the probseg LightningCLI (imports Lightning, so kept out of ``--help``).

    The arguments go through ``sys.argv`` rather than LightningCLI's ``args``: Lightning's DDP
    launcher re-runs ``sys.argv`` in its child processes, which must see the same command.
    """
    from probseg.lightning_cli import ProbSegCLI

    argv = sys.argv
    sys.argv = [argv[0] if argv else "probseg", *args]
    try:
        return ProbSegCLI(run=run)
    finally:
        sys.argv = argv


def resolve_model_names(args: list[str]) -> list[str]:
    """Replace a registry name ("punet") given to ``--model`` or ``--model.class_path`` by its class
    path, and stop with the close names when it is a typo. Config files are left alone: the CLI's
    YAML loader resolves names inside them (:mod:`probseg.lightning_cli`)."""
    from probseg.lightning_cli import model_name_typo
    from probseg.models import MODELS, class_path

    out: list[str] = []
    i = 0
    while i < len(args):
        key, eq, value = args[i].partition("=")
        if key in ("--model", "--model.class_path") and (eq or i + 1 < len(args)):
            if not eq:
                i += 1
                value = args[i]
            typo = model_name_typo(value)
            if typo:
                print(f"probseg: {typo}", file=sys.stderr)
                raise SystemExit(2)
            out += [key, class_path(MODELS[value]) if value in MODELS else value]
        else:
            out.append(args[i])
        i += 1
    return out


if __name__ == "__main__":
    sys.exit(main())

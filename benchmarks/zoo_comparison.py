"""Every zoo model at an equal budget: the README's comparison table.

Trains each registered model (or ``--models``) for the same number of optimizer steps (batch 16,
one thread each) with the arguments of its ``experiments/synthetic/<name>.yaml`` (the small
networks of the synthetic configs; step-based schedules scaled to the budget: KL warm-up over the
first quarter, MoSE's relaxation lifted at half), on the built-in synthetic data and on a real
multi-rater ``.npz`` (the LIDC development set, split by patient), for several seeds. Then, on
each test split with S hypotheses per image (weighted for MoSE):

* GED (d = 1 - IoU), Hungarian-matched 1 - IoU, diversity, the Gini index of the prior's
  singular values (SSN: of its covariance factor; MoSE: its experts' sigmas; hierarchical
  models: every level's together, and per level in ``runs.csv``), on the synthetic data the
  lobe-probability error ratio to the deterministic predictor (``benchmarks/latent_study.py``);
* the sampling cost S = 16 / one hypothesis of the trained model on 8 test images (interleaved
  medians, one thread) and the training time.

Writes ``runs.csv`` (one row per run) and ``summary.md`` (mean ± std over seeds) under ``--out``.

Usage:
    python benchmarks/zoo_comparison.py --seeds 0 1 --steps 600 --out runs/zoo_comparison
    python benchmarks/zoo_comparison.py --models mose phiseg --datasets synthetic --steps 50
    python benchmarks/zoo_comparison.py --models hpunet hpunet:top_k=0 phiseg:kl_weighting=uniform
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latent_study import (
    data_module,
    oracle_row,
    run_jobs,
    summary_table,
    train_and_evaluate,
    training_curve,
)
from sampling import sampling_ratio

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("synthetic", "lidc")
METRICS = ["ged", "hm_iou", "diversity", "gini", "lobe_ratio", "sampling_ratio", "wall_s"]
CSV_FIELDS = ["dataset", "model", "seed", "steps", *METRICS, "gini_levels"]


def parse_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """"name" or "name:key=value:key=value" (values read as YAML) -> (registry name, overrides)."""
    name, *pairs = spec.split(":")
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"variant {spec!r}: expected name:key=value, got {pair!r}")
        overrides[key] = yaml.safe_load(value)
    return name, overrides


def model_args(name: str, steps: int, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model's arguments in experiments/synthetic/<name>.yaml, schedules scaled to ``steps``,
    then ``overrides``."""
    path = ROOT / "experiments" / "synthetic" / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no experiment config {path} for model {name!r}")
    args = dict(yaml.safe_load(path.read_text())["model"].get("init_args", {}))
    if args.get("kl_warmup_steps"):
        args["kl_warmup_steps"] = steps // 4
    if args.get("relaxation_steps"):
        args["relaxation_steps"] = steps // 2
    return {**args, **(overrides or {})}


def run_one(job: tuple[str, str, int, int, str, str, int]) -> dict[str, Any]:
    """Train one model for ``steps`` optimizer steps, evaluate it and time its sampling; one thread."""
    dataset, variant, seed, steps, lidc, out, num_samples = job
    name, overrides = parse_variant(variant)
    torch.set_num_threads(1)
    import lightning.pytorch as pl

    from probseg.metrics.functional import gini_index
    from probseg.models import MODELS

    pl.seed_everything(seed, verbose=False)
    model = MODELS[name](**model_args(name, steps, overrides))
    root = Path(out) / dataset / variant.replace(":", "_") / f"seed{seed}"
    values, dm, log = train_and_evaluate(model, dataset, lidc, root, steps, num_samples)
    row: dict[str, Any] = {"dataset": dataset, "model": variant, "seed": seed, "steps": steps, **values}
    test = dm.dataset("test")
    images = torch.stack([test[i]["image"] for i in range(min(8, len(test)))])
    row["sampling_ratio"] = sampling_ratio(model, images, 16, rounds=7)[1]
    with torch.inference_mode():
        per_level = model.network.prior_sigmas_per_level(images)
    if per_level:
        row["gini_levels"] = " ".join(f"{float(gini_index(s.double()).mean()):.3f}" for s in per_level.values())
    row.update(training_curve(log))
    return row


def main() -> None:
    from probseg.models import MODELS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--models", nargs="+", default=sorted(MODELS), metavar="MODEL",
                        help="registry names, or variants name:key=value[:key=value] (e.g. hpunet:top_k=0)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per run (batch 16)")
    parser.add_argument("--num-samples", type=int, default=16, help="hypotheses per test image")
    parser.add_argument("--lidc", default="../shared/data/lidc_dev.npz", help="multi-rater .npz for --datasets lidc")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--out", default="runs/zoo_comparison")
    args = parser.parse_args()
    if "lidc" in args.datasets and not Path(args.lidc).is_file():
        sys.exit(f"error: no such file: {args.lidc} (pass --lidc PATH, or leave lidc out of --datasets)")
    for variant in args.models:  # a bad name or option fails before any training
        name, overrides = parse_variant(variant)
        if name not in MODELS:
            sys.exit(f"error: unknown model {name!r} in {variant!r}; registered: {', '.join(sorted(MODELS))}")
        MODELS[name](**model_args(name, args.steps, overrides))
    jobs = [(d, m, s, args.steps, args.lidc, args.out, args.num_samples)
            for d in args.datasets for m in args.models for s in args.seeds]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "runs.csv"
    print(f"{len(jobs)} runs of {args.steps} steps, {args.jobs} at a time; rows go to {table}", flush=True)
    rows = run_jobs(jobs, run_one, table, CSV_FIELDS, args.jobs, lambda row: (
        f"{row['dataset']} {row['model']} seed {row['seed']}: GED {row['ged']:.3f}, HM-IoU {row['hm_iou']:.3f}, "
        f"diversity {row['diversity']:.3f}, S=16 cost {row['sampling_ratio']:.2f}x, {row['wall_s']:.0f} s"))
    oracle = {}
    if "synthetic" in args.datasets:
        oracle["synthetic"] = oracle_row(data_module("synthetic", args.lidc), args.num_samples)
    summary = summary_table(rows, oracle, "model", args.models, METRICS, list(DATASETS))
    (out / "summary.md").write_text(summary + "\n")
    print(summary)


if __name__ == "__main__":
    main()

"""Which latent-model readings and posterior-collapse remedies learn the raters' distribution?

Trains every variant below for the same number of steps, for several seeds, on the built-in
synthetic data and on a real multi-rater ``.npz`` (e.g. the LIDC development set), then
evaluates each on its test split with S hypotheses per image:

* GED (d = 1 - IoU), Hungarian-matched 1 - IoU, the hypotheses' diversity (mean 1 - IoU over
  pairs), the Gini index of the prior's sigmas at test time and over training (first / last
  logged value), and the KL per latent dimension at the end of training;
* on the synthetic data also the lobe-probability error: mean |q - p| between the fraction q of
  hypotheses that include an image's lobe and its known probability p, as a ratio to the
  deterministic predictor (q = [p > 0.5]); and an oracle row (S draws of the true raters).

Results: one CSV row per run and a Markdown table of mean ± std over seeds, printed and written
to ``--out``. Runs go ``--jobs`` at a time, one thread each.

Usage:
    python benchmarks/latent_study.py --datasets synthetic --seeds 0 1 2 --out runs/latent_study
    python benchmarks/latent_study.py --datasets lidc --lidc ../shared/data/lidc_dev.npz
    python benchmarks/latent_study.py --list     # the variants and what they set
"""

from __future__ import annotations

import argparse
import csv
import math
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

# name: (registry model, arguments on top of the dataset's base arguments). "paper" is the
# cSAE's literal reading (flowed reconstruction, one rater's posterior in the Sinkhorn term).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "unet": ("unet", {}),
    "punet": ("punet", {}),
    "punet+warmup": ("punet", {"kl_warmup_steps": "warmup"}),
    "punet+freebits": ("punet", {"free_bits": 0.1}),
    "planar": ("planar", {}),
    "planar+warmup": ("planar", {"kl_warmup_steps": "warmup"}),
    "csae-paper": ("csae", {"reconstruct_from": "flowed", "sinkhorn_posterior": "one_rater"}),
    "csae-flowed-all": ("csae", {"reconstruct_from": "flowed", "sinkhorn_posterior": "all_raters"}),
    "csae-base": ("csae", {"reconstruct_from": "base", "sinkhorn_posterior": "one_rater"}),
    "csae-base-all": ("csae", {"reconstruct_from": "base", "sinkhorn_posterior": "all_raters"}),
    "csae-base+warmup": ("csae", {"reconstruct_from": "base", "kl_warmup_steps": "warmup"}),
    "csae-base-gamma1": ("csae", {"reconstruct_from": "base", "gamma": 1.0}),
}

NETWORK = {"in_channels": 1, "num_classes": 2, "num_filters": [8, 16, 32, 32], "convs_per_block": 1,
           "latent_dim": 6, "fcomb_layers": 4}
# Per dataset, the latent models' weights as in the repository's configs: beta 1 and gamma 1 on the
# synthetic data (experiments/synthetic), the paper's LIDC settings beta 10 and gamma 10 on LIDC.
DATASETS: dict[str, dict[str, Any]] = {
    "synthetic": {"latent": {"beta": 1.0}, "csae": {"beta": 1.0, "gamma": 1.0}},
    "lidc": {"latent": {"beta": 10.0}, "csae": {"beta": 10.0, "gamma": 10.0}},
}
CSV_FIELDS = ["dataset", "variant", "seed", "steps", "ged", "hm_iou", "diversity", "gini", "gini_first",
              "gini_last", "kl_dims_active", "kl_total", "lobe_ratio", "wall_s"]


def model_args(dataset: str, variant: str, steps: int) -> tuple[str, dict[str, Any]]:
    name, extra = VARIANTS[variant]
    args: dict[str, Any] = {**NETWORK, "lr": 1e-3, "weight_decay": 5e-5}
    if name == "unet":  # the deterministic reference: no latent space
        args = {k: v for k, v in args.items() if k not in ("latent_dim", "fcomb_layers")}
    else:
        args.update(DATASETS[dataset]["csae" if name == "csae" else "latent"])
    for key, value in extra.items():
        args[key] = steps // 4 if value == "warmup" else value  # warm-up over the first quarter
    return name, args


def data_module(dataset: str, lidc: str) -> Any:
    if dataset == "synthetic":
        from probseg.data import SyntheticDataModule

        return SyntheticDataModule(image_size=64, num_train=400, num_val=40, num_test=100, num_raters=4, seed=0,
                                   batch_size=16)
    from probseg.data import ArrayDataModule

    # split by patient, the same split for every seed and variant
    return ArrayDataModule(lidc, split_mode="random", seed=0, batch_size=16)


def test_batches(ds: Any, batch_size: int) -> Any:
    """(start, images, masks, rater_mask or None, one generator per image seeded by its index) for
    consecutive batches of a split: hypotheses do not depend on the batching."""
    for start in range(0, len(ds), batch_size):
        items = [ds[i] for i in range(start, min(start + batch_size, len(ds)))]
        rater_mask = torch.stack([it["rater_mask"] for it in items]) if "rater_mask" in items[0] else None
        yield (start, torch.stack([it["image"] for it in items]), torch.stack([it["masks"] for it in items]),
               rater_mask, [torch.Generator().manual_seed(start + i) for i in range(len(items))])


def evaluate(model: Any, dm: Any, num_samples: int) -> dict[str, float]:
    from probseg.metrics.functional import (
        empirical_wasserstein,
        generalized_energy_distance,
        gini_index,
        sample_diversity,
    )

    ds = dm.dataset("test")
    values: dict[str, list[float]] = {"ged": [], "hm_iou": [], "diversity": [], "gini": []}
    lobe: list[tuple[float, float]] = []
    with torch.inference_mode():
        for start, images, masks, rater_mask, generators in test_batches(ds, 16):
            weight = None
            if model.weighted:  # a mixture's hypotheses carry weights (MoSE)
                logits, weight = model.sample_weighted(images, num_samples, generator=generators)
            else:
                logits = model.sample(images, num_samples, generator=generators)
            pred = logits.argmax(2)  # (B, S, H, W)
            fg, raters = pred == 1, masks == 1
            values["ged"] += generalized_energy_distance(fg, raters, rater_mask, sample_weight=weight).tolist()
            values["hm_iou"] += empirical_wasserstein(fg, raters, "iou", rater_mask, sample_weight=weight).tolist()
            values["diversity"] += sample_diversity(fg, sample_weight=weight).tolist()
            sigmas = model.prior_sigmas(images)
            if sigmas is not None:
                values["gini"] += gini_index(sigmas.double()).tolist()
            if hasattr(ds, "lobe_region"):
                for j, i in enumerate(range(start, start + len(images))):
                    if ds.lobe_region(i).any():
                        included = ds.lobe_included(i, pred[j]).float()
                        q = included.mean() if weight is None else (included * weight[j] / weight[j].sum()).sum()
                        lobe.append((ds.case(i).lobe_probability, q.item()))
    out = {k: float(np.mean(v)) if v else math.nan for k, v in values.items()}
    if lobe:
        p, q = map(np.array, zip(*lobe))
        out["lobe_ratio"] = float(np.abs(q - p).mean() / np.abs((p > 0.5) - p).mean())
    return out


def oracle_row(dm: Any, num_samples: int) -> dict[str, float]:
    """S draws of the synthetic data's true rater distribution, as hypotheses."""
    from probseg.metrics.functional import empirical_wasserstein, generalized_energy_distance, sample_diversity

    ds = dm.dataset("test")
    ged, hm, div, lobe = [], [], [], []
    for i in range(len(ds)):
        draws = ds.sample_oracle(i, num_samples, generator=i)[None] == 1
        raters = ds[i]["masks"][None] == 1
        ged += generalized_energy_distance(draws, raters).tolist()
        hm += empirical_wasserstein(draws, raters, "iou").tolist()
        div += sample_diversity(draws).tolist()
        if ds.lobe_region(i).any():
            p = ds.case(i).lobe_probability
            lobe.append((p, ds.lobe_included(i, draws[0].long()).float().mean().item()))
    p, q = map(np.array, zip(*lobe))
    return {"ged": float(np.mean(ged)), "hm_iou": float(np.mean(hm)), "diversity": float(np.mean(div)),
            "lobe_ratio": float(np.abs(q - p).mean() / np.abs((p > 0.5) - p).mean())}


def train_and_evaluate(model: Any, dataset: str, lidc: str, root: Path, steps: int, num_samples: int
                       ) -> tuple[dict[str, Any], Any, Path]:
    """Train ``model`` for ``steps`` optimizer steps (batch 16, CSV log and run folder under
    ``root``, the Gini logged 20 times), then evaluate it on the test split with ``num_samples``
    hypotheses. Returns (evaluation values with ``wall_s``, the data module, the CSV log)."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from probseg.callbacks import GiniCallback

    dm = data_module(dataset, lidc)
    logger = CSVLogger(str(root), name="logs")
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=logger, enable_checkpointing=False,
                         default_root_dir=str(root),
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=10,
                         limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=1.0,
                         callbacks=[GiniCallback(every_n_steps=max(1, steps // 20))])
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    wall = time.perf_counter() - start
    model.eval()
    dm.setup("test")
    return {**evaluate(model, dm, num_samples), "wall_s": wall}, dm, Path(logger.log_dir) / "metrics.csv"


def run_one(job: tuple[str, str, int, int, str, str, int]) -> dict[str, Any]:
    """Train one variant for ``steps`` optimizer steps and evaluate it; one thread."""
    dataset, variant, seed, steps, lidc, out, num_samples = job
    torch.set_num_threads(1)
    import lightning.pytorch as pl

    from probseg.models import MODELS

    pl.seed_everything(seed, verbose=False)
    name, args = model_args(dataset, variant, steps)
    model = MODELS[name](**args)
    values, _, log = train_and_evaluate(model, dataset, lidc, Path(out) / dataset / variant / f"seed{seed}", steps,
                                        num_samples)
    row: dict[str, Any] = {"dataset": dataset, "variant": variant, "seed": seed, "steps": steps, **values}
    row.update(training_curve(log))
    return row


def training_curve(path: Path) -> dict[str, float]:
    """First and last logged Gini, the KL per dimension at the end: how many dimensions carry
    more than 0.01 nats, and their total."""
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    gini = [float(r["train/gini"]) for r in rows if r.get("train/gini")]
    dims = sorted(k for k in (rows[0].keys() if rows else ()) if k.startswith("train/kl_dim"))
    last = [r for r in rows if dims and all(r.get(k) for k in dims)][-5:]
    out: dict[str, float] = {}
    if gini:
        out.update(gini_first=gini[0], gini_last=gini[-1])
    if last:
        per_dim = np.mean([[float(r[k]) for k in dims] for r in last], axis=0)
        out.update(kl_dims_active=float((per_dim > 0.01).sum()), kl_total=float(per_dim.sum()))
    return out


def summary_table(rows: list[dict[str, Any]], oracle: dict[str, dict[str, float]], key: str, order: list[str],
                  metrics: list[str], datasets: list[str]) -> str:
    """Markdown tables, one per dataset: a row per ``key`` value in ``order`` with mean ± std over
    its runs of each metric, then the oracle row when there is one."""
    lines = []
    for dataset in [d for d in datasets if any(r["dataset"] == d for r in rows)]:
        lines += [f"\n### {dataset} (mean ± std over seeds)\n",
                  f"| {key} | seeds | " + " | ".join(metrics) + " |",
                  "| --- | ---: | " + " | ".join("---:" for _ in metrics) + " |"]
        for name in order:
            group = [r for r in rows if r["dataset"] == dataset and r[key] == name]
            if not group:
                continue
            cells = []
            for m in metrics:
                vals = np.array([float(r.get(m, math.nan)) for r in group], dtype=float)
                vals = vals[~np.isnan(vals)]
                cells.append("–" if not len(vals) else f"{vals.mean():.3f} ± {vals.std(ddof=1) if len(vals) > 1 else 0:.3f}")
            lines.append(f"| {name} | {len(group)} | " + " | ".join(cells) + " |")
        if dataset in oracle:
            o = oracle[dataset]
            lines.append("| oracle | – | " + " | ".join(f"{o[m]:.3f}" if m in o else "–" for m in metrics) + " |")
    return "\n".join(lines)


def run_jobs(jobs: list[tuple], worker: Any, table: Path, fields: list[str], processes: int,
             describe: Any) -> list[dict[str, Any]]:
    """Run ``worker`` over ``jobs`` in ``processes`` fresh processes (one job each), writing each
    row to the CSV ``table`` as it arrives and printing ``describe(row)``."""
    rows: list[dict[str, Any]] = []
    with mp.get_context("spawn").Pool(processes, maxtasksperchild=1) as pool, open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for n, row in enumerate(pool.imap_unordered(worker, jobs), 1):
            rows.append(row)
            writer.writerow(row)
            f.flush()
            print(f"[{n}/{len(jobs)}] {describe(row)}", flush=True)
    return rows


def summarize(rows: list[dict[str, Any]], oracle: dict[str, dict[str, float]]) -> str:
    metrics = ["ged", "hm_iou", "diversity", "gini", "gini_first", "gini_last", "kl_dims_active", "kl_total",
               "lobe_ratio", "wall_s"]
    return summary_table(rows, oracle, "variant", list(VARIANTS), metrics, sorted(DATASETS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["synthetic"], choices=sorted(DATASETS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=500, help="optimizer steps per run (batch 16)")
    parser.add_argument("--num-samples", type=int, default=16, help="hypotheses per test image")
    parser.add_argument("--lidc", default="../shared/data/lidc_dev.npz", help="multi-rater .npz for --datasets lidc")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--out", default="runs/latent_study")
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    args = parser.parse_args()
    if args.list:
        for variant, (name, extra) in VARIANTS.items():
            print(f"{variant:18s} {name:7s} {extra}")
        return
    if "lidc" in args.datasets and not Path(args.lidc).is_file():
        sys.exit(f"error: no such file: {args.lidc} (pass --lidc PATH, or leave lidc out of --datasets)")
    jobs = [(d, v, s, args.steps, args.lidc, args.out, args.num_samples)
            for d in args.datasets for v in args.variants for s in args.seeds]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "runs.csv"
    print(f"{len(jobs)} runs of {args.steps} steps, {args.jobs} at a time; rows go to {table}", flush=True)
    rows = run_jobs(jobs, run_one, table, CSV_FIELDS, args.jobs, lambda row: (
        f"{row['dataset']} {row['variant']} seed {row['seed']}: GED {row['ged']:.3f}, HM-IoU {row['hm_iou']:.3f}, "
        f"diversity {row['diversity']:.3f}, {row['wall_s']:.0f} s"))
    oracle = {}
    if "synthetic" in args.datasets:
        oracle["synthetic"] = oracle_row(data_module("synthetic", args.lidc), args.num_samples)
    summary = summarize(rows, oracle)
    (out / "summary.md").write_text(summary + "\n")
    print(summary)


if __name__ == "__main__":
    main()

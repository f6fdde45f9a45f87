"""Do soft labels improve calibration and BDice over hard labels? Wang et al.'s Table 2 claim,
checked on real multi-rater data.

Trains a deterministic U-Net with each label fusion of the raters (hard: majority vote, one random
rater per step; soft: uniform mean, Dice-weighted mean, label smoothing of the majority vote on
its boundary), all with the paper's loss and reference recipe (0.25 CE + 0.75 DML1,
``recipe: paper``: README, "Soft labels and distillation as in Wang et al."), for the same number
of steps and several seeds, then evaluates each on the test split (split by patient):

* Dice and ECE of the prediction against the raters' majority vote (as the paper computes them),
  per image (mean over images) and pooled over every pixel of the test set (``*_pooled``);
* BDice: Dice of prediction and mean rater map both thresholded at 0.1 ... 0.9, averaged.

``--latent`` adds the latent models' rows (issue 21, item 5): the PU-Net trained on one random
rater per step (its native objective), on the fused mean (the diversity collapses), and with the
mixed objective when the model offers it; for these the table also reports GED, the Hungarian-
matched 1 - IoU and the hypotheses' diversity with S hypotheses per image.

One CSV row per run and a Markdown table of mean ± std over seeds go to ``--out``. Runs go
``--jobs`` at a time, one thread each.

Usage:
    python benchmarks/soft_label_study.py --lidc ../shared/data/lidc_dev.npz --seeds 0 1 2 --steps 1500
    python benchmarks/soft_label_study.py --dataset synthetic --latent --steps 300
    python benchmarks/soft_label_study.py --list
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from latent_study import run_jobs, summary_table, test_batches

# The paper's recipe on every row: its loss mixture and the reference code's reductions and fusion
# edge cases. Only the fusion differs between the deterministic rows.
PAPER = {"reconstruction": {"ce": 0.25, "dml1": 0.75}, "loss_options": {"recipe": "paper"},
         "fusion_options": {"recipe": "paper"}}

# name: (registry model, arguments on top of the network and PAPER)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "majority": ("unet", {"fusion": "majority"}),
    "random": ("unet", {"fusion": "random"}),
    "mean": ("unet", {"fusion": "mean"}),
    "weighted_mean": ("unet", {"fusion": "weighted_mean"}),
    "label_smoothing": ("unet", {"fusion": "label_smoothing", "label_smoothing": 0.5}),
}
LATENT_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "punet-random": ("punet", {"fusion": "random"}),
    "punet-mean": ("punet", {"fusion": "mean"}),
}
"""Rows of ``--latent``; the mixed objective's rows are added when the PU-Net has it."""

NETWORK = {"in_channels": 1, "num_classes": 2, "num_filters": [16, 32, 64, 64], "convs_per_block": 2}
IMAGE_SIZE = 64
"""Both datasets are 64 x 64 crops (checked at run time)."""
LATENT = {"latent_dim": 6, "fcomb_layers": 4,
          # The paper's CE is 0.25 x its mean over pixels, so the KL gets the same factor per pixel:
          # against the CE it weighs as in the ELBO with summed CE and beta 1.
          "beta": PAPER["reconstruction"]["ce"] / IMAGE_SIZE**2}

CSV_FIELDS = ["dataset", "variant", "seed", "steps", "dice", "dice_pooled", "bdice", "ece", "ece_pooled", "ged",
              "hm_iou", "diversity", "wall_s"]
METRICS = ["dice", "dice_pooled", "bdice", "ece", "ece_pooled", "ged", "hm_iou", "diversity", "wall_s"]


def mixed_variants() -> dict[str, tuple[str, dict[str, Any]]]:
    """The mixed objective's rows, when the task takes ``soft_region`` (a shared option of every
    zoo model: one random rater for the posterior and reconstruction, a DML1 term between the
    predictive mean of M prior hypotheses and the fused mean): weight 1 with M = 4 (the
    default), a tenth of the weight, and M = 16 (the M-sample mean is noisy, and the noise costs
    DML1 in proportion to the hypotheses' spread)."""
    import inspect

    from probseg.models import ProbSegModel

    if "soft_region" not in inspect.signature(ProbSegModel.__init__).parameters:
        return {}
    rows = {"punet-random+soft": {"fusion": "mean", "weight": 1.0},
            "punet-random+soft0.1": {"fusion": "mean", "weight": 0.1},
            "punet-random+soft-m16": {"fusion": "mean", "weight": 1.0, "samples": 16}}
    return {name: ("punet", {"fusion": "random", "soft_region": option}) for name, option in rows.items()}


def all_variants(latent: bool) -> dict[str, tuple[str, dict[str, Any]]]:
    return {**VARIANTS, **(LATENT_VARIANTS | mixed_variants() if latent else {})}


def model_args(variant: str, latent: bool, lr: float) -> tuple[str, dict[str, Any]]:
    name, extra = all_variants(latent)[variant]
    args: dict[str, Any] = {**NETWORK, "lr": lr, "weight_decay": 5e-5, **PAPER, **extra}
    if name != "unet":
        args.update(LATENT)
    return name, args


def data_module(dataset: str, lidc: str, batch_size: int) -> Any:
    if dataset == "synthetic":
        from probseg.data import SyntheticDataModule

        return SyntheticDataModule(image_size=64, num_train=400, num_val=40, num_test=100, num_raters=4, seed=0,
                                   batch_size=batch_size)
    from probseg.data import ArrayDataModule

    # split by patient; the same split for every seed and variant
    return ArrayDataModule(lidc, split_mode="random", seed=0, batch_size=batch_size)


def evaluate(model: Any, dm: Any, num_samples: int) -> dict[str, float]:
    """Per-image means and pooled values of the mean prediction; set metrics for latent models."""
    from probseg.metrics import functional as F
    from probseg.metrics.hypotheses import mean_prediction_statistics, pooled_values

    ds = dm.dataset("test")
    samples = 1 if model.deterministic else num_samples
    values: dict[str, list[float]] = {"dice": [], "bdice": [], "ece": [], "ged": [], "hm_iou": [], "diversity": []}
    statistics: dict[str, list[torch.Tensor]] = {"ece": [], "dice": []}
    with torch.inference_mode():
        for _, images, masks, rater_mask, generators in test_batches(ds, 32):
            probs = model.sample(images, samples, generator=generators).softmax(2)  # (B, S, K, H, W)
            per_image, stats = mean_prediction_statistics(probs, masks, rater_mask)
            for key in ("dice", "bdice", "ece"):
                values[key] += per_image[key].tolist()
            for key, collected in statistics.items():
                collected.append(stats[key])
            if not model.deterministic:
                fg, raters = probs.argmax(2) == 1, masks == 1
                # one set of 1 - IoU costs for GED, the matching and the diversity
                cross, within = F.pairwise_cost(fg, raters, "iou"), F.pairwise_cost(fg, fg, "iou")
                within_raters = F.pairwise_cost(raters, raters, "iou")
                values["ged"] += F.energy_distance_from_costs(cross, within, within_raters, rater_mask).tolist()
                values["hm_iou"] += F.matched_cost(cross, rater_mask).tolist()
                values["diversity"] += F.diversity_from_costs(within).tolist()
    out = {k: float(np.mean(v)) if v else math.nan for k, v in values.items()}
    out.update({k: float(v) for k, v in pooled_values({k: torch.cat(v) for k, v in statistics.items()}).items()})
    return out


def run_one(job: tuple) -> dict[str, Any]:
    """Train one variant for ``steps`` optimizer steps and evaluate it; one thread."""
    dataset, variant, seed, steps, lidc, out, num_samples, latent, lr, batch_size = job
    torch.set_num_threads(1)
    import lightning.pytorch as pl

    from probseg.models import MODELS

    pl.seed_everything(seed, verbose=False)
    name, args = model_args(variant, latent, lr)
    model = MODELS[name](**args)
    dm = data_module(dataset, lidc, batch_size)
    dm.setup("fit")
    size = tuple(dm.dataset("train")[0]["image"].shape[-2:])
    if size != (IMAGE_SIZE, IMAGE_SIZE):
        raise SystemExit(f"{dataset}: images are {size}, the latent rows' beta assumes {IMAGE_SIZE}x{IMAGE_SIZE}")
    root = Path(out) / dataset / variant / f"seed{seed}"
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         default_root_dir=str(root), enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=1.0)
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    wall = time.perf_counter() - start
    model.eval()
    dm.setup("test")
    return {"dataset": dataset, "variant": variant, "seed": seed, "steps": steps,
            **evaluate(model, dm, num_samples), "wall_s": wall}


def percent(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Dice, BDice and ECE in percent, as the paper prints them."""
    scaled = ("dice", "dice_pooled", "bdice", "ece", "ece_pooled")
    return [{k: (100 * v if k in scaled and isinstance(v, float) else v) for k, v in r.items()} for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="lidc", choices=["lidc", "synthetic"])
    parser.add_argument("--lidc", default="../shared/data/lidc_dev.npz", help="multi-rater .npz for --dataset lidc")
    parser.add_argument("--variants", nargs="+", default=None, metavar="VARIANT",
                        help="rows to run (default: every row; see --list)")
    parser.add_argument("--latent", action="store_true", help="add the latent models' rows (issue 21, item 5)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--num-samples", type=int, default=16, help="hypotheses per test image (latent models)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--out", default="runs/soft_label_study")
    parser.add_argument("--list", action="store_true", help="print the rows and exit")
    args = parser.parse_args()
    variants = all_variants(args.latent)
    if args.list:
        for variant, (name, extra) in variants.items():
            print(f"{variant:20s} {name:6s} {extra}")
        return
    unknown = sorted(set(args.variants or ()) - set(variants))
    if unknown:
        sys.exit(f"error: unknown rows {unknown}; expected names from {list(variants)} (--latent adds the latent rows)")
    if args.dataset == "lidc" and not Path(args.lidc).is_file():
        sys.exit(f"error: no such file: {args.lidc} (pass --lidc PATH, or --dataset synthetic)")
    chosen = args.variants or list(variants)
    jobs = [(args.dataset, v, s, args.steps, args.lidc, args.out, args.num_samples, args.latent, args.lr,
             args.batch_size) for v in chosen for s in args.seeds]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "runs.csv"
    print(f"{len(jobs)} runs of {args.steps} steps, {args.jobs} at a time; rows go to {table}", flush=True)
    rows = run_jobs(jobs, run_one, table, CSV_FIELDS, args.jobs, lambda row: (
        f"{row['variant']} seed {row['seed']}: Dice {100 * row['dice']:.2f}, BDice {100 * row['bdice']:.2f}, "
        f"ECE {100 * row['ece']:.3f} %, {row['wall_s']:.0f} s"))
    summary = ("Dice, BDice and ECE in %; Dice and ECE against the raters' majority vote.\n"
               + summary_table(percent(rows), {}, "variant", chosen, METRICS, [args.dataset]))
    (out / "summary.md").write_text(summary + "\n")
    print(summary)


if __name__ == "__main__":
    main()

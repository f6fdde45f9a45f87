"""How much the evaluation conventions alone move the numbers, on one fixed set of predictions.

Trains a PU-Net and a cSAE briefly (same steps, seed and data: the real LIDC development crops
by default, 3 or 4 raters per image, so R does not always divide S), draws S hypotheses per test
image once (saved to ``--out``/hypotheses.npz: the fixed predictions), then evaluates both
models' hypotheses under each convention set, changing one option at a time from probseg's
defaults:

* GED with self-pairs (default) or distinct pairs only;
* 16 or 100 hypotheses;
* matching: exact optimal transport ``lcm`` (default), the cSAE paper's ``tile``, ``rectangular``;
* the CE kernel read as a per-pixel ``mean`` (default), eq. 19's ``sum``, or ``binarized``;
* the Gini of the sigmas (default) or of the variances;
* all images, or only those where every rater marks the nodule.

Prints, per convention, both models' means and their difference, and the largest change a
convention alone makes next to the difference between the models.

Then, on the PU-Net's fixed predictions, each peer's published evaluation (PHiSeg, MoSE, CCDM,
Flow-SSN: GED and, where the peer has one, the Hungarian-matched IoU, at the peer's number of
hypotheses) computed twice: by probseg with the options that state the peer's conventions, and by
the independent re-statement of the peer's code in ``tests/metrics/peer_evaluation.py`` (plain
loops over pairs; its tests check the two agree on random sets). ``--reuse`` reads the fixed
predictions of an earlier run instead of training again.

Usage:
    python benchmarks/conventions.py --data ../shared/data/lidc_dev.npz --steps 300 --out runs/conventions
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

SETTINGS: dict[str, dict[str, Any]] = {
    "probseg defaults": {},
    "GED without self-pairs": {"self_pairs": False},
    "16 of the 100 hypotheses": {"num_samples": 16},
    "matching: tile (cSAE paper)": {"matching": "tile"},
    "matching: rectangular": {"matching": "rectangular"},
    "CE: sum over pixels (eq. 19)": {"ce_reading": "sum"},
    "CE: binarized (Table 1's scale)": {"ce_reading": "binarized"},
    "Gini of the variances": {"gini_of": "variance"},
    "images every rater marks": {"subset": "all_raters"},
}
METRICS = ("ged", "hm_iou", "hm_ce", "gini")
RESCALING = {"CE: sum over pixels (eq. 19)", "CE: binarized (Table 1's scale)"}
"""Readings that change the CE's unit, not the comparison: left out of the largest change."""


def train(name: str, data: str, steps: int, seed: int, root: Path) -> Any:
    import lightning.pytorch as pl

    from probseg.data import ArrayDataModule
    from probseg.models import MODELS

    pl.seed_everything(seed, verbose=False)
    args = {"num_filters": [8, 16, 32, 32], "convs_per_block": 1, "latent_dim": 6, "lr": 1e-3}
    model = MODELS[name](**args)
    dm = ArrayDataModule(data, split_mode="random", seed=0, batch_size=16)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         default_root_dir=str(root),
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, gradient_clip_val=1.0)
    trainer.fit(model, datamodule=dm)
    dm.setup("test")
    return model.eval(), dm.dataset("test")


def hypotheses(model: Any, dataset: Any, num_samples: int, num_images: int) -> dict[str, np.ndarray]:
    """S hypotheses (foreground probabilities, float16) of the first test images, per-image
    seeded, and the prior sigmas."""
    probs, sigmas = [], []
    with torch.inference_mode():
        for start in range(0, num_images, 16):
            items = [dataset[i] for i in range(start, min(start + 16, num_images))]
            images = torch.stack([it["image"] for it in items])
            generators = [torch.Generator().manual_seed(start + i) for i in range(len(items))]
            probs.append(model.sample(images, num_samples, generator=generators).softmax(2)[:, :, 1].numpy())
            sigmas.append(model.prior_sigmas(images).numpy())
    return {"probs": np.concatenate(probs).astype(np.float16), "sigma": np.concatenate(sigmas)}


def evaluate(probs: np.ndarray, masks: np.ndarray, rater_mask: np.ndarray, sigma: np.ndarray,
             options: dict[str, Any]) -> dict[str, float]:
    from probseg.metrics import HypothesisMetrics
    from probseg.results import subset_mask

    s = options.get("num_samples", probs.shape[1])
    p = torch.from_numpy(probs[:, :s].astype(np.float32))
    metric = HypothesisMetrics(num_classes=2, kernels=("iou", "ce"), self_pairs=options.get("self_pairs", True),
                               matching=options.get("matching", "lcm"), gini_of=options.get("gini_of", "sigma"),
                               ce_reading=options.get("ce_reading", "mean"))
    for start in range(0, len(p), 32):
        sl = slice(start, start + 32)
        metric.update(torch.stack([1 - p[sl], p[sl]], dim=2), torch.from_numpy(masks[sl]).long(),
                      torch.from_numpy(rater_mask[sl]), torch.arange(len(p))[sl], torch.from_numpy(sigma[sl]))
    values, _ = metric.per_image()
    present = torch.from_numpy(rater_mask).double()
    marking = ((torch.from_numpy(masks) > 0).flatten(2).any(-1).double() * present).sum(1) / present.sum(1)
    keep = subset_mask(marking, options.get("subset", "all"))
    return {m: float(values[m][keep].mean()) for m in METRICS}


PEERS = {
    # peer: (hypotheses, probseg's matching for its HM-IoU or None when it reports none)
    "PHiSeg": (50, None),
    "MoSE": (16, "lcm"),
    "CCDM": (16, "lcm"),
    "Flow-SSN": (100, "rectangular"),
}
"""Each peer's number of hypotheses (PHiSeg's test script: 50; MoSE and CCDM: 16, the common
count, CCDM's own being unstated; Flow-SSN's test run: 100) and its matching."""


def peer_table(probs: np.ndarray, masks: np.ndarray, rater_mask: np.ndarray) -> str:
    """Markdown: per peer, GED and HM-IoU by probseg under the peer's options and by the
    re-statement of the peer's evaluation code (tests/metrics/peer_evaluation.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests/
    from tests.metrics import peer_evaluation as peer

    from probseg.metrics.functional import generalized_energy_distance, matched_cost, pairwise_cost

    code = {"PHiSeg": (peer.phiseg_ged, None), "MoSE": (peer.mose_ged, peer.mose_hm_iou),
            "CCDM": (peer.ccdm_ged, peer.ccdm_hm_iou), "Flow-SSN": (peer.flowssn_ged, peer.flowssn_hm_iou)}
    target, present = torch.from_numpy(masks > 0), torch.from_numpy(rater_mask)
    lines = ["| peer (hypotheses) | probseg options | GED: probseg | GED: peer's code | HM-IoU: probseg | "
             "HM-IoU: peer's code |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for name, (s, matching) in PEERS.items():
        pred = torch.from_numpy(probs[:, :s].astype(np.float32) > 0.5)
        ged = float(generalized_energy_distance(pred, target, present, self_pairs=True).double().mean())
        ged_fn, hm_fn = code[name]
        ref_ged = np.mean([ged_fn(pred[i].numpy(), target[i][present[i]].numpy()) for i in range(len(pred))])
        cells = [f"{ged:.4f}", f"{ref_ged:.4f}", "–", "–"]
        options = "self_pairs=True"
        if matching is not None:
            cost = pairwise_cost(pred, target, "iou")
            hm = 1 - float(matched_cost(cost, present, matching=matching).double().mean())
            ref_hm = np.mean([hm_fn(pred[i].numpy(), target[i][present[i]].numpy()) for i in range(len(pred))])
            cells[2:] = [f"{hm:.4f}", f"{ref_hm:.4f}"]
            options += f", matching={matching!r}"
        lines.append(f"| {name} ({s}) | {options} | " + " | ".join(cells) + " |")
    quirk = np.mean([peer.both_empty_one_ged(probs[i, :16] > 0.5, masks[i][rater_mask[i]] > 0) for i in range(len(probs))])
    usual = float(generalized_energy_distance(torch.from_numpy(probs[:, :16] > 0.5), target, present).double().mean())
    lines.append(f"| ports with both-empty distance 1 (16) | no option (a bug) | {usual:.4f} | {quirk:.4f} | – | – |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/lidc_dev.npz", help="a multi-rater .npz")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=100, help="test images in the fixed set")
    parser.add_argument("--out", default="runs/conventions")
    parser.add_argument("--reuse", action="store_true", help="read --out/hypotheses.npz instead of training")
    args = parser.parse_args()
    if not Path(args.data).is_file():
        sys.exit(f"error: no such file: {args.data}")
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    saved: dict[str, np.ndarray] = {}
    if args.reuse:
        with np.load(out / "hypotheses.npz") as content:
            saved = {key: content[key] for key in content.files}
    else:
        for name in ("punet", "csae"):
            model, test = train(name, args.data, args.steps, args.seed, out / name)
            n = min(args.images, len(test))
            draws = hypotheses(model, test, 100, n)
            saved[f"{name}_probs"], saved[f"{name}_sigma"] = draws["probs"], draws["sigma"]
        saved["masks"] = np.stack([test[i]["masks"].numpy() for i in range(n)]).astype(np.uint8)
        saved["rater_mask"] = np.stack([test[i]["rater_mask"].numpy() for i in range(n)])
        np.savez_compressed(out / "hypotheses.npz", **saved)
    n = len(saved["masks"])
    print(f"fixed predictions: {out / 'hypotheses.npz'} ({n} test images, 100 hypotheses each; raters per "
          f"image: {sorted(set(saved['rater_mask'].sum(1).tolist()))})\n")
    rows = {}
    for label, options in SETTINGS.items():
        rows[label] = {name: evaluate(saved[f"{name}_probs"], saved["masks"], saved["rater_mask"],
                                      saved[f"{name}_sigma"], options) for name in ("punet", "csae")}
    header = "| convention | " + " | ".join(f"{m} punet | {m} csae" for m in METRICS) + " |"
    lines = [header, "| --- |" + " ---: |" * (2 * len(METRICS))]
    for label, row in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{row['punet'][m]:.3f} | {row['csae'][m]:.3f}" for m in METRICS)
                     + " |")
    base = rows["probseg defaults"]
    lines.append("")
    for m in METRICS:
        between = abs(base["punet"][m] - base["csae"][m])
        label, change = max(((lab, abs(r["punet"][m] - base["punet"][m])) for lab, r in rows.items()
                             if lab not in RESCALING), key=lambda t: t[1])
        lines.append(f"{m}: models differ by {between:.3f} under the defaults; the convention '{label}' alone moves "
                     f"the PU-Net's value by {change:.3f} ({change / max(between, 1e-12):.1f}x)")
    table = "\n".join(lines)
    peers = peer_table(saved["punet_probs"], saved["masks"], saved["rater_mask"])
    (out / "conventions.md").write_text(table + "\n\n" + peers + "\n")
    print(table + "\n\n" + peers)


if __name__ == "__main__":
    main()

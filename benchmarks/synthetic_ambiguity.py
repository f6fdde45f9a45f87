"""Does a model's spread of hypotheses match the known rater distribution of the synthetic data?

On the synthetic data every rater includes an image's lobe with a known probability p (its
contrast). For each test image this script draws S hypotheses and measures the fraction q that
include the lobe, then reports the mean |q - p| over the test images against two baselines
computed in the same run:

* deterministic: a model that always gives its most likely answer (q = 1 if p > 0.5 else 0);
* oracle: S draws from the true rater distribution (the error left by finite S alone).

The test images are built with the data settings saved in the checkpoint (Lightning stores the
data module's init arguments when it is passed to ``trainer.fit``), so they match what the model
was trained on; only the number of test images comes from ``--num-images``. ``--image-size`` and
``--seed`` are used only for checkpoints without saved data settings.

Usage:
    python benchmarks/synthetic_ambiguity.py --ckpt runs/demo/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np
import torch

import probseg
from probseg.checkpoint import read_checkpoint
from probseg.data import SyntheticDataModule

FALLBACK_IMAGE_SIZE = 64
FALLBACK_SEED = 0


def data_settings(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """SyntheticDataModule init arguments for the test images, and where they came from."""
    saved = read_checkpoint(args.ckpt).get("datamodule_hyper_parameters")
    if saved:
        settings = {k: v for k, v in dict(saved).items() if not k.startswith("_")}
        ignored = [f"--{name.replace('_', '-')}" for name in ("image_size", "seed") if getattr(args, name) is not None]
        if ignored:
            print(f"note: {' and '.join(ignored)} ignored: the checkpoint has its own data settings", file=sys.stderr)
        source = "from the checkpoint"
    else:
        settings = {
            "image_size": FALLBACK_IMAGE_SIZE if args.image_size is None else args.image_size,
            "seed": FALLBACK_SEED if args.seed is None else args.seed,
        }
        source = "from --image-size/--seed or their defaults (the checkpoint has none saved)"
    settings["num_test"] = args.num_images
    return settings, source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument(
        "--image-size", type=int, default=None,
        help=f"only for checkpoints without saved data settings (default {FALLBACK_IMAGE_SIZE})",
    )
    parser.add_argument(
        "--seed", type=int, default=None,
        help=f"data seed, only for checkpoints without saved data settings (default {FALLBACK_SEED})",
    )
    args = parser.parse_args()

    model = probseg.load_model(args.ckpt)
    settings, source = data_settings(args)
    print(f"data settings {source}: " + ", ".join(f"{k}={v}" for k, v in sorted(settings.items())))
    try:
        dm = SyntheticDataModule(**settings)
    except TypeError as err:
        sys.exit(f"error: the checkpoint's data settings do not fit SyntheticDataModule ({err}); "
                 "this benchmark needs a model trained on the synthetic data")
    ds = dm.dataset("test")
    generator = torch.Generator().manual_seed(0)
    rows = []
    with torch.inference_mode():
        for i in range(len(ds)):
            if not ds.lobe_region(i).any():
                continue
            p = ds.case(i).lobe_probability
            masks = model.sample(ds[i]["image"][None], args.num_samples, generator=generator)[0].argmax(1)
            q_model = ds.lobe_included(i, masks).float().mean().item()
            q_oracle = ds.lobe_included(i, ds.sample_oracle(i, args.num_samples, generator=i)).float().mean().item()
            rows.append((p, q_model, float(p > 0.5), q_oracle))
    p, q_model, q_det, q_oracle = map(np.array, zip(*rows))
    ambiguous = (p > 0) & (p < 1)
    print(f"test images: {len(rows)} ({ambiguous.sum()} ambiguous), S = {args.num_samples}\n")
    print("| predictor | mean abs(q - p), all | ambiguous only | ratio to deterministic (all) |")
    print("| --- | ---: | ---: | ---: |")
    det = np.abs(q_det - p).mean()
    for name, q in (("model", q_model), ("deterministic baseline", q_det), ("oracle (finite-S floor)", q_oracle)):
        err = np.abs(q - p)
        print(f"| {name} | {err.mean():.3f} | {err[ambiguous].mean():.3f} | {err.mean() / det:.2f} |")
    print("\nlobe probability p vs the model's inclusion rate q, ambiguous images:")
    order = np.argsort(p[ambiguous])
    for pi, qi in list(zip(p[ambiguous][order], q_model[ambiguous][order]))[:: max(1, ambiguous.sum() // 10)]:
        print(f"  p = {pi:.2f}  q = {qi:.2f}")


if __name__ == "__main__":
    main()

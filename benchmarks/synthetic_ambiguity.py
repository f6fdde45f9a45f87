"""Does a model's spread of hypotheses match the known rater distribution of the synthetic data?

On the synthetic data every rater includes an image's lobe with a known probability p (its
contrast). For each test image this script draws S hypotheses and measures the fraction q that
include the lobe, then reports the mean |q - p| over the test images against two baselines
computed in the same run:

* deterministic: a model that always gives its most likely answer (q = 1 if p > 0.5 else 0);
* oracle: S draws from the true rater distribution (the error left by finite S alone).

Usage:
    python benchmarks/synthetic_ambiguity.py --ckpt runs/demo/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import probseg
from probseg.data import SyntheticDataModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="data seed (the demo trains with 0)")
    args = parser.parse_args()

    model = probseg.load_model(args.ckpt)
    dm = SyntheticDataModule(image_size=args.image_size, num_test=args.num_images, seed=args.seed)
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

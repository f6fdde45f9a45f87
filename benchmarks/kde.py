"""KDE recalibration cost: O(n * n_key) with key points against the O(n^2) full-batch estimator, in one run.

Times ``probseg.calibration.kde_calibrate`` (region="all", every pixel recalibrated, fixed
``n_key``) at n and 2n pixels, and, as the baseline, the paper's full-batch estimator (every pixel
is a key point: ``kde_estimate(f, f, y, h)``) at a smaller n and 2n. Doubling the pixels should
about double the key-point time (linear) and quadruple the full-batch time (quadratic).

Usage:
    python benchmarks/kde.py            # B = 8 and 16 at 128x128, n_key = 1024; full batch at 8192 / 16384 pixels
    python benchmarks/kde.py --quick    # B = 4 and 8 at 64x64; full batch at 4096 / 8192 pixels
"""

from __future__ import annotations

import argparse
import platform

import torch
from _timing import timed

from probseg.calibration import kde_calibrate, kde_estimate


def binary_batch(batch: int, height: int, width: int, device: torch.device, seed: int) -> tuple[torch.Tensor, ...]:
    """(B, 2, H, W) probabilities f and (B, H, W) labels y ~ Bernoulli(f^2) (a miscalibrated network)."""
    gen = torch.Generator().manual_seed(seed)
    fg = torch.rand(batch, height, width, generator=gen)
    labels = (torch.rand(batch, height, width, generator=gen) < fg**2).long()
    return torch.stack([1 - fg, fg], 1).to(device), labels.to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    parser.add_argument("--n-key", type=int, default=1024)
    parser.add_argument("--bandwidth", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per size (default 7, 3 with --quick)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.quick:
        size, batches, full_sizes, repeats = 64, (4, 8), (4096, 8192), 3
    else:
        size, batches, full_sizes, repeats = 128, (8, 16), (8192, 16384), 7
    repeats = args.repeats or repeats
    h = args.bandwidth

    rows = []
    for batch in batches:
        probs, labels = binary_batch(batch, size, size, device, seed=batch)
        gen = torch.Generator(device=device).manual_seed(0)

        def run(probs=probs, labels=labels, gen=gen) -> torch.Tensor:
            return kde_calibrate(probs, labels, h, args.n_key, region="all", generator=gen)

        t = timed(run, repeats, device)
        rows.append(("key points", batch * size * size, f"{args.n_key}", t))
    for n in full_sizes:
        probs, labels = binary_batch(1, n // 64, 64, device, seed=n)
        flat = probs.permute(0, 2, 3, 1).reshape(-1, 2)
        onehot = torch.nn.functional.one_hot(labels.reshape(-1), 2).to(flat.dtype)
        t = timed(lambda flat=flat, onehot=onehot: kde_estimate(flat, flat, onehot, h), repeats, device)
        rows.append(("full batch (paper, O(n^2))", flat.shape[0], "all n", t))

    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, device {device}, "
        f"threads {torch.get_num_threads()}"
    )
    print(f"config: K = 2, bandwidth {h}, n_key {args.n_key}, region 'all', {repeats} repeats (median)\n")
    print("| estimator | pixels n | key points | time (ms) | ratio to the smaller n |")
    print("| --- | ---: | ---: | ---: | ---: |")
    ratios = []
    for i, (name, n, keys, t) in enumerate(rows):
        base = rows[i - i % 2][3]
        if i % 2:
            ratios.append(t / base)
        print(f"| {name} | {n} | {keys} | {t * 1e3:.1f} | {t / base:.2f} |")
    print(
        f"\ntime ratio for 2x pixels: key points {ratios[0]:.2f}x (linear: 2), "
        f"full batch {ratios[1]:.2f}x (quadratic: 4)"
    )


if __name__ == "__main__":
    main()

"""Sampling cost of S hypotheses relative to one forward pass, measured in one run.

Prints, for every zoo model, the cost of ``model.sample(x, S)`` over ``model.sample(x, 1)`` (one
network pass), timed in interleaved rounds (medians). Then compares, for a ProbUNet:
  * one hypothesis (U-Net + prior + combiner once): the baseline, ratio 1.0;
  * ``model.sample(x, S)``: U-Net and prior once, combiner S times (what probseg does);
  * naive: the full network S times, as a per-sample loop would;
  * tiled combiner: S copies of the feature map concatenated with z (the textbook fcomb) against
    probseg's split first layer, for the combiner alone.

Usage:
    python benchmarks/sampling.py                 # small CPU config (64x64, filters 16-64)
    python benchmarks/sampling.py --paper         # the paper's config (128x128, [32, 64, 128, 192], batch 32)
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch
from _timing import timed
from _zoo import build
import torch.nn.functional as F

from probseg.models import MODELS, ProbUNet


def sampling_ratio(model: torch.nn.Module, x: torch.Tensor, s: int, rounds: int) -> tuple[float, float]:
    """(median ms of one hypothesis, median ratio of S hypotheses to one) of a model in eval mode:
    one and S timed in each round, in alternating order, after a warm-up of both."""
    one_times, ratios = [], []
    # a mixture's evaluated hypotheses are its weighted ones
    draw = model.sample_weighted if getattr(model, "weighted", False) else model.sample
    with torch.inference_mode():
        draw(x, 1), draw(x, s)
        for i in range(rounds):  # alternate which goes first: neither gets the warmer start
            pair = [lambda: draw(x, 1), lambda: draw(x, s)]  # noqa: B023
            first, second = (timed(f, 1, x.device) for f in (pair if i % 2 == 0 else pair[::-1]))
            one, many = (first, second) if i % 2 == 0 else (second, first)
            one_times.append(one)
            ratios.append(many / one)
    return statistics.median(one_times) * 1e3, statistics.median(ratios)


def zoo_sampling_ratios(filters: list[int], convs: int, x: torch.Tensor, s: int, rounds: int) -> dict[str, tuple[float, float]]:
    """Registry name -> :func:`sampling_ratio` of a freshly initialised model of that config."""
    results = {}
    for name in sorted(MODELS):
        torch.manual_seed(0)
        model = build(name, filters, convs).to(x.device).eval()
        results[name] = sampling_ratio(model, x, s, rounds)
    return results


def tiled_combiner(model: ProbUNet, features: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Reference fcomb: tile z over S copies of the feature map, concatenate, apply the convs."""
    b, s, latent = z.shape
    h, w = features.shape[-2:]
    x = torch.cat([features.unsqueeze(1).expand(b, s, -1, h, w), z[..., None, None].expand(b, s, latent, h, w)], 2)
    x = x.flatten(0, 1)
    convs = model.network.fcomb.convs
    for i, conv in enumerate(convs):
        x = conv(x if i == 0 else F.relu(x))
    return x.unflatten(0, (b, s))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paper", action="store_true", help="128x128, filters [32, 64, 128, 192], batch 32")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.paper:
        size, batch, filters, convs = 128, 32, [32, 64, 128, 192], 3
    else:
        size, batch, filters, convs = 64, 8, [16, 32, 64, 64], 2
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = ProbUNet(num_filters=filters, convs_per_block=convs).to(device).eval()
    x = torch.rand(batch, 1, size, size, device=device)
    s = args.samples

    with torch.inference_mode():
        features = model.network.unet(x)
        z = torch.randn(batch, s, model.hparams.latent_dim, device=device)
        torch.testing.assert_close(model.network.fcomb(features, z), tiled_combiner(model, features, z), rtol=1e-4, atol=1e-4)
        one = timed(lambda: model.sample(x, 1), args.repeats, device)
        ours = timed(lambda: model.sample(x, s), args.repeats, device)
        naive = timed(lambda: [model.sample(x, 1) for _ in range(s)], args.repeats, device)
        comb_split = timed(lambda: model.network.fcomb(features, z), args.repeats, device)
        comb_tiled = timed(lambda: tiled_combiner(model, features, z), args.repeats, device)

    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, device {device}, "
          f"threads {torch.get_num_threads()}")
    print(f"config: batch {batch}, {size}x{size}, filters {filters}, convs/block {convs}, S = {s}\n")
    print("| model | one hypothesis (ms) | S hypotheses / one |")
    print("| --- | ---: | ---: |")
    for name, (ms, ratio) in zoo_sampling_ratios(filters, convs, x, s, args.repeats).items():
        print(f"| {name} | {ms:.1f} | {ratio:.2f} |")
    print()
    print("| what | time per batch (ms) | ratio to one forward pass |")
    print("| --- | ---: | ---: |")
    print(f"| one hypothesis (baseline) | {one * 1e3:.1f} | 1.00 |")
    print(f"| model.sample, S = {s} | {ours * 1e3:.1f} | {ours / one:.2f} |")
    print(f"| naive loop, S = {s} full passes | {naive * 1e3:.1f} | {naive / one:.2f} |")
    print(f"\ncombiner alone, S = {s}: split first layer {comb_split * 1e3:.1f} ms, "
          f"tiled concat {comb_tiled * 1e3:.1f} ms, speed-up {comb_tiled / comb_split:.2f}x")


if __name__ == "__main__":
    main()

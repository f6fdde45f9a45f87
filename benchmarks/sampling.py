"""Sampling cost of S hypotheses relative to one forward pass, against a peer-style baseline.

Prints, for every zoo model, the cost of ``model.sample(x, S)`` over ``model.sample(x, 1)`` (one
network pass). Then, for a ProbUNet at batch 1, 8 and 32 and S = 16 and 100:
  * one hypothesis (U-Net + prior + combiner once): the baseline of the ratios;
  * ``model.sample(x, S)``: U-Net and prior once, the combiner's S hypotheses in cache-sized
    chunks (what probseg does);
  * the peer-style loop of the common PyTorch ports: U-Net and prior once, then S passes of the
    textbook combiner (tile z, concatenate, 1x1 convolutions channels-first).
All timed in interleaved rounds after a warm-up (medians); the outputs are checked equal first.

Usage:
    python benchmarks/sampling.py                 # small CPU config (64x64, filters 16-64)
    python benchmarks/sampling.py --paper         # the paper's config (128x128, [32, 64, 128, 192], 3 convs)
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch
import torch.nn.functional as F
from _timing import interleaved, timed
from _zoo import build

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
            pair = [lambda: draw(x, 1), lambda: draw(x, s)]
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


def peer_loop_sample(model: ProbUNet, x: torch.Tensor, s: int) -> torch.Tensor:
    """How the common PyTorch PU-Net ports draw S hypotheses: the U-Net and the prior once, then a
    plain loop of S combiner passes, each tiling z over the feature map, concatenating and running
    the 1x1 convolutions channels-first."""
    features = model.network.unet(x)
    prior = model.network.prior(x)
    h, w = features.shape[-2:]
    convs = model.network.fcomb.convs
    out = []
    for _ in range(s):
        z = prior.sample()  # (B, L)
        y = torch.cat([features, z[:, :, None, None].expand(-1, -1, h, w)], dim=1)
        for i, conv in enumerate(convs):
            y = conv(y if i == 0 else F.relu(y))
        out.append(y)
    return torch.stack(out, dim=1)


def compare_with_peer(filters: list[int], convs: int, size: int, batches: list[int], samples: list[int],
                      rounds: int, device: torch.device, bf16: bool = False) -> list[tuple]:
    """Per (batch, S): medians of one hypothesis, ``model.sample`` and the peer-style loop (the
    peer's network in PyTorch's default channels-first layout, probseg's in its default)."""
    torch.manual_seed(0)
    model = ProbUNet(num_filters=filters, convs_per_block=convs).to(device).eval()
    peer = ProbUNet(num_filters=filters, convs_per_block=convs, channels_last=False).to(device).eval()
    peer.load_state_dict(model.state_dict())
    rows = []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    with torch.inference_mode(), autocast:
        for batch in batches:
            x = torch.rand(batch, 1, size, size, device=device)
            with torch.autocast(device.type, enabled=False):  # the same maths as the peer's tiled combiner
                features = model.network.unet(x)
                z = torch.randn(batch, 3, model.hparams.latent_dim, device=device)
                torch.testing.assert_close(model.network.fcomb(features, z), tiled_combiner(model, features, z),
                                           rtol=1e-4, atol=1e-4)
            for s in samples:
                t = interleaved({"one": lambda: model.sample(x, 1), "probseg": lambda: model.sample(x, s),
                                 "peer": lambda: peer_loop_sample(peer, x, s)}, rounds, device)
                rows.append((batch, s, t["one"], t["probseg"], t["peer"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paper", action="store_true", help="128x128, filters [32, 64, 128, 192], 3 convs per block")
    parser.add_argument("--samples", type=int, nargs="+", default=[16, 100])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (medians)")
    parser.add_argument("--no-zoo", action="store_true", help="skip the table of every zoo model")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU) for probseg and the peer alike")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.paper:
        size, filters, convs = 128, [32, 64, 128, 192], 3
    else:
        size, filters, convs = 64, [16, 32, 64, 64], 2
    device = torch.device(args.device)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, device {device}, "
          f"threads {torch.get_num_threads()}")
    print(f"config: {size}x{size}, filters {filters}, convs/block {convs}, medians of {args.repeats} interleaved rounds\n")
    if not args.no_zoo:
        batch, s = args.batches[min(1, len(args.batches) - 1)], args.samples[0]
        x = torch.rand(batch, 1, size, size, device=device)
        print(f"every zoo model, batch {batch}, S = {s}:\n")
        print("| model | one hypothesis (ms) | S hypotheses / one |")
        print("| --- | ---: | ---: |")
        for name, (ms, ratio) in zoo_sampling_ratios(filters, convs, x, s, args.repeats).items():
            print(f"| {name} | {ms:.1f} | {ratio:.2f} |")
        print()
    print("PU-Net: model.sample(x, S) against the peer-style loop (U-Net and prior once, S tiled 1x1-conv "
          "combiner passes):\n")
    print("| batch | S | one hypothesis (ms) | probseg, S (ms) | probseg S / one | peer loop, S (ms) | "
          "peer loop S / one | probseg speed-up |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for batch, s, one, ours, peer in compare_with_peer(filters, convs, size, args.batches, args.samples,
                                                     args.repeats, device, args.bf16):
        print(f"| {batch} | {s} | {one * 1e3:.1f} | {ours * 1e3:.1f} | {ours / one:.2f} | {peer * 1e3:.1f} | "
              f"{peer / one:.2f} | {peer / ours:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

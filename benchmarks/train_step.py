"""Cost of one full training step (forward, backward, Adam) of every zoo model, in one run.

Prints the median step time of each model and its ratio to the PU-Net (target for planar and
csae: at most 1.25), and the peak memory of each (CUDA: max allocated; CPU: peak resident memory
of a process that ran only that model). Each model is measured in its own process.

``--versus-peer`` instead times the PU-Net's default training step (forward, backward, Adam)
against a peer-style eager reference at equal maths: the same weights, batch and random draws, in
PyTorch's default (channels-first) layout with the textbook combiner (z tiled over the feature map,
concatenated, 1x1 convolutions), as the common PyTorch ports write it. Paper config (128x128,
[32, 64, 128, 192], 3 convs per block, L = 6) at the given batches; the first step's losses must
agree; medians of interleaved rounds after a warm-up.

Usage:
    python benchmarks/train_step.py                # batch 32, 64x64, default U-Net [32, 64, 128, 192]
    python benchmarks/train_step.py --small        # batch 8, filters [8, 16, 32, 32]: a quick CPU check
    python benchmarks/train_step.py --versus-peer --batches 8 32
    python benchmarks/train_step.py --versus-peer --profile   # + the convolutions' share and the bound it sets
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
from _zoo import build

from probseg.models import MODELS


def measure(name: str, small: bool, repeats: int, device: torch.device) -> tuple[float, float]:
    """Median step time (s) and peak memory (MiB) of model ``name``."""
    batch, size = (8, 64) if small else (32, 64)
    filters, convs = ([8, 16, 32, 32], 1) if small else ([32, 64, 128, 192], 3)
    g = torch.Generator().manual_seed(0)
    data = {
        "image": torch.rand(batch, 1, size, size, generator=g).to(device),
        "masks": torch.randint(0, 2, (batch, 4, size, size), generator=g).to(device),
    }
    torch.manual_seed(0)
    model = build(name, filters, convs).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.stack(list(model.loss_terms(data).values())).sum().backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:  # each model runs in its own process, so the process's peak RSS is this model's
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return statistics.median(times), peak


def tiled_fcomb(fcomb: torch.nn.Module, features: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The textbook combiner of the PyTorch ports: tile z over the map, concatenate, 1x1 convs."""
    h, w = features.shape[-2:]
    x = torch.cat([features, z[:, :, None, None].expand(-1, -1, h, w)], dim=1)
    for i, conv in enumerate(fcomb.convs):
        x = conv(x if i == 0 else torch.relu(x))
    return x


def versus_peer(batches: list[int], size: int, rounds: int, device: torch.device, bf16: bool = False) -> list[tuple]:
    """(batch, probseg step s, peer step s, first losses) per batch."""
    from _timing import interleaved

    from probseg.models import ProbUNet

    rows = []
    for batch_size in batches:
        g = torch.Generator().manual_seed(0)
        data = {"image": torch.rand(batch_size, 1, size, size, generator=g).to(device),
                "masks": torch.randint(0, 2, (batch_size, 4, size, size), generator=g).to(device)}
        torch.manual_seed(0)
        ours = ProbUNet(num_filters=[32, 64, 128, 192], convs_per_block=3, latent_dim=6).to(device)
        peer = ProbUNet(num_filters=[32, 64, 128, 192], convs_per_block=3, latent_dim=6, channels_last=False).to(device)
        peer.load_state_dict(ours.state_dict())
        peer.network.fcomb.forward = lambda features, z, f=peer.network.fcomb: tiled_fcomb(f, features, z)
        steps, losses = {}, {}
        for label, model in (("probseg", ours), ("peer", peer)):
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

            def step(model=model, optimizer=optimizer, data=data) -> torch.Tensor:
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    terms = model.loss_terms(data, torch.Generator(device).manual_seed(1))
                loss = torch.stack(list(terms.values())).float().sum()
                loss.backward()
                optimizer.step()
                return loss.detach()

            losses[label] = float(step())  # the first step, from the same weights and draws
            steps[label] = step
        if abs(losses["probseg"] - losses["peer"]) > (2e-2 if bf16 else 1e-3) * max(1.0, abs(losses["peer"])):
            raise SystemExit(f"batch {batch_size}: the two steps compute different losses: {losses}")
        times = interleaved(steps, rounds, device)
        rows.append((batch_size, times["probseg"], times["peer"], losses["probseg"], losses["peer"]))
    return rows


def convolution_share(batch_size: int, size: int, device: torch.device, steps: int = 3) -> float:
    """Share of probseg's default PU-Net training step (paper config) spent in convolutions, forward
    and backward, by the torch profiler (self time of the convolution kernels; CPU time on CPU,
    device time on CUDA), over ``steps`` steps after two warm-up steps. Both sides of
    ``--versus-peer`` run these convolutions, so speed-up / share bounds what any change outside
    them could give at equal maths."""
    from torch.profiler import ProfilerActivity, profile

    from probseg.models import ProbUNet

    g = torch.Generator().manual_seed(0)
    data = {"image": torch.rand(batch_size, 1, size, size, generator=g).to(device),
            "masks": torch.randint(0, 2, (batch_size, 4, size, size), generator=g).to(device)}
    torch.manual_seed(0)
    model = ProbUNet(num_filters=[32, 64, 128, 192], convs_per_block=3, latent_dim=6).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        terms = model.loss_terms(data, torch.Generator(device).manual_seed(1))
        torch.stack(list(terms.values())).sum().backward()
        optimizer.step()

    for _ in range(2):
        step()
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events)
    conv = sum(getattr(e, attr) for e in events if "conv" in e.key.lower() and "convert" not in e.key.lower())
    return conv / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--versus-peer", action="store_true", help="PU-Net default step vs the peer-style reference")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32], help="batches of --versus-peer")
    parser.add_argument("--size", type=int, default=128, help="image size of --versus-peer")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in --versus-peer (GPU), for both")
    parser.add_argument("--profile", action="store_true",
                        help="with --versus-peer: also the convolutions' share of probseg's step, and the bound it sets")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # internal: measure one model, print JSON
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.versus_peer:
        print(f"machine: {platform.machine()}, torch {torch.__version__}, device {device}, threads "
              f"{torch.get_num_threads()}; PU-Net {args.size}x{args.size}, [32, 64, 128, 192], 3 convs/block, L = 6; "
              f"medians of {args.repeats} interleaved rounds\n")
        print("| batch | probseg step (ms) | peer-style step (ms) | speed-up | first loss probseg / peer |"
              + (" convolutions' share of probseg's step | bound: speed-up / share |" if args.profile else ""))
        print("| ---: | ---: | ---: | ---: | --- |" + (" ---: | ---: |" if args.profile else ""))
        for batch_size, t_ours, t_peer, l_ours, l_peer in versus_peer(args.batches, args.size, args.repeats, device,
                                                                      args.bf16):
            row = (f"| {batch_size} | {t_ours * 1e3:.0f} | {t_peer * 1e3:.0f} | {t_peer / t_ours:.2f}x | "
                   f"{l_ours:.4f} / {l_peer:.4f} |")
            if args.profile:
                share = convolution_share(batch_size, args.size, device)
                row += f" {share:.0%} | {t_peer / t_ours / share:.2f}x |"
            print(row, flush=True)
        return
    if args.only:
        print(json.dumps(measure(args.only, args.small, args.repeats, device)))
        return
    rows = []
    for name in sorted(MODELS, key=lambda n: (n != "punet", n)):
        command = [sys.executable, __file__, "--only", name, "--repeats", str(args.repeats), "--device", args.device]
        out = subprocess.run(command + (["--small"] if args.small else []), capture_output=True, text=True, check=True)
        rows.append((name, *json.loads(out.stdout.strip().splitlines()[-1])))
    batch, filters = (8, "[8, 16, 32, 32], 1 conv/block") if args.small else (32, "[32, 64, 128, 192], 3 convs/block")
    base = rows[0][1]
    print(f"machine: {platform.machine()}, torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    print(f"config: batch {batch}, 64x64, filters {filters}, median of {args.repeats} steps\n")
    memory = "peak GPU memory (MiB)" if device.type == "cuda" else "peak process RSS (MiB)"
    print(f"| model | step (ms) | ratio to punet | {memory} |")
    print("| --- | ---: | ---: | ---: |")
    for name, t, peak in rows:
        print(f"| {name} | {t * 1e3:.1f} | {t / base:.2f} | {peak:.0f} |")


if __name__ == "__main__":
    main()

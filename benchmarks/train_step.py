"""Cost of one full training step (forward, backward, Adam) of every zoo model, in one run.

Prints the median step time of each model and its ratio to the PU-Net (target for planar and
csae: at most 1.25), and the peak memory of each (CUDA: max allocated; CPU: peak resident memory
of a process that ran only that model). Each model is measured in its own process.

Usage:
    python benchmarks/train_step.py                # batch 32, 64x64, default U-Net [32, 64, 128, 192]
    python benchmarks/train_step.py --small        # batch 8, filters [8, 16, 32, 32]: a quick CPU check
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # internal: measure one model, print JSON
    args = parser.parse_args()
    device = torch.device(args.device)
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

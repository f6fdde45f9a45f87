"""Throughput of every zoo model: training and sampling images per second, eager against
channels-last against ``torch.compile`` (and bf16 mixed precision on a GPU), with peak memory and
the cost of S = 16 hypotheses as a ratio to one deterministic forward pass (target: at most 1.5,
since the U-Net runs once per image). Each measurement runs in its own process.

Configs:
  paper: batch 32, 128x128, default U-Net [32, 64, 128, 192] with 3 convs per block (the papers');
  small: batch 8, 64x64, [8, 16, 32, 32] with 1 conv per block (a quick CPU check).

Usage:
    python benchmarks/throughput.py                              # small config, eager + channels_last + compiled
    python benchmarks/throughput.py --config paper --steps 5
    python benchmarks/throughput.py --config paper --variants eager bf16 channels_last compiled   # on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

from _zoo import build

from probseg.models import MODELS

CONFIGS = {
    "paper": {"batch": 32, "size": 128, "filters": [32, 64, 128, 192], "convs": 3},
    "small": {"batch": 8, "size": 64, "filters": [8, 16, 32, 32], "convs": 1},
}
VARIANTS = ("eager", "channels_last", "compiled", "bf16")
SAMPLES = 16


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, steps: int, device: torch.device) -> float:
    """Median seconds per call after one warm-up call."""
    fn()
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, config: str, variant: str, steps: int, device: torch.device) -> dict:
    """Training and sampling throughput of one model, config and variant (run in a fresh process)."""
    c = CONFIGS[config]
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(c["batch"], 1, c["size"], c["size"], generator=g).to(device),
             "masks": torch.randint(0, 2, (c["batch"], 4, c["size"], c["size"]), generator=g).to(device)}
    torch.manual_seed(0)
    # "channels_last" is probseg's default layout; the other variants start from PyTorch's default
    # (channels-first) so that each one's gain is measured on its own.
    model = build(name, c["filters"], c["convs"], channels_last=variant == "channels_last").to(device)
    compile_s = 0.0
    if variant == "compiled":
        model.network.unet.compile()
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if variant == "bf16"
                else contextlib.nullcontext())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = torch.stack(list(model.loss_terms(batch).values())).sum()
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def sample(s: int) -> None:
        with autocast:
            model.sample(batch["image"], s)

    if variant == "compiled":  # the first calls compile: timed apart
        start = time.perf_counter()
        train_step()
        model.eval()
        sample(1)
        sample(SAMPLES)
        model.train()
        _sync(device)
        compile_s = time.perf_counter() - start
    t_train = _timed(train_step, steps, device)
    model.eval()
    t_one = _timed(lambda: sample(1), steps, device)
    t_many = _timed(lambda: sample(SAMPLES), steps, device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n = c["batch"]
    return {"train_ips": n / t_train, "sample_ips": n / t_many, "one_pass_ips": n / t_one,
            "ratio": t_many / t_one, "peak_mib": peak, "compile_s": compile_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--models", nargs="+", default=sorted(MODELS, key=lambda n: (n != "punet", n)))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["eager", "channels_last", "compiled"])
    parser.add_argument("--steps", type=int, default=5, help="timed calls per measurement (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", nargs=2, help=argparse.SUPPRESS)  # internal: MODEL VARIANT, print JSON
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.only:
        print(json.dumps(measure(args.only[0], args.config, args.only[1], args.steps, device)))
        return
    c = CONFIGS[args.config]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU, {os.cpu_count()} cores"
    print(f"throughput: {args.config} config (batch {c['batch']}, {c['size']}x{c['size']}, filters {c['filters']}, "
          f"{c['convs']} conv/block), S = {SAMPLES}, median of {args.steps}; {name}, torch {torch.__version__}\n")
    memory = "peak GPU memory (MiB)" if device.type == "cuda" else "peak RSS (MiB)"
    print(f"| model | variant | train img/s | sampling img/s (S = {SAMPLES}) | S = {SAMPLES} / one pass | "
          f"speed-up vs eager (train, sample) | compile (s) | {memory} |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for model in args.models:
        eager = None
        for variant in args.variants:
            command = [sys.executable, __file__, "--only", model, variant, "--config", args.config,
                       "--steps", str(args.steps), "--device", args.device]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                reason = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1][:80]
                print(f"| {model} | {variant} | failed: {reason} | | | | | |")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            eager = r if variant == "eager" else eager
            speed = "1.00, 1.00" if eager is None or variant == "eager" else \
                f"{r['train_ips'] / eager['train_ips']:.2f}, {r['sample_ips'] / eager['sample_ips']:.2f}"
            compile_s = f"{r['compile_s']:.1f}" if variant == "compiled" else "-"
            print(f"| {model} | {variant} | {r['train_ips']:.1f} | {r['sample_ips']:.1f} | {r['ratio']:.2f} | {speed} | "
                  f"{compile_s} | {r['peak_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()

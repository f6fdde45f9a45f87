"""Every speed comparison of the benchmarks on a CUDA device, in one command: the same tables as on
CPU, each against its peer-style baseline, in fp32 and with bf16 autocast.

Runs, each in its own process (so one failure or out-of-memory does not stop the others):
  1. sampling.py --paper: ``model.sample`` vs the peer-style loop, batch 1/8/32, S = 16/100;
  2. the same under bf16 autocast;
  3. train_step.py --versus-peer: the PU-Net's default step vs the peer-style eager step, fp32
     and bf16;
  4. throughput.py --config paper: eager, bf16, channels_last and compiled per zoo model.
The evaluation engine's benchmark (eval_metrics.py) runs on CPU tensors (its distance transforms
and assignments are CPU code) and is not repeated here.

Usage (on a machine with a GPU):
    python benchmarks/gpu.py                       # everything
    python benchmarks/gpu.py --quick               # fewer rounds, batch 8 only: a few minutes
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds, batch 8, the PU-Net and cSAE throughput only")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per part before it is stopped")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device; run the CPU benchmarks instead (see README, Benchmarks)")
        return 1
    rounds = "3" if args.quick else "5"
    batches = ["8"] if args.quick else ["1", "8", "32"]
    models = ["punet", "csae"] if args.quick else []
    parts = [
        ("sampling, fp32", ["sampling.py", "--paper", "--no-zoo", "--repeats", rounds, "--batches", *batches]),
        ("sampling, bf16 autocast", ["sampling.py", "--paper", "--no-zoo", "--bf16", "--repeats", rounds,
                                     "--batches", *batches]),
        ("training step, fp32", ["train_step.py", "--versus-peer", "--repeats", rounds, "--batches", *batches]),
        ("training step, bf16 autocast", ["train_step.py", "--versus-peer", "--bf16", "--repeats", rounds,
                                          "--batches", *batches]),
        ("throughput", ["throughput.py", "--config", "paper", "--variants", "eager", "bf16", "channels_last",
                        "compiled", *(["--models", *models] if models else [])]),
    ]
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}\n", flush=True)
    failed = 0
    for title, command in parts:
        print(f"## {title}\n", flush=True)
        start = time.time()
        try:
            done = subprocess.run([sys.executable, str(HERE / command[0]), *command[1:], "--device", "cuda"],
                                  timeout=args.timeout, check=False)
            failed += done.returncode != 0
        except subprocess.TimeoutExpired:
            print(f"(stopped after {args.timeout:.0f} s)")
            failed += 1
        print(f"\n({time.time() - start:.0f} s)\n", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Long-run soak: train the small PU-Net config through the Lightning CLI for several thousand
steps and watch for leaks (logging, metric state, W&B, caches): resident memory and step time at
intervals, and the growth of both between the first and the last interval.

The run uses the repository's synthetic base config (evaluation, Gini and sample-grid callbacks,
CSV and offline W&B logging) with a small U-Net, so every per-step and per-validation path runs
many times. Prints a table of (step, RSS MiB, ms per step over the interval) and the verdict
against ``--max-growth-mib`` (RSS from the end of the first interval to the end of the run).

Usage:
    python benchmarks/soak.py --steps 3000 --every 250 --out runs/soak
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


def rss_mib() -> float:
    """Current resident set size of this process (MiB), from /proc (peak RSS where unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class SoakMonitor(Callback):
    """Records (step, RSS, seconds since the previous record) every ``every`` optimizer steps."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.records: list[tuple[int, float, float]] = []
        self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every == 0:
            now = time.perf_counter()
            self.records.append((step, rss_mib(), now - self._last))
            self._last = now


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--every", type=int, default=250, help="steps between records")
    parser.add_argument("--out", default="runs/soak")
    parser.add_argument("--max-growth-mib", type=float, default=100.0,
                        help="allowed RSS growth from the end of the first interval to the end of the run")
    parser.add_argument("--wandb", default="offline", choices=("offline", "disabled"))
    args = parser.parse_args()
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from probseg.cli import build_cli

    monitor = SoakMonitor(args.every)
    argv = ["--config", str(root / "experiments/synthetic/base.yaml"),
            "--config", str(root / "experiments/synthetic/punet.yaml"),
            "--trainer.default_root_dir", args.out, "--trainer.max_steps", str(args.steps),
            "--trainer.max_epochs", "-1", "--trainer.enable_progress_bar", "false",
            "--data.init_args.num_train", "256", "--data.init_args.num_val", "32", "--data.init_args.num_test", "8",
            "--wandb", args.wandb]
    cli = build_cli(argv, run=False)
    cli.trainer.callbacks.append(monitor)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    total = time.perf_counter() - start
    print(f"\nsoak: {args.steps} steps in {total:.0f} s (batch {cli.datamodule.batch_size}, "
          f"{cli.datamodule.hparams.image_size}x{cli.datamodule.hparams.image_size}), every {args.every} steps:\n")
    print("| step | RSS (MiB) | ms per step over the interval |")
    print("| ---: | ---: | ---: |")
    for step, rss, seconds in monitor.records:
        print(f"| {step} | {rss:.0f} | {1e3 * seconds / args.every:.1f} |")
    first, last = monitor.records[0], monitor.records[-1]
    growth = last[1] - first[1]
    times = [r[2] for r in monitor.records[1:]]
    drift = (times[-1] / times[0]) if len(times) > 1 else 1.0
    verdict = "PASS" if growth <= args.max_growth_mib else "FAIL"
    print(f"\nRSS growth from step {first[0]} to {last[0]}: {growth:+.0f} MiB (bound {args.max_growth_mib:.0f}): "
          f"{verdict}; last interval's step time / the first full interval's: {drift:.2f}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())

"""benchmarks/conventions.py: a tiny run saves the fixed predictions and prints one row per
convention, each changing what it should."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_tiny_conventions_run(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 40
    masks = np.zeros((n, 4, 32, 32), dtype=np.uint8)
    for i in range(n):
        for r in range(4):
            top, left = rng.integers(4, 20, 2)
            masks[i, r, top : top + 8, left : left + 8] = rng.random() > 0.2
    rater_mask = np.ones((n, 4), dtype=bool)
    rater_mask[::2, 3] = False  # 3 raters on half the images: R does not always divide S
    data = tmp_path / "data.npz"
    np.savez(data, images=rng.random((n, 1, 32, 32)).astype(np.float32), masks=masks, rater_mask=rater_mask,
             patients=np.array([f"p{i // 2}" for i in range(n)]))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "conventions.py"), "--data", str(data),
                           "--steps", "2", "--images", "4", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = np.load(tmp_path / "out" / "hypotheses.npz")
    assert saved["punet_probs"].shape == (4, 100, 32, 32) and saved["masks"].shape == (4, 4, 32, 32)
    rows = {line.split(" | ")[0].strip("| "): line for line in done.stdout.splitlines() if line.startswith("| ")}
    assert {"probseg defaults", "matching: rectangular", "CE: binarized (Table 1's scale)"} <= set(rows)
    assert "alone moves" in done.stdout and (tmp_path / "out" / "conventions.md").is_file()
    # Each peer's evaluation: probseg's value under the peer's options equals the peer's code's.
    peers = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ") for line in done.stdout.splitlines()
             if line.startswith(("| PHiSeg", "| MoSE", "| CCDM", "| Flow-SSN"))}
    assert set(peers) == {"PHiSeg (50)", "MoSE (16)", "CCDM (16)", "Flow-SSN (100)"}
    for name, cells in peers.items():
        assert cells[2] == cells[3] and cells[4] == cells[5], name
    # --reuse scores the saved predictions again without training.
    again = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "conventions.py"), "--data", str(data),
                            "--reuse", "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Trainer.fit" not in again.stderr and again.stdout.split("\n\n", 1)[1] == done.stdout.split("\n\n", 1)[1]

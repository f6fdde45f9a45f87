"""benchmarks/latent_study.py: a ten-step run of two variants writes its rows and summary, and the
variants set what they say."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "latent_study.py"


def _module():
    return load_script(SCRIPT)


def test_variants_set_their_readings_and_remedies() -> None:
    study = _module()
    name, args = study.model_args("lidc", "csae-paper", 400)
    assert name == "csae" and args["reconstruct_from"] == "flowed" and args["sinkhorn_posterior"] == "one_rater"
    assert args["beta"] == 10.0 and args["gamma"] == 10.0
    assert study.model_args("synthetic", "punet+warmup", 400)[1]["kl_warmup_steps"] == 100
    assert study.model_args("synthetic", "csae-base-all", 400)[1]["sinkhorn_posterior"] == "all_raters"
    name, args = study.model_args("synthetic", "unet", 400)
    assert name == "unet" and "latent_dim" not in args and "beta" not in args
    from probseg.models import MODELS

    for variant in study.VARIANTS:  # every variant builds
        name, args = study.model_args("synthetic", variant, 8)
        MODELS[name](**args)


@pytest.mark.slow
def test_a_tiny_study_writes_rows_and_a_summary(tmp_path: Path) -> None:
    out = tmp_path / "study"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--datasets", "synthetic", "--variants", "unet", "csae-base-all", "--seeds", "0",
         "--steps", "10", "--num-samples", "2", "--jobs", "1", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["variant"] for r in rows) == ["csae-base-all", "unet"]
    for row in rows:
        assert 0 <= float(row["ged"]) <= 2 and 0 <= float(row["hm_iou"]) <= 1 and float(row["wall_s"]) > 0
    latent = next(r for r in rows if r["variant"] == "csae-base-all")
    assert latent["gini"] != "" and latent["kl_total"] != ""
    summary = (out / "summary.md").read_text()
    assert "| csae-base-all | 1 |" in summary and "| oracle |" in summary


def test_a_missing_lidc_file_is_named(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--datasets", "lidc", "--lidc", str(tmp_path / "none.npz")],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode != 0 and "none.npz" in done.stderr

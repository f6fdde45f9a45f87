"""benchmarks/zoo_comparison.py: every model's arguments come from its synthetic config with the
schedules scaled to the budget, and a tiny run writes its rows (with the weighted MoSE and the
per-level Gini of PHiSeg) and the summary."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "zoo_comparison.py"


def _module():
    return load_script(SCRIPT)


def test_every_model_takes_its_synthetic_config_scaled_to_the_budget() -> None:
    from probseg.models import MODELS

    study = _module()
    for name in MODELS:
        args = study.model_args(name, 400)
        config = yaml.safe_load((ROOT / "experiments" / "synthetic" / f"{name}.yaml").read_text())["model"]["init_args"]
        assert {k: v for k, v in args.items() if k not in ("kl_warmup_steps", "relaxation_steps")} == {
            k: v for k, v in config.items() if k not in ("kl_warmup_steps", "relaxation_steps")}
        MODELS[name](**args)
    assert study.model_args("punet", 400)["kl_warmup_steps"] == 100
    assert study.model_args("mose", 400)["relaxation_steps"] == 200
    with pytest.raises(FileNotFoundError, match="nomodel"):
        study.model_args("nomodel", 10)
    assert study.parse_variant("hpunet:top_k=0:beta=0.5") == ("hpunet", {"top_k": 0, "beta": 0.5})
    assert study.model_args("hpunet", 10, {"top_k": 0})["top_k"] == 0
    with pytest.raises(ValueError, match="name:key=value"):
        study.parse_variant("hpunet:top_k")


@pytest.mark.slow
def test_a_tiny_comparison_writes_rows_and_a_summary(tmp_path: Path) -> None:
    out = tmp_path / "zoo"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--datasets", "synthetic", "--models", "mose", "phiseg:kl_weighting=uniform", "--seeds", "0",
         "--steps", "3", "--num-samples", "4", "--jobs", "1", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "runs.csv", newline="") as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["mose", "phiseg:kl_weighting=uniform"]
    for row in rows.values():
        assert 0 <= float(row["ged"]) <= 2 and 0 <= float(row["hm_iou"]) <= 1 and float(row["sampling_ratio"]) > 0
        assert row["gini"] != ""
    assert len(rows["phiseg:kl_weighting=uniform"]["gini_levels"].split()) == 3 and rows["mose"]["gini_levels"] == ""
    summary = (out / "summary.md").read_text()
    assert "| mose | 1 |" in summary and "| phiseg:kl_weighting=uniform | 1 |" in summary and "| oracle |" in summary
    bad = subprocess.run([sys.executable, str(SCRIPT), "--models", "phiseg:kl_weighting=linear", "--datasets", "synthetic"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode != 0 and "kl_weighting" in bad.stderr

"""``probseg benchmark``: fit + test over folds, resumable after a kill, and Table 1 checked
against the per-fold per-image files; the pooled statistics against numpy."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from probseg import benchmark as bench
from probseg.benchmark import TABLE_COLUMNS, BenchmarkError
from tests.conftest import TINY_PUNET

pytestmark = pytest.mark.slow

DATA = {
    "seed_everything": 0,
    "data": {"class_path": "probseg.data.SyntheticDataModule",
             "init_args": {"image_size": 32, "num_train": 12, "num_val": 6, "num_test": 5, "num_raters": 3,
                           "batch_size": 6}},
    "trainer": {"accelerator": "cpu", "devices": 1, "log_every_n_steps": 1, "enable_model_summary": False,
                "enable_progress_bar": False,
                "callbacks": [{"class_path": "probseg.callbacks.EvaluationCallback",
                               "init_args": {"num_samples": 4, "every_n_epochs": 100}}]},
}


def _configs(root: Path) -> tuple[Path, Path]:
    root.mkdir(parents=True, exist_ok=True)
    data = root / "data.yaml"
    data.write_text(yaml.safe_dump(DATA))
    model = root / "punet.yaml"
    model.write_text(yaml.safe_dump({"model": {"class_path": "punet", "init_args": dict(TINY_PUNET)}}))
    return data, model


def _command(data: Path, model: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "probseg", "benchmark", "-c", str(data), "--models", str(model), "--out", str(out),
            "--folds", "0", "1", "--max-steps", "2", "--wandb", "disabled"]


def _per_image(run: Path) -> dict[str, list[float]]:
    with (run / "results" / "test_per_image.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    return {key: [float(r[key]) for r in rows] for key in rows[0] if key != "index"}


def test_benchmark_resumes_after_a_kill_and_its_table_matches_the_per_fold_files(tmp_path: Path) -> None:
    data, model = _configs(tmp_path)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Kill the whole benchmark (it and its fit/test children) once fold 0 is done.
    proc = subprocess.Popen(_command(data, model, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=tmp_path, env=env, start_new_session=True)
    done0 = out / "punet" / "fold0" / "done.json"
    deadline = time.time() + 300
    while not done0.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert done0.is_file(), proc.communicate()[0].decode()[-3000:] if proc.poll() is not None else "timed out"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "punet" / "fold1" / "done.json").is_file()
    checkpoint0 = out / "punet" / "fold0" / "checkpoints" / "last.ckpt"
    stamp = checkpoint0.stat().st_mtime_ns
    fit_log0 = (out / "punet" / "fold0" / "fit.log").read_text()

    done = subprocess.run(_command(data, model, out), check=False, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    assert "punet fold 0: done, skipped" in done.stdout
    assert checkpoint0.stat().st_mtime_ns == stamp, "fold 0 was retrained"
    assert (out / "punet" / "fold0" / "fit.log").read_text() == fit_log0
    assert (out / "punet" / "fold1" / "done.json").is_file()
    for name in ("folds.csv", "table1.csv", "table1.md", "table1.png"):
        assert (out / name).is_file(), name

    # Table 1 against the per-image files: fold means, their spread, and every image pooled.
    with (out / "table1.csv").open() as fh:
        table = {row["model"]: row for row in csv.DictReader(fh)}
    assert set(table) == {"punet", "oracle"}
    runs = [_per_image(out / "punet" / f"fold{k}") for k in (0, 1)]
    for label, prefix in (("punet", ""), ("oracle", "oracle_")):
        for metric in TABLE_COLUMNS:
            if f"{prefix}{metric}" not in runs[0]:
                assert table[label].get(f"{metric}_fold_mean", "") == "", (label, metric)
                continue
            values = [np.array(r[f"{prefix}{metric}"]) for r in runs]
            fold_means = [v.mean() for v in values]
            row = table[label]
            assert float(row[f"{metric}_fold_mean"]) == pytest.approx(np.mean(fold_means), rel=1e-6, abs=1e-9)
            assert float(row[f"{metric}_fold_std"]) == pytest.approx(np.std(fold_means, ddof=1), rel=1e-5, abs=1e-7)
            every = np.concatenate(values)
            assert float(row[f"{metric}_image_mean"]) == pytest.approx(every.mean(), rel=1e-6, abs=1e-9)
            assert float(row[f"{metric}_image_std"]) == pytest.approx(every.std(ddof=1), rel=1e-5, abs=1e-7)
    md = (out / "table1.md").read_text()
    assert "ged self-pairs; matching lcm; ce mean; gini sigma; hausdorff-empty diagonal" in md
    assert "S = 4 hypotheses" in md and "2 training steps per model and fold" in md
    config0 = (out / "punet" / "fold0" / "fit.log").read_text()
    assert "--data.init_args.fold 0" in config0 and "--trainer.max_steps 2" in config0


def test_a_different_benchmark_in_the_same_folder_is_refused(tmp_path: Path) -> None:
    data, model = _configs(tmp_path)
    out = tmp_path / "out"
    plan = bench.make_plan([str(data)], [str(model)], [0], 0, 5, [])
    bench.check_plan(out, plan)
    bench.check_plan(out, {**plan, "folds": [1]})  # adding folds resumes the same benchmark
    assert json.loads((out / "benchmark.json").read_text())["folds"] == [0, 1]
    with pytest.raises(BenchmarkError, match=r"benchmark.json holds another benchmark \(differs in \['max_steps'\]\)"):
        bench.check_plan(out, {**plan, "max_steps": 6})


@pytest.mark.parametrize(
    ("models", "match"),
    [
        (["missing.yaml"], "model config not found: missing.yaml"),
        (["{m}", "{m}"], "two model configs are named 'punet'"),
    ],
)
def test_model_config_errors_name_the_file(tmp_path: Path, models: list[str], match: str) -> None:
    _, model = _configs(tmp_path)
    with pytest.raises(BenchmarkError, match=match):
        bench.model_names([m.format(m=model) for m in models])


def test_fold_arguments_per_data_class() -> None:
    assert bench.fold_arguments("probseg.data.SyntheticDataModule", 2) == ["--data.init_args.fold", "2"]
    assert bench.fold_arguments("probseg.data.ArrayDataModule", 1) == [
        "--data.init_args.split_mode", "paper", "--data.init_args.fold", "1"]
    with pytest.raises(BenchmarkError, match="has no cross-validation folds"):
        bench.fold_arguments("lightning.pytorch.LightningDataModule", 0)
    with pytest.raises(BenchmarkError, match="cannot be imported"):
        bench.fold_arguments("probseg.data.NoSuchModule", 0)


@pytest.mark.parametrize("seed", [0, 1])
def test_pooled_mean_and_std_equal_numpy_on_the_union(seed: int) -> None:
    rng = np.random.default_rng(seed)
    groups = [rng.normal(size=n) * (k + 1) + k for k, n in enumerate((5, 1, 9))]
    mean, std = bench.pooled([len(g) for g in groups], [g.mean() for g in groups],
                             [g.std(ddof=1) if len(g) > 1 else math.nan for g in groups])
    every = np.concatenate(groups)
    assert mean == pytest.approx(every.mean()) and std == pytest.approx(every.std(ddof=1))
    assert math.isnan(bench.pooled([0], [math.nan], [math.nan])[0])


def test_tested_checkpoint_is_the_recorded_best_else_the_last(tmp_path: Path) -> None:
    import torch

    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    state = {"callbacks": {"RunCheckpoint{'monitor': 'val/loss'}": {"best_model_path": "/elsewhere/epoch=3-step=40.ckpt"}}}
    torch.save(state, folder / "last.ckpt")
    run = tmp_path / "run"
    assert bench.tested_checkpoint(run, "best") == folder / "last.ckpt"  # the best file is not there
    (folder / "epoch=3-step=40.ckpt").write_bytes(b"")
    assert bench.tested_checkpoint(run, "best") == folder / "epoch=3-step=40.ckpt"
    assert bench.tested_checkpoint(run, "last") == folder / "last.ckpt"
    (folder / "last.ckpt").write_bytes(b"truncated")
    with pytest.raises(BenchmarkError, match=r"last.ckpt: not a readable checkpoint"):
        bench.tested_checkpoint(run, "best")
    with pytest.raises(BenchmarkError, match="wrote no checkpoints/last.ckpt"):
        bench.tested_checkpoint(tmp_path / "none", "best")

"""Evaluation, Gini and sample-grid callbacks driven through the real ``probseg`` CLI, the results
table and ``probseg results``, and evaluation under 2-process DDP (gloo, CPU) against 1 process."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from probseg.callbacks import EvaluationCallback, GiniCallback, SampleGridCallback
from probseg.callbacks.evaluation import dataset_name, per_image_generators
from probseg.cli import main
from probseg.data import SyntheticDataModule
from probseg.metrics import METRIC_NAMES, POOLED_NAMES
from probseg.models import ProbUNet
from probseg.results import read_results
from tests.conftest import TINY_PUNET
from tests.helpers import tiny_config
from tests.tolerances import network_tolerance

PROBSEG = [str(Path(sys.executable).parent / "probseg")]
CALLBACKS = [
    {"class_path": "probseg.callbacks.EvaluationCallback", "init_args": {"num_samples": 4}},
    {"class_path": "probseg.callbacks.GiniCallback", "init_args": {"every_n_steps": 1}},
    {"class_path": "probseg.callbacks.SampleGridCallback", "init_args": {"num_images": 2, "num_samples": 3}},
]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny fit with all three callbacks (W&B offline), then ``probseg test`` on its checkpoint."""
    root = tmp_path_factory.mktemp("evaluation")
    config = tiny_config(root, max_steps=4, callbacks=CALLBACKS)
    assert main(["fit", "--config", str(config)]) == 0
    assert main(["test", "--config", str(config), "--ckpt_path", str(root / "run/checkpoints/last.ckpt")]) == 0
    return root


def test_fit_logs_every_metric_and_the_oracle(trained: Path) -> None:
    (fit_log, test_log) = sorted((trained / "run/logs").glob("version_*/metrics.csv"))
    rows = _rows(fit_log)
    val = [r for r in rows if r.get("val/hm_iou")]
    assert len(val) == 2, "validation ran twice (val_check_interval=2, max_steps=4)"
    for stage_row in val:
        for name in METRIC_NAMES:
            assert math.isfinite(float(stage_row[f"val/{name}"])), name
            if name != "gini":
                assert math.isfinite(float(stage_row[f"val/oracle_{name}"])), name
    gini_steps = [int(r["step"]) for r in rows if r.get("train/gini")]
    assert gini_steps == [1, 2, 3, 4]
    assert all(0 <= float(r["train/gini"]) <= 1 for r in rows if r.get("train/gini"))
    test_keys = {k for r in _rows(test_log) for k, v in r.items() if v}
    assert {f"test/{m}" for m in METRIC_NAMES} <= test_keys
    assert {f"test/oracle_{m}" for m in METRIC_NAMES if m != "gini"} <= test_keys


def test_sample_grids_are_written_and_sent_to_wandb(trained: Path) -> None:
    pngs = sorted((trained / "run/sample_grids").glob("*.png"))
    # 16 training images in batches of 8: validation ends epochs 0 and 1.
    assert [p.name for p in pngs] == [f"epoch00{e}_synthetic-val-0000{i}.png" for e in (0, 1) for i in (0, 1)]
    media = list((trained / "run/wandb").glob("offline-run-*/files/media/images/val/samples_*.png"))
    assert len(media) == 4, "two images at each of the two validations"


def test_results_table_matches_the_logged_test_metrics(trained: Path) -> None:
    rows = [r for r in read_results(trained / "run/results/test_results.csv") if r["subset"] == "all"]
    assert [(r["model"], r["dataset"], r["source"], r["num_images"], r["num_samples"]) for r in rows] == [
        ("punet", "synthetic", "model", 8, 4), ("punet", "synthetic", "oracle", 8, 4)]
    assert {r["conventions"] for r in rows} == {
        "ged self-pairs; matching lcm; ce mean; gini sigma; hausdorff-empty diagonal"}
    (_, test_log) = sorted((trained / "run/logs").glob("version_*/metrics.csv"))
    logged = next(r for r in _rows(test_log) if r.get("test/hm_iou"))
    for name in METRIC_NAMES:
        assert rows[0][f"{name}_mean"] == pytest.approx(float(logged[f"test/{name}"]), rel=1e-5)
    for name in POOLED_NAMES:  # the dataset-pooled values, logged and in the table
        assert rows[0][name] == pytest.approx(float(logged[f"test/{name}"]), rel=1e-5)
        assert rows[1][name] == pytest.approx(float(logged[f"test/oracle_{name}"]), rel=1e-5)
    per_image = _rows(trained / "run/results/test_per_image.csv")
    assert [int(r["index"]) for r in per_image] == list(range(8))
    ged = [float(r["ged"]) for r in per_image]
    assert rows[0]["ged_mean"] == pytest.approx(sum(ged) / 8)
    assert rows[0]["ged_std"] == pytest.approx(torch.tensor(ged, dtype=torch.float64).std().item())
    md = (trained / "run/results/test_results.md").read_text()
    assert md.startswith("| model | dataset | images | hm_iou |") and "| oracle | synthetic | 8 |" in md


def test_probseg_results_gathers_table_1(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "table.md"
    assert main(["results", str(trained / "run"), "--out", str(out)]) == 0
    table = out.read_text()
    assert table.splitlines()[0] == "| model | dataset | images | 1 - IoU | 1 - Dice | Hausdorff | CE | Gini |"
    assert table.count("| punet |") == 1 and table.count("| oracle |") == 1
    assert table in capsys.readouterr().out
    assert main(["results", str(tmp_path / "missing")]) == 1
    assert "no such file or folder" in capsys.readouterr().err


def test_per_image_generators_make_hypotheses_independent_of_the_batch() -> None:
    torch.manual_seed(0)
    model = ProbUNet(**TINY_PUNET).eval()
    images = torch.rand(3, 1, 32, 32)
    index = torch.tensor([7, 2, 5])
    with torch.no_grad():
        together = model.sample(images, 4, generator=per_image_generators(index, 0, images.device))
        alone = [model.sample(images[i : i + 1], 4, generator=per_image_generators(index[i : i + 1], 0, images.device))
                 for i in range(3)]
    # batch of 3 vs one image at a time: other convolution shapes, so possibly another order of
    # the sums; float64 checks the draws and the maths, float32 stays within its rounding bound
    alone = torch.cat(alone)
    torch.testing.assert_close(together, alone, rtol=0, atol=network_tolerance(model, alone.abs().max().item()))
    model.double()
    with torch.no_grad():
        together = model.sample(images.double(), 4, generator=per_image_generators(index, 0, images.device))
        alone = [model.sample(images[i : i + 1].double(), 4,
                              generator=per_image_generators(index[i : i + 1], 0, images.device)) for i in range(3)]
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-12, atol=1e-12)
    model.float()
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        model.sample(images[:2], 2, generator=per_image_generators(index, 0, images.device))


class _Recorder:
    def __init__(self) -> None:
        self.logged: list[tuple[dict, int]] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.logged.append((metrics, step))


def test_gini_callback_logs_the_mean_gini_of_the_batch_prior_sigmas_every_n_steps() -> None:
    torch.manual_seed(0)
    model = ProbUNet(**TINY_PUNET)
    batch = {"image": torch.rand(4, 1, 32, 32)}
    recorder = _Recorder()
    callback = GiniCallback(every_n_steps=10)
    for step in (1, 5, 10, 10, 20):  # step 10 twice: gradient accumulation calls the hook again
        trainer = SimpleNamespace(global_step=step, loggers=[recorder])
        callback.on_train_batch_end(trainer, model, None, batch, 0)
    assert [s for _, s in recorder.logged] == [1, 10, 20]
    with torch.no_grad():
        sigma = model.network.prior(batch["image"]).base_dist.scale
    # Independent Gini: the mean absolute difference form, sum |x_i - x_j| / (2 L^2 mean(x)).
    gini = ((sigma[:, :, None] - sigma[:, None, :]).abs().sum((1, 2)) / (2 * sigma.shape[1] ** 2 * sigma.mean(1)))
    assert recorder.logged[0][0]["train/gini"] == pytest.approx(gini.mean().item(), abs=1e-6)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: EvaluationCallback(num_samples=0), "num_samples must be positive"),
        (lambda: EvaluationCallback(kernels=["iou", "jaccard"]), "unknown kernels"),
        (lambda: EvaluationCallback(every_n_epochs=0), "every_n_epochs"),
        (lambda: EvaluationCallback(matching="greedy"), "matching must be one of"),
        (lambda: EvaluationCallback(gini_of="std"), "gini_of must be one of"),
        (lambda: EvaluationCallback(ce_reading="pixel"), "ce_reading must be one of"),
        (lambda: GiniCallback(every_n_steps=0), "every_n_steps"),
        (lambda: SampleGridCallback(num_images=0), "must be positive"),
    ],
)
def test_callback_arguments_are_checked(factory, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        factory()


def test_dataset_name() -> None:
    assert dataset_name(SyntheticDataModule()) == "synthetic"
    assert dataset_name(None) == ""


def test_ddp_evaluation_equals_one_process_on_an_uneven_split(trained: Path, tmp_path: Path) -> None:
    """7 test images, 2 processes: the sampler pads rank 1 with a repeat of image 0, and every
    image sits at another position of another rank's loader than in one process. The results
    must not change.

    Thresholded kernels (IoU, Dice, Hausdorff) jump when a logit near the class boundary rounds
    the other way, so the two runs must compute every image's hypotheses with the same kernels in
    the same order: one image per batch and one thread in every process (Lightning would give each
    DDP process cores / processes threads). That hypotheses do not depend on the batch an image
    sits in is tested in float64 by test_per_image_generators_make_hypotheses_independent_of_the_batch.
    """
    checkpoint = str(trained / "run/checkpoints/last.ckpt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = {}
    for label, extra in {"one": [], "ddp": ["--trainer.strategy", "ddp", "--trainer.devices", "2"]}.items():
        config = tiny_config(tmp_path / label, callbacks=CALLBACKS[:1])
        args = ["test", "--config", str(config), "--ckpt_path", checkpoint, "--wandb", "disabled",
                "--data.init_args.num_test", "7", "--data.init_args.batch_size", "1",
                "--data.init_args.min_raters", "2", *extra]
        done = subprocess.run(PROBSEG + args, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        results[label] = [r for r in read_results(tmp_path / label / "run/results/test_results.csv")
                          if r["subset"] == "all"]
    one, ddp = results["one"], results["ddp"]
    assert [r["num_images"] for r in ddp] == [7, 7], "the padded repeat must be counted once"
    for a, b in zip(one, ddp):
        for key, value in a.items():
            if key.endswith(("_mean", "_std", "_pooled")) and not math.isnan(value):  # the oracle has no Gini
                assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def _tiny_trainer(root: Path, callback: EvaluationCallback):
    import lightning.pytorch as pl

    return pl.Trainer(default_root_dir=str(root), accelerator="cpu", devices=1, logger=False, max_steps=1,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[callback], limit_val_batches=0)


def test_no_oracle_for_loaders_that_are_not_the_datamodule_split(tmp_path: Path) -> None:
    """After a fit on a datamodule, ``trainer.test(dataloaders=other)`` keeps the old datamodule
    attached: its oracle describes other images, so no oracle row may be written, and images
    without ``index`` each keep their own per-image row."""
    from torch.utils.data import DataLoader

    from probseg.data import SyntheticDataset

    torch.manual_seed(0)
    model = ProbUNet(**TINY_PUNET)
    dm = SyntheticDataModule(image_size=32, num_train=4, num_val=2, num_test=2, num_raters=2, batch_size=2)
    callback = EvaluationCallback(num_samples=2, kernels=["iou"])
    trainer = _tiny_trainer(tmp_path, callback)
    trainer.fit(model, datamodule=dm)
    other = SyntheticDataset(5, split="test", image_size=32, num_raters=2, seed=123)
    no_index = [{k: v for k, v in other[i].items() if k != "index"} for i in range(5)]
    trainer.test(model, dataloaders=DataLoader(no_index, batch_size=2))
    assert [r["source"] for r in callback.last_results] == ["model"]
    assert callback.last_results[0]["dataset"] == "" and callback.last_results[0]["num_images"] == 5
    per_image = _rows(tmp_path / "results/test_per_image.csv")
    assert [int(r["index"]) for r in per_image] == [0, 1, 2, 3, 4]
    # The datamodule's own test split gets its oracle row back.
    trainer.test(model, datamodule=dm)
    assert [(r["source"], r["subset"]) for r in callback.last_results][:2] == [("model", "all"), ("oracle", "all")]
    assert callback.last_results[0]["dataset"] == "synthetic"
    assert {r["subset"] for r in callback.last_results} == {"all", "any_rater", "all_raters"}


def test_a_mixtures_hypotheses_are_evaluated_with_their_weights() -> None:
    """MoSE: the callback's values equal HypothesisMetrics fed sample_weighted's hypotheses and
    weights (the same per-image generators), and differ from the unweighted evaluation."""
    from probseg.metrics import HypothesisMetrics
    from probseg.models import MODELS
    from tests.models.test_zoo import TINY_ARGS

    torch.manual_seed(0)
    model = MODELS["mose"](**TINY_ARGS["mose"]).eval()
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(3, 1, 32, 32, generator=g), "masks": torch.randint(0, 2, (3, 4, 32, 32), generator=g),
             "index": torch.tensor([4, 0, 9])}
    callback = EvaluationCallback(num_samples=6, seed=3)
    with torch.no_grad():
        callback._update_hypotheses("test/model", model, model, batch, 0)
        got, _ = callback._metrics["test/model"].per_image()
        logits, weights = model.sample_weighted(batch["image"], 6, per_image_generators(batch["index"], 3, "cpu"))
    expect = HypothesisMetrics(num_classes=2)
    expect.update(logits.softmax(2), batch["masks"], index=batch["index"], sigma=model.prior_sigmas(batch["image"]),
                  sample_weight=weights)
    plain = HypothesisMetrics(num_classes=2)
    plain.update(logits.softmax(2), batch["masks"], index=batch["index"], sigma=model.prior_sigmas(batch["image"]))
    for name, value in expect.per_image()[0].items():
        torch.testing.assert_close(got[name], value, msg=name)
    assert not torch.allclose(got["ged"], plain.per_image()[0]["ged"])

"""Knowledge distillation: configuration errors, the loss against explicit formulas, the teacher
kept out of the student, and teacher -> student through the real CLI."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

import probseg
from probseg.cli import main
from probseg.data import SyntheticDataModule
from probseg.distillation import Distillation
from probseg.models import MODELS, ProbUNet, UNetBaseline
from probseg.models.objectives import StepContext
from probseg.results import read_results
from tests.conftest import TINY_PUNET
from tests.helpers import tiny_config

TINY_UNET = {"num_filters": [4, 8, 8], "convs_per_block": 1}
NO_TRAINER_LOG = pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`")  # steps run without a Trainer


def _distillation_terms(model, batch, generator=None, stage="train"):
    """The ``kd_*`` terms of the model's distillation objective for a batch, on their own."""
    context = StepContext(batch, None, None, model.network, generator, model.training, model.global_step, stage)
    return model.distiller(context)


def _datamodule() -> SyntheticDataModule:
    return SyntheticDataModule(image_size=32, num_train=8, num_val=4, num_test=4, num_raters=3, batch_size=4)


def _trainer(root: Path, steps: int = 2) -> pl.Trainer:
    return pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    trainer = _trainer(root, steps=4)
    trainer.fit(UNetBaseline(**TINY_UNET, lr=1e-2), datamodule=_datamodule())
    path = root / "teacher.ckpt"
    trainer.save_checkpoint(path)
    return path


def _batch(b: int = 2, size: int = 32) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(b, 1, size, size, generator=g),
            "masks": torch.randint(0, 2, (b, 3, size, size), generator=g),
            "rater_mask": torch.ones(b, 3, dtype=torch.bool)}


# --- configuration ------------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "message"), [
    ({"distillation": {"weights": {"ce": 1.0}}}, "no teacher checkpoint is given"),
    ({"teacher": "t.ckpt", "distillation": {"kde": {"bandwidth": 0.0}}}, "bandwidth"),
    ({"teacher": "t.ckpt", "distillation": {"kde": {"bandwidth": -1e-3}}}, "bandwidth"),
    ({"teacher": "t.ckpt", "num_classes": 3, "distillation": {"kde": {"n_key": 2}}}, "n_key must be at least the number of classes"),
    ({"teacher": "t.ckpt", "distillation": {"temperature": 2.0}}, "unknown distillation keys \\['temperature'\\]"),
    ({"teacher": "t.ckpt", "distillation": {"weights": {"kl": 1.0}}}, "distillation.weights: unknown reconstruction components"),
    ({"teacher": "t.ckpt", "distillation": {"kde": {"kernel": "gauss"}}}, "distillation.kde"),
    ({"teacher": "t.ckpt", "distillation": {"teacher_samples": 0}}, "teacher_samples must be positive"),
    ({"teacher": "t.ckpt", "distillation": {"label_smoothing": 1.0}}, "label_smoothing must be in"),
    ({"teacher": "t.ckpt", "distillation": {"weights": {}}}, "distillation.weights must name at least one"),
])
def test_bad_distillation_settings_fail_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ProbUNet(**TINY_PUNET, **kwargs)


def test_defaults_are_ce_and_dml1_against_the_kde_calibrated_teacher() -> None:
    model = UNetBaseline(**TINY_UNET, teacher="t.ckpt")
    d = model.distiller
    assert d.weights == {"ce": 1.0, "dml1": 1.0}
    assert d.kde is not None and d.kde.bandwidth == 1e-3
    assert UNetBaseline(**TINY_UNET).distiller is None
    assert Distillation.from_config("t.ckpt", {"kde": False}, 2, 1).kde is None


def test_missing_or_mismatched_teacher_fails_before_the_first_step(tmp_path: Path, teacher_ckpt: Path) -> None:
    model = UNetBaseline(**TINY_UNET, teacher=str(tmp_path / "nope.ckpt"))
    steps = []

    class Count(pl.Callback):
        def on_train_batch_start(self, *args) -> None:  # noqa: ANN002
            steps.append(1)

    trainer = _trainer(tmp_path)
    trainer.callbacks.append(Count())
    with pytest.raises(FileNotFoundError, match="nope.ckpt.*'teacher'"):
        trainer.fit(model, datamodule=_datamodule())
    assert not steps
    three = UNetBaseline(**TINY_UNET, num_classes=3, teacher=str(teacher_ckpt))
    with pytest.raises(ValueError, match="num_classes=2.*the student has num_classes=3"):
        _trainer(tmp_path).fit(three, datamodule=_datamodule())


# --- the loss -----------------------------------------------------------------------------------

def _teacher_probs(path: Path, images: torch.Tensor) -> torch.Tensor:
    teacher = probseg.load_model(path)
    with torch.no_grad():
        return torch.conv2d(teacher.network.unet(images), teacher.network.head.weight, teacher.network.head.bias).softmax(1)


def test_kd_terms_match_the_formulas(teacher_ckpt: Path) -> None:
    torch.manual_seed(0)
    eps = 0.1
    model = UNetBaseline(**TINY_UNET, teacher=str(teacher_ckpt),
                         distillation={"kde": False, "label_smoothing": eps, "weights": {"ce": 0.5, "dml1": 2.0}})
    batch = _batch()
    terms = model.loss_terms(batch)
    terms.update(_distillation_terms(model, batch))
    t = (1 - eps) * _teacher_probs(teacher_ckpt, batch["image"]) + eps / 2
    p = model.network.logits(batch["image"], 1, dropout=False)[:, 0].softmax(1)
    pixels = 32 * 32
    ce = -(t * p.log()).sum(1).sum((1, 2)).mean()
    # DML1 per image, classes averaged, smooth s = 1: 1 - (|x| + |y| - |x - y| + s) / (|x| + |y| + s),
    # scaled to pixel sums.
    x, y = p.flatten(2), t.flatten(2)
    cards = x.sum(2) + y.sum(2)
    dml1 = (1 - (cards - (x - y).abs().sum(2) + 1) / (cards + 1)).mean(1).mean() * pixels
    torch.testing.assert_close(terms["kd_ce"], 0.5 * ce, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(terms["kd_dml1"], 2.0 * dml1, rtol=1e-4, atol=1e-3)


def test_kd_target_is_the_kde_calibrated_teacher(teacher_ckpt: Path) -> None:
    """kd_ce against an independent recomputation: the teacher's softmax, recalibrated by
    kde_calibrate with the raters' mean as labels and the same key-point generator."""
    from probseg.calibration import kde_calibrate
    from probseg.data.fusion import fuse_raters

    torch.manual_seed(0)
    kde = {"bandwidth": 0.05, "n_key": 64, "region": "all"}
    model = UNetBaseline(**TINY_UNET, teacher=str(teacher_ckpt), distillation={"kde": kde, "weights": {"ce": 1.0}})
    batch = _batch()
    terms = _distillation_terms(model, batch, torch.Generator().manual_seed(7))
    raw = _teacher_probs(teacher_ckpt, batch["image"])
    labels = fuse_raters(batch["masks"], batch["rater_mask"], 2, "mean")
    t = kde_calibrate(raw, labels, **kde, generator=torch.Generator().manual_seed(7))
    assert (t - raw).abs().max() > 1e-3  # the calibration moved the target
    p = model.network.logits(batch["image"], 1, dropout=False)[:, 0].softmax(1)
    torch.testing.assert_close(terms["kd_ce"], -(t * p.log()).sum(1).sum((1, 2)).mean(), rtol=1e-4, atol=1e-3)


@NO_TRAINER_LOG
def test_an_mc_dropout_student_averages_student_samples(teacher_ckpt: Path) -> None:
    torch.manual_seed(0)
    model = UNetBaseline(**TINY_UNET, dropout=0.3, teacher=str(teacher_ckpt),
                         distillation={"kde": False, "student_samples": 6}).train()
    calls = []
    model.network.head.register_forward_hook(lambda *args: calls.append(1))
    sampled = []
    original = model.network.sample
    model.network.sample = lambda images, n, generator=None: sampled.append(n) or original(images, n, generator)
    model._step(_batch(), "train", 0)
    assert sampled == [6]
    one = UNetBaseline(**TINY_UNET, dropout=0.3, teacher=str(teacher_ckpt), distillation={"student_samples": 1})
    one.network.sample = lambda *args, **kwargs: pytest.fail("one draw reuses the training forward pass")
    one._step(_batch(), "train", 0)


def test_latent_student_distils_its_prior_predictive_mean(teacher_ckpt: Path) -> None:
    torch.manual_seed(0)
    model = ProbUNet(**TINY_PUNET, teacher=str(teacher_ckpt),
                     distillation={"kde": False, "student_samples": 5, "weights": {"ce": 1.0}})
    images = _batch()["image"]
    log_probs = model.predictive_log_probabilities(images, 5, torch.Generator().manual_seed(3))
    samples = model.sample(images, 5, torch.Generator().manual_seed(3)).softmax(2)
    torch.testing.assert_close(log_probs.exp(), samples.mean(1), rtol=1e-5, atol=1e-6)
    terms = _distillation_terms(model, _batch(), torch.Generator().manual_seed(3))
    terms["kd_ce"].backward()  # through the reparameterized prior draws, into prior and decoder
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.network.prior.parameters())
    assert all(p.grad is None for p in model.network.posterior.parameters())


@NO_TRAINER_LOG
def test_a_deterministic_student_runs_its_network_once_per_step(teacher_ckpt: Path) -> None:
    model = UNetBaseline(**TINY_UNET, teacher=str(teacher_ckpt)).train()
    calls = []
    model.network.unet.register_forward_hook(lambda *args: calls.append(1))
    model._step(_batch(), "train", 0)
    assert len(calls) == 1


def test_teacher_stays_out_of_the_student(teacher_ckpt: Path, tmp_path: Path) -> None:
    copy = tmp_path / "teacher.ckpt"
    copy.write_bytes(teacher_ckpt.read_bytes())
    torch.manual_seed(0)
    student = UNetBaseline(**TINY_UNET, teacher=str(copy))
    plain = UNetBaseline(**TINY_UNET)
    trainer = _trainer(tmp_path)
    trainer.fit(student, datamodule=_datamodule())
    teacher = student.distiller.teacher_model()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert set(student.state_dict()) == set(plain.state_dict())
    params = {id(p) for p in student.parameters()}
    assert not any(id(p) in params for p in teacher.parameters())
    trainer.save_checkpoint(tmp_path / "student.ckpt")
    copy.unlink()  # a student reloads and samples without its teacher
    loaded = probseg.load_model(tmp_path / "student.ckpt")
    assert loaded.sample(torch.rand(1, 1, 32, 32), 2).shape == (1, 2, 2, 32, 32)
    with pytest.warns(UserWarning, match="the teacher is not evaluated"):
        from probseg.callbacks import EvaluationCallback

        tester = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path, callbacks=[EvaluationCallback(num_samples=2)])
        tester.test(loaded, datamodule=_datamodule())
    rows = [r for r in read_results(tmp_path / "results" / "test_results.csv") if r["subset"] == "all"]
    assert [r["source"] for r in rows] == ["model", "oracle"]


def test_a_changed_teacher_file_is_reported(teacher_ckpt: Path, tmp_path: Path) -> None:
    copy = tmp_path / "teacher.ckpt"
    copy.write_bytes(teacher_ckpt.read_bytes())
    torch.manual_seed(0)
    student = UNetBaseline(**TINY_UNET, teacher=str(copy))
    trainer = _trainer(tmp_path)
    trainer.fit(student, datamodule=_datamodule())
    trainer.save_checkpoint(tmp_path / "student.ckpt")
    meta = torch.load(tmp_path / "student.ckpt", weights_only=True)["probseg"]
    assert meta["teacher_sha256"] == hashlib.sha256(copy.read_bytes()).hexdigest()
    probseg.load_model(tmp_path / "student.ckpt").distiller.teacher_model()  # same file: no warning
    other = UNetBaseline(**TINY_UNET)
    _trainer(tmp_path / "other").fit(other, datamodule=_datamodule())
    torch.save({**torch.load(teacher_ckpt, weights_only=True), "state_dict": other.state_dict()}, copy)
    with pytest.warns(UserWarning, match="has changed since this student was trained"):
        probseg.load_model(tmp_path / "student.ckpt").distiller.teacher_model()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_zoo_model_can_be_a_student(name: str, teacher_ckpt: Path, tmp_path: Path) -> None:
    from tests.models.test_zoo import TINY_ARGS

    torch.manual_seed(0)
    model = MODELS[name](**TINY_ARGS[name], teacher=str(teacher_ckpt), distillation={"kde": {"n_key": 64}})
    logger = pl.loggers.CSVLogger(tmp_path)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         log_every_n_steps=1, val_check_interval=2)
    trainer.fit(model, datamodule=_datamodule())
    metrics = trainer.logged_metrics
    for key in ("train/kd_ce", "train/kd_dml1", "val/kd_ce", "val/kd_dml1", "val/teacher_ece", "val/teacher_kde_ece"):
        assert key in metrics and math.isfinite(float(metrics[key])), key
    assert 0 <= float(metrics["val/teacher_kde_ece"]) <= 1


# --- through the CLI ----------------------------------------------------------------------------

def test_teacher_then_student_through_the_cli(tmp_path: Path) -> None:
    teacher_cfg = tiny_config(tmp_path / "teacher", model={"class_path": "unet", "init_args": dict(TINY_UNET)})
    assert main(["fit", "--config", str(teacher_cfg), "--wandb", "disabled"]) == 0
    teacher = tmp_path / "teacher" / "run" / "checkpoints" / "last.ckpt"
    student = {"class_path": "punet", "init_args": {**TINY_PUNET, "teacher": str(teacher),
                                                     "distillation": {"kde": {"n_key": 128}, "student_samples": 2}}}
    config = tiny_config(tmp_path / "student", model=student)
    assert main(["fit", "--config", str(config), "--wandb", "disabled"]) == 0
    last = tmp_path / "student" / "run" / "checkpoints" / "last.ckpt"
    assert main(["test", "--config", str(config), "--wandb", "disabled", "--ckpt_path", str(last)]) == 0
    rows = [r for r in read_results(tmp_path / "student" / "run" / "results" / "test_results.csv") if r["subset"] == "all"]
    assert [(r["model"], r["source"]) for r in rows] == [
        ("punet+kd", "model"), ("punet+kd", "oracle"), ("punet+kd", "teacher"), ("punet+kd", "teacher_kde")]
    kde = rows[3]
    assert 0 <= kde["ece_mean"] <= 1 and 0 <= kde["dice_mean"] <= 1 and math.isnan(kde["hm_iou_mean"])
    assert 0 <= kde["ece_pooled"] <= 1 and 0 <= kde["dice_pooled"] <= 1  # the calibrated teacher's, pooled
    markdown = (tmp_path / "student" / "run" / "results" / "test_results.md").read_text()
    assert "punet+kd: teacher + KDE" in markdown


def test_missing_teacher_through_the_cli_fails_before_training(tmp_path: Path) -> None:
    student = {"class_path": "unet", "init_args": {**TINY_UNET, "teacher": str(tmp_path / "missing.ckpt")}}
    config = tiny_config(tmp_path, model=student)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        main(["fit", "--config", str(config), "--wandb", "disabled"])
    assert not list((tmp_path / "run").rglob("*.ckpt"))

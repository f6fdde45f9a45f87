"""No silent NaN, guarded numerics under extreme inputs, and safe loading on every path a user
can hand a file to (``--ckpt_path`` resume included)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from probseg.cli import main
from probseg.data import SyntheticDataModule
from probseg.losses import ReconstructionLoss, dml1
from probseg.metrics import HypothesisMetrics
from probseg.models import MODELS
from probseg.models.csae import sinkhorn_divergence
from tests.helpers import tiny_config
from tests.models.test_zoo import MIX_ARGS, TINY_ARGS
from tests.test_checkpoint import _malicious_checkpoint


class _PoisonAfter(pl.Callback):
    """Puts a NaN into the weights after step ``step``, as an exploding update would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.network.fcomb.parameters()).view(-1)[0] = float("nan")


def _trainer(root: Path, *callbacks: pl.Callback) -> pl.Trainer:
    return pl.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=root, limit_val_batches=0,
                      enable_checkpointing=False, callbacks=list(callbacks))


def test_a_non_finite_loss_stops_naming_term_and_step_after_saving_the_last_good_state(tmp_path: Path) -> None:
    """The KL term turns NaN at step 3 with finite weights (an overflow in the forward pass):
    the run stops with the term and step named, and the saved weights are those of step 3."""
    torch.manual_seed(0)
    model = MODELS["punet"](**TINY_ARGS["punet"])
    original = model.loss_terms

    def loss_terms(batch, generator=None, **kwargs):  # noqa: ANN001, ANN003
        terms = original(batch, generator, **kwargs)
        if model.trainer.global_step == 3:
            terms["kl"] = terms["kl"] * float("nan")
        return terms

    model.loss_terms = loss_terms
    trainer = _trainer(tmp_path)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at training step 3: kl = nan.*synthetic-train-.*"
                                                 r"last good state is saved to .*non-finite-step3.ckpt"):
        trainer.fit(model, datamodule=SyntheticDataModule(image_size=32, num_train=16, batch_size=4))
    saved = torch.load(tmp_path / "checkpoints/non-finite-step3.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 3
    for key, value in model.state_dict().items():
        assert torch.equal(saved["state_dict"][key], value), key


def test_non_finite_weights_are_not_saved_over_the_good_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MODELS["punet"](**TINY_ARGS["punet"])
    with pytest.raises(FloatingPointError, match="weights are already non-finite, so nothing was saved"):
        _trainer(tmp_path, _PoisonAfter(step=3)).fit(
            model, datamodule=SyntheticDataModule(image_size=32, num_train=16, batch_size=4))
    assert not list(tmp_path.glob("checkpoints/*.ckpt"))


def test_nan_images_are_refused_at_the_batch_boundary_naming_the_image() -> None:
    model = MODELS["punet"](**TINY_ARGS["punet"])
    batch = next(iter(SyntheticDataModule(image_size=32, num_train=4, batch_size=4).train_dataloader()))
    batch["image"][2, 0, 5, 5] = float("inf")
    with pytest.raises(ValueError, match="image synthetic-train-.* holds NaN or Inf"):
        model.check_batch(batch)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("case", ["zeros", "constant_masks", "huge_images"])
def test_every_model_stays_finite_on_extreme_inputs(name: str, case: str) -> None:
    """All-zero images, masks that are all one class, and images of magnitude 1e4: every loss term
    and every gradient stays finite, also with a soft-label loss mix."""
    torch.manual_seed(0)
    mix = {"reconstruction": {"ce": 0.5, "dml1": 0.5, "uniform_kl": 0.1}} if MODELS[name].reconstructs else {}
    mix.update(MIX_ARGS.get(name, {}) if mix else {})  # e.g. the HPU-Net trains on the mix without top-k
    fusion = {} if name == "mose" else {"fusion": "mean"}  # MoSE learns from every rater, no fusion
    model = MODELS[name](**TINY_ARGS[name], **fusion, **mix)
    image = {"zeros": torch.zeros(2, 1, 32, 32), "constant_masks": torch.rand(2, 1, 32, 32),
             "huge_images": 1e4 * torch.randn(2, 1, 32, 32)}[case]
    masks = torch.ones(2, 3, 32, 32, dtype=torch.long) if case == "constant_masks" else torch.randint(0, 2, (2, 3, 32, 32))
    terms = model.loss_terms({"image": image, "masks": masks})
    assert all(torch.isfinite(v) for v in terms.values()), terms
    torch.stack(list(terms.values())).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        assert torch.isfinite(model.sample(image, 3)).all()


def test_huge_logits_keep_losses_and_metrics_finite() -> None:
    """Saturated predictions (probabilities exactly 0 and 1): log-based losses and kernels clamp."""
    logits = (torch.randn(2, 2, 16, 16) * 1e4).requires_grad_()
    target = torch.softmax(torch.randn(2, 2, 16, 16), 1)
    terms = ReconstructionLoss({"ce": 1, "dml1": 1, "cftl": 1, "uniform_kl": 1, "mse": 1})(logits, target)
    total = sum(terms.values())
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(logits.grad).all()
    probs = torch.softmax(torch.randn(2, 4, 2, 16, 16) * 1e4, dim=2)  # hypotheses of 0/1 probabilities
    metrics = HypothesisMetrics(gini=False)
    metrics.update(probs, torch.randint(0, 2, (2, 3, 16, 16)))
    assert all(torch.isfinite(v) for v in metrics.compute().values())
    assert torch.isfinite(dml1(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4), smooth=0))


def test_sinkhorn_with_a_tiny_blur_is_finite() -> None:
    x, y = torch.randn(2, 16, 6, requires_grad=True), torch.randn(2, 16, 6) * 50
    value = sinkhorn_divergence(x, y, blur=1e-3, diameter=100.0).sum()
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all()


def test_resuming_from_a_pickle_bomb_checkpoint_runs_no_code(tmp_path: Path) -> None:
    """``probseg fit --ckpt_path`` goes through Lightning's loader, which must refuse pickled code."""
    config = tiny_config(tmp_path, max_steps=1)
    assert main(["fit", "--config", str(config), "--wandb", "disabled"]) == 0
    marker = tmp_path / "pwned"
    evil = _malicious_checkpoint(tmp_path / "run/checkpoints/last.ckpt", tmp_path / "evil.ckpt", marker)
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|not allowed|unsupported global"):
        main(["fit", "--config", str(config), "--wandb", "disabled", "--ckpt_path", str(evil)])
    assert not marker.exists(), "resuming executed pickled code"
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|not allowed|unsupported global"):
        main(["test", "--config", str(config), "--wandb", "disabled", "--ckpt_path", str(evil)])
    assert not marker.exists()


class _LastCheckpointProbe(pl.Callback):
    """Records, at each step, the step stored in last.ckpt (runs before the checkpoint callback)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.seen = folder, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        path = self.folder / "last.ckpt"
        self.seen.append(torch.load(path, weights_only=True)["global_step"] if path.exists() else None)


def test_step_interval_saves_happen_before_the_first_validation(tmp_path: Path) -> None:
    """Lightning would postpone them until val/loss exists; a crash in a long first epoch must
    still lose at most one interval."""
    from probseg.callbacks import RunCheckpoint

    probe = _LastCheckpointProbe(tmp_path / "checkpoints")
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=1,
                         callbacks=[probe, RunCheckpoint(dirpath=str(tmp_path / "checkpoints"), every_n_train_steps=1)])
    torch.manual_seed(0)
    trainer.fit(MODELS["punet"](**TINY_ARGS["punet"]), datamodule=SyntheticDataModule(image_size=32, num_train=32, batch_size=4))
    assert probe.seen == [None, 1, 2, 3], "last.ckpt must follow every step of the first epoch"


@pytest.mark.parametrize("name", ["planar", "phiseg", "hpunet", "mose"])
def test_half_precision_models_still_run(name: str) -> None:
    """Weights in bf16 (``precision: bf16-true``): the float32 guards apply to autocast only."""
    torch.manual_seed(0)
    model = MODELS[name](**TINY_ARGS[name]).to(torch.bfloat16)
    batch = {"image": torch.rand(2, 1, 32, 32, dtype=torch.bfloat16), "masks": torch.randint(0, 2, (2, 3, 32, 32))}
    terms = model.loss_terms(batch)
    assert all(torch.isfinite(v.float()) for v in terms.values())

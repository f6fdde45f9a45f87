"""``probseg.load_model`` / ``probseg.checkpoint``: loading zoo checkpoints safely, and refusing the rest."""

from __future__ import annotations

import os
import pickle
import shlex
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

import probseg
from probseg.checkpoint import CheckpointError, load_model, read_checkpoint
from probseg.data import SyntheticDataModule
from probseg.models import MODELS, ProbUNet
from tests.conftest import TINY_PUNET
from tests.tolerances import assert_same_kernels


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[ProbUNet, Path]:
    """A tiny ProbUNet fitted for two steps on tiny synthetic data, and its checkpoint."""
    root = tmp_path_factory.mktemp("ckpt")
    pl.seed_everything(0, verbose=False)
    model = ProbUNet(**TINY_PUNET, beta=0.5)
    trainer = pl.Trainer(
        max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
        limit_val_batches=0,
    )
    dm = SyntheticDataModule(image_size=32, num_train=8, num_val=2, num_test=2, num_raters=3, batch_size=4)
    trainer.fit(model, datamodule=dm)
    path = root / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return model, path


def _rewrite(src: Path, dst: Path, edit) -> Path:
    checkpoint = torch.load(src, map_location="cpu", weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, dst)
    return dst


def test_load_model_returns_the_concrete_class_in_eval_mode(trained) -> None:
    model, path = trained
    loaded = load_model(path)
    assert type(loaded) is ProbUNet
    assert not loaded.training
    assert all(not m.training for m in loaded.modules())
    assert loaded.hparams.beta == 0.5
    assert list(loaded.hparams.num_filters) == TINY_PUNET["num_filters"]
    assert loaded.kl_objective.beta == 0.5
    # the public lazy alias is the same function, and str paths work
    assert type(probseg.load_model(str(path))) is ProbUNet


def test_loaded_state_dict_is_identical(trained) -> None:
    model, path = trained
    loaded = load_model(path)
    original = model.state_dict()
    restored = loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key].cpu(), restored[key]), key
    # training changed the weights, so identity is not trivially true of a fresh model
    fresh = ProbUNet(**TINY_PUNET)
    assert any(not torch.equal(fresh.state_dict()[k], original[k].cpu()) for k in original)


def test_loaded_model_gives_identical_samples_for_the_same_generator_seed(trained) -> None:
    model, path = trained
    loaded = load_model(path)
    model = model.cpu().eval()
    images = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model.sample(images, 4, generator=torch.Generator().manual_seed(7))
        b = loaded.sample(images, 4, generator=torch.Generator().manual_seed(7))
    assert b.shape == (2, 4, 2, 32, 32)
    assert_same_kernels(a, b)


def test_checkpoint_carries_probseg_metadata(trained) -> None:
    _, path = trained
    meta = read_checkpoint(path)["probseg"]
    assert meta["model"] == "punet"
    assert meta["class_path"] == "probseg.models.punet.ProbUNet"
    assert meta["version"] == probseg.__version__


def test_missing_file_is_file_not_found_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "missing.ckpt"
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_model(missing)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path)  # a directory is not a checkpoint file


@pytest.mark.parametrize(
    "content",
    [
        b"",
        bytes(range(256)) * 4,
        b"PK\x03\x04garbage",
        b"name,value\n1,2\n",
        pytest.param(b"this is not a checkpoint\n", id="text-sentence"),
        pytest.param(b"hello", id="text-hello"),
    ],
)
def test_garbage_file_is_a_checkpoint_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="garbage.ckpt"):
        load_model(path)
    assert issubclass(CheckpointError, ValueError)
    assert probseg.CheckpointError is CheckpointError


def test_dict_without_probseg_key_is_not_a_probseg_checkpoint(trained, tmp_path: Path) -> None:
    _, path = trained
    plain = _rewrite(path, tmp_path / "plain.ckpt", lambda c: c.pop("probseg"))
    with pytest.raises(CheckpointError, match="not a probseg checkpoint"):
        load_model(plain)


@pytest.mark.parametrize("payload", [{"weights": torch.zeros(2)}, [1, 2, 3], torch.zeros(3)])
def test_non_lightning_objects_are_checkpoint_errors(tmp_path: Path, payload) -> None:
    path = tmp_path / "other.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="other.pt"):
        load_model(path)


def test_unknown_model_name_is_a_key_error_listing_registered_models(trained, tmp_path: Path) -> None:
    _, path = trained
    bad = _rewrite(path, tmp_path / "unknown.ckpt", lambda c: c["probseg"].update(model="no-such-model"))
    with pytest.raises(KeyError) as info:
        load_model(bad)
    message = str(info.value)
    assert "no-such-model" in message
    for name in MODELS:
        assert name in message


def test_hyperparameters_that_do_not_fit_are_a_checkpoint_error(trained, tmp_path: Path) -> None:
    _, path = trained
    bad = _rewrite(path, tmp_path / "hp.ckpt", lambda c: c["hyper_parameters"].update(not_an_argument=3))
    with pytest.raises(CheckpointError, match="hyperparameters"):
        load_model(bad)


class _MarkerPayload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _malicious_checkpoint(trained_path: Path, dst: Path, marker: Path) -> Path:
    checkpoint = torch.load(trained_path, map_location="cpu", weights_only=True)
    checkpoint["extra"] = _MarkerPayload(marker)
    torch.save(checkpoint, dst)
    return dst


def test_pickled_code_is_refused_and_never_run(trained, tmp_path: Path) -> None:
    _, path = trained
    marker = tmp_path / "pwned"
    evil = _malicious_checkpoint(path, tmp_path / "evil.ckpt", marker)
    with pytest.raises(CheckpointError, match="evil.ckpt"):
        load_model(evil)
    assert not marker.exists(), "loading the checkpoint executed pickled code"
    with pytest.raises(CheckpointError):
        read_checkpoint(evil)
    assert not marker.exists()


def test_the_malicious_payload_is_live(trained, tmp_path: Path) -> None:
    """Control for the test above: a full unpickle of the same kind of file does run the payload."""
    _, path = trained
    marker = tmp_path / "control-marker"
    evil = _malicious_checkpoint(path, tmp_path / "control.ckpt", marker)
    with pytest.raises((pickle.UnpicklingError, RuntimeError)):
        torch.load(evil, weights_only=True)
    assert not marker.exists()
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_plain_garbage_is_not_reported_as_refused_code(tmp_path: Path) -> None:
    path = tmp_path / "notes.ckpt"
    path.write_bytes(b"hello")
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint"):
        load_model(path)


def test_probseg_metadata_that_is_not_a_dict(trained, tmp_path: Path) -> None:
    _, path = trained
    bad = _rewrite(path, tmp_path / "bad-meta.ckpt", lambda c: c.update(probseg="punet"))
    with pytest.raises(CheckpointError, match="not a probseg checkpoint"):
        load_model(bad)


def test_weights_that_do_not_fit_are_a_checkpoint_error(trained, tmp_path: Path) -> None:
    _, path = trained
    bad = _rewrite(path, tmp_path / "bad-weights.ckpt", lambda c: c["state_dict"].pop(next(iter(c["state_dict"]))))
    with pytest.raises(CheckpointError, match="weights do not fit ProbUNet"):
        load_model(bad)


def test_unregistered_subclass_is_not_saved_under_the_parent_name(tmp_path: Path, tiny_punet_kwargs) -> None:
    """A subclass inherits registry_name; its checkpoint must not reload silently as the parent."""
    import lightning.pytorch as pl

    class MyVariant(ProbUNet):
        pass

    model = MyVariant(**tiny_punet_kwargs)
    trainer = pl.Trainer(max_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.strategy.connect(model)
    path = tmp_path / "variant.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(KeyError, match="unregistered model class"):
        load_model(path)
    loaded = load_model(path, model_class=MyVariant)
    assert type(loaded) is MyVariant

"""``probseg sample``: inputs from files of every supported format or a data config, outputs and errors."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from probseg.data import SyntheticDataModule
from probseg.models import ProbUNet
from probseg.sampling import load_image_file, main
from tests.conftest import TINY_PUNET
from tests.helpers import TINY_DATA, tiny_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ProbUNet trained for two steps on 32x32 synthetic data, saved as a Lightning checkpoint."""
    root = tmp_path_factory.mktemp("ckpt")
    pl.seed_everything(0)
    model = ProbUNet(**TINY_PUNET)
    trainer = pl.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root, limit_val_batches=0,
    )
    trainer.fit(model, datamodule=SyntheticDataModule(**TINY_DATA))
    path = root / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path


def _write_inputs(folder: Path) -> dict[str, Path]:
    import nibabel as nib
    from PIL import Image

    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, size=(32, 32)).astype(np.float32)
    paths = {"npy": folder / "scan.npy", "png": folder / "photo.png", "nii": folder / "mri.nii.gz"}
    np.save(paths["npy"], image)
    Image.fromarray((image * 255).astype(np.uint8)).save(paths["png"])
    nib.save(nib.Nifti1Image(image[..., None], np.eye(4)), paths["nii"])
    return paths


def test_sample_writes_npz_and_png_for_each_file_format(checkpoint: Path, tmp_path: Path) -> None:
    paths = _write_inputs(tmp_path)
    out = tmp_path / "out"
    code = main(["--ckpt", str(checkpoint), "--num-samples", "6", "--out", str(out), "--input", *map(str, paths.values())])
    assert code == 0
    for stem in ("scan", "photo", "mri"):
        assert (out / f"{stem}.png").stat().st_size > 0
        data = np.load(out / f"{stem}.npz")
        assert data["samples"].shape == (6, 32, 32)
        assert data["probabilities"].shape == (6, 2, 32, 32)
        np.testing.assert_allclose(data["probabilities"].sum(1), 1.0, atol=1e-5)
        np.testing.assert_allclose(data["mean"], data["probabilities"].mean(0), atol=1e-6)
        np.testing.assert_allclose(data["std"], data["probabilities"].std(0), atol=1e-6)
        np.testing.assert_array_equal(data["samples"], data["probabilities"].argmax(1))
        assert "raters" not in data


def test_png_is_scaled_to_unit_range(tmp_path: Path) -> None:
    paths = _write_inputs(tmp_path)
    png = load_image_file(paths["png"], in_channels=1)
    npy = load_image_file(paths["npy"], in_channels=1)
    assert png.shape == npy.shape == (1, 32, 32)
    np.testing.assert_allclose(png, npy, atol=1 / 255 + 1e-6)


def test_3d_nifti_needs_a_slice(tmp_path: Path) -> None:
    import nibabel as nib

    volume = np.random.default_rng(0).uniform(size=(32, 32, 5)).astype(np.float32)
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    with pytest.raises(ValueError, match="--slice"):
        load_image_file(path, 1)
    np.testing.assert_allclose(load_image_file(path, 1, slice_index=3)[0], volume[..., 3])


def test_sample_from_data_config_includes_raters(checkpoint: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    out = tmp_path / "out"
    code = main(["--ckpt", str(checkpoint), "--data-config", str(config), "--split", "test", "--index", "1", "3",
                 "--num-samples", "4", "--out", str(out)])
    assert code == 0
    data = np.load(out / "synthetic-test-00003.npz")
    expected = SyntheticDataModule(**TINY_DATA).item("test", 3)
    np.testing.assert_array_equal(data["raters"], expected["masks"].numpy())
    np.testing.assert_array_equal(data["image"], expected["image"].numpy())
    assert (out / "synthetic-test-00001.png").is_file()


def test_same_seed_same_samples(checkpoint: Path, tmp_path: Path) -> None:
    paths = _write_inputs(tmp_path)
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        main(["--ckpt", str(checkpoint), "--input", str(paths["npy"]), "--out", str(tmp_path / name), "--seed", seed])
    a, b, c = (np.load(tmp_path / n / "scan.npz")["probabilities"] for n in "abc")
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def _run_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(args) == 1
    return capsys.readouterr().err


def test_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = _write_inputs(tmp_path)
    err = _run_error(["--ckpt", str(tmp_path / "nope.ckpt"), "--input", str(paths["npy"]), "--out", str(tmp_path)], capsys)
    assert "checkpoint not found" in err and "nope.ckpt" in err


def test_wrong_number_of_channels(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "rgb.npy"
    np.save(path, np.zeros((3, 32, 32), dtype=np.float32))
    err = _run_error(["--ckpt", str(checkpoint), "--input", str(path), "--out", str(tmp_path)], capsys)
    assert "rgb.npy" in err and "expects 1 channel" in err and "has 3" in err


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("broken.png", b"not a png at all", "could not read"),
        ("broken.npy", b"\x93NUMPY garbage", "could not read"),
        ("broken.nii.gz", b"garbage", "could not read"),
        ("image.jpg", b"whatever", "unsupported file type"),
    ],
)
def test_unreadable_file(name: str, content: bytes, message: str, checkpoint: Path, tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    err = _run_error(["--ckpt", str(checkpoint), "--input", str(path), "--out", str(tmp_path / "o")], capsys)
    assert name in err and message in err


def test_missing_input_file(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _run_error(["--ckpt", str(checkpoint), "--input", str(tmp_path / "gone.npy"), "--out", str(tmp_path)], capsys)
    assert "input image not found" in err and "gone.npy" in err


def test_size_not_divisible_by_network_depth(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "odd.npy"
    np.save(path, np.zeros((30, 30), dtype=np.float32))
    err = _run_error(["--ckpt", str(checkpoint), "--input", str(path), "--out", str(tmp_path)], capsys)
    assert "odd" in err and "divisible by 4" in err


def test_non_finite_image(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nan.npy"
    image = np.zeros((32, 32), dtype=np.float32)
    image[3, 4] = np.nan
    np.save(path, image)
    err = _run_error(["--ckpt", str(checkpoint), "--input", str(path), "--out", str(tmp_path)], capsys)
    assert "nan.npy" in err and "NaN" in err


def test_index_out_of_range(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tiny_config(tmp_path)
    err = _run_error(["--ckpt", str(checkpoint), "--data-config", str(config), "--index", "99", "--out", str(tmp_path)], capsys)
    assert "index 99 is out of range" in err


def test_needs_some_input(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _run_error(["--ckpt", str(checkpoint), "--out", str(tmp_path)], capsys)
    assert "--input" in err and "--data-config" in err


def test_not_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bogus = tmp_path / "bogus.ckpt"
    torch.save({"weights": torch.zeros(2)}, bogus)
    paths = _write_inputs(tmp_path)
    err = _run_error(["--ckpt", str(bogus), "--input", str(paths["npy"]), "--out", str(tmp_path)], capsys)
    assert "bogus.ckpt" in err and "not a Lightning checkpoint" in err

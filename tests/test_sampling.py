"""``probseg sample``: inputs from files of every supported format or a data config, outputs and errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from probseg.data import SyntheticDataModule
from probseg.io import InputError, _to_chw, load_image_file, unique_keys, write_outputs
from probseg.models import ProbUNet
from probseg.sampling import main
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
        np.testing.assert_allclose(data["weights"], np.full(6, 1 / 6))
        assert "raters" not in data


def test_a_mixtures_weights_are_written_and_weigh_the_mean(tmp_path: Path) -> None:
    """MoSE: the npz holds the weights of sample_weighted (same seed), and the mean and std are
    the weighted ones."""
    from probseg.models import MODELS
    from tests.models.test_zoo import TINY_ARGS

    pl.seed_everything(0)
    model = MODELS["mose"](**TINY_ARGS["mose"])
    path = tmp_path / "mose.ckpt"
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         limit_val_batches=0)
    trainer.fit(model, datamodule=SyntheticDataModule(**TINY_DATA))
    trainer.save_checkpoint(path)
    paths = _write_inputs(tmp_path)
    assert main(["--ckpt", str(path), "--num-samples", "5", "--out", str(tmp_path / "out"), "--input", str(paths["npy"])]) == 0
    data = np.load(tmp_path / "out" / "scan.npz")
    image = torch.from_numpy(data["image"])[None]
    with torch.no_grad():
        _, weights = model.eval().sample_weighted(image, 5, torch.Generator().manual_seed(0))
    np.testing.assert_allclose(data["weights"], weights[0].numpy(), atol=1e-6)
    assert not np.allclose(data["weights"], 0.2)  # the gate's weights, not uniform ones
    w = data["weights"][:, None, None, None]
    mean = (w * data["probabilities"]).sum(0)
    np.testing.assert_allclose(data["mean"], mean, atol=1e-6)
    np.testing.assert_allclose(data["std"], np.sqrt((w * (data["probabilities"] - mean) ** 2).sum(0)), atol=1e-6)


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
    np.testing.assert_array_equal(a, b)  # bitwise: one process, the same kernels in the same order
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
    assert f"{path}: " in err and "divisible by 4" in err


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


# --- --device ---------------------------------------------------------------------------------


def test_explicit_cpu_device_matches_default(checkpoint: Path, tmp_path: Path) -> None:
    paths = _write_inputs(tmp_path)
    for name, extra in (("default", []), ("cpu", ["--device", "cpu"]), ("cpu0", ["--device", "cpu:0"])):
        args = ["--ckpt", str(checkpoint), "--input", str(paths["npy"]), "--out", str(tmp_path / name), *extra]
        assert main(args) == 0
    default, cpu, cpu0 = (np.load(tmp_path / n / "scan.npz")["probabilities"] for n in ("default", "cpu", "cpu0"))
    # bitwise: one process, the same CPU kernels in the same order for all three
    np.testing.assert_array_equal(default, cpu)
    np.testing.assert_array_equal(default, cpu0)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cuda:-1"])
def test_device_that_is_not_a_torch_device(device: str, checkpoint: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    paths = _write_inputs(tmp_path)
    err = _run_error(["--ckpt", str(checkpoint), "--input", str(paths["npy"]), "--out", str(tmp_path / "o"),
                      "--device", device], capsys)
    assert f"--device {device!r} is not a torch device" in err
    assert not (tmp_path / "o").exists()


def test_cuda_device_without_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    paths = _write_inputs(tmp_path)
    # Checked up front: the device error comes before the (missing) checkpoint is even looked at.
    err = _run_error(["--ckpt", str(tmp_path / "nope.ckpt"), "--input", str(paths["npy"]), "--out", str(tmp_path / "o"),
                      "--device", "cuda"], capsys)
    assert "--device cuda" in err and "CUDA is not available" in err and "--device cpu" in err
    assert "Traceback" not in err


def test_runtime_error_while_sampling_names_the_input(checkpoint: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_sample(self: object, *args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(ProbUNet, "sample", failing_sample)
    paths = _write_inputs(tmp_path)
    err = _run_error(["--ckpt", str(checkpoint), "--input", str(paths["npy"]), "--out", str(tmp_path / "o")], capsys)
    assert f"{paths['npy']}: sampling on cpu failed" in err and "illegal memory access" in err


# --- output names -------------------------------------------------------------------------------


def test_unique_keys() -> None:
    assert unique_keys(["x", "y", "x", "x"]) == ["x", "y", "x-1", "x-2"]
    # a renamed input never takes another input's own name; names equal up to case collide
    assert unique_keys(["x", "x", "x-1", "X"]) == ["x", "x-2", "x-1", "X-3"]
    assert unique_keys(["a", "b"]) == ["a", "b"]


def test_inputs_with_the_same_name_are_all_written(checkpoint: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    rng = np.random.default_rng(1)
    images = [rng.uniform(0, 1, size=(32, 32)).astype(np.float32) for _ in range(3)]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    paths = [tmp_path / "a" / "x.npy", tmp_path / "b" / "x.npy", tmp_path / "x.png"]
    np.save(paths[0], images[0])
    np.save(paths[1], images[1])
    Image.fromarray((images[2] * 255).astype(np.uint8)).save(paths[2])
    out = tmp_path / "out"
    assert main(["--ckpt", str(checkpoint), "--num-samples", "2", "--out", str(out), "--input", *map(str, paths)]) == 0
    assert sorted(p.name for p in out.glob("*.npz")) == ["x-1.npz", "x-2.npz", "x.npz"]
    assert len(list(out.glob("*.png"))) == 3
    for key, image in zip(("x", "x-1", "x-2"), images):
        np.testing.assert_allclose(np.load(out / f"{key}.npz")["image"][0], image, atol=1 / 255 + 1e-6)
    assert f"{paths[1]} is written as x-1" in capsys.readouterr().err


def test_same_data_index_twice_is_written_twice(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["--ckpt", str(checkpoint), "--data-config", str(tiny_config(tmp_path)), "--index", "2", "2",
                 "--num-samples", "2", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.npz")) == ["synthetic-test-00002-1.npz", "synthetic-test-00002.npz"]


def test_write_outputs_positional_signature_and_plot_switch(tmp_path: Path) -> None:
    image = np.zeros((1, 8, 8), np.float32)
    logits = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    written = write_outputs(tmp_path / "a", "k", image, logits, None)  # (out, key, image, logits, raters)
    assert [p.name for p in written] == ["k.npz", "k.png"]
    written = write_outputs(tmp_path / "b", "k", image, logits, None, plot=False)
    assert [p.name for p in written] == ["k.npz"] and not (tmp_path / "b" / "k.png").exists()


# --- PNG modes and channel counts ---------------------------------------------------------------


def _rgb(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)


def _png(tmp_path: Path, mode: str) -> tuple[Path, np.ndarray, int]:
    """A PNG in Pillow ``mode``; the (C, H, W) array it should load as and its channel count."""
    from PIL import Image

    rgb = _rgb()
    gray = rgb[..., 0]
    if mode == "RGB":
        img, expected = Image.fromarray(rgb), rgb
    elif mode == "RGBA":
        img, expected = Image.fromarray(np.dstack([rgb, np.full_like(gray, 77)])), rgb
    elif mode == "LA":
        img, expected = Image.fromarray(np.dstack([gray, np.full_like(gray, 77)])), gray
    elif mode == "P":  # a colour palette of 4 colours
        colours = np.array([[255, 0, 0], [0, 200, 0], [0, 0, 100], [10, 20, 30]], dtype=np.uint8)
        index = rgb[..., 0] % 4
        img = Image.fromarray(index.astype(np.uint8), mode="L").convert("P")
        img.putpalette(colours.flatten().tolist())
        expected = colours[index]
    elif mode == "P-gray":  # a palette of grays: loads as one channel
        img, expected = Image.fromarray(gray).convert("P"), gray
    elif mode == "1":
        bits = gray > 127
        img, expected = Image.fromarray(bits), bits.astype(np.uint8) * 255
    elif mode == "I;16":
        deep = gray.astype(np.uint16) * 256 + 7  # at most 65287: uses all 16 bits, no overflow
        img, expected = Image.fromarray(deep), deep.astype(np.float32) * 255 / 65535
    else:
        raise AssertionError(mode)
    path = tmp_path / f"{mode.replace(';', '')}.png"
    img.save(path)
    with Image.open(path) as reopened:
        assert reopened.mode == mode.split("-")[0]
    expected = expected.astype(np.float32) / 255
    chw = expected[None] if expected.ndim == 2 else np.moveaxis(expected, -1, 0)
    return path, chw, chw.shape[0]


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "P", "P-gray", "1", "I;16"])
def test_png_modes(mode: str, tmp_path: Path) -> None:
    path, expected, channels = _png(tmp_path, mode)
    image = load_image_file(path, in_channels=channels)
    assert image.dtype == np.float32
    np.testing.assert_allclose(image, expected, atol=1e-6)
    other = 1 if channels == 3 else 3
    with pytest.raises(InputError, match=f"expects {other} channel\\(s\\) but the image has {channels} "):
        load_image_file(path, in_channels=other)


def test_channel_count_in_error_is_the_real_one(checkpoint: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "hwc.npy"
    np.save(path, _rgb().astype(np.float32))  # (32, 32, 3)
    err = _run_error(["--ckpt", str(checkpoint), "--input", str(path), "--out", str(tmp_path / "o")], capsys)
    assert f"{path}: the model expects 1 channel(s) but the image has 3 " in err
    path, _, _ = _png(tmp_path, "RGBA")
    err = _run_error(["--ckpt", str(checkpoint), "--input", str(path), "--out", str(tmp_path / "o")], capsys)
    assert f"{path}: the model expects 1 channel(s) but the image has 3 " in err


@pytest.mark.parametrize(
    ("shape", "in_channels", "result"),
    [
        ((32, 32), 1, (1, 32, 32)),
        ((1, 32, 32), 1, (1, 32, 32)),
        ((32, 32, 1), 1, (1, 32, 32)),
        ((3, 32, 32), 3, (3, 32, 32)),
        ((32, 32, 3), 3, (3, 32, 32)),
        ((3, 32, 3), 3, (3, 32, 3)),  # both ends fit: the first axis is the channel axis
        ((32, 32, 3), 1, 3),
        ((3, 32, 32), 1, 3),
        ((4, 32, 5), 3, 4),
        ((32, 32), 3, 1),
    ],
)
def test_to_chw_channel_axis(shape: tuple[int, ...], in_channels: int, result: tuple[int, ...] | int) -> None:
    array = np.arange(np.prod(shape), dtype=np.float64).reshape(shape)
    if isinstance(result, tuple):
        out = _to_chw(array, in_channels, "img.npy")
        assert out.shape == result and out.dtype == np.float32
        if shape[-1] == in_channels and shape[0] != in_channels:
            np.testing.assert_array_equal(out, np.moveaxis(array, -1, 0))
    else:
        with pytest.raises(InputError, match=f"img.npy: .* but the image has {result} "):
            _to_chw(array, in_channels, "img.npy")


# --- every input error names the file as given ----------------------------------------------------


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((30, 30), np.float32), "divisible by 4"),
        (np.zeros((2, 32, 32), np.float32), "expects 1 channel"),
        (np.full((32, 32), np.inf, np.float32), "NaN or infinite"),
        (np.zeros((2, 2, 32, 32), np.float32), "expected a 2D image"),
        (np.zeros((32, 32), bool), "numeric image data"),
    ],
)
def test_input_errors_name_the_file_as_given(array: np.ndarray, message: str, checkpoint: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("sub").mkdir()
    np.save("sub/y.npy", array)
    err = _run_error(["--ckpt", str(checkpoint), "--input", "./sub//y.npy", "--out", "o"], capsys)
    assert "./sub//y.npy: " in err and message in err


def test_data_config_errors_name_split_and_index(checkpoint: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    config = tiny_config(tmp_path)
    err = _run_error(["--ckpt", str(checkpoint), "--data-config", str(config), "--index", "0", "99",
                      "--out", str(tmp_path / "o")], capsys)
    assert f"{config} split test index 99: index 99 is out of range" in err


# --- lazy imports ----------------------------------------------------------------------------------


def test_parser_does_not_import_torch_or_numpy() -> None:
    code = (
        "import sys; from probseg.sampling import build_parser; build_parser(); "
        "print('torch' in sys.modules, 'numpy' in sys.modules)"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_sample_help_does_not_import_torch(capsys: pytest.CaptureFixture[str]) -> None:
    code = (
        "import sys\nfrom probseg.cli import main\ntry:\n    main(['sample', '-h'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, 'numpy' in sys.modules, file=sys.stderr)"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert "--device" in result.stdout
    assert result.stderr.split() == ["False", "False"]


def test_messages_with_non_utf8_file_names_print_under_a_strict_utf8_stream() -> None:
    import io

    from probseg.sampling import printable

    name = b"scan-\xe9.npy".decode("utf-8", "surrogateescape")  # how Python names a Latin-1 file
    stream = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    with pytest.raises(UnicodeEncodeError):
        print(f"  {name}", file=stream)
    print(printable(f"  {name}"), file=stream)
    stream.flush()
    assert stream.buffer.getvalue() == b"  scan-\\udce9.npy\n"

"""Generators: option checks and the missing-extra error (always run), the lazy import, and the
segmentation_models_pytorch adapter (every listed encoder, the decoder transform, local encoder
weights and their errors), which skips where the optional extra is not usable."""

from __future__ import annotations

import importlib.abc
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from probseg.layers.generators import (
    GENERATORS,
    adapt_input_convolution,
    build_generator,
    import_smp,
    load_encoder_weights,
    without_weights_file,
)

SMP = "segmentation_models_pytorch"
ENCODERS = ("resnet18", "resnet50", "efficientnet-b0")
"""The encoders of Wang et al.'s experiments (Sec. 3.2)."""


def require_smp() -> None:
    """Skip, saying why, where segmentation-models-pytorch is not installed or cannot import
    (e.g. PyPI's torchvision next to a CPU build of torch fails: 'operator torchvision::nms does
    not exist')."""
    try:
        import_smp()
    except ImportError as err:
        pytest.skip(f"the optional extra probseg[smp] is not usable here: {err}")


@pytest.mark.parametrize(
    ("generator", "options", "match"),
    [
        ("resnet18", None, "generator must be one of"),
        ("unet", {"encoder_name": "resnet18"}, "apply to generator='smp'"),
        ("smp", {}, "needs generator_options.encoder_name"),
        ("smp", {"encoder_name": "resnet18", "classes": 3}, r"may not set \['classes'\]"),
        ("smp", {"encoder_name": "resnet18", "encoder_depth": 3}, "one entry per encoder stage"),
    ],
)
def test_bad_generator_options_are_refused_before_any_import(generator, options, match) -> None:
    with pytest.raises(ValueError, match=match):
        build_generator(1, [4, 8], 1, generator, options)


def test_the_zoo_unet_is_the_default_generator() -> None:
    unet = build_generator(1, [4, 8, 16], 1)
    assert (unet.out_channels, unet.bottleneck_channels, unet.downsampling) == (4, 16, 4) and "unet" in GENERATORS
    assert unet(torch.rand(2, 1, 8, 8)).shape == (2, 4, 8, 8)


def test_a_missing_extra_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, SMP, None)  # import now fails as for an absent package
    with pytest.raises(ImportError, match=r"pip install 'probseg\[smp\]'"):
        build_generator(1, [4, 8], 1, "smp", {"encoder_name": "resnet18"})


class _BrokenInstall(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == SMP:
            raise RuntimeError("operator torchvision::nms does not exist")
        return None


def test_a_broken_install_is_reported_with_its_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, SMP, raising=False)
    monkeypatch.setattr(sys, "meta_path", [_BrokenInstall(), *sys.meta_path])
    with pytest.raises(ImportError, match="failed to import .*torchvision::nms.*torchvision built for"):
        import_smp()


def test_probseg_never_imports_smp_until_a_generator_needs_it() -> None:
    code = ("import sys, json, probseg.models, probseg.layers; from probseg.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('segmentation_models_pytorch', "
            "'timm'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_checkpoints_keep_the_weights_file_as_a_record_only() -> None:
    options = {"encoder_name": "resnet18", "encoder_weights": Path("w.pt")}
    assert without_weights_file(options) == {"encoder_name": "resnet18", "initialized_from": "w.pt"}
    assert options["encoder_weights"] == Path("w.pt"), "the caller's dict is left alone"
    assert without_weights_file({"encoder_name": "resnet18"}) == {"encoder_name": "resnet18"}
    assert without_weights_file(None) is None


@pytest.mark.parametrize("channels", [1, 3, 6, 9])
def test_adapted_weights_keep_the_response_to_equal_channels_when_c_is_a_multiple_of_3(channels: int) -> None:
    weight = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(channels))
    x = torch.rand(1, 1, 8, 8)
    adapted = adapt_input_convolution(weight, channels)
    assert adapted.shape == (4, channels, 3, 3)
    torch.testing.assert_close(torch.nn.functional.conv2d(x.expand(-1, channels, -1, -1), adapted),
                               torch.nn.functional.conv2d(x.expand(-1, 3, -1, -1), weight))


def test_other_channel_counts_change_the_response_as_documented() -> None:
    """C = 2 from C' = 3: (3 / 2)(W_0 + W_1) in place of W_0 + W_1 + W_2."""
    weight = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    adapted = adapt_input_convolution(weight, 2)
    torch.testing.assert_close(adapted.sum(1), 1.5 * (weight[:, 0] + weight[:, 1]))
    assert not torch.allclose(adapted.sum(1), weight.sum(1))


def _plain_encoder() -> torch.nn.Module:
    """A grey encoder whose second convolution is depthwise: its weights are (8, 1, 3, 3), so
    dimension 1 equals in_channels = 1 there too."""
    return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, groups=8))


def test_only_the_first_convolution_is_adapted(tmp_path: Path) -> None:
    """Three-channel weights load into the first convolution (summed for a grey model); a later
    4-D entry that differs only in dimension 1 is refused, not adapted."""
    rgb = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, groups=8))
    path = tmp_path / "rgb.pt"
    torch.save(rgb.state_dict(), path)
    grey = _plain_encoder()
    load_encoder_weights(grey, path, 1)
    torch.testing.assert_close(grey[0].weight, rgb[0].weight.sum(1, keepdim=True))
    torch.testing.assert_close(grey[2].weight, rgb[2].weight)
    wrong = {**_plain_encoder().state_dict(), "2.weight": torch.ones(8, 3, 3, 3)}
    torch.save(wrong, path)
    with pytest.raises(ValueError, match=r"shapes do not fit the encoder: 2\.weight: file \(8, 3, 3, 3\), model \(8, 1, 3, 3\)"):
        load_encoder_weights(_plain_encoder(), path, 1)


# --- the segmentation_models_pytorch adapter (skips without the extra) ------------------------


def _smp(encoder: str = "resnet18", **options) -> torch.nn.Module:
    require_smp()
    return build_generator(options.pop("in_channels", 1), [], 0, "smp", {"encoder_name": encoder, **options})


@pytest.mark.parametrize("encoder", ENCODERS)
def test_every_listed_encoder_gives_full_resolution_features(encoder: str) -> None:
    torch.manual_seed(0)
    if encoder == "resnet50":  # the largest: one 32x32 image, evaluation mode
        generator, size, batch = _smp(encoder, decoder_channels=[32, 16, 16, 8, 8]).eval(), 32, 1
    else:
        generator, size, batch = _smp(encoder, encoder_depth=4, decoder_channels=[32, 16, 8, 8]), 64, 2
    x = torch.rand(batch, 1, size, size)
    features = generator(x)
    assert features.shape == (batch, 8, size, size) and generator.out_channels == 8
    skips = generator.down(x)
    assert skips[-1].shape[1] == generator.bottleneck_channels
    assert skips[-1].shape[-1] == size // generator.downsampling
    with pytest.raises(ValueError, match=f"divisible by {generator.downsampling}"):
        generator(torch.rand(1, 1, size + 8, size + 8))


def test_the_decoder_transform_reaches_every_block_and_identity_changes_nothing() -> None:
    torch.manual_seed(0)
    generator = _smp(encoder_depth=3, decoder_channels=[16, 8, 8]).eval()
    x = torch.rand(2, 1, 32, 32)
    seen = []

    def identity(t: torch.Tensor) -> torch.Tensor:
        seen.append(t.shape[1])
        return t

    with torch.no_grad():
        torch.testing.assert_close(generator.decode(generator.down(x), identity), generator(x))
        assert len(seen) == 3, "one call per decoder block"
        zeroed = generator.decode(generator.down(x), torch.zeros_like)
        assert not torch.allclose(zeroed, generator(x))
        torch.testing.assert_close(generator(x), generator.decode(generator.down(x)))  # the hooks are gone


def _save(tmp_path: Path, state, name: str = "encoder.pt") -> Path:
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_local_encoder_weights_are_loaded(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = _smp(encoder_depth=3, decoder_channels=[16, 8, 8])
    path = _save(tmp_path, source.encoder.state_dict())
    torch.manual_seed(2)
    loaded = _smp(encoder_depth=3, decoder_channels=[16, 8, 8], encoder_weights=str(path))
    for key, value in source.encoder.state_dict().items():
        torch.testing.assert_close(loaded.encoder.state_dict()[key], value, msg=key)


def test_three_channel_weights_are_summed_for_grey_images(tmp_path: Path) -> None:
    """ImageNet weights (3 input channels) for a 1-channel model: the first convolution sees a
    grey image as three equal channels."""
    torch.manual_seed(1)
    rgb = _smp(in_channels=3, encoder_depth=3, decoder_channels=[16, 8, 8])
    path = _save(tmp_path, rgb.encoder.state_dict())
    grey = _smp(encoder_depth=3, decoder_channels=[16, 8, 8], encoder_weights=str(path))
    torch.testing.assert_close(grey.encoder.conv1.weight, rgb.encoder.conv1.weight.sum(1, keepdim=True))
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(grey.encoder.eval()(x)[-1], rgb.encoder.eval()(x.expand(-1, 3, -1, -1))[-1],
                                   rtol=1e-4, atol=1e-5)


def test_bad_weight_files_are_named_with_what_does_not_fit(tmp_path: Path) -> None:
    options = {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}
    state = _smp(**options).encoder.state_dict()
    with pytest.raises(FileNotFoundError, match="no file at .*absent.pt"):
        _smp(**options, encoder_weights=str(tmp_path / "absent.pt"))
    missing = _save(tmp_path, {k: v for k, v in state.items() if k != "bn1.weight"} | {"head.w": torch.ones(1)})
    with pytest.raises(ValueError, match=r"encoder\.pt.*missing keys \['bn1\.weight'\].*unexpected keys \['head\.w'\]"):
        _smp(**options, encoder_weights=str(missing))
    whole = _save(tmp_path, {f"encoder.{k}": v for k, v in state.items()}, "whole.pt")
    with pytest.raises(ValueError, match=r"whole\.pt.*save model\.encoder\.state_dict\(\)"):
        _smp(**options, encoder_weights=str(whole))
    other = _save(tmp_path, _smp("resnet50", **options).encoder.state_dict(), "resnet50.pt")
    with pytest.raises(ValueError, match=r"resnet50\.pt: shapes do not fit the encoder: layer1\.0\.conv1\.weight"):
        _smp(**options, encoder_weights=str(other))
    checkpoint = _save(tmp_path, {"state_dict": state, "epoch": 3}, "run.ckpt")
    with pytest.raises(ValueError, match=r"run\.ckpt: expected a state dict .*a Lightning checkpoint"):
        _smp(**options, encoder_weights=str(checkpoint))
    (tmp_path / "text.pt").write_text("not a tensor file")
    with pytest.raises(ValueError, match=r"text\.pt: cannot be read .*weights_only=True"):
        _smp(**options, encoder_weights=str(tmp_path / "text.pt"))

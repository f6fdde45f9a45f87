"""Zoo models on a segmentation_models_pytorch generator (``generator="smp"``): every U-Net-based
model kind trains (gradients reach the encoder) and samples, a few steps lower the loss, and
checkpoints reload through ``probseg.load_model`` without the local weights file. Skips where the
optional extra probseg[smp] is not usable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import probseg
from probseg.models import MODELS
from tests.layers.test_generators import require_smp
from tests.models.test_zoo import TINY_ARGS, fit_one_step

OPTIONS = {"encoder_name": "resnet18", "encoder_depth": 3, "decoder_channels": [16, 8, 8]}
KINDS = {
    "unet": {},
    "unet_mc_head": {"dropout": 0.2},
    "unet_mc_decoder": {"dropout": 0.2, "dropout_position": "decoder"},
    "punet": TINY_ARGS["punet"],
    "planar": TINY_ARGS["planar"],
    "csae": TINY_ARGS["csae"],
    "ssn": {"rank": 2, "mc_samples": 2},
    "mose": {"num_experts": 2, "samples_per_expert": 2},
}
"""Each zoo model kind on the smp generator; the latent models' prior and posterior encoders keep
their own tiny sizes."""


def _model(kind: str, **options):
    require_smp()
    torch.manual_seed(0)
    args = {k: v for k, v in KINDS[kind].items() if k not in ("num_filters", "convs_per_block")}
    if kind in ("punet", "planar", "csae"):  # num_filters also sizes their Gaussian encoders
        args["num_filters"], args["convs_per_block"] = KINDS[kind]["num_filters"], 1
    return MODELS[kind.split("_")[0]](generator="smp", generator_options={**OPTIONS, **options}, **args)


def _batch(b: int = 2, r: int = 3, size: int = 32) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(b, 1, size, size, generator=g), "masks": torch.randint(0, 2, (b, r, size, size), generator=g)}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_model_kind_trains_and_samples_on_the_smp_generator(kind: str) -> None:
    model = _model(kind)
    assert type(model.network.unet).__name__ == "SMPUNet"
    terms = model.loss_terms(_batch())
    assert terms and all(torch.isfinite(v) for v in terms.values())
    torch.stack(list(terms.values())).sum().backward()
    # smp keeps the stages past encoder_depth unused (no gradient); the ones used get one.
    encoder_grads = [p.grad for p in model.network.unet.encoder.parameters() if p.grad is not None]
    assert encoder_grads and all(torch.isfinite(g).all() for g in encoder_grads)
    assert bool(model.network.unet.encoder.conv1.weight.grad.abs().sum() > 0), "gradients reach the first layer"
    assert all(p.grad is not None for p in model.network.unet.decoder.parameters())
    with torch.no_grad():
        samples = model.eval().sample(_batch()["image"], 3)
    assert samples.shape == (2, 3, 2, 32, 32) and torch.isfinite(samples).all()


def test_a_few_steps_lower_the_loss() -> None:
    model = _model("unet")
    batch = _batch(r=1)  # one rater: the same target every step
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(10):
        loss = torch.stack(list(model.loss_terms(batch).values())).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0] and losses[-1] == min(losses), losses


@pytest.mark.parametrize("kind", ["unet", "punet"])
def test_checkpoints_reload_without_the_weights_file(kind: str, tmp_path: Path) -> None:
    """The local encoder weights initialize the model; the checkpoint holds them, records the file
    as ``initialized_from`` and reloads after the file is gone."""
    weights = tmp_path / "encoder.pt"
    torch.save(_model(kind).network.unet.encoder.state_dict(), weights)
    model = _model(kind, encoder_weights=str(weights))
    path = fit_one_step(model, tmp_path / f"{kind}.ckpt")
    weights.unlink()
    saved = torch.load(path, weights_only=True)["hyper_parameters"]
    assert saved["generator"] == "smp" and saved["generator_options"]["initialized_from"] == str(weights)
    assert "encoder_weights" not in saved["generator_options"]
    loaded = probseg.load_model(path)
    assert type(loaded) is type(model) and loaded.hparams.generator_options == saved["generator_options"]
    x = _batch()["image"]
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    with torch.no_grad():
        torch.testing.assert_close(loaded.sample(x, 2, generator=g1), model.eval().sample(x, 2, generator=g2))

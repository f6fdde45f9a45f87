"""Opt-in fast paths: channels-last weights and inputs give the same training step; compiling
the generator keeps checkpoint keys."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from probseg.callbacks import FastPaths
from probseg.models import MODELS
from tests.models.test_zoo import TINY_ARGS

# torch.compile's import path touches torch.jit internals that warn in torch 2.13; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def test_channels_last_changes_memory_format_not_values() -> None:
    torch.manual_seed(0)
    model = MODELS["planar"](**TINY_ARGS["planar"])
    batch = {"image": torch.rand(2, 1, 32, 32), "masks": torch.randint(0, 2, (2, 3, 32, 32))}
    g = torch.Generator().manual_seed(1)
    before = model.loss_terms(dict(batch), generator=g)
    callback = FastPaths(channels_last=True)
    callback.setup(SimpleNamespace(), model, "fit")
    fast_batch = dict(batch)
    callback.on_train_batch_start(SimpleNamespace(), model, fast_batch, 0)
    assert fast_batch["image"].is_contiguous(memory_format=torch.channels_last)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    after = model.loss_terms(fast_batch, generator=torch.Generator().manual_seed(1))
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-4, atol=1e-3)


def test_compiling_the_generator_keeps_the_state_dict_keys() -> None:
    model = MODELS["punet"](**TINY_ARGS["punet"])
    keys = list(model.state_dict())
    FastPaths(compile=True).setup(SimpleNamespace(), model, "fit")
    assert list(model.state_dict()) == keys
    assert model.network.unet._compiled_call_impl is not None

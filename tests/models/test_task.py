"""The task (probseg/models/base.py): a thin LightningModule composing a network and objectives."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

import probseg
from probseg.data import SyntheticDataModule
from probseg.layers import UNet
from probseg.models import MODELS, ProbSegModel, register_model
from probseg.models.network import Network
from probseg.models.objectives import OPTIONAL_OBJECTIVES, LossTerms, Objective
from tests.helpers import HostReads
from tests.models.test_zoo import TINY_ARGS

NO_TRAINER_LOG = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")

def _batch() -> dict[str, Any]:
    dm = SyntheticDataModule(image_size=32, num_train=4, batch_size=4, num_raters=3, min_raters=2)
    return next(iter(dm.train_dataloader()))


def test_host_read_counter_sees_every_kind_of_read() -> None:
    x = torch.ones(3)
    with HostReads() as counter:
        bool(x.all()), x.sum().item(), x.tolist(), int(x[0]), float(x[0])
        y = x * 2  # device work only
    assert len(counter.reads) == 5 and y.shape == (3,)


@NO_TRAINER_LOG
@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_training_step_reads_the_host_twice_batch_contract_and_non_finite_guard(name: str) -> None:
    """One host read for all the batch checks together and one for the non-finite guard (before
    this design: a training step of the PU-Net read 8 times, 2 of them in torch.distributions);
    MoSE reads once more: its exact coupling is solved on the host."""
    batch = _batch()
    assert batch["rater_mask"] is not None and not batch["rater_mask"].all()  # the rater checks run too
    model = MODELS[name](**TINY_ARGS[name]).train()
    with HostReads() as counter:
        model.training_step(batch, 0)
    assert len(counter.reads) == (3 if name == "mose" else 2), counter.reads
    with HostReads() as counter:
        model.check_batch(batch)
    assert len(counter.reads) == 1, counter.reads


@NO_TRAINER_LOG
@pytest.mark.parametrize("name", sorted(MODELS))
def test_nothing_is_stashed_on_the_task_or_network_between_calls(name: str) -> None:
    model = MODELS[name](**TINY_ARGS[name]).train()
    before = {id(m): set(vars(m)) for m in model.modules()}
    batch = _batch()
    model.training_step(batch, 0)
    model.sample(batch["image"], 2)
    model.eval().validation_step(batch, 0)
    assert {id(m): set(vars(m)) for m in model.modules()} == before


@pytest.mark.parametrize("name", sorted(MODELS))
def test_hyperparameters_are_flat_and_name_every_argument_once(name: str) -> None:
    """The model's own arguments and the shared ones, each declared in one signature only."""
    cls = MODELS[name]
    declared: list[str] = []
    for klass in cls.__mro__:
        if "__init__" in vars(klass) and issubclass(klass, ProbSegModel):
            declared += [p.name for p in inspect.signature(klass.__init__).parameters.values()
                         if p.kind is p.KEYWORD_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self")]
    shared = set(inspect.signature(ProbSegModel.__init__).parameters) - {"self"}
    own = [a for a in declared if a not in shared]
    # a subclass re-declares an argument only to change its default (the cSAE's beta = 10)
    assert len(own) == len(set(own)) + (name == "csae"), own
    model = cls(**TINY_ARGS[name])
    assert set(model.hparams) == set(declared)
    assert all(isinstance(v, (int, float, str, bool, list, dict, type(None))) for v in model.hparams.values())


@NO_TRAINER_LOG
def test_an_optional_objective_is_added_by_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """The task knows no optional objective by name: a registered factory reading the shared
    options adds one to every model, for the training and validation steps."""

    class Extra(Objective):
        name = "extra"

        def __call__(self, context) -> LossTerms:
            value = context.outputs["logits"].float().pow(2).mean()
            return LossTerms({"extra": value}, {"extra_stage_" + str(context.stage): value.detach()})

    monkeypatch.setitem(OPTIONAL_OBJECTIVES, "extra", lambda options: Extra() if options["lr"] == 0.5 else None)
    plain = MODELS["unet"](**TINY_ARGS["unet"])
    assert not [o for o in plain.extra_objectives if o.name == "extra"]
    model = MODELS["unet"](**TINY_ARGS["unet"], lr=0.5).train()
    batch = _batch()
    terms = model.loss_terms(batch, torch.Generator().manual_seed(0), stage="train")
    assert set(terms) == {"rec_ce", "extra"} and set(terms.diagnostics) == {"extra_stage_train"}
    assert set(model.loss_terms(batch, torch.Generator().manual_seed(0))) == {"rec_ce"}  # own terms only
    loss = model.training_step(batch, 0)
    assert loss.requires_grad


def test_a_release_0_1_state_dict_layout_loads_into_the_network() -> None:
    """0.1 kept the network's parts on the model (``unet.*``); today they sit in ``network.*``."""
    torch.manual_seed(0)
    trained = MODELS["punet"](**TINY_ARGS["punet"])
    old_layout = {k.removeprefix("network."): v for k, v in trained.state_dict().items()}
    assert all(not k.startswith("network.") for k in old_layout)
    fresh = MODELS["punet"](**TINY_ARGS["punet"])
    fresh.load_state_dict(old_layout)
    for key, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


class TinyNetwork(Network):
    """A network with one latent-free head: the smallest network a new model needs."""

    def __init__(self, in_channels: int, num_classes: int, width: int) -> None:
        super().__init__()
        self.unet = UNet(in_channels, [width, width], 1)
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, batch: dict[str, Any], target: torch.Tensor, generator: torch.Generator | None = None):
        return {"logits": self.head(self.unet(batch["image"]))}

    def sample(self, images: torch.Tensor, num_samples: int = 16, generator=None) -> torch.Tensor:
        return self.head(self.unet(images)).unsqueeze(1).expand(-1, num_samples, -1, -1, -1)

    @property
    def deterministic(self) -> bool:
        return True


def test_a_new_model_is_one_class_and_one_registry_entry(tmp_path: Path) -> None:
    """Declare the model's own argument, build the network: training, logging, checkpoints and
    load_model come from the task."""

    @register_model("tiny_test_model")
    class TinyModel(ProbSegModel):
        def __init__(self, *, width: int = 4, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.network = TinyNetwork(self.in_channels, self.num_classes, width)

    try:
        model = TinyModel(width=6, lr=1e-2, fusion="mean")
        trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=tmp_path)
        trainer.fit(model, datamodule=SyntheticDataModule(image_size=32, num_train=8, num_val=4, batch_size=4))
        assert set(model.hparams) >= {"width", "lr", "fusion", "teacher"} and model.hparams.width == 6
        trainer.save_checkpoint(tmp_path / "tiny.ckpt")
        loaded = probseg.load_model(tmp_path / "tiny.ckpt")
        assert type(loaded) is TinyModel and loaded.hparams.fusion == "mean"
        x = torch.rand(2, 1, 32, 32)
        torch.testing.assert_close(loaded.sample(x, 3), model.eval().sample(x, 3), rtol=0, atol=0)
    finally:
        MODELS.pop("tiny_test_model", None)


def test_a_release_0_1_style_model_is_refused_with_the_migration() -> None:
    with pytest.raises(TypeError, match="the model contract of release 0.1.*self.network"):

        class OldStyle(ProbSegModel):
            def loss_terms(self, batch, generator=None):
                return {}


def test_release_0_1_attribute_paths_still_reach_the_network_with_a_warning() -> None:
    model = MODELS["unet"](**TINY_ARGS["unet"])
    with pytest.warns(DeprecationWarning, match=r"model.unet moved to model.network.unet"):
        assert model.unet is model.network.unet
    with pytest.raises(AttributeError):
        model.no_such_part

"""The model registry."""

from __future__ import annotations

import pytest

import probseg
from probseg.models import MODELS, ProbSegModel, ProbUNet, class_path, get_model_class, register_model


def test_punet_is_registered() -> None:
    assert MODELS["punet"] is ProbUNet
    assert ProbUNet.registry_name == "punet"
    assert get_model_class("punet") is ProbUNet
    assert probseg.MODELS is MODELS
    assert all(issubclass(cls, ProbSegModel) for cls in MODELS.values())


def test_unknown_name_error_lists_known_names() -> None:
    with pytest.raises(KeyError) as info:
        get_model_class("no-such-model")
    message = str(info.value)
    assert "no-such-model" in message
    for name in MODELS:
        assert name in message


def test_register_model_refuses_a_duplicate_name_for_a_different_class() -> None:
    before = dict(MODELS)

    class Impostor(ProbUNet):
        pass

    with pytest.raises(ValueError, match="punet"):
        register_model("punet")(Impostor)
    assert MODELS == before
    assert MODELS["punet"] is ProbUNet
    assert ProbUNet.registry_name == "punet"
    assert Impostor.registry_name == "punet"  # inherited, untouched by the failed registration


def test_register_model_adds_a_new_model_and_is_idempotent_for_the_same_class() -> None:
    class Tiny(ProbSegModel):
        pass

    name = "test-registry-tiny"
    assert name not in MODELS
    try:
        assert register_model(name)(Tiny) is Tiny
        assert MODELS[name] is Tiny and Tiny.registry_name == name
        assert register_model(name)(Tiny) is Tiny  # same class again: fine
        assert get_model_class(name) is Tiny
    finally:
        MODELS.pop(name, None)
    assert name not in MODELS


def test_class_path() -> None:
    assert class_path(ProbUNet) == "probseg.models.punet.ProbUNet"

"""probseg._ops.resolve_recipe, the one resolution of the recipe tables of fusion
(FUSION_RECIPES), the reconstruction loss (LOSS_RECIPES) and distillation (DISTILLATION_RECIPES)."""

from __future__ import annotations

import pytest

from probseg._ops import check_choice, resolve_recipe

TABLE = {"a": {"x": "one", "y": 1}, "b": {"x": "two", "y": 2}}


def test_overrides_win_and_none_keeps_the_recipes() -> None:
    assert resolve_recipe(TABLE, "b") == {"x": "two", "y": 2}
    assert resolve_recipe(TABLE, "a", {"y": 5, "x": None}) == {"x": "one", "y": 5}
    resolved = resolve_recipe(TABLE, "a")
    resolved["y"] = 9
    assert TABLE["a"]["y"] == 1, "the table is not changed through the result"
    assert resolve_recipe(TABLE, "a", {"z": 3}, known=("x", "y", "z")) == {"x": "one", "y": 1, "z": 3}


@pytest.mark.parametrize(("recipe", "overrides", "kwargs", "message"), [
    ("c", None, {}, r"^recipe must be one of \('a', 'b'\), got 'c'$"),
    (["a"], None, {"prefix": "thing."}, r"^thing\.recipe must be one of"),
    ("a", {"w": 1}, {"prefix": "thing "}, r"^unknown thing options \['w'\]; expected names from \('recipe', 'x', 'y'\)$"),
    ("a", {"x": "three"}, {"choices": {"x": ("one", "two")}, "prefix": "thing "},
     r"^thing x must be one of \('one', 'two'\), got 'three'$"),
])
def test_errors_name_the_recipe_the_option_and_the_choices(recipe, overrides, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_recipe(TABLE, recipe, overrides, **kwargs)


def test_check_choice_accepts_only_the_listed_strings() -> None:
    assert check_choice("a", "name", ("a", "b")) == "a"
    for bad in ("c", 1, None):
        with pytest.raises(ValueError, match="name must be one of"):
            check_choice(bad, "name", ("a", "b"))


def test_the_three_tables_resolve_through_it() -> None:
    from probseg.data.fusion import FUSION_RECIPES, fusion_options
    from probseg.distillation import DISTILLATION_RECIPES, Distillation
    from probseg.losses.reconstruction import LOSS_RECIPES, ReconstructionLoss

    assert fusion_options("paper") == resolve_recipe(FUSION_RECIPES, "paper")
    loss = ReconstructionLoss({"dml1": 1.0}, recipe="paper")
    want = resolve_recipe(LOSS_RECIPES, "paper")
    assert loss.pixel_reduction == want.pop("pixel_reduction") and loss.resolved_region_options == want
    d = Distillation("t.ckpt", 2, 1, recipe="paper", loss_options={"recipe": "paper"}, kde=False)
    assert d.weights == DISTILLATION_RECIPES["paper"]["weights"] and d.kde_labels == "majority"
    with pytest.raises(ValueError, match=r"^unknown loss options \['smoothing'\]"):
        ReconstructionLoss({"dml1": 1.0}, smoothing=1.0)
    with pytest.raises(ValueError, match=r"^distillation\.kde_labels must be one of \('mean', 'majority'\)"):
        Distillation("t.ckpt", 2, 1, kde_labels="vote")

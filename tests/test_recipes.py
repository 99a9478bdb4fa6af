"""Recipes load, validate with clear errors, and take overrides."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from vitconvert.errors import UserError
from vitconvert.recipes import Recipe, list_recipe_files, load_recipe


@pytest.mark.parametrize("path", list_recipe_files(), ids=lambda p: p.stem)
def test_shipped_recipes_validate(path) -> None:
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    assert recipe.description
    assert recipe.finetune.epochs > 0
    assert recipe.finetune.losses  # filled in with the method's loss weights


def test_by_name_and_overrides() -> None:
    r = load_recipe("cfvit", ["model.alpha=0.6", "finetune.epochs=1", "finetune.losses.coarse_kl=0.5"])
    assert r.settings.alpha == 0.6
    assert r.finetune.epochs == 1
    assert r.finetune.losses["coarse_kl"] == 0.5
    assert r.model["gca_beta"] == 0.99  # defaults are filled in


@pytest.mark.parametrize(("override", "message"), [
    ("model.alhpa=0.3", r"unknown key 'model.alhpa' \(allowed: alpha, coarse_grid_ratio"),
    ("model.alpha=1.5", r"model.alpha: Input should be less than or equal to 1 \(got 1.5\)"),
    ("finetune.lr=-1", r"finetune.lr: Input should be greater than 0"),
    ("finetune.losses.nope=1", r"unknown key 'finetune.losses.nope' \(allowed: ce, coarse_ce, coarse_kl, distill\)"),
    ("finetune.epoch=3", r"unknown key 'finetune.epoch' \(allowed: .*epochs"),
    ("method=tome", r"method 'tome' is not known; available: .*cfvit"),
])
def test_errors_name_the_problem(override: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        load_recipe("cfvit", [override])


def test_user_recipe_file(tmp_path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"name": "mine", "method": "cfvit", "model": {"alpha": 0.25}}))
    r = load_recipe(str(path))
    assert r.name == "mine" and r.settings.alpha == 0.25
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(UserError, match=r"not valid YAML"):
        load_recipe(str(bad))
    with pytest.raises(UserError, match=r"does not exist"):
        load_recipe(str(tmp_path / "missing.yaml"))
    with pytest.raises(UserError, match=r"unknown recipe 'nope'; available: .*cfvit"):
        load_recipe("nope")


def test_a_recipe_is_validated_once_and_read_only() -> None:
    r = load_recipe("dge", ["model.region_size=2", "model.granularities=[2,1]"])
    assert r.validated and r.settings is r.settings and r.losses is r.losses  # typed once, not per access
    assert r.settings.region_size == 2 and r.losses.budget == r.finetune.losses["budget"]
    assert load_recipe(r) is r  # nothing to check again
    again = load_recipe(r, ["finetune.epochs=2"])
    assert again is not r and again.finetune.epochs == 2 and again.settings.region_size == 2
    for change in (lambda: setattr(r, "name", "x"), lambda: setattr(r.finetune, "epochs", 9),
                   lambda: setattr(r.settings, "region_size", 4)):
        with pytest.raises(ValidationError, match="frozen"):
            change()
    built = Recipe(name="by-hand", method="cfvit")  # not validated: its settings are read when first asked for
    assert not built.validated and built.settings.alpha == 0.5 and load_recipe(built).validated


def _with_families(families: dict) -> dict:
    data = load_recipe("cfvit").to_dict()
    data["families"] = families
    return data


def test_a_family_section_is_merged_at_conversion() -> None:
    from vitconvert.methods.base import convert
    from vitconvert.sources import load_base

    data = _with_families({"pvt_v2": {"model": {"alpha": 1.0}, "finetune": {"epochs": 8}}})
    recipe = load_recipe(data)
    assert recipe.settings.alpha == 0.5 and recipe.family is None
    merged = recipe.for_family("pvt_v2")
    assert (merged.settings.alpha, merged.finetune.epochs, merged.family, merged.families) == (1.0, 8, "pvt_v2", {})
    assert merged.finetune.lr == recipe.finetune.lr  # the rest of the section is kept
    assert recipe.for_family("vit") is recipe  # no section for the family: unchanged
    assert merged.for_family("swin") is merged  # merged once: its values are explicit from then on

    base, spec = load_base("pvt_v2_b0", None, {"num_classes": 10}, pretrained=False)
    model = convert(base, spec, recipe)
    assert model.recipe.family == "pvt_v2" and model.alpha == 1.0 and model.recipe.finetune.epochs == 8
    base, spec = load_base("deit_tiny_patch16_224", None, {"num_classes": 10, "img_size": 32}, pretrained=False)
    assert convert(base, spec, recipe).recipe.settings.alpha == 0.5


def test_set_overrides_win_over_family_sections() -> None:
    data = _with_families({"pvt_v2": {"model": {"alpha": 1.0}, "finetune": {"epochs": 8}}})
    merged = load_recipe(data, ["model.alpha=0.25"]).for_family("pvt_v2")
    assert (merged.settings.alpha, merged.finetune.epochs) == (0.25, 8)


@pytest.mark.parametrize(("families", "message"), [
    ({"pvt_v2": {"model": {"alpha": 2.0}}}, r"families.pvt_v2\): model.alpha: Input should be less than"),
    ({"pvt_v2": {"model": {"alhpa": 1.0}}}, r"families.pvt_v2\): unknown key 'model.alhpa'"),
    ({"resnet": {"model": {"alpha": 1.0}}}, r"families.resnet: method cfvit supports the families vit, "),
    ({"swin": {"method": "dge"}}, r"families.swin: only model, finetune and calibrate can differ"),
])
def test_family_sections_are_validated_when_the_recipe_loads(families: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        load_recipe(_with_families(families))


def test_a_cards_reproduce_command_names_only_what_differs_from_the_family_defaults() -> None:
    from vitconvert.card import _recipe_args

    shipped = load_recipe("cfvit")
    assert "pvt_v2" in shipped.families  # the shipped recipe refines every PVT-v2 region
    merged = shipped.for_family("pvt_v2").to_dict()
    assert _recipe_args(merged) == "--recipe cfvit"
    changed = load_recipe("cfvit", ["model.alpha=0.25"]).for_family("pvt_v2").to_dict()
    assert _recipe_args(changed) == "--recipe cfvit --set model.alpha=0.25"

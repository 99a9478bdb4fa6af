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

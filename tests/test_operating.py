"""Operating points: validation, a two-value point stored, reloaded and chosen by budget, legacy configs."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from utils import TINY_MODELS

import vitconvert
from vitconvert.errors import UserError
from vitconvert.operating import (
    Budget,
    CurvePoint,
    Knob,
    OperatingSpace,
    choose_point,
    eligible_points,
    frontier,
    not_slower,
)


def _cfvit() -> vitconvert.ConvertedModel:
    arch, kwargs = TINY_MODELS["deit"]
    torch.manual_seed(0)
    return vitconvert.apply(arch, "cfvit", model_kwargs=kwargs, pretrained=False,
                            overrides=["model.explore_alpha=[0.25,0.5]"])


def test_space_validates_names_ranges_and_types() -> None:
    space = OperatingSpace((Knob("eta", 0, 1, full=1, sweep=(0.0, 1.0), simulated=True),
                            Knob("size", 1, 64, full=64, sweep=(16, 64), integer=True)))
    assert space.full() == {"eta": 1.0, "size": 64.0}
    assert space.validate({"size": 32}) == {"size": 32.0}
    assert space.candidates() == [{"eta": 0.0, "size": 16}, {"eta": 0.0, "size": 64}, {"eta": 1.0, "size": 16},
                                  {"eta": 1.0, "size": 64}]
    assert space.split({"eta": 0.5, "size": 16}) == ({"size": 16}, {"eta": 0.5})
    for bad, message in (({"eta": 2}, r"eta must lie in \[0, 1\]"), ({"size": 3.5}, "whole number"),
                         ({"eta": "x"}, "must be a number"), ({"tau": 1}, "unknown operating-point"),
                         ({"eta": float("nan")}, "must be a number")):
        with pytest.raises(UserError, match=message):
            space.validate(bad)


def test_two_value_point_is_stored_reloaded_and_chosen_by_budget(tmp_path) -> None:
    model = _cfvit()
    assert model.operating_space().names == ["eta", "alpha", "dense"]
    assert model.set_operating_point(eta=0.4, alpha=0.25) == {"eta": 0.4, "alpha": 0.25, "dense": 0.0}
    assert model.alpha == 0.25 and model.knob == 0.4
    # the fine stage re-splits fewer patches at a lower alpha: its cost follows the point
    cheap = model.costs["fine"]
    model.set_operating_point(alpha=0.5)
    assert model.costs["fine"] > cheap
    b = model.base_gmacs  # a loaded model recounts it; curve GMACs are shares of it here
    model.calibration = {"base_top1": 80.0}
    model.curve = [CurvePoint({"eta": 0.3, "alpha": 0.25}, 0.30 * b, 70.0),
                   CurvePoint({"eta": 0.6, "alpha": 0.25}, 0.45 * b, 77.0),
                   CurvePoint({"eta": 0.6, "alpha": 0.5}, 0.50 * b, 78.5),
                   CurvePoint({"eta": 1.0, "alpha": 1.0}, 1.0 * b, 80.0)]
    model.set_operating_point(eta=0.6, alpha=0.25)
    path = vitconvert.save(model, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    assert config["model_args"]["state"]["point"] == {"eta": 0.6, "alpha": 0.25, "dense": 0.0}
    assert config["vitconvert"]["point"] == ["eta", "alpha", "dense"]
    loaded = vitconvert.load(path)
    assert loaded.operating_point == {"eta": 0.6, "alpha": 0.25, "dense": 0.0}
    # points stored without the dense knob were measured on the cascade: dense 0
    assert [p.point for p in loaded.curve] == [{**p.point, "dense": 0.0} for p in model.curve]
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        via_timm = timm.create_model(f"local-dir:{path}", pretrained=True).eval()
        assert via_timm.operating_point == {"eta": 0.6, "alpha": 0.25, "dense": 0.0}
    # budgets pick whole points, both values
    assert loaded.set_budget("50%").point == {"eta": 0.6, "alpha": 0.5, "dense": 0.0}
    assert loaded.operating_point == {"eta": 0.6, "alpha": 0.5, "dense": 0.0} and loaded.alpha == 0.5
    assert vitconvert.load(path, budget=0.46 * b).operating_point == {"eta": 0.6, "alpha": 0.25, "dense": 0.0}
    assert vitconvert.load(path, budget="drop=0.5").operating_point == {"eta": 1.0, "alpha": 1.0, "dense": 0.0}
    assert choose_point(loaded.curve, "drop=3", b, 80.0).point == {"eta": 0.6, "alpha": 0.25, "dense": 0.0}
    # a budget's point from a curve stored without the dense knob leaves the dense point
    loaded.set_operating_point(loaded.dense_point())
    assert loaded.set_budget("50%").point["dense"] == 0.0 and loaded.operating_point["dense"] == 0.0
    loaded.full_compute()
    assert loaded.operating_point == {"eta": 1.0, "alpha": 1.0, "dense": 0.0}


def test_legacy_one_knob_state_loads(tmp_path) -> None:
    model = _cfvit()
    path = vitconvert.save(model, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    state = config["model_args"]["state"]
    # vitconvert 0.1 stored the knob and alpha at the top level of the state and curve points as {knob, ...}
    state.pop("point")
    state.update(eta=0.3, alpha=0.25, curve=[{"knob": 0.3, "gmacs": 0.01, "top1": 50.0, "extra": {}}])
    config["vitconvert"] = {**config["vitconvert"], "knob": "eta"}
    config["vitconvert"].pop("point")
    (path / "config.json").write_text(json.dumps(config))
    loaded = vitconvert.load(path)
    assert loaded.operating_point == {"eta": 0.3, "alpha": 0.25, "dense": 0.0}
    assert loaded.curve[0].point == {"eta": 0.3, "dense": 0.0} and loaded.curve[0].knob == 0.3


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda s: s.update(point={"eta": 3}), r"eta must lie in \[0, 1\]"),
    (lambda s: s.update(point={"beta": 0.1}), "unknown operating-point"),
    (lambda s: s.update(point="fast"), "must be a mapping"),
    (lambda s: s.update(curve="x"), "state.curve must be a list"),
    (lambda s: s.update(curve=[{"point": {"eta": 0.5}, "gmacs": "a", "top1": 1}]), "gmacs must be a number"),
    (lambda s: s.update(calibration="x"), "calibration must be a mapping"),
])
def test_bad_stored_points_are_refused_in_one_line(tmp_path, mutate, message) -> None:
    path = vitconvert.save(_cfvit(), tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    mutate(config["model_args"]["state"])
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=message):
        vitconvert.load(path)


def test_speed_budgets_use_measured_points_only() -> None:
    space = OperatingSpace((Knob("eta", 0, 1, full=1, sweep=(0.0, 1.0), simulated=True),))
    curve = [CurvePoint({"eta": 0.2}, 0.3, 70.0, {"throughput_ratio": 2.4}),
             CurvePoint({"eta": 0.5}, 0.5, 78.0, {"throughput_ratio": 1.6}),
             CurvePoint({"eta": 0.7}, 0.6, 79.0),  # not timed: a speed budget cannot pick it
             CurvePoint({"eta": 1.0}, 1.0, 80.0, {"throughput_ratio": 0.98})]
    assert space.validate(curve[0].point) == {"eta": 0.2}
    assert choose_point(curve, "speed=1.5x", 1.0, 80.0).point == {"eta": 0.5}
    assert choose_point(curve, "speed=2", 1.0, 80.0).point == {"eta": 0.2}
    assert choose_point(curve, "speed=3x", 1.0, 80.0).point == {"eta": 0.2}  # none fast enough: the fastest
    assert choose_point(curve, "speed=0.5x", 1.0, 80.0).point == {"eta": 1.0}
    with pytest.raises(UserError, match="calibrate with a speed budget"):
        choose_point([CurvePoint({"eta": 1.0}, 1.0, 80.0)], "speed=2x", 1.0, 80.0)
    for bad in ("speed=0", "speed=fast", "speed=-1x"):
        with pytest.raises(UserError):
            choose_point(curve, bad, 1.0, 80.0)
    assert [p.point["eta"] for p in frontier(curve)] == [0.2, 0.5, 0.7, 1.0]
    assert [p.point["eta"] for p in frontier([*curve, CurvePoint({"eta": 0.6}, 0.7, 75.0)])] == [0.2, 0.5, 0.7, 1.0]


def test_gmacs_and_drop_budgets_skip_points_measured_slower_than_the_base() -> None:
    # DGE-like: the cheapest points pay, a mid point was timed slower than the base model
    curve = [CurvePoint({"c": 0.9}, 0.4, 70.0, {"throughput_ratio": 1.8}),
             CurvePoint({"c": 0.6}, 0.6, 78.0, {"throughput_ratio": 0.9}),
             CurvePoint({"c": 0.5}, 0.7, 79.0),  # untimed; the only timed point with more GMACs is slower
             CurvePoint({"c": 0.0}, 1.0, 80.0, {"throughput_ratio": 0.97})]  # full compute: the base itself
    assert [p.point["c"] for p in not_slower(curve, 1.0)] == [0.9, 0.0]
    assert choose_point(curve, "70%", 1.0, 80.0).point == {"c": 0.9}
    assert choose_point(curve, "drop=1.5", 1.0, 80.0).point == {"c": 0.0}
    # untimed points count by a timed point of more GMACs that reached the base's speed
    fast = [*curve[:2], CurvePoint({"c": 0.55}, 0.65, 78.5),
            CurvePoint({"c": 0.3}, 0.8, 79.5, {"throughput_ratio": 1.1})]
    assert [p.point["c"] for p in not_slower(fast, 1.0)] == [0.9, 0.55, 0.3]
    # nothing timed: GMACs budgets as before
    plain = [CurvePoint(p.point, p.gmacs, p.top1) for p in curve]
    assert choose_point(plain, "60%", 1.0, 80.0).point == {"c": 0.6}


def test_budgets_skip_points_costing_more_than_the_base_unless_the_method_adds_compute() -> None:
    # DVT-like: never exiting runs every member (1.9x the base's GMACs); FSLA-augment-like methods opt in.
    curve = [CurvePoint({"t": 0.5}, 0.5, 70.0), CurvePoint({"t": 0.9}, 0.95, 79.0),
             CurvePoint({"t": 1.0}, 1.9, 80.0)]
    assert [p.point["t"] for p in eligible_points(curve, 1.0)] == [0.5, 0.9]
    assert choose_point(curve, "drop=0", 1.0, 80.0).point == {"t": 0.9}  # nothing meets it: the best affordable
    assert choose_point(curve, 5.0, 1.0, 80.0).point == {"t": 0.9}
    assert choose_point(curve, "drop=0", 1.0, 80.0, adds_compute=True).point == {"t": 1.0}
    assert eligible_points(curve[2:], 1.0) == curve[2:]  # nothing is that cheap: everything stays eligible


def test_a_method_that_adds_compute_is_never_chosen_switched_off_by_best_or_drop_budgets() -> None:
    # FSLA-augment-like: cluster size 0 is the base model (its GMACs); FSLA on costs more and here ties with it.
    curve = [CurvePoint({"c": 0}, 1.0, 80.0), CurvePoint({"c": 8}, 1.1, 80.0), CurvePoint({"c": 49}, 1.3, 79.0)]
    assert choose_point(curve, "best", 1.0, 80.0).point == {"c": 0}  # a method that does not add compute
    assert choose_point(curve, "best", 1.0, 80.0, adds_compute=True).point == {"c": 8}
    assert choose_point(curve, "drop=0", 1.0, 80.0, adds_compute=True).point == {"c": 8}
    assert choose_point(curve, "drop=1", 1.0, 80.0, adds_compute=True).point == {"c": 8}  # cheapest of those on
    assert choose_point(curve, "100%", 1.0, 80.0, adds_compute=True).point == {"c": 0}  # a GMACs limit still holds
    assert choose_point(curve[:1], "best", 1.0, 80.0, adds_compute=True).point == {"c": 0}  # nothing else to pick
    assert "with the method on" in Budget.parse("best").describe(adds_compute=True)
    assert Budget.parse("drop=0.5").describe() == "the cheapest point within 0.5 top-1 points of the base model"


@pytest.mark.parametrize(("text", "kind", "value"), [
    ("best", "best", 0.0), (2.1, "gmacs", 2.1), ("2.1", "gmacs", 2.1), ("50%", "fraction", 0.5),
    ("0.5x", "fraction", 0.5), ("drop=0.5", "drop", 0.5), ("speed=2x", "speed", 2.0), (" Speed=1.5 ", "speed", 1.5)])
def test_budget_is_parsed_once_into_a_value(text: str | float, kind: str, value: float) -> None:
    budget = Budget.parse(text)
    assert (budget.kind, budget.value, str(budget)) == (kind, value, str(text))
    assert Budget.parse(budget) is budget  # what entered as a Budget is passed on as it is
    curve = [CurvePoint({"c": 0.2}, 0.4, 70.0, {"throughput_ratio": 2.5}), CurvePoint({"c": 0.6}, 0.8, 79.5),
             CurvePoint({"c": 1.0}, 1.0, 80.0)]
    assert choose_point(curve, budget, 1.0, 80.0) == choose_point(curve, text, 1.0, 80.0)


@pytest.mark.parametrize("bad", ["lots", "150%", "speed=0", "drop=-1", "nan", True])
def test_bad_budgets_are_one_line(bad: object) -> None:
    with pytest.raises(UserError, match="budget"):
        Budget.parse(bad)  # type: ignore[arg-type]

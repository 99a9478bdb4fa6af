"""A tampered or hand-edited config.json is refused with one line by load and push alike, or loads a working
model; it never crashes (issue 16, item 5)."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from utils import TINY_MODELS

import vitconvert
from vitconvert.data import eval_transform
from vitconvert.errors import UserError
from vitconvert.publish import push_files

Mutation = Callable[[dict[str, Any]], Any]


def _set(path: str, value: Any) -> Mutation:
    def mutate(cfg: dict[str, Any]) -> dict[str, Any]:
        *parents, last = path.split(".")
        node = cfg
        for key in parents:
            node = node[key]
        node[last] = value
        return cfg
    return mutate


def _drop(path: str) -> Mutation:
    def mutate(cfg: dict[str, Any]) -> dict[str, Any]:
        *parents, last = path.split(".")
        node = cfg
        for key in parents:
            node = node[key]
        node.pop(last, None)
        return cfg
    return mutate


MUTATIONS: dict[str, Mutation] = {
    # the whole file
    "list": lambda cfg: [cfg],
    "string": lambda cfg: "config",
    "null": lambda cfg: None,
    "number": lambda cfg: 3,
    # top level
    "architecture missing": _drop("architecture"),
    "architecture int": _set("architecture", 5),
    "architecture unknown": _set("architecture", "vitconvert_nope"),
    "architecture timm": _set("architecture", "deit_tiny_patch16_224"),
    "num_classes string": _set("num_classes", "ten"),
    "label_names int": _set("label_names", 5),
    "vitconvert list": _set("vitconvert", [1, 2]),
    "vitconvert.point int": _set("vitconvert.point", 3),
    "extra top key": _set("extra_key", {"a": 1}),
    "model_args missing": _drop("model_args"),
    "model_args list": _set("model_args", [1]),
    # base
    "base missing": _drop("model_args.base"),
    "base list": _set("model_args.base", []),
    "base.architecture missing": _drop("model_args.base.architecture"),
    "base.architecture int": _set("model_args.base.architecture", 7),
    "base.architecture unknown": _set("model_args.base.architecture", "no_such_net"),
    "base.extra key": _set("model_args.base.bogus", 1),
    "base.model_args list": _set("model_args.base.model_args", [1, 2]),
    "base num_heads 7": _set("model_args.base.model_args.num_heads", 7),
    "base patch_size 0": _set("model_args.base.model_args.patch_size", 0),
    "base img_size abc": _set("model_args.base.model_args.img_size", "abc"),
    "base depth -1": _set("model_args.base.model_args.depth", -1),
    "base embed_dim 1.5": _set("model_args.base.model_args.embed_dim", 1.5),
    "base num_classes 5": _set("model_args.base.model_args.num_classes", 5),
    "base num_classes str": _set("model_args.base.model_args.num_classes", "ten"),
    "base unknown kwarg": _set("model_args.base.model_args.bogus", 1),
    "base.img_size abc": _set("model_args.base.img_size", "abc"),
    "base.img_size zero": _set("model_args.base.img_size", [0, 0]),
    "base.img_size one value": _set("model_args.base.img_size", [32]),
    "base.img_size 16": _set("model_args.base.img_size", [16, 16]),
    "base.pretrained string": _set("model_args.base.pretrained", "yes"),
    "base.source int": _set("model_args.base.source", 5),
    "base.checkpoint int": _set("model_args.base.checkpoint", 5),
    # recipe
    "recipe missing": _drop("model_args.recipe"),
    "recipe string": _set("model_args.recipe", "cfvit"),
    "recipe method other": _set("model_args.recipe.method", "dge"),
    "recipe alpha 5": _set("model_args.recipe.model.alpha", 5),
    "recipe unknown key": _set("model_args.recipe.model.bogus", 1),
    "recipe epochs -1": _set("model_args.recipe.finetune.epochs", -1),
    "recipe model list": _set("model_args.recipe.model", [1]),
    # state
    "state string": _set("model_args.state", "x"),
    "state list": _set("model_args.state", [1]),
    "state missing": _drop("model_args.state"),
    "point string": _set("model_args.state.point", "x"),
    "point eta string": _set("model_args.state.point.eta", "x"),
    "point eta 2": _set("model_args.state.point.eta", 2),
    "point eta nan": _set("model_args.state.point.eta", float("nan")),
    "point unknown knob": _set("model_args.state.point.bogus", 1),
    "curve string": _set("model_args.state.curve", "x"),
    "curve ints": _set("model_args.state.curve", [1, 2]),
    "curve bad point": _set("model_args.state.curve", [{"point": {"eta": 5}, "gmacs": 1, "top1": 1}]),
    "curve gmacs string": _set("model_args.state.curve", [{"point": {"eta": 0.5, "alpha": 0.5}, "gmacs": "x",
                                                          "top1": 1}]),
    "calibration string": _set("model_args.state.calibration", "x"),
    "calibration list": _set("model_args.state.calibration", [1]),
    "calibration base_top1 string": _set("model_args.state.calibration", {"base_top1": "x"}),
    "finetuned string": _set("model_args.state.finetuned", "no"),
    "base_gmacs string": _set("model_args.state.base_gmacs", "x"),
    "costs string": _set("model_args.state.costs", "x"),
    "unknown state key": _set("model_args.state.bogus", 1),
    # pretrained_cfg (data settings)
    "pretrained_cfg list": _set("pretrained_cfg", [1]),
    "pretrained_cfg missing": _drop("pretrained_cfg"),
    "input_size abc": _set("pretrained_cfg.input_size", "abc"),
    "input_size zeros": _set("pretrained_cfg.input_size", [3, 0, 0]),
    "input_size other": _set("pretrained_cfg.input_size", [3, 16, 16]),
    "input_size two values": _set("pretrained_cfg.input_size", [32, 32]),
    "mean abc": _set("pretrained_cfg.mean", "abc"),
    "mean two values": _set("pretrained_cfg.mean", [0.5, 0.5]),
    "std zeros": _set("pretrained_cfg.std", [0, 0, 0]),
    "std strings": _set("pretrained_cfg.std", ["a", "b", "c"]),
    "interpolation unknown": _set("pretrained_cfg.interpolation", "nope"),
    "interpolation int": _set("pretrained_cfg.interpolation", 3),
    "crop_pct string": _set("pretrained_cfg.crop_pct", "x"),
    "crop_pct zero": _set("pretrained_cfg.crop_pct", 0),
    "crop_pct negative": _set("pretrained_cfg.crop_pct", -1),
    "crop_mode unknown": _set("pretrained_cfg.crop_mode", "nope"),
    "label_names in cfg int": _set("pretrained_cfg.label_names", 5),
    "license int": _set("pretrained_cfg.license", 5),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    arch, kwargs = TINY_MODELS["deit"]
    model = vitconvert.apply(arch, "cfvit", pretrained=False, model_kwargs=kwargs,
                             overrides=["model.gca_start_block=1"])
    return vitconvert.save(model, tmp_path_factory.mktemp("cfg") / "m")


def _one_line(e: UserError) -> None:
    text = str(e)
    assert text and "\n" not in text and "Traceback" not in text, text


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_mutated_config_is_refused_or_works(name: str, saved: Path, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(saved, folder)
    config = json.loads((saved / "config.json").read_text())
    mutated = MUTATIONS[name](copy.deepcopy(config))
    (folder / "config.json").write_text(json.dumps(mutated))
    before = sorted((p.name, p.read_bytes()) for p in folder.iterdir())

    try:
        model = vitconvert.load(folder)
    except UserError as e:
        _one_line(e)
        refused = str(e)
    else:
        refused = None
        # It loads: it must work as saved models do (eval transform, inference, GMACs).
        from PIL import Image

        image = Image.new("RGB", (40, 40), (100, 50, 20))
        x = eval_transform(model)(image)[None]
        with torch.no_grad():
            out = model.forward_dynamic(torch.cat([x, x]))
        assert out.logits.shape == (2, model.num_classes) and torch.isfinite(out.gmacs).all()
    # push refuses whatever load refuses, before anything leaves the machine
    try:
        push_files(folder, "tester/m")
    except UserError as e:
        _one_line(e)
        assert refused is not None, f"push refused what load accepted: {e}"
    else:
        assert refused is None, f"push accepted what load refused: {refused}"
    assert sorted((p.name, p.read_bytes()) for p in folder.iterdir()) == before  # nothing written

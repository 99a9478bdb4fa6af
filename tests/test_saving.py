"""Converted-model folders: layout, atomic writes, validation before building."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from utils import TINY_MODELS

import vitconvert
import vitconvert.saving as saving
from vitconvert.errors import UserError


@pytest.fixture(scope="module")
def model():
    arch, kwargs = TINY_MODELS["deit"]
    torch.manual_seed(0)
    return vitconvert.apply(arch, "cfvit", model_kwargs=kwargs, pretrained=False,
                            overrides=["model.gca_start_block=1"])


def test_folder_layout_and_config(tmp_path, model) -> None:
    path = vitconvert.save(model, tmp_path / "m")
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architecture"] == "vitconvert_cfvit"
    assert cfg["num_classes"] == 10
    assert cfg["model_args"]["base"]["architecture"] == "deit_tiny_patch16_224"
    assert cfg["model_args"]["base"]["model_args"]["embed_dim"] == 48
    assert cfg["model_args"]["recipe"]["model"]["alpha"] == 0.5
    assert cfg["model_args"]["state"]["point"]["eta"] == 1.0
    assert cfg["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert cfg["pretrained_cfg"]["first_conv"] == "base.patch_embed.proj"
    weights = load_file(str(path / "model.safetensors"))
    assert set(weights) == set(model.state_dict())
    assert torch.equal(weights["base.pos_embed"], model.base.pos_embed)
    card = (path / "README.md").read_text()
    assert card.startswith("---\n") and "vitconvert" in card and "library_name: timm" in card


def test_existing_folder_needs_overwrite(tmp_path, model) -> None:
    dest = tmp_path / "m"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match=r"already exists; pass --overwrite"):
        vitconvert.save(model, dest)
    assert (dest / "keep.txt").read_text() == "mine"
    vitconvert.save(model, dest, overwrite=True)
    assert not (dest / "keep.txt").exists() and (dest / "model.safetensors").exists()


def test_failure_leaves_nothing_behind(tmp_path, model, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(saving, "save_model", broken)
    with pytest.raises(RuntimeError, match=r"disk full"):
        vitconvert.save(model, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def _saved_config(tmp_path, model) -> tuple:
    path = vitconvert.save(model, tmp_path / "m", overwrite=True)
    return path, json.loads((path / "config.json").read_text())


@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: c.update(architecture="vit_small_patch16_224"), "not a vitconvert model"),
    (lambda c: c["model_args"]["base"].update(architecture="no_such_net"), "is not a timm model"),
    (lambda c: c["model_args"]["recipe"]["model"].update(alpha=7), "model.alpha: Input should be less"),
    (lambda c: c["model_args"]["recipe"].update(method="evil"), "method 'evil' is not known"),
    (lambda c: c["model_args"]["state"].update(eta="1; import os"), "state.eta must be a number"),
    (lambda c: c["model_args"]["state"].update(surprise=1), "unexpected method state keys"),
])
def test_load_validates_config_before_building(tmp_path, model, monkeypatch, edit, message) -> None:
    path, cfg = _saved_config(tmp_path, model)
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=message):
        vitconvert.load(path)


def test_load_needs_safetensors(tmp_path, model) -> None:
    path, _ = _saved_config(tmp_path, model)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"has no model.safetensors"):
        vitconvert.load(path)
    with pytest.raises(UserError, match=r"does not exist"):
        vitconvert.load(tmp_path / "missing")

"""The exactness contract, for every shipped recipe x every family its method supports (a method's own recipe on
every test architecture, its variants on one architecture per family).

At its full-compute setting a freshly converted model reproduces the base model's logits (fp32, max abs
difference <= 1e-4), and it survives a save/load round trip through both loaders unchanged.
"""

from __future__ import annotations

import pytest
import timm
import torch
from support_matrix import ARCHITECTURES, committed
from utils import TINY_MODELS

import vitconvert
from vitconvert.backbones import read_anatomy
from vitconvert.methods.base import ConvertedModel
from vitconvert.recipes import list_recipe_files, load_recipe
from vitconvert.registry import get_method

FAMILY_OF = {key: read_anatomy(timm.create_model(arch, pretrained=False, **kwargs)).family
             for key, (arch, kwargs) in TINY_MODELS.items()}
# Pairs a method refuses in one line although it declares the model's family (CF-ViT on a ViT without a class token):
# the support matrix's "no" cells (tests/test_support_matrix.py checks each refusal).
ARCH_OF = {tiny: arch for arch, (_, _, tiny) in ARCHITECTURES.items()}
REFUSED = {pair for pair, yes in committed().items() if not yes}
# A recipe that varies a method's settings (cfvit_lite, dge_light, dvt_nolabels...) runs on one architecture per
# family: what it changes is the method's settings, which the architectures of a family read alike; the method's
# own recipe runs on every architecture.
VARIANT_KEYS = {"deit", "pvt_v2", "swin"}
CASES = [
    (path.stem, key)
    for path in list_recipe_files()
    for key, family in FAMILY_OF.items()
    if family in get_method(load_recipe(path).method).families
    and (load_recipe(path).method, ARCH_OF.get(key)) not in REFUSED
    and (path.stem == load_recipe(path).method or key in VARIANT_KEYS)
]


def test_every_recipe_has_cases() -> None:
    assert {recipe for recipe, _ in CASES} == {p.stem for p in list_recipe_files()}


@pytest.mark.parametrize(("recipe", "key"), CASES)
def test_full_compute_is_exact_and_round_trips(recipe: str, key: str, tmp_path) -> None:
    arch, kwargs = TINY_MODELS[key]
    torch.manual_seed(0)
    model = vitconvert.apply(arch, recipe, model_kwargs=kwargs, pretrained=False).full_compute()
    base = model.build_base()
    size = model.anatomy.img_size
    x = torch.randn(3, 3, *size)
    with torch.no_grad():
        ref = base(x)
        out = model(x)
    # The test follows each method's declaration: exact methods must reproduce the base model; a method that
    # is not must say what its full-compute point is instead.
    if model.exact_at_full_compute:
        assert (out - ref).abs().max().item() <= 1e-4
    else:
        assert model.full_compute_note != ConvertedModel.full_compute_note
    assert model.operating_point == model.operating_space().full()

    path = vitconvert.save(model, tmp_path / "m")
    with torch.no_grad():
        loaded = vitconvert.load(path)
        assert loaded.knob == model.knob and loaded.operating_point == model.operating_point
        assert torch.equal(loaded(x), out)
        via_timm = timm.create_model(f"local-dir:{path}", pretrained=True).eval()
        assert torch.equal(via_timm(x), out)

"""Converting a timm model the caller already holds (``vitconvert.apply(module, recipe)``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from utils import tiny_model

import vitconvert
from vitconvert.anatomy import model_img_size
from vitconvert.errors import UserError
from vitconvert.sources import base_from_module

# One model per family a method supports (Swin has none yet), with a recipe for it.
CASES = [("vit", "cfvit", ["model.gca_start_block=1"]), ("deit_distilled", "dge", []), ("pvt_v2", "dge", [])]


def _input(model: torch.nn.Module) -> torch.Tensor:
    return torch.randn(2, 3, *model_img_size(model), generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize(("key", "recipe", "overrides"), CASES)
def test_module_converts_saves_and_reloads_identically(tmp_path: Path, key: str, recipe: str,
                                                       overrides: list[str]) -> None:
    module, arch, _ = tiny_model(key, seed=7)
    with torch.no_grad():  # "fine-tuned in the user's own loop": weights timm's defaults would not give
        module.head.bias.add_(0.3)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    x = _input(module)
    with torch.no_grad():
        expected = module(x)

    model = vitconvert.apply(module, recipe, overrides=overrides)
    assert model.base_spec.architecture == arch and model.base_spec.source == ""
    with torch.no_grad():
        torch.testing.assert_close(model.full_compute()(x), expected, atol=1e-4, rtol=0)
        # A copy: changing the converted model leaves the caller's module alone (and the other way round).
        model.base.head.bias.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    with torch.no_grad():
        model.base.head.bias.sub_(1.0)

    folder = vitconvert.save(model, tmp_path / "converted")
    for loaded in (vitconvert.load(folder), timm.create_model(f"local-dir:{folder}", pretrained=True)):
        loaded.full_compute()
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))
        assert loaded.state_dict().keys() == model.state_dict().keys()


def test_module_without_recorded_architecture_says_what_to_pass() -> None:
    bare = VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, num_classes=10)
    with pytest.raises(UserError, match=r"does not say which timm architecture.*pass base_name=.*model_kwargs="):
        vitconvert.apply(bare, "cfvit")
    with pytest.raises(UserError, match=r"does not match the VisionTransformer module.*pos_embed.*pass base_name="):
        vitconvert.apply(bare, "cfvit", base_name="vit_tiny_patch16_224")
    kwargs = dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3)
    base, spec = base_from_module(bare, base_name="vit_tiny_patch16_224", model_kwargs=kwargs)
    assert spec.architecture == "vit_tiny_patch16_224" and spec.model_args == {**kwargs, "num_classes": 10}
    assert base is not bare and torch.equal(base.pos_embed, bare.pos_embed)
    with pytest.raises(UserError, match=r"a model name or a path, not int"):
        vitconvert.apply(3, "cfvit")  # type: ignore[arg-type]


def test_finetuned_module_model_needs_its_teacher() -> None:
    module, _, _ = tiny_model("vit")
    model = vitconvert.apply(module, "cfvit", overrides=["model.gca_start_block=1"])
    model.finetuned = True
    with pytest.raises(UserError, match=r"in-memory module.*pass that module"):
        vitconvert.session.original_model(model)
    teacher, _ = vitconvert.session.original_model(model, module)
    assert teacher is not module and torch.equal(teacher.pos_embed, module.pos_embed)

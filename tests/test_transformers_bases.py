"""Hugging Face transformers checkpoints as bases: tiny random transformers models saved with ``save_pretrained``,
converted from ``local-dir:``, from the loopback Hub and as module objects, and checked against the transformers
model's own logits (fp32, <= 1e-4) before and after a save/load round trip."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import timm.data
import torch
import transformers
import yaml
from conftest import HUB_TOKEN
from PIL import Image

import vitconvert
import vitconvert.data
import vitconvert.transformers_bases as tb
from vitconvert.card import model_card
from vitconvert.errors import UserError
from vitconvert.saving import model_config
from vitconvert.sources import BaseSpec, base_from_module, load_base

pytestmark = pytest.mark.usefixtures("one_thread")

# key -> (transformers class, config class, config kwargs, image processor kwargs, recipe, timm architecture)
CASES: dict[str, tuple[str, str, dict[str, Any], dict[str, Any], str, str]] = {
    "vit": ("ViTForImageClassification", "ViTConfig",
            dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=3, intermediate_size=96, image_size=32,
                 patch_size=4, num_labels=5),
            dict(size={"height": 32, "width": 32}, resample=2), "cfvit", "vit_base_patch16_224"),
    "deit": ("DeiTForImageClassification", "DeiTConfig",
             dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=3, intermediate_size=192, image_size=32,
                  patch_size=4, num_labels=5),
             dict(size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32},
                  image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.25]), "cfvit", "deit_base_patch16_224"),
    "deit_teacher": ("DeiTForImageClassificationWithTeacher", "DeiTConfig",
                     dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=3, intermediate_size=192,
                          image_size=32, patch_size=4, num_labels=5), {}, "dvt", "deit_base_distilled_patch16_224"),
    "swin": ("SwinForImageClassification", "SwinConfig",
             dict(image_size=32, patch_size=2, embed_dim=16, depths=[1, 2], num_heads=[1, 2], window_size=4,
                  num_labels=5), dict(size={"height": 32, "width": 32}), "dvt", "swin_tiny_patch4_window7_224"),
    "pvt_v2": ("PvtV2ForImageClassification", "PvtV2Config",
               dict(image_size=64, depths=[1, 1], hidden_sizes=[16, 32], num_attention_heads=[1, 2],
                    sr_ratios=[2, 1], mlp_ratios=[2, 2], num_encoder_blocks=2, patch_sizes=[7, 3], strides=[4, 2],
                    num_labels=5), dict(size={"height": 64, "width": 64}), "dvt", "pvt_v2_b0"),
}
PROCESSOR = "ViTImageProcessor"
# Mapped and checked; kept out of CASES (its own tests below: the pretrained window sizes, and a CLI conversion).
SWINV2 = ("Swinv2ForImageClassification", "Swinv2Config",
          dict(image_size=32, patch_size=2, embed_dim=16, depths=[1, 2], num_heads=[1, 2], window_size=4,
               pretrained_window_sizes=[0, 3], num_labels=5), {}, "dvt", "swinv2_tiny_window8_256")


def _hf_model(key: str, seed: int = 0) -> torch.nn.Module:
    cls, config_cls, kwargs, _, _, _ = SWINV2 if key == "swinv2" else CASES[key]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**kwargs, id2label={i: f"class{i}" for i in range(5)})
    model = getattr(transformers, cls)(config).eval()
    with torch.no_grad():
        # transformers initialises with std 0.02: the attention would be nearly uniform and the logits nearly
        # constant, hiding a wrong mapping. Unit-scale weights, biases and tokens, norms away from identity.
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "token" not in name and "position" not in name:
                p.normal_(0, p[0].numel() ** -0.5)
            else:
                p.add_(0.5 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """Each case's transformers model and the folder save_pretrained wrote (with its preprocessor config)."""
    out = {}
    for key in CASES:
        model = _hf_model(key)
        folder = tmp_path_factory.mktemp(f"hf-{key}")
        model.save_pretrained(folder)
        processor_kwargs = CASES[key][3]
        if processor_kwargs:
            processor = "DeiTImageProcessor" if "crop_size" in processor_kwargs else PROCESSOR
            getattr(transformers, processor)(**processor_kwargs).save_pretrained(folder)
        out[key] = (model, folder)
    return out


def _images(key: str, n: int = 3) -> torch.Tensor:
    size = (SWINV2 if key == "swinv2" else CASES[key])[2]["image_size"]
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(7))


def _hf_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(pixel_values=x).logits


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= 1e-4


@pytest.mark.parametrize("key", list(CASES))
def test_local_dir_round_trip(hf_folders, key: str, tmp_path: Path) -> None:
    hf_model, folder = hf_folders[key]
    _, _, _, _, recipe, arch = CASES[key]
    x = _images(key)
    model = vitconvert.apply(f"local-dir:{folder}", recipe)
    spec = model.base_spec
    assert spec.architecture == arch and spec.source == f"local-dir:{folder}" and spec.pretrained
    assert spec.layer_norm_eps == hf_model.config.layer_norm_eps and spec.hub_id is None
    assert model.pretrained_cfg["label_names"] == [f"class{i}" for i in range(5)]
    expected = _hf_logits(hf_model, x)
    _close(_logits(model.full_compute(), x), expected)

    out = vitconvert.save(model, tmp_path / "converted")
    config = json.loads((out / "config.json").read_text())
    assert config["model_args"]["base"]["layer_norm_eps"] == hf_model.config.layer_norm_eps
    assert config["label_names"] == [f"class{i}" for i in range(5)]
    loaded = vitconvert.load(out)
    _close(_logits(loaded.full_compute(), x), expected)
    # The rebuilt base has the checkpoint's eps on every LayerNorm (timm's own defaults differ for ViT and PVT-v2).
    eps = {m.eps for m in loaded.build_base().modules() if isinstance(m, torch.nn.LayerNorm)}
    assert eps == {hf_model.config.layer_norm_eps}
    if key == "vit":  # timm rebuilds it too, once vitconvert is imported
        via_timm = timm.create_model(f"local-dir:{out}", pretrained=True)
        _close(_logits(via_timm.full_compute(), x), expected)


# Every method on every family it supports (the round trips above cover one recipe per class).
METHOD_CASES = [(key, recipe) for key, recipes in {
    "vit": ["dvt", "dge", "fsla_replace"], "deit": ["dvt", "dge", "fsla_replace"],
    "deit_teacher": ["cfvit", "dge", "fsla_replace"], "swin": ["fsla"], "pvt_v2": ["cfvit", "dge", "fsla_replace"],
}.items() for recipe in recipes]


@pytest.mark.parametrize("key, recipe", METHOD_CASES)
def test_every_method_is_exact_on_transformers_bases(key: str, recipe: str) -> None:
    hf_model = _hf_model(key)
    x = _images(key)
    model = vitconvert.apply(hf_model, recipe)
    assert model.exact_at_full_compute
    _close(_logits(model.full_compute(), x), _hf_logits(hf_model, x))


def test_without_the_eps_the_logits_check_refuses(hf_folders, monkeypatch) -> None:
    """The check at load time is real: the same mapping with timm's own eps (1e-6, not 1e-12) on a ViT whose
    activations are tiny enough for eps to matter is refused in one line."""
    hf_model = _hf_model("vit")
    with torch.no_grad():  # a patch embedding that makes the tokens' variance ~1e-10: eps dominates the norm
        hf_model.vit.embeddings.patch_embeddings.projection.weight.mul_(1e-5)
        hf_model.vit.embeddings.patch_embeddings.projection.bias.zero_()
        hf_model.vit.embeddings.position_embeddings.mul_(1e-5)
        hf_model.vit.embeddings.cls_token.mul_(1e-5)
    monkeypatch.setattr(tb, "set_layer_norm_eps", lambda model, eps: None)
    with pytest.raises(UserError, match=r"does not reproduce its logits \(max abs difference .* > 0.0001\)"):
        vitconvert.apply(hf_model, "cfvit")


def test_a_wrong_mapping_is_refused_by_the_logits_check(hf_folders, monkeypatch) -> None:
    _, folder = hf_folders["swin"]
    real = tb.map_state_dict

    def swapped(eq, state, source):  # q and k exchanged: same names and shapes, other logits
        out = real(eq, state, source)
        for name, tensor in out.items():
            if name.endswith("attn.qkv.weight"):
                q, k, v = tensor.chunk(3)
                out[name] = torch.cat([k, q, v])
        return out

    monkeypatch.setattr(tb, "map_state_dict", swapped)
    with pytest.raises(UserError, match="SwinForImageClassification does not reproduce its logits"):
        load_base(f"local-dir:{folder}")


@pytest.mark.parametrize("key", ["vit", "swin", "pvt_v2"])
def test_hub_round_trip(hub, hub_repo, hf_folders, key: str, tmp_path: Path) -> None:
    from huggingface_hub import HfApi

    hf_model, folder = hf_folders[key]
    _, _, _, _, recipe, arch = CASES[key]
    api = HfApi(token=HUB_TOKEN)  # the folder as a user publishes it, with the stock client
    api.create_repo(hub_repo)
    api.upload_folder(repo_id=hub_repo, folder_path=str(folder))
    x = _images(key)
    model = vitconvert.apply(f"hf-hub:{hub_repo}", recipe)
    assert model.base_spec.hub_id == hub_repo and model.base_spec.architecture == arch
    expected = _hf_logits(hf_model, x)
    _close(_logits(model.full_compute(), x), expected)
    card = model_card(model_config(model))
    front = yaml.safe_load(card.split("---", 2)[1])
    assert front["base_model"] == hub_repo and "license" not in front  # timm's licence is not the checkpoint's
    out = vitconvert.save(model, tmp_path / "converted")
    _close(_logits(vitconvert.load(out).full_compute(), x), expected)
    # Only the config, preprocessor config and safetensors weights were fetched.
    fetched = {path.rsplit("/", 1)[-1] for _, path in hub.requests if hub_repo in path and "/resolve/" in path}
    assert fetched == {"config.json", "preprocessor_config.json", "model.safetensors"}, fetched
    # Random weights: the configs only, still with the checkpoint's preprocessing.
    base, spec = load_base(f"hf-hub:{hub_repo}", pretrained=False)
    assert not spec.pretrained and spec.hub_id is None and spec.architecture == arch
    assert base.pretrained_cfg["crop_mode"] == "squash" and base.pretrained_cfg["label_names"][0] == "class0"


def test_module_object(hf_folders) -> None:
    hf_model, folder = hf_folders["deit"]
    reloaded = transformers.DeiTForImageClassification.from_pretrained(folder)
    reloaded.train()
    x = _images("deit")
    expected = _hf_logits(hf_model, x)
    model = vitconvert.apply(reloaded, "cfvit")
    assert reloaded.training  # the caller's module keeps its mode
    _close(_logits(model.full_compute(), x), expected)
    assert model.base_spec.source == "" and model.base_spec.hub_id is None
    # Loaded from a local folder: its preprocessor config still applies.
    assert model.pretrained_cfg["mean"] == (0.4, 0.5, 0.6) and model.pretrained_cfg["crop_pct"] == 0.8
    with pytest.raises(UserError, match="base_name= and model_kwargs= are for timm modules"):
        vitconvert.apply(reloaded, "cfvit", base_name="deit_tiny")


def test_preprocessing_comes_from_the_preprocessor_config(hf_folders) -> None:
    _, folder = hf_folders["deit"]
    model = vitconvert.apply(f"local-dir:{folder}", "cfvit")
    cfg = timm.data.resolve_data_config(model=model)
    assert cfg["input_size"] == (3, 32, 32) and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == (0.4, 0.5, 0.6) and cfg["std"] == (0.2, 0.3, 0.25)
    assert cfg["crop_pct"] == 0.8 and cfg["crop_mode"] == "squash"
    # timm's eval transform gives the transformers processor's pixels (to one 8-bit level: the two round differently).
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    ours = vitconvert.data.eval_transform(model)(img)
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    theirs = torch.as_tensor(np.asarray(processor(images=img, return_tensors="pt")["pixel_values"][0]))
    assert ours.shape == theirs.shape == (3, 32, 32)
    assert float((ours - theirs).abs().max()) <= 1 / 255 / 0.2 + 1e-5
    # Defaults where a checkpoint has no preprocessor config: the input size is the config's.
    _, bare = hf_folders["deit_teacher"]
    assert timm.data.resolve_data_config(model=vitconvert.apply(f"local-dir:{bare}", "dvt"))["input_size"] == (3, 32,
                                                                                                              32)


def test_data_settings_shortest_edge() -> None:
    eq = tb.TimmEquivalent("ViTForImageClassification", "vit_base_patch16_224", {"num_classes": 2}, 1e-12, [224, 224])
    settings = tb.data_settings(eq, {"size": {"shortest_edge": 256}, "do_center_crop": True,
                                     "crop_size": {"height": 224, "width": 224}, "resample": 3,
                                     "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}, "t")
    assert settings["crop_mode"] == "center" and settings["crop_pct"] == 224 / 256
    assert settings["interpolation"] == "bicubic" and settings["input_size"] == (3, 224, 224)
    with pytest.raises(UserError, match=r"preprocessor_config\.json image_std must be a list of 3 numbers"):
        tb.data_settings(eq, {"image_std": [0.5, 0]}, "t")


def test_cli_apply_and_refusals(hf_folders, tmp_path: Path) -> None:
    import subprocess

    _, folder = hf_folders["swin"]
    out = tmp_path / "swin-dvt"
    proc = subprocess.run([sys.executable, "-m", "vitconvert.cli", "apply", "--recipe", "dvt", f"local-dir:{folder}",
                           "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "config.json").read_text())["model_args"]["base"]["architecture"] == \
        "swin_tiny_patch4_window7_224"

    # SwinV2 weights map onto timm's SwinTransformerV2, a family of its own (backbones/swinv2.py): it converts too.
    v2 = tmp_path / "swinv2"
    hf_v2 = _hf_model("swinv2")
    hf_v2.save_pretrained(v2)
    proc = subprocess.run([sys.executable, "-m", "vitconvert.cli", "apply", "--recipe", "dvt", f"local-dir:{v2}",
                           "-o", str(tmp_path / "v2-out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    loaded = vitconvert.load(tmp_path / "v2-out")
    assert loaded.base_spec.architecture == "swinv2_tiny_window8_256" and loaded.anatomy.family == "swinv2"
    x = _images("swinv2")
    _close(_logits(loaded.full_compute(), x), _hf_logits(hf_v2, x))


def test_swinv2_weights_map_onto_timm() -> None:
    """q/v biases without a k bias, the continuous position bias MLP, the logit scale and the pretrained window
    sizes all reach timm's SwinTransformerV2: its logits are the transformers model's."""
    hf_model = _hf_model("swinv2")
    base, spec = base_from_module(hf_model)
    assert spec.architecture == "swinv2_tiny_window8_256" and spec.model_args["pretrained_window_sizes"] == [0, 3]
    x = _images("swinv2")
    _close(_logits(base, x), _hf_logits(hf_model, x))
    rebuilt = spec.build()
    rebuilt.load_state_dict(base.state_dict())
    _close(_logits(rebuilt, x), _hf_logits(hf_model, x))


def _write_config(folder: Path, **changes: Any) -> Path:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("changes, message", [
    ({"architectures": ["ViTForMaskedImageModeling"]},
     "transformers class ViTForMaskedImageModeling cannot be converted; vitconvert maps image classifiers"),
    ({"architectures": None}, "cannot be converted"),
    ({"hidden_act": "gelu_new"}, "hidden_act 'gelu_new' has no timm equivalent"),
    ({"hidden_size": 50}, "not divisible by num_attention_heads"),
    ({"patch_size": [4, 8]}, "is not square"),
])
def test_config_refusals(hf_folders, tmp_path: Path, changes: dict[str, Any], message: str) -> None:
    import shutil

    folder = Path(shutil.copytree(hf_folders["vit"][1], tmp_path / "copy"))
    _write_config(folder, **changes)
    with pytest.raises(UserError, match=message):
        load_base(f"local-dir:{folder}")


def test_pvt_refusals(hf_folders, tmp_path: Path) -> None:
    import shutil

    folder = Path(shutil.copytree(hf_folders["pvt_v2"][1], tmp_path / "copy"))
    _write_config(folder, linear_attention=True)
    with pytest.raises(UserError, match=r"linear_attention .* is not supported"):
        load_base(f"local-dir:{folder}")
    _write_config(folder, linear_attention=False, patch_sizes=[5, 3])
    with pytest.raises(UserError, match="has no timm equivalent"):
        load_base(f"local-dir:{folder}")


def test_missing_transformers_is_one_line_naming_the_extra(hf_folders, monkeypatch) -> None:
    _, folder = hf_folders["vit"]
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    with pytest.raises(UserError) as err:
        load_base(f"local-dir:{folder}")
    assert "pip install 'vitconvert[transformers]'" in str(err.value) and "\n" not in str(err.value)
    # Random weights need only config.json: no transformers.
    base, spec = load_base(f"local-dir:{folder}", pretrained=False)
    assert spec.architecture == "vit_base_patch16_224" and not spec.pretrained and spec.layer_norm_eps == 1e-12
    assert {m.eps for m in base.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-12}


def test_weights_and_kwargs_refusals(hf_folders, tmp_path: Path) -> None:
    import shutil

    folder = Path(shutil.copytree(hf_folders["vit"][1], tmp_path / "copy"))
    with pytest.raises(UserError, match="--model-kwargs cannot change depth"):
        load_base(f"local-dir:{folder}", model_kwargs={"depth": 2})
    # Repeating the config's own arguments (as a saved spec does when the teacher is rebuilt) is fine.
    _, spec = load_base(f"local-dir:{folder}")
    _, again = load_base(spec.source, spec.checkpoint, spec.model_args)
    assert again.model_args == spec.model_args
    (folder / "model.safetensors").unlink()
    with pytest.raises(UserError, match="has no weights"):
        load_base(f"local-dir:{folder}")


def test_base_spec_eps_is_validated() -> None:
    spec = BaseSpec("vit_tiny_patch16_224", {"img_size": 32, "num_classes": 3}, layer_norm_eps=1e-12)
    assert BaseSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(UserError, match="layer_norm_eps must be a small positive number"):
        BaseSpec.from_dict({**spec.to_dict(), "layer_norm_eps": "tiny"})

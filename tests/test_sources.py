"""Model sources: names and aliases, checkpoints, local folders, errors."""

from __future__ import annotations

import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file
from utils import tiny_model

from vitconvert.errors import UserError
from vitconvert.sources import load_base, load_checkpoint_file, parse_model_kwargs, resolve_model_name


@pytest.mark.parametrize(("alias", "arch"), [
    ("deit_small", "deit_small_patch16_224"),
    ("swin_tiny", "swin_tiny_patch4_window7_224"),
    ("pvt_v2_b2", "pvt_v2_b2"),
    ("deit_tiny_distilled", "deit_tiny_distilled_patch16_224"),
])
def test_alias_resolves(alias: str, arch: str) -> None:
    assert resolve_model_name(alias) == (arch, None)


def test_pretrained_tag_is_kept() -> None:
    assert resolve_model_name("deit_small_patch16_224.fb_in1k") == ("deit_small_patch16_224", "fb_in1k")


def test_ambiguous_alias_lists_candidates() -> None:
    with pytest.raises(UserError, match=r"ambiguous.*vit_base_patch16_224.*vit_base_patch32_224"):
        resolve_model_name("vit_base")


def test_unknown_name_suggests() -> None:
    with pytest.raises(UserError, match=r"unknown model 'deit_smal'.*deit_small"):
        resolve_model_name("deit_smal")


def test_parse_model_kwargs() -> None:
    assert parse_model_kwargs(["img_size=32", "depths=[1,2]", "class_token=false", "act=gelu"]) == {
        "img_size": 32, "depths": (1, 2), "class_token": False, "act": "gelu"}
    with pytest.raises(UserError, match=r"key=value"):
        parse_model_kwargs(["img_size"])


def _logits(model: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(1)
    with torch.no_grad():
        return model.eval()(torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("fmt", ["safetensors", "pth_nested", "bin_module_prefix"])
def test_checkpoint_formats_load_exactly(tmp_path, fmt: str) -> None:
    model, arch, kwargs = tiny_model("deit", seed=3)
    sd = model.state_dict()
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif fmt == "pth_nested":
        path = tmp_path / "w.pth"
        torch.save({"state_dict": sd, "epoch": 3}, path)
    else:
        path = tmp_path / "w.bin"
        torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, path)
    base, spec = load_base(arch, checkpoint=path, model_kwargs=kwargs, pretrained=True)
    assert torch.equal(_logits(base), _logits(model))
    assert spec.checkpoint == str(path) and spec.pretrained and spec.hub_id is None
    assert spec.model_args["num_classes"] == 10 and spec.model_args["img_size"] == 32


def test_checkpoint_key_mismatch_is_named(tmp_path) -> None:
    model, arch, kwargs = tiny_model("deit")
    sd = dict(model.state_dict())
    sd.pop("head.weight")
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(UserError, match=r"missing keys: head\.weight.*unexpected keys: extra\.weight"):
        load_base(arch, checkpoint=path, model_kwargs=kwargs)


def test_checkpoint_shape_mismatch_is_named(tmp_path) -> None:
    model, arch, kwargs = tiny_model("deit")
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(UserError, match=r"head\.weight \(10, 48\) vs model \(7, 48\)"):
        load_base(arch, checkpoint=path, model_kwargs={**kwargs, "num_classes": 7})


class _Payload:
    def __reduce__(self):  # pragma: no cover - must never run
        return (print, ("code ran",))


def test_pickled_code_is_refused(tmp_path) -> None:
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Payload()}, f)
    with pytest.raises(UserError, match=r"could not be read"):
        load_checkpoint_file(path)


def test_corrupt_and_missing_checkpoints(tmp_path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match=r"could not be read"):
        load_checkpoint_file(bad)
    with pytest.raises(UserError, match=r"does not exist"):
        load_checkpoint_file(tmp_path / "nope.pth")
    other = tmp_path / "w.npz"
    other.write_bytes(b"x")
    with pytest.raises(UserError, match=r"unsupported format"):
        load_checkpoint_file(other)


def test_local_dir_source_loads_saved_timm_folder(tmp_path) -> None:
    model, arch, kwargs = tiny_model("deit", seed=5)
    folder = tmp_path / "saved"
    timm.models.save_for_hf(model, str(folder), model_args=kwargs, safe_serialization=True)
    base, spec = load_base(f"local-dir:{folder}")
    assert torch.equal(_logits(base), _logits(model))
    assert spec.architecture == arch and spec.model_args["embed_dim"] == 48
    # The spec rebuilds the same architecture without weights.
    rebuilt = spec.build()
    assert rebuilt.state_dict().keys() == model.state_dict().keys()


def test_local_dir_without_config(tmp_path) -> None:
    with pytest.raises(UserError, match=r"no config.json"):
        load_base(f"local-dir:{tmp_path}")


def test_offline_pretrained_names_the_alternatives(monkeypatch, tmp_path) -> None:
    import vitconvert.sources as sources

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match=r"could not be fetched.*--checkpoint.*local-dir:.*--no-pretrained"):
        load_base("deit_tiny", pretrained=True)


def test_bad_model_kwargs() -> None:
    with pytest.raises(UserError, match=r"bad --model-kwargs"):
        load_base("deit_tiny", model_kwargs={"no_such_arg": 1}, pretrained=False)

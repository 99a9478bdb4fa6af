"""Hugging Face transformers image classifiers as bases: their config and weights mapped onto the equivalent timm model.

Every method reads and rewrites *timm* models (the fx anatomy, the family adapters), and a saved converted model
must be rebuilt from a JSON description that timm understands without transformers. So a transformers checkpoint
is not converted as it is: its ``config.json`` is translated into a timm architecture and constructor arguments
(:func:`timm_equivalent`, pure JSON, no transformers needed), its weights are renamed onto that model (q/k/v
fused into timm's ``qkv``/``kv``, DeiT's two heads, Swin's patch merging moved to the next stage, PVT-v2's
overlapping patch embeddings; :func:`map_state_dict`), and the result must reproduce the transformers model's own
logits (fp32, max abs difference <= 1e-4, :func:`check_logits`) before anything is converted. Reading the weights
needs transformers (the ``[transformers]`` extra): the transformers model is the reference the timm model is
checked against, and its loader knows the checkpoint layouts of older releases.

Supported: ``ViTForImageClassification``, ``DeiTForImageClassification`` (the distillation token becomes a timm
register token: it is attended to but has no head), ``DeiTForImageClassificationWithTeacher`` (timm's distilled
ViT: the two heads averaged), ``SwinForImageClassification`` and ``PvtV2ForImageClassification``.
``Swinv2ForImageClassification`` is mapped onto timm's SwinTransformerV2 and checked the same way (the methods
convert it as the SwinV2 family adapter allows).

Layer-norm eps: transformers' ViT uses 1e-12 where timm uses 1e-6, and its PVT-v2 1e-6 where timm uses 1e-5 in
some norms. timm's constructors take a norm *layer*, not an eps, and a saved base must stay plain JSON, so the
eps is recorded beside the timm arguments (``BaseSpec.layer_norm_eps``) and :func:`set_layer_norm_eps` applies it
to every LayerNorm of the rebuilt model.

Nothing here imports transformers at vitconvert import time; only :func:`load_transformers_model` does.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitconvert.errors import UserError, one_line

EXTRA_HINT = "pip install 'vitconvert[transformers]'"
TOLERANCE = 1e-4
PREPROCESSOR_FILE = "preprocessor_config.json"
# What the mapped model is checked on: a fixed batch of random images (a seeded generator, independent of the
# global RNG), big enough that a wrong mapping shows in the logits.
_CHECK_BATCH = 2
# PIL resampling codes (transformers' ``resample``) -> timm interpolation names.
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# Weight files a transformers folder may hold, in the order they are preferred (safetensors first).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


@dataclass
class TimmEquivalent:
    """The timm model a transformers config describes.

    Attributes:
        hf_class: The transformers class (``ViTForImageClassification``, ...).
        architecture: Registered timm architecture the arguments are given to.
        model_args: ``timm.create_model`` keyword arguments (JSON values; always ``num_classes``).
        layer_norm_eps: The eps every LayerNorm of the model uses (transformers uses one per model).
        img_size: ``[height, width]`` the model is built for.
        in_chans: Input channels.
        label_names: Class names from ``id2label`` (None when they are transformers' ``LABEL_i`` placeholders).
    """

    hf_class: str
    architecture: str
    model_args: dict[str, Any]
    layer_norm_eps: float
    img_size: list[int]
    in_chans: int = 3
    label_names: list[str] | None = None
    rules: list[tuple[str, str | Callable[[re.Match[str]], str]]] = field(default_factory=list, repr=False)


def is_transformers_config(cfg: Any) -> bool:
    """Whether a parsed config.json is a transformers model's (``model_type``) rather than a timm one."""
    return isinstance(cfg, dict) and "model_type" in cfg and "architecture" not in cfg


def is_transformers_module(model: Any) -> bool:
    """Whether ``model`` is a transformers model object (checked without importing transformers)."""
    return type(model).__module__.split(".")[0] == "transformers" and hasattr(model, "config")


def _int(cfg: dict[str, Any], key: str, default: Any, source: str) -> int:
    value = cfg.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UserError(f"{source}: config.json {key} must be a positive integer, got {value!r}")
    return value


def _ints(cfg: dict[str, Any], key: str, source: str, n: int | None = None) -> list[int]:
    value = cfg.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and v > 0 for v in value) or (
            n is not None and len(value) != n):
        size = f" of {n}" if n is not None else ""
        raise UserError(f"{source}: config.json {key} must be a list{size} positive integers, got {value!r}")
    return list(value)


def _size(cfg: dict[str, Any], key: str, default: Any, source: str) -> list[int]:
    value = cfg.get(key, default)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return [value, value]
    if isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return [int(value[0]), int(value[1])]
    raise UserError(f"{source}: config.json {key} must be a positive integer or [height, width], got {value!r}")


def _labels(cfg: dict[str, Any], source: str) -> tuple[int, list[str] | None]:
    """Number of classes and their names (``id2label``); transformers' default is two ``LABEL_i`` classes."""
    id2label = cfg.get("id2label")
    if id2label is None:
        return _int(cfg, "num_labels", 2, source), None
    try:
        names = [str(id2label[k]) for k in sorted(id2label, key=int)]
    except (TypeError, ValueError, AttributeError):
        raise UserError(f"{source}: config.json id2label must map class indices to names") from None
    if [int(k) for k in sorted(id2label, key=int)] != list(range(len(names))):
        raise UserError(f"{source}: config.json id2label must number its classes 0..{len(names) - 1}")
    placeholders = all(n == f"LABEL_{i}" for i, n in enumerate(names))
    return len(names), None if placeholders else names


def _gelu(cfg: dict[str, Any], source: str) -> None:
    act = cfg.get("hidden_act", "gelu")
    if act != "gelu":
        raise UserError(f"{source}: config.json hidden_act {act!r} has no timm equivalent vitconvert maps (only "
                        "'gelu', the exact GELU timm uses)")


def _mlp_ratio(hidden: int, intermediate: int, source: str) -> float:
    ratio = intermediate / hidden
    if int(hidden * ratio) != intermediate:  # timm's Mlp width is int(embed_dim * mlp_ratio)
        raise UserError(f"{source}: intermediate_size {intermediate} is not a width timm can build from hidden_size "
                        f"{hidden}")
    return ratio


# Weight-name rules: a full-match regex over the transformers name and the timm name (a re template or a function
# of the match). A timm name ending in "|q", "|k" or "|v" is one slice of a fused timm tensor (qkv or kv, concatenated
# along the output dimension in that order).
def _vit_rules(prefix: str, dist: str | None, heads: dict[str, str]) -> list[tuple[str, Any]]:
    p = re.escape(prefix)
    rules: list[tuple[str, Any]] = [
        (rf"{p}\.embeddings\.cls_token", "cls_token"),
        (rf"{p}\.embeddings\.position_embeddings", "pos_embed"),
        (rf"{p}\.embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
        (rf"{p}\.layers\.(\d+)\.attention\.(q|k|v)_proj\.(weight|bias)", r"blocks.\1.attn.qkv.\3|\2"),
        (rf"{p}\.layers\.(\d+)\.attention\.o_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
        (rf"{p}\.layers\.(\d+)\.layernorm_before\.(weight|bias)", r"blocks.\1.norm1.\2"),
        (rf"{p}\.layers\.(\d+)\.layernorm_after\.(weight|bias)", r"blocks.\1.norm2.\2"),
        (rf"{p}\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
        (rf"{p}\.layernorm\.(weight|bias)", r"norm.\1"),
    ]
    if dist is not None:
        rules.append((rf"{p}\.embeddings\.distillation_token", dist))
    rules += [(rf"{re.escape(hf)}\.(weight|bias)", rf"{timm_name}.\1") for hf, timm_name in heads.items()]
    return rules


def _vit_like(cfg: dict[str, Any], hf_class: str, source: str) -> TimmEquivalent:
    _gelu(cfg, source)
    hidden = _int(cfg, "hidden_size", 768, source)
    heads = _int(cfg, "num_attention_heads", 12, source)
    if hidden % heads:
        raise UserError(f"{source}: config.json hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    img = _size(cfg, "image_size", 224, source)
    patch = _size(cfg, "patch_size", 16, source)
    if patch[0] != patch[1]:
        raise UserError(f"{source}: config.json patch_size {patch} is not square, which timm's ViT needs")
    num_classes, labels = _labels(cfg, source)
    args: dict[str, Any] = {
        "img_size": img, "patch_size": patch[0], "in_chans": _int(cfg, "num_channels", 3, source),
        "embed_dim": hidden, "depth": _int(cfg, "num_hidden_layers", 12, source), "num_heads": heads,
        "mlp_ratio": _mlp_ratio(hidden, _int(cfg, "intermediate_size", 3072, source), source),
        "qkv_bias": bool(cfg.get("qkv_bias", True)), "num_classes": num_classes,
    }
    if hf_class == "ViTForImageClassification":
        arch, prefix, dist, head_map = "vit_base_patch16_224", "vit", None, {"classifier": "head"}
    elif hf_class == "DeiTForImageClassification":
        # The distillation token sits after the class token and before the patches, is attended to and has no
        # head: exactly a timm register token (reg_tokens=1 keeps [cls, reg, patches] + one position table).
        arch, prefix, dist, head_map = "deit_base_patch16_224", "deit", "reg_token", {"classifier": "head"}
        args["reg_tokens"] = 1
    else:  # DeiTForImageClassificationWithTeacher: timm's distilled ViT averages the same two heads
        arch, prefix, dist = "deit_base_distilled_patch16_224", "deit", "dist_token"
        head_map = {"cls_classifier": "head", "distillation_classifier": "head_dist"}
    eps = float(cfg.get("layer_norm_eps", 1e-12))
    return TimmEquivalent(hf_class, arch, args, eps, img, args["in_chans"], labels,
                          _vit_rules(prefix, dist, head_map))


def _swin_downsample(m: re.Match[str]) -> str:
    # transformers merges patches at the end of stage i, timm at the start of stage i + 1 (same concat order).
    return f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}.{m.group(3)}"


def _swin(cfg: dict[str, Any], hf_class: str, source: str) -> TimmEquivalent:
    _gelu(cfg, source)
    if cfg.get("use_absolute_embeddings"):
        raise UserError(f"{source}: Swin with use_absolute_embeddings has no timm equivalent")
    depths = _ints(cfg, "depths", source)
    num_heads = _ints(cfg, "num_heads", source, len(depths))
    img = _size(cfg, "image_size", 224, source)
    num_classes, labels = _labels(cfg, source)
    mlp_ratio = cfg.get("mlp_ratio", 4.0)
    if not isinstance(mlp_ratio, int | float) or isinstance(mlp_ratio, bool) or mlp_ratio <= 0:
        raise UserError(f"{source}: config.json mlp_ratio must be a positive number, got {mlp_ratio!r}")
    args: dict[str, Any] = {
        "img_size": img, "patch_size": _int(cfg, "patch_size", 4, source),
        "in_chans": _int(cfg, "num_channels", 3, source), "embed_dim": _int(cfg, "embed_dim", 96, source),
        "depths": depths, "num_heads": num_heads, "window_size": _int(cfg, "window_size", 7, source),
        "mlp_ratio": float(mlp_ratio), "qkv_bias": bool(cfg.get("qkv_bias", True)), "num_classes": num_classes,
    }
    s = r"swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)"
    rules: list[tuple[str, Any]] = [
        (r"swin\.embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
        (r"swin\.embeddings\.norm\.(weight|bias)", r"patch_embed.norm.\1"),
        (rf"{s}\.attention\.(q|k|v)_proj\.(weight|bias)", r"layers.\1.blocks.\2.attn.qkv.\4|\3"),
        (rf"{s}\.attention\.o_proj\.(weight|bias)", r"layers.\1.blocks.\2.attn.proj.\3"),
        (rf"{s}\.attention\.relative_position_bias\.relative_position_bias_table",
         r"layers.\1.blocks.\2.attn.relative_position_bias_table"),
        (rf"{s}\.layernorm_before\.(weight|bias)", r"layers.\1.blocks.\2.norm1.\3"),
        (rf"{s}\.layernorm_after\.(weight|bias)", r"layers.\1.blocks.\2.norm2.\3"),
        (rf"{s}\.mlp\.(fc1|fc2)\.(weight|bias)", r"layers.\1.blocks.\2.mlp.\3.\4"),
        (r"swin\.encoder\.layers\.(\d+)\.downsample\.(reduction|norm)\.(weight|bias)", _swin_downsample),
        (r"swin\.layernorm\.(weight|bias)", r"norm.\1"),
        (r"classifier\.(weight|bias)", r"head.fc.\1"),
    ]
    return TimmEquivalent(hf_class, "swin_tiny_patch4_window7_224", args, float(cfg.get("layer_norm_eps", 1e-5)),
                          img, args["in_chans"], labels, rules)


def _swinv2(cfg: dict[str, Any], hf_class: str, source: str) -> TimmEquivalent:
    eq = _swin(cfg, hf_class, source)  # the same configuration keys, plus the pretrained window sizes
    depths = eq.model_args["depths"]
    windows = cfg.get("pretrained_window_sizes", [0] * len(depths))
    if not (isinstance(windows, list) and len(windows) == len(depths) and all(
            isinstance(w, int) and not isinstance(w, bool) and w >= 0 for w in windows)):
        raise UserError(f"{source}: config.json pretrained_window_sizes must be a list of {len(depths)} window "
                        f"sizes, got {windows!r}")
    eq.model_args["pretrained_window_sizes"] = list(windows)
    eq.architecture = "swinv2_tiny_window8_256"
    s = r"swinv2\.encoder\.layers\.(\d+)\.blocks\.(\d+)"
    a = rf"{s}\.attention\.self"
    t = r"layers.\1.blocks.\2"
    # SwinV2 has q and v biases but no k bias: timm keeps them as attn.q_bias / attn.v_bias beside a bias-free qkv.
    eq.rules = [
        (r"swinv2\.embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
        (r"swinv2\.embeddings\.norm\.(weight|bias)", r"patch_embed.norm.\1"),
        (rf"{a}\.logit_scale", rf"{t}.attn.logit_scale"),
        (rf"{a}\.continuous_position_bias_mlp\.(\d+)\.(weight|bias)", rf"{t}.attn.cpb_mlp.\3.\4"),
        (rf"{a}\.(query|key|value)\.weight", lambda m: f"layers.{m[1]}.blocks.{m[2]}.attn.qkv.weight|{m[3][0]}"),
        (rf"{a}\.query\.bias", rf"{t}.attn.q_bias"),
        (rf"{a}\.value\.bias", rf"{t}.attn.v_bias"),
        (rf"{s}\.attention\.output\.dense\.(weight|bias)", rf"{t}.attn.proj.\3"),
        (rf"{s}\.layernorm_before\.(weight|bias)", rf"{t}.norm1.\3"),
        (rf"{s}\.layernorm_after\.(weight|bias)", rf"{t}.norm2.\3"),
        (rf"{s}\.intermediate\.dense\.(weight|bias)", rf"{t}.mlp.fc1.\3"),
        (rf"{s}\.output\.dense\.(weight|bias)", rf"{t}.mlp.fc2.\3"),
        (r"swinv2\.encoder\.layers\.(\d+)\.downsample\.(reduction|norm)\.(weight|bias)", _swin_downsample),
        (r"swinv2\.layernorm\.(weight|bias)", r"norm.\1"),
        (r"classifier\.(weight|bias)", r"head.fc.\1"),
    ]
    return eq


def _pvt_patch_embed(m: re.Match[str]) -> str:
    # timm calls stage 0's overlapping patch embedding patch_embed, later ones stages.i.downsample.
    i, part, kind = int(m.group(1)), m.group(2), m.group(3)
    name = "proj" if part == "proj" else "norm"
    return f"patch_embed.{name}.{kind}" if i == 0 else f"stages.{i}.downsample.{name}.{kind}"


def _pvt_v2(cfg: dict[str, Any], hf_class: str, source: str) -> TimmEquivalent:
    _gelu(cfg, source)
    depths = _ints(cfg, "depths", source)
    n = len(depths)
    if cfg.get("num_encoder_blocks", n) != n:
        raise UserError(f"{source}: config.json num_encoder_blocks {cfg.get('num_encoder_blocks')!r} does not match "
                        f"depths {depths}")
    if _ints(cfg, "patch_sizes", source, n) != [7, 3, 3, 3][:n] or _ints(cfg, "strides", source, n) != [4, 2, 2,
                                                                                                           2][:n]:
        raise UserError(f"{source}: PVT-v2 with patch_sizes {cfg.get('patch_sizes')} / strides {cfg.get('strides')} "
                        "has no timm equivalent (timm's embeddings are 7/4 then 3/2)")
    if cfg.get("linear_attention"):
        raise UserError(f"{source}: PVT-v2 with linear_attention (the *_li variants) is not supported: vitconvert's "
                        "PVT-v2 family reads spatial-reduction attention only")
    mlp_ratios = cfg.get("mlp_ratios")
    if not isinstance(mlp_ratios, list) or len(mlp_ratios) != n or not all(
            isinstance(r, int | float) and not isinstance(r, bool) and r > 0 for r in mlp_ratios):
        raise UserError(f"{source}: config.json mlp_ratios must be a list of {n} positive numbers, got {mlp_ratios!r}")
    num_classes, labels = _labels(cfg, source)
    args: dict[str, Any] = {
        "in_chans": _int(cfg, "num_channels", 3, source), "depths": depths,
        "embed_dims": _ints(cfg, "hidden_sizes", source, n), "num_heads": _ints(cfg, "num_attention_heads", source, n),
        "sr_ratios": _ints(cfg, "sr_ratios", source, n), "mlp_ratios": [float(r) for r in mlp_ratios],
        "qkv_bias": bool(cfg.get("qkv_bias", True)), "num_classes": num_classes,
    }
    s = r"pvt_v2\.encoder\.layers\.(\d+)\.blocks\.(\d+)"
    a = rf"{s}\.attention"
    rules: list[tuple[str, Any]] = [
        (r"pvt_v2\.encoder\.layers\.(\d+)\.patch_embedding\.(proj|layer_norm)\.(weight|bias)", _pvt_patch_embed),
        (rf"{s}\.layer_norm_1\.(weight|bias)", r"stages.\1.blocks.\2.norm1.\3"),
        (rf"{s}\.layer_norm_2\.(weight|bias)", r"stages.\1.blocks.\2.norm2.\3"),
        (rf"{a}\.query\.(weight|bias)", r"stages.\1.blocks.\2.attn.q.\3"),
        (rf"{a}\.key\.(weight|bias)", r"stages.\1.blocks.\2.attn.kv.\3|k"),
        (rf"{a}\.value\.(weight|bias)", r"stages.\1.blocks.\2.attn.kv.\3|v"),
        (rf"{a}\.proj\.(weight|bias)", r"stages.\1.blocks.\2.attn.proj.\3"),
        (rf"{a}\.spatial_reduction\.(weight|bias)", r"stages.\1.blocks.\2.attn.sr.\3"),
        (rf"{a}\.layer_norm\.(weight|bias)", r"stages.\1.blocks.\2.attn.norm.\3"),
        (rf"{s}\.mlp\.dense1\.(weight|bias)", r"stages.\1.blocks.\2.mlp.fc1.\3"),
        (rf"{s}\.mlp\.dwconv\.dwconv\.(weight|bias)", r"stages.\1.blocks.\2.mlp.dwconv.\3"),
        (rf"{s}\.mlp\.dense2\.(weight|bias)", r"stages.\1.blocks.\2.mlp.fc2.\3"),
        (r"pvt_v2\.encoder\.layers\.(\d+)\.layer_norm\.(weight|bias)", r"stages.\1.norm.\2"),
        (r"classifier\.(weight|bias)", r"head.\1"),
    ]
    img = _size(cfg, "image_size", 224, source)
    return TimmEquivalent(hf_class, "pvt_v2_b0", args, float(cfg.get("layer_norm_eps", 1e-6)), img,
                          args["in_chans"], labels, rules)


_CLASSES: dict[str, Callable[[dict[str, Any], str, str], TimmEquivalent]] = {
    "ViTForImageClassification": _vit_like,
    "DeiTForImageClassification": _vit_like,
    "DeiTForImageClassificationWithTeacher": _vit_like,
    "SwinForImageClassification": _swin,
    "Swinv2ForImageClassification": _swinv2,
    "PvtV2ForImageClassification": _pvt_v2,
}
SUPPORTED_CLASSES = tuple(_CLASSES)


def hf_class_of(cfg: dict[str, Any], source: str) -> str:
    """The transformers class a config.json names (``architectures[0]``), refused unless it is supported."""
    names = cfg.get("architectures")
    name = names[0] if isinstance(names, list) and len(names) == 1 and isinstance(names[0], str) else None
    supported = ", ".join(SUPPORTED_CLASSES)
    if name not in _CLASSES:
        what = f"transformers class {name}" if name else f"transformers model type {cfg.get('model_type')!r} " \
                                                         f"(architectures {names!r})"
        raise UserError(f"{source}: {what} cannot be converted; vitconvert maps image classifiers of these "
                        f"classes onto timm: {supported}")
    return name


def timm_equivalent(cfg: dict[str, Any], source: str, hf_class: str | None = None) -> TimmEquivalent:
    """The timm architecture, arguments and layer-norm eps a transformers config.json describes (pure JSON).

    Args:
        cfg: The parsed config.json (or ``model.config.to_dict()``).
        source: How the user named the model, for messages.
        hf_class: The transformers class; default: the config's ``architectures``.
    """
    name = hf_class or hf_class_of(cfg, source)
    if name not in _CLASSES:
        raise UserError(f"{source}: transformers class {name} cannot be converted; vitconvert maps image "
                        f"classifiers of these classes onto timm: {', '.join(SUPPORTED_CLASSES)}")
    eq = _CLASSES[name](cfg, name, source)
    if not (isinstance(eq.layer_norm_eps, float) and eq.layer_norm_eps > 0):
        raise UserError(f"{source}: config.json layer_norm_eps must be a positive number")
    return eq


def map_state_dict(eq: TimmEquivalent, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Rename a transformers state dict onto the timm model ``eq`` describes (fp32, q/k/v fused)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    compiled = [(re.compile(pattern), target) for pattern, target in eq.rules]
    for key, tensor in state.items():
        for pattern, target in compiled:
            m = pattern.fullmatch(key)
            if m:
                name = target(m) if callable(target) else m.expand(target)
                break
        else:
            raise UserError(f"{source}: transformers weight {key!r} has no counterpart in timm's "
                            f"{eq.architecture}; the checkpoint does not have the {eq.hf_class} layout vitconvert "
                            "maps")
        name, _, part = name.partition("|")
        if part:
            fused.setdefault(name, {})[part] = tensor
        else:
            out[name] = tensor.detach().float()
    for name, parts in fused.items():
        order = "qkv" if ".qkv." in name else "kv"
        if set(parts) != set(order):
            raise UserError(f"{source}: {eq.hf_class} weights lack the {order} parts {sorted(set(order) - set(parts))} "
                            f"of {name}")
        out[name] = torch.cat([parts[p].detach().float() for p in order], dim=0)
    return out


def set_layer_norm_eps(model: nn.Module, eps: float) -> None:
    """Give every LayerNorm of ``model`` the eps the checkpoint was trained with (timm's constructors take no eps)."""
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.eps = eps


def data_settings(eq: TimmEquivalent, preprocessor: dict[str, Any] | None, source: str) -> dict[str, Any]:
    """timm data settings (``pretrained_cfg`` keys) from a transformers ``preprocessor_config.json``.

    transformers resizes to ``size`` (``{height, width}``: ignoring the aspect ratio, timm's ``squash``;
    ``{shortest_edge}``: keeping it, timm's ``center``), then, with ``do_center_crop``, crops ``crop_size``:
    timm expresses the same as the model's input size with ``crop_pct`` = crop / resize. Without a preprocessor
    config only the input size and channels are set (the timm architecture's mean/std stay).
    """
    settings: dict[str, Any] = {"input_size": (eq.in_chans, *eq.img_size), "num_classes": eq.model_args["num_classes"]}
    if eq.label_names:
        settings["label_names"] = list(eq.label_names)
    if not preprocessor:
        return settings

    def bad(key: str, expected: str) -> UserError:
        return UserError(f"{source}: {PREPROCESSOR_FILE} {key} must be {expected}, got {preprocessor.get(key)!r}")

    if preprocessor.get("do_normalize", True):
        for key, timm_key in (("image_mean", "mean"), ("image_std", "std")):
            value = preprocessor.get(key)
            if value is None:
                continue
            if isinstance(value, int | float) and not isinstance(value, bool):
                value = [value] * eq.in_chans
            if not (isinstance(value, list) and len(value) == eq.in_chans and all(
                    isinstance(v, int | float) and not isinstance(v, bool) for v in value)) or (
                    timm_key == "std" and any(v <= 0 for v in value)):
                raise bad(key, f"a list of {eq.in_chans} numbers")
            settings[timm_key] = tuple(float(v) for v in value)
    else:
        settings["mean"], settings["std"] = (0.0,) * eq.in_chans, (1.0,) * eq.in_chans
    resample = preprocessor.get("resample")
    if resample is not None:
        if resample not in _RESAMPLE:
            raise bad("resample", "a PIL resampling code 0-5")
        settings["interpolation"] = _RESAMPLE[resample]
    size = preprocessor.get("size")
    if preprocessor.get("do_resize", True) and isinstance(size, dict):
        crop = preprocessor.get("crop_size") if preprocessor.get("do_center_crop") else None
        height = crop.get("height") if isinstance(crop, dict) else None
        if "height" in size and "width" in size:
            settings["crop_mode"] = "squash"
            resized = size["height"]
        elif "shortest_edge" in size:
            settings["crop_mode"] = "center"
            resized = size["shortest_edge"]
        else:
            raise bad("size", "{height, width} or {shortest_edge}")
        if not isinstance(resized, int) or resized <= 0 or (height is not None and (
                not isinstance(height, int) or height <= 0)):
            raise bad("size", "positive integers")
        settings["crop_pct"] = (height or resized) / resized
    return settings


def preprocessor_config(folder: Path, source: str) -> dict[str, Any] | None:
    """The folder's ``preprocessor_config.json``, or None when it has none."""
    file = folder / PREPROCESSOR_FILE
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{source}: {PREPROCESSOR_FILE} is not valid JSON ({one_line(e)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{source}: {PREPROCESSOR_FILE} must hold a JSON object")
    return data


def require_transformers(source: str, hf_class: str) -> Any:
    """The transformers package, or a one-line error naming the extra that installs it."""
    try:
        import transformers
    except ImportError:
        raise UserError(f"{source} is a Hugging Face transformers checkpoint ({hf_class}); reading its weights needs "
                        f"transformers: {EXTRA_HINT}") from None
    return transformers


@contextlib.contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """No progress bars or load reports from transformers while a checkpoint loads (vitconvert reports itself)."""
    logging = transformers.utils.logging
    bars = not logging.is_progress_bar_enabled()
    verbosity = logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if not bars:
            logging.enable_progress_bar()


def load_transformers_model(folder: Path, eq: TimmEquivalent, source: str) -> nn.Module:
    """The transformers model of a local folder, in fp32 and eval mode.

    The class comes from vitconvert's list (never from the folder: no remote code); transformers reads
    safetensors, or .bin with ``weights_only=True``.
    """
    transformers = require_transformers(source, eq.hf_class)
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise UserError(f"{source} has no weights ({' or '.join(WEIGHT_FILES[::2])}); pass --no-pretrained for "
                        "random weights")
    cls = getattr(transformers, eq.hf_class)
    try:
        with _quiet(transformers):
            model = cls.from_pretrained(str(folder), dtype=torch.float32, trust_remote_code=False)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise UserError(f"{source}: transformers could not load the {eq.hf_class} checkpoint "
                        f"({type(e).__name__}: {one_line(e)[:200]})") from None
    return model.float().eval()


def check_logits(hf_model: nn.Module, timm_model: nn.Module, eq: TimmEquivalent, source: str) -> float:
    """Max abs difference of the two models' logits on a fixed random batch; above 1e-4 it is a UserError."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(_CHECK_BATCH, eq.in_chans, *eq.img_size, generator=gen)
    with torch.no_grad():
        ref = hf_model.eval()(pixel_values=x).logits.float()
        out = timm_model.eval()(x).float()
    diff = float((ref - out).abs().max()) if ref.shape == out.shape else float("inf")
    if not diff <= TOLERANCE:
        raise UserError(f"{source}: the timm {eq.architecture} mapped from the transformers {eq.hf_class} does not "
                        f"reproduce its logits (max abs difference {diff:.2e} > {TOLERANCE:g}), so it is not "
                        "converted")
    return diff


def timm_from_transformers(hf_model: nn.Module, eq: TimmEquivalent, source: str,
                           build: Callable[[str, dict[str, Any]], nn.Module],
                           load: Callable[[nn.Module, dict[str, torch.Tensor], str], None]) -> nn.Module:
    """The timm model ``eq`` describes with the transformers model's weights, checked against its logits.

    Args:
        hf_model: The transformers model (fp32).
        eq: Its timm equivalent.
        source: For messages.
        build: Builds a timm architecture with random weights (``sources.build_timm``).
        load: Loads a state dict strictly, naming what does not fit (``sources.load_state_dict_checked``).
    """
    base = build(eq.architecture, eq.model_args)
    set_layer_norm_eps(base, eq.layer_norm_eps)
    state = map_state_dict(eq, hf_model.state_dict(), source)
    load(base, state, f"{source} ({eq.hf_class} weights mapped onto {eq.architecture})")
    check_logits(hf_model, base, eq, source)
    return base.eval()


def set_data_settings(base: nn.Module, settings: dict[str, Any]) -> None:
    """Replace the timm architecture's pretrained_cfg with one for this checkpoint.

    The architecture's structural entries stay (first_conv, classifier) and so do its data defaults where the
    checkpoint names none; where timm's weights came from (url, hf_hub_id, tag), their licence and label names are
    not this checkpoint's, so they are dropped.
    """
    cfg = dict(getattr(base, "pretrained_cfg", None) or {})
    for key in ("url", "hf_hub_id", "hf_hub_filename", "file", "source", "state_dict", "tag", "custom_load",
                "license", "paper_ids", "paper_name", "origin_url", "notes", "test_input_size", "test_crop_pct",
                "label_names", "label_descriptions"):
        cfg.pop(key, None)
    cfg.update(settings)
    base.pretrained_cfg = cfg
    base.default_cfg = cfg

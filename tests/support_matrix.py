"""The support matrix (architecture by method), generated from the conformance suite's own models.

Every architecture here is a tiny model of ``tests/utils.py``; each method is applied to it with its default recipe.
A cell is "yes" when the conversion succeeds (the conformance suite then runs every check on that pair, exactness
at full compute included), otherwise "no" with the one-line refusal the user gets. The committed result,
``docs/support-matrix.md``, is what the README and the methods page show; ``tests/test_support_matrix.py`` fails when
it differs from what the code does now. Regenerate it (and the README's copy) with::

    python tests/support_matrix.py --write
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
from utils import TINY_MODELS

import vitconvert
from vitconvert.backbones import describe_family
from vitconvert.errors import UserError
from vitconvert.registry import METHODS

ROOT = Path(__file__).resolve().parents[1]
MATRIX = ROOT / "docs" / "support-matrix.md"
START, END = "<!-- support-matrix:start -->", "<!-- support-matrix:end -->"

# key -> (row label, family, tiny model in tests/utils.py). The conformance suite runs its checks on every pair
# whose cell is yes.
ARCHITECTURES: dict[str, tuple[str, str, str]] = {
    "vit": ("ViT / DeiT / DeiT-III (class token)", "vit", "deit"),
    "vit_attn_pool": ("ViT with an attention-pooling head (SigLIP, MAP)", "vit", "siglip"),
    "eva": ("EVA / EVA-02 / RoPE ViT (rotary embeddings passed to every block)", "eva", "eva02"),
    "beit": ("BEiT (relative position bias in every block)", "beit", "beit"),
    "pvt_v2": ("PVT-v2", "pvt_v2", "pvt_v2"),
    "swin": ("Swin", "swin", "swin"),
    "swinv2": ("SwinV2 (cosine attention, continuous position bias, post-norm)", "swinv2", "swinv2"),
}
# (method, architecture) -> recipe overrides under which the tiny model exercises the method (clustered attention
# needs more tokens than a 32-px ViT has, and tiny grids need the clustering's overhead left out).
CASE_OVERRIDES: dict[tuple[str, str], list[str]] = {
    ("fsla_replace", "vit"): ["model.img_size=64", "model.clustering_overhead=0"],
    ("fsla_replace", "vit_attn_pool"): ["model.img_size=64", "model.clustering_overhead=0"],
    ("fsla_replace", "eva"): ["model.img_size=64", "model.clustering_overhead=0", "model.blocks=[1]"],
    ("fsla_replace", "beit"): ["model.img_size=64", "model.clustering_overhead=0", "model.blocks=[1]"],
    ("fsla_replace", "pvt_v2"): ["model.img_size=192", "model.cluster_size=8", "model.clustering_overhead=0"],
    # The random-init pooling head attends uniformly (its weights are small: scores differ by ~1e-4 across patches),
    # so which patches a fine pass refines would follow float rounding; the case refines all of them (exits and the
    # reuse layer still differ per image) and tests/test_cfvit.py checks the pooling head's scores.
    ("cfvit", "vit_attn_pool"): ["model.alpha=1.0"],
}

# (method, architecture) -> tiny-model kwargs added for the case. CF-ViT exits on thresholds of its coarse confidence
# (steps of 0.01): timm starts EVA's and BEiT's heads 1000x smaller and SigLIP's pooled features unnormalised, so every
# random-init image would have the same confidence to 0.001 and take the same path; larger logits make them differ.
CASE_MODEL_KWARGS: dict[tuple[str, str], dict[str, object]] = {
    ("cfvit", "vit_attn_pool"): {"fc_norm": True},
    ("cfvit", "eva"): {"head_init_scale": 1.0},
    ("cfvit", "beit"): {"head_init_scale": 1.0},
}


def convert(method: str, arch: str) -> vitconvert.ConvertedModel:
    """The method applied to the architecture's tiny model with its default recipe (and the case's overrides)."""
    model_arch, kwargs = TINY_MODELS[ARCHITECTURES[arch][2]]
    torch.manual_seed(0)
    return vitconvert.apply(model_arch, {"name": f"conformance-{method}", "method": method},
                            model_kwargs={**kwargs, **CASE_MODEL_KWARGS.get((method, arch), {})},
                            pretrained=False, overrides=CASE_OVERRIDES.get((method, arch)))


def cell(method: str, arch: str) -> str:
    """``yes``, ``yes: <what the method does on it>`` or ``no: <the refusal>``."""
    cls = METHODS[method]
    family = ARCHITECTURES[arch][1]
    if family not in cls.families:
        return f"no: {cls.not_supported.get(family) or ', '.join(describe_family(f) for f in cls.families) + ' only'}"
    try:
        model = convert(method, arch)
    except UserError as e:
        return f"no: {e}"
    return f"yes: {model.support_note}" if model.support_note else "yes"


def matrix() -> dict[str, dict[str, str]]:
    torch.set_num_threads(1)
    return {arch: {m: cell(m, arch) for m in sorted(METHODS)} for arch in ARCHITECTURES}


def render(cells: dict[str, dict[str, str]]) -> str:
    methods = sorted(next(iter(cells.values())))
    lines = [START,
             "| architecture | " + " | ".join(f"`{m}`" for m in methods) + " |",
             "|---|" + "---|" * len(methods)]
    for arch, row in cells.items():
        shown = [c.replace("|", "\\|") for c in row.values()]
        lines.append(f"| {ARCHITECTURES[arch][0]} | " + " | ".join(shown) + " |")
    lines.append(END)
    return "\n".join(lines) + "\n"


def parse(text: str) -> dict[tuple[str, str], bool]:
    """(method, architecture) -> supported, from a rendered table."""
    body = text[text.index(START):text.index(END)].splitlines()[1:]
    methods = [m.strip(" `") for m in body[0].strip("|").split("|")[1:]]
    labels = {label: key for key, (label, _, _) in ARCHITECTURES.items()}
    out = {}
    for line in body[2:]:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        for m, c in zip(methods, cells[1:], strict=True):
            out[(m, labels[cells[0]])] = c.startswith("yes")
    return out


def committed() -> dict[tuple[str, str], bool]:
    return parse(MATRIX.read_text(encoding="utf-8")) if MATRIX.is_file() else {}


def write(text: str) -> None:
    """The table into docs/support-matrix.md and between the README's markers."""
    MATRIX.write_text(text, encoding="utf-8")
    readme = ROOT / "README.md"
    old = readme.read_text(encoding="utf-8")
    readme.write_text(old[:old.index(START)] + text.rstrip("\n") + old[old.index(END) + len(END):], encoding="utf-8")


if __name__ == "__main__":
    text = render(matrix())
    if "--write" in sys.argv[1:]:
        write(text)
    print(text, end="")

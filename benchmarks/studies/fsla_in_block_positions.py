"""``fsla_replace`` on full-size EVA-02 and BEiT models at 224 px (random weights): exactness at full compute and what a
clustered point and its exported graph compute.

The conformance suite checks the tiny EVA and BEiT of ``tests/support_matrix.py``; this runs the same checks on real
widths, depths and grids: ``eva02_tiny_patch14_224`` (rotary embeddings passed to every block, 16x16 patches + the
class token) and a small BEiT (``beit_base_patch16_224`` at width 384, 6 heads: relative position bias tables in
every block), both with 10 classes, ``pretrained=False``. Per model:

* full compute (cluster size 0) against the timm model (``build_base``): max abs logit difference (the contract: at
  most 1e-4);
* one cluster holding every token (cluster size 256): bit-identical to full compute (clustering does not pay, so
  the layer runs dense);
* cluster size 64 with ``clustering_overhead=0`` (so it really clusters at 257 tokens): the features differ from
  dense attention, and ``forward_traceable`` (what an exported graph runs) equals the eager forward.

Usage: ``python -m benchmarks.studies.fsla_in_block_positions [--out FILE]`` (about a minute on one thread).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

import vitconvert
from benchmarks.common import machine_block

MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "eva02_tiny": ("eva02_tiny_patch14_224", {"num_classes": 10}),
    "beit_small": ("beit_base_patch16_224", {"num_classes": 10, "embed_dim": 384, "num_heads": 6}),
}


def check(arch: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    torch.manual_seed(0)
    model = vitconvert.apply(arch, "fsla_replace", pretrained=False, model_kwargs=kwargs)
    torch.manual_seed(0)
    clustered = vitconvert.apply(arch, "fsla_replace", pretrained=False, model_kwargs=kwargs,
                                 overrides=["model.clustering_overhead=0", "model.cluster_size=64"])
    base = model.build_base()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = base(x)
        model.full_compute()
        full = model(x)
        model.set_operating_point(cluster_size=256)
        one_cluster = model(x)
        out = clustered.forward_dynamic(x)
        traced = clustered.forward_traceable(x, {})
        features = clustered.base.forward_features(x)
        dense_features = base.forward_features(x)
    return {
        "model": arch, "kwargs": kwargs, "replaced_blocks": model.fsla_blocks,
        "tokens": model.anatomy.blocks[0].tokens,
        "full_compute_max_abs_diff": float((full - dense).abs().max()),
        "exact": float((full - dense).abs().max()) <= 1e-4,
        "one_cluster_equals_full": bool(torch.equal(one_cluster, full)),
        "cluster_64": {"gmacs": float(out.gmacs[0]), "base_gmacs": clustered.base_gmacs,
                       "feature_max_abs_diff_from_dense": float((features - dense_features).abs().max()),
                       "traceable_max_abs_diff": float((traced.logits - out.logits).abs().max())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {"name": "fsla_in_block_positions", "results": {k: check(a, kw) for k, (a, kw) in MODELS.items()},
               "threads": 1, "machine": machine_block()}
    text = json.dumps(results, indent=1)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

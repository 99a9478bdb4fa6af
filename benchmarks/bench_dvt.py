"""DVT speed benchmark: GMACs of every member, and wall-clock throughput / batch-1 latency of the real
early-exit cascade against timm, measured side by side, on deit_small, swin_tiny and pvt_v2_b1 at 224 px.

* **GMACs**: each member's ``vitconvert.count_macs`` cost given the earlier members ran (reuse included),
  cumulative per exit. For deit_small they are checked against an analytic count of our layout (within
  0.5%) and set next to the DVT paper's official layout (1.14 / 2.50 / 5.16, ``docs/methods.md`` 2.4), whose
  differences (patch-32 / patch-23 tokenisers, the 48 reuse channels concatenated into fc1) are computed.
* **Throughput** (batch 64, one thread, fp32): two exit distributions from DVT's geometric family (exit
  shares proportional to q^k), with q chosen so the expected GMACs are 50% and 75% of the base model's.
  Weights are random (``pretrained=False``): the cost of a path does not depend on the weights, but random
  confidences would not give these shares, so the thresholds are *forced* on the timed batch (set between
  neighbouring confidences so exactly the wanted number of images exits at each member; checked on the real
  ``forward_dynamic`` before timing).
* **Latency** (batch 1): an image takes one path, so each path (exit at member k) is timed and the
  latency at a distribution is the share-weighted mean of the path medians.

Run: ``python -m benchmarks --only dvt`` (writes ``benchmarks/results/dvt_speed.json``);
``python -m benchmarks.bench_dvt --arch deit_small_patch16_224`` runs one backbone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

import vitconvert
from benchmarks import protocol
from benchmarks.common import machine_block
from vitconvert.layers.cascade import cumulative
from vitconvert.methods.dvt import DVT
from vitconvert.timing import inference_context

ARCHS = ("deit_small_patch16_224", "swin_tiny_patch4_window7_224", "pvt_v2_b1")
BUDGETS = (0.5, 0.75)  # expected GMACs / the base model's
OFFICIAL_DEIT_S = (1.143, 2.500, 5.157)  # docs/methods.md 2.4 [calc]
TOLERANCE = 0.005


# --- analytic count (deit_small) ------------------------------------------------------------------------


def analytic_vit(model: DVT) -> dict[str, list[float]]:
    """Per-member GMACs of a ViT DVT from its dimensions: ours, and DVT's official layout."""
    a = model.anatomy
    c, depth, heads = a.embed_dim, len(a.blocks), a.blocks[0].num_heads
    mlp = model.base.get_submodule(a.blocks[0].mlp)
    hidden = mlp.fc1.out_features
    classes, p = a.num_classes, a.num_prefix_tokens
    patch = a.img_size[0] // a.grid[0]
    s = model.settings
    ours, official = [], []
    for k, (g, _) in enumerate(model.grids):
        n = g * g + p
        blocks = depth * (4 * n * c * c + 2 * n * n * c + 2 * n * c * hidden + 10 * n * c)
        macs = blocks + g * g * 3 * patch * patch * c + 5 * n * c + c * classes
        off = macs
        if k > 0:
            gu = model.grids[k - 1][0]
            up = gu * gu + p
            macs += depth * (up * (5 * c + c * s.reuse_hidden + s.reuse_hidden * s.reuse_dim) + g * g * s.reuse_dim * c)
            macs += up * up * 2 * (depth * heads) * round(s.relation_ratio * depth * heads)
            # official: reuse channels concatenated into fc1 (C + 48 -> hidden) under a LayerNorm over C + 48
            off = macs - depth * g * g * s.reuse_dim * c + depth * n * (s.reuse_dim * hidden + 5 * s.reuse_dim)
        # official tokenisers: patch 32 (7x7), patch 23 with padding 3 (10x10), patch 16 (14x14)
        official_patch = {7: 32, 10: 23}.get(g, patch)
        off += g * g * 3 * c * (official_patch ** 2 - patch ** 2)
        ours.append(macs / 1e9)
        official.append(off / 1e9)
    return {"ours": ours, "official_layout": official}


# --- forced exit distributions ---------------------------------------------------------------------------


def shares_for(costs: list[float], target: float) -> list[float]:
    """DVT's geometric exit shares (proportional to q^k) whose expected cumulative cost is ``target``."""
    cum = cumulative(costs)

    def expected(q: float) -> tuple[float, list[float]]:
        w = [q ** (k + 1) for k in range(len(cum))]
        sh = [v / sum(w) for v in w]
        return sum(s * c for s, c in zip(sh, cum, strict=True)), sh

    lo, hi = 1e-3, 1e3
    for _ in range(100):
        mid = (lo * hi) ** 0.5
        if expected(mid)[0] < target:
            lo = mid
        else:
            hi = mid
    return expected(lo)[1]


def counts_for(shares: list[float], batch: int) -> list[int]:
    counts = [round(s * batch) for s in shares[:-1]]
    return [*counts, batch - sum(counts)]


class AtThresholds(nn.Module):
    """Runs a shared DVT at its own thresholds (forced on the timed batch by :func:`force`)."""

    def __init__(self, model: DVT, shares: list[float] | None = None, exit_at: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.shares = shares
        k = len(model.names) - 1
        # a fixed path: thresholds 0 up to member exit_at (everyone exits there), 1 before it
        self.thresholds = [1.0] * k if exit_at is None else [0.0 if i >= exit_at else 1.0 for i in range(k)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.model.thresholds = list(self.thresholds)
        return self.model(x)


def force(wrapper: AtThresholds, x: torch.Tensor, bf16: bool) -> dict[str, Any]:
    """Thresholds under which exactly ``counts_for(shares)`` images of ``x`` exit at each member; verified."""
    model, shares = wrapper.model, wrapper.shares
    assert shares is not None
    counts = counts_for(shares, x.shape[0])
    with inference_context(x.device, bf16):
        logits = model.cascade.run_all(x)
    undecided = torch.ones(x.shape[0], dtype=torch.bool)
    thresholds = []
    for k, want in enumerate(counts[:-1]):
        conf = logits[k].float().softmax(-1).amax(-1).cpu()
        left = conf[undecided].sort(descending=True).values
        if want == 0:
            t = 1.0
        elif want >= left.numel():
            t = 0.0
        else:
            hi, lo = left[want - 1].item(), left[want].item()
            if not lo < hi:
                raise RuntimeError(f"cannot force {want} exits at member {k}: tied confidences")
            t = (lo + hi) / 2
        thresholds.append(t)
        undecided &= ~(conf > t)
    wrapper.thresholds = thresholds
    with inference_context(x.device, bf16):
        model.thresholds = list(thresholds)
        out = model.forward_dynamic(x)
    got = out.stage.cpu().bincount(minlength=len(counts)).tolist()
    if got != counts:
        raise RuntimeError(f"forced thresholds {thresholds} give exits {got}, not {counts}")
    return {"thresholds": thresholds, "exit_counts": got, "mean_gmacs": out.gmacs.mean().item()}


def _setup(name: str, model: nn.Module, x: torch.Tensor, cfg: dict[str, Any]) -> dict[str, Any] | None:
    if isinstance(model, AtThresholds) and model.shares is not None:
        return force(model, x, cfg["bf16"])
    return None


# --- run ------------------------------------------------------------------------------------------------


def run_arch(arch: str, quick: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    model = vitconvert.apply(arch, "dvt", pretrained=False)
    assert isinstance(model, DVT)
    base = model.build_base()
    img = tuple(model.anatomy.img_size)
    costs = list(model.costs.values())
    entry: dict[str, Any] = {
        "arch": arch, "members": model.names, "img_sizes": model.img_sizes, "member_gmacs": costs,
        "cumulative_gmacs": cumulative(costs), "base_gmacs": model.base_gmacs,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "base_params_m": sum(p.numel() for p in base.parameters()) / 1e6,
    }
    if model.is_vit:
        analytic = analytic_vit(model)
        entry["analytic"] = analytic
        entry["rel_error"] = [abs(a - b) / b for a, b in zip(costs, analytic["ours"], strict=True)]
        if max(entry["rel_error"]) > TOLERANCE:
            raise RuntimeError(f"{arch}: member GMACs differ from the analytic count: {entry['rel_error']}")
        if arch == "deit_small_patch16_224":
            entry["official_layout_paper"] = list(OFFICIAL_DEIT_S)
    shares = {b: shares_for(costs, b * model.base_gmacs) for b in BUDGETS}
    models: dict[str, nn.Module] = {"timm": base}
    models.update({f"dvt_{b}": AtThresholds(model, shares=shares[b]) for b in BUDGETS})
    paths = {f"dvt_exit{k}": AtThresholds(model, exit_at=k) for k in range(len(costs))}
    measured = protocol.measure_models(models, img, quick=quick, latency_models={"timm": base, **paths},
                                     setup=_setup, threads=1)
    batch = measured["cpu_throughput"]["config"]["batch"]
    for b in BUDGETS:
        protocol.add_path_mix_latency(measured, f"dvt_{b}", {f"dvt_exit{k}": s for k, s in enumerate(shares[b])},
                                    "share-weighted mean of the per-exit path medians")
    rows = []
    for b in BUDGETS:
        counts = counts_for(shares[b], batch)
        gm = sum(c * g for c, g in zip(counts, cumulative(costs), strict=True)) / batch
        rows += protocol.result_row(measured, f"dvt_{b}", method="dvt", backbone=arch,
                                  setting=f"exits {'/'.join(str(c) for c in counts)} of {batch}",
                                  gmacs=gm, base_gmacs=model.base_gmacs,
                                  notes="random weights; thresholds forced on the timed batch")
    entry.update(shares={str(b): s for b, s in shares.items()}, speed=measured, rows=rows)
    return entry


def run(quick: bool, out_dir: Path, archs: tuple[str, ...] = ARCHS) -> dict[str, Any]:
    """Measure DVT on each backbone against timm; write ``dvt_speed.json`` after each backbone (merged with
    the entries already there, so a long run stopped half-way keeps what it measured)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "dvt_speed.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    entries = {e["arch"]: e for e in old.get("backbones", []) if old.get("quick") == quick}
    results: dict[str, Any] = {}
    for arch in archs:
        entries[arch] = run_arch(arch, quick)
        results = _write(path, quick, entries)
    return results


def _write(path: Path, quick: bool, entries: dict[str, Any]) -> dict[str, Any]:
    ordered = [entries[a] for a in ARCHS if a in entries]
    targets = {}
    for e in ordered:
        r = e["rows"][0]  # the CPU row at half the base model's GMACs
        need = 1.7 if e["arch"].startswith("deit") else 1.5
        targets[e["arch"]] = {"throughput_ratio_at_half_gmacs": r["throughput_ratio"], "target": need,
                              "met": r["throughput_ratio"] >= need}
    results = {
        "name": "dvt", "quick": quick, "recipe": "dvt (3 independent members, feature + relation reuse)",
        "backbones": ordered, "target": targets,
        "rows": [row for e in ordered for row in e["rows"]], "machine": machine_block(),
    }
    path.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--arch", nargs="+", default=list(ARCHS))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    res = run(args.quick, args.out, tuple(args.arch))
    print(json.dumps({"target": res["target"], "gmacs": {e["arch"]: e["cumulative_gmacs"] for e in res["backbones"]}},
                     indent=1))

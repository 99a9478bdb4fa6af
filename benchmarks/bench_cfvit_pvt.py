"""CF-ViT on PVT-v2 (the region path) against timm's pvt_v2_b1 at 224 px: throughput at batch 64 and batch-1
latency at about half the base's GMACs, measured side by side in one run.

* **Operating points**: ``alpha`` 1 (every region refined: the fine stage is the base model's computation on the
  images that did not exit, plus the reuse of the coarse features, so the exits alone save the compute), 0.25 and
  0.125 (that share of each stage's 2x2 regions refined; 0.125 also with the region blocks forced to their sparse
  path) and, for each, the share of images sent to the fine stage pinned
  on the timed batch (:func:`benchmarks.bench_cfvit.pin_fraction`) to the largest whole count whose mean GMACs
  ``coarse + f * fine`` stays at or under half the base's. Random weights are fine for speed: each path's cost does
  not depend on the weights (which regions are refined moves no cost: every image refines the same number of
  regions of each stage).
* **Latency** (batch 1): one image exits after the coarse pass or runs both; each path is timed alone and the
  latency at fraction f is ``(1 - f) * exit + f * fine``, as in ``bench_cfvit``.
* Threads: 2 (``torch.set_num_threads``), recorded in the result with ``uptime`` (the machine is shared).

Run: ``python -m benchmarks.bench_cfvit_pvt`` (writes ``benchmarks/results/cfvit_pvt_speed.json``).
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

import torch
from torch import nn

import vitconvert
from benchmarks import protocol
from benchmarks.bench_cfvit import AtEta, _setup
from benchmarks.common import machine_block, threading_info
from vitconvert.methods.cfvit import CFViT

ARCH = "pvt_v2_b1"
# (alpha, how the region blocks run: "auto" is the default execution cost model's choice per block and batch,
# "sparse" always gathers the selected queries)
VARIANTS = ((1.0, "auto"), (0.25, "auto"), (0.125, "auto"), (0.125, "sparse"))
THREADS = 2
TARGET_SHARE = 0.5  # of the base's GMACs
TARGET_SPEEDUP = 1.5


def _name(alpha: float, execution: str) -> str:
    return f"cfvit_a{alpha}_{execution}"


def run(quick: bool, out_dir: Path) -> dict[str, Any]:
    """Measure CF-ViT on pvt_v2_b1 at ~half the GMACs against timm; write ``cfvit_pvt_speed.json``."""
    return measure_region_path(ARCH, VARIANTS, "cfvit_pvt", quick, out_dir)


def measure_region_path(arch: str, variants: tuple[tuple[float, str], ...], result: str, quick: bool,
                        out_dir: Path) -> dict[str, Any]:
    """CF-ViT's region path on ``arch`` (at its own input size) at each ``(alpha, execution)`` of ``variants``, the
    fine fraction pinned to about half the base's GMACs, against timm, interleaved; writes ``<result>_speed.json``
    (also ``bench_cfvit_swin``'s)."""
    torch.set_num_threads(THREADS)
    batch = protocol.PROTOCOL["quick" if quick else "full"]["cpu_throughput"]["batch"]
    models: dict[str, nn.Module] = {}
    latency_models: dict[str, nn.Module] = {}
    gmacs: dict[str, float] = {}
    points: dict[str, dict[str, Any]] = {}
    for alpha, execution in variants:
        torch.manual_seed(0)  # the same weights in every variant
        model = vitconvert.apply(arch, "cfvit", pretrained=False, overrides=[f"model.alpha={alpha}"])
        assert isinstance(model, CFViT) and model.hierarchical
        model.eval()
        model._ctx.execution = execution  # same results either way (the conformance suite checks the paths)
        if not models:
            base = model.build_base().eval()
            models["timm"], latency_models["timm"] = base, base
            gmacs["timm"] = model.base_gmacs
        costs = dict(model.costs)
        k = math.floor((TARGET_SHARE * model.base_gmacs - costs["coarse"]) / costs["fine"] * batch)
        name = _name(alpha, execution)
        points[name] = {"alpha": alpha, "execution": execution, "fraction": k / batch, "stage_gmacs": costs}
        gmacs[name] = costs["coarse"] + k / batch * costs["fine"]
        models[name] = AtEta(model, fraction=k / batch)
        latency_models[f"{name}_exit"] = AtEta(model, eta=0.0)
        latency_models[f"{name}_fine"] = AtEta(model, eta=1.0)
    img = tuple(model.anatomy.img_size)
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    measured = protocol.measure_models(models, img, quick=quick, latency_models=latency_models, setup=_setup,
                                       threads=THREADS, devices=("cpu",))
    uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    lat = measured["cpu_latency"]["results"]
    for name, pt in points.items():
        f = pt["fraction"]
        protocol.add_path_mix_latency(measured, name, {f"{name}_exit": 1 - f, f"{name}_fine": f},
                                      f"(1-{f}) * {name}_exit + {f} * {name}_fine medians")
        rows += protocol.result_row(measured, name, method="cfvit", backbone=arch,
                                    setting=f"alpha {pt['alpha']}, {pt['execution']}, fine fraction {f:.4f}",
                                    gmacs=gmacs[name], base_gmacs=gmacs["timm"],
                                    notes="random weights; exit fraction pinned on the timed batch; region path")
        thr = measured["cpu_throughput"]["results"][name]["ratio"]
        lat_ratio = lat["timm"]["median"] / lat[name]["median"]
        summary[name] = {"gmacs_share": gmacs[name] / gmacs["timm"], "throughput_ratio": thr,
                         "latency_ratio": lat_ratio, "met": thr >= TARGET_SPEEDUP and lat_ratio >= TARGET_SPEEDUP}
    results = {
        "name": result,
        "backbone": arch,
        "quick": quick,
        "recipe": "cfvit (coarse pass at 112 px)",
        "points": points,
        "gmacs": gmacs,
        "speed": measured,
        "target": {"share": TARGET_SHARE, "speedup": TARGET_SPEEDUP, "variants": summary},
        "rows": rows,
        "threads": threading_info(),
        "uptime": {"before": uptime_before, "after": uptime_after},
        "machine": machine_block(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{result}_speed.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    res = run(args.quick, args.out)
    print(json.dumps({"gmacs": res["gmacs"], "target": res["target"], "uptime": res["uptime"]}, indent=1))

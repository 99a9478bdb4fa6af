"""CF-ViT on PVT-v2 (the region path) against timm's pvt_v2_b1 at 224 px: throughput at batch 64 and batch-1
latency at about half the base's GMACs, measured side by side in one run.

* **Operating point**: ``alpha`` 0.25 (a quarter of each stage's 2x2 regions refined) and the share of images sent
  to the fine stage pinned on the timed batch (:func:`benchmarks.bench_cfvit.pin_fraction`) to the largest whole
  count whose mean GMACs ``coarse + f * fine`` stays at or under half the base's. Random weights are fine for
  speed: each path's cost does not depend on the weights (which regions are refined moves no cost: every image
  refines the same number of regions of each stage).
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
ALPHA = 0.25
THREADS = 2
TARGET_SHARE = 0.5  # of the base's GMACs
TARGET_SPEEDUP = 1.5


def run(quick: bool, out_dir: Path) -> dict[str, Any]:
    """Measure CF-ViT on pvt_v2_b1 at ~half the GMACs against timm; write ``cfvit_pvt_speed.json``."""
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = vitconvert.apply(ARCH, "cfvit", pretrained=False, overrides=[f"model.alpha={ALPHA}"])
    assert isinstance(model, CFViT) and model.hierarchical
    base = model.build_base().eval()
    model.eval()
    img = tuple(model.anatomy.img_size)
    costs = dict(model.costs)
    batch = protocol.PROTOCOL["quick" if quick else "full"]["cpu_throughput"]["batch"]
    k = math.floor((TARGET_SHARE * model.base_gmacs - costs["coarse"]) / costs["fine"] * batch)
    fraction = k / batch
    gmacs = {"timm": model.base_gmacs, "cfvit": costs["coarse"] + fraction * costs["fine"]}

    models: dict[str, nn.Module] = {"timm": base, "cfvit": AtEta(model, fraction=fraction)}
    latency_models: dict[str, nn.Module] = {"timm": base, "cfvit_exit": AtEta(model, eta=0.0),
                                            "cfvit_fine": AtEta(model, eta=1.0)}
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    measured = protocol.measure_models(models, img, quick=quick, latency_models=latency_models, setup=_setup,
                                       threads=THREADS, devices=("cpu",))
    uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    protocol.add_path_mix_latency(measured, "cfvit", {"cfvit_exit": 1 - fraction, "cfvit_fine": fraction},
                                  f"(1-{fraction}) * cfvit_exit + {fraction} * cfvit_fine medians")
    rows = protocol.result_row(measured, "cfvit", method="cfvit", backbone=ARCH,
                               setting=f"alpha {ALPHA}, fine fraction {fraction:.4f}", gmacs=gmacs["cfvit"],
                               base_gmacs=gmacs["timm"],
                               notes="random weights; exit fraction pinned on the timed batch; region path")
    thr = measured["cpu_throughput"]["results"]["cfvit"]["ratio"]
    lat = measured["cpu_latency"]["results"]
    lat_ratio = lat["timm"]["median"] / lat["cfvit"]["median"]
    results = {
        "name": "cfvit_pvt",
        "backbone": ARCH,
        "quick": quick,
        "recipe": f"cfvit, alpha {ALPHA} (coarse pass at 112 px)",
        "stage_gmacs": costs,
        "gmacs": gmacs,
        "gmacs_share": gmacs["cfvit"] / gmacs["timm"],
        "fine_fraction": fraction,
        "speed": measured,
        "target": {"share": TARGET_SHARE, "speedup": TARGET_SPEEDUP, "throughput_ratio": thr,
                   "latency_ratio": lat_ratio, "met": thr >= TARGET_SPEEDUP and lat_ratio >= TARGET_SPEEDUP},
        "rows": rows,
        "threads": threading_info(),
        "uptime": {"before": uptime_before, "after": uptime_after},
        "machine": machine_block(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cfvit_pvt_speed.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    res = run(args.quick, args.out)
    print(json.dumps({"gmacs": res["gmacs"], "gmacs_share": res["gmacs_share"], "target": res["target"],
                      "uptime": res["uptime"]}, indent=1))

"""CF-ViT on Swin (the region path by whole windows) against timm's swin_tiny_patch4_window7_224 at 224 px:
throughput at batch 64 and batch-1 latency at about half the base's GMACs, measured side by side in one run.

The protocol is ``bench_cfvit_pvt``'s (:func:`benchmarks.bench_cfvit_pvt.measure_region_path`):

* **Operating points**: ``alpha`` 1 (every window refined: the exits alone save the compute), 0.25 and 0.125 (that
  share of each block's windows refined, at least one: Swin-T's last stage at 224 px has one window per image and is
  always refined), each with the share of images sent to the
  fine stage **pinned** on the timed batch (the exits are forced, not decided by random weights' confidences) to the
  largest whole count whose mean GMACs ``coarse + f * fine`` stays at or under half the base's. Random weights are
  fine for speed: which windows are refined moves no cost (every window of a block has the same size).
* **Latency** (batch 1): each path (exit after the coarse pass, or both passes) timed alone; the latency at fraction
  f is ``(1 - f) * exit + f * fine``.
* Threads: 2, recorded in the result with ``uptime`` before and after (the machine is shared).

Run: ``python -m benchmarks.bench_cfvit_swin`` (writes ``benchmarks/results/cfvit_swin_speed.json``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.bench_cfvit_pvt import measure_region_path

ARCH = "swin_tiny_patch4_window7_224"
# (alpha, execution): "auto" lets each block choose its path (whole windows at one level run DGE's split path)
VARIANTS = ((1.0, "auto"), (0.25, "auto"), (0.125, "auto"))


def run(quick: bool, out_dir: Path) -> dict[str, Any]:
    """Measure CF-ViT on swin_tiny at ~half the GMACs against timm; write ``cfvit_swin_speed.json``."""
    return measure_region_path(ARCH, VARIANTS, "cfvit_swin", quick, out_dir)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    res = run(args.quick, args.out)
    print(json.dumps({"gmacs": res["gmacs"], "target": res["target"], "uptime": res["uptime"]}, indent=1))

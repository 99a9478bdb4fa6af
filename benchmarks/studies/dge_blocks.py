"""Where PVT-v2 DGE's time goes, block by block: wall time of each dynamic block on the base block, the sparse,
the dense and the ``auto`` path (the path auto took), and the whole model against its base, for the issue-18
PVT-v2 rows: the CIFAR-10 PVT-v2 base (``cifar10-pvt64``) with random gates at the committed trained run's GMACs
share, batch 64, and PVT-v2-b1 at rho 0.7 (random weights, random gates), batch 16. One thread by default (the
development setting: per-block times are steadier than at two threads on a shared 2-core machine).

Writes ``benchmarks/results/dge_blocks_t<threads>.json``. Usage::

    OMP_NUM_THREADS=1 taskset -c 1 python -m benchmarks.studies.dge_blocks [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

import vitconvert
from benchmarks.common import CHECKPOINTS, RESULTS, committed_share, force_ratio, machine_block
from benchmarks.studies.dge_hooks import block_times
from vitconvert.layers.scale_conv import HALO_MAX_SHARE
from vitconvert.methods.dge import DGE
from vitconvert.timing import compare

ROWS = (("dge_pvt64", f"local-dir:{CHECKPOINTS / 'cifar10-pvt64'}", None, 64),
        ("pvt_v2_b1", "pvt_v2_b1", 0.7, 16))


def measure(name: str, src: str, rho: float | None, batch: int, reps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = (vitconvert.apply(src, "dge") if src.startswith("local-dir:")
             else vitconvert.apply(src, "dge", pretrained=False)).eval()
    assert isinstance(model, DGE)
    base = model.build_base().eval()
    rho = committed_share(name) if rho is None else rho
    force_ratio(model, rho, "random", seed=0)
    x = torch.randn(batch, 3, *model.anatomy.img_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = model.forward_dynamic(x)
    share = float(out.gmacs.mean()) / model.base_gmacs
    blocks = block_times(model, x, reps)

    def run(execution: str) -> Any:
        def fn(x: torch.Tensor) -> Any:
            model.execution = execution
            return model(x)
        return fn

    res = compare({"base": base, "auto": run("auto"), "sparse": run("sparse"), "dense": run("dense")}, x, warmup=1,
                  min_rounds=reps, reference="base")
    model.execution = "auto"
    sums = {k: round(sum(b[f"{k}_ms"] for b in blocks), 2) for k in ("base", "sparse", "dense", "auto")}
    row = {"row": name, "rho": rho, "batch": batch, "gmacs_share": round(share, 4), "blocks": blocks,
           "block_sums_ms": sums, "model_ratio": {k: round(v.ratio, 3) for k, v in res.items()},
           "model_img_s": {k: round(v.images_per_s, 2) for k, v in res.items()}}
    print(f"[dge_blocks] {name}: GMACs {share:.3f}, blocks {sums}, model x{row['model_ratio']}", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = machine_block()
    rows = [measure(name, src, rho, batch, args.reps) for name, src, rho, batch in ROWS]
    result = {"name": "dge_blocks", "machine": start, "machine_end": machine_block(), "threads": args.threads,
              "reps": args.reps, "halo_max_share": HALO_MAX_SHARE,
              "note": "per-block median wall ms through forward hooks (benchmarks.studies.dge_hooks.block_times); "
                      "whole model timed against its base in interleaved rounds (per-round paired median ratios)",
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"dge_blocks_t{args.threads}.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

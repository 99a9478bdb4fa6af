"""Where an exported DGE graph spends its time in onnxruntime, and old against new exports in the same rounds.

The rows of ``bench_export``'s DGE section (random weights, random routers, ``coarsening`` bisected for ~50% /
~60% of the base's GMACs on the first 16 images) are exported to ONNX into a folder under a tag, so a graph made
by an earlier revision of the code (run this script from an unpacked ``git archive`` of it) can be timed beside
the current one:

* ``export --tag TAG``: writes ``<arch>-dge-TAG.onnx`` (and the base model's ``<arch>.onnx`` once) into ``--dir``;
* ``profile --tag TAG``: onnxruntime's profiler on ``--runs`` batches of 64, kernel time summed per op type
  (shares of the whole); the session's graph optimisations are onnxruntime's default, as in deployment;
* ``rows``: the rows a graph padded per image to the batch's largest query count runs, over the real queries
  (the eager model's per-block query counts), and the images' ``granularity``;
* ``time --tags old new``: every tagged graph, the base graph and the eager models in the same interleaved rounds
  (:func:`vitconvert.timing.compare`), speed-ups as medians of per-round paired ratios against the ONNX base.

Usage (from the repo root; 2 threads, like ``bench_export``)::

    python -m benchmarks.studies.profile_dge_onnx export --tag new --dir /tmp/dge-onnx
    python -m benchmarks.studies.profile_dge_onnx profile --tag new --dir /tmp/dge-onnx --json OUT.json
    python -m benchmarks.studies.profile_dge_onnx time --tags old new --dir /tmp/dge-onnx --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

import vitconvert
from benchmarks.common import (
    machine_block,
    onnx_base,
    ort_logits,
    ort_session,
    point_for_gmacs,
    randomize_zero_init,
)
from benchmarks.studies.profile_onnx import profile
from vitconvert.timing import compare

ROWS = {"deit_small_patch16_224": 0.5, "pvt_v2_b1": 0.6}  # bench_export's DGE rows: arch -> target GMACs share


def build(arch: str, share: float, batch: int) -> tuple[vitconvert.ConvertedModel, torch.Tensor]:
    """bench_export's DGE row: the model at its bisected point and the timed images."""
    torch.manual_seed(0)
    model = vitconvert.apply(arch, "dge", pretrained=False)
    randomize_zero_init(model)
    images = torch.randn(batch, 3, *model.anatomy.img_size, generator=torch.Generator().manual_seed(2))  # random_batch
    point_for_gmacs(model, images[:16], share)
    return model.eval(), images


def op_shares(path: Path, x: np.ndarray, threads: int, runs: int) -> dict[str, Any]:
    """Kernel time per op type over ``runs`` profiled runs (after one warm-up), as shares of the total
    (:func:`benchmarks.studies.profile_onnx.profile`, with onnxruntime's default spinning, as this study measured)."""
    measured = profile(path, x, threads, runs, spinning=True)
    per_op, total = measured["op_ms_per_run"], sum(measured["op_ms_per_run"].values())
    return {"runs": runs, "run_ms_median": measured["run_ms_median"],
            "kernel_ms_per_run": measured["kernel_ms_per_run"],
            "share": {k: round(v / total, 4) for k, v in per_op.items()},
            "calls_per_run": measured["calls_per_run"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["export", "profile", "time", "rows"])
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--tag", default="new")
    parser.add_argument("--tags", nargs="+", default=["old", "new"])
    parser.add_argument("--arch", nargs="+", default=list(ROWS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"action": args.action, "machine": machine_block(), "threads": args.threads,
                              "batch": args.batch, "load_average_before": os.getloadavg(), "rows": {}}
    for arch in args.arch:
        model, images = build(arch, ROWS[arch], args.batch)
        x = images[:args.batch]
        row: dict[str, Any] = {"point": model.operating_point}
        if args.action == "export":
            path = vitconvert.export(model, args.dir / f"{arch}-dge-{args.tag}.onnx", overwrite=True)
            if not (args.dir / f"{arch}.onnx").exists():
                onnx_base(model.build_base().eval(), model.anatomy.img_size, args.dir / f"{arch}.onnx")
            row["file"] = str(path)
        elif args.action == "rows":
            with torch.no_grad():
                out = model.forward_dynamic(x)
            q = out.extras["queries"]  # (B, dynamic blocks)
            row["padded_rows_over_real_rows"] = float(q.max(0).values.sum() * q.shape[0] / q.sum())
            row["queries_mean_max_per_block"] = [q.mean(0).tolist(), q.max(0).values.tolist()]
            row["granularity_mean_min_max"] = [float(f(out.extras["granularity"])) for f in (torch.mean, torch.min,
                                                                                          torch.max)]
            row["gmacs_share"] = float(out.gmacs.mean()) / model.base_gmacs
            print(f"[rows] {arch}: {row['padded_rows_over_real_rows']:.2f}x", flush=True)
        elif args.action == "profile":
            for name in (f"{arch}-dge-{args.tag}", arch):
                row[name] = op_shares(args.dir / f"{name}.onnx", x.numpy(), args.threads, args.runs)
                print(f"[profile] {name}: {row[name]['run_ms_median']:.0f} ms/run; top "
                      + ", ".join(f"{k} {v:.1%}" for k, v in list(row[name]["share"].items())[:10]), flush=True)
        else:
            sessions = {t: ort_session(args.dir / f"{arch}-dge-{t}.onnx", args.threads) for t in args.tags}
            base_s = ort_session(args.dir / f"{arch}.onnx", args.threads)
            with torch.no_grad():
                eager = model.forward_dynamic(x)
            row["gmacs_share"] = float(eager.gmacs.mean()) / model.base_gmacs
            row["max_abs_logit_difference"] = {
                t: float(np.abs(s.run(["logits"], {"pixel_values": x.numpy()})[0] - eager.logits.numpy()).max())
                for t, s in sessions.items()}
            fns: dict[str, Any] = {f"onnx_{t}": ort_logits(s) for t, s in sessions.items()}
            fns["onnx_base"] = ort_logits(base_s)
            fns["eager_converted"] = model
            fns["eager_base"] = model.build_base().eval()
            timed = compare(fns, x, reference="onnx_base", min_rounds=args.rounds)
            eager_tp = list(timed["eager_converted"].throughput.values)
            base_tp = list(timed["eager_base"].throughput.values)
            eager_speedup = statistics.median(a / b for a, b in zip(eager_tp, base_tp, strict=True))
            row["eager_speedup"] = round(eager_speedup, 3)
            row["images_per_s"] = {k: round(t.images_per_s, 2) for k, t in timed.items()}
            for t in args.tags:
                r = timed[f"onnx_{t}"]
                row[f"onnx_{t}_speedup"] = round(r.ratio, 3)
                row[f"onnx_{t}_speedup_p10_p90"] = [round(r.ratio_spread.p10, 3), round(r.ratio_spread.p90, 3)]
                row[f"onnx_{t}_share_of_eager"] = round(r.ratio / eager_speedup, 3)
            if len(args.tags) == 2:  # the two graphs against each other, paired per round
                a, b = (list(timed[f"onnx_{t}"].throughput.values) for t in args.tags)
                row[f"{args.tags[1]}_over_{args.tags[0]}"] = round(statistics.median(
                    y / z for y, z in zip(b, a, strict=True)), 3)
            row["rounds"] = timed["onnx_base"].rounds
            print(f"[time] {arch}: " + json.dumps({k: v for k, v in row.items() if k != "point"}), flush=True)
        result["rows"][arch] = row
    result["load_average_after"] = os.getloadavg()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

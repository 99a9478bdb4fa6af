"""Where an exported converted model spends its time in onnxruntime, against its exported base: ``bench_export``'s
rows, profiled.

For each row asked (``--rows ARCH:RECIPE``, ``benchmarks.common.EXPORT_ROWS``) the converted model at the row's
point (:func:`benchmarks.common.build_row`: random weights, exits forced or the GMACs share reached) and its
base are exported to ONNX and run under onnxruntime's profiler (default graph optimisations, as deployed; threads not
spinning, as in the benchmark) on the benchmark's first ``--batch`` images. Kernel time is summed per op type, in
units of the base graph's kernel time per run, for both graphs, so a row reads: the converted graph spends X of a
base run in ``MatMul`` where the base spends Y, and Z in ops the base does not run at all (the gathers and scatters
of its sub-batches, its reuse). The eager pair is timed on the same images in the same rounds, so the row's eager
speed-up is beside it.

Usage (from the repo root; 2 threads, like ``bench_export``)::

    python -m benchmarks.studies.profile_onnx --rows swin_tiny_patch4_window7_224:dvt deit_small_patch16_224:cfvit \
        --dir /tmp/onnx-profile --json benchmarks/results/checks/DATE-onnx-profile/profile.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

import vitconvert
from benchmarks.common import EXPORT_ROWS, build_row, machine_block, onnx_base, paired_ratio
from vitconvert.timing import compare


def profile(path: Path, x: np.ndarray, threads: int, runs: int, spinning: bool = False) -> dict[str, Any]:
    """Kernel time per op type (ms per run) over ``runs`` profiled runs after one warm-up, and the runs' median.
    ``spinning``: onnxruntime's default, threads spinning after a run (off here, as in ``bench_export``)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    sess.run(["logits"], {"pixel_values": x})
    for _ in range(runs):
        sess.run(["logits"], {"pixel_values": x})
    trace = Path(sess.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    per_op: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    runs_us = []
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
            calls[e["args"]["op_name"]] += 1
        elif e.get("cat") == "Session" and e["name"] == "model_run":
            runs_us.append(e["dur"])
    n = runs + 1
    return {"run_ms_median": statistics.median(runs_us[1:]) / 1e3,
            "kernel_ms_per_run": sum(per_op.values()) / n / 1e3,
            "op_ms_per_run": {k: v / n / 1e3 for k, v in per_op.most_common()},
            "calls_per_run": {k: calls[k] // n for k, _ in per_op.most_common()}}



def compare_ops(converted: dict[str, Any], base: dict[str, Any], top: int = 12) -> list[dict[str, Any]]:
    """Op types by the converted graph's time, each in units of the base graph's kernel time per run, beside the
    base's own time in that op type."""
    unit = base["kernel_ms_per_run"]
    ops = sorted(set(converted["op_ms_per_run"]) | set(base["op_ms_per_run"]),
                 key=lambda k: -converted["op_ms_per_run"].get(k, 0.0))
    return [{"op": k, "converted": round(converted["op_ms_per_run"].get(k, 0.0) / unit, 3),
             "base": round(base["op_ms_per_run"].get(k, 0.0) / unit, 3),
             "converted_calls": converted["calls_per_run"].get(k, 0), "base_calls": base["calls_per_run"].get(k, 0)}
            for k in ops[:top]]


def profile_row(arch: str, recipe: str, batch: int, threads: int, runs: int, rounds: int, folder: Path
                ) -> dict[str, Any]:
    shares = next(s for a, r, s in EXPORT_ROWS if (a, r) == (arch, recipe))
    model, images, fields = build_row(arch, recipe, shares, batch)
    model.eval()
    base = model.build_base().eval()
    converted_path = vitconvert.export(model, folder / f"{arch}-{recipe}.onnx", overwrite=True)
    base_path = folder / f"{arch}.onnx"
    if not base_path.exists():
        onnx_base(base, model.anatomy.img_size, base_path)
    x = images[:batch]
    with torch.no_grad():
        gmacs_share = float(model.forward_dynamic(x).gmacs.mean()) / model.base_gmacs
    timed = compare({"eager_converted": model, "eager_base": base}, x, reference="eager_base", min_rounds=rounds)
    prof = {"converted": profile(converted_path, x.numpy(), threads, runs),
            "base": profile(base_path, x.numpy(), threads, runs)}
    row = {"method": recipe, "backbone": arch, "batch": batch, **fields, "gmacs_share": round(gmacs_share, 3),
           "eager_speedup": round(paired_ratio(list(timed["eager_converted"].throughput.values),
                                               list(timed["eager_base"].throughput.values)), 3),
           "onnx_run_ratio": round(prof["base"]["run_ms_median"] / prof["converted"]["run_ms_median"], 3),
           "kernel_time_vs_base": round(prof["converted"]["kernel_ms_per_run"] / prof["base"]["kernel_ms_per_run"], 3),
           "ops": compare_ops(prof["converted"], prof["base"]), "profiles": prof}
    print(f"[profile] {recipe} {arch} b{batch}: GMACs {gmacs_share:.0%}, eager x{row['eager_speedup']:.2f}, ONNX "
          f"(profiled runs) x{row['onnx_run_ratio']:.2f}, kernel time {row['kernel_time_vs_base']:.2f} of the base's",
          flush=True)
    for op in row["ops"]:
        print(f"    {op['op']:<24} {op['converted']:6.3f} ({op['converted_calls']:4d} calls)   base "
              f"{op['base']:6.3f} ({op['base_calls']:4d} calls)", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", required=True, help="ARCH:RECIPE rows of bench_export")
    parser.add_argument("--dir", type=Path, required=True, help="where the ONNX files are written")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.dir.mkdir(parents=True, exist_ok=True)
    wanted = [tuple(r.split(":", 1)) for r in args.rows]
    known = {(a, r) for a, r, _ in EXPORT_ROWS}
    for row in wanted:
        if row not in known:
            print(f"error: {':'.join(row)} is not a bench_export row; rows: "
                  f"{', '.join(f'{a}:{r}' for a, r in sorted(known))}", file=sys.stderr)
            return 2
    result: dict[str, Any] = {"machine": machine_block(), "threads": args.threads, "batch": args.batch,
                              "runs": args.runs, "load_average_before": os.getloadavg(), "rows": []}
    for arch, recipe in wanted:
        result["rows"].append(profile_row(arch, recipe, args.batch, args.threads, args.runs, args.rounds, args.dir))
    result["load_average_after"] = os.getloadavg()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

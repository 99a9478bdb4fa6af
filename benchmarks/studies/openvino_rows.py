"""OpenVINO on the same ONNX files: does an exported dynamic model run there, with the eager model's logits and
decisions, and does its speed-up over the base survive?

For each selected row of ``bench_export`` (:data:`benchmarks.common.EXPORT_ROWS`: random weights, exits forced on the
timed images, or DGE's knob set for a GMACs share), the converted model is exported with :func:`vitconvert.export`
and its base with the same exporter; both files are compiled by OpenVINO's CPU plugin (``INFERENCE_NUM_THREADS`` =
the threads, one stream, latency hint, fp32) and loaded by onnxruntime (no spinning), and all four are timed in the same
interleaved rounds (:func:`vitconvert.timing.compare`). Parity first: the OpenVINO outputs against the eager
``forward_dynamic`` (logits, exits). OpenVINO is not a dependency of vitconvert: ``pip install openvino`` to run this.

Usage (from the repo root)::

    python -m benchmarks.studies.openvino_rows --only cfvit dge --threads 2 \
        --out benchmarks/results/checks/DATE-openvino
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    EXPORT_ROWS,
    build_row,
    export_pair,
    machine_block,
    ort_logits,
    ort_session,
    paired_ratio,
)
from vitconvert.timing import compare


def openvino_model(path: Path, threads: int) -> Any:
    """``path`` compiled by OpenVINO's CPU plugin with ``threads`` inference threads, one stream, in fp32."""
    import openvino as ov

    # fp32: on a CPU with bf16 instructions the plugin's default precision is bf16 (logits 1.0 off, other exits)
    return ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                                                      "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"})


def openvino_run(compiled: Any, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Every output of ``compiled`` on the images ``x``, by name."""
    request = compiled.create_infer_request()
    request.infer({"pixel_values": x.numpy()})
    return {port.get_any_name(): request.get_tensor(port).data.copy() for port in compiled.outputs}


def measure(arch: str, recipe: str, shares: list[float] | float, batches: list[int], threads: int,
            rounds: dict[int, int], folder: Path) -> list[dict[str, Any]]:
    model, images, fields = build_row(arch, recipe, shares, max(batches))
    _, converted_path, base_path = export_pair(model, folder, arch)
    ov_conv, ov_base = openvino_model(converted_path, threads), openvino_model(base_path, threads)
    ort_conv, ort_base = ort_session(converted_path, threads), ort_session(base_path, threads)
    rows = []
    for batch in batches:
        x = images[:batch]
        with torch.no_grad():
            eager = model.forward_dynamic(x)
        got = openvino_run(ov_conv, x)
        agree = {"max_abs_logit_difference": float(np.abs(got["logits"] - eager.logits.numpy()).max()),
                 "same_exits": None if eager.stage is None else bool((got["exit"] == eager.stage.numpy()).all())}
        timed = compare({
            "openvino_converted": lambda t: openvino_run(ov_conv, t)["logits"],
            "openvino_base": lambda t: openvino_run(ov_base, t)["logits"],
            "onnx_converted": ort_logits(ort_conv),
            "onnx_base": ort_logits(ort_base),
        }, x, reference="openvino_base", min_rounds=rounds[batch])
        throughput = {k: list(t.throughput.values) for k, t in timed.items()}
        row = {"method": recipe, "backbone": arch, "batch": batch, "threads": threads, **fields,
               "gmacs_share": round(float(eager.gmacs.mean()) / model.base_gmacs, 3),
               "exit_shares": {} if eager.stage is None else {
                   str(k): float((eager.stage == k).float().mean()) for k in range(int(eager.stage.max()) + 1)},
               "openvino_speedup": round(timed["openvino_converted"].ratio, 3),
               "openvino_speedup_p10_p90": [round(timed["openvino_converted"].ratio_spread.p10, 3),
                                            round(timed["openvino_converted"].ratio_spread.p90, 3)],
               "onnxruntime_speedup": round(paired_ratio(throughput["onnx_converted"], throughput["onnx_base"]), 3),
               "openvino_base_vs_onnxruntime_base": round(paired_ratio(throughput["openvino_base"],
                                                                       throughput["onnx_base"]), 3),
               "images_per_s": {k: round(t.images_per_s, 2) for k, t in timed.items()},
               "rounds": timed["openvino_base"].rounds, "agree": agree}
        print(f"[openvino] {recipe} {arch} b{batch}: GMACs {row['gmacs_share']:.0%}, OpenVINO x"
              f"{row['openvino_speedup']:.2f} (onnxruntime x{row['onnxruntime_speedup']:.2f}), logits "
              f"{agree['max_abs_logit_difference']:.1g}, same exits {agree['same_exits']}", flush=True)
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | model | batch | GMACs share | exits | OpenVINO speed-up vs OpenVINO base | onnxruntime "
             "speed-up | OpenVINO base / onnxruntime base | logits diff | same exits |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        exits = " / ".join(f"{v:.0%}" for v in r["exit_shares"].values()) or "-"
        lo, hi = r["openvino_speedup_p10_p90"]
        lines.append(f"| {r['method']} | {r['backbone']} | {r['batch']} | {r['gmacs_share']:.0%} | {exits} | "
                     f"{r['openvino_speedup']:.2f}x ({lo:.2f}-{hi:.2f}) | {r['onnxruntime_speedup']:.2f}x | "
                     f"{r['openvino_base_vs_onnxruntime_base']:.2f} | "
                     f"{r['agree']['max_abs_logit_difference']:.1g} | {r['agree']['same_exits']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=None, help="these methods' rows of bench_export")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", nargs="+", type=int, default=[64, 1])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        import openvino
    except ImportError:
        print("this study needs OpenVINO: pip install openvino", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    rounds = {b: 6 if b > 1 else 30 for b in args.batches}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        for arch, recipe, shares in EXPORT_ROWS:
            if args.only is None or recipe in args.only:
                rows += measure(arch, recipe, shares, args.batches, args.threads, rounds, Path(folder))
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"name": "openvino_rows", "machine": machine_block(), "threads": args.threads,
              "openvino": openvino.__version__, "torch": torch.__version__,
              "protocol": "the same ONNX files in OpenVINO's CPU plugin (INFERENCE_NUM_THREADS = threads, one "
                          "stream, latency hint, INFERENCE_PRECISION_HINT f32) and onnxruntime (no spinning), all "
                          "four timed in the same interleaved rounds after warm-up; speed-ups are per-round paired "
                          "medians; random weights, exits forced on the timed images (DGE: coarsening set for the "
                          "GMACs share)",
              "rows": rows}
    (args.out / "openvino_rows.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "openvino_rows.md").write_text(markdown(rows))
    print(markdown(rows), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

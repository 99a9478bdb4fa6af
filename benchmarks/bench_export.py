"""Speed where the models are deployed: each exported converted model against its base exported the same way.

For each row the converted model is exported with :func:`vitconvert.export` (ONNX, the dynamic path inside: a
cascade's images leave at their exit) and the base timm model with the same exporter (dynamic batch); both run in
onnxruntime's CPU provider with the same threads. The two ONNX graphs and the two eager models are timed in the same
interleaved rounds (:func:`vitconvert.timing.compare`), so the ONNX speed-up and the eager one come from one run:
the target is an ONNX speed-up of at least 90% of the eager one at batch 64.

Rows (random weights: the exit thresholds are set on the timed batch of 64 images so that the stated shares exit,
"forced"; the batch-1 rows time its first image):
CF-ViT on DeiT-S (alpha 0.5, half the images refined) and DVT on DeiT-S, PVT-v2-b1 and Swin-T (exit shares 50% /
25% / 25%), at batch 64 and 1. DGE and FSLA are not exportable yet (``vitconvert export`` says why).

Writes ``benchmarks/results/export_speed.json`` and ``export_speed.md``. Usage (from the repo root; about 20
minutes on the 2-core CPU)::

    python -m benchmarks.bench_export [--threads 2] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

import vitconvert
from benchmarks.common import RESULTS, machine_block
from benchmarks.protocol import random_batch
from vitconvert.layers.cascade import thresholds_for_exit_shares
from vitconvert.timing import compare

ROWS = (
    ("deit_small_patch16_224", "cfvit", [0.5]),
    ("deit_small_patch16_224", "dvt", [0.5, 0.25]),
    ("pvt_v2_b1", "dvt", [0.5, 0.25]),
    ("swin_tiny_patch4_window7_224", "dvt", [0.5, 0.25]),
)


def force_exit_shares(model: vitconvert.ConvertedModel, x: torch.Tensor, shares: list[float]) -> dict[str, float]:
    """Thresholds under which ``shares`` of ``x`` exit at each stage but the last (simulated from one pass)."""
    with torch.no_grad():
        logits = list(model.collect(x).values())
    thresholds = thresholds_for_exit_shares(logits, shares)
    names = [k.name for k in model.operating_space().knobs if k.simulated]
    return model.set_operating_point(dict(zip(names, thresholds, strict=True)))


def onnx_base(model: torch.nn.Module, img_size: tuple[int, int], path: Path) -> None:
    """The base timm model through the same exporter, with a dynamic batch axis."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    with torch.no_grad():
        program = torch.onnx.export(model, (torch.zeros(2, 3, *img_size),), dynamo=True, verbose=False,
                                    dynamic_shapes=({0: batch},), input_names=["pixel_values"],
                                    output_names=["logits"])
    program.save(str(path))


def session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median of per-round ratios of two models' throughputs from the same rounds."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def measure_row(arch: str, recipe: str, shares: list[float], batches: list[int], threads: int, rounds: dict[int, int],
                folder: Path) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = vitconvert.apply(arch, recipe, pretrained=False)
    base = model.build_base()
    size = model.anatomy.img_size
    images = random_batch(size, max(batches), seed=2)
    point = force_exit_shares(model, images, shares)
    converted_path = vitconvert.export(model, folder / f"{arch}-{recipe}.onnx", overwrite=True)
    base_path = folder / f"{arch}.onnx"
    if not base_path.exists():
        onnx_base(base, size, base_path)
    conv_s, base_s = session(converted_path, threads), session(base_path, threads)
    outputs = [o.name for o in conv_s.get_outputs()]
    rows = []
    for batch in batches:
        x = images[:batch]
        with torch.no_grad():
            eager = model.forward_dynamic(x)
        got = dict(zip(outputs, conv_s.run(outputs, {"pixel_values": x.numpy()}), strict=True))
        agree = {"max_abs_logit_difference": float(np.abs(got["logits"] - eager.logits.numpy()).max()),
                 "same_exits": bool((got["exit"] == eager.stage.numpy()).all())}
        timed = compare({"onnx_converted": lambda t: conv_s.run(["logits"], {"pixel_values": t.numpy()}),
                         "onnx_base": lambda t: base_s.run(["logits"], {"pixel_values": t.numpy()}),
                         "eager_converted": model, "eager_base": base}, x, reference="onnx_base",
                        min_rounds=rounds[batch])
        onnx_speedup = timed["onnx_converted"].ratio
        eager_speedup = paired_ratio(list(timed["eager_converted"].throughput.values),
                                     list(timed["eager_base"].throughput.values))
        row = {"method": recipe, "backbone": arch, "batch": batch, "threads": threads,
               "point": point, "forced_exit_shares": shares,
               "exit_shares": {str(k): float((eager.stage == k).float().mean()) for k in range(len(shares) + 1)},
               "gmacs": float(eager.gmacs.mean()), "base_gmacs": model.base_gmacs,
               "onnx_speedup": round(onnx_speedup, 3),
               "onnx_speedup_p10_p90": [round(timed["onnx_converted"].ratio_spread.p10, 3),
                                        round(timed["onnx_converted"].ratio_spread.p90, 3)],
               "eager_speedup": round(eager_speedup, 3),
               "onnx_share_of_eager_speedup": round(onnx_speedup / eager_speedup, 3),
               "images_per_s": {k: round(t.images_per_s, 2) for k, t in timed.items()},
               "onnx_base_vs_eager_base": round(paired_ratio(list(timed["onnx_base"].throughput.values),
                                                             list(timed["eager_base"].throughput.values)), 3),
               "rounds": timed["onnx_base"].rounds, "agree": agree}
        print(f"[export] {recipe} {arch} b{batch}: GMACs {row['gmacs'] / row['base_gmacs']:.0%}, ONNX x"
              f"{onnx_speedup:.2f} (eager x{eager_speedup:.2f}), logits {agree['max_abs_logit_difference']:.1g}",
              flush=True)
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | backbone | batch | GMACs share | exits | ONNX speed-up vs ONNX base | eager speed-up | "
             "ONNX / eager |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        exits = " / ".join(f"{v:.0%}" for v in r["exit_shares"].values())
        lines.append(f"| {r['method']} | {r['backbone']} | {r['batch']} | {r['gmacs'] / r['base_gmacs']:.0%} | "
                     f"{exits} | {r['onnx_speedup']:.2f}x ({r['onnx_speedup_p10_p90'][0]:.2f}-"
                     f"{r['onnx_speedup_p10_p90'][1]:.2f}) | {r['eager_speedup']:.2f}x | "
                     f"{r['onnx_share_of_eager_speedup']:.0%} |")
    return "\n".join(lines) + "\n"


def run(quick: bool, out_dir: Path, threads: int | None = None) -> dict[str, Any]:
    """The suite's entry point; ``threads``: torch's and onnxruntime's (default: torch's current setting)."""
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    batches = [16, 1] if quick else [64, 1]
    rounds = {16: 3, 64: 6, 1: 10 if quick else 30}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        for arch, recipe, shares in ROWS[:1] if quick else ROWS:
            rows += measure_row(arch, recipe, shares, batches, threads, rounds, Path(folder))
    import onnxruntime

    result = {"name": "export_speed", "quick": quick, "machine": machine_block(), "threads": threads,
              "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
              "protocol": "ONNX graphs in onnxruntime's CPU provider (intra-op threads = torch threads) and the eager "
                          "models, all four timed in the same interleaved rounds after warm-up; speed-ups are medians "
                          "of per-round paired ratios; random weights, exit thresholds forced on the timed images",
              "rows": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "export_speed.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "export_speed.md").write_text(markdown(rows))
    print(markdown(rows), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    run(args.quick, args.out or (RESULTS / "quick" if args.quick else RESULTS), args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())

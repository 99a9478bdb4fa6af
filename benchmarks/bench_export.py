"""Speed where the models are deployed: each exported converted model against its base exported the same way.

For each row the converted model is exported with :func:`vitconvert.export` (ONNX, the dynamic path inside: a
cascade's images leave at their exit) and the base timm model with the same exporter (dynamic batch); both run in
onnxruntime's CPU provider with the same threads. The two ONNX graphs and the two eager models are timed in the same
interleaved rounds (:func:`vitconvert.timing.compare`), so the ONNX speed-up and the eager one come from one run:
the target is an ONNX speed-up of at least 90% of the eager one at batch 64.

Rows, trained first (each at batch 64, and at batch 1 as :data:`SINGLE_IMAGES` images each run alone, one after
another: a cascade's chosen in the proportions its exits take on the batch, :func:`single_image_mix`):

* fine-tuned CIFAR-10 models at their calibrated points (``--trained FOLDER ...``: model folders written by
  ``benchmarks.cifar10_short_recipe --work DIR``, i.e. ``DIR/finetuned`` after calibration), timed on validation
  images;
* the project's CIFAR-10 ViT (``benchmarks/checkpoints/cifar10-vit``) converted with CF-ViT and DVT and calibrated
  for 50% of its GMACs on held-out training images (not fine-tuned), timed on validation images;
* random weights, the exit thresholds set on the timed batch of 64 images so that the stated shares exit ("forced"):
  CF-ViT on DeiT-S, PVT-v2-b1 and Swin-T (half the images refined, at the recipe's alpha) and DVT on the same three
  (exit shares 50% / 25% / 25%);
* random weights, no exits: FSLA augment on Swin-T at cluster size 49 (the window area: ``bench_fsla``'s point; every
  image runs the same clustered path, and the sub-layers add compute, so both speed-ups are below 1 and the target
  is their ratio) and FSLA replace on DeiT-S (the recipe's blocks). FSLA's output projections start at zero, which
  would make its logits the base's whatever the clusters; they get random weights here, so the parity check sees
  the clustering;
* random weights: DGE on DeiT-S, PVT-v2-b1 and Swin-T with random routers (fresh ones send every region to the
  finest grain), ``coarsening`` set by bisection so that the timed images' mean GMACs come near 50% / 60% / 60% of
  the base's.

``--only fsla dge`` re-measures those methods' rows alone and keeps the others of the result file; ``--trained DIR
--only`` measures the fine-tuned folder alone and keeps every other row.

Writes ``benchmarks/results/export_speed.json`` and ``export_speed.md``. Usage (from the repo root; about 50
minutes on the 2-core CPU)::

    python -m benchmarks.bench_export [--threads 2] [--quick] [--no-cifar] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

import vitconvert
from benchmarks.common import (
    EXPORT_ROWS,
    RESULTS,
    build_row,
    export_pair,
    machine_block,
    ort_logits,
    ort_session,
    paired_ratio,
)
from vitconvert.deploy import graph_knobs
from vitconvert.timing import compare, machine_info


def measure_row(arch: str, recipe: str, shares: list[float] | float, batches: list[int], threads: int,
                rounds: dict[int, int], folder: Path) -> list[dict[str, Any]]:
    """One benchmark row (:func:`build_row`), measured at each batch size."""
    model, images, fields = build_row(arch, recipe, shares, max(batches))
    return measure(model, images, batches, threads, rounds, folder, arch, fields)


def cifar_rows(batches: list[int], threads: int, rounds: dict[int, int], folder: Path, max_images: int,
               only: list[str] | None = None) -> list[dict[str, Any]]:
    """The CIFAR-10 ViT converted with CF-ViT and DVT, calibrated for 50% of its GMACs on held-out training images
    (the recipes' holdout; no fine-tune), then exported at that point and timed on the benchmark's validation images
    (``benchmarks.cifar10``: the last 100 training files of each class)."""
    from benchmarks import cifar10
    from benchmarks.common import CHECKPOINTS
    from vitconvert.data import spread_batch

    recipes = [r for r in ("cfvit", "dvt") if only is None or r in only]
    if not recipes:
        return []
    _, val = cifar10.split_files()
    rows = []
    for recipe in recipes:
        model = vitconvert.apply(f"local-dir:{CHECKPOINTS / 'cifar10-vit'}", recipe)
        record = vitconvert.calibrate(model, str(cifar10.resolve_root()), budget="50%", max_images=max_images,
                                      progress=False, check_speed=False)
        images = spread_batch(val, model, max(batches))
        fields = {"model": "cifar10-vit (calibrated at 50% GMACs, not fine-tuned)", "point": model.operating_point,
                  "gates": "calibrated", "calibration_images": record.get("images")}
        rows += measure(model, images, batches, threads, rounds, folder, "cifar10-vit", fields)
    return rows


def trained_rows(folders: list[Path], batches: list[int], threads: int, rounds: dict[int, int], folder: Path
                 ) -> list[dict[str, Any]]:
    """Fine-tuned CIFAR-10 models at the operating point their calibration stored, timed on validation images."""
    from benchmarks import cifar10
    from vitconvert.data import spread_batch

    _, val = cifar10.split_files()
    rows = []
    for path in folders:
        model = vitconvert.load(path)
        if not model.finetuned or not model.curve:
            raise SystemExit(f"--trained {path}: not a fine-tuned and calibrated model folder")
        images = spread_batch(val, model, max(batches))
        name = Path(model.base_spec.source or model.base_spec.architecture).name
        fields = {"model": f"{name} (fine-tuned, calibrated)", "point": model.operating_point, "gates": "trained",
                  "folder": path.name, "recipe_settings": model.recipe.model_dump(mode="json").get("model")}
        rows += measure(model, images, batches, threads, rounds, folder, f"trained-{len(rows)}", fields)
    return rows


# Batch 1: this many images, each run alone, one after another in every round (a cascade's chosen by their exits).
SINGLE_IMAGES = 8


def single_image_mix(stage: torch.Tensor | None, count: int = SINGLE_IMAGES) -> torch.Tensor:
    """Indices of ``count`` of the batch's images for the one-image-at-a-time rows: a cascade's in the proportions
    its exits take on the whole batch (``stage``: each image's exit; largest remainders round the counts), the first
    of each exit; without exits the first ``count``. One image alone would time one exit only (the first image of a
    batch may run every stage)."""
    if stage is None:
        return torch.arange(count)
    stages = int(stage.max()) + 1
    shares = torch.stack([(stage == k).float().mean() for k in range(stages)]) * count
    counts = shares.floor().long()
    for k in torch.argsort(shares - counts, descending=True, stable=True)[: count - int(counts.sum())]:
        counts[k] += 1
    picked = [(stage == k).nonzero().squeeze(1)[: int(n)] for k, n in enumerate(counts)]
    return torch.cat(picked).sort().values


def one_at_a_time(fn: Any) -> Any:
    """``fn`` on each image of a batch alone, one after another (the batch-1 rows)."""
    return lambda t: [fn(t[i:i + 1]) for i in range(t.shape[0])]


def measure(model: vitconvert.ConvertedModel, images: torch.Tensor, batches: list[int], threads: int,
            rounds: dict[int, int], folder: Path, tag: str, fields: dict[str, Any]) -> list[dict[str, Any]]:
    """Export ``model`` and its base, time both graphs and both eager models at each batch size: the first
    ``batch`` of ``images``, and at batch 1 :data:`SINGLE_IMAGES` of them (:func:`single_image_mix`), each alone."""
    recipe, arch = model.method, model.base_spec.architecture
    base, converted_path, base_path = export_pair(model, folder, tag)
    conv_s, base_s = ort_session(converted_path, threads), ort_session(base_path, threads)
    outputs = [o.name for o in conv_s.get_outputs()]
    rows = []
    cpu = machine_info()["cpu"]  # rows of several runs share the file (--only): each says where it ran
    with torch.no_grad():
        whole = model.forward_dynamic(images[:max(batches)])
    for batch in batches:
        x = images[:batch] if batch > 1 else images[single_image_mix(whole.stage)]
        split = [x] if batch > 1 else list(x.split(1))
        if batch == max(batches):  # the pass above
            parts = [whole]
        else:
            with torch.no_grad():
                parts = [model.forward_dynamic(t) for t in split]
        got_parts = [dict(zip(outputs, conv_s.run(outputs, {"pixel_values": t.numpy()}), strict=True)) for t in split]
        eager_logits = torch.cat([e.logits for e in parts]).numpy()
        stage = None if parts[0].stage is None else torch.cat([e.stage for e in parts])
        gmacs = torch.cat([e.gmacs for e in parts])
        got = {k: np.concatenate([g[k] for g in got_parts]) for k in outputs}
        agree = {"max_abs_logit_difference": float(np.abs(got["logits"] - eager_logits).max()),
                 "same_exits": None if stage is None else bool((got["exit"] == stage.numpy()).all())}
        fns = {"onnx_converted": ort_logits(conv_s), "onnx_base": ort_logits(base_s), "eager_converted": model,
               "eager_base": base}
        if batch == 1:
            fns = {name: one_at_a_time(fn) for name, fn in fns.items()}
        timed = compare(fns, x, reference="onnx_base", min_rounds=rounds[batch])
        onnx_speedup = timed["onnx_converted"].ratio
        eager_speedup = paired_ratio(list(timed["eager_converted"].throughput.values),
                                     list(timed["eager_base"].throughput.values))
        stages = len(graph_knobs(model)) + 1  # a cascade: one threshold per stage but the last
        row = {"method": recipe, "backbone": arch, "batch": batch, "threads": threads, **fields,
               "measured": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu,
               "images": x.shape[0], "one_at_a_time": batch == 1,
               "exit_shares": {} if stage is None else {str(k): float((stage == k).float().mean())
                                                        for k in range(stages)},
               "gmacs": float(gmacs.mean()), "base_gmacs": model.base_gmacs,
               "onnx_speedup": round(onnx_speedup, 3),
               "onnx_speedup_p10_p90": [round(timed["onnx_converted"].ratio_spread.p10, 3),
                                        round(timed["onnx_converted"].ratio_spread.p90, 3)],
               "eager_speedup": round(eager_speedup, 3),
               "onnx_share_of_eager_speedup": round(onnx_speedup / eager_speedup, 3),
               "images_per_s": {k: round(t.images_per_s, 2) for k, t in timed.items()},
               "onnx_base_vs_eager_base": round(paired_ratio(list(timed["onnx_base"].throughput.values),
                                                             list(timed["eager_base"].throughput.values)), 3),
               "rounds": timed["onnx_base"].rounds, "agree": agree}
        print(f"[export] {recipe} {fields['model']} b{batch}: GMACs {row['gmacs'] / row['base_gmacs']:.0%}, ONNX x"
              f"{onnx_speedup:.2f} (eager x{eager_speedup:.2f}), logits {agree['max_abs_logit_difference']:.1g}",
              flush=True)
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table; with a CPU column when the rows were measured on more than one machine (``--only`` re-runs)."""
    by_cpu = len({r.get("cpu") for r in rows}) > 1
    lines = ["| method | model | batch | GMACs share | exits | ONNX speed-up vs ONNX base | eager speed-up | "
             "ONNX / eager |" + (" CPU |" if by_cpu else ""), "|---|---|---|---|---|---|---|---|" + ("---|" * by_cpu)]
    for r in rows:
        exits = " / ".join(f"{v:.0%}" for v in r["exit_shares"].values()) or "-"  # no exits (FSLA)
        model = r["model"].replace(" (random weights)", "")
        cpu = f" {r.get('cpu') or 'not recorded'} |" if by_cpu else ""
        batch = f"1 ({r['images']} alone)" if r.get("one_at_a_time") else str(r["batch"])
        lines.append(f"| {r['method']} | {model} | {batch} | {r['gmacs'] / r['base_gmacs']:.0%} | "
                     f"{exits} | {r['onnx_speedup']:.2f}x ({r['onnx_speedup_p10_p90'][0]:.2f}-"
                     f"{r['onnx_speedup_p10_p90'][1]:.2f}) | {r['eager_speedup']:.2f}x | "
                     f"{r['onnx_share_of_eager_speedup']:.0%} |{cpu}")
    return "\n".join(lines) + "\n"


def run(quick: bool, out_dir: Path, threads: int | None = None, cifar: bool = True, cifar_images: int = 2000,
        only: list[str] | None = None, trained: list[Path] | None = None) -> dict[str, Any]:
    """The suite's entry point; ``threads``: torch's and onnxruntime's (default: torch's current setting);
    ``cifar``: also the CIFAR-10 rows (needs the CIFAR-10 training folder, see ``benchmarks.cifar10``); ``only``:
    measure these methods' rows and keep the other rows of the existing result file (rows of one run are
    comparable with each other; the file records each row's own date; ``[]``: none); ``trained``: fine-tuned model
    folders measured first, at their calibrated points (with ``only``, they replace the file's fine-tuned rows)."""
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    batches = [16, 1] if quick else [64, 1]
    rounds = {16: 3, 64: 6, 1: 4 if quick else 10}  # a batch-1 round runs SINGLE_IMAGES images
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        fine_tuned = trained_rows(trained, batches, threads, rounds, Path(folder)) if trained else []
        if cifar and not quick:  # trained-base rows first
            rows += cifar_rows(batches, threads, rounds, Path(folder), max_images=cifar_images, only=only)
        for arch, recipe, shares in EXPORT_ROWS[:1] if quick else EXPORT_ROWS:
            if only is None or recipe in only:
                rows += measure_row(arch, recipe, shares, batches, threads, rounds, Path(folder))
    out_json = out_dir / "export_speed.json"
    if only is not None and out_json.exists():  # keep the rows of the methods not re-measured, in their order
        kept = [r for r in json.loads(out_json.read_text())["rows"] if r["method"] not in only
                and not (fine_tuned and r.get("gates") == "trained")]  # new fine-tuned rows replace the old ones
        rows = kept + rows
    rows = fine_tuned + rows
    import onnxruntime

    result = {"name": "export_speed", "quick": quick, "machine": machine_block(), "threads": threads,
              "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
              "protocol": ("ONNX graphs in onnxruntime's CPU provider (intra-op threads = torch threads, no spinning "
                           "after a run: session.intra_op.allow_spinning 0) and the eager models, all four timed in "
                           "the same interleaved rounds after warm-up; speed-ups are medians of per-round paired "
                           "ratios. Batch 1: 8 images each run alone in every round, a cascade's chosen in the "
                           "proportions of its exits on the batch of 64. Fine-tuned rows: CIFAR-10 models after the "
                           "short recipe, at their calibrated points, timed on validation images. CIFAR-10 rows: the "
                           "project's CIFAR-10 ViT, calibrated at 50% GMACs on held-out training images (not "
                           "fine-tuned), timed on validation images; other rows: random weights, exit thresholds "
                           "forced on the timed images"),
              "rows": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "export_speed.md").write_text(markdown(rows))
    print(markdown(rows), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--no-cifar", action="store_true", help="skip the CIFAR-10 rows (no data needed)")
    parser.add_argument("--cifar-images", type=int, default=2000, help="held-out images calibration uses")
    parser.add_argument("--only", nargs="*", default=None,
                        help="re-measure these methods' rows only (none given: only --trained's)")
    parser.add_argument("--trained", nargs="+", type=Path, default=None, metavar="FOLDER",
                        help="fine-tuned, calibrated CIFAR-10 model folders to measure first")
    args = parser.parse_args(argv)
    run(args.quick, args.out or (RESULTS / "quick" if args.quick else RESULTS), args.threads, cifar=not args.no_cifar,
        cifar_images=args.cifar_images, only=args.only, trained=args.trained)
    return 0


if __name__ == "__main__":
    sys.exit(main())

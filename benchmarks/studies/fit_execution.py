"""Fit DGE's execution cost model (:data:`vitconvert.methods.dge.execution.EXECUTION_COSTS`) on this machine.

For DGE blocks of several shapes (the CIFAR-10 ViT and PVT-v2 bases, DeiT-S and PVT-v2-b1 at 224 px), batch
sizes and gate mixes, every dynamic block is timed on its sparse and on its dense path (forward hooks, median
of repetitions), and :func:`vitconvert.methods.dge.path_terms` gives what each path does (matrix-product MACs,
elements moved, convolution MACs, operators). The time *difference* sparse - dense is fitted by non-negative
least squares on the term differences (what both paths do alike cancels), and the weights are reported
relative to one matrix-product MAC: the ``move``, ``conv`` and ``op`` constants (``op`` per thread). It also
reports how often the fitted and the shipped constants pick the faster path, and the time lost when not.

Writes ``benchmarks/results/execution_fit_t<threads>.json``. ``--install RESULT`` copies a fit's constants into the
package (``vitconvert/methods/dge/execution_costs.json``, the ``conv_mlp`` kind; the ``plain`` kind's hand-set entry
is kept, with its reason), which is the only way they change. Usage::

    flock /work/heavy.lock python -m benchmarks.studies.fit_execution [--threads 1]
    python -m benchmarks.studies.fit_execution --install benchmarks/results/execution_fit_t2.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

import vitconvert
from benchmarks.common import RESULTS, force_ratio, machine_block
from benchmarks.studies.dge_hooks import timed_blocks
from vitconvert.methods.dge import DGE, EXECUTION_COSTS, DGEBlock, execution, path_terms

TERMS = ("mm", "rows", "move", "conv", "ops")
# (model source, batch sizes, forced ratios); CIFAR bases are local folders.
CONFIGS = (
    ("local-dir:benchmarks/checkpoints/cifar10-vit", (64, 8, 1), (0.5, 0.75, 0.95)),
    ("local-dir:benchmarks/checkpoints/cifar10-pvt64", (64, 8, 1), (0.6, 0.8, 0.95)),
    ("deit_small_patch16_224", (16, 1), (0.5, 0.9)),
    ("pvt_v2_b1", (8, 1), (0.6, 0.9)),
)


def measure_blocks(model: DGE, x: torch.Tensor, reps: int) -> list[dict[str, Any]]:
    """Per dynamic block: the terms of both paths (from the auto pass) and their median wall seconds."""
    terms: dict[int, dict[str, dict[str, float]]] = {}

    def record_terms(blk: DGEBlock, args: tuple[Any, ...], path: str) -> None:
        terms[blk.index] = path_terms(blk._costs, *args)

    try:
        with timed_blocks(model, record_terms) as timer, torch.inference_mode():
            for r in range(reps + 1):
                for execution in ("sparse", "dense"):
                    timer.label = execution if r else "warmup"
                    model.execution = execution
                    model(x)
    finally:
        model.execution = "auto"
    med = {e: timer.median(e) for e in ("sparse", "dense")}
    return [{"block": blk.index, "terms": terms[blk.index], "seconds": {e: med[e][blk.index] for e in med}}
            for blk in timer.blocks]


def nnls(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares for a handful of columns: the best fit over every subset of columns whose
    unconstrained solution is non-negative."""
    best, best_err = np.zeros(a.shape[1]), float(np.sum(y**2))
    for k in range(1, a.shape[1] + 1):
        for cols in itertools.combinations(range(a.shape[1]), k):
            sol, *_ = np.linalg.lstsq(a[:, cols], y, rcond=None)
            if (sol >= 0).all():
                err = float(np.sum((a[:, cols] @ sol - y) ** 2))
                if err < best_err:
                    best, best_err = np.zeros(a.shape[1]), err
                    best[list(cols)] = sol
    return best


def choice_quality(samples: list[dict[str, Any]], w: dict[str, float], threads: int) -> dict[str, Any]:
    """How often weights ``w`` pick the faster path, and the time lost over all blocks when they do not."""
    right, lost, best = 0, 0.0, 0.0
    for s in samples:
        est = {p: sum(w[k] * s["terms"][p][k] * (threads if k == "ops" else 1) for k in TERMS) for p in s["terms"]}
        pick = min(est, key=lambda p: est[p])
        fast = min(s["seconds"], key=lambda p: s["seconds"][p])
        right += pick == fast
        lost += s["seconds"][pick] - s["seconds"][fast]
        best += s["seconds"][fast]
    return {"right": right, "of": len(samples), "seconds_lost": round(lost, 4), "seconds_best": round(best, 4)}


def run(out_dir: Path, threads: int, reps: int, quick: bool = False) -> dict[str, Any]:
    torch.set_num_threads(threads)
    samples: list[dict[str, Any]] = []
    for src, batches, rhos in CONFIGS[:1] if quick else CONFIGS:
        torch.manual_seed(0)
        model = (vitconvert.apply(src, "dge") if src.startswith("local-dir:")
                 else vitconvert.apply(src, "dge", pretrained=False)).eval()
        assert isinstance(model, DGE)
        for b in batches[-1:] if quick else batches:
            x = torch.randn(b, 3, *model.anatomy.img_size, generator=torch.Generator().manual_seed(0))
            for rho in rhos:
                force_ratio(model, rho, "random", seed=0)
                for s in measure_blocks(model, x, reps):
                    samples.append({"model": src, "batch": b, "rho": rho, **s})
                print(f"[fit] {src} b{b} rho {rho}: {len(samples)} samples", flush=True)
    a = np.array([[s["terms"]["sparse"][k] - s["terms"]["dense"][k] for k in TERMS] for s in samples])
    y = np.array([s["seconds"]["sparse"] - s["seconds"]["dense"] for s in samples])
    scale = np.abs(a).max(0)
    scale[scale == 0] = 1
    coef = nnls(a / scale, y)
    coef = coef / scale
    mm = coef[0] if coef[0] > 0 else float("nan")
    fitted = {"sparse_rows": float(coef[1] / mm), "move": float(coef[2] / mm), "conv": float(coef[3] / mm),
              "op": float(coef[4] / mm / threads)}
    w_fit = {"mm": 1.0, "rows": fitted["sparse_rows"], "move": fitted["move"], "conv": fitted["conv"],
             "ops": fitted["op"]}
    shipped = {kind: {"mm": 1.0, "rows": c.sparse_rows, "move": c.move, "conv": c.conv, "ops": c.op}
               for kind, c in EXECUTION_COSTS["cpu"].items()}
    result = {
        "name": "execution_fit", "machine": machine_block(), "threads": threads, "reps": reps,
        "seconds_per_mm_mac": float(coef[0]), "fitted": fitted,
        "shipped": shipped,
        "choices_fitted": choice_quality(samples, w_fit, threads),
        "choices_shipped": {kind: choice_quality([s for s in samples if ("pvt" in s["model"]) == (kind == "conv_mlp")],
                                                 w, threads) for kind, w in shipped.items()},
        "samples": samples,
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("samples", "machine")}, indent=1), flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"execution_fit_t{threads}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


PACKAGE_COSTS = Path(execution.__file__).with_name("execution_costs.json")


def install(result: Path, target: Path = PACKAGE_COSTS) -> dict[str, Any]:
    """Copy the fitted constants of ``result`` (this script's JSON) into the package's ``conv_mlp`` entry."""
    fit = json.loads(result.read_text())
    data = json.loads(target.read_text())
    fitted, machine, chosen = fit["fitted"], fit["machine"], fit["choices_fitted"]
    data["cpu"]["conv_mlp"] = {
        "move": fitted["move"], "conv": fitted["conv"], "op": fitted["op"],
        "sparse_rows": fitted.get("sparse_rows", 1.0),
        "source": f"fitted: benchmarks/results/{result.name} ({machine['date']}, {machine['cpu']}, {fit['threads']} "
                  f"threads; picks the faster path in {chosen['right']} of {chosen['of']} block timings, "
                  f"{chosen['seconds_lost']} s lost of {chosen['seconds_best']} s)",
    }
    target.write_text(json.dumps(data, indent=1) + "\n")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--install", type=Path, metavar="RESULT", help="copy this fit's constants into the package")
    args = parser.parse_args(argv)
    if args.install is not None:
        install(args.install)
        print(f"constants of {args.install} -> {PACKAGE_COSTS}")
        return 0
    run(args.out, args.threads, args.reps, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the small-batch rule costs: a DGE model whose rule applies runs the base model's computation, so at batch 1
it should run at the base's speed. This times the two (and the base against itself, the noise floor) in many
interleaved rounds at batch 1, for the trained CIFAR-10 DGE ViT (when its folder is there) and DGE on
``cifar10-pvt64``.

Batch-1 forwards of these models take 4-10 ms, so ``bench_wallclock``'s batch-1 rows (20 rounds of 8 images at two
threads) scatter by +-10%; this is the finer measurement of the same path: one thread, 1,500 paired rounds
(:func:`vitconvert.timing.compare`), medians. (The committed ``small_batch_overhead.json`` was measured with a
fixed order in every round and ``speed_vs_base`` a ratio of medians; now the order rotates and it is the median of
per-round paired ratios.)

Writes ``benchmarks/results/small_batch_overhead.json``. Usage::

    OMP_NUM_THREADS=1 taskset -c 0 python -m benchmarks.studies.small_batch_overhead [--trained DIR] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

import vitconvert
from benchmarks.common import CHECKPOINTS, RESULTS, TRAINED, machine_block
from vitconvert.methods.base import ConvertedModel, SmallBatchRule
from vitconvert.timing import compare


def paired_medians(models: dict[str, Any], x: torch.Tensor, rounds: int, warmup: int = 50) -> dict[str, Any]:
    """Median ms of each model and its speed relative to ``base`` (median of the per-round paired ratios)."""
    res = compare(models, x, reference="base", warmup=warmup, min_rounds=rounds)
    return {name: {"median_ms": round(t.latency_ms.median, 4), "speed_vs_base": round(t.ratio, 4)}
            for name, t in res.items()}


def measure(name: str, model: ConvertedModel, rounds: int) -> dict[str, Any]:
    base = model.build_base().eval()
    model.eval().small_batch = SmallBatchRule(2, "cpu")
    x = torch.randn(1, 3, *model.anatomy.img_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        same = torch.equal(model(x), model.forward_full_compute(x).logits)
    view = model.__dict__["_plain"]  # the base computation the rule runs, without the converted model's dispatch
    result = paired_medians({"base": base, "rule": model, "full_compute_view": view, "base_again": base}, x, rounds)
    print(f"[small-batch] {name}: {result}", flush=True)
    return {"model": name, "point": dict(model.operating_point), "rule_runs_full_compute": same, "timings": result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trained", type=Path, default=TRAINED, help="folder of the trained model folders")
    parser.add_argument("--rounds", type=int, default=1500)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    models: list[tuple[str, ConvertedModel]] = []
    trained = args.trained / "dge_vit" / "finetuned"
    if (trained / "config.json").is_file():
        models.append(("dge_vit (trained, calibrated)", vitconvert.load(trained)))
    models.append(("cifar10-pvt64 + dge (converted)",
                   vitconvert.apply(f"local-dir:{CHECKPOINTS / 'cifar10-pvt64'}", "dge")))
    start = machine_block()
    rows = [measure(name, model, args.rounds) for name, model in models]
    result = {"name": "small_batch_overhead", "machine": start, "machine_end": machine_block(),
              "threads": torch.get_num_threads(), "rounds": args.rounds, "batch": 1,
              "note": "base, DGE under the small-batch rule (full compute: the base model as timm built it, sharing "
                      "the weights), that view of the base called directly, and the base again (the noise floor), "
                      "interleaved with the order rotated every round; medians of per-model times and of per-round "
                      "paired ratios",
              "measurements": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "small_batch_overhead.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

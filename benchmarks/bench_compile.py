"""``torch.compile``: how long converted models take to compile, and how fast they run compiled, against their base.

For each row the converted model and its base timm model are compiled with plain ``torch.compile`` (inductor, default
options, the caches off: ``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1``, so each compile is a real one). Measured:

* compile time: the first call's wall time (trace + compile + one run) at the first batch size, converted and base,
  and the first call at the second batch size (what a new batch size costs: 0 when nothing recompiles);
* graphs compiled (a counting backend around inductor) after the first call and after the second batch size;
* compiled throughput: the compiled converted model against the compiled base, and the eager pair, all four in the
  same interleaved rounds (:func:`vitconvert.timing.compare`; ratios are medians of per-round paired ratios);
* agreement: the compiled logits against the eager ones, and the exits.

Rows (random weights, pretrained=False, 224 px; cascade thresholds forced so the stated shares of the timed batch
exit, as in ``bench_export``): CF-ViT on DeiT-S (half the images refined) and DVT on DeiT-S (exit shares 50% / 25% /
25%). DGE and FSLA compile but still recompile per batch size (docs/compile-section.md): not timed yet.

Writes ``benchmarks/results/compile_speed.json`` and ``compile_speed.md``. Usage (from the repo root; about 20 minutes
on the 2-core CPU)::

    python -m benchmarks.bench_compile [--threads 2] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # every compile timed is a real one

import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import vitconvert
from benchmarks.bench_export import force_exit_shares
from benchmarks.common import RESULTS, machine_block
from benchmarks.protocol import random_batch
from vitconvert.timing import compare

ROWS = (
    ("deit_small_patch16_224", "cfvit", [0.5]),
    ("deit_small_patch16_224", "dvt", [0.5, 0.25]),
)


def first_call(fn: Any, x: torch.Tensor) -> float:
    """Wall seconds of one call (the first one compiles)."""
    t = time.perf_counter()
    with torch.no_grad():
        fn(x)
    return time.perf_counter() - t


def paired_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def measure_row(arch: str, recipe: str, shares: list[float], batches: list[int], threads: int,
                rounds: dict[int, int]) -> dict[str, Any]:
    torch.manual_seed(0)
    model = vitconvert.apply(arch, recipe, pretrained=False)
    base = model.build_base()
    images = random_batch(model.anatomy.img_size, max(batches), seed=2)
    point = force_exit_shares(model, images, shares)
    row: dict[str, Any] = {"method": recipe, "backbone": arch, "threads": threads, "point": point,
                           "forced_exit_shares": shares, "batches": batches}
    compiled: dict[str, Any] = {}
    counter = CompileCounterWithBackend("inductor")
    for name, m in (("base", base), ("converted", model)):
        torch._dynamo.reset()
        counter.clear()
        compiled[name] = torch.compile(m, backend=counter)
        first = first_call(compiled[name], images[:batches[0]])
        graphs_first = counter.frame_count
        second = first_call(compiled[name], images[:batches[1]])
        row[name] = {"compile_s": round(first, 2), "graphs_first_call": graphs_first,
                     f"first_call_at_batch_{batches[1]}_s": round(second, 2),
                     "graphs_after_second_batch_size": counter.frame_count}
        print(f"[compile] {recipe} {arch} {name}: first call {first:.1f}s ({graphs_first} graphs), batch "
              f"{batches[1]} first call {second:.1f}s ({counter.frame_count} graphs)", flush=True)
    row["compile_time_vs_base"] = round(row["converted"]["compile_s"] / row["base"]["compile_s"], 2)
    row["timing"] = {}
    for batch in batches:
        x = images[:batch]
        with torch.no_grad():
            eager = model.forward_dynamic(x)
            got = compiled["converted"](x)
            # The same backend object: the compiled stages are reused (another backend would compile them again).
            dyn = torch.compile(model.forward_dynamic, backend=counter)(x)
        timed = compare({"compiled_converted": compiled["converted"], "compiled_base": compiled["base"],
                         "eager_converted": model, "eager_base": base}, x, reference="compiled_base",
                        min_rounds=rounds[batch])
        entry = {
            "gmacs_share": round(float(eager.gmacs.mean()) / model.base_gmacs, 3),
            "exit_shares": {str(k): float((eager.stage == k).float().mean()) for k in range(len(shares) + 1)},
            "compiled_speedup_vs_compiled_base": round(timed["compiled_converted"].ratio, 3),
            "compiled_speedup_p10_p90": [round(timed["compiled_converted"].ratio_spread.p10, 3),
                                         round(timed["compiled_converted"].ratio_spread.p90, 3)],
            "eager_speedup_vs_eager_base": round(paired_ratio(list(timed["eager_converted"].throughput.values),
                                                              list(timed["eager_base"].throughput.values)), 3),
            "compiled_base_vs_eager_base": round(paired_ratio(list(timed["compiled_base"].throughput.values),
                                                              list(timed["eager_base"].throughput.values)), 3),
            "images_per_s": {k: round(t.images_per_s, 2) for k, t in timed.items()},
            "rounds": timed["compiled_base"].rounds,
            "agree": {"max_abs_logit_difference": float((got - eager.logits).abs().max()),
                      "same_exits": bool(torch.equal(dyn.stage, eager.stage))},
        }
        row["timing"][str(batch)] = entry
        print(f"[compile] {recipe} {arch} b{batch}: compiled x{entry['compiled_speedup_vs_compiled_base']:.2f} vs "
              f"compiled base (eager x{entry['eager_speedup_vs_eager_base']:.2f}), logits "
              f"{entry['agree']['max_abs_logit_difference']:.1g}, same exits {entry['agree']['same_exits']}",
              flush=True)
    torch._dynamo.reset()
    return row


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = ["# torch.compile: compile time and compiled speed (`benchmarks/bench_compile.py`)\n",
             f"Machine: {m.get('cpu', m)}; {result['threads']} threads; torch {result['torch']}; {result['date']}; "
             f"inductor, caches off.{' Quick run (reduced set).' if result['quick'] else ''}\n",
             "| method | backbone | compile s (base) | x base | new batch size s (base) | graphs 1st / after 2nd "
             "size (base) | batch | GMACs share | compiled vs compiled base | eager vs eager base | logits diff | "
             "same exits |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        c, b = r["converted"], r["base"]
        key = next(k for k in c if k.startswith("first_call_at_batch_"))
        for batch, t in r["timing"].items():
            lines.append(
                f"| {r['method']} | {r['backbone']} | {c['compile_s']:.0f} ({b['compile_s']:.0f}) | "
                f"{r['compile_time_vs_base']:.2f} | {c[key]:.1f} ({b[key]:.1f}) | {c['graphs_first_call']} / "
                f"{c['graphs_after_second_batch_size']} ({b['graphs_first_call']} / "
                f"{b['graphs_after_second_batch_size']}) | {batch} | {t['gmacs_share']:.0%} | "
                f"{t['compiled_speedup_vs_compiled_base']:.2f}x ({t['compiled_speedup_p10_p90'][0]:.2f}-"
                f"{t['compiled_speedup_p10_p90'][1]:.2f}) | {t['eager_speedup_vs_eager_base']:.2f}x | "
                f"{t['agree']['max_abs_logit_difference']:.1g} | {t['agree']['same_exits']} |")
    return "\n".join(lines) + "\n"


def warm_up() -> None:
    """Compile a small convolutional model once, so the first row's compile time does not include inductor's own
    one-off start (imports, the C++ toolchain's first build)."""
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.LazyLinear(4)).eval()
    with torch.no_grad():
        m(torch.zeros(2, 3, 8, 8))
        torch.compile(m)(torch.zeros(2, 3, 8, 8))
    torch._dynamo.reset()


def run(quick: bool, out_dir: Path, threads: int | None = None) -> dict[str, Any]:
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    warm_up()
    batches = [16, 1] if quick else [32, 1]
    rounds = {16: 3, 32: 5, 1: 10 if quick else 20}
    rows = [measure_row(arch, recipe, shares, batches, threads, rounds)
            for arch, recipe, shares in (ROWS[1:] if quick else ROWS)]
    result = {"name": "compile_speed", "quick": quick, "machine": machine_block(), "threads": threads,
              "torch": torch.__version__, "date": datetime.date.today().isoformat(),
              "protocol": "plain torch.compile (inductor, default options, caches off); compile time = first call's "
                          "wall time; throughput: compiled converted, compiled base, eager converted, eager base in "
                          "the same interleaved rounds after warm-up, speed-ups are medians of per-round paired "
                          "ratios; random weights, exit thresholds forced on the timed images",
              "rows": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compile_speed.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "compile_speed.md").write_text(markdown(result))
    print(markdown(result), flush=True)
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

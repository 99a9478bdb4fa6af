"""``torch.compile``: how long converted models take to compile, and how fast they run compiled, against their base.

For each row the converted model and its base timm model are compiled with plain ``torch.compile`` (inductor, default
options, the caches off: ``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1``, so each compile is a real one). Measured:

* compile time: the first call's wall time (trace + compile + one run) at the first batch size, converted and base
  (the base's twice, before and after the converted model's, the ratio against their mean; inductor warmed up on a
  small module first, so neither pays for loading it), and the first call at the second batch size (what a new
  batch size costs: about one run when nothing recompiles); and the compile time for every batch size: those two
  plus, for each size of a sweep over batches 1, 3, 8 and 64, its first call's time beyond its second's (the base
  compiles a graph for a batch of 1 and one with a symbolic batch size; a converted model's stages compile once for
  every size);
* graphs compiled (a counting backend around inductor) after the first call, after the second batch size and after a
  sweep over batches 1, 3, 8 and 64 (a new graph there is a recompile);
* full compute: the first call at the full-compute point after the operating point's (its compile time and graphs),
  and its logits against the eager model's;
* compiled throughput: the compiled converted model against the compiled base, and the eager pair, all four in the
  same interleaved rounds (:func:`vitconvert.timing.compare`; ratios are medians of per-round paired ratios);
* agreement: the compiled logits against the eager ones, and the exits (cascades).

Rows (random weights, pretrained=False, 224 px): CF-ViT on DeiT-S and on PVT-v2-b1 (its region path; half the images
refined) and DVT on DeiT-S (exit shares 50% / 25% / 25%), with the thresholds forced on the timed batch as in
``bench_export``; DGE on DeiT-S with random routers at the coarsening that gives about half the GMACs; FSLA on
Swin-T and FSLA-replace on DeiT-S at their recipes' cluster sizes (output projections random, as in ``bench_export``).
Each row records the load average before and after it (the machine may be shared).

``--only dge fsla`` re-measures those methods' rows (``--only cfvit:pvt_v2_b1`` one backbone's) and keeps the other
rows of the result file. Writes ``benchmarks/results/compile_speed.json`` and ``compile_speed.md``. Usage (from the
repo root; about 30 minutes on the 2-core CPU)::

    python -m benchmarks.bench_compile [--threads 2] [--quick] [--only METHOD[:BACKBONE] ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # every compile timed is a real one

import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import vitconvert
from benchmarks.common import (
    RESULTS,
    force_exit_shares,
    machine_block,
    paired_ratio,
    point_for_gmacs,
    randomize_zero_init,
)
from benchmarks.protocol import random_batch
from vitconvert.timing import compare

# architecture, recipe, exit shares forced on the timed images (or a GMACs share for the method's knob), and recipe
# overrides (``--set``)
ROWS: tuple[tuple[str, str, list[float] | float, list[str]], ...] = (
    ("deit_small_patch16_224", "cfvit", [0.5], []),
    ("deit_small_patch16_224", "dvt", [0.5, 0.25], []),
    ("pvt_v2_b1", "cfvit", [0.5], []),  # the recipe's PVT-v2 point: every region of a refined image (alpha 1)
    ("pvt_v2_b1", "cfvit", [0.5], ["model.alpha=0.5"]),  # the region path: DGE's query blocks on half the regions
    ("deit_small_patch16_224", "dge", 0.5, []),  # random routers, coarsening set for ~50% of the base's GMACs
    ("swin_tiny_patch4_window7_224", "fsla", [], []),  # no exits: the recipe's cluster size
    ("deit_small_patch16_224", "fsla_replace", [], []),
)
SWEEP = (1, 3, 8, 64)


def first_call(fn: Any, x: torch.Tensor) -> float:
    """Wall seconds of one call (the first one compiles)."""
    t = time.perf_counter()
    with torch.no_grad():
        fn(x)
    return time.perf_counter() - t


_warmed_up = False


def warm_up_inductor() -> None:
    """Compile a small module once per process before anything is timed: the first compile of a process also pays
    for loading inductor and building its C++ prelude, which would otherwise be billed to whichever model compiles
    first (the base)."""
    global _warmed_up
    if _warmed_up:
        return
    module = torch.nn.Sequential(torch.nn.LayerNorm(64), torch.nn.Linear(64, 64), torch.nn.GELU())
    with torch.no_grad():
        torch.compile(module)(torch.randn(4, 16, 64))
    torch._dynamo.reset()
    _warmed_up = True



def measure_row(arch: str, recipe: str, shares: list[float] | float, overrides: list[str], batches: list[int],
                threads: int, rounds: dict[int, int]) -> dict[str, Any]:
    torch.manual_seed(0)
    model = vitconvert.apply(arch, recipe, pretrained=False, overrides=overrides)
    randomize_zero_init(model)
    base = model.build_base()
    images = random_batch(model.anatomy.img_size, max(*batches, *SWEEP), seed=2)
    timed = images[:max(batches)]
    if isinstance(shares, float):  # a GMACs share to reach with the method's knob (DGE)
        point = point_for_gmacs(model, timed[:16], shares)
    else:
        point = force_exit_shares(model, timed, shares) if shares else model.operating_point
    row: dict[str, Any] = {"method": recipe, "backbone": arch, "overrides": overrides, "threads": threads,
                           "point": point, "batches": batches, "load_average_before": list(os.getloadavg())}
    row["forced_exit_shares" if isinstance(shares, list) else "target_gmacs_share"] = shares
    compiled: dict[str, Any] = {}
    warm_up_inductor()
    counter = CompileCounterWithBackend("inductor")
    for name, m in (("base", base), ("converted", model)):
        torch._dynamo.reset()
        counter.clear()
        compiled[name] = torch.compile(m, backend=counter)
        first = first_call(compiled[name], images[:batches[0]])
        graphs_first = counter.frame_count
        second = first_call(compiled[name], images[:batches[1]])
        graphs_second = counter.frame_count
        # What each sweep size's first call costs beyond a run: its first call minus its second (0 when nothing
        # compiled, up to timing noise).
        sweep_compile = {}
        for b in SWEEP:
            once = first_call(compiled[name], images[:b])
            sweep_compile[str(b)] = round(max(0.0, once - first_call(compiled[name], images[:b])), 2)
        total = first + second + sum(sweep_compile.values())
        row[name] = {"compile_s": round(first, 2), "graphs_first_call": graphs_first,
                     f"first_call_at_batch_{batches[1]}_s": round(second, 2),
                     "graphs_after_second_batch_size": graphs_second,
                     "graphs_after_sweep": counter.frame_count, "sweep": list(SWEEP),
                     "sweep_compile_s": sweep_compile, "compile_total_s": round(total, 2)}
        print(f"[compile] {recipe} {arch} {name}: first call {first:.1f}s ({graphs_first} graphs), batch "
              f"{batches[1]} first call {second:.1f}s ({graphs_second} graphs), after batches {SWEEP}: "
              f"{counter.frame_count} graphs; compile for every batch size {total:.1f}s", flush=True)
    # The base compiles again for a batch of 1 and once more with a symbolic batch size; a converted model's stages
    # compile once for every size. What serving batches of 1 to 64 costs in compile time, converted against base:
    row["compile_total_vs_base"] = round(row["converted"]["compile_total_s"] / row["base"]["compile_total_s"], 2)
    # Full compute: the first call there (a new graph where the structure changes, e.g. DGE's base blocks).
    before = counter.frame_count
    model.set_operating_point(model.operating_space().full())
    x = timed
    t = time.perf_counter()
    with torch.no_grad():
        got = compiled["converted"](x)
    full_s = time.perf_counter() - t
    with torch.no_grad():
        eager = model.forward_dynamic(x)
    row["full_compute"] = {"first_call_s": round(full_s, 2), "new_graphs": counter.frame_count - before,
                           "max_abs_logit_difference": float((got - eager.logits).abs().max())}
    print(f"[compile] {recipe} {arch} full compute: first call {full_s:.1f}s, "
          f"{counter.frame_count - before} new graphs, logits {row['full_compute']['max_abs_logit_difference']:.1g}",
          flush=True)
    model.set_operating_point(point)
    row["timing"] = {}
    for batch in batches:
        x = timed[:batch]
        with torch.no_grad():
            eager = model.forward_dynamic(x)
            got = compiled["converted"](x)
            # The same backend object: the compiled stages are reused (another backend would compile them again).
            dyn = torch.compile(model.forward_dynamic, backend=counter)(x)
        timing = compare({"compiled_converted": compiled["converted"], "compiled_base": compiled["base"],
                          "eager_converted": model, "eager_base": base}, x, reference="compiled_base",
                         min_rounds=rounds[batch])
        entry = {
            "gmacs_share": round(float(eager.gmacs.mean()) / model.base_gmacs, 3),
            "compiled_speedup_vs_compiled_base": round(timing["compiled_converted"].ratio, 3),
            "compiled_speedup_p10_p90": [round(timing["compiled_converted"].ratio_spread.p10, 3),
                                         round(timing["compiled_converted"].ratio_spread.p90, 3)],
            "eager_speedup_vs_eager_base": round(paired_ratio(list(timing["eager_converted"].throughput.values),
                                                              list(timing["eager_base"].throughput.values)), 3),
            "compiled_base_vs_eager_base": round(paired_ratio(list(timing["compiled_base"].throughput.values),
                                                              list(timing["eager_base"].throughput.values)), 3),
            "images_per_s": {k: round(t.images_per_s, 2) for k, t in timing.items()},
            "rounds": timing["compiled_base"].rounds,
            "agree": {"max_abs_logit_difference": float((got - eager.logits).abs().max()),
                      "same_gmacs": bool(torch.equal(dyn.gmacs, eager.gmacs)),
                      "same_exits": None if eager.stage is None else bool(torch.equal(dyn.stage, eager.stage))},
        }
        if eager.stage is not None:
            entry["exit_shares"] = {str(k): float((eager.stage == k).float().mean())
                                    for k in range(int(eager.stage.max()) + 1)}
        row["timing"][str(batch)] = entry
        print(f"[compile] {recipe} {arch} b{batch}: compiled x{entry['compiled_speedup_vs_compiled_base']:.2f} vs "
              f"compiled base (eager x{entry['eager_speedup_vs_eager_base']:.2f}), logits "
              f"{entry['agree']['max_abs_logit_difference']:.1g}, same GMACs {entry['agree']['same_gmacs']}, "
              f"same exits {entry['agree']['same_exits']}", flush=True)
    row["graphs_total"] = counter.frame_count
    # The base's first call once more, after the converted model's (the machine's pace drifts over a row): the
    # ratio is against the mean of the two.
    torch._dynamo.reset()
    row["base"]["compile_s_again"] = round(first_call(torch.compile(base), images[:batches[0]]), 2)
    base_s = (row["base"]["compile_s"] + row["base"]["compile_s_again"]) / 2
    row["compile_time_vs_base"] = round(row["converted"]["compile_s"] / base_s, 2)
    print(f"[compile] {recipe} {arch} base again: first call {row['base']['compile_s_again']:.1f}s; converted "
          f"{row['compile_time_vs_base']:.2f}x the base's mean", flush=True)
    row["load_average_after"] = list(os.getloadavg())
    torch._dynamo.reset()
    return row


def base_compile_cell(base: dict[str, Any]) -> str:
    """The base's first-call compile time, and again after the converted model's where measured."""
    again = base.get("compile_s_again")
    return f"{base['compile_s']:.0f}" + (f"/{again:.0f}" if again is not None else "")


def total_cell(row: dict[str, Any]) -> str:
    """The compile time for every batch size, converted (base), and the ratio; '-' for rows measured before it was."""
    if "compile_total_vs_base" not in row:
        return "-"
    return (f"{row['converted']['compile_total_s']:.0f} ({row['base']['compile_total_s']:.0f}), "
            f"{row['compile_total_vs_base']:.2f}")


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    # No title: docs/export.md includes this file under its own heading.
    lines = [f"`benchmarks/bench_compile.py`. Machine: {m.get('cpu', m)}; {result['threads']} threads; "
             f"torch {result['torch']}; {result['date']}; "
             f"inductor, caches off.{' Quick run (reduced set).' if result['quick'] else ''}"
             f"{'' if result.get('complete', True) else ' Stopped early: the rows it measured.'}"
             "\n",
             "| method | backbone | compile s (base) | x base | every batch size: compile s (base), x base | "
             "new batch size s (base) | graphs: 1st / 2nd size / "
             "after batches 1-64 (base) | full compute: 1st call s, new graphs | batch | GMACs share | compiled vs "
             "compiled base | eager vs eager base | logits diff | same decisions | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        c, b = r["converted"], r["base"]
        key = next(k for k in c if k.startswith("first_call_at_batch_"))
        full = r.get("full_compute")
        full_cell = f"{full['first_call_s']:.1f}, {full['new_graphs']}" if full else "-"
        for batch, t in r["timing"].items():
            a = t["agree"]
            same = a.get("same_gmacs", True) and a.get("same_exits") is not False
            load = r.get("load_average_before")
            lines.append(
                f"| {' '.join([r['method'], *r.get('overrides', [])])} | {r['backbone']} | "
                f"{c['compile_s']:.0f} ({base_compile_cell(b)}) | "
                f"{r['compile_time_vs_base']:.2f} | {total_cell(r)} | {c[key]:.1f} ({b[key]:.1f}) | "
                f"{c['graphs_first_call']} / "
                f"{c['graphs_after_second_batch_size']} / {c.get('graphs_after_sweep', '-')} "
                f"({b['graphs_first_call']} / {b['graphs_after_second_batch_size']} / "
                f"{b.get('graphs_after_sweep', '-')}) | "
                f"{full_cell} | {batch} | "
                f"{t['gmacs_share']:.0%} | "
                f"{t['compiled_speedup_vs_compiled_base']:.2f}x ({t['compiled_speedup_p10_p90'][0]:.2f}-"
                f"{t['compiled_speedup_p10_p90'][1]:.2f}) | {t['eager_speedup_vs_eager_base']:.2f}x | "
                f"{a['max_abs_logit_difference']:.1g} | {same} | {f'{load[0]:.1f}' if load else '-'} |")
    return "\n".join(lines) + "\n"


def warm_up() -> None:
    """Compile a small convolutional model once, so the first row's compile time does not include inductor's own
    one-off start (imports, the C++ toolchain's first build)."""
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.LazyLinear(4)).eval()
    with torch.no_grad():
        m(torch.zeros(2, 3, 8, 8))
        torch.compile(m)(torch.zeros(2, 3, 8, 8))
    torch._dynamo.reset()


def selects(only: list[str], method: str, backbone: str) -> bool:
    """Whether ``--only`` names a row: by its method (``cfvit``) or its method and backbone (``cfvit:pvt_v2_b1``)."""
    return method in only or f"{method}:{backbone}" in only


def run(quick: bool, out_dir: Path, threads: int | None = None, only: list[str] | None = None) -> dict[str, Any]:
    """``only``: measure these rows (:func:`selects`) and keep the other rows of the existing result file. The file is
    rewritten after every row (``"complete": false`` until the last), so a run stopped early keeps what it measured."""
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    warm_up()
    batches = [16, 1] if quick else [32, 1]
    rounds = {16: 3, 32: 5, 1: 10 if quick else 20}
    out_json = out_dir / "compile_speed.json"
    kept: list[dict[str, Any]] = []
    if only is not None and out_json.exists():  # keep the rows not re-measured, in ROWS' order
        kept = [r for r in json.loads(out_json.read_text())["rows"] if not selects(only, r["method"], r["backbone"])]
    selected = [row for row in (ROWS[1:2] if quick else ROWS) if only is None or selects(only, row[1], row[0])]
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    for arch, recipe, shares, overrides in selected:
        rows.append(measure_row(arch, recipe, shares, overrides, batches, threads, rounds))
        result = write(out_dir, quick, threads, kept + rows, complete=len(rows) == len(selected))
    if not selected:
        result = write(out_dir, quick, threads, kept, complete=True)
    print(markdown(result), flush=True)
    return result


def write(out_dir: Path, quick: bool, threads: int, rows: list[dict[str, Any]], complete: bool) -> dict[str, Any]:
    """Write ``compile_speed.json`` and ``.md`` with ``rows`` in ROWS' order."""
    order = {(recipe, arch, tuple(overrides)): i for i, (arch, recipe, _, overrides) in enumerate(ROWS)}
    rows = sorted(rows, key=lambda r: order.get((r["method"], r["backbone"], tuple(r.get("overrides", []))),
                                                len(ROWS)))
    result = {"name": "compile_speed", "quick": quick, "complete": complete, "machine": machine_block(),
              "threads": threads, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
              "protocol": "plain torch.compile (inductor, default options, caches off); compile time = first call's "
                          "wall time; compile for every batch size = that + the second size's first call + each "
                          "sweep size's first call beyond its second; graphs counted by a backend around inductor; "
                          "throughput: compiled converted, compiled base, eager converted, eager base in the same "
                          "interleaved rounds after warm-up, "
                          "speed-ups are medians of per-round paired ratios; random weights, exit thresholds forced "
                          "on the timed images (DGE: coarsening for ~50% GMACs with random routers)",
              "rows": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compile_speed.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "compile_speed.md").write_text(markdown(result))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="+", default=None,
                        help="re-measure these rows only: METHOD or METHOD:BACKBONE (e.g. cfvit:pvt_v2_b1)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    run(args.quick, args.out or (RESULTS / "quick" if args.quick else RESULTS), args.threads, args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where DGE's time goes: torch.profiler op tables of the base model and of DGE (as shipped, and forced sparse).

Models: the trained CIFAR-10 DGE models of the wall-clock benchmark (kept in :data:`benchmarks.common.TRAINED`),
at their calibrated points, on real validation images, and DeiT-S at 224 px at rho 0.5 (random weights, gates
forced at random). Batch 64, torch's default threading. Ops are grouped by what they are for (matrix products,
attention core, the depthwise convolution, gathers/scatters, elementwise and norms, everything else) and counted per
forward.

Writes ``benchmarks/results/dge_profile.json`` and ``dge_profile.md`` (the top ops per model). Usage::

    flock /work/heavy.lock python -m benchmarks.studies.profile_dge [--trained DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

import vitconvert
from benchmarks import cifar10
from benchmarks.common import (
    CHECKPOINTS,
    CIFAR_BASES,
    RESULTS,
    TRAINED,
    committed_share,
    force_ratio,
    machine_block,
    threading_info,
)
from benchmarks.studies.dge_hooks import block_times
from vitconvert.data import spread_batch
from vitconvert.methods.dge import DGE
from vitconvert.session import original_model
from vitconvert.timing import load_average

GROUPS = {
    "matrix products": ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul"),
    "attention core": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math"),
    "depthwise/patch convolution": ("aten::mkldnn_convolution", "aten::convolution", "aten::_convolution"),
    "gathers/scatters": ("aten::index_select", "aten::index", "aten::index_put_", "aten::_index_put_impl_",
                         "aten::gather", "aten::scatter_", "aten::index_add_", "aten::index_copy_",
                         "aten::nonzero", "aten::masked_select"),
    "elementwise and norms": ("aten::gelu", "aten::add", "aten::add_", "aten::mul", "aten::mul_",
                              "aten::native_layer_norm", "aten::copy_", "aten::avg_pool2d", "aten::where",
                              "aten::sub", "aten::div", "aten::cat", "aten::clone", "aten::relu"),
}


def profile_fn(fn: Any, x: torch.Tensor, iters: int) -> dict[str, Any]:
    """Self CPU time per op (ms per forward) and calls per forward."""
    with torch.inference_mode():
        fn(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(iters):
                fn(x)
    ops = []
    for e in prof.key_averages():
        ops.append({"op": e.key, "self_ms": e.self_cpu_time_total / 1000 / iters, "calls": e.count / iters})
    ops.sort(key=lambda o: -o["self_ms"])
    total = sum(o["self_ms"] for o in ops)
    groups = {g: 0.0 for g in [*GROUPS, "other"]}
    for o in ops:
        g = next((g for g, names in GROUPS.items() if o["op"] in names), "other")
        groups[g] += o["self_ms"]
    return {"total_ms": round(total, 2), "calls": round(sum(o["calls"] for o in ops)),
            "groups_ms": {g: round(v, 2) for g, v in groups.items()},
            "top": [{**o, "self_ms": round(o["self_ms"], 3), "share": round(o["self_ms"] / total, 4)}
                    for o in ops[:15]]}


def profile_model(name: str, model: DGE, base: torch.nn.Module, x: torch.Tensor, iters: int) -> dict[str, Any]:
    out: dict[str, Any] = {"model": name, "batch": int(x.shape[0])}
    with torch.inference_mode():
        dyn = model.forward_dynamic(x)
    out["gmacs_share"] = round(float(dyn.gmacs.mean()) / model.base_gmacs, 4)
    out["dense_blocks"] = float(dyn.extras["dense_blocks"][0]) if "dense_blocks" in dyn.extras else None
    out["profiles"] = {"base": profile_fn(base, x, iters)}
    for execution in ("auto", "sparse"):
        model.execution = execution
        out["profiles"][f"dge_{execution}"] = profile_fn(model, x, iters)
    model.execution = "auto"
    out["blocks"] = block_times(model, x, max(3, iters))
    print(f"[profile] {name}: " + ", ".join(f"{k} {v['total_ms']:.1f} ms" for k, v in out["profiles"].items()),
          flush=True)
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Where DGE's time goes (torch.profiler, self CPU time per forward)", "",
             f"Machine: {result['machine']['cpu']}, {result['threading']['threads']} threads, OpenMP wait policy "
             f"{result['threading']['omp_wait_policy']}; load average {result['machine']['load_average']}. "
             "Self CPU times are wall time inside each op on the profiling thread. The profiler adds a fixed "
             "cost to every op, which inflates the DGE paths' totals (thousands of small ops per forward) far "
             "more than the base model's (hundreds): read the op tables for where time goes inside a path, and "
             "compare paths by the per-block wall times (forward hooks, no profiler) and by `wallclock.json`. "
             "Written by `python -m benchmarks.studies.profile_dge`.", ""]
    for m in result["models"]:
        lines += [f"## {m['model']} (batch {m['batch']}, GMACs share {m['gmacs_share']:.2f}, blocks run densely by "
                  f"auto: {m['dense_blocks']})", "",
                  "| group (ms per forward) | " + " | ".join(m["profiles"]) + " |",
                  "|---|" + "---|" * len(m["profiles"])]
        for g in [*GROUPS, "other"]:
            lines.append(f"| {g} | " + " | ".join(f"{p['groups_ms'][g]:.1f}" for p in m["profiles"].values()) + " |")
        lines.append("| **total** | " + " | ".join(f"**{p['total_ms']:.1f}**" for p in m["profiles"].values()) + " |")
        lines.append("| ops launched | " + " | ".join(str(p["calls"]) for p in m["profiles"].values()) + " |")
        lines += ["", "Per block (median wall ms; base = the base block; auto: the path it took):", "",
                  "| block | base | sparse | dense | auto (path) |", "|---|---|---|---|---|"]
        lines += [f"| {b['block']} | {b['base_ms']:.2f} | {b['sparse_ms']:.2f} | {b['dense_ms']:.2f} "
                  f"| {b['auto_ms']:.2f} ({b['auto']}) |" for b in m["blocks"]]
        for which, p in m["profiles"].items():
            lines += ["", f"Top ops, {which}:", "", "| op | ms | share | calls |", "|---|---|---|---|"]
            lines += [f"| {o['op']} | {o['self_ms']:.2f} | {o['share']:.1%} | {o['calls']:g} |" for o in p["top"][:10]]
        lines.append("")
    return "\n".join(lines)


def run(out_dir: Path, trained: Path = TRAINED, iters: int = 5) -> dict[str, Any]:
    models = []
    _, val = cifar10.split_files()
    for name in ("dge_vit", "dge_pvt64"):
        folder = trained / name / "finetuned"
        if (folder / "config.json").is_file():
            model = vitconvert.load(folder).eval()
            base, _ = original_model(model)
            label = f"{name} (trained, calibrated)"
        else:  # as the wall-clock benchmark stands in for it: the committed run's GMACs share, gates forced
            share = committed_share(name)
            torch.manual_seed(0)
            model = vitconvert.apply(f"local-dir:{CHECKPOINTS / CIFAR_BASES[name]}", "dge")
            base = model.build_base()
            assert isinstance(model, DGE)
            force_ratio(model, share, "random", seed=0)
            label = f"{name} (forced random gates at the committed trained run's share {share:.2f})"
        assert isinstance(model, DGE)
        models.append(profile_model(label, model.eval(), base.eval(), spread_batch(val, model, 64), iters))
    torch.manual_seed(0)
    deit = vitconvert.apply("deit_small_patch16_224", "dge", pretrained=False).eval()
    assert isinstance(deit, DGE)
    force_ratio(deit, 0.5, "random", seed=0)
    x = torch.randn(64, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    models.append(profile_model("deit_small rho 0.5 (forced random gates)", deit, deit.build_base().eval(), x,
                                max(1, iters // 2)))
    result = {"name": "dge_profile", "machine": machine_block(), "threading": threading_info(),
              "load_average_end": load_average(), "models": models}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "dge_profile.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "dge_profile.md").write_text(markdown(result))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--trained", type=Path, default=TRAINED)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args(argv)
    run(args.out, args.trained, args.iters)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where FSLA's added time goes in Swin-T (recipe ``fsla``, cluster size 49): per sub-layer and per part.

For ``swin_tiny_patch4_window7_224`` with BOAT's sub-layers in its 5 shifted blocks (random weights: every
path's cost is fixed by the token counts, not the weights), at each batch size:

* **model**: the timm model and the converted one, interleaved (:func:`vitconvert.timing.compare`), median
  seconds per forward and the median of their per-round ratio (the overhead ``bench_fsla`` measures with more
  repetitions);
* **parts** of every FSLA sub-layer, each timed alone on the sub-layer's real input (captured with a hook,
  median of ``reps`` calls after one untimed): the whole sub-layer; LayerNorm + qkv; the clustering
  (:func:`~vitconvert.layers.clustering.balanced_clusters`); the whole clustered attention (clustering, the
  gathers of q, k and v, the in-cluster SDPA, the un-permute); the in-cluster SDPA alone on tensors of the
  same shapes (the floor of the attention itself); the depthwise convolution of V; the output projection.
  ``gathers + un-permute`` is the clustered attention minus the clustering and the SDPA;
* **ops**: torch.profiler self CPU time of the 5 sub-layers per forward, grouped (sort, the clustering's
  batched matrix products, gathers, SDPA, linear layers, convolution, everything else). The profiler adds a
  fixed cost to every op, so read the groups as shares, and the parts (no profiler) as times.

Writes ``benchmarks/results/fsla_profile.json`` and ``fsla_profile.md``. Run on one quiet core::

    OMP_NUM_THREADS=1 taskset -c 1 python -m benchmarks.studies.profile_fsla [--batch 64 1] [--label after]

With ``PYTHONPATH`` pointing at another checkout, the same script profiles that checkout's ``vitconvert``
(the recorded ``vitconvert_path`` and ``git_commit`` say which); ``--label`` names the run and ``--merge``
adds it to an existing JSON, so a before/after pair lands in one file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

if __package__ in (None, ""):  # allow `python benchmarks/studies/profile_fsla.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import vitconvert
import vitconvert.methods.fsla as fsla_module
from benchmarks.common import RESULTS, machine_block
from vitconvert.layers.clustering import balanced_clusters, clustered_attention, plan_clusters
from vitconvert.timing import compare, load_average, machine_info

SWIN = "swin_tiny_patch4_window7_224"
GROUPS = {
    "sort": ("aten::sort",),
    "clustering products (bmm)": ("aten::bmm",),
    "gathers": ("aten::index_select", "aten::gather", "aten::index", "aten::scatter_", "aten::masked_select",
                "aten::topk"),
    "in-cluster SDPA": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                        "aten::_scaled_dot_product_attention_math"),
    "linear (qkv, proj)": ("aten::addmm", "aten::mm"),
    "depthwise conv": ("aten::mkldnn_convolution", "aten::_convolution", "aten::convolution"),
    "copies": ("aten::copy_", "aten::clone", "aten::contiguous", "aten::cat", "aten::stack"),
}


def _median_ms(fn: Callable[[], Any], reps: int) -> float:
    """Median ms of ``reps`` calls of ``fn`` after one untimed call."""
    return compare({"part": lambda _: fn()}, torch.empty(1), warmup=1, min_rounds=reps)["part"].latency_ms.median


def _parts(branch: torch.nn.Module, x: torch.Tensor, reps: int) -> dict[str, float]:
    """Milliseconds of each part of one FSLA sub-layer on its input ``x`` (B, H, W, C), summed over the batch
    slices the sub-layer runs in inference (``vitconvert.methods.fsla.SLICE_BYTES``; one slice without it)."""
    slice_bytes = getattr(fsla_module, "SLICE_BYTES", None)
    step = max(1, slice_bytes // (3 * x[0].numel() * x.element_size())) if slice_bytes else x.shape[0]
    ms = {"sub-layer": _median_ms(lambda: branch(x), reps)}
    for xs in x.split(step):
        for name, t in _slice_parts(branch, xs, reps).items():
            ms[name] = ms.get(name, 0.0) + t
    ms["gathers + un-permute"] = ms["clustered attention"] - ms["clustering"] - ms["in-cluster SDPA alone"]
    ms["slices"] = -(-x.shape[0] // step)
    return {k: round(v, 3) for k, v in ms.items()}


def _slice_parts(branch: torch.nn.Module, x: torch.Tensor, reps: int) -> dict[str, float]:
    c = branch.__dict__["_ctx"]
    b, hh, ww, dim = x.shape
    n, h = hh * ww, branch.num_heads
    t = branch.norm(x).reshape(b, n, dim)
    q, k, v = branch.qkv(t).reshape(b, n, 3, h, dim // h).permute(2, 0, 3, 1, 4).unbind(0)
    plan = plan_clusters(n, c.cluster_size, c.overlap)
    out = clustered_attention(q, k, v, c.cluster_size, c.overlap, 0, c.iters, c.temperature, overhead=c.overhead)
    out = out.transpose(1, 2).reshape(b, n, dim)
    v_map = v.transpose(1, 2).reshape(b, hh, ww, dim).permute(0, 3, 1, 2)
    pos = branch.pos(v_map).flatten(2).transpose(1, 2)
    g = torch.Generator().manual_seed(0)
    qs = torch.randn(b, h * plan.clusters, plan.leaf, dim // h, generator=g)
    ks = torch.randn(b, h * plan.clusters, plan.keys, dim // h, generator=g)
    return {
        "norm + qkv": _median_ms(lambda: branch.qkv(branch.norm(x).reshape(b, n, dim)), reps),
        "clustering": _median_ms(lambda: balanced_clusters(q, plan, c.iters, c.temperature), reps),
        "clustered attention": _median_ms(lambda: clustered_attention(
            q, k, v, c.cluster_size, c.overlap, 0, c.iters, c.temperature, overhead=c.overhead), reps),
        "in-cluster SDPA alone": _median_ms(lambda: F.scaled_dot_product_attention(qs, ks, ks), reps),
        "depthwise conv": _median_ms(lambda: branch.pos(v_map), reps),
        "proj (+ conv term)": _median_ms(lambda: branch.proj(out + pos), reps),
    }


def _op_groups(run: Callable[[], Any]) -> dict[str, Any]:
    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    groups = {g: 0.0 for g in [*GROUPS, "other"]}
    ops = []
    calls = 0
    for e in prof.key_averages():
        ms = e.self_cpu_time_total / 1000
        calls += e.count
        ops.append({"op": e.key, "self_ms": round(ms, 3), "calls": e.count})
        group = next((g for g, names in GROUPS.items() if e.key in names), "other")
        groups[group] += ms
    ops.sort(key=lambda o: -o["self_ms"])
    total = sum(groups.values())
    return {"groups_ms": {k: round(v, 3) for k, v in groups.items()}, "total_ms": round(total, 3),
            "ops_launched": calls, "top": ops[:12]}


def profile_batch(batch: int, reps: int, model_reps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = vitconvert.apply(SWIN, "fsla", pretrained=False).eval()
    base = model.build_base().eval()
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    branches = model.__dict__["_branches"]
    captured: dict[int, torch.Tensor] = {}
    hooks = [br.register_forward_pre_hook(lambda mod, args, i=i: captured.__setitem__(i, args[0]))
             for i, br in branches.items()]
    with torch.inference_mode():
        model(x)
        for hk in hooks:
            hk.remove()
        timed = compare({"timm": base, "fsla": model}, x, warmup=1, min_rounds=model_reps)
        times = {k: list(t.seconds) for k, t in timed.items()}
        med = {k: statistics.median(v) for k, v in times.items()}
        paired = statistics.median(1 / r for r in timed["fsla"].paired)  # fsla seconds / timm seconds, per round
        per_block = []
        for i, br in branches.items():
            xi = captured[i]
            per_block.append({"block": i, "input": list(xi.shape), "heads": br.num_heads,
                              "levels": plan_clusters(xi.shape[1] * xi.shape[2], model.cluster_size).levels,
                              "ms": _parts(br, xi, reps)})
        ops = _op_groups(lambda: [br(captured[i]) for i, br in branches.items()])
    total_parts = {k: round(sum(b["ms"][k] for b in per_block), 3) for k in per_block[0]["ms"]}
    print(f"[profile_fsla] batch {batch}: timm {med['timm']:.3f} s, fsla {med['fsla']:.3f} s "
          f"(paired {paired:.3f}x); sub-layers {total_parts['sub-layer']:.1f} ms", flush=True)
    return {"batch": batch, "reps": reps, "model_reps": model_reps,
            "model_seconds": {k: round(v, 4) for k, v in med.items()}, "overhead_paired": round(paired, 4),
            "model_all": times, "sublayers_total_ms": total_parts, "per_block": per_block, "ops": ops}


def _commit(path: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Where FSLA's added time goes (Swin-T, 5 sub-layers, cluster size 49)", "",
             "Written by `python -m benchmarks.studies.profile_fsla` (random weights; CPU, fp32, "
             f"{result['runs'][0]['threads']} thread). Parts are timed alone on each sub-layer's captured input, "
             "on the batch slices the sub-layer runs in (median ms summed over slices, no profiler); `gathers + "
             "un-permute` = clustered attention - clustering - SDPA alone. "
             "The op groups come from torch.profiler (it adds a cost per op, so read them as shares).", ""]
    for run in result["runs"]:
        lines += [f"## {run['label']} (vitconvert at {run['git_commit'] or '?'}; load average "
                  f"{run['load_average']})", ""]
        for p in run["batches"]:
            ms = p["sublayers_total_ms"]
            lines += [f"### batch {p['batch']}: timm {p['model_seconds']['timm']:.3f} s, fsla "
                      f"{p['model_seconds']['fsla']:.3f} s per forward, overhead {p['overhead_paired']:.3f}x "
                      f"(paired median of {p['model_reps']})", "",
                      "| block (levels) | " + " | ".join(ms) + " |", "|---|" + "---|" * len(ms)]
            for b in p["per_block"]:
                lines.append(f"| {b['block']} ({b['levels']}) | " + " | ".join(f"{v:.2f}" for v in b["ms"].values())
                             + " |")
            lines.append("| **all 5** | " + " | ".join(f"**{v:.2f}**" for v in ms.values()) + " |")
            ops = p["ops"]
            lines += ["", f"Op groups of the 5 sub-layers (profiler, ms per forward, {ops['ops_launched']} ops):", "",
                      "| " + " | ".join(ops["groups_ms"]) + " | total |", "|" + "---|" * (len(ops["groups_ms"]) + 1),
                      "| " + " | ".join(f"{v:.1f}" for v in ops["groups_ms"].values())
                      + f" | {ops['total_ms']:.1f} |", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 1])
    parser.add_argument("--reps", type=int, default=3, help="timed calls per part (median)")
    parser.add_argument("--model-reps", type=int, nargs="+", default=None,
                        help="interleaved model forwards per batch size (default: 3 at batch >= 16, else 15)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--label", default="current")
    parser.add_argument("--merge", action="store_true", help="add this run to the existing JSON (other labels kept)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_reps = args.model_reps or [3 if b >= 16 else 15 for b in args.batch]
    src = Path(vitconvert.__file__).resolve().parent
    run = {"label": args.label, "vitconvert_path": str(src), "git_commit": _commit(src),
           "threads": torch.get_num_threads(), "date": machine_info()["date"],
           "batches": [profile_batch(b, args.reps if b >= 16 else max(args.reps, 10), r)
                       for b, r in zip(args.batch, model_reps, strict=True)]}
    run["load_average"] = load_average()
    path = args.out / "fsla_profile.json"
    runs = []
    if args.merge and path.is_file():
        runs = [r for r in json.loads(path.read_text())["runs"] if r["label"] != args.label]
    result = {"name": "fsla_profile", "model": SWIN, "machine": machine_block(), "runs": [*runs, run]}
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "fsla_profile.md").write_text(markdown(result))


if __name__ == "__main__":
    main()

"""Wall-clock against GMACs in one run: every row of issue 18's table, converted and base model side by side.

Rows, in this order (what a user meets first comes first):

1. **Trained CIFAR-10 models at their calibrated points**, with torch's default threading (as many threads as
   cores, OpenMP's default wait policy): CF-ViT and DGE on ``cifar10-vit``, DGE on ``cifar10-pvt64``, each
   fine-tuned and calibrated by ``benchmarks/cifar10_short_recipe.py`` (the recipe's own run; the model
   folders are kept in ``--trained``, default ``benchmarks/work/trained``, and re-created there with
   ``--train-missing``, ~15 minutes each). A trained model that is not there is stood in for by the same
   architecture converted from the committed base, run at the committed trained run's calibrated GMACs share
   (DGE: gates forced at random; CF-ViT: the same share of images exits), labelled as such.
   Batch 64 and batch 1, on real validation images spread over the classes. Also: CF-ViT's
   all-refine point (eta = 1), and DGE at every timed frontier point of the calibration curve (what a GMACs
   or speed budget can choose), batch 64 and 1.
2. **224-px architecture rows** (random weights, gates forced at random per image and region by
   :func:`benchmarks.common.force_ratio`): DGE on DeiT-S at rho 0.5 and 1.0 and on PVT-v2-b1 at 0.7,
   batch 64, and DeiT-S at rho 0.5 at batch 1.

Every DGE row times the base model, DGE as it ships (``execution=auto``: each block and batch takes the path
the cost model estimates cheaper) and DGE forced sparse (``execution=sparse``: never dense, split or the base
block, as before issue 18, but with today's sparse kernels), in
the same interleaved rounds (:func:`vitconvert.timing.compare`); ratios are per-round paired medians. "Share of
the GMACs ideal" = throughput ratio x GMACs share (1.0: time falls exactly with the MACs).

Writes ``benchmarks/results/wallclock.json`` (machine, threads, OpenMP policy, load average before and after each
row; each row its date). Usage (from the repo root; 10-15 minutes on the 2-core CPU once the trained models exist)::

    flock /work/heavy.lock python -m benchmarks.bench_wallclock
    python -m benchmarks.bench_wallclock --quick   # smoke run, results/quick/
    python -m benchmarks.bench_wallclock --rows dge_pvt64,pvt_v2_b1:0.7:64   # these rows again, merged in
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

import vitconvert
from benchmarks import cifar10, protocol
from benchmarks.common import (
    CHECKPOINTS,
    CIFAR_BASES,
    REPO,
    TRAINED,
    TRAINED_MODELS,
    committed_share,
    force_ratio,
    machine_block,
    threading_info,
)
from vitconvert.calibration import find_small_batch_rule
from vitconvert.data import spread_batch
from vitconvert.methods.base import ConvertedModel, SmallBatchRule
from vitconvert.methods.dge import DGE
from vitconvert.session import original_model

# (architecture, rho, batch): the 224-px rows.
ARCH_ROWS = (("deit_small_patch16_224", 0.5, 64), ("pvt_v2_b1", 0.7, 64), ("deit_small_patch16_224", 1.0, 64),
             ("deit_small_patch16_224", 0.5, 1))
SETTINGS = {"full": {"warmup": 2, "reps": 8, "reps_b1": 20, "batch": 64, "curve_points": 5},
            "quick": {"warmup": 1, "reps": 2, "reps_b1": 3, "batch": 8, "curve_points": 2}}


def ensure_trained(folder: Path, quick: bool, build: bool = True) -> dict[str, Path]:
    """The trained model folders, fine-tuned and calibrated by the short recipe where missing (``build``)."""
    from benchmarks.cifar10_short_recipe import run_recipe

    out = {}
    for name, recipe, base in TRAINED_MODELS:
        model_dir = folder / name / "finetuned"
        if not (model_dir / "config.json").is_file():
            if quick or not build:
                continue  # a smoke run does not train
            print(f"[wallclock] training {name} with the short recipe (~15 min)", flush=True)
            run_recipe(recipe, CHECKPOINTS / base, 1000, folder / name / "results",
                       work=folder / name, progress=False, val_curve=False)
        out[name] = model_dir
    return out


def one_by_one(fn: Any) -> Any:
    """Batch 1 over several images: each image alone, in turn (a cascade's exits depend on the image)."""
    def run(x: torch.Tensor) -> None:
        for i in range(x.shape[0]):
            fn(x[i:i + 1])
    return run


def compare_row(fns: dict[str, Any], x: torch.Tensor, cfg: dict[str, Any], batch: int) -> dict[str, Any]:
    """Side-by-side timing (base first: the reference), with the load average around it; ``batch`` 1 runs the
    images of ``x`` one by one."""
    reps = cfg["reps_b1"] if batch == 1 else cfg["reps"]
    if batch == 1:
        fns = {name: one_by_one(fn) for name, fn in fns.items()}
    measured = protocol.measure(fns, x, warmup=cfg["warmup"], reps=reps, reference="base")
    out = {name: {"img_s": round(r["median"], 2), "ratio": round(r["ratio"], 3),
                  "ratio_p10_p90": [round(r["ratio_p10"], 3), round(r["ratio_p90"], 3)],
                  "ratio_halves": [round(v, 3) for v in r["ratio_halves"]] if r["ratio_halves"] else None,
                  "cpu_time_ratio": round(r.get("cpu_time_ratio", float("nan")), 3)}
           for name, r in measured["results"].items()}
    cfg_done = measured["config"]
    return {"timings": out, "reps": reps,
            "load_average": [cfg_done["load_average_start"], cfg_done["load_average_end"]]}


def dge_fns(model: DGE, base: torch.nn.Module, rule: SmallBatchRule | None = None) -> dict[str, Any]:
    """Base, DGE as shipped (auto, with the small-batch rule when one is given: ``dge_rule``), DGE auto without the
    rule and DGE forced sparse (timed under inference mode by :func:`vitconvert.timing.compare`)."""
    def run(execution: str, small_batch: SmallBatchRule | None = None) -> Any:
        def fn(x: torch.Tensor) -> Any:
            model.execution = execution
            model.small_batch = small_batch
            return model(x)
        return fn
    fns = {"base": base, "dge_auto": run("auto"), "dge_sparse": run("sparse")}
    if rule is not None:
        fns["dge_rule"] = run("auto", rule)
    return fns


def small_batch_rule(model: DGE, base: torch.nn.Module, x64: torch.Tensor) -> tuple[SmallBatchRule | None, Any]:
    """The small-batch rule calibration stores for the model's current point on this machine: the same function
    (:func:`vitconvert.calibration.find_small_batch_rule`) on the row's batch-64 images."""
    model.execution, model.small_batch = "auto", None
    rule, record = find_small_batch_rule(model, base, x64, progress=False)
    return rule, record


def gmacs_share(model: ConvertedModel, x: torch.Tensor, batch: int) -> tuple[float, dict[str, Any]]:
    """Mean GMACs / base GMACs on ``x`` (and what the blocks ran), at the model's current point and small-batch
    rule, ``x``'s images one by one when ``batch`` is 1 (as they are timed)."""
    outs = protocol.dynamic_outputs(model, x, one_by_one=batch == 1)
    gmacs = torch.cat([o.gmacs for o in outs])
    info: dict[str, Any] = {"gmacs": round(float(gmacs.mean()), 5), "base_gmacs": round(model.base_gmacs, 5)}
    if "dense_blocks" in outs[0].extras:
        info["dense_blocks"] = float(outs[0].extras["dense_blocks"][0])
        info["dynamic_blocks"] = len(model.dynamic_blocks)
    return float(gmacs.mean()) / model.base_gmacs, info


def row(name: str, converted: ConvertedModel, fns: dict[str, Any], x: torch.Tensor, cfg: dict[str, Any], batch: int,
        rule: tuple[SmallBatchRule | None, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """One table row: GMACs share on ``x`` and the interleaved timing at ``batch`` (1: ``x``'s images one by one).

    With ``rule`` (a DGE row at a small batch: the rule and its record), the headline is DGE as shipped with that
    rule (``dge_rule``); ``without_rule`` keeps the share and speed of the point itself."""
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if rule is not None:
        extra["small_batch"] = {**rule[1], "applies": rule[0] is not None and batch < rule[0].below}
        converted.small_batch = None
        point_share, _ = gmacs_share(converted, x, batch)
        extra["without_rule"] = {"gmacs_share": round(point_share, 4)}
        converted.small_batch = rule[0]
    share, info = gmacs_share(converted, x, batch)
    measured = compare_row(fns, x, cfg, batch)
    converted.small_batch = None
    name_of = "dge_rule" if "dge_rule" in fns else "dge_auto" if "dge_auto" in fns else "converted"
    ratio = measured["timings"][name_of]["ratio"]
    if rule is not None and "dge_rule" in fns:
        auto = measured["timings"]["dge_auto"]["ratio"]
        extra["without_rule"].update(throughput_ratio=auto,
                                     share_of_gmacs_ideal=round(auto * extra["without_rule"]["gmacs_share"], 3))
    result = {"row": name, **fields, "batch": batch, "images_timed": int(x.shape[0]), **threading_info(),
              "gmacs_share": round(share, 4),
              **info, "throughput_ratio": ratio, "share_of_gmacs_ideal": round(ratio * share, 3), **extra, **measured,
              "seconds": round(time.perf_counter() - t0, 1)}
    if "dge_sparse" in fns:
        result["sparse_only_ratio"] = measured["timings"]["dge_sparse"]["ratio"]
    print(f"[wallclock] {name} b{batch}: GMACs {share:.3f}, x{ratio:.3f} "
          f"({result['share_of_gmacs_ideal']:.0%} of ideal)"
          + (f", sparse-only x{result['sparse_only_ratio']:.3f}" if "sparse_only_ratio" in result else "")
          + (f", small-batch rule {extra['small_batch']}" if "small_batch" in extra else ""), flush=True)
    return result


def trained_rows(folders: dict[str, Path], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    _, val = cifar10.split_files()
    rows: list[dict[str, Any]] = []
    for name, folder in folders.items():
        model = vitconvert.load(folder).eval()
        base, _ = original_model(model)
        base.eval()
        x64 = spread_batch(val, model, cfg["batch"])
        x1 = x64[::8]  # batch 1: 8 images (of 8 classes) one by one
        point = dict(model.operating_point)
        fields = {"model": name, "method": model.method, "backbone": model.base_spec.architecture,
                  "gates": "trained", "point": point, "calibrated": model.calibration.get("budget")}
        if isinstance(model, DGE):
            rows += dge_point_rows(f"{name} calibrated", model, base, x64, x1, cfg, fields)
            # every timed point of the frontier a budget can choose
            curve = sorted(model.curve, key=lambda p: p.gmacs)
            pick = sorted({round(i * (len(curve) - 1) / max(1, cfg["curve_points"] - 1))
                           for i in range(cfg["curve_points"])})
            for i in pick:
                model.set_operating_point(curve[i].point)
                rows += dge_point_rows(f"{name} curve point", model, base, x64, x1, cfg,
                                       {**fields, "point": dict(curve[i].point), "calibrated": None})
            model.set_operating_point(point)
            model.execution = "auto"
        else:
            fns = {"base": base, "converted": model}
            for x in (x64, x1):
                rows.append(row(f"{name} calibrated", model, fns, x, cfg, 64 if x is x64 else 1, **fields))
            model.set_operating_point({**point, "eta": 1.0})  # every image refines: the cascade's worst case
            for x in (x64, x1):
                rows.append(row(f"{name} all-refine (eta=1)", model, fns, x, cfg, 64 if x is x64 else 1,
                                **{**fields, "point": dict(model.operating_point), "calibrated": None}))
            model.set_operating_point(point)
    return rows


def dge_point_rows(name: str, model: DGE, base: torch.nn.Module, x64: torch.Tensor, x1: torch.Tensor,
                   cfg: dict[str, Any], fields: dict[str, Any]) -> list[dict[str, Any]]:
    """A DGE point at batch 64 and at batch 1, the batch-1 row with the small-batch rule calibration would store."""
    out = [row(name, model, dge_fns(model, base), x64, cfg, 64, **fields)]
    if out[0]["gmacs_share"] >= 1.0 - 1e-6:  # the full-compute point runs the base computation: no rule to find
        return [*out, row(name, model, dge_fns(model, base), x1, cfg, 1, **fields)]
    rule = small_batch_rule(model, base, x64)
    out.append(row(name, model, dge_fns(model, base, rule[0]), x1, cfg, 1, rule=rule, **fields))
    return out


def stand_in_rows(missing: list[str], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """CIFAR-10 rows for trained models that are not here: the same architecture converted from the committed
    base checkpoint, run at the committed trained run's calibrated GMACs share. DGE: gates forced at random
    to that share. CF-ViT: eta set on the batch so that the share of images the calibrated run let exit exits
    (the cost of each path does not depend on the weights), plus the all-refine point (eta = 1)."""
    _, val = cifar10.split_files()
    rows: list[dict[str, Any]] = []
    for name in missing:
        recipe, base_dir = next((r, b) for n, r, b in TRAINED_MODELS if n == name)
        torch.manual_seed(0)
        model = vitconvert.apply(f"local-dir:{CHECKPOINTS / base_dir}", recipe).eval()
        base = model.build_base().eval()
        x64 = spread_batch(val, model, cfg["batch"])
        x1 = x64[::8]
        share = committed_share(name)
        fields = {"model": name, "method": model.method, "backbone": model.base_spec.architecture,
                  "calibrated": None, "committed_share": round(share, 4)}
        if isinstance(model, DGE):
            force_ratio(model, share, "random", seed=0)
            rows += dge_point_rows(f"{name} at the trained run's share", model, base, x64, x1, cfg,
                                   {"gates": "forced (random, at the committed trained run's GMACs share)", **fields})
            continue
        # CF-ViT: exit share s from the GMACs share (coarse-only and coarse + fine costs per image)
        coarse, fine = model.cascade.costs
        s = min(max((coarse + fine - share * model.base_gmacs) / fine, 0.0), 1.0)
        fns = {"base": base, "converted": model}
        for x in (x64, x1):
            with torch.inference_mode():
                conf = model.forward_coarse(x)["logits"].float().softmax(-1).amax(-1)
            # exits are conf > eta: eta at the (1 - s) quantile lets the share s of this batch exit
            eta = float(torch.quantile(conf, 1.0 - s)) if s > 0 else 1.0
            model.set_operating_point({**model.operating_point, "eta": min(max(eta, 0.0), 1.0)})
            rows.append(row(f"{name} at the trained run's exit share", model, fns, x, cfg, 64 if x is x64 else 1,
                            gates=f"untrained; eta set so that {s:.0%} exit, as in the committed trained run",
                            **{**fields, "point": dict(model.operating_point), "exit_share": round(s, 3)}))
        model.set_operating_point({**model.operating_point, "eta": 1.0})
        for x in (x64, x1):
            rows.append(row(f"{name} all-refine (eta=1)", model, fns, x, cfg, 64 if x is x64 else 1,
                            gates="untrained (every image refines: no exit decision)",
                            **{**fields, "point": dict(model.operating_point)}))
    return rows


def arch_rows(cfg: dict[str, Any], quick: bool, which: Any = None) -> list[dict[str, Any]]:
    rows = []
    built: dict[str, tuple[DGE, torch.nn.Module]] = {}
    for arch, rho, batch in ARCH_ROWS if which is None else which:
        if arch not in built:
            torch.manual_seed(0)
            model = vitconvert.apply(arch, "dge", pretrained=False)
            assert isinstance(model, DGE)
            built[arch] = (model.eval(), model.build_base().eval())
        model, base = built[arch]
        force_ratio(model, rho, "random", seed=0)
        gen = torch.Generator().manual_seed(0)
        b = min(batch, cfg["batch"]) if quick else batch
        x = torch.randn(b, 3, *model.anatomy.img_size, generator=gen)
        rule = None
        if b < cfg["batch"]:  # the rule is found on a calibration-size batch, as calibration does
            rule = small_batch_rule(model, base, torch.randn(cfg["batch"], 3, *model.anatomy.img_size, generator=gen))
        rows.append(row(f"{arch} rho {rho}", model, dge_fns(model, base, rule[0] if rule else None), x, cfg, b,
                        rule=rule, model=arch, method="dge", backbone=arch,
                        gates="forced (random per image and region)", rho=rho))
    return rows


def report_rows(measurements: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows ``benchmarks/report.py`` tabulates (one table per batch size): DGE as shipped and forced sparse."""
    rows = []
    for m in measurements:
        point = ", ".join(f"{k}={v:g}" for k, v in (m.get("point") or {}).items())
        if "rho" in m:
            where = f"rho {m['rho']}"
        else:
            where = f"calibrated {m['calibrated']}" if m.get("calibrated") else m["row"].split(" ", 1)[-1]
        for name, r in m["timings"].items():
            if name == "base":
                continue
            # the rule's row runs what it runs (full compute when it applies); the others run the point itself
            share = m["without_rule"]["gmacs_share"] if name != "dge_rule" and "without_rule" in m else m["gmacs_share"]
            how = {"dge_auto": "" if "dge_rule" not in m["timings"] else ", without the small-batch rule",
                   "dge_rule": ", small-batch rule", "dge_sparse": ", sparse only"}.get(name, "")
            rows.append({
                "method": m["method"], "backbone": CIFAR_BASES.get(m["model"], m["backbone"]),
                "setting": f"{where}{f' ({point})' if point else ''}, {m['gates'].split(' ')[0].rstrip(';')} gates, "
                           f"{m['threads']} threads{how}",
                "device": "cpu", "precision": "fp32", "batch": m["batch"],
                "gmacs": round(share * m["base_gmacs"], 5), "base_gmacs": m["base_gmacs"], "throughput": r["img_s"],
                "base_throughput": m["timings"]["base"]["img_s"], "throughput_ratio": r["ratio"],
                "throughput_ratio_p10": r["ratio_p10_p90"][0], "throughput_ratio_p90": r["ratio_p10_p90"][1],
                "cpu_time_ratio": r["cpu_time_ratio"],
                "notes": f"share of the GMACs ideal {r['ratio'] * share:.0%}"})
    return rows


def markdown_table(measurements: list[dict[str, Any]]) -> str:
    """The issue's table: one line per measurement (DGE as shipped; "sparse only" = forced sparse)."""
    lines = ["| model | gates | threads | batch | GMACs share | throughput vs base | share of the GMACs ideal "
             "| sparse only | without the small-batch rule |", "|---|---|---|---|---|---|---|---|---|"]
    for m in measurements:
        point = ", ".join(f"{k}={v:g}" for k, v in (m.get("point") or {}).items())
        name = f"{m['method']}, {m['model']}" + (f" rho {m['rho']}" if "rho" in m else "")
        where = m["row"].split(" ", 1)[-1] if "rho" not in m else ""
        before = m.get("sparse_only_ratio")
        lines.append(f"| {name} {where}{f' ({point})' if point else ''} | {m['gates']} | {m['threads']} "
                     f"| {m['batch']} | {m['gmacs_share']:.0%} | {m['throughput_ratio']:.2f}x "
                     f"| {m['share_of_gmacs_ideal']:.0%} | {f'{before:.2f}x' if before is not None else '-'} "
                     f"| {_without_rule(m)} |")
    return "\n".join(lines) + "\n"


def _without_rule(m: dict[str, Any]) -> str:
    """The point's own share and speed where the small-batch rule ran full compute instead."""
    w, rule = m.get("without_rule"), m.get("small_batch")
    if not w or "throughput_ratio" not in w:
        return "-" if not rule else f"not slower at batch 1 ({rule['ratios'].get('1')}x): no rule"
    return f"{w['gmacs_share']:.0%} GMACs, {w['throughput_ratio']:.2f}x (rule: full compute below {rule['below']})"


def row_key(m: dict[str, Any]) -> str:
    """What a measurement measures (model, point or rho, batch): a re-measured row replaces the old one."""
    point = json.dumps(m.get("point"), sort_keys=True) if "rho" not in m else str(m["rho"])
    return f"{m['row']}|{point}|{m['batch']}"


def merge(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``old`` with the rows ``new`` measures again replaced in place, then ``new``'s other rows."""
    fresh = {row_key(m): m for m in new}
    out = [fresh.pop(row_key(m), m) for m in old]
    return out + [m for m in new if row_key(m) in fresh]


def run(quick: bool, out_dir: Path, trained: Path = TRAINED, only: str = "all", train_missing: bool = False,
        select: list[str] | None = None) -> dict[str, Any]:
    """Measure the rows (``select``: only the trained models named and the architecture rows given as
    ``arch:rho:batch``, merged into the results already in ``out_dir``) and write the results."""
    cfg = SETTINGS["quick" if quick else "full"]
    start = machine_block()
    rows: list[dict[str, Any]] = []
    if only in ("all", "trained"):
        found = ensure_trained(trained, quick, build=train_missing)
        names = [n for n, _, _ in TRAINED_MODELS if select is None or n in select]
        rows += trained_rows({n: f for n, f in found.items() if n in names}, cfg)
        rows += stand_in_rows([n for n in names if n not in found], cfg)
    if only in ("all", "arch"):
        keep = None if select is None else [a for a in ARCH_ROWS if f"{a[0]}:{a[1]}:{a[2]}" in select]
        rows += arch_rows(cfg, quick, keep)
    for m in rows:
        m["date"] = start["date"]
    old = out_dir / "wallclock.json"
    if select is not None and old.is_file():
        before = json.loads(old.read_text())
        for m in before["measurements"]:
            m.setdefault("date", before["machine"]["date"])
        rows = merge(before["measurements"], rows)
    result = {
        "name": "wallclock",
        "quick": quick,
        "date": start["date"],
        "machine": start,
        "machine_end": machine_block(),
        "threading": threading_info(),
        "settings": cfg,
        "note": ("CPU shared with other jobs (load averages per row); base and converted timed in interleaved "
                 "rounds, ratios are per-round paired medians. dge_auto: DGE as shipped (per block and batch, "
                 "sparse or dense by the cost model, split by level where each image takes one); dge_sparse: "
                 "always the sparse path (as before issue 18, with the sparse kernels of the run's date)."
                 + (" Rows measured again in this run (their date) merged into an earlier run's rows."
                    if select is not None else "")),
        "measurements": rows,
        "rows": report_rows(rows),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "wallclock.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "wallclock.md").write_text(markdown_table(rows))
    print(markdown_table(rows), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--trained", type=Path, default=TRAINED, help="folder of the trained model folders")
    parser.add_argument("--only", choices=("all", "trained", "arch"), default="all")
    parser.add_argument("--rows", default=None,
                        help="comma-separated rows to measure again, merged into the existing results: trained "
                             "model names (" + ", ".join(CIFAR_BASES) + ") and architecture rows as arch:rho:batch ("
                             + ", ".join(f"{a}:{r}:{b}" for a, r, b in ARCH_ROWS) + ")")
    parser.add_argument("--train-missing", action="store_true",
                        help="fine-tune and calibrate missing trained models with the short recipe (~15 min each)")
    args = parser.parse_args(argv)
    out = args.out or (REPO / "benchmarks" / "results" / ("quick" if args.quick else ""))
    select = None
    if args.rows is not None:
        select = [r.strip() for r in args.rows.split(",") if r.strip()]
        known = {*CIFAR_BASES, *(f"{a}:{r}:{b}" for a, r, b in ARCH_ROWS)}
        bad = [r for r in select if r not in known]
        if bad:
            print(f"bench_wallclock: unknown rows {bad}; known: {sorted(known)}", file=sys.stderr)
            return 2
    run(args.quick, out, args.trained, args.only, args.train_missing, select)
    return 0


if __name__ == "__main__":
    sys.exit(main())

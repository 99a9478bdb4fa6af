"""DGE speed benchmark on DeiT-S and PVT-v2-b1 (random weights): GMACs of the real sparse path against
``vitconvert.count_macs``, and wall-clock throughput (batch 64) / batch-1 latency against timm, side by side.

* **Gates** are forced (:func:`benchmarks.common.force_ratio`, ``random`` mode: each region of each
  image independently takes one of two neighbouring granularities) so the expected dynamic/static GMACs
  ratio is 0.5, 0.7 or 1.0 (1.0: every region at the finest granularity, i.e. the DGE machinery at no
  saving). Random weights are fine for speed: the cost of a path depends only on the gates. The routers
  still run.
* **GMACs**: the per-image GMACs the model reports (analytic, from the gates each image got) against
  ``count_macs`` of a forward on that image alone, and ``count_macs`` of the whole batch per image (the
  packed layout pads the attention core to the batch's largest query count, so it is a little higher).
* **Throughput / latency**: :func:`benchmarks.protocol.measure` (:func:`vitconvert.timing.compare`): interleaved
  rounds, warm-up excluded, median and spread, ratios as per-round paired medians. Layouts: ``packed`` (default)
  and ``padded``.
* **Threads and the shared CPU**: one thread by default (as the rest of the suite: on this shared 2-core
  machine two threads stall each other); ``--threads2`` adds ``torch.set_num_threads(2)`` in a subprocess
  with ``OMP_WAIT_POLICY=PASSIVE`` (timm gets the same) and ``--omp-default`` two threads with GNU
  OpenMP's default wait policy, where workers spin after each parallel region and starve the many short
  ops of the DGE path.

Run: ``nice -n 5 python -m benchmarks.bench_dge`` or ``python -m benchmarks --only dge`` (writes
``benchmarks/results/dge_speed.json``); ``--update pvt_v2_b1`` re-measures one architecture in every run
the file holds and merges it in. ``--swin`` measures Swin-T at 224 px alone (:func:`run_swin`: two threads,
batch 64 and 1, ratios 0.5 / 0.7 / 0.9 against timm in the same run; ``dge_swin_speed.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import vitconvert
from benchmarks import protocol
from benchmarks.common import REPO, force_ratio, forced_rho, machine_block
from vitconvert.layers.costs import count_macs, to_gmacs
from vitconvert.methods.dge import DGE

ARCHS = ("deit_small_patch16_224", "pvt_v2_b1")
RHOS = (0.5, 0.7, 1.0)
SETTINGS = {
    "full": {"batch": 64, "warmup": 1, "reps": 6, "latency_warmup": 3, "latency_reps": 20, "count_images": 4},
    "quick": {"batch": 8, "warmup": 1, "reps": 2, "latency_warmup": 1, "latency_reps": 3, "count_images": 1},
}


def build(arch: str, rho: float, layout: str = "packed", seed: int = 0, **model_kwargs: Any) -> DGE:
    """A DGE model of ``arch`` (random weights) with gates forced to an expected GMACs ratio ``rho``."""
    torch.manual_seed(seed)
    model = vitconvert.apply(arch, "dge", pretrained=False, model_kwargs=model_kwargs or None,
                             overrides=[f"model.inference_layout={layout}"])
    assert isinstance(model, DGE)
    force_ratio(model, rho, "random", seed=seed)
    return model.eval()


def gmacs_check(model: DGE, x: torch.Tensor, count_images: int) -> dict[str, Any]:
    """Reported per-image GMACs against count_macs on single images and on the whole batch."""
    rho = forced_rho(model)
    assert rho is not None
    # count_macs counts what runs: the sparse path, whose MACs the model reports (auto may run a block densely)
    execution, model.execution = model.execution, "sparse"
    try:
        return _gmacs_check(model, x, count_images, rho)
    finally:
        model.execution = execution


def _gmacs_check(model: DGE, x: torch.Tensor, count_images: int, rho: float) -> dict[str, Any]:
    expected = force_ratio(model, rho, "random", seed=1)
    with torch.inference_mode():
        out = model.forward_dynamic(x)
    reported = out.gmacs.double()
    singles, errors = [], []
    for i in range(count_images):
        # The same random gates for the counted and the reported run: re-seed before each.
        force_ratio(model, rho, "random", seed=100 + i)
        counted = to_gmacs(count_macs(lambda i=i: model.forward_dynamic(x[i:i + 1])))
        force_ratio(model, rho, "random", seed=100 + i)
        with torch.inference_mode():
            rep = float(model.forward_dynamic(x[i:i + 1]).gmacs[0])
        singles.append({"reported": rep, "counted": counted})
        errors.append(abs(rep - counted) / counted)
    force_ratio(model, rho, "random", seed=1)
    batch_counted = to_gmacs(count_macs(lambda: model.forward_dynamic(x))) / x.shape[0]
    force_ratio(model, rho, "random", seed=0)
    return {
        "expected_ratio": expected,
        "reported_mean": float(reported.mean()),
        "reported_min": float(reported.min()),
        "reported_max": float(reported.max()),
        "ratio_to_base": float(reported.mean()) / model.base_gmacs,
        "single_images": singles,
        "max_rel_error_single": max(errors) if errors else None,
        "batch_counted_per_image": batch_counted,
        "queries_per_block_mean": float(out.extras["queries"].mean()),
    }


def measure_arch(arch: str, cfg: dict[str, Any], threads: int, with_gmacs: bool = True) -> dict[str, Any]:
    """GMACs check and side-by-side timing of timm against DGE at each ratio (and the padded layout)."""
    models: dict[str, torch.nn.Module] = {}
    torch.manual_seed(0)
    ref = build(arch, 1.0)
    models["timm"] = ref.build_base()
    dge: dict[str, DGE] = {f"dge_rho{r}": build(arch, r) for r in RHOS}
    dge["dge_rho0.5_padded"] = build(arch, 0.5, layout="padded")
    models.update(dge)
    img = tuple(ref.anatomy.img_size)
    x = protocol.random_batch(img, cfg["batch"])
    info: dict[str, Any] = {"base_gmacs": ref.base_gmacs, "level_ratios": ref.level_ratios(), "gmacs": {}}
    for name, m in dge.items():
        if with_gmacs:
            info["gmacs"][name] = gmacs_check(m, x, cfg["count_images"])
        else:  # measured in another run; the ratio is all the rows need
            info["gmacs"][name] = {"expected_ratio": force_ratio(m, forced_rho(m), "random", seed=0),
                                   "reported_mean": None, "ratio_to_base": None}
    out: dict[str, Any] = {}
    for what, batch in (("throughput", x), ("latency", x[:1])):
        warmup = cfg["warmup"] if what == "throughput" else cfg["latency_warmup"]
        reps = cfg["reps"] if what == "throughput" else cfg["latency_reps"]
        out[f"cpu_{what}"] = protocol.measure(models, batch, warmup=warmup, reps=reps, threads=threads, mode=what,
                                              reference="timm")
    return {"arch": arch, "img_size": list(img), **info, "speed": out}


def measure(quick: bool, threads: int, archs: tuple[str, ...] = ARCHS, with_gmacs: bool = True) -> dict[str, Any]:
    cfg = SETTINGS["quick" if quick else "full"]
    return {
        "threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default (unset)"),
        "settings": cfg,
        "machine": machine_block(),
        "archs": {arch: measure_arch(arch, cfg, threads, with_gmacs) for arch in archs},
    }


def _in_subprocess(quick: bool, threads: int, omp_wait_policy: str | None, with_gmacs: bool,
                   archs: tuple[str, ...] = ARCHS) -> dict[str, Any]:
    """``measure`` in a fresh process: OpenMP reads its environment once, when torch is loaded."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if omp_wait_policy is not None:
        env["OMP_WAIT_POLICY"] = omp_wait_policy
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "out.json"
        cmd = [sys.executable, "-m", "benchmarks.bench_dge", "--worker", str(path), "--threads", str(threads),
               "--archs", *archs]
        if quick:
            cmd.append("--quick")
        if not with_gmacs:
            cmd.append("--no-gmacs")
        subprocess.run(cmd, check=True, cwd=REPO, env=env)
        return json.loads(path.read_text())


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """Throughput ratios, latency ratios and GMACs ratios per arch and model, for the report."""
    out: dict[str, Any] = {}
    for arch, a in result["archs"].items():
        thr = a["speed"]["cpu_throughput"]["results"]
        lat = a["speed"]["cpu_latency"]["results"]
        out[arch] = {
            name: {"gmacs_ratio": round(a["gmacs"][name]["ratio_to_base"], 3) if name in a["gmacs"] else 1.0,
                   "throughput_img_s": round(thr[name]["median"], 2),
                   "throughput_ratio": round(thr[name]["ratio"], 3),
                   "throughput_ratio_p10_p90": [round(thr[name]["ratio_p10"], 3), round(thr[name]["ratio_p90"], 3)],
                   "cpu_time_ratio": round(thr[name].get("cpu_time_ratio", float("nan")), 3),
                   "latency_ms": round(lat[name]["median"], 2),
                   "latency_ratio": round(lat[name]["ratio"], 3)}
            for name in thr
        }
    return out


def _measure_run(key: str, quick: bool, archs: tuple[str, ...] = ARCHS) -> dict[str, Any]:
    """One named run: ``threads1`` (with the GMACs checks), ``threads2_omp_passive`` or ``threads2_default``."""
    if key == "threads1":
        return measure(quick, threads=1, archs=archs)
    if key == "threads2_omp_passive":
        return _in_subprocess(quick, 2, "PASSIVE", False, archs)
    if key == "threads2_default":  # OpenMP reads its environment once: a subprocess if this one set it
        return (measure(quick, threads=2, archs=archs, with_gmacs=False) if "OMP_WAIT_POLICY" not in os.environ
                else _in_subprocess(quick, 2, None, False, archs))
    raise ValueError(f"unknown run {key!r}")


def _copy_gmacs(runs: dict[str, Any]) -> None:
    """GMACs do not depend on threads: copy the one-thread run's measured ones next to the other timings."""
    for key, res in runs.items():
        if key != "threads1":
            for arch, a in res["archs"].items():
                a["gmacs"] = runs["threads1"]["archs"][arch]["gmacs"]


def run(quick: bool, out_dir: Path, threads2: bool = False, omp_default: bool = False) -> dict[str, Any]:
    """Measure DGE at GMACs ratios 0.5 / 0.7 / 1.0 against timm; write ``dge_speed.json``.

    Full runs: one thread (GMACs checked there; what ``python -m benchmarks`` runs, to stay within the
    hour); ``threads2`` adds two threads with ``OMP_WAIT_POLICY=PASSIVE`` and ``omp_default`` two threads
    with OpenMP's default policy (the slow case the module docstring describes), 8-15 minutes each.
    """
    if quick:  # smoke run: this process's environment only
        return _write({"threads2": measure(quick, threads=2)}, quick, out_dir)
    keys = ["threads1", *(["threads2_omp_passive"] if threads2 else []), *(["threads2_default"] if omp_default else [])]
    runs = {key: _measure_run(key, quick) for key in keys}
    _copy_gmacs(runs)
    return _write(runs, quick, out_dir)


def update(arch: str, out_dir: Path) -> dict[str, Any]:
    """Re-measure one architecture in every run the existing ``dge_speed.json`` holds and merge it in (after
    a change that affects only that family); the re-measured entries record their own machine block and date."""
    path = out_dir / "dge_speed.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: run the whole benchmark first")
    runs = json.loads(path.read_text())["runs"]
    keys = ["threads1", *(k for k in ("threads2_omp_passive", "threads2_default") if k in runs)]
    fresh = {key: _measure_run(key, False, (arch,)) for key in keys}
    _copy_gmacs(fresh)
    for key, res in fresh.items():
        entry = res["archs"][arch]
        entry["machine"] = res["machine"]
        runs[key]["archs"][arch] = entry
    return _write(runs, False, out_dir)


SWIN = "swin_tiny_patch4_window7_224"
SWIN_RHOS = (0.5, 0.7, 0.9)
SWIN_SETTINGS = {"batch": 64, "warmup": 1, "reps": 3, "latency_warmup": 2, "latency_reps": 10, "count_images": 1}


def run_swin(out_dir: Path, threads: int = 2) -> dict[str, Any]:
    """DGE on Swin-T at 224 px (random weights) against timm's Swin-T, side by side in one run: batch-64 throughput
    and batch-1 latency at GMACs ratios 0.5, 0.7 and 0.9 (gates forced at random per image and region, as above;
    ``execution: auto``), on ``threads`` threads; the GMACs check on one image; ``uptime`` before and after (the
    machine is shared). Writes ``dge_swin_speed.json``."""
    cfg = SWIN_SETTINGS
    torch.set_num_threads(threads)
    uptime = [subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()]
    torch.manual_seed(0)
    dge = {f"dge_rho{r}": build(SWIN, r) for r in SWIN_RHOS}
    ref = next(iter(dge.values()))
    models: dict[str, torch.nn.Module] = {"timm": ref.build_base().eval(), **dge}
    x = protocol.random_batch(tuple(ref.anatomy.img_size), cfg["batch"])
    gmacs = {name: gmacs_check(m, x[:8], cfg["count_images"]) for name, m in dge.items()}
    speed = {f"cpu_{what}": protocol.measure(models, batch, warmup=cfg[f"{pre}warmup"], reps=cfg[f"{pre}reps"],
                                             threads=threads, mode=what, reference="timm")
             for what, batch, pre in (("throughput", x, ""), ("latency", x[:1], "latency_"))}
    uptime.append(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    entry = {"arch": SWIN, "img_size": list(ref.anatomy.img_size), "base_gmacs": ref.base_gmacs,
             "level_ratios": ref.level_ratios(), "gmacs": gmacs, "speed": speed}
    res = {"threads": threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default (unset)"),
           "settings": cfg, "machine": machine_block(), "archs": {SWIN: entry}}
    rows = []
    for name, g in gmacs.items():
        rows += protocol.result_row(speed, name, method="dge", backbone=SWIN,
                                    setting=f"rho={g['expected_ratio']:.2g}, {threads} thread(s)",
                                    gmacs=g["reported_mean"], base_gmacs=ref.base_gmacs,
                                    notes="random weights; gates forced at random per image and region; "
                                          "the machine's load is in uptime")
    result = {"name": "dge_swin", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_block(),
              "uptime": uptime,
              "note": "the CPU may be shared with other jobs: uptime before and after says how loaded it was; "
                      "models timed side by side in interleaved rounds",
              "summary": summary(res), "runs": {f"threads{threads}": res}, "rows": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "dge_swin_speed.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def _write(runs: dict[str, Any], quick: bool, out_dir: Path) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for res in runs.values():
        for arch, a in res["archs"].items():
            for name in ("dge_rho0.5", "dge_rho0.7", "dge_rho0.5_padded"):
                g = a["gmacs"][name]
                rows += protocol.result_row(
                    a["speed"], name, method="dge", backbone=arch,
                    setting=f"rho={g['expected_ratio']:.2g}{' padded' if 'padded' in name else ''}, "
                            f"{res['threads']} thread(s), OMP_WAIT_POLICY={res['omp_wait_policy']}",
                    gmacs=g["reported_mean"], base_gmacs=a["base_gmacs"],
                    notes="random weights; gates forced at random per image and region")
    target_run = "threads2" if quick else "threads1"
    target = runs[target_run]["archs"]["deit_small_patch16_224"]["speed"]["cpu_throughput"]
    result = {
        "name": "dge",
        "quick": quick,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_block(),
        "note": ("CPU shared with other engineers' jobs while measuring (see load averages); run under "
                 "nice -n 5; models timed side by side in interleaved rounds; an architecture entry with its "
                 "own 'machine' block was re-measured later with `--update ARCH`"),
        "summary": {key: summary(res) for key, res in runs.items()},
        "runs": runs,
        "rows": rows,
        "target": {"what": f"deit_small_patch16_224 batch-64 CPU throughput ratio at rho=0.5 >= 1.5 ({target_run})",
                   "value": target["results"]["dge_rho0.5"]["ratio"]},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "dge_speed.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--no-gmacs", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--archs", nargs="+", choices=ARCHS, default=list(ARCHS), help=argparse.SUPPRESS)
    parser.add_argument("--threads2", action="store_true",
                        help="also measure two threads with OMP_WAIT_POLICY=PASSIVE (8-12 more minutes)")
    parser.add_argument("--omp-default", action="store_true",
                        help="also measure two threads with OpenMP's default wait policy (10-15 more minutes)")
    parser.add_argument("--update", choices=ARCHS, default=None,
                        help="re-measure only this architecture (every run) and merge it into dge_speed.json")
    parser.add_argument("--swin", action="store_true", help="measure Swin-T at 224 px alone (dge_swin_speed.json)")
    args = parser.parse_args(argv)
    if args.swin:
        out = args.out or (REPO / "benchmarks" / "results")
        print(json.dumps(run_swin(out)["summary"], indent=1))
        return 0
    if args.worker is not None:
        result = measure(args.quick, args.threads, archs=tuple(args.archs), with_gmacs=not args.no_gmacs)
        args.worker.write_text(json.dumps(result))
        return 0
    out = args.out or (REPO / "benchmarks" / "results" / ("quick" if args.quick else ""))
    result = update(args.update, out) if args.update else run(args.quick, out, args.threads2, args.omp_default)
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run the vitconvert benchmark suite and regenerate ``benchmarks/results/SUMMARY.md``.

Every module ``benchmarks/bench_<name>.py`` that exposes ``run(quick: bool, out_dir: Path) -> dict`` is a
benchmark called ``<name>``; so are ``benchmarks/tome.py`` (``tome``, the training-free ToMe baseline),
``benchmarks/cifar10_no_finetune.py`` (``no_finetune``, each method calibrated without fine-tuning, beside ToMe)
and ``benchmarks/cifar10_short_recipe.py`` (``cifar10``, accuracy after the short fine-tuning recipe)
when present. Each writes its JSON into the results folder and returns it; the run order is the speed
benchmarks first, accuracy last. The full suite takes about 52 minutes on the 2-core CPU (speed
13.8 min, timed; accuracy ~38 min, from the three runs' recorded times); ``--quick`` (smaller batches, fewer
repetitions) a few minutes, and it writes to ``benchmarks/results/quick/`` so it never overwrites
committed numbers.

Every timing goes through :func:`vitconvert.timing.compare` (the protocol calibration uses too), with the suite's
settings and records in ``benchmarks/protocol.py`` and what the suite shares with the studies in
``benchmarks/common.py``. One model with any recipe: ``python -m benchmarks.run`` (the model-agnostic runner).
One-off investigations live in ``benchmarks/studies/`` and are not run here.

Usage::

    python -m benchmarks                       # everything, full protocol
    python -m benchmarks --quick               # smoke run
    python -m benchmarks --only cfvit tome     # a subset
    python -m benchmarks --list
    python -m benchmarks --threads 0           # torch's default thread count instead of one thread
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
# Benchmarks that are not named bench_*: name -> module (run last: accuracy takes longest).
EXTRA = {"tome": "tome", "no_finetune": "cifar10_no_finetune", "cifar10": "cifar10_short_recipe"}


def discover() -> dict[str, str]:
    """Benchmark name -> module name (``benchmarks.<module>``), speed benchmarks first."""
    found = {p.stem[len("bench_"):]: p.stem for p in sorted(HERE.glob("bench_*.py"))}
    for name, module in EXTRA.items():
        if (HERE / f"{module}.py").is_file():
            found.setdefault(name, module)
    return found


def load_runner(module: str) -> Callable[[bool, Path], dict[str, Any]]:
    """The module's ``run(quick, out_dir)``; raises ``AttributeError`` if it has none."""
    mod = importlib.import_module(f"benchmarks.{module}")
    runner = getattr(mod, "run", None)
    if not callable(runner):
        raise AttributeError(f"benchmarks/{module}.py has no run(quick: bool, out_dir: Path) -> dict")
    return runner


def main(argv: list[str] | None = None) -> int:
    known = discover()
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller batches and fewer repetitions (minutes)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help=f"run only these (known: {', '.join(known)})")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default benchmarks/results, or benchmarks/results/quick)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads for every benchmark (default 1: single-thread CPU numbers are "
                             "the most reproducible, and multi-threaded runs stall on a shared machine; "
                             "0 keeps torch's default)")
    parser.add_argument("--no-report", action="store_true", help="do not regenerate SUMMARY.md and plots")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)

    if args.list:
        for name, module in known.items():
            print(f"{name:12s} benchmarks/{module}.py")
        return 0
    selected = args.only or list(known)
    unknown = [n for n in selected if n not in known]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(known)}")
    out_dir = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.threads < 0:
        parser.error("--threads must be >= 0")
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    suite_path = out_dir / "suite.json"
    suite: dict[str, Any] = json.loads(suite_path.read_text()) if suite_path.is_file() else {}
    failed = []
    for name in selected:
        print(f"== {name} (benchmarks/{known[name]}.py){' [quick]' if args.quick else ''}", flush=True)
        t0 = time.perf_counter()
        entry: dict[str, Any] = {"quick": args.quick, "threads": torch.get_num_threads()}
        try:
            result = load_runner(known[name])(args.quick, out_dir)
            entry["ok"] = True
            if isinstance(result, dict) and "target" in result:
                entry["target"] = result["target"]
        except (Exception, SystemExit) as e:  # one broken benchmark must not lose the others' results
            traceback.print_exc()
            entry.update(ok=False, error=f"{type(e).__name__}: {e}")
            failed.append(name)
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        entry["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        suite[name] = entry
        suite_path.write_text(json.dumps(suite, indent=1) + "\n")
        print(f"   {'ok' if entry['ok'] else 'FAILED'} in {entry['seconds']:.0f}s", flush=True)

    if not args.no_report:
        from benchmarks import report

        summary = report.generate(out_dir)
        print(f"summary -> {summary}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

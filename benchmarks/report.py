"""Regenerate ``SUMMARY.md`` and the plots from the JSON results, without rerunning anything.

Reads every ``*.json`` in the results folder:

* files with ``rows`` (what the benchmark ``run()`` functions return; keys listed in
  :func:`benchmarks.protocol.result_row`) feed the speed tables (rows with ``throughput_ratio``) and the
  accuracy table (rows with ``top1``);
* ``base_models.json`` (``benchmarks/train_base.py``) feeds the CIFAR-10 base-model table;
* ``suite.json`` (``python -m benchmarks``) gives each benchmark's wall time.

Writes ``SUMMARY.md``, ``throughput_ratio.png`` and, when accuracy rows exist, ``accuracy_vs_gmacs.png``.

Usage::

    python -m benchmarks.report [--results benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def load_results(results: Path) -> dict[str, dict[str, Any]]:
    """File stem -> parsed JSON for every readable ``*.json`` in ``results``."""
    out = {}
    for path in sorted(results.glob("*.json")):
        try:
            out[path.stem] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return out


def collect_rows(data: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The suite's rows: entries of a file's ``rows`` that say which method on which backbone they measured (a
    study's own ``rows``, e.g. per-block timings or a sweep's points, are not summary rows)."""
    rows = []
    for stem, d in data.items():
        for row in d.get("rows", []) if isinstance(d, dict) else []:
            if isinstance(row, dict) and row.get("method") and row.get("backbone"):
                rows.append({**row, "_source": stem, "_machine": d.get("machine", {}), "_quick": d.get("quick")})
    return rows


def _f(value: Any, fmt: str = "{:.2f}", dash: str = "–") -> str:
    if value is None:
        return dash
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


def _ratio(row: dict[str, Any]) -> str:
    r = row.get("throughput_ratio")
    if r is None:
        return "–"
    lo, hi = row.get("throughput_ratio_p10"), row.get("throughput_ratio_p90")
    spread = f" ({lo:.2f}–{hi:.2f})" if lo is not None and hi is not None else ""
    return f"**{r:.2f}×**{spread}"


def _gmacs(row: dict[str, Any]) -> str:
    g, b = row.get("gmacs"), row.get("base_gmacs")
    if g is None:
        return "–"
    return f"{g:.2f} ({b:.2f})" if b is not None else f"{g:.2f}"


def _finetune(row: dict[str, Any]) -> str:
    if row.get("finetune_minutes") is not None:
        return f"{row['finetune_minutes']:.0f} min"
    if row.get("finetune_seconds") is not None:
        return f"{row['finetune_seconds'] / 60:.0f} min"
    return "–"


def speed_tables(rows: list[dict[str, Any]]) -> list[str]:
    """One markdown table per run (results file) and device/precision/batch: each shares one timm reference."""
    groups: dict[tuple[str, str, str, Any], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r.get("throughput_ratio") is not None:
            key = (r["_source"], str(r.get("device", "cpu")), str(r.get("precision", "fp32")), r.get("batch"))
            groups[key].append(r)
    lines: list[str] = []
    # The wall-clock table (trained models at their calibrated points first) leads; then the others by name.
    for (source, device, precision, batch), group in sorted(
            groups.items(), key=lambda kv: (kv[0][1] != "cpu", kv[0][0] != "wallclock", kv[0][0], -(kv[0][3] or 0))):
        cpu_time = any(r.get("cpu_time_ratio") is not None for r in group)
        lines += [
            f"### `{source}.json`: {device.upper() if device == 'cpu' else device}, {precision}, batch {batch}",
            "",
            "| Method | Backbone | Setting | GMACs (timm) | img/s (timm) | Throughput vs timm (p10–p90) "
            + ("| By CPU time " if cpu_time else "") + "| Batch-1 ms (timm) | Batch-1 speed-up |",
            "|---|---|---|---|---|---|" + ("---|" if cpu_time else "") + "---|---|",
        ]
        for r in sorted(group, key=lambda r: (r.get("backbone", ""), r.get("method", ""), r.get("gmacs") or 0)):
            lines.append(
                f"| {r.get('method', '?')} | {r.get('backbone', '?')} | {r.get('setting', '')} | {_gmacs(r)} "
                f"| {_f(r.get('throughput'), '{:.1f}')} ({_f(r.get('base_throughput'), '{:.1f}')}) | {_ratio(r)} "
                + (f"| {_f(r.get('cpu_time_ratio'), '{:.2f}×')} " if cpu_time else "")
                + f"| {_f(r.get('latency_ms'), '{:.1f}')} ({_f(r.get('base_latency_ms'), '{:.1f}')}) "
                f"| {_f(r.get('latency_ratio'), '{:.2f}×')} |"
            )
        lines.append("")
    return lines


def accuracy_table(rows: list[dict[str, Any]]) -> list[str]:
    acc = [r for r in rows if r.get("top1") is not None]
    if not acc:
        return []
    lines = [
        "| Method | Backbone | Setting | GMACs (base) | Top-1 (base) | Δ top-1 | Fine-tune |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(acc, key=lambda r: (r.get("backbone", ""), r.get("method", ""), -(r.get("gmacs") or 0))):
        base = r.get("base_top1")
        delta = r["top1"] - base if base is not None else None
        lines.append(
            f"| {r.get('method', '?')} | {r.get('backbone', '?')} | {r.get('setting', '')} | {_gmacs(r)} "
            f"| {r['top1']:.2f} ({_f(base)}) | {_f(delta, '{:+.2f}')} | {_finetune(r)} |"
        )
    return [*lines, ""]


def base_model_table(data: dict[str, Any]) -> list[str]:
    models = data.get("models") or {}
    if not models:
        return []
    lines = ["| Model | Architecture | Params | GMACs | Val top-1 | Train time |", "|---|---|---|---|---|---|"]
    for name, m in models.items():
        lines.append(
            f"| {name} | {m.get('arch', '?')} | {_f(m.get('params') and m['params'] / 1e6, '{:.2f} M')} "
            f"| {_f(m.get('gmacs'), '{:.3f}')} | {_f(m.get('val_top1'))} "
            f"| {_f(m.get('train_seconds') and m['train_seconds'] / 60, '{:.0f} min')} |"
        )
    return [*lines, ""]


def machine_lines(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["_machine"]:
            seen.setdefault(r["_source"], r["_machine"])
    lines = []
    for source, m in sorted(seen.items()):
        load = m.get("load_average")
        lines.append(
            f"- `{source}.json`: {m.get('cpu')} ({m.get('cpu_count')} cores, torch threads: "
            f"{m.get('torch_threads')}), torch {m.get('torch')}, timm {m.get('timm')}, "
            f"vitconvert {m.get('vitconvert')}; measured {m.get('date')}, nice {m.get('nice')}"
            + (f", load average {load[0]:.1f}" if load else "")
            + (f". {m['shared_machine']}." if m.get("shared_machine") else ".")
        )
    return lines


def plot_throughput(rows: list[dict[str, Any]], path: Path) -> bool:
    """Horizontal bars of throughput ratio vs timm (p10–p90 whiskers), one panel per device."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = [r for r in rows if r.get("throughput_ratio") is not None]
    if not speed:
        return False
    devices = sorted({str(r.get("device", "cpu")) for r in speed}, key=lambda d: (d != "cpu", d))
    fig, axes = plt.subplots(len(devices), 1, figsize=(8, 0.45 * len(speed) + 1.5 * len(devices)), squeeze=False)
    colors = {"cfvit": "tab:blue", "dge": "tab:green", "tome": "tab:gray"}
    for ax, dev in zip(axes[:, 0], devices, strict=True):
        group = sorted([r for r in speed if str(r.get("device", "cpu")) == dev],
                       key=lambda r: (r["_source"], r.get("backbone", ""), r.get("method", ""),
                                      r.get("setting", "")))
        labels = [f"{r.get('method')} {r.get('setting', '')} · {r.get('backbone', '')} [{r['_source']}]"
                  for r in group]
        vals = [r["throughput_ratio"] for r in group]
        lo = [r["throughput_ratio"] - r.get("throughput_ratio_p10", r["throughput_ratio"]) for r in group]
        hi = [r.get("throughput_ratio_p90", r["throughput_ratio"]) - r["throughput_ratio"] for r in group]
        ax.barh(range(len(group)), vals, xerr=[lo, hi], capsize=3,
                color=[colors.get(str(r.get("method")), "tab:orange") for r in group])
        ax.set_yticks(range(len(group)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_xlabel("throughput vs timm (×, median of paired rounds)")
        prec = group[0].get("precision", "")
        ax.set_title(f"{dev}: {prec}, batch {group[0].get('batch')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_accuracy(rows: list[dict[str, Any]], path: Path) -> bool:
    """Top-1 against GMACs: one marker per operating point (a line when a row carries a ``curve``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = [r for r in rows if r.get("top1") is not None and r.get("gmacs") is not None]
    if not acc:
        return False
    fig, ax = plt.subplots(figsize=(7, 5))
    bases: set[tuple[str, float, float]] = set()
    for key in sorted({(r.get("method", "?"), r.get("backbone", "?")) for r in acc}):
        group = sorted([r for r in acc if (r.get("method", "?"), r.get("backbone", "?")) == key],
                       key=lambda r: r["gmacs"])
        line = ax.plot([r["gmacs"] for r in group], [r["top1"] for r in group], "o-", label=f"{key[0]} · {key[1]}")
        for r in group:
            curve = r.get("curve")
            if curve:
                xs = [p["gmacs"] if isinstance(p, dict) else p[0] for p in curve]
                ys = [p["top1"] if isinstance(p, dict) else p[1] for p in curve]
                ax.plot(xs, ys, "-", alpha=0.4, color=line[0].get_color())
            if r.get("base_gmacs") is not None and r.get("base_top1") is not None:
                bases.add((str(key[1]), float(r["base_gmacs"]), float(r["base_top1"])))
    for i, (bb, g, t) in enumerate(sorted(bases)):
        ax.plot([g], [t], "kx", markersize=9, label="base models" if i == 0 else None)
        ax.annotate(bb, (g, t), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("GMACs per image")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def generate(results: Path = RESULTS) -> Path:
    """Write ``SUMMARY.md`` (and the PNG plots) in ``results`` from its JSON files; returns the summary path.

    Example:
        >>> generate(Path("benchmarks/results"))  # doctest: +SKIP
        PosixPath('benchmarks/results/SUMMARY.md')
    """
    data = load_results(results)
    rows = collect_rows(data)
    lines = [
        "# Benchmark summary",
        "",
        f"Generated by `python -m benchmarks.report` from `{results.name}/*.json`; rerun "
        "`python -m benchmarks` to measure again.",
        "",
    ]
    if any(r.get("_quick") for r in rows):
        lines += ["> **Quick run**: small batches and few repetitions; numbers are a smoke test only.", ""]
    speed = speed_tables(rows)
    if speed:
        lines += [
            "## Speed",
            "",
            "Random-weight models at 224 px (the cost of each path does not depend on the weights). GMACs: "
            "`vitconvert.count_macs` per image, fvcore-style MACs with attention included (timm publishes "
            "4.61 for DeiT-S). Throughput: the models of one benchmark run side by side, interleaved "
            "round by round; the ratio is the median over rounds of the paired speed-up against the timm "
            "model timed in the same round, p10–p90 in brackets. Batch-1: median latency in ms; for "
            "early-exit models the mean over images of the exit and full paths at that fine-stage fraction. "
            "By CPU time: the same paired ratio computed from the process's CPU time instead of wall "
            "time, a cross-check that ignores time spent descheduled on a shared machine.",
            "",
            *speed,
        ]
    acc = accuracy_table(rows)
    if acc:
        lines += ["## Accuracy", "", *acc]
    if "base_models" in data:
        base = base_model_table(data["base_models"])
        if base:
            lines += ["## CIFAR-10 base models", "", data["base_models"].get("split", ""), "", *base]
    plots = []
    if plot_throughput(rows, results / "throughput_ratio.png"):
        plots.append("![throughput vs timm](throughput_ratio.png)")
    if plot_accuracy(rows, results / "accuracy_vs_gmacs.png"):
        plots.append("![accuracy vs GMACs](accuracy_vs_gmacs.png)")
    if plots:
        lines += ["## Plots", "", *plots, ""]
    machines = machine_lines(rows)
    if machines:
        lines += ["## Where and how measured", "", *machines, ""]
    suite = data.get("suite") or {}
    if suite:
        lines += ["| Benchmark | Status | Wall time | Threads |", "|---|---|---|---|"]
        for name, e in suite.items():
            status = "ok" if e.get("ok") else f"failed: {e.get('error', '?')}"
            lines.append(f"| {name} | {status} | {e.get('seconds', 0) / 60:.1f} min | {e.get('threads', '–')} |")
        lines.append("")
    path = results / "SUMMARY.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder with the JSON results")
    args = parser.parse_args(argv)
    print(generate(args.results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

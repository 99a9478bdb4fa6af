"""Benchmark any model with any recipe: GMACs and wall-clock speed of the converted model against its base model.

The model-agnostic runner of the suite, like timm's ``benchmark.py``: it converts ``--model`` with ``--recipe``
(random weights unless the weights are local: a ``local-dir:`` base folder or ``--checkpoint``; ``--pretrained``
downloads them), or loads a converted model folder when no recipe is given; sets the operating point
(``--point`` or, for a calibrated folder, ``--budget``); then on one batch (random images, or real ones spread
over ``--data``'s evaluation split):

* **GMACs**: the per-image mean of ``forward_dynamic(batch).gmacs`` against the base model's GMACs;
* **speed**: the converted model and its base (``build_base()``: the same architecture and weights, as timm
  builds it) timed by :func:`vitconvert.timing.compare`: untimed warm-up, interleaved rounds with the order
  rotated, images/s with spread, the speed-up as the median of per-round paired ratios with p10/p90.

Random weights are fine for speed where the path's cost does not depend on them (DGE and FSLA at a point); a
cascade's exits (CF-ViT, DVT) depend on its confidences, so time a trained model on real images (``--data``)
for those, or use the suite's benchmarks, which pin the exit shares.

Usage (from the repo root)::

    python -m benchmarks.run --model deit_small_patch16_224 --recipe dge --point coarsening=0.5 \\
        --batch-size 64 --threads 1 --json out.json
    python -m benchmarks.run --model local-dir:benchmarks/checkpoints/cifar10-vit --recipe cfvit \\
        --data ../shared/data/cifar10/train --batch-size 64
    python -m benchmarks.run --model path/to/calibrated-folder --budget 50% --device cuda --bf16 --batch-size 256

Prints a summary and, with ``--json``, writes the full record (settings, GMACs, every timed repetition, machine).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

import vitconvert
from benchmarks.common import machine_block
from benchmarks.protocol import dynamic_outputs, measure, random_batch
from vitconvert.data import open_image_folder, spread_batch
from vitconvert.errors import UserError
from vitconvert.methods.base import ConvertedModel
from vitconvert.operating import format_point
from vitconvert.sources import parse_model_kwargs
from vitconvert.timing import device_name

__all__ = ["benchmark", "build", "main", "parse_point", "timing_batch"]


def parse_point(text: str) -> dict[str, float]:
    """``"coarsening=0.5"`` or ``"eta=0.4,alpha=0.5"`` -> ``{"eta": 0.4, "alpha": 0.5}``."""
    point = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        try:
            point[name.strip()] = float(value)
        except ValueError:
            raise UserError(f"--point {text!r}: write KNOB=VALUE[,KNOB=VALUE]") from None
        if not name.strip():
            raise UserError(f"--point {text!r}: write KNOB=VALUE[,KNOB=VALUE]")
    return point


def build(model: str, recipe: str | None = None, *, overrides: list[str] | None = None,
          model_kwargs: dict[str, Any] | None = None, checkpoint: str | None = None, pretrained: bool | None = None
          ) -> tuple[ConvertedModel, str]:
    """The converted model to time and where its weights came from.

    Args:
        model: With ``recipe``: a timm name, ``hf-hub:``, ``local-dir:`` or a base model folder. Without: a
            converted model folder (``local-dir:`` or ``hf-hub:`` too).
        recipe: Recipe name or YAML path; None loads ``model`` as a converted model.
        overrides: Recipe overrides ``key=value``.
        model_kwargs: timm ``create_model`` kwargs.
        checkpoint: Weights file for the base model.
        pretrained: Load the source's weights; default: only when they are local (a ``local-dir:`` base).
    """
    if recipe is None:
        if overrides or model_kwargs or checkpoint:
            raise UserError("--set, --model-kwargs and --checkpoint need --recipe (a converted folder has its own)")
        return vitconvert.load(model).eval(), "converted model folder"
    if not model.startswith(("hf-hub:", "local-dir:")) and Path(model).expanduser().is_dir():
        model = f"local-dir:{model}"
    if pretrained is None:
        pretrained = model.startswith("local-dir:")
    converted = vitconvert.apply(model, recipe, checkpoint=checkpoint, model_kwargs=model_kwargs,
                                 pretrained=pretrained, overrides=overrides)
    weights = f"checkpoint {checkpoint}" if checkpoint else "pretrained (the source's)" if pretrained else "random"
    return converted.eval(), weights


def timing_batch(model: ConvertedModel, batch_size: int, data: str | None = None, seed: int = 0) -> tuple[torch.Tensor,
                                                                                                         str]:
    """The batch to time on and a description: random images (``seed``) at the model's input size, or real images
    spread evenly over the evaluation split of the image folder ``data`` (its val/ split, else the held-out part)."""
    if data is None:
        return random_batch(model.anatomy.img_size, batch_size, seed), f"random images (seed {seed})"
    folder = open_image_folder(data)
    split = folder.eval_split()
    return spread_batch(split.files, model, batch_size), f"{len(split)} images of {data}, {batch_size} spread over them"


def benchmark(model: ConvertedModel, base: nn.Module, x: torch.Tensor, *, warmup: int = 2, rounds: int = 5,
              max_rounds: int = 100, min_seconds: float = 10.0, bf16: bool = False, threads: int | None = None
              ) -> dict[str, Any]:
    """GMACs of ``model`` on ``x`` and the side-by-side timing of ``model`` against ``base`` (both on ``x``'s
    device, in eval mode).

    Returns:
        ``{"gmacs": {converted (per-image mean), converted_min, converted_max, base, share}, "speed":
        benchmarks.protocol.measure's record (``converted`` and ``base``, the ratios against the base),
        "summary": {images_per_s, base_images_per_s, ratio, ratio_p10, ratio_p90, rounds}}``.

    Example:
        >>> m = vitconvert.apply("deit_tiny_patch16_224", "dge", pretrained=False)  # doctest: +SKIP
        >>> benchmark(m, m.build_base(), random_batch((224, 224), 8), min_seconds=1)["summary"]  # doctest: +SKIP
    """
    gmacs = torch.cat([o.gmacs.float() for o in dynamic_outputs(model, x, bf16=bf16)])
    speed = measure({"converted": model, "base": base}, x, warmup=warmup, reps=rounds, reference="base", bf16=bf16,
                    threads=threads, min_seconds=min_seconds, max_rounds=max_rounds)
    conv, ref = speed["results"]["converted"], speed["results"]["base"]
    mean = float(gmacs.mean())
    return {
        "gmacs": {"converted": mean, "converted_min": float(gmacs.min()), "converted_max": float(gmacs.max()),
                  "base": model.base_gmacs, "share": mean / model.base_gmacs},
        "speed": speed,
        "summary": {"images_per_s": conv["median"], "base_images_per_s": ref["median"], "ratio": conv["ratio"],
                    "ratio_p10": conv["ratio_p10"], "ratio_p90": conv["ratio_p90"], "rounds": conv["reps"]},
    }


def describe(result: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    g, s, cfg = result["gmacs"], result["summary"], result["speed"]["config"]
    conv, base = result["speed"]["results"]["converted"], result["speed"]["results"]["base"]
    return "\n".join([
        f"{result['architecture']} + {result['recipe'] or result['method']} ({result['weights']} weights), "
        f"point {format_point(result['point'])}",
        f"{result['device']}, {cfg['threads'] or '-'} thread(s), {cfg['precision']}, batch {cfg['batch']}, "
        f"{result['input']}",
        f"GMACs per image: {g['converted']:.4g} of the base's {g['base']:.4g} ({g['share']:.1%})",
        f"images/s: converted {conv['median']:.1f} (p10 {conv['p10']:.1f}, p90 {conv['p90']:.1f}), "
        f"base {base['median']:.1f} (p10 {base['p10']:.1f}, p90 {base['p90']:.1f})",
        f"speed-up over the base: {s['ratio']:.3f}x (p10 {s['ratio_p10']:.3f}, p90 {s['ratio_p90']:.3f}; median of "
        f"{s['rounds']} paired rounds after {cfg['warmup']} warm-up)",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True,
                        help="with --recipe: timm name, hf-hub:, local-dir: or a base folder; without: a converted "
                             "model folder")
    parser.add_argument("--recipe", default=None, help="recipe name or YAML path (omit for a converted folder)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=None, metavar="KEY=VALUE",
                        help="recipe overrides, e.g. model.inference_layout=padded")
    parser.add_argument("--model-kwargs", nargs="+", action="extend", default=None, metavar="KEY=VALUE",
                        help="timm create_model kwargs, e.g. img_size=384")
    parser.add_argument("--checkpoint", default=None, help="weights file for the base model")
    parser.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                        help="load the source's weights (default: only a local-dir: base's)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--point", default=None, metavar="KNOB=V[,KNOB=V]", help="operating point, e.g. coarsening=0.5")
    where.add_argument("--budget", default=None, help="budget for a calibrated folder: 50%%, 2.1 (GMACs), drop=0.5")
    parser.add_argument("--data", default=None, help="image folder: time on its images (default: random images)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0: torch's default)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds (default 2)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds at least (default 5)")
    parser.add_argument("--min-seconds", type=float, default=10.0,
                        help="keep timing rounds until this many seconds have passed (default 10)")
    parser.add_argument("--max-rounds", type=int, default=100, help="timed rounds at most (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and images")
    parser.add_argument("--json", type=Path, default=None, help="write the full record here")
    args = parser.parse_args(argv)
    if args.threads < 0 or args.batch_size < 1:
        parser.error("--threads must be >= 0 and --batch-size >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        torch.manual_seed(args.seed)
        model, weights = build(args.model, args.recipe, overrides=args.overrides,
                               model_kwargs=parse_model_kwargs(args.model_kwargs) or None,
                               checkpoint=args.checkpoint, pretrained=args.pretrained)
        if args.point:
            model.set_operating_point(parse_point(args.point))
        elif args.budget:
            model.set_budget(args.budget)
        x, described = timing_batch(model, args.batch_size, args.data, args.seed)
    except UserError as e:
        print(f"benchmarks.run: {e}", file=sys.stderr)
        return 2
    base = model.build_base().eval()
    model.to(device)
    base.to(device)
    result = {
        "name": "run", "model": args.model, "recipe": args.recipe, "method": model.method,
        "architecture": model.base_spec.architecture, "weights": weights, "point": dict(model.operating_point),
        "budget": args.budget, "batch_size": args.batch_size, "img_size": list(model.anatomy.img_size),
        "input": described, "device": device_name(device),
        "params_m": {"converted": sum(p.numel() for p in model.parameters()) / 1e6,
                     "base": sum(p.numel() for p in base.parameters()) / 1e6},
        **benchmark(model, base, x.to(device), warmup=args.warmup, rounds=args.rounds, max_rounds=args.max_rounds,
                    min_seconds=args.min_seconds, bf16=args.bf16),
        "machine": machine_block(),
        "command": ["python", "-m", "benchmarks.run", *(sys.argv[1:] if argv is None else argv)],
    }
    print(describe(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"-> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

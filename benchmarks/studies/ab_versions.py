"""Time this checkout's vitconvert against an earlier revision's, side by side in one process.

A refactor must not make a converted model slower. Two separate benchmark runs on a shared machine differ by
10-20% from run to run, which hides a few percent; this study instead loads the earlier revision's package under
another name (``git archive REV vitconvert`` unpacked into a temporary folder, its imports renamed to
``vitconvert_<rev>``), converts the same timm model with both (same weights, same recipe, same operating point; DGE
with the same forced gates), checks that they compute the same logits and GMACs, and times both and the base model
in the same interleaved rounds (:func:`vitconvert.timing.compare`): the ratio new/old is a per-round paired median.

Usage (from the repo root)::

    python -m benchmarks.studies.ab_versions --rev 38cd76d --model deit_small_patch16_224 --recipe dge \\
        --dge-finest-share 0.5 --batch-size 64 --threads 2 [--json OUT.json]
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import timm
import torch

import vitconvert
from benchmarks.common import REPO, machine_block
from vitconvert.timing import compare


def load_revision(rev: str, into: Path) -> Any:
    """The package as it was at ``rev``, importable as ``vitconvert_<rev>`` (its own timm entrypoints aside)."""
    name = "vitconvert_" + re.sub(r"\W", "_", rev)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "vitconvert"], check=True,
                             capture_output=True).stdout
    with tempfile.NamedTemporaryFile(suffix=".tar") as tmp:
        tmp.write(archive)
        tmp.flush()
        with tarfile.open(tmp.name) as tar:
            tar.extractall(into, filter="data")
    package = into / name
    (into / "vitconvert").rename(package)
    pattern = re.compile(r"\bvitconvert(?=[.:\s]|$)")
    for path in package.rglob("*.py"):
        path.write_text(pattern.sub(name, path.read_text()))
    sys.path.insert(0, str(into))
    return importlib.import_module(name)


def dge_gates(finest_share: float) -> Any:
    """The same random gates for both versions: per block and region, the finest level or the coarsest."""
    def gates(block: int, batch: int, regions: int, device: torch.device) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 + block)
        return torch.where(torch.rand(batch, regions, generator=g) < finest_share, 0, 2).to(device)
    return gates


def run(rev: str, model: str, recipe: str, batch_size: int, threads: int, rounds: int, point: dict[str, float],
        finest_share: float | None) -> dict[str, Any]:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as folder:
        old_pkg = load_revision(rev, Path(folder))
        torch.manual_seed(0)
        base = timm.create_model(model, pretrained=False).eval()
        models = {"old": old_pkg.apply(base, recipe), "new": vitconvert.apply(base, recipe)}
        for m in models.values():
            if point:
                m.set_operating_point(point)
            if finest_share is not None:
                m.override_gates(dge_gates(finest_share))
        x = torch.randn(batch_size, 3, *models["new"].anatomy.img_size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            outs = {k: m.forward_dynamic(x) for k, m in models.items()}
        same = {"max_abs_logit_difference": float((outs["old"].logits - outs["new"].logits).abs().max()),
                "gmacs": {k: float(o.gmacs.mean()) for k, o in outs.items()}}
        timed = compare({**models, "base": base}, x, reference="old", min_rounds=rounds)
    return {"name": "ab_versions", "machine": machine_block(), "rev": rev,
            "head": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                   text=True).stdout.strip(),
            "settings": {"model": model, "recipe": recipe, "batch_size": batch_size, "threads": threads,
                         "rounds": rounds, "point": point, "dge_finest_share": finest_share},
            "same": same, "timings": {k: t.to_dict() for k, t in timed.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", required=True, help="the earlier revision (commit, tag, branch)")
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--recipe", default="dge")
    parser.add_argument("--point", nargs="*", default=[], metavar="KNOB=VALUE")
    parser.add_argument("--dge-finest-share", type=float, default=None, help="DGE: force gates, this share finest")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    point = {k: float(v) for k, v in (p.split("=", 1) for p in args.point)}
    result = run(args.rev, args.model, args.recipe, args.batch_size, args.threads, args.rounds, point,
                 args.dge_finest_share)
    t = result["timings"]
    print(f"{args.model} + {args.recipe}, batch {args.batch_size}, {args.threads} thread(s): new/old "
          f"{t['new']['ratio']:.3f} (p10 {t['new']['ratio_p10']:.3f}, p90 {t['new']['ratio_p90']:.3f}); base/old "
          f"{t['base']['ratio']:.3f}; logits differ by "
          f"{result['same']['max_abs_logit_difference']:.2g}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

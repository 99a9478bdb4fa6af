"""FSLA on Swin-T (bench_export's row) exported before and after a change, timed in the same interleaved rounds.

    git stash -- vitconvert/layers/clustering.py   # the code before the change
    PYTHONPATH=. python ab_fsla.py export /tmp/onnx-profile/fsla-old.onnx
    git stash pop
    PYTHONPATH=. python ab_fsla.py export /tmp/onnx-profile/fsla-new.onnx
    PYTHONPATH=. python ab_fsla.py time          # the base graph: /tmp/onnx-profile/swin_tiny_patch4_window7_224.onnx
"""

import json
import sys
from pathlib import Path
from typing import Any

import torch

import vitconvert
from benchmarks.common import build_row, ort_session
from vitconvert.timing import compare

BASE = "swin_tiny_patch4_window7_224"


def runner(session: Any) -> Any:
    return lambda t: session.run(["logits"], {"pixel_values": t.numpy()})


torch.set_num_threads(2)
model, x, _ = build_row(BASE, "fsla", [], 64)
if sys.argv[1] == "export":
    vitconvert.export(model.eval(), Path(sys.argv[2]), overwrite=True)
else:
    graphs = {n: runner(ort_session(Path(f"/tmp/onnx-profile/{n}.onnx"), 2)) for n in ("fsla-old", "fsla-new", BASE)}
    timed = compare(graphs, x, reference=BASE, min_rounds=8)
    print(json.dumps({n: {"ratio_vs_base": round(t.ratio, 3),
                          "p10_p90": [round(t.ratio_spread.p10, 3), round(t.ratio_spread.p90, 3)],
                          "images_per_s": round(t.images_per_s, 2)} for n, t in timed.items()}, indent=1))

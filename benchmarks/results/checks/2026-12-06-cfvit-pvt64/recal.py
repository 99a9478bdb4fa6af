"""Calibrate a fine-tuned CF-ViT work folder again with more alphas, at one thread: ``python recal.py WORK 0.5,1.0``
(WORK: a ``benchmarks.cifar10_short_recipe --work`` folder)."""

import json
import sys

import torch

import vitconvert

torch.set_num_threads(1)
folder, alphas = sys.argv[1], [float(a) for a in sys.argv[2].split(",")]
model = vitconvert.load(folder + "/finetuned")
model.settings = model.settings.model_copy(update={"explore_alpha": alphas})
data = folder + "/cifar10"
cal = vitconvert.calibrate(model, data, "50%", device="cpu", max_images=2000, progress=False, dataset="cifar10")
keep = ("chosen", "speed_check", "top1", "gmacs_fraction")
print(json.dumps({k: v for k, v in cal.items() if k in keep}, default=str))
best: dict[float, tuple] = {}
for p in model.curve:
    alpha = p.point.get("alpha")
    if not p.point.get("dense") and p.gmacs <= 0.5 * model.base_gmacs + 1e-9 and p.top1 > best.get(alpha, (0,))[0]:
        best[alpha] = (p.top1, round(p.gmacs / model.base_gmacs, 3), p.point)
print("best at <=50% per alpha", best)
ev = vitconvert.evaluate(model, data, device="cpu", progress=False)
print("val", {k: v for k, v in ev.items() if isinstance(v, (int, float))})

"""CF-ViT speed benchmark on DeiT-S: GMACs of each stage against the architecture formula, and wall-clock
throughput / batch-1 latency of the early-exit model against timm and ToMe, measured side by side.

* **GMACs**: ``vitconvert.count_macs`` of the coarse stage and of the fine stage, checked within 2% of
  an analytic count built from the model's own dimensions (patch embedding, per-block projections, MLP
  and attention matmuls, layer norms at 5 MACs per element, class-attention taps, feature-reuse MLP, head).
* **Throughput**: the fraction of images sent to the fine stage is pinned to exactly 0.25 and 0.5 on the
  timed batch: since the batch is fixed, eta is set between the k-th and (k+1)-th smallest coarse
  confidence, and the achieved fraction is checked on the real ``forward_dynamic`` before timing.
  Random weights are fine for speed: the cost of each path does not depend on the weights.
* **Latency** (batch 1): one image either exits or does not, so the coarse-exit and coarse+fine paths are
  timed and the latency at fraction f is ``(1 - f) * exit + f * fine`` (the mean over images).
* ToMe r=8 / r=13 (``benchmarks/tome.py``) run in the same interleaved rounds, as the training-free
  alternative users would pick instead.

Run: ``python -m benchmarks --only cfvit`` (writes ``benchmarks/results/cfvit_speed.json``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

import vitconvert
from benchmarks import protocol
from benchmarks.common import machine_block
from benchmarks.tome import ToMe
from benchmarks.tome import gmacs as tome_gmacs
from vitconvert.layers.costs import to_gmacs
from vitconvert.methods.cfvit import CFViT
from vitconvert.timing import inference_context

ARCH = "deit_small_patch16_224"
FRACTIONS = (0.25, 0.5)
TOME_R = (8, 13)
TOLERANCE = 0.02  # GMACs must match the formula within 2%


# --- analytic count -----------------------------------------------------------------------------------


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def block_macs(model: CFViT, tokens: int) -> float:
    """MACs of the base model's blocks on ``tokens`` tokens: projections, MLP, QK^T and AV, two norms."""
    total = 0.0
    c = model.anatomy.embed_dim
    for b in model.anatomy.blocks:
        attn = model.base.get_submodule(b.attn)
        proj = sum(lin.in_features * lin.out_features for lin in _linears(attn))
        mlp = sum(lin.in_features * lin.out_features for lin in _linears(model.base.get_submodule(b.mlp)))
        total += tokens * (proj + mlp) + 2 * tokens * tokens * c + 2 * 5 * tokens * c
    return total


def analytic_costs(model: CFViT) -> dict[str, float]:
    """GMACs of CF-ViT's coarse and fine stages from the architecture (one image)."""
    a = model.anatomy
    c = a.embed_dim
    p = a.num_prefix_tokens
    conv = next(m for m in model.base.get_submodule(a.patch_embed).modules() if isinstance(m, nn.Conv2d))
    per_patch = conv.out_channels * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    head = sum(lin.in_features * lin.out_features
               for h in a.head for lin in _linears(model.base.get_submodule(h)))
    n_coarse = model.coarse_grid[0] * model.coarse_grid[1]
    n_fine = a.grid[0] * a.grid[1]
    tapped = len(a.blocks) - model.settings.gca_start_block

    t_coarse = p + n_coarse
    coarse = (n_coarse * per_patch + block_macs(model, t_coarse)
              + tapped * t_coarse * c  # class-token query against every key, per head summed: N * C
              + 5 * t_coarse * c + head)  # final norm on all tokens, head on the class token

    k = math.ceil(model.alpha * n_coarse)
    t_fine = p + 4 * k + (n_coarse - k)
    reuse = sum(lin.in_features * lin.out_features for lin in _linears(model.reuse))
    fine = (n_fine * per_patch  # the fine patch embedding runs on the whole image
            + 5 * t_coarse * c  # final norm on the coarse tokens, feeding the reuse MLP
            + n_coarse * (5 * c + reuse)  # reuse MLP (norm + two linears) on the coarse patch tokens
            + block_macs(model, t_fine) + 5 * t_fine * c + head)
    return {"coarse": to_gmacs(coarse), "fine": to_gmacs(fine), "tokens_coarse": t_coarse, "tokens_fine": t_fine}


# --- pinned exit fraction ------------------------------------------------------------------------------


class AtEta(nn.Module):
    """Runs a shared CF-ViT at its own eta (set by :func:`pin_fraction` for the timed batch)."""

    def __init__(self, model: CFViT, eta: float = 1.0, fraction: float | None = None) -> None:
        super().__init__()
        self.model = model
        self.eta = eta
        self.fraction = fraction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.model.eta = self.eta
        return self.model(x)


def pin_fraction(wrapper: AtEta, x: torch.Tensor, bf16: bool) -> dict[str, Any]:
    """Choose eta so exactly ``round(fraction * batch)`` images of ``x`` take the fine stage; verify it."""
    model, fraction = wrapper.model, wrapper.fraction
    assert fraction is not None
    with inference_context(x.device, bf16):
        model.eta = 1.0
        conf = model.forward_dynamic(x).extras["confidence"].float().sort().values
    k = round(fraction * x.shape[0])
    if k == 0:
        eta = 0.0
    elif k == x.shape[0]:
        eta = 1.0
    else:
        lo, hi = conf[k - 1].item(), conf[k].item()
        if not lo < hi:
            raise RuntimeError(f"cannot pin fraction {fraction}: tied coarse confidences at rank {k}")
        eta = (lo + hi) / 2
    wrapper.eta = eta
    with inference_context(x.device, bf16):
        model.eta = eta
        out = model.forward_dynamic(x)
    achieved = out.stage.float().mean().item()
    if abs(achieved - k / x.shape[0]) > 1e-9:
        raise RuntimeError(f"pinned eta={eta} sends {achieved:.3f} of the batch to the fine stage, "
                           f"not {fraction}")
    return {"eta": eta, "fine_fraction": achieved, "mean_gmacs": out.gmacs.mean().item()}


def _setup(name: str, model: nn.Module, x: torch.Tensor, cfg: dict[str, Any]) -> dict[str, Any] | None:
    if isinstance(model, AtEta) and model.fraction is not None:
        return pin_fraction(model, x, cfg["bf16"])
    return None


# --- run ----------------------------------------------------------------------------------------------


def run(quick: bool, out_dir: Path) -> dict[str, Any]:
    """Measure CF-ViT (fractions 0.25 / 0.5) against timm and ToMe on DeiT-S; write ``cfvit_speed.json``."""
    torch.manual_seed(0)
    model = vitconvert.apply(ARCH, "cfvit", pretrained=False)
    assert isinstance(model, CFViT)
    base = model.build_base()
    img = tuple(model.anatomy.img_size)

    analytic = analytic_costs(model)
    counted = dict(model.costs)
    gmacs_check = {
        stage: {"counted": counted[stage], "analytic": analytic[stage],
                "rel_error": abs(counted[stage] - analytic[stage]) / analytic[stage]}
        for stage in ("coarse", "fine")
    }
    gmacs_check["coarse+fine"] = {"counted": counted["coarse"] + counted["fine"],
                                  "analytic": analytic["coarse"] + analytic["fine"]}
    total = gmacs_check["coarse+fine"]
    total["rel_error"] = abs(total["counted"] - total["analytic"]) / total["analytic"]
    bad = {k: v["rel_error"] for k, v in gmacs_check.items() if v["rel_error"] > TOLERANCE}
    if bad:
        raise RuntimeError(f"CF-ViT GMACs differ from the architecture formula by more than 2%: {bad}")

    tome_models = {f"tome_r{r}": ToMe(base, r) for r in TOME_R}
    gmacs: dict[str, float] = {"timm": model.base_gmacs}
    for f in FRACTIONS:
        gmacs[f"cfvit_f{f}"] = counted["coarse"] + f * counted["fine"]
    gmacs.update({name: tome_gmacs(m, img) for name, m in tome_models.items()})

    models: dict[str, nn.Module] = {"timm": base}
    models.update({f"cfvit_f{f}": AtEta(model, fraction=f) for f in FRACTIONS})
    models.update(tome_models)
    latency_models: dict[str, nn.Module] = {
        "timm": base, "cfvit_exit": AtEta(model, eta=0.0), "cfvit_fine": AtEta(model, eta=1.0), **tome_models,
    }
    measured = protocol.measure_models(models, img, quick=quick, latency_models=latency_models, setup=_setup)

    # Latency at fraction f is the mean over images of the two paths.
    for f in FRACTIONS:
        protocol.add_path_mix_latency(measured, f"cfvit_f{f}", {"cfvit_exit": 1 - f, "cfvit_fine": f},
                                    f"(1-{f}) * cfvit_exit + {f} * cfvit_fine medians")

    rows: list[dict[str, Any]] = []
    for f in FRACTIONS:
        rows += protocol.result_row(measured, f"cfvit_f{f}", method="cfvit", backbone=ARCH,
                                  setting=f"fine fraction {f}", gmacs=gmacs[f"cfvit_f{f}"],
                                  base_gmacs=gmacs["timm"],
                                  notes="random weights; exit fraction pinned on the timed batch")
    for r in TOME_R:
        rows += protocol.result_row(measured, f"tome_r{r}", method="tome", backbone=ARCH, setting=f"r={r}",
                                  gmacs=gmacs[f"tome_r{r}"], base_gmacs=gmacs["timm"],
                                  notes="training-free baseline (ToMe, Bolya et al. 2023)")
    cpu_ratio = measured["cpu_throughput"]["results"]["cfvit_f0.25"]["ratio"]
    results = {
        "name": "cfvit",
        "backbone": ARCH,
        "quick": quick,
        "recipe": "cfvit (coarse 7x7, alpha 0.5)",
        "gmacs_check": gmacs_check,
        "analytic": analytic,
        "gmacs": gmacs,
        "speed": measured,
        "target": {"cpu_throughput_ratio_at_0.25": 2.0, "achieved": cpu_ratio, "met": cpu_ratio >= 2.0},
        "rows": rows,
        "machine": machine_block(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cfvit_speed.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    res = run(args.quick, args.out)
    print(json.dumps({"gmacs_check": res["gmacs_check"], "target": res["target"]}, indent=1))

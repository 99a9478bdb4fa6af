"""Which exit score routes a fine-tuned cascade (DVT, CF-ViT) best: max softmax against other scores of the same logits.

A cascade (DVT here; CF-ViT alike) lets an image leave at stage k when a score of stage k's logits passes a
threshold; the models score with the max softmax probability (:func:`vitconvert.layers.cascade.confidence`).
Without labels the early exits are confidently wrong more often than the base model, so this study asks how much a
better score would give, on a fine-tuned model's own logits (no retraining):

* ``maxprob``: max softmax (what the models use);
* ``margin``: top-1 minus top-2 probability;
* ``neg_entropy``: minus the entropy of the softmax;
* ``learned``: a logistic regression per stage on those statistics and the top-1 logit, fitted on the calibration
  images to predict whether the stage agrees with the last stage (no labels: what a label-free user can fit);
* ``oracle``: the stage answers exactly when it is right (labels of the evaluated split; an upper bound, not a
  deployable score).

Committees (Wang et al., ICLR 2022, "Wisdom of Committees"; IMTA, Li et al., ICCV 2019, ensembles a multi-exit
network's exits alike): stage k answers with the mean of the softmax of stages 0..k instead of its own, and is scored
on that mean. ``committee_early`` does so at every stage but the last (which stays the base model under
``freeze_last``, so full compute stays exact); ``committee_all`` at the last stage too (full compute is then an
ensemble, not the base model). Both with the margin score.

Protocol: every stage's logits on the calibration images (the CIFAR-10 training folder's held-out tail, the last 10%
of each class's training files, 4,500 images) and on the validation split (the last 500 files of each class). For
each score, DVT's budget family (target exit shares proportional to q^k, q = p/20) gives thresholds on the
calibration images; the point with the best calibration top-1 within the GMACs budget is evaluated on the
validation split. Stage costs are the model's counted cumulative GMACs.

Usage (from the repo root; a model kept by ``cifar10_short_recipe --work DIR``)::

    python -m benchmarks.studies.exit_scores DIR/finetuned --budget 0.5 -o benchmarks/results/checks/X/exit_scores.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

import vitconvert
from benchmarks import cifar10
from benchmarks.common import machine_block
from vitconvert.data import ImageDataset, eval_transform
from vitconvert.layers.cascade import cumulative
from vitconvert.methods.dvt import DVT_EXIT_Q

SCORES = ("maxprob", "margin", "neg_entropy", "learned")


def calibration_files() -> list[tuple[str, int]]:
    """The held-out tail of the fine-tuning folder: the last 10% (450) of each class's 4,500 training files."""
    train, _ = cifar10.split_files()
    by_class: dict[int, list[tuple[str, int]]] = {}
    for path, label in train:
        by_class.setdefault(label, []).append((path, label))
    return [f for files in by_class.values() for f in files[-len(files) // 10:]]


@torch.no_grad()
def stage_logits(model: Any, files: list[tuple[str, int]], batch_size: int = 250) -> tuple[list[torch.Tensor],
                                                                                              torch.Tensor]:
    """Every stage's logits on every image (the model's calibration pass) and the labels."""
    loader = DataLoader(ImageDataset(files, eval_transform(model), in_memory=False), batch_size=batch_size)
    parts: list[list[torch.Tensor]] = []
    labels = []
    for images, y in loader:
        parts.append(list(model.collect(images).values()))  # stage order (DVT's members, CF-ViT's coarse, fine)
        labels.append(y)
    return [torch.cat([p[k] for p in parts]) for k in range(len(parts[0]))], torch.cat(labels)


def statistics(logits: torch.Tensor) -> torch.Tensor:
    """(N, 4): max softmax, margin, minus entropy, top-1 logit."""
    p = logits.float().softmax(-1)
    top2 = p.topk(2, dim=-1).values
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)
    return torch.stack([top2[:, 0], top2[:, 0] - top2[:, 1], -entropy, logits.float().amax(-1)], dim=1)


def fit_logistic(features: torch.Tensor, target: torch.Tensor, steps: int = 500) -> tuple[torch.Tensor, ...]:
    """A standardised logistic regression (LBFGS, small L2), returned as (mean, std, weight, bias)."""
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    z = (features - mean) / std
    w = torch.zeros(z.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, target.float()) + 1e-3 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return mean, std, w.detach(), b.detach()


def scores_of(name: str, logits: list[torch.Tensor], heads: list[tuple[torch.Tensor, ...]] | None
              ) -> list[torch.Tensor]:
    out = []
    for k, lg in enumerate(logits[:-1]):
        s = statistics(lg)
        if name == "learned":
            assert heads is not None
            mean, std, w, b = heads[k]
            out.append(((s - mean) / std) @ w + b)
        else:
            out.append(s[:, SCORES.index(name)])
    return out


def route(scores: list[torch.Tensor], thresholds: list[float]) -> torch.Tensor:
    """The stage each image leaves at (the first whose score is above its threshold; else the last)."""
    n = scores[0].shape[0]
    exit_at = torch.full((n,), len(scores), dtype=torch.long)
    undecided = torch.ones(n, dtype=torch.bool)
    for k, s in enumerate(scores):
        leave = undecided & (s > thresholds[k])
        exit_at[leave] = k
        undecided &= ~leave
    return exit_at


def thresholds_for_shares(scores: list[torch.Tensor], shares: list[float]) -> list[float]:
    """Thresholds under which ``shares`` of all images leave at each stage (halfway between neighbouring scores).

    :func:`vitconvert.layers.cascade.thresholds_for_exit_shares` does this for the models' scores, which lie in [0, 1]
    (its thresholds are clamped there, 1 meaning never); the learned and entropy scores here are unbounded."""
    n = scores[0].shape[0]
    undecided = torch.ones(n, dtype=torch.bool)
    out = []
    for k, share in enumerate(shares):
        s = scores[k][undecided].double().sort(descending=True).values
        want = round(share * n)
        if want <= 0 or s.numel() == 0:
            out.append(float("inf"))
        elif want >= s.numel():
            out.append(float(s[-1]) - 1e-9)
        else:
            out.append(float((s[want - 1] + s[want]) / 2))
        undecided &= ~(scores[k] > out[-1])
    return out


def evaluate(logits: list[torch.Tensor], labels: torch.Tensor, exit_at: torch.Tensor, costs: list[float]
             ) -> dict[str, Any]:
    stacked = torch.stack([lg.float() for lg in logits])
    pred = stacked.argmax(-1).gather(0, exit_at.view(1, -1)).squeeze(0)
    at = torch.tensor(cumulative(costs))[exit_at]
    shares = torch.bincount(exit_at, minlength=len(logits)).float() / exit_at.numel()
    return {"top1": round(100.0 * float((pred == labels).float().mean()), 2), "gmacs": float(at.mean()),
            "exit_shares": [round(float(s), 4) for s in shares]}


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return round(100.0 * float((logits.argmax(-1) == labels).float().mean()), 2)


def committee(logits: list[torch.Tensor], last: bool) -> list[torch.Tensor]:
    """Log of the mean softmax of stages 0..k, for each stage k (the last stage's own logits unless ``last``)."""
    probs = [lg.float().softmax(-1) for lg in logits]
    out = [(sum(probs[: k + 1]) / (k + 1)).log() for k in range(len(logits))]
    return out if last else [*out[:-1], logits[-1]]


def study(model_dir: Path, budget: float) -> dict[str, Any]:
    model = vitconvert.load(model_dir).eval()
    # The stored point with every stage on (not the dense point; CF-ViT keeps its calibrated alpha)
    point = dict(model.operating_point)
    if "dense" in point:
        point["dense"] = 0.0
    model.set_operating_point(point)
    costs = list(model.cascade.costs)
    base = float(model.base_gmacs)
    cal_logits, cal_labels = stage_logits(model, calibration_files())
    _, val_files = cifar10.split_files()
    val_logits, val_labels = stage_logits(model, val_files)
    # label-free exit heads: does stage k agree with the last stage? (fitted on the calibration images)
    last_cal = cal_logits[-1].argmax(-1)
    heads = [fit_logistic(statistics(lg), lg.argmax(-1) == last_cal) for lg in cal_logits[:-1]]
    k_stages = len(costs)

    def best_point(cal_stage: list[torch.Tensor], cal_scores: list[torch.Tensor], val_stage: list[torch.Tensor],
                   val_scores: list[torch.Tensor], name: str) -> dict[str, Any]:
        """DVT's exit-share family on the calibration images: the most accurate point within the budget, evaluated
        on the validation split (``*_stage``: what each stage answers, ``*_scores``: how confident it is)."""
        best: dict[str, Any] | None = None
        for q in DVT_EXIT_Q:
            weights = [q ** (k + 1) for k in range(k_stages)]
            thresholds = thresholds_for_shares(cal_scores, [w / sum(weights) for w in weights[:-1]])
            cal = evaluate(cal_stage, cal_labels, route(cal_scores, thresholds), costs)
            if cal["gmacs"] <= budget * base and (best is None or cal["top1"] > best["calibration"]["top1"]):
                best = {"q": q, "thresholds": thresholds, "calibration": cal}
        assert best is not None, f"no point of {name} within {budget:.0%} of the base GMACs"
        val = evaluate(val_stage, val_labels, route(val_scores, best["thresholds"]), costs)
        best["validation"] = {**val, "gmacs_share": round(val["gmacs"] / base, 4)}
        return best

    rows: dict[str, Any] = {}
    for name in SCORES:
        rows[name] = best_point(cal_logits, scores_of(name, cal_logits, heads), val_logits,
                                scores_of(name, val_logits, heads), name)
        print(name, rows[name]["validation"], flush=True)
    for name, last in (("committee_early", False), ("committee_all", True)):
        cal_c, val_c = committee(cal_logits, last), committee(val_logits, last)
        rows[name] = best_point(cal_c, scores_of("margin", cal_c, None), val_c, scores_of("margin", val_c, None), name)
        rows[name]["validation"]["full_compute_top1"] = top1(val_c[-1], val_labels)
        print(name, rows[name]["validation"], flush=True)
    # oracle on the validation split: an image leaves at the first stage that is right (the last if none is)
    right = torch.stack([lg.argmax(-1) == val_labels for lg in val_logits[:-1]])
    exit_at = torch.where(right.any(0), right.float().argmax(0), torch.tensor(k_stages - 1))
    oracle = evaluate(val_logits, val_labels, exit_at, costs)
    rows["oracle"] = {"validation": {**oracle, "gmacs_share": round(oracle["gmacs"] / base, 4)}}
    alone = [top1(lg, val_labels) for lg in val_logits]
    return {"model": str(model_dir), "method": model.method, "stages": [stage.name for stage in model.cascade.stages],
            "point": point, "costs": costs,
            "base_gmacs": base, "budget": budget, "stage_top1_validation": alone, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a fine-tuned DVT model's folder")
    parser.add_argument("--budget", type=float, default=0.5, help="share of the base model's GMACs (default 0.5)")
    parser.add_argument("-o", "--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    result = {"benchmark": "exit_scores", "machine": machine_block(), **study(args.model, args.budget),
              "splits": {"calibration": "cifar10 training files: the last 10% of each class's 4,500 (4,500 images)",
                         "validation": "cifar10: the last 500 files of each class (5,000 images)"}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

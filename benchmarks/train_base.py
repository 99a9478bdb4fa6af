"""Train small CIFAR-10 base classifiers (ViT, PVT-v2, Swin) from scratch on CPU.

The models are standard timm architectures shrunk for 32x32 inputs, plus ``cifar10-pvt64``: the
PVT-v2 fine-tuned on images upsampled to 64 px, so that its stage grids (16/8/4/2) leave room for
DGE's 4x4-token regions as ImageNet-size inputs do. They are the base checkpoints that vitconvert
converts and fine-tunes in its benchmarks. Each is saved as a
timm-loadable folder ``benchmarks/checkpoints/<name>/`` (``config.json`` +
``model.safetensors``) that reloads with
``timm.create_model('local-dir:benchmarks/checkpoints/<name>', pretrained=True)``.

Data: the shared CIFAR-10 training images, split by :mod:`benchmarks.cifar10` (per class,
sorted file names: first 4,500 = train, last 500 = val). Everything is decoded once into a
uint8 tensor; augmentation (4 px pad + random crop, horizontal flip) runs on tensors.

Recipe: AdamW + cosine schedule with linear warm-up (per-step), label smoothing 0.1, batch
128, grad-clip 1.0, fixed seeds, fp32, ``torch.set_num_threads(2)`` (``--threads``). On a
shared, busy 2-core machine ``--threads 1`` is several times faster for the small-op
models (PVT, Swin): two OpenMP threads spend most of their time waiting on each other.
The loss/accuracy curves were identical with 1 and 2 threads in our runs.

Usage (from the repo root)::

    nice -n 10 python -m benchmarks.train_base                 # all four models
    nice -n 10 python -m benchmarks.train_base --models cifar10-vit
    nice -n 10 python -m benchmarks.train_base --models cifar10-pvt cifar10-swin --threads 1
    nice -n 10 python -m benchmarks.train_base --models cifar10-pvt64 --threads 1   # needs cifar10-pvt
    python -m benchmarks.train_base --quick                    # smoke test -> temp dir
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from rich.console import Console
from safetensors.torch import load_file
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

if __package__ in (None, ""):  # allow `python benchmarks/train_base.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import cifar10
from vitconvert.session import ProgressBar

REPO_ROOT = cifar10.REPO_ROOT
DEFAULT_CKPT_DIR = REPO_ROOT / "benchmarks" / "checkpoints"
DEFAULT_RESULTS = REPO_ROOT / "benchmarks" / "results" / "base_models.json"
SPLIT_NOTE = (
    "val = last 500 files (sorted by name) of each class of the shared CIFAR-10 train folder "
    "(5,000 images); train = first 4,500 per class (45,000 images); see benchmarks/cifar10.py"
)

DROP_CFG_KEYS = ("tag", "license", "hf_hub_id", "url", "origin_url", "paper_ids", "paper_name", "notes")

console = Console(soft_wrap=True)  # no hard wraps in nohup logs


@dataclass(frozen=True)
class ModelSpec:
    """Architecture + recipe of one base model."""

    arch: str
    model_args: dict[str, Any]
    epochs: int
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    batch_size: int = 128
    train_kwargs: dict[str, Any] = field(default_factory=dict)  # training-only (not exported)
    img_size: int = 32  # input side; CIFAR's 32 px are upsampled (bilinear) to it
    init_from: str | None = None  # start from this base's checkpoint (progressive resizing)
    interpolation: str = "bicubic"  # pretrained_cfg interpolation for the eval transform


MODELS: dict[str, ModelSpec] = {
    # 8x8 patch grid + class token (65 tokens), 1.52M params
    "cifar10-vit": ModelSpec(
        arch="deit_tiny_patch16_224",
        model_args=dict(img_size=32, patch_size=4, embed_dim=144, depth=6, num_heads=3),
        epochs=8,
    ),
    # stage grids 8/4/2/1 (the stride-4 stem is fixed in timm), 2.22M params
    "cifar10-pvt": ModelSpec(
        arch="pvt_v2_b0",
        model_args=dict(
            embed_dims=(32, 64, 160, 192), num_heads=(1, 2, 5, 6), sr_ratios=(4, 2, 1, 1)
        ),
        epochs=10,
    ),
    # patch 2 -> stage grids 16/8/4, window 4 divides all of them, 2.16M params
    "cifar10-swin": ModelSpec(
        arch="swin_tiny_patch4_window7_224",
        model_args=dict(
            img_size=32, patch_size=2, window_size=4, embed_dim=48, depths=(2, 2, 4), num_heads=(3, 6, 12)
        ),
        epochs=4,
        train_kwargs=dict(drop_path_rate=0.0),
    ),
    # cifar10-pvt at 64 px (images upsampled): stage grids 16/8/4/2, so DGE's 4x4 regions tile every
    # stage but the last, as at ImageNet size. Fine-tuned from cifar10-pvt (PVT-v2 has no position
    # embeddings: the same weights run at any size) rather than trained again from scratch.
    "cifar10-pvt64": ModelSpec(
        arch="pvt_v2_b0",
        model_args=dict(
            embed_dims=(32, 64, 160, 192), num_heads=(1, 2, 5, 6), sr_ratios=(4, 2, 1, 1)
        ),
        epochs=3,
        lr=5e-4,
        warmup_epochs=0.2,
        img_size=64,
        init_from="cifar10-pvt",
        interpolation="bilinear",  # PIL bilinear (eval transform) = torch bilinear (training) to uint8 rounding
    ),
}


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def create(spec: ModelSpec, ckpt_root: Path | None = None, **extra: Any) -> nn.Module:
    """Model for ``spec`` with 10 classes: random, or ``spec.init_from``'s weights from ``ckpt_root``."""
    model = timm.create_model(spec.arch, pretrained=False, num_classes=10, **spec.model_args, **extra)
    if spec.init_from is not None:
        source = (ckpt_root or DEFAULT_CKPT_DIR) / spec.init_from
        if not (source / "model.safetensors").is_file():
            raise SystemExit(f"{source}: missing; train {spec.init_from} first (--models {spec.init_from})")
        model.load_state_dict(load_file(source / "model.safetensors"))
    return model


def prepare(images: torch.Tensor, img_size: int) -> torch.Tensor:
    """uint8 32-px batch -> normalised float input of side ``img_size`` (bilinear upsampling)."""
    x = cifar10.normalize(images)
    if x.shape[-1] != img_size:
        x = nn.functional.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    return x


def count_gmacs(model: nn.Module, img_size: int = 32) -> float | None:
    """Forward GMACs for one image (FLOPs / 2), or None if counting fails."""
    try:
        from torch.utils.flop_counter import FlopCounterMode

        was_training = model.training
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, img_size, img_size))
        model.train(was_training)
        return round(counter.get_total_flops() / 2e9, 4)
    except Exception:  # pragma: no cover - best effort only
        return None


@torch.no_grad()
def evaluate(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500, img_size: int = 32
) -> tuple[float, torch.Tensor]:
    """Top-1 (%) of ``model`` on uint8 ``images``; also returns all logits."""
    model.eval()
    outs = [model(prepare(images[i : i + batch_size], img_size)) for i in range(0, len(images), batch_size)]
    logits = torch.cat(outs)
    acc = (logits.argmax(1) == labels).float().mean().item() * 100.0
    return acc, logits


def train_one(
    name: str,
    spec: ModelSpec,
    data: dict[str, torch.Tensor],
    epochs: int,
    seed: int,
    ckpt_root: Path | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train one model; returns it with a history dict (per-epoch time, loss, val top-1)."""
    seed_all(seed)
    model = create(spec, ckpt_root, **spec.train_kwargs)
    model.train()
    x_train, y_train, x_val, y_val = data["x_train"], data["y_train"], data["x_val"], data["y_val"]
    n = len(x_train)
    bs = min(spec.batch_size, n)
    steps_per_epoch = n // bs  # drop the last partial batch
    optimizer = create_optimizer_v2(model, opt="adamw", lr=spec.lr, weight_decay=spec.weight_decay)
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched="cosine",
        num_epochs=epochs,
        warmup_epochs=spec.warmup_epochs if epochs > 1 else 0,
        warmup_lr=spec.lr * 0.01,
        min_lr=spec.lr * 0.01,
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    gen = torch.Generator().manual_seed(seed)
    history: list[dict[str, float]] = []
    total_steps = steps_per_epoch * epochs
    updates = 0
    t_start = time.perf_counter()
    # vitconvert's bar: rich on a terminal, a plain line every ~5% in logs (nohup runs).
    with ProgressBar(name, total_steps, fields=("epoch", "loss", "lr", "img/s")) as bar:
        for epoch in range(epochs):
            model.train()
            perm = torch.randperm(n, generator=gen)
            t0, c0 = time.perf_counter(), time.process_time()
            loss_sum, loss_count, seen = 0.0, 0, 0
            for step in range(steps_per_epoch):
                idx = perm[step * bs : (step + 1) * bs]
                xb = prepare(cifar10.augment(x_train[idx], generator=gen), spec.img_size)
                yb = y_train[idx]
                loss = criterion(model(xb), yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                updates += 1
                scheduler.step_update(num_updates=updates)
                loss_sum += loss.item()
                loss_count += 1
                seen += len(idx)
                ips = seen / (time.perf_counter() - t0)
                lr = optimizer.param_groups[0]["lr"]
                bar.update(1, **{"epoch": f"{epoch + 1}/{epochs}", "loss": f"{loss_sum / loss_count:.3f}",
                                 "lr": f"{lr:.2e}", "img/s": f"{ips:.0f}"})
            scheduler.step(epoch + 1)
            epoch_s = time.perf_counter() - t0
            epoch_cpu = time.process_time() - c0
            val_acc, _ = evaluate(model, x_val, y_val, img_size=spec.img_size)
            history.append(
                {
                    "epoch": epoch + 1,
                    "train_loss": round(loss_sum / max(loss_count, 1), 4),
                    "train_seconds": round(epoch_s, 1),
                    "cpu_seconds": round(epoch_cpu, 1),
                    "img_per_s": round(seen / epoch_s, 1),
                    "val_top1": round(val_acc, 2),
                }
            )
            bar.console.print(
                f"{name} epoch {epoch + 1}/{epochs}: loss {loss_sum / max(loss_count, 1):.4f}  "
                f"val top-1 {val_acc:.2f}%  {epoch_s:.1f}s ({seen / epoch_s:.0f} img/s)"
            )
    total = time.perf_counter() - t_start
    return model, {"epochs": history, "total_seconds": round(total, 1), "steps": updates, "batch_size": bs}


def save_checkpoint(model: nn.Module, spec: ModelSpec, out_dir: Path, labels: list[str]) -> Path:
    """Save ``model`` as a timm ``local-dir:`` folder with a CIFAR-10 pretrained_cfg."""
    data_cfg = dict(
        input_size=(3, spec.img_size, spec.img_size),
        crop_pct=1.0,
        crop_mode="center",
        interpolation=spec.interpolation,
        mean=cifar10.MEAN,
        std=cifar10.STD,
    )
    model_config = {
        "label_names": list(labels),
        "pretrained_cfg": {**data_cfg, "num_classes": 10, "label_names": list(labels)},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    timm.models.save_for_hf(
        model,
        str(out_dir),
        model_config=model_config,
        model_args=_jsonable(spec.model_args),
        safe_serialization=True,
        data_config=data_cfg,
    )
    # make sure the exported pretrained_cfg says exactly what was used for training
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    pcfg = cfg.setdefault("pretrained_cfg", {})
    pcfg.update({k: list(v) if isinstance(v, tuple) else v for k, v in data_cfg.items()})
    pcfg["num_classes"] = 10
    pcfg["label_names"] = list(labels)
    for key in DROP_CFG_KEYS:  # source-weight metadata that does not describe these weights
        pcfg.pop(key, None)
    cfg["label_names"] = list(labels)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    for f in out_dir.iterdir():
        f.chmod(0o644)
    return out_dir


def _jsonable(args: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}


def verify_checkpoint(
    model: nn.Module, ckpt: Path, x_val: torch.Tensor, y_val: torch.Tensor, labels: list[str], img_size: int = 32
) -> dict[str, Any]:
    """Reload ``ckpt`` via ``local-dir:``; compare logits with ``model`` and re-measure val top-1."""
    reloaded = timm.create_model(f"local-dir:{ckpt}", pretrained=True).eval()
    cfg = reloaded.pretrained_cfg
    data_cfg = timm.data.resolve_model_data_config(reloaded)
    problems = []
    if tuple(data_cfg["input_size"]) != (3, img_size, img_size):
        problems.append(f"input_size {data_cfg['input_size']}")
    if not np.allclose(data_cfg["mean"], cifar10.MEAN) or not np.allclose(data_cfg["std"], cifar10.STD):
        problems.append("mean/std")
    if list(cfg.get("label_names") or []) != list(labels):
        problems.append("label_names")
    n = min(1000, len(x_val))
    model.eval()
    with torch.no_grad():
        xb = prepare(x_val[:n], img_size)
        diff = (model(xb) - reloaded(xb)).abs().max().item()
    acc, _ = evaluate(reloaded, x_val, y_val, img_size=img_size)
    if diff != 0.0:
        problems.append(f"logit max abs diff {diff}")
    return {"max_abs_logit_diff": diff, "reloaded_val_top1": round(acc, 2), "config_problems": problems}


def machine_info() -> dict[str, Any]:
    """Platform, CPU and library versions."""
    return {
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """CLI arguments."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="models to train")
    p.add_argument("--epochs", type=int, default=None, help="override the per-model epoch count")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 epoch on 2,000 train images")
    p.add_argument("-o", "--output", type=Path, default=None, help="checkpoint root [benchmarks/checkpoints]")
    p.add_argument("--results", type=Path, default=None, help="results JSON (default benchmarks/results/...)")
    p.add_argument("--data-root", default="../shared/data/cifar10/train", help="relative to the repo root")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 is faster on a busy machine)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    root = cifar10.resolve_root(args.data_root)
    labels = cifar10.class_names(root)
    if args.output is not None:
        ckpt_root = args.output
    elif args.quick:
        ckpt_root = Path(tempfile.mkdtemp(prefix="vitconvert_quick_"))
    else:
        ckpt_root = DEFAULT_CKPT_DIR
    results_path = args.results or (ckpt_root / "base_models.json" if args.quick else DEFAULT_RESULTS)

    train_files, val_files = cifar10.split_files(root)
    if args.quick:
        train_files = cifar10.first_n_per_class(train_files, 200)
        val_files = cifar10.first_n_per_class(val_files, 100)
    t0 = time.perf_counter()
    x_train, y_train = cifar10.load_tensor(train_files, name="cifar10_train")
    x_val, y_val = cifar10.load_tensor(val_files, name="cifar10_val")
    console.print(
        f"data: {root}  train {tuple(x_train.shape)}  val {tuple(x_val.shape)}  "
        f"({time.perf_counter() - t0:.1f}s)  -> {ckpt_root}"
    )
    data = {"x_train": x_train, "y_train": y_train, "x_val": x_val, "y_val": y_val}

    results: dict[str, Any] = {}
    if results_path.is_file():
        results = json.loads(results_path.read_text())
    results.update(
        {
            "split": SPLIT_NOTE + (" [--quick: 200/class train, 100/class val]" if args.quick else ""),
            "data_root": os.path.relpath(root, REPO_ROOT),
            "mean": list(cifar10.MEAN),
            "std": list(cifar10.STD),
            "label_names": labels,
        }
    )
    results.setdefault("models", {})
    command = "python -m benchmarks.train_base " + shlex.join(sys.argv[1:] if argv is None else argv)

    for name in args.models:
        spec = MODELS[name]
        epochs = 1 if args.quick else (args.epochs or spec.epochs)
        model, hist = train_one(name, spec, data, epochs, args.seed, ckpt_root)
        val_acc, _ = evaluate(model, x_val, y_val, img_size=spec.img_size)
        ckpt = save_checkpoint(model, spec, ckpt_root / name, labels)
        check = verify_checkpoint(model, ckpt, x_val, y_val, labels, img_size=spec.img_size)
        size = (ckpt / "model.safetensors").stat().st_size
        entry = {
            "arch": spec.arch,
            "model_args": {**_jsonable(spec.model_args), "num_classes": 10},
            "train_kwargs": spec.train_kwargs,
            "params": sum(p.numel() for p in model.parameters()),
            "gmacs": count_gmacs(model, spec.img_size),
            "img_size": spec.img_size,
            "init_from": spec.init_from,
            "safetensors_bytes": size,
            "checkpoint": os.path.relpath(ckpt, REPO_ROOT) if ckpt.is_relative_to(REPO_ROOT) else str(ckpt),
            "recipe": {
                "optimizer": "adamw",
                "lr": spec.lr,
                "weight_decay": spec.weight_decay,
                "batch_size": hist["batch_size"],
                "sched": "cosine (per step)",
                "warmup_epochs": spec.warmup_epochs if epochs > 1 else 0,
                "label_smoothing": 0.1,
                "grad_clip": 1.0,
                "augment": "pad 4 + random crop 32, hflip"
                + (f", bilinear upsampling to {spec.img_size}" if spec.img_size != 32 else ""),
                "seed": args.seed,
            },
            "epochs": epochs,
            "steps": hist["steps"],
            "train_seconds": hist["total_seconds"],
            "epoch_history": hist["epochs"],
            "val_top1": round(val_acc, 2),
            "val_split": "val (5,000 images)" if not args.quick else "val subset (1,000 images)",
            "quick": args.quick,
            "loadavg_at_end": [round(v, 2) for v in os.getloadavg()],  # >2 means a shared, slower CPU
            **check,
            "machine": machine_info(),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": command,
        }
        results["models"][name] = entry
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2) + "\n")
        status = "OK" if not check["config_problems"] else f"PROBLEMS {check['config_problems']}"
        console.print(
            f"[bold]{name}[/]: val top-1 {val_acc:.2f}% (reloaded {check['reloaded_val_top1']:.2f}%), "
            f"{entry['params'] / 1e6:.2f}M params, {size / 1e6:.2f} MB, {hist['total_seconds']:.0f}s, "
            f"max|dlogit| {check['max_abs_logit_diff']:.1e}, {status} -> {ckpt}"
        )
        if not math.isfinite(hist["epochs"][-1]["train_loss"]):
            console.print(f"[red]{name}: non-finite loss[/]")
    console.print(f"results -> {results_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

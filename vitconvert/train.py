"""The short fine-tune every method shares: distillation from the original model + labels + the method's terms.

The loss is ``sum(weight[name] * term)`` over the terms of :mod:`vitconvert.losses` (distillation, cross-entropy
unless ``labels=False``, the method's own). AdamW with timm's parameter groups (and the method's learning-rate
scales for its new parts), a cosine schedule with warm-up (per step), gradient clipping, optional EMA and bf16
autocast on CUDA. :func:`finetune` reads as its phases: plan (every user mistake found before any work), the partial
run to resume, the teacher, the training state, the step loop, the finish.

Runs are repeatable: the data order of epoch ``e`` and the augmentation of each image depend only on
``(seed, e, index)``, and a checkpoint every ``finetune.checkpoint_every`` steps holds everything else
(weights, optimizer, schedule, EMA, random state), so an interrupted run resumed with ``resume=True``
ends with the same weights as an uninterrupted one. Under ``torchrun`` the same call trains data-parallel
(DistributedDataParallel; gloo on CPU, nccl on GPU): each of the W processes takes ``batch_size / W``
images of every global batch, so W processes compute the same steps as one.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from timm.layers import DropPath
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn

from vitconvert.data import DataArg, ImageDataset, Split, open_data, train_transform
from vitconvert.errors import Interrupted, UserError
from vitconvert.losses import loss_terms, loss_weight
from vitconvert.methods.base import ConvertedModel
from vitconvert.recipes import FinetuneSettings, load_recipe, parse_overrides
from vitconvert.saving import check_output_dir
from vitconvert.session import Session, resolve_device

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "train_log.json"
# Besides every finetune.checkpoint_every steps and every epoch, a checkpoint at least this often: a run of
# long epochs can resume too. A constant, not a recipe field, so older versions still read saved recipes.
CHECKPOINT_MINUTES = 10.0
# --- distributed -----------------------------------------------------------------------------------------


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    started_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _init_distributed(device: str | torch.device | None) -> tuple[_Dist, torch.device]:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(), resolve_device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    started = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        started = True
    return _Dist(dist.get_rank(), dist.get_world_size(), started), dev


class _GlobalBatchSampler(torch.utils.data.distributed.DistributedSampler):
    """DistributedSampler whose per-rank batches together form exactly one process's global batches.

    The epoch's permutation depends only on ``(seed, epoch)``; rank ``r`` takes positions ``r, r+W, ...``,
    so its ``t``-th batch of ``B/W`` images and the other ranks' ``t``-th batches are together positions
    ``[t*B, (t+1)*B)`` of the permutation, the ``t``-th batch of a single process. ``skip_batches`` starts
    an epoch part-way through (resuming).
    """

    def __init__(self, dataset: torch.utils.data.Dataset, world: int, rank: int, seed: int, batch_size: int) -> None:
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.skip_batches = 0

    def batches_per_epoch(self) -> int:
        return self.num_samples // self.batch_size

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())[: self.batches_per_epoch() * self.batch_size]
        return iter(indices[self.skip_batches * self.batch_size:])

    def __len__(self) -> int:
        return (self.batches_per_epoch() - self.skip_batches) * self.batch_size


class _TrainStep(nn.Module):
    """Routes DDP's forward to ``forward_train`` so the whole output dict (not just logits) comes back."""

    def __init__(self, model: ConvertedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.forward_train(x)


def _param_groups(model: ConvertedModel, weight_decay: float) -> list[dict[str, Any]]:
    """timm's weight-decay groups, each split by the method's
    :meth:`~vitconvert.methods.base.ConvertedModel.lr_scales`; timm's schedulers multiply a group's rate by
    its ``lr_scale``."""
    scales = model.lr_scales()
    scale_of = {id(param): next((f for prefix, f in scales.items() if name == prefix or name.startswith(prefix + ".")),
                                1.0)
                for name, param in model.named_parameters()}
    groups = []
    for group in param_groups_weight_decay(model, weight_decay, no_weight_decay_list=_no_weight_decay(model)):
        by_scale: dict[float, list[nn.Parameter]] = {}
        for param in group["params"]:
            by_scale.setdefault(scale_of[id(param)], []).append(param)
        groups += [{**group, "params": params, "lr_scale": scale} for scale, params in by_scale.items()]
    return groups


def _no_weight_decay(model: nn.Module) -> set[str]:
    """Parameter names that timm modules (and the model) exclude from weight decay (position embeddings...)."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        fn = getattr(module, "no_weight_decay", None)
        if callable(fn):
            names |= {f"{prefix}.{n}" if prefix else n for n in fn()}
    return names


@contextlib.contextmanager
def _drop_path(model: ConvertedModel, rate: float) -> Iterator[None]:
    """Stochastic depth ``rate`` (linear in depth) on the base model's blocks for the duration of training.

    The slots are the residual branches' drop-path modules the block reader found when the model was
    converted (:attr:`ConvertedModel.drop_path_slots`), whatever they are called. timm builds
    ``nn.Identity`` where a block's drop path is 0; the method's rewritten graphs call the same module
    objects, so the objects themselves are switched to DropPath (and back) rather than replaced.
    """
    if rate <= 0:
        yield
        return
    depth = len(model.anatomy.blocks)
    changed: list[tuple[nn.Module, type, float | None]] = []
    try:
        for block_index, path in model.drop_path_slots:
            m = model.base.get_submodule(path)
            p = rate * block_index / max(1, depth - 1)
            if isinstance(m, DropPath):
                changed.append((m, DropPath, m.drop_prob))
                m.drop_prob = p
            elif type(m) is nn.Identity:
                changed.append((m, nn.Identity, None))
                m.__class__ = DropPath
                m.drop_prob, m.scale_by_keep = p, True
        yield
    finally:
        for m, cls, prob in changed:
            m.__class__ = cls
            if cls is DropPath:
                m.drop_prob = prob
            else:
                del m.drop_prob, m.scale_by_keep


def _settings_with_overrides(model: ConvertedModel, overrides: list[str] | None) -> None:
    """Apply ``finetune.*`` / ``calibrate.*`` overrides to the model's recipe (structure is fixed at apply time)."""
    if not overrides:
        return
    for key, _ in parse_overrides(overrides):
        if not key.startswith(("finetune.", "calibrate.")):
            raise UserError(f"--set {key}: fine-tuning takes finetune.* and calibrate.* settings; the model's "
                            "structure (model.*) is fixed when it is converted")
    model.recipe = load_recipe(model.recipe, overrides)


def _rng_state() -> dict[str, Any]:
    py = random.getstate()
    npy = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": [py[0], list(py[1]), py[2]],
             "numpy": [npy[0], npy[1].tolist(), int(npy[2]), int(npy[3]), float(npy[4])]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = state["numpy"]
    np.random.set_state((npy[0], np.array(npy[1], dtype=np.uint32), npy[2], npy[3], npy[4]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _after_step(step: int) -> None:
    """Called after every optimizer step (and checkpoint); tests replace it to interrupt a run."""


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    tmp.replace(path)


def finetune(
    model: str | os.PathLike[str] | ConvertedModel,
    data: DataArg,
    out: str | os.PathLike[str] | None = None,
    *,
    labels: bool = True,
    overrides: list[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    workers: int = 0,
    teacher: str | os.PathLike[str] | nn.Module | None = None,
    progress: bool = True,
    max_images: int | None = None,
) -> Path:
    """Fine-tune a converted model on an image folder and write the result as a new model folder.

    Args:
        model: Model folder, ``local-dir:PATH``, ``hf-hub:OWNER/NAME``, or a converted model (trained in place).
        data: ImageFolder (``ROOT/<class>/...`` or ``ROOT/train/<class>/...``), ``hfds/PATH``, a ``.tar`` (or a
            folder of shards), or your own ``torch.utils.data.Dataset`` / ``DataLoader`` (see
            :mod:`vitconvert.data`); the recipe's ``calibrate.holdout`` share of each class is left out for
            calibration.
        out: Output folder, written atomically at the end; default: ``<model folder>-ft`` (for a Hub model,
            ``<name>-ft`` in the current directory). It may be the model folder itself.
        labels: Use the labels (cross-entropy); ``False`` trains by distillation alone.
        overrides: ``finetune.*`` recipe settings, e.g. ``["finetune.epochs=1", "finetune.lr=1e-4"]``.
        resume: Continue the interrupted run whose checkpoints are in ``<out>.partial/``.
        overwrite: Replace an existing ``out`` (and discard a stale partial run).
        device: ``cpu``, ``cuda``, ``cuda:N``; default CUDA when available. Under torchrun each process
            takes its LOCAL_RANK's GPU.
        workers: DataLoader worker processes.
        teacher: The original model for distillation when it cannot be rebuilt from the model's base
            description (weights file, timm name, ``hf-hub:``, ``local-dir:`` or the base module itself).
        progress: Show a progress bar (loss, images/s, ETA).
        max_images: Train on at most this many images, evenly across classes (overrides the recipe).

    Returns:
        The output folder, holding the fine-tuned model and ``train_log.json``.

    Example:
        >>> finetune("deit_small-cfvit", "imagenet/", overrides=["finetune.epochs=1"])  # doctest: +SKIP
        PosixPath('deit_small-cfvit-ft')
    """
    ddp, dev = _init_distributed(device)
    try:
        session = Session.open(model, dev, progress and ddp.main)
        plan = _plan(session, model, data, out, labels, overrides, overwrite, max_images, ddp)
        state = _partial_run(plan, resume, overwrite, ddp)
        teacher, teacher_desc = _teacher(plan, teacher)
        run = _Run.start(plan, ddp)
        log = _new_log(plan, teacher_desc, ddp)
        if state is not None:
            log = run.restore(state, ddp)
        _train(plan, run, teacher, log, workers, ddp)
        _finish(plan, run, teacher, log, ddp)
        return plan.out
    finally:
        if ddp.started_here:
            dist.destroy_process_group()


@dataclass
class _Plan:
    """What a fine-tuning run is, fixed before any work starts: what it writes, what it trains on, how long."""

    session: Session
    settings: FinetuneSettings
    out: Path
    split: Split
    per_rank: int  # images per process and step
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    weights: dict[str, float]  # loss term -> weight
    use_labels: bool
    fingerprint: dict[str, Any]  # what must match for a checkpoint to continue this run

    @property
    def distills(self) -> bool:
        """Whether the run distils from the original model (``finetune.losses.distill`` above 0)."""
        return self.weights.get("distill", 1.0) > 0

    @property
    def partial(self) -> Path:
        """Checkpoints of the run, beside its output until it completes."""
        return self.out.with_name(self.out.name + ".partial")

    @property
    def checkpoint(self) -> Path:
        return self.partial / CHECKPOINT_NAME


def _plan(session: Session, model_arg: Any, data: Any, out: Any, labels: bool, overrides: list[str] | None,
          overwrite: bool, max_images: int | None, ddp: _Dist) -> _Plan:
    """Settings, output folder, training split and schedule; every user mistake is found here, before any work."""
    model = session.model
    _settings_with_overrides(model, overrides)
    settings = model.recipe.finetune
    if out is not None:
        out_path = Path(out).expanduser().resolve()
    elif session.folder is not None:
        out_path = session.folder.with_name(session.folder.name + "-ft")
    elif isinstance(model_arg, str | os.PathLike):
        out_path = Path.cwd() / (str(model_arg).rstrip("/").rsplit("/", 1)[-1] + "-ft")
    else:
        raise UserError("finetune needs an output folder (out) for an in-memory model")
    # A run that cannot write its result (or its checkpoints, beside it) must not start.
    check_output_dir(out_path, overwrite, allow_existing=session.folder)

    source = open_data(data, holdout=model.recipe.calibrate.holdout)
    source.check_classes(model.num_classes)
    split = source.train_split(max_images if max_images is not None else settings.max_images)
    if settings.batch_size % ddp.world:
        raise UserError(f"finetune.batch_size {settings.batch_size} must be divisible by the number of "
                        f"processes ({ddp.world})")
    steps_per_epoch = len(split) // settings.batch_size
    if steps_per_epoch < 1:
        raise UserError(f"{len(split)} training images are fewer than one batch (finetune.batch_size="
                        f"{settings.batch_size}); add images or lower the batch size")
    total_steps = max(1, round(settings.epochs * steps_per_epoch))
    weights = {k: float(v) for k, v in settings.losses.items()}
    # JSON-normalised, as it is stored in a checkpoint.
    fingerprint = json.loads(json.dumps({"finetune": settings.model_dump(mode="json"), "data": split.fingerprint(),
                                         "world": ddp.world, "labels": labels, "model": model.get_state()}))
    return _Plan(session, settings, out_path, split, settings.batch_size // ddp.world, steps_per_epoch, total_steps,
                 min(total_steps - 1, round(settings.warmup_epochs * steps_per_epoch)), weights,
                 labels and weights.get("ce", 1.0) > 0, fingerprint)


def _partial_run(plan: _Plan, resume: bool, overwrite: bool, ddp: _Dist) -> dict[str, Any] | None:
    """The checkpoint to continue from (``resume``), or None; an interrupted run is never silently replaced."""
    state: dict[str, Any] | None = None
    if plan.checkpoint.is_file():
        if resume:
            state = torch.load(plan.checkpoint, map_location="cpu", weights_only=True)
            if state["fingerprint"] != plan.fingerprint:
                raise UserError(f"the partial run in {str(plan.partial)!r} used other settings, data or process "
                                "count; resume it with the same ones, or pass --overwrite to start over")
        elif overwrite:
            if ddp.main:
                shutil.rmtree(plan.partial, ignore_errors=True)
        else:
            raise UserError(f"an interrupted run is in {str(plan.partial)!r}; pass --resume to continue it or "
                            "--overwrite to start over")
    elif resume and ddp.main:
        print(f"--resume: no checkpoint in {plan.partial} (none was written before the run stopped); starting from "
              "the beginning", file=sys.stderr)
    ddp.barrier()
    return state


def _teacher(plan: _Plan, teacher_arg: Any) -> tuple[nn.Module | None, str | None]:
    """The original model on the device, frozen, unless distillation is switched off or the model computes the
    original's logits itself (then None, and :func:`_step` takes them from its outputs)."""
    if not plan.distills:
        return None, None
    if teacher_arg is None and plan.session.model.computes_original_logits:
        return None, "the base model inside the converted model (frozen)"
    teacher, desc = plan.session.original(teacher_arg)
    return teacher.to(plan.session.device).eval().requires_grad_(False), desc


@dataclass
class _Run:
    """The training state: the model on its device, optimiser, schedule, EMA, the step function and the step."""

    model: ConvertedModel
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler
    ema: ModelEmaV3 | None
    step_fn: nn.Module
    step: int = 0
    elapsed_before: float = 0.0  # seconds spent before a resume
    saved_step: int | None = None  # step of the checkpoint on disk, for the message when interrupted

    @classmethod
    def start(cls, plan: _Plan, ddp: _Dist) -> _Run:
        settings, model, dev = plan.settings, plan.session.model, plan.session.device
        torch.manual_seed(settings.seed + ddp.rank)
        model.to(dev).train()
        optimizer = create_optimizer_v2(_param_groups(model, settings.weight_decay), opt="adamw", lr=settings.lr,
                                        weight_decay=settings.weight_decay)
        scheduler = CosineLRScheduler(optimizer, t_initial=max(1, plan.total_steps - plan.warmup_steps),
                                      lr_min=settings.min_lr, warmup_t=plan.warmup_steps,
                                      warmup_lr_init=settings.min_lr, warmup_prefix=True, t_in_epochs=False)
        ema = ModelEmaV3(model, decay=settings.ema_decay) if settings.ema_decay else None
        step_fn: nn.Module = _TrainStep(model)
        if ddp.world > 1:
            step_fn = nn.parallel.DistributedDataParallel(
                step_fn, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=True)
        return cls(model, optimizer, scheduler, ema, step_fn)

    def restore(self, state: dict[str, Any], ddp: _Dist) -> dict[str, Any]:
        """Continue from a checkpoint; returns its log, with the resume recorded."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        _set_rng_state(state["rng"][ddp.rank] if isinstance(state["rng"], list) else state["rng"])
        self.step, self.elapsed_before = int(state["step"]), float(state["seconds"])
        self.saved_step = self.step
        log = state["log"]
        log["resumed_at"].append(self.step)
        return log

    def checkpoint(self, plan: _Plan, seconds: float, log: dict[str, Any], ddp: _Dist) -> None:
        """Everything a resumed run needs, written atomically by the main process."""
        rng = _gather_rng(ddp)
        if ddp.main:
            plan.partial.mkdir(parents=True, exist_ok=True)
            _save_atomic({
                "step": self.step, "seconds": seconds, "fingerprint": plan.fingerprint,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "rng": rng, "log": log,
            }, plan.checkpoint)
        ddp.barrier()
        self.saved_step = self.step


def _new_log(plan: _Plan, teacher_desc: str | None, ddp: _Dist) -> dict[str, Any]:
    dev = plan.session.device
    return {
        "settings": plan.settings.model_dump(mode="json"), "recipe": plan.session.model.recipe.name,
        "method": plan.session.model.method, "data": plan.split.description, "images": len(plan.split),
        "labels": plan.use_labels, "teacher": teacher_desc, "device": str(dev), "world_size": ddp.world,
        "global_batch": plan.settings.batch_size, "per_process_batch": plan.per_rank,
        "steps_per_epoch": plan.steps_per_epoch, "total_steps": plan.total_steps, "warmup_steps": plan.warmup_steps,
        "autocast": "bf16" if dev.type == "cuda" else None, "torch": str(torch.__version__),
        "threads": torch.get_num_threads(), "resumed_at": [], "steps": [], "epochs": [],
    }


def _train(plan: _Plan, run: _Run, teacher: nn.Module | None, log: dict[str, Any], workers: int, ddp: _Dist) -> None:
    """The step loop, from ``run.step`` to the end, with checkpoints; Ctrl-C says what was kept."""
    settings, model, dev = plan.settings, run.model, plan.session.device
    dataset = ImageDataset(plan.split.files, train_transform(model, **settings.augment), seed=settings.seed,
                           seed_numpy=bool(settings.augment.get("auto_augment")))
    sampler = _GlobalBatchSampler(dataset, ddp.world, ddp.rank, settings.seed, plan.per_rank)
    assert sampler.batches_per_epoch() == plan.steps_per_epoch
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    start = last_saved = time.perf_counter()
    bar = plan.session.bar(f"finetune {model.method}", plan.total_steps, fields=("loss", "img/s"))
    try:
        with bar, _drop_path(model, settings.drop_path_rate):
            bar.update(run.step)
            while run.step < plan.total_steps:
                epoch, skip = divmod(run.step, plan.steps_per_epoch)
                sampler.set_epoch(epoch)
                dataset.set_epoch(epoch)
                sampler.skip_batches = skip
                # Its own generator: a DataLoader draws worker seeds when iterated, which must not move the global
                # random state (stochastic depth) differently in a resumed run.
                loader = torch.utils.data.DataLoader(
                    dataset, batch_size=plan.per_rank, sampler=sampler, num_workers=workers,
                    pin_memory=dev.type == "cuda", drop_last=True,
                    generator=torch.Generator().manual_seed(settings.seed * 1000 + epoch))
                t_last = time.perf_counter()
                for x, y in loader:
                    loss, terms = _step(plan, run, teacher, x.to(dev, non_blocking=True),
                                        y.to(dev, non_blocking=True), autocast)
                    now = time.perf_counter()
                    # The clock decides on every process alike: its vote travels with the loss values.
                    late = float(now - last_saved >= CHECKPOINT_MINUTES * 60)
                    values = torch.stack([loss.detach().float(), *(v.detach().float() for v in terms.values()),
                                          loss.new_tensor(late, dtype=torch.float32)])
                    if ddp.world > 1:
                        dist.all_reduce(values)
                        values /= ddp.world
                    late_anywhere, values = bool(values[-1] > 0), values[:-1]
                    ips = settings.batch_size / max(now - t_last, 1e-9)
                    t_last = now
                    entry = {"step": run.step, "epoch": epoch, "lr": run.optimizer.param_groups[0]["lr"],
                             "loss": values[0].item(), **{k: v.item() for k, v in zip(terms, values[1:], strict=True)},
                             "images_per_s": round(ips, 1), "seconds": round(run.elapsed_before + now - start, 2)}
                    log["steps"].append(entry)
                    bar.update(1, loss=f"{entry['loss']:.4f}", **{"img/s": f"{ips:.0f}"})
                    epoch_done = run.step % plan.steps_per_epoch == 0
                    if epoch_done or run.step == plan.total_steps:
                        log["epochs"].append(_epoch_summary(log["steps"], epoch, list(terms)))
                    # Every checkpoint_every steps, every epoch and every CHECKPOINT_MINUTES: a short run resumes too.
                    if run.step < plan.total_steps and (run.step % settings.checkpoint_every == 0 or epoch_done
                                                        or late_anywhere):
                        run.checkpoint(plan, run.elapsed_before + now - start, log, ddp)
                        last_saved = time.perf_counter()
                    _after_step(run.step)
                    if run.step >= plan.total_steps:
                        break
    except KeyboardInterrupt as e:
        if isinstance(e, Interrupted):
            raise
        raise Interrupted(_interrupted_message(run.step, plan.total_steps, run.saved_step, plan.partial)) from None
    log["seconds"] = round(run.elapsed_before + time.perf_counter() - start, 2)


def mix_batch(x: torch.Tensor, labels: torch.Tensor | None, num_classes: int, mixup: float, cutmix: float,
              gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mixup or cutmix of a batch with its reverse (one weight per batch, as timm's ``Mixup`` in batch mode).

    The teacher is then run on the mixed images too: "consistent teaching" (Beyer et al. 2022, "Knowledge
    distillation: a good teacher is patient and consistent"), where mixing makes unlabeled images carry more
    of the teacher's function than the images alone. Labels, when used, become (B, classes) probabilities mixed
    by the pixels' shares (a cutmix box clipped at the border counts what was pasted).
    """
    use_cutmix = cutmix > 0 and (mixup <= 0 or bool(torch.rand((), generator=gen) < 0.5))
    alpha = cutmix if use_cutmix else mixup
    lam = float(np.random.default_rng(int(torch.randint(2**31, (), generator=gen))).beta(alpha, alpha))
    other = x.flip(0)
    if use_cutmix:
        h, w = x.shape[-2:]
        cut = (1.0 - lam) ** 0.5
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = (int(torch.randint(n, (), generator=gen)) for n in (h, w))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[..., y0:y1, x0:x1] = other[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        x = x * lam + other * (1.0 - lam)
    if labels is not None:
        if labels.dim() == 1:
            labels = nn.functional.one_hot(labels, num_classes).float()
        labels = labels * lam + labels.flip(0) * (1.0 - lam)
    return x, labels


def _step(plan: _Plan, run: _Run, teacher: nn.Module | None, x: torch.Tensor, y: torch.Tensor,
          autocast: contextlib.AbstractContextManager[Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimiser step; returns the loss and its unweighted terms."""
    model = run.model
    run.scheduler.step_update(run.step)
    model.set_train_progress(run.step / plan.total_steps)  # schedules inside the method (DGE's temperature)
    labels: torch.Tensor | None = y if plan.use_labels else None
    if plan.settings.mixup > 0 or plan.settings.cutmix > 0:
        # Seeded by the step: a resumed run mixes the batches it would have mixed.
        gen = torch.Generator().manual_seed(plan.settings.seed * 1_000_003 + run.step)
        x, labels = mix_batch(x, labels, model.num_classes, plan.settings.mixup, plan.settings.cutmix, gen)
    with autocast:
        outputs = run.step_fn(x)
        # A model that keeps the original inside it hands its logits on; they are the teacher's when no other
        # teacher was given (_teacher then returned None).
        original = outputs.pop("original_logits", None)
        teacher_logits = original.detach() if original is not None and teacher is None and plan.distills else None
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(x)
    terms = loss_terms(model, outputs, teacher_logits, labels, plan.settings)
    loss = sum(loss_weight(plan.weights, k) * v for k, v in terms.items())
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if plan.settings.clip_grad:
        torch.nn.utils.clip_grad_norm_(model.parameters(), plan.settings.clip_grad)
    run.optimizer.step()
    if run.ema is not None:
        run.ema.update(model, step=run.step)
    run.step += 1
    return loss, terms  # type: ignore[return-value]


def _finish(plan: _Plan, run: _Run, teacher: nn.Module | None, log: dict[str, Any], ddp: _Dist) -> None:
    """The trained (or EMA) weights back on the CPU, written with the log; the checkpoints go."""
    model = run.model
    if run.ema is not None:
        model.load_state_dict(run.ema.module.state_dict())
    model.eval().to("cpu")
    if teacher is not None:
        teacher.to("cpu")
    model.finetuned = True
    # Operating points measured before fine-tuning no longer describe this model.
    model.curve = []
    model.calibration = {}
    log["ema"] = bool(run.ema)
    if ddp.main:
        plan.session.write(plan.out, skip=(LOG_NAME, "curve.png", "eval.json", "eval.png"),
                           extra={LOG_NAME: json.dumps(log, indent=1) + "\n"})
        shutil.rmtree(plan.partial, ignore_errors=True)
    ddp.barrier()


def _interrupted_message(step: int, total: int, saved_step: int | None, partial: Path) -> str:
    """What an interrupted fine-tune kept, and how to continue it."""
    if saved_step is not None:
        return (f"finetune interrupted at step {step}/{total}; its checkpoint at step {saved_step} is kept in "
                f"{str(partial)!r} and nothing else was written: run the same command with --resume to continue")
    return (f"finetune interrupted at step {step}/{total}, before its first checkpoint (at the end of the first epoch, "
            f"after {CHECKPOINT_MINUTES:g} minutes or finetune.checkpoint_every steps): nothing was written and it "
            "cannot be resumed; run it again")


def _gather_rng(ddp: _Dist) -> dict[str, Any] | list[dict[str, Any]]:
    """Random state of every process (each keeps its own for stochastic depth)."""
    state = _rng_state()
    if ddp.world == 1:
        return state
    states: list[Any] = [None] * ddp.world
    dist.all_gather_object(states, state)
    return states


def _epoch_summary(steps: list[dict[str, Any]], epoch: int, names: list[str]) -> dict[str, Any]:
    rows = [s for s in steps if s["epoch"] == epoch]
    summary: dict[str, Any] = {"epoch": epoch, "steps": len(rows), "seconds": rows[-1]["seconds"]}
    for key in ["loss", *names]:
        summary[key] = sum(r[key] for r in rows) / len(rows)
    summary["images_per_s"] = round(sum(r["images_per_s"] for r in rows) / len(rows), 1)
    return summary


__all__ = ["finetune"]

"""The shared pipeline: data splits, fine-tuning (determinism, resume, DDP), calibration, evaluation."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.data import create_transform, resolve_data_config
from utils import TINY_MODELS, fake_timings, tiny_model

import vitconvert
import vitconvert.calibration as calibration
import vitconvert.train as vtrain
from vitconvert.calibration import calibrate, measure_curve
from vitconvert.data import ImageDataset, open_image_folder, train_transform
from vitconvert.errors import UserError
from vitconvert.evaluation import evaluate
from vitconvert.losses import loss_terms
from vitconvert.operating import choose_point, eligible_points, frontier, not_slower
from vitconvert.session import original_model
from vitconvert.timing import Timing
from vitconvert.train import finetune

CLASSES = 10
PER_CLASS = 8  # 6 train + 2 held out at holdout 0.25


pytestmark = pytest.mark.usefixtures("one_thread")


def _write_images(folder: Path, per_class: int, seed: int, ext: str) -> None:
    rng = np.random.default_rng(seed)
    for c in range(CLASSES):
        d = folder / f"class{c:02d}"
        d.mkdir(parents=True)
        for i in range(per_class):
            # A class-dependent colour plus noise, so labels mean something.
            base = np.array([(c * 25) % 256, (c * 70) % 256, 255 - c * 20], dtype=np.float64)
            img = np.clip(base + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{i:03d}{ext}")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ROOT/train/<class>/*.png (8 per class) + ROOT/val/<class>/*.jpg (3 per class)."""
    root = tmp_path_factory.mktemp("data") / "toy"
    _write_images(root / "train", PER_CLASS, 0, ".png")
    _write_images(root / "val", 3, 1, ".jpg")
    return root


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, _, _ = tiny_model("vit")
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    save_file(model.state_dict(), str(path))
    return path


RECIPE = ["model.gca_start_block=1", "finetune.batch_size=8", "finetune.epochs=2", "finetune.warmup_epochs=0.5",
          "finetune.lr=1e-3", "calibrate.holdout=0.25"]


def make_model(base_ckpt: Path, out: Path, overrides: list[str] | None = None) -> Path:
    arch, kwargs = TINY_MODELS["vit"]
    model = vitconvert.apply(arch, "cfvit", checkpoint=base_ckpt, model_kwargs=kwargs,
                             overrides=[*RECIPE, *(overrides or [])])
    return vitconvert.save(model, out)


@pytest.fixture(scope="module")
def model_dir(base_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(base_ckpt, tmp_path_factory.mktemp("m") / "toy-cfvit")


@pytest.fixture(scope="module")
def finetuned_dir(model_dir: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finetune(model_dir, data_dir, tmp_path_factory.mktemp("ft") / "ft", device="cpu", progress=False)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


# --- data ----------------------------------------------------------------------------------------------


def test_splits_are_deterministic_and_disjoint(data_dir: Path) -> None:
    d = open_image_folder(data_dir, holdout=0.25)
    assert d.classes == [f"class{c:02d}" for c in range(CLASSES)] and d.name == "toy"
    train, held, val = d.train_split(), d.heldout_split(), d.eval_split()
    assert len(train) == 60 and len(held) == 20 and len(val) == 30
    # held out = the last 2 files of each class in sorted order; train = the rest
    assert [p.name for p, label in held.files if label == 3] == ["006.png", "007.png"]
    assert {p for p, _ in train.files}.isdisjoint(p for p, _ in held.files)
    assert all(p.parent.parent.name == "val" for p, _ in val.files)
    # max_images takes the first files of each class evenly
    capped = d.train_split(20)
    assert [label for _, label in capped.files] == [c for c in range(CLASSES) for _ in range(2)]
    assert [p.name for p, label in capped.files if label == 0] == ["000.png", "001.png"]
    # without val/, evaluation uses the held-out split
    flat = open_image_folder(data_dir / "train", holdout=0.25)
    assert flat.eval_split().files == held.files and flat.name == "toy"


def test_data_errors(tmp_path: Path, data_dir: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        open_image_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no class subfolders"):
        open_image_folder(tmp_path / "empty")
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "a" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="has no images"):
        open_image_folder(tmp_path / "noimg")
    with pytest.raises(UserError, match="10 class folders but the model's head has 1000"):
        open_image_folder(data_dir).check_classes(1000)


def test_transforms_are_timms_and_augmentation_is_seeded(model_dir: Path, data_dir: Path) -> None:
    model = vitconvert.load(model_dir)
    files = open_image_folder(data_dir, holdout=0.25).train_split().files[:4]
    ref = create_transform(**resolve_data_config(model=model), is_training=False)
    with Image.open(files[0][0]) as im:
        expected = ref(im.convert("RGB"))
    from vitconvert.data import eval_transform

    assert torch.equal(ImageDataset(files, eval_transform(model))[0][0], expected)
    a = ImageDataset(files, train_transform(model), seed=3)
    b = ImageDataset(files, train_transform(model), seed=3, in_memory=False)
    torch.manual_seed(123)  # the global state must not matter
    assert torch.equal(a[2][0], b[2][0])
    b.set_epoch(1)
    assert not torch.equal(a[2][0], b[2][0])
    # recipe augmentation settings are timm create_transform arguments
    mild = train_transform(model, scale=[0.5, 1.0], color_jitter=0.0)
    ref = create_transform(**resolve_data_config(model=model), is_training=True, scale=(0.5, 1.0), color_jitter=0.0)
    assert repr(mild) == repr(ref)
    with pytest.raises(UserError, match="unknown keys \\['mixup'\\]"):
        train_transform(model, mixup=0.8)
    # RandAugment draws from numpy: seeded too
    ra = [ImageDataset(files, train_transform(model, auto_augment="rand-m9-mstd0.5"), seed=1, seed_numpy=True)
          for _ in range(2)]
    np.random.seed(5)
    x0 = ra[0][1][0]
    np.random.seed(6)
    assert torch.equal(x0, ra[1][1][0])


def test_data_config_survives_save_load_and_finetune(data_dir: Path, tmp_path: Path) -> None:
    """Transforms follow the base model's own data config (here CIFAR-style), not the architecture's defaults."""
    import timm

    model, _, kwargs = tiny_model("vit")
    data_cfg = {"input_size": (3, 32, 32), "crop_pct": 1.0, "crop_mode": "center", "interpolation": "bilinear",
                "mean": (0.4914, 0.4822, 0.4465), "std": (0.247, 0.2435, 0.2616)}
    timm.models.save_for_hf(model, str(tmp_path / "base"), model_config={"pretrained_cfg": data_cfg},
                            model_args={k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
                            safe_serialization=True, data_config=data_cfg)
    converted = vitconvert.apply(f"local-dir:{tmp_path / 'base'}", "cfvit", overrides=[*RECIPE, "finetune.epochs=1"])
    folder = vitconvert.save(converted, tmp_path / "m")
    tuned = finetune(folder, data_dir, tmp_path / "ft", device="cpu", progress=False, max_images=16)
    for m in (converted, vitconvert.load(folder), vitconvert.load(tuned), timm.create_model(f"local-dir:{tuned}",
                                                                                               pretrained=True)):
        cfg = resolve_data_config(model=m)
        assert cfg["crop_pct"] == 1.0 and cfg["interpolation"] == "bilinear"
        assert tuple(cfg["mean"]) == data_cfg["mean"] and tuple(cfg["std"]) == data_cfg["std"]


# --- fine-tuning -----------------------------------------------------------------------------------------


def test_finetune_writes_model_and_log(finetuned_dir: Path, model_dir: Path) -> None:
    model = vitconvert.load(finetuned_dir)
    assert model.finetuned and model.curve == [] and model.calibration == {}
    before, after = weights(model_dir), weights(finetuned_dir)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    log = json.loads((finetuned_dir / "train_log.json").read_text())
    # 60 training images (8 per class minus 2 held out), batch 8 -> 7 steps per epoch, 2 epochs
    assert log["images"] == 60 and log["steps_per_epoch"] == 7 and log["total_steps"] == 14
    assert [s["step"] for s in log["steps"]] == list(range(1, 15))
    assert len(log["epochs"]) == 2 and log["warmup_steps"] == 4
    assert {"loss", "distill", "ce", "coarse_kl", "lr", "images_per_s", "seconds"} <= set(log["steps"][0])
    for s in log["steps"]:
        assert s["loss"] == pytest.approx(s["distill"] + s["ce"] + s["coarse_kl"], rel=1e-5)
    lrs = [s["lr"] for s in log["steps"]]
    assert lrs[0] == pytest.approx(1e-6) and max(lrs) == pytest.approx(1e-3, rel=0.02) and lrs[-1] < 1e-4
    assert "the base weights the model holds" in log["teacher"]
    assert not finetuned_dir.with_name("ft.partial").exists()


def test_finetune_is_repeatable(base_ckpt: Path, data_dir: Path, finetuned_dir: Path, tmp_path: Path) -> None:
    # converting again (new parts initialised from the recipe's seed, whatever the global random state)
    torch.manual_seed(1234)
    again = finetune(make_model(base_ckpt, tmp_path / "m"), data_dir, tmp_path / "again", device="cpu",
                     progress=False)
    a, b = weights(finetuned_dir), weights(again)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_gives_the_same_weights(base_ckpt: Path, data_dir: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # EMA and stochastic depth on, so their state (and the random state) must be restored too.
    src = make_model(base_ckpt, tmp_path / "m", ["finetune.checkpoint_every=3", "finetune.ema_decay=0.9",
                                                 "finetune.drop_path_rate=0.1"])
    straight = finetune(src, data_dir, tmp_path / "straight", device="cpu", progress=False)

    def interrupt(step: int) -> None:
        if step == 10:  # mid-epoch 2; the last checkpoint is at step 9
            raise KeyboardInterrupt

    monkeypatch.setattr(vtrain, "_after_step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        finetune(src, data_dir, tmp_path / "resumed", device="cpu", progress=False)
    assert (tmp_path / "resumed.partial" / "checkpoint.pt").is_file() and not (tmp_path / "resumed").exists()
    monkeypatch.setattr(vtrain, "_after_step", lambda step: None)
    with pytest.raises(UserError, match="--resume"):
        finetune(src, data_dir, tmp_path / "resumed", device="cpu", progress=False)
    with pytest.raises(UserError, match="other settings"):
        finetune(src, data_dir, tmp_path / "resumed", device="cpu", progress=False, resume=True,
                 overrides=["finetune.lr=5e-4"])
    resumed = finetune(src, data_dir, tmp_path / "resumed", device="cpu", progress=False, resume=True)
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = json.loads((resumed / "train_log.json").read_text())
    assert log["resumed_at"] == [9] and [s["step"] for s in log["steps"]] == list(range(1, 15))
    assert not (tmp_path / "resumed.partial").exists()


def test_drop_path_reaches_the_rewritten_graphs(model_dir: Path) -> None:
    from timm.layers import DropPath

    model = vitconvert.load(model_dir).train()
    x = torch.randn(2, 3, 32, 32)
    with vtrain._drop_path(model, 0.3):
        last = model.base.blocks[3].drop_path1
        assert type(last) is DropPath and last.drop_prob == pytest.approx(0.3)
        assert type(model.base.blocks[0].drop_path1) is DropPath and model.base.blocks[0].drop_path1.drop_prob == 0
        # the coarse stage runs the tapped (fx-rewritten) blocks: stochastic depth must act there too
        a, b = model.forward_coarse(x)["logits"], model.forward_coarse(x)["logits"]
        assert not torch.allclose(a, b)
    assert type(model.base.blocks[3].drop_path1) is torch.nn.Identity
    a, b = model.forward_coarse(x)["logits"], model.forward_coarse(x)["logits"]
    assert torch.equal(a, b)


def test_finetune_options_and_errors(model_dir: Path, data_dir: Path, tmp_path: Path, finetuned_dir: Path) -> None:
    out = finetune(model_dir, data_dir, tmp_path / "nolabels", labels=False, device="cpu", progress=False,
                   overrides=["finetune.epochs=1"], max_images=16)
    log = json.loads((out / "train_log.json").read_text())
    assert log["images"] == 16 and log["total_steps"] == 2 and "ce" not in log["steps"][0]
    assert vitconvert.load(out).recipe.finetune.epochs == 1
    with pytest.raises(UserError, match="already exists"):
        finetune(model_dir, data_dir, out, device="cpu", progress=False)
    with pytest.raises(UserError, match="fixed when it is converted"):
        finetune(model_dir, data_dir, tmp_path / "x", overrides=["model.alpha=0.3"], progress=False)
    with pytest.raises(UserError, match="does not exist"):
        finetune(model_dir, tmp_path / "missing", tmp_path / "x", progress=False)
    three = tmp_path / "three"
    for c in range(3):
        (three / f"c{c}").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (32, 32), (c * 50, 0, 0)).save(three / f"c{c}" / f"{i}.png")
    with pytest.raises(UserError, match="3 class folders but the model's head has 10"):
        finetune(model_dir, three, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_loss_terms_and_teacher(model_dir: Path, finetuned_dir: Path) -> None:
    model = vitconvert.load(model_dir)
    settings = model.recipe.finetune.model_copy(update={"distill_temperature": 2.0, "label_smoothing": 0.1})
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    teacher_logits = torch.randn(4, 10)
    outputs = model.train().forward_train(x)
    terms = loss_terms(model, outputs, teacher_logits, y, settings)
    p_t = F.softmax(teacher_logits / 2, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(outputs["logits"] / 2, -1))).sum(-1).mean() * 4
    assert terms["distill"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(outputs["logits"], y, label_smoothing=0.1).item())
    assert set(terms) == {"distill", "ce", "coarse_kl"}
    # the teacher is the original model: held weights before fine-tuning, rebuilt from the checkpoint after
    original, _, _ = tiny_model("vit")
    xs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = original(xs)
        before, _ = original_model(model.eval())
        after, desc = original_model(vitconvert.load(finetuned_dir))
        assert (before(xs) - ref).abs().max() < 1e-5 and (after(xs) - ref).abs().max() < 1e-5
    assert "base.safetensors" in desc


def test_mix_batch_mixes_images_and_labels_by_the_same_share(model_dir: Path) -> None:
    x = torch.arange(4 * 3 * 8 * 8, dtype=torch.float32).view(4, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    mixed, soft = vtrain.mix_batch(x, y, 10, 0.8, 0.0, torch.Generator().manual_seed(1))
    assert soft is not None and soft.shape == (4, 10)
    lam = float(soft[0, 0])
    assert 0 < lam < 1 and soft.sum(1).allclose(torch.ones(4))
    assert soft[0, 3] == pytest.approx(1 - lam)  # image 0 mixed with image 3 (the reversed batch)
    torch.testing.assert_close(mixed, x * lam + x.flip(0) * (1 - lam))
    again, _ = vtrain.mix_batch(x, y, 10, 0.8, 0.0, torch.Generator().manual_seed(1))
    assert torch.equal(mixed, again)  # seeded: a resumed run mixes alike
    cut, soft = vtrain.mix_batch(x, None, 10, 0.0, 1.0, torch.Generator().manual_seed(3))
    assert soft is None
    pasted = (cut != x).any(1)  # (B, H, W) pixels taken from the reversed batch
    where = pasted.unsqueeze(1).expand_as(cut)
    assert pasted.any() and torch.equal(cut[where], x.flip(0)[where])
    _, soft = vtrain.mix_batch(x, y, 10, 0.0, 1.0, torch.Generator().manual_seed(3))
    assert soft is not None and soft[0, 3].item() == pytest.approx(pasted[0].float().mean().item())
    # soft labels reach the shared loss and the method's own terms (CF-ViT's coarse cross-entropy)
    model = vitconvert.load(model_dir)
    settings = model.recipe.finetune
    outputs = model.train().forward_train(torch.randn(4, 3, 32, 32))
    hard = loss_terms(model, outputs, None, y, settings)
    as_probs = loss_terms(model, outputs, None, F.one_hot(y, 10).float(), settings)
    assert as_probs["ce"].item() == pytest.approx(hard["ce"].item(), rel=1e-5)


DDP_SCRIPT = """
import sys
from vitconvert.train import finetune
finetune(sys.argv[1], sys.argv[2], sys.argv[3], device="cpu", progress=False)
"""


@pytest.mark.timeout(180)
def test_ddp_two_processes_match_one(model_dir: Path, data_dir: Path, finetuned_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(vitconvert.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(model_dir), str(data_dir), str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = weights(finetuned_dir), weights(tmp_path / "ddp")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    log = json.loads((tmp_path / "ddp" / "train_log.json").read_text())
    assert log["world_size"] == 2 and log["per_process_batch"] == 4 and log["total_steps"] == 14


# --- calibration -----------------------------------------------------------------------------------------


def _independent_top1(model: torch.nn.Module, files: list[tuple[Path, int]], cfg_model: torch.nn.Module | None = None
                      ) -> tuple[float, float]:
    """Top-1 (percent) and mean GMACs computed here, with timm's transform, one image at a time."""
    tf = create_transform(**resolve_data_config(model=cfg_model or model), is_training=False)
    correct, gmacs = 0, 0.0
    with torch.no_grad():
        for path, label in files:
            with Image.open(path) as im:
                x = tf(im.convert("RGB"))[None]
            out = model.forward_dynamic(x) if hasattr(model, "forward_dynamic") else None
            logits = out.logits if out is not None else model(x)
            gmacs += float(out.gmacs.sum()) if out is not None else 0.0
            correct += int(logits.argmax(-1).item() == label)
    return 100.0 * correct / len(files), gmacs / len(files)


def test_calibrate_chooses_within_budget(finetuned_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cal"
    result = calibrate(finetuned_dir, data_dir, "60%", out, device="cpu", progress=False, batch_size=7)
    model = vitconvert.load(out)
    held = open_image_folder(data_dir, holdout=0.25).heldout_split().files
    cal = model.calibration
    assert cal["images"] == 20 and cal["dataset"] == "toy" and "held-out last 25%" in cal["split"]
    # the eta sweep, and the dense point (the fine stage alone: the base model's computation)
    cascade = [p for p in model.curve if not p.point["dense"]]
    assert len(model.curve) == 102 and [p.knob for p in cascade] == list(model.operating_space().knob("eta").sweep)
    dense = [p for p in model.curve if p.point["dense"]]
    assert len(dense) == 1 and dense[0].gmacs == pytest.approx(model.base_gmacs, rel=1e-6)
    # the chosen point is the most accurate within 60% of the base GMACs among those not timed slower than the
    # base model here (the speed check times the choice and chooses again while it is slower)
    limit = 0.6 * model.base_gmacs
    slow = [p for p in model.curve if p.extra.get("throughput_ratio", 1.0) < 1.0]
    within = [p for p in model.curve if p.gmacs <= limit + 1e-12 and p not in slow]
    check = cal["speed_check"]
    assert check["points_timed"] >= 1 and check["points_slower"] == len(slow) and check["batch_size"] == 7
    if check["not_slower"]:
        assert cal["chosen"]["gmacs"] <= limit and cal["chosen"]["top1"] == max(p.top1 for p in within)
        assert cal["chosen"]["extra"]["throughput_ratio"] >= 1.0
    assert model.knob == cal["chosen"]["point"]["eta"]
    assert result["eta"] == model.knob and result["out"] == str(out)
    # curve values agree with an independent evaluation at two knob values
    model.small_batch = None  # the curve is what each point computes; the check below runs one image at a time
    for p in (model.curve[0], dense[0]):  # the first eta, and the dense point
        model.set_operating_point(p.point)
        top1, gmacs = _independent_top1(model, held)
        assert p.top1 == pytest.approx(top1) and p.gmacs == pytest.approx(gmacs, rel=1e-6)
    original, _, _ = tiny_model("vit")
    assert cal["base_top1"] == pytest.approx(_independent_top1(original, held, model)[0])
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "train_log.json").is_file()  # carried over from the fine-tuned folder
    # loading with a budget switches the knob to the stored curve's point
    expected = choose_point(model.curve, "30%", model.base_gmacs, cal["base_top1"])
    loaded = vitconvert.load(out, budget="30%")
    assert loaded.knob == expected.knob and expected.gmacs <= 0.3 * model.base_gmacs
    for budget in ("drop=1", 0.006, "100%"):
        assert loaded.set_budget(budget).knob == loaded.knob == choose_point(
            model.curve, budget, model.base_gmacs, cal["base_top1"]).knob


def test_gmacs_budget_sets_aside_points_slower_than_the_base(finetuned_dir: Path, data_dir: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Timing is faked by the point being timed (eta > 0.1 'runs' at half the base's speed): the budget's choice is
    timed, set aside while slower, and the most accurate point within budget that is not slower is kept."""
    timed_etas: list[float] = []

    def fake_compare(models: dict, x: torch.Tensor, **kwargs: object) -> dict[str, Timing]:
        eta = models["converted"].operating_point["eta"]
        if x.shape[0] == 8:  # the calibration batch (calibration also times batch 1 and records it)
            timed_etas.append(eta)
        return fake_timings(x, {"converted": 50.0 if eta > 0.1 else 200.0, "base": 100.0})

    monkeypatch.setattr(calibration, "compare", fake_compare)
    out = tmp_path / "checked"
    calibrate(finetuned_dir, data_dir, "60%", out, device="cpu", progress=False, batch_size=8)
    model = vitconvert.load(out)
    limit = 0.6 * model.base_gmacs
    allowed = [p for p in model.curve if p.gmacs <= limit + 1e-12 and p.point["eta"] <= 0.1]
    best = max(allowed, key=lambda p: (p.top1, -p.gmacs))
    assert model.operating_point == best.point
    # every point timed before it was more accurate (or as accurate and cheaper) and slower; it was timed last
    assert timed_etas[-1] == best.point["eta"] and all(e > 0.1 for e in timed_etas[:-1]) and len(timed_etas) >= 2
    check = model.calibration["speed_check"]
    assert check["not_slower"] and check["points_timed"] == len(timed_etas)
    assert check["points_slower"] == len(timed_etas) - 1
    # not slower at batch 1 either: no small-batch rule
    assert model.calibration["small_batch"] == {"ratios": {"1": 0.5 if best.point["eta"] > 0.1 else 2.0},
                                                "threads": 1, "below": None} and model.small_batch is None
    stored = {p.point["eta"]: p.extra.get("throughput_ratio") for p in model.curve if not p.point["dense"]}
    assert all(stored[e] == (0.5 if e > 0.1 else 2.0) for e in timed_etas)
    assert not check["fell_back_to_dense"]
    # a loaded model's GMACs budgets keep away from the points measured slower
    assert model.set_budget("60%").point == best.point
    # without the check the budget takes the most accurate point within 60%, slow or not
    monkeypatch.setattr(calibration, "compare", lambda *a, **k: pytest.fail("timed without a check"))
    calibrate(finetuned_dir, data_dir, "60%", tmp_path / "unchecked", device="cpu", progress=False, batch_size=8,
              check_speed=False)
    unchecked = vitconvert.load(tmp_path / "unchecked")
    within = [p for p in unchecked.curve if p.gmacs <= limit + 1e-12]
    assert unchecked.operating_point == max(within, key=lambda p: (p.top1, -p.gmacs)).point
    assert "speed_check" not in unchecked.calibration


def test_a_cascade_slower_than_its_base_everywhere_runs_dense(finetuned_dir: Path, data_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Timing is faked: every point of the cascade 'runs' at half the base's speed, the dense point (the fine
    stage alone) at its speed. A GMACs budget then falls back to the dense point, timed for the record."""

    def fake_compare(models: dict, x: torch.Tensor, **kwargs: object) -> dict[str, Timing]:
        dense = models["converted"].operating_point["dense"]
        return fake_timings(x, {"converted": 100.0 if dense else 50.0, "base": 100.0})

    monkeypatch.setattr(calibration, "compare", fake_compare)
    out = tmp_path / "dense"
    calibrate(finetuned_dir, data_dir, "60%", out, device="cpu", progress=False, batch_size=8)
    model = vitconvert.load(out)
    assert model.operating_point["dense"] == 1.0
    check = model.calibration["speed_check"]
    assert check["fell_back_to_dense"] and check["not_slower"] and check["points_slower"] == check["points_timed"]
    assert model.calibration["chosen"]["extra"]["throughput_ratio"] == 1.0
    assert model.calibration["chosen"]["gmacs"] == pytest.approx(model.base_gmacs, rel=1e-6)
    x = torch.randn(3, 3, *model.anatomy.img_size)
    with torch.no_grad():
        out_dense = model.forward_dynamic(x)
    assert (out_dense.stage == 1).all() and torch.allclose(out_dense.gmacs, torch.full((3,), model.base_gmacs))


def test_speed_budget_times_the_frontier_and_stores_throughput(finetuned_dir: Path, data_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calibration, "SPEED_SECONDS", 0.05)
    out = tmp_path / "fast"
    result = calibrate(finetuned_dir, data_dir, "speed=1.2x", out, device="cpu", progress=False, batch_size=8)
    model = vitconvert.load(out)
    timed = [p for p in model.curve if "throughput_ratio" in p.extra]
    frontier_points = frontier(model.curve)
    # the timed points are the frontier (up to MAX_TIMED_POINTS of it, ends included), each with a measured speed
    assert 2 <= len(timed) <= calibration.MAX_TIMED_POINTS and {id(p) for p in timed} <= {id(p) for p in model.curve}
    assert [p.point for p in timed] == [p.point for p in frontier_points] or len(frontier_points) > len(timed)
    assert {tuple(p.point.items()) for p in timed} <= {tuple(p.point.items()) for p in frontier_points}
    assert timed[0].point == frontier_points[0].point and timed[-1].point == frontier_points[-1].point
    assert all(p.extra["throughput"] > 0 and p.extra["throughput_ratio"] > 0 for p in timed)
    speed = model.calibration["throughput"]
    assert speed["batch_size"] == 8 and speed["points_timed"] == len(timed)
    # the choice: the most accurate timed point at >= 1.2x, else the fastest one
    fast = [p for p in timed if p.extra["throughput_ratio"] >= 1.2]
    best = max(fast, key=lambda p: (p.top1, p.extra["throughput_ratio"])) if fast else \
        max(timed, key=lambda p: (p.extra["throughput_ratio"], p.top1))
    assert model.operating_point == best.point and result["top1"] == best.top1
    # a loaded model takes other speed budgets from the stored measurements; GMACs budgets still work
    most_accurate = max(timed, key=lambda p: (p.top1, p.extra["throughput_ratio"]))
    assert model.set_budget("speed=0.01x").point == most_accurate.point
    # (a GMACs budget skips points this timing measured slower than the base, whichever they were)
    allowed = not_slower(eligible_points(model.curve, model.base_gmacs), model.base_gmacs)
    assert model.set_budget("100%").top1 == max(p.top1 for p in allowed)
    card = (out / "README.md").read_text()
    assert "throughput vs base" in card


def test_calibrate_in_place_and_simulation_matches_real_exit(finetuned_dir: Path, data_dir: Path,
                                                            tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "inplace"
    shutil.copytree(finetuned_dir, folder)
    calibrate(folder, data_dir, device="cpu", progress=False)  # recipe's budget (50%)
    model = vitconvert.load(folder)
    assert model.calibration["budget"] == "50%" and model.curve
    # the simulated curve equals running the real batched early exit at each knob
    split = open_image_folder(data_dir, holdout=0.25).heldout_split()
    knobs = [0.0, 0.3, 0.6, 0.9, 1.0]
    space = model.operating_space()
    eta = dataclasses.replace(space.knob("eta"), sweep=tuple(knobs))
    model.operating_space = lambda: dataclasses.replace(space, knobs=(eta, space.knob("alpha")))
    simulated = measure_curve(model, split, torch.device("cpu"), 8, progress=False)
    # the generic path: forward_dynamic at every point
    real = measure_curve(model, split, torch.device("cpu"), 8, progress=False, simulate=False)
    for s, r in zip(simulated, real, strict=True):
        assert s.top1 == pytest.approx(r.top1) and s.gmacs == pytest.approx(r.gmacs, rel=1e-6)
        assert sum(v for k, v in r.extra.items() if k.startswith("exit_")) == pytest.approx(1.0)


# --- evaluation -------------------------------------------------------------------------------------------


def test_evaluate_reports_measured_values(finetuned_dir: Path, data_dir: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import vitconvert.evaluation as vevaluate

    monkeypatch.setattr(vevaluate, "THROUGHPUT_SECONDS", 0.2)
    cal = tmp_path / "cal"
    # no speed check, so no small-batch rule: the independent evaluation below runs one image at a time
    calibrate(finetuned_dir, data_dir, "50%", cal, device="cpu", progress=False, check_speed=False)
    report = evaluate(cal, data_dir, tmp_path / "ev", budget="60%", device="cpu", progress=False, batch_size=16)
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert saved["top1"] == report["top1"] and (tmp_path / "ev" / "eval.png").read_bytes()[:4] == b"\x89PNG"
    model = vitconvert.load(cal, budget="60%")
    val = open_image_folder(data_dir).eval_split().files
    top1, gmacs = _independent_top1(model, val)
    assert report["split"] == "val" and report["images"] == 30
    assert report["knob"] == model.knob and report["top1"] == pytest.approx(top1)
    assert report["gmacs"] == pytest.approx(gmacs, rel=1e-6)
    assert report["gmacs_fraction"] == pytest.approx(gmacs / model.base_gmacs, rel=1e-6)
    # exit fractions: the share of images the coarse stage answered
    coarse = model.costs["coarse"]
    share_fine = (gmacs - coarse) / model.costs["fine"]
    assert report["points"][0]["exit_fractions"].get("1", 0.0) == pytest.approx(share_fine, abs=1e-6)
    original, _, _ = tiny_model("vit")
    assert report["base"]["top1"] == pytest.approx(_independent_top1(original, val, model)[0])
    assert report["top1_drop"] == pytest.approx(report["base"]["top1"] - top1)
    speed = report["throughput"]
    assert speed["converted_images_per_s"] > 0 and speed["base_images_per_s"] > 0 and speed["batch_size"] == 16
    # a second budget adds a point to the same eval.json
    evaluate(cal, data_dir, tmp_path / "ev", budget="100%", device="cpu", progress=False, throughput=False)
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert len({p["knob"] for p in saved["points"]}) == len(saved["points"]) >= 1
    # without val/ the held-out split is used, and said so
    flat = evaluate(cal, data_dir / "train", None, device="cpu", progress=False, throughput=False)
    assert flat["split"] == "held-out" and flat["images"] == 20
    assert (cal / "eval.json").is_file() and "## Evaluation" in (cal / "README.md").read_text()

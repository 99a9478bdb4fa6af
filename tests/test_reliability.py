"""Every failure a user can cause ends in one clear line, exit 2 (130 for Ctrl-C), nothing lost (issue 16).

Most checks drive the command line in a fresh process (``python -m vitconvert``, the console script's entry
point, from this checkout), and check the exit status, a single line on stderr without a traceback, and that
the output location is left as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from utils import TINY_MODELS, model_kwargs_args, tiny_model

import vitconvert
import vitconvert.train as vtrain
from vitconvert.errors import Interrupted, UserError
from vitconvert.train import finetune

ROOT = Path(vitconvert.__file__).resolve().parents[1]
CLASSES = 10
FT = ["--set", "finetune.batch_size=8", "--set", "calibrate.holdout=0.25"]


def cli(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-m", "vitconvert", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def snapshot(path: Path) -> list[tuple[str, bytes]] | None:
    """Names and contents of everything under ``path`` (hidden files included), None when it does not exist."""
    if not path.exists():
        return None
    if path.is_file():
        return [(path.name, path.read_bytes())]
    return sorted((str(p.relative_to(path)), p.read_bytes() if p.is_file() else b"") for p in path.rglob("*"))


def assert_one_line(proc: subprocess.CompletedProcess[str], code: int = 2, message: str = "") -> str:
    err = proc.stderr.strip()
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(err.splitlines()) == 1, proc.stderr
    assert message in err, err
    return err


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "toy"
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        d = root / f"class{c:02d}"
        d.mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    root = tmp_path_factory.mktemp("models")
    for key, recipe in (("deit", "cfvit"), ("deit", "dge"), ("pvt_v2", "dge")):
        arch, kwargs = TINY_MODELS[key]
        overrides = ["model.gca_start_block=1"] if recipe == "cfvit" else []
        model = vitconvert.apply(arch, recipe, pretrained=False, model_kwargs=kwargs,
                                 overrides=[*overrides, "finetune.batch_size=8", "calibrate.holdout=0.25"])
        out[f"{key}-{recipe}"] = vitconvert.save(model, root / f"{key}-{recipe}")
    return out


# --- 1 and 11: models run with autograd on, on empty batches, and in every dtype the base runs in -------------


def _full_compute_cases(models: dict[str, Path]) -> list[tuple[str, vitconvert.ConvertedModel]]:
    return [(name, vitconvert.load(path)) for name, path in models.items()]


def test_eval_mode_with_autograd_and_empty_batches(models: dict[str, Path]) -> None:
    for name, model in _full_compute_cases(models):
        size = tuple(model.base_spec.img_size)
        x = torch.randn(3, 3, *size, requires_grad=True)
        model.eval()
        if model.method == "dge":  # mixed granularities everywhere: the sparse path
            model.override_gates(lambda i, b, r, dev: torch.arange(b * r, device=dev).view(b, r) % 3)
        else:
            model.set_operating_point(eta=0.5, alpha=0.5)
        logits = model(x)  # no torch.no_grad(): saliency maps, attacks
        logits[:, 0].sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all(), name
        with torch.no_grad():
            assert torch.allclose(model(x.detach()), logits.detach(), atol=1e-5), name
        base = model.build_base()
        empty = torch.zeros(0, 3, *size)
        try:
            expected = base(empty)
        except RuntimeError:  # timm's PVT-v2 itself fails on an empty batch: nothing to match
            continue
        with torch.no_grad():
            out = model.forward_dynamic(empty)
        assert out.logits.shape == expected.shape and out.gmacs.shape == (0,), name


def _base_runs(base: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    try:
        with torch.no_grad():
            return base.to(dtype)(x.to(dtype)).float()
    except (RuntimeError, NotImplementedError):
        return None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_full_compute_matches_the_base_in_every_dtype(models: dict[str, Path], dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    for name, model in _full_compute_cases(models):
        x = torch.randn(4, 3, *model.base_spec.img_size)
        base = model.build_base()
        with torch.no_grad():
            ref32 = base(x)
        ref = _base_runs(base, x, dtype)
        if ref is None:
            continue  # the base model does not run in this dtype here; neither must the converted one
        own_error = (ref - ref32).abs().max().item()  # the base model's own tolerance in this dtype
        model.full_compute().to(dtype)
        with torch.no_grad():
            out = model(x.to(dtype))
        assert out.dtype == dtype, name
        assert (out.float() - ref).abs().max().item() <= max(1e-4, 2 * own_error), name
        # below full compute too: every path runs in the dtype
        if model.method == "dge":
            model.override_gates(lambda i, b, r, dev: torch.arange(b * r, device=dev).view(b, r) % 3)
        else:
            model.set_operating_point(eta=0.5, alpha=0.5)
        with torch.no_grad():
            out = model.forward_dynamic(x.to(dtype))
        assert torch.isfinite(out.logits.float()).all() and out.gmacs.dtype == torch.float32, name


def test_cpu_bf16_autocast(models: dict[str, Path]) -> None:
    torch.manual_seed(0)
    for name, model in _full_compute_cases(models):
        x = torch.randn(4, 3, *model.base_spec.img_size)
        base = model.build_base()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            ref = base(x).float()
            out = model.full_compute()(x).float()
        with torch.no_grad():
            own_error = (ref - base(x)).abs().max().item()
        assert (out - ref).abs().max().item() <= max(1e-4, 2 * own_error), name
        if model.method == "dge":
            model.override_gates(lambda i, b, r, dev: torch.arange(b * r, device=dev).view(b, r) % 3)
        else:
            model.set_operating_point(eta=0.5, alpha=0.5)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                gca = model.forward_coarse(x)["gca"]
            assert gca.dtype == torch.float32  # which patches are refined is decided in fp32
            with torch.no_grad():
                assert model.to(torch.bfloat16).forward_coarse(x.bfloat16())["gca"].dtype == torch.float32
            model.float()
        for grad in (False, True):
            with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
                assert torch.isfinite(model(x).float()).all(), name


# --- 3: usage errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    ([], "no command given"),
    (["--bogus"], "No such option: --bogus"),
    (["apply"], "Missing argument"),
    (["nocmd"], "No such command 'nocmd'"),
    (["eval", "x", "--data", "y", "--max-images", "abc"], "--max-images"),
    (["finetune", "x"], "--data"),
])
def test_usage_errors_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    assert_one_line(cli(args), 2, message)


# --- 2 and 12: Ctrl-C, checkpoints and resuming ------------------------------------------------------------------


def test_ctrl_c_during_finetune_exits_130_and_keeps_the_checkpoint(models: dict[str, Path], data_dir: Path,
                                                                    tmp_path: Path) -> None:
    out = tmp_path / "ft"
    partial = tmp_path / "ft.partial"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.Popen([sys.executable, "-m", "vitconvert", "finetune", str(models["deit-cfvit"]), "--data",
                             str(data_dir), "-o", str(out), "--device", "cpu", "--set", "finetune.epochs=100"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            # A run started from a background job inherits SIGINT ignored (POSIX shells do that for
                            # `cmd &`), and then Python raises no KeyboardInterrupt: give the child the default.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler))
    deadline = time.monotonic() + 120
    while not (partial / "checkpoint.pt").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # the first epoch's checkpoint (7 steps), long before checkpoint_every's 200
    assert (partial / "checkpoint.pt").is_file(), "no checkpoint at the end of the first epoch"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    lines = [line for line in err.strip().splitlines() if not re.match(r"finetune \w+ \d+/\d+", line)]  # progress
    assert proc.returncode == 130, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert "--resume" in lines[0] and "interrupted" in lines[0]
    assert not out.exists() and (partial / "checkpoint.pt").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name not in ("ft.partial",)]  # nothing else written


def test_short_finetune_checkpoints_per_epoch_and_says_when_it_cannot_resume(models: dict[str, Path], data_dir: Path,
                                                                            tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    src = models["deit-cfvit"]
    overrides = ["finetune.epochs=2"]  # 14 steps, checkpoint_every at its default of 200
    straight = finetune(src, data_dir, tmp_path / "straight", device="cpu", progress=False, overrides=overrides)

    def interrupt_at(n: int):
        def hook(step: int) -> None:
            if step == n:
                raise KeyboardInterrupt
        return hook

    monkeypatch.setattr(vtrain, "_after_step", interrupt_at(3))
    with pytest.raises(Interrupted, match="cannot be resumed"):
        finetune(src, data_dir, tmp_path / "early", device="cpu", progress=False, overrides=overrides)
    assert not (tmp_path / "early").exists() and not (tmp_path / "early.partial").exists()

    monkeypatch.setattr(vtrain, "_after_step", interrupt_at(10))
    with pytest.raises(Interrupted, match=r"checkpoint at step 7 .*--resume"):
        finetune(src, data_dir, tmp_path / "resumed", device="cpu", progress=False, overrides=overrides)
    monkeypatch.setattr(vtrain, "_after_step", lambda step: None)
    resumed = finetune(src, data_dir, tmp_path / "resumed", device="cpu", progress=False, overrides=overrides,
                       resume=True)
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((resumed / "train_log.json").read_text())["resumed_at"] == [7]


# --- 4: output locations are checked before the work ------------------------------------------------------------


def test_output_locations_are_checked_first(models: dict[str, Path], data_dir: Path, tmp_path: Path) -> None:
    model = str(models["deit-cfvit"])
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    before = snapshot(tmp_path)
    for args in (["finetune", model, "--data", str(data_dir), "-o", "/proc/vitconvert-test/ft"],
                 ["finetune", model, "--data", str(data_dir), "-o", str(afile / "sub")],
                 ["eval", model, "--data", str(data_dir), "-o", str(afile)],
                 ["eval", model, "--data", str(data_dir), "-o", "/proc/vitconvert-test"],
                 ["calibrate", model, "--data", str(data_dir), "-o", str(afile / "sub")]):
        start = time.monotonic()
        assert_one_line(cli(args), 2)
        assert time.monotonic() - start < 60  # refused before training or measuring
    assert snapshot(tmp_path) == before
    arch, kwargs = TINY_MODELS["deit"]
    apply = ["apply", "--recipe", "cfvit", "--no-pretrained", "--model-kwargs", *model_kwargs_args(kwargs), arch]
    assert_one_line(cli([*apply, "-o", "/proc/vitconvert-test/x"]), 2, "cannot be written")
    # --overwrite onto a file replaces it and leaves nothing hidden behind
    proc = cli([*apply, "-o", str(afile), "--overwrite", "--set", "model.gca_start_block=1"])
    assert proc.returncode == 0, proc.stderr
    assert afile.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


# --- 5: tampered configs: push refuses what load refuses ---------------------------------------------------------


@pytest.mark.parametrize(("path", "value"), [
    ("model_args.state.calibration", "a string"),
    ("model_args.base.model_args.num_heads", 7),
    ("pretrained_cfg.input_size", "abc"),
    ("", [1, 2]),
])
def test_push_refuses_a_tampered_config(models: dict[str, Path], tmp_path: Path, path: str, value: object) -> None:
    folder = tmp_path / "m"
    shutil.copytree(models["deit-cfvit"], folder)
    config = json.loads((folder / "config.json").read_text())
    if path:
        *parents, last = path.split(".")
        node = config
        for key in parents:
            node = node[key]
        node[last] = value
    else:
        config = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError):
        vitconvert.load(folder)
    assert_one_line(cli(["push", str(folder), "--repo-id", "tester/m", "--token", "hf_test_token"]), 2, "config")


# --- 6, 7, 10: sources -------------------------------------------------------------------------------------------


def test_bad_local_dir_sources(tmp_path: Path) -> None:
    cases = {"badjson": ("{nope", "not valid JSON"), "noarch": (json.dumps({"num_classes": 3}), "no 'architecture'"),
             "list": ("[1, 2]", "JSON object")}
    for name, (text, message) in cases.items():
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(text)
        err = assert_one_line(cli(["apply", "--recipe", "cfvit", f"local-dir:{d}", "-o", str(tmp_path / "o")]), 2,
                              message)
        assert "--model-kwargs" not in err
    # only pickled weights, with more than tensors in them: refused in one line, never unpickled
    base, arch, kwargs = tiny_model("deit")
    d = tmp_path / "binonly"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architecture": arch, "num_classes": 10, "model_args": {
        k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items() if k != "num_classes"}}))
    torch.save({"state_dict": base.state_dict(), "path": Path("/x")}, d / "pytorch_model.bin")
    err = assert_one_line(cli(["apply", "--recipe", "cfvit", f"local-dir:{d}", "-o", str(tmp_path / "o")]), 2,
                          "never unpickles")
    assert "weights_only=False" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kwarg", ["num_heads=7", "patch_size=0"])
def test_model_kwargs_timm_cannot_build(kwarg: str, tmp_path: Path) -> None:
    assert_one_line(cli(["apply", "--recipe", "cfvit", "--no-pretrained", "deit_tiny", "--model-kwargs", "img_size=32",
                         kwarg, "-o", str(tmp_path / "o")]), 2, "bad --model-kwargs")
    assert not (tmp_path / "o").exists()


def test_image_size_that_is_no_whole_number_of_patches_is_one_line(tmp_path: Path) -> None:
    # timm builds deit_tiny at 33 px (its grid drops the last pixel); CF-ViT feeds the patch embedding resized images,
    # which timm accepts only in whole patches.
    err = assert_one_line(cli(["apply", "--recipe", "cfvit", "--no-pretrained", "deit_tiny_patch16_224",
                               "--model-kwargs", "img_size=33", "-o", str(tmp_path / "o")]), 2,
                          "whole number of patches")
    assert "img_size=32" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args", [["--help"], ["recipes"]])
def test_output_piped_into_a_reader_that_stops_early_exits_quietly(args: list[str]) -> None:
    """`vitconvert --help | head -1`: the reader goes away; what it wanted was read, so that is no failure. Here it
    goes away before the first line is written (the import takes seconds), so the write always meets a closed pipe."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.Popen([sys.executable, "-m", "vitconvert", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=ROOT)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == "", err


def test_pickled_checkpoint_is_one_line(tmp_path: Path) -> None:
    base, arch, kwargs = tiny_model("deit")
    torch.save({"model": base.state_dict(), "extra": Path("/x")}, tmp_path / "evil.pth")
    err = assert_one_line(cli(["apply", "--recipe", "cfvit", "--no-pretrained", arch, "--model-kwargs",
                               *model_kwargs_args(kwargs), "--checkpoint", str(tmp_path / "evil.pth"), "-o",
                               str(tmp_path / "o")]), 2, "never unpickles")
    assert "weights_only=False" not in err and "trust" not in err
    assert not (tmp_path / "o").exists()


# --- 8, 9: data and numbers checked before the work --------------------------------------------------------------


def test_unreadable_first_image_and_bad_numbers(models: dict[str, Path], data_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(data_dir, bad)
    (bad / "class00" / "000.png").write_bytes(b"not an image")
    model = models["deit-dge"]
    before = snapshot(model)
    assert_one_line(cli(["finetune", str(model), "--data", str(bad), "-o", str(tmp_path / "ft")]), 2,
                    "could not be read")
    assert not (tmp_path / "ft").exists() and not (tmp_path / "ft.partial").exists()
    assert_one_line(cli(["eval", str(model), "--data", str(data_dir), "--batch-size", "0"]), 2, "batch size")
    start = time.monotonic()
    assert_one_line(cli(["calibrate", str(model), "--data", str(data_dir), "--budget", "lots"]), 2, "lots")
    assert time.monotonic() - start < 60
    assert snapshot(model) == before

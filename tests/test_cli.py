"""The command line: every command has --help; mistakes are one line and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from utils import TINY_MODELS, model_kwargs_args

import vitconvert
from vitconvert.cli import main, normalise_argv

COMMANDS = ["apply", "inspect", "recipes", "finetune", "calibrate", "eval", "push"]


def run(args: list[str]) -> tuple[int, str, str]:
    proc = subprocess.run([sys.executable, "-m", "vitconvert.cli", *args], capture_output=True, text=True,
                          timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command: str | None, capsys) -> None:
    try:
        main([command, "--help"] if command else ["--help"])
    except SystemExit as exc:
        assert exc.code in (0, None)
    assert "Usage" in capsys.readouterr().out


def test_normalise_argv() -> None:
    assert normalise_argv(["apply", "--model-kwargs", "a=1", "b=2", "deit", "--set", "x=1", "y=2"]) == [
        "apply", "--model-kwargs", "a=1", "--model-kwargs", "b=2", "deit", "--set", "x=1", "--set", "y=2"]


def test_apply_inspect_and_recipes(tmp_path) -> None:
    arch, kwargs = TINY_MODELS["deit"]
    out = tmp_path / "converted"
    code, stdout, stderr = run(["apply", "--recipe", "cfvit", "--no-pretrained", "--model-kwargs",
                                *model_kwargs_args(kwargs), "--set", "model.gca_start_block=1", arch, "-o", str(out)])
    assert code == 0, stderr
    assert "base GMACs" in stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_args"]["recipe"]["model"]["gca_start_block"] == 1
    model = vitconvert.load(out)
    base = model.build_base()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model.full_compute()(x) - base(x)).abs().max() <= 1e-4

    code, stdout, _ = run(["inspect", arch, "--model-kwargs", *model_kwargs_args(kwargs)])
    assert code == 0 and "pos_embed" in stdout and "grid 8x8" in stdout

    code, stdout, _ = run(["recipes"])
    assert code == 0 and "cfvit" in stdout and "ViT/DeiT" in stdout


@pytest.mark.parametrize(("args", "message"), [
    (["apply", "--recipe", "cfvit", "--no-pretrained", "no_such_model_x"], "unknown model"),
    (["apply", "--recipe", "nope", "deit_tiny"], "unknown recipe 'nope'"),
    (["apply", "--recipe", "cfvit", "--set", "model.alhpa=1", "deit_tiny"], "unknown key 'model.alhpa'"),
    (["apply", "--recipe", "fsla", "--no-pretrained", "pvt_v2_b0"], "supports Swin, SwinV2; pvt_v2_b0 is PVT-v2"),
    (["apply", "--recipe", "cfvit", "--checkpoint", "/nonexistent.pth", "deit_tiny"], "does not exist"),
    (["inspect", "resnet18"], "no attention found"),
    (["apply", "--recipe", "dvt", "--no-pretrained", "--model-kwargs", "img_size=28", "depth=2",
      "vit_small_patch14_dinov2"], "built headless (num_classes=0); converting needs one: pass --model-kwargs "
                                   "num_classes=N"),
    (["apply", "--recipe", "cfvit", "--no-pretrained", "--model-kwargs", "img_size", "deit_tiny"], "key=value"),
])
def test_user_mistakes_exit_2_with_one_line(tmp_path, capsys, args: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*args, "-o", str(tmp_path / "out")] if args[0] == "apply" else args)
    assert exc.value.code == 2
    stderr = capsys.readouterr().err
    assert message in stderr
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    code, _, stderr = run(["apply", "--recipe", "cfvit", "--no-pretrained", "deit_tiny", "-o", str(out)])
    assert code == 2 and "--overwrite" in stderr

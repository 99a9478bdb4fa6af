"""The embedded main job: `vitconvert demo` on the shipped checkpoint and CIFAR-10 sample, smallest settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vitconvert.cli import main
from vitconvert.demo import DEFAULT_CHECKPOINT, SAMPLE_DATA, run_demo
from vitconvert.errors import UserError


def test_shipped_sample_is_small_and_complete() -> None:
    files = sorted(SAMPLE_DATA.rglob("*.jpg"))
    assert len(files) == 1500 and sum(f.stat().st_size for f in files) < 5_000_000
    assert {f.parent.name for f in files} == {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                             "ship", "truck"}
    assert (SAMPLE_DATA / "README.md").is_file()


@pytest.mark.skipif(not (DEFAULT_CHECKPOINT / "config.json").is_file(), reason="needs the source checkout")
def test_demo_end_to_end_smallest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(["demo", "--out", str(tmp_path / "demo"), "--max-images", "20", "--set", "finetune.batch_size=10",
              "--epochs", "1"])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "vitconvert demo" in printed and "reload identical: True" in " ".join(printed.split())
    model_dir = tmp_path / "demo" / "model"
    for name in ("model.safetensors", "config.json", "README.md", "curve.png", "eval.png", "eval.json"):
        assert (model_dir / name).is_file(), name
    card = (model_dir / "README.md").read_text()
    assert "model-index" in card and "cifar10-sample" in card and "## How to reproduce" in card
    with pytest.raises(UserError, match="already exists"):
        run_demo(tmp_path / "demo")
    with pytest.raises(UserError, match=r"demo data .* is missing"):
        run_demo(tmp_path / "other", data=tmp_path / "nowhere")

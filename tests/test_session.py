"""The session layer the pipeline steps share: model resolution, the original model once, the device, file carrying."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from utils import tiny_model

import vitconvert
from vitconvert.errors import UserError
from vitconvert.session import Session, resolve_device

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base, _, _ = tiny_model("deit")
    model = vitconvert.apply(base, "dge")
    path = tmp_path_factory.mktemp("session") / "m"
    vitconvert.save(model, path, extra_files={"train_log.json": "{}\n", "eval.json": "{}\n", "notes.txt": "kept\n"})
    return path


def test_open_resolves_folder_and_device(folder: Path) -> None:
    session = Session.open(f"local-dir:{folder}", "cpu", progress=False)
    assert session.folder == folder.resolve() and session.device == torch.device("cpu")
    assert session.model.method == "dge" and not session.progress
    model = session.model
    assert Session.open(model).model is model and Session.open(model).folder is None
    with pytest.raises(UserError, match="not understood"):
        resolve_device("gpu:7")
    with pytest.raises(UserError, match="expected a converted model"):
        Session.open(42)  # type: ignore[arg-type]


def test_the_original_is_built_once_and_a_missing_one_says_why(folder: Path) -> None:
    session = Session.open(folder)
    first, desc = session.original_if_any()
    assert first is not None and "base weights the model holds" in desc
    assert session.original_if_any()[0] is first
    session.model.finetuned = True  # fine-tuned from an in-memory module with random weights: no way back
    fresh = Session(session.model, None, torch.device("cpu"))
    base, why = fresh.original_if_any()
    assert base is None and why.startswith("not measured: ") and "teacher" in why
    with pytest.raises(UserError, match="cannot be rebuilt"):
        fresh.original()


def test_on_device_returns_the_models_to_the_cpu_when_the_work_fails(folder: Path) -> None:
    session = Session.open(folder)
    base, _ = session.original_if_any()
    session.model.train()
    with pytest.raises(RuntimeError, match="work failed"), session.on_device(base, None):
        assert not session.model.training and not base.training
        raise RuntimeError("work failed")
    assert next(session.model.parameters()).device.type == "cpu"


def test_write_carries_the_folders_files_except_stale_ones(folder: Path, tmp_path: Path) -> None:
    session = Session.open(folder)
    out = session.write(tmp_path / "out", skip=("eval.json",), extra={"curve.png": b"png"})
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "README.md", "train_log.json", "notes.txt", "curve.png"} <= names
    assert "eval.json" not in names and (out / "notes.txt").read_text() == "kept\n"
    assert torch.equal(vitconvert.load(out).routers["0"].fc.bias, session.model.routers["0"].fc.bias)

"""Export: the .pt2 round trip, the knobs as defaulted graph inputs, the metadata, the CLI, and every refusal.

Parity of every method on every family in onnxruntime (batch 1, an odd batch and the whole batch, at a point where
images take different exits) is the conformance suite's ``check_onnx_export``.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from utils import TINY_MODELS, exiting_cfvit

import vitconvert
from vitconvert.deploy import output_names
from vitconvert.errors import UserError
from vitconvert.layers.resize import resize_matrix
from vitconvert.methods.base import ConvertedModel
from vitconvert.methods.dge import DGE

pytestmark = pytest.mark.usefixtures("one_thread")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cascade(tmp_path_factory: pytest.TempPathFactory) -> tuple[vitconvert.ConvertedModel, Path, torch.Tensor]:
    """A CF-ViT model saved as a folder, at a point where some of the images exit early."""
    return exiting_cfvit(tmp_path_factory.mktemp("export"))


def test_pt2_reloads_with_torch_export_load_and_matches_eager(cascade, tmp_path: Path) -> None:
    model, _, x = cascade
    path = vitconvert.export(model, tmp_path / "m.pt2", format="torch-export")
    module = torch.export.load(str(path)).module()
    with torch.no_grad():
        eager = model.forward_dynamic(x)
        logits, gmacs, exits = module(x, torch.tensor(model.eta))
    torch.testing.assert_close(logits, eager.logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(exits, eager.stage) and torch.equal(gmacs, eager.gmacs)
    assert 0 < int(exits.sum()) < 7  # a real mix of exits went through the graph


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize(("size_in", "size_out"), [(224, 112), (224, 160), (32, 24), (7, 5), (16, 32)])
def test_resize_matrices_are_the_antialiased_resize(mode: str, size_in: int, size_out: int) -> None:
    """The matrices an exported cascade resizes with give ``F.interpolate(antialias=True)``'s images."""
    x = torch.randn(2, 3, size_in, size_in + 3, generator=torch.Generator().manual_seed(0))
    h = torch.from_numpy(resize_matrix(size_in, size_out, mode))
    w = torch.from_numpy(resize_matrix(size_in + 3, size_out + 1, mode))
    ref = torch.nn.functional.interpolate(x, size=(size_out, size_out + 1), mode=mode, align_corners=False,
                                          antialias=True)
    torch.testing.assert_close(h @ x @ w.t(), ref, atol=3e-6, rtol=0)


def test_exported_cascades_resize_without_an_antialiased_resize_op(cascade, tmp_path: Path) -> None:
    """The coarse pass's antialiased resize exports as matrix products, not as ``Resize`` with ``antialias=1`` (an
    opset-18 attribute OpenVINO 2026.4 ignores: it resized bilinearly and the logits moved by up to 1), and the graph
    still gives the eager model's logits and exits."""
    model, _, x = cascade
    path = vitconvert.export(model, tmp_path / "m.onnx")
    graph = onnx.load(str(path)).graph
    antialiased = [n.name for n in graph.node if n.op_type == "Resize"
                   and any(a.name == "antialias" and a.i == 1 for a in n.attribute)]
    assert antialiased == []
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, gmacs, exits = session.run(None, {"pixel_values": x.numpy()})
    with torch.no_grad():
        eager = model.forward_dynamic(x)
    assert np.abs(logits - eager.logits.numpy()).max() <= 1e-4
    assert (exits == eager.stage.numpy()).all() and np.allclose(gmacs, eager.gmacs.numpy())


def test_the_exit_score_is_in_the_graph(tmp_path: Path) -> None:
    """A cascade scored by the margin (top-1 minus top-2 probability) exports with that score: onnxruntime takes the
    eager model's exits at a point where max softmax would let more images leave."""
    model, folder, x = exiting_cfvit(tmp_path, score="margin")
    with torch.no_grad():
        eager = model.forward_dynamic(x)
        coarse = model.forward_coarse(x)["logits"].softmax(-1)
    assert int((coarse.amax(-1) > model.eta).sum()) > int((eager.stage == 0).sum()) == 3  # the scores disagree here
    session = ort.InferenceSession(str(vitconvert.export(folder)), providers=["CPUExecutionProvider"])
    logits, gmacs, exits = session.run(None, {"pixel_values": x.numpy()})
    assert np.abs(logits - eager.logits.numpy()).max() <= 1e-4
    assert (exits == eager.stage.numpy()).all() and np.allclose(gmacs, eager.gmacs.numpy())


def test_the_dense_point_exports_as_one_dense_pass(cascade, tmp_path: Path) -> None:
    """At the dense point (the fine stage alone) the graph is the base model's computation: every image at the last
    exit and the base's GMACs; eta stays an input that changes nothing."""
    model = copy.deepcopy(cascade[0])
    x = cascade[2]
    model.set_operating_point(model.dense_point())
    module = torch.export.load(str(vitconvert.export(model, tmp_path / "d.pt2", format="torch-export"))).module()
    with torch.no_grad():
        logits, gmacs, exits = module(x, torch.tensor(0.0))
        base = model.build_base().eval()(x)
    torch.testing.assert_close(logits, base, atol=1e-5, rtol=1e-5)
    assert (exits == 1).all() and torch.allclose(gmacs, torch.full_like(gmacs, model.base_gmacs))


def test_onnx_defaults_to_the_stored_point_and_carries_the_preprocessing(cascade) -> None:
    model, folder, x = cascade
    path = vitconvert.export(folder)
    assert path == folder / "model.onnx"
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["method"] == "cfvit" and json.loads(meta["operating_point"])["eta"] == pytest.approx(model.eta)
    assert json.loads(meta["mean"]) == list(model.pretrained_cfg["mean"])
    assert [i.name for i in proto.graph.input] == ["pixel_values", "eta"]
    assert output_names(model) == [o.name for o in proto.graph.output] == ["logits", "gmacs", "exit"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        eager = model.forward_dynamic(x)
    logits, _, exits = session.run(None, {"pixel_values": x.numpy()})  # eta left out: the stored one
    assert np.abs(logits - eager.logits.numpy()).max() <= 1e-4 and (exits == eager.stage.numpy()).all()
    none_exit = session.run(["exit"], {"pixel_values": x.numpy(), "eta": np.array(1.0, np.float32)})[0]
    assert (none_exit == 1).all()  # eta 1: every image refined, without exporting again


def test_a_budget_picks_the_exported_point(cascade, tmp_path: Path) -> None:
    model = copy.deepcopy(cascade[0])
    chosen = vitconvert.CurvePoint({"eta": 0.25, "alpha": 0.5}, gmacs=0.5 * model.base_gmacs, top1=50.0)
    model.curve = [chosen, vitconvert.CurvePoint({"eta": 1.0, "alpha": 1.0}, model.base_gmacs * 1.2, 60.0)]
    path = vitconvert.export(model, tmp_path / "m.onnx", budget="60%")
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["operating_point"]) == {**chosen.point, "dense": 0.0}


def test_refusals_are_one_line_and_write_nothing(cascade, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = cascade[0]
    arch, kwargs = TINY_MODELS["deit"]
    dge = vitconvert.apply(arch, "dge", model_kwargs=kwargs, pretrained=False)
    # Every registered method exports: a method without a traceable path (the base class's) stands in for one.
    monkeypatch.setattr(DGE, "forward_traceable", ConvertedModel.forward_traceable)
    with pytest.raises(UserError, match=r"^dge models cannot be exported yet: its dynamic path has no traceable form"):
        vitconvert.export(dge, tmp_path / "dge.onnx")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="format 'tflite' is not known"):
        vitconvert.export(model, tmp_path / "m.tflite", format="tflite")  # type: ignore[arg-type]
    with pytest.raises(UserError, match=r"written as a \.pt2 file"):
        vitconvert.export(model, tmp_path / "m.onnx", format="torch-export")
    with pytest.raises(UserError, match="needs an output file"):
        vitconvert.export(model)
    (tmp_path / "taken.onnx").write_text("keep")
    with pytest.raises(UserError, match="--overwrite"):
        vitconvert.export(model, tmp_path / "taken.onnx")
    assert (tmp_path / "taken.onnx").read_text() == "keep"
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # what `import onnxscript` meets without the extra
    with pytest.raises(UserError, match=r"needs onnxscript: pip install \"vitconvert\[export\]\""):
        vitconvert.export(model, tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.onnx"]


def test_a_graph_that_does_not_reproduce_the_model_is_not_written(cascade, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    model, _, _ = cascade
    import vitconvert.deploy as deploy

    real = deploy._reference
    monkeypatch.setattr(deploy, "_reference", lambda m, x: (real(m, x)[0] + 1.0, *real(m, x)[1:]))
    with pytest.raises(UserError, match=r"does not reproduce the model at batch 1 .* nothing was written"):
        vitconvert.export(model, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_cli_export(cascade, tmp_path: Path) -> None:
    _, folder, _ = cascade
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "vitconvert", "export", str(folder), "--format", "torch-export",
                          "-o", str(tmp_path / "m.pt2")], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "m.pt2").is_file() and "exported to" in run.stdout
    again = subprocess.run([sys.executable, "-m", "vitconvert", "export", str(folder), "--format", "torch-export",
                            "-o", str(tmp_path / "m.pt2")], capture_output=True, text=True, cwd=ROOT, env=env,
                           timeout=600)
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1 and "--overwrite" in again.stderr


def test_fsla_exports_its_clustering_with_the_cluster_size_baked_in(tmp_path: Path) -> None:
    # Clustered attention in the graph (the eager permutation, batch size dynamic); the cluster size shapes the graph,
    # so the only input is the images. The tiny DeiT at 64 px with 32-token clusters really clusters.
    arch, kwargs = TINY_MODELS["deit"]
    torch.manual_seed(0)
    model = vitconvert.apply(arch, "fsla_replace", model_kwargs=kwargs, pretrained=False,
                             overrides=["model.img_size=64", "model.clustering_overhead=0", "model.cluster_size=32"])
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model.build_base()(x)
        eager = model.forward_dynamic(x)
    assert float((eager.logits - dense).abs().max()) > 1e-5  # the clustering changes the output: it is exercised
    path = vitconvert.export(model, tmp_path / "m.pt2", format="torch-export")
    module = torch.export.load(str(path)).module()
    with torch.no_grad():
        logits, gmacs = module(x)
    torch.testing.assert_close(logits, eager.logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(gmacs, eager.gmacs) and output_names(model) == ["logits", "gmacs"]


def test_dge_outputs_each_images_granularity_and_the_check_compares_it(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # DGE's per-image decision leaves the graph as `granularity` (the share of full-resolution queries kept), after
    # logits and gmacs, in onnxruntime and in the .pt2, equal to the eager model's; a graph whose granularity differs
    # from the eager one's is refused like one whose exits differ.
    import vitconvert.deploy as deploy

    arch, kwargs = TINY_MODELS["deit"]
    torch.manual_seed(0)
    model = vitconvert.apply(arch, "dge", model_kwargs=kwargs, pretrained=False)
    with torch.no_grad():
        for router in model.routers.values():  # routers that mix levels (fresh ones keep every region finest)
            router.fc.weight.normal_(0, 2.0 / router.fc.in_features ** 0.5)
            router.fc.bias.normal_(0, 0.5)
    model.eval()
    x = torch.randn(6, 3, *model.anatomy.img_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = model.forward_dynamic(x).extras["granularity"]
    assert len(set(eager.tolist())) > 1 and bool((eager < 1).all())  # images kept different shares
    path = vitconvert.export(model, tmp_path / "m.onnx")
    assert output_names(model) == [o.name for o in onnx.load(str(path)).graph.output] == ["logits", "gmacs",
                                                                                            "granularity"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["granularity"], {"pixel_values": x.numpy()})[0]
    assert got.dtype == np.float32 and (got == eager.numpy()).all()
    program = torch.export.load(str(vitconvert.export(model, tmp_path / "m.pt2", format="torch-export"))).module()
    with torch.no_grad():
        assert torch.equal(program(x)[2], eager)

    real = deploy._reference
    monkeypatch.setattr(deploy, "_reference", lambda m, x: (*real(m, x)[:2], real(m, x)[2] * 0.99))
    with pytest.raises(UserError, match=r"does not reproduce the model at batch 1 .*decisions differ"):
        vitconvert.export(model, tmp_path / "other.onnx")
    assert not (tmp_path / "other.onnx").exists()

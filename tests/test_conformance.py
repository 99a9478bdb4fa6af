"""The method kit's conformance suite: every registered method, on every family it declares, meets the contract.

A method gets all of it by being registered (:func:`vitconvert.registry.register_method`): the cases are read from
the registry when this module is collected, and ``test_a_registered_toy_method_gets_the_suite`` registers a small
method of its own and runs every check on it.

Each case converts a tiny random-init timm model of the architecture with the method's default settings, then gives the
method's new parameters trained-like values (they start at values that make the model exact, where most methods
decide nothing) and finds an *exercised point*: an operating point that is not full compute at which the images of a
batch take different paths (different exits, different granularities), or, for a method whose images all run the
same shapes (``per_image_paths = False``: FSLA clusters every image, at one cost), at which the output differs from
full compute. Every check then runs at that point:

* exactness at full compute (or the method's declared full-compute contract), on the fresh model;
* the dense point (where the model has one) is the base model's computation and cost, and the small-batch rule runs
  it;
* per-image GMACs equal :func:`~vitconvert.layers.costs.count_macs` of that image's path;
* ``simulate`` equals the forward pass (methods that simulate their points);
* save/load and the timm round trip;
* fp32, fp16, bf16 and CPU autocast (inference, and a training step under autocast);
* batches of 0, 1 and odd sizes, and each image alone equals the same image inside a batch;
* autograd in eval mode; deepcopy and ``.to()``;
* the training forward and one optimiser step;
* the traceable path (what an exported graph runs) equals the forward, and the ONNX export matches it in
  onnxruntime, or the method refuses to export in one line.

The architectures, their tiny models and the recipe overrides of the few cases whose tiny model would otherwise not
exercise the method live in ``tests/support_matrix.py``, which also generates the support matrix the docs show.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import support_matrix
import timm
import torch
import torch.nn.functional as F
from pydantic import Field
from support_matrix import ARCHITECTURES
from torch import nn

import vitconvert
from vitconvert import fx as vfx
from vitconvert.anatomy import Anatomy
from vitconvert.deploy import export, graph_knobs, output_names
from vitconvert.errors import UserError
from vitconvert.layers.cascade import Carry, Cascade, Stage, thresholds_for_exit_shares
from vitconvert.layers.costs import count_macs
from vitconvert.layers.sharing import attach
from vitconvert.losses import loss_terms
from vitconvert.methods.base import ConvertedModel, DynamicOutput, SimulatesPoints, SmallBatchRule
from vitconvert.operating import Knob, OperatingPoint, OperatingSpace, unique_points
from vitconvert.recipes import Recipe, Strict
from vitconvert.registry import METHODS, register_method
from vitconvert.sources import BaseSpec

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH = 6
# Logits of a path that really differs from another, against float32 rounding (about 1e-7 on these logits): a
# random-init model changed in one block (clustered attention in PVT-v2's last stage) moves its logits by ~1e-4.
DIFFERS = 1e-5


def conformance_cases() -> list[tuple[str, str]]:
    """(method, architecture) for every registered method and every architecture of a family it declares
    (tests/support_matrix.py), except those the committed support matrix marks "no" (tests/test_support_matrix.py
    checks that each of those is a one-line refusal)."""
    refused = {pair for pair, yes in support_matrix.committed().items() if not yes}
    return [(name, arch) for name, cls in sorted(METHODS.items()) for arch, (_, family, _) in ARCHITECTURES.items()
            if family in cls.families and (name, arch) not in refused]


# --- building a case ---------------------------------------------------------------------------------------


@dataclass
class Case:
    """A converted tiny model with trained-like new parameters, at its exercised point, and a batch of images."""

    method: str
    arch: str
    model: ConvertedModel
    x: torch.Tensor
    point: OperatingPoint

    def fresh(self) -> ConvertedModel:
        return convert(self.method, self.arch)


def convert(method: str, arch: str) -> ConvertedModel:
    return support_matrix.convert(method, arch)


def perturb_new_parameters(model: ConvertedModel, seed: int = 1) -> None:
    """Give every parameter the method added (not a weight of the base model) trained-like values."""
    base_names = {f"base.{k}" for k in model.build_base().state_dict()}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in base_names or not p.is_floating_point():
                continue
            scale = float(p.std()) if p.numel() > 1 and float(p.std()) > 0 else 0.5 / math.sqrt(max(p.shape[-1], 1))
            p.add_(torch.randn(p.shape, generator=g) * max(scale, 0.3 / math.sqrt(max(p.shape[-1], 1))))


def wake_zero_norms(model: ConvertedModel, seed: int = 4) -> None:
    """Give norm weights that timm initialises to all zeros trained-like values around 1 (SwinV2's residual
    post-norms: a random-init SwinV2 block is the identity, so no path through it differs from another). These are
    base weights: the references (``build_base``) hold them too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.base.modules():
            w = getattr(m, "weight", None)
            if isinstance(m, nn.LayerNorm) and w is not None and not w.any():
                w.copy_(1.0 + 0.2 * torch.randn(w.shape, generator=g))


def candidate_points(model: ConvertedModel, x: torch.Tensor) -> list[OperatingPoint]:
    """The points calibration would evaluate on ``x`` (a simulating model derives its simulated knobs from them)."""
    space = model.operating_space()
    if not isinstance(model, SimulatesPoints):
        return space.candidates()
    points = []
    saved = model.operating_point
    for fixed in unique_points(space.split(p)[0] for p in space.candidates()):
        model.set_operating_point(fixed)
        with torch.no_grad():
            collected = model.collect(x)
        points += [{**saved, **fixed, **sim} for sim in model.simulated_points(collected)]
    model.set_operating_point(saved)
    return unique_points(points)


def paths(out: DynamicOutput) -> set[tuple[float, ...]]:
    """The distinct paths the images of a batch took: (exit, GMACs) per image."""
    stage = out.stage.tolist() if out.stage is not None else [0] * out.logits.shape[0]
    return set(zip(stage, out.gmacs.tolist(), strict=True))


def references(model: ConvertedModel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The full-compute output and the base model's on ``x``: what a point that runs the dynamic path differs from."""
    with torch.no_grad():
        full = copy.deepcopy(model).full_compute().forward_at_point(x).logits
        base = model.build_base()(x)
    return full, base


def distance_to_references(out: DynamicOutput, refs: tuple[torch.Tensor, torch.Tensor]) -> float:
    """How far ``out`` is from both references (max abs difference, the smaller)."""
    return min(float((out.logits - ref).abs().max()) for ref in refs)


def exercised_point(model: ConvertedModel, x: torch.Tensor) -> OperatingPoint:
    """A point that is neither full compute nor the base model's computation, at which the images take the most
    different paths (methods with per-image paths must have at least two) and whose output differs the most from
    those two."""
    full = model.operating_space().full()
    refs = references(model, x)
    scored = []
    with torch.no_grad():
        for point in candidate_points(model, x):
            if point == full:
                continue
            model.set_operating_point(point)
            out = model.forward_at_point(x)
            scored.append((len(paths(out)), distance_to_references(out, refs), point))
    assert scored, f"{model.method}: no operating point besides full compute"
    best = max(scored, key=lambda s: (s[0], s[1]))
    if model.per_image_paths:
        assert best[0] > 1, f"{model.method}: no point at which the images take different paths"
    assert best[1] > DIFFERS, f"{model.method}: no point whose output differs from full compute and the base model"
    return best[2]


@functools.cache
def _case(method: str, arch: str) -> Case:
    model = convert(method, arch)
    perturb_new_parameters(model)
    wake_zero_norms(model)
    torch.manual_seed(2)
    x = torch.randn(BATCH, 3, *model.anatomy.img_size)
    point = exercised_point(model, x)
    model.set_operating_point(point)
    return Case(method, arch, model, x, point)


@pytest.fixture
def case(request: pytest.FixtureRequest) -> Iterator[Case]:
    """A deep copy of the cached case, so checks that change the model do not reach each other."""
    built = _case(*request.param)
    yield Case(built.method, built.arch, copy.deepcopy(built.model), built.x.clone(), dict(built.point))


def _ids(cases: list[tuple[str, str]]) -> list[str]:
    return [f"{m}-{f}" for m, f in cases]


def cases_param() -> Any:
    cases = conformance_cases()
    return pytest.mark.parametrize("case", cases, ids=_ids(cases), indirect=True)


# --- the checks ----------------------------------------------------------------------------------------------
# Each takes a Case, so the toy-method test below runs the same functions.


def check_full_compute_contract(case: Case) -> None:
    model = case.fresh().full_compute()
    assert model.operating_point == model.operating_space().full()
    base = model.build_base()
    with torch.no_grad():
        ref, out = base(case.x), model(case.x)
    if model.exact_at_full_compute:
        assert (out - ref).abs().max().item() <= 1e-4
    else:
        assert model.full_compute_note != ConvertedModel.full_compute_note


def check_dense_point(case: Case) -> None:
    """The dense point, where the model has one, is one pass of the base's computation at the base's cost: the base
    model's logits even with the method's new parameters trained-like (none of them runs), per-image GMACs equal to
    the base's, and the small-batch rule runs it."""
    model = case.model
    point = model.dense_point()
    if point is None:
        return
    full = model.operating_space().full()
    assert set(point) <= set(full) and (point == full) == model.full_compute_runs_base
    saved = model.operating_point
    model.set_operating_point(point)
    with torch.no_grad():
        out, ref = model.forward_dynamic(case.x), model.build_base()(case.x)
    assert float((out.logits - ref).abs().max()) <= 1e-4
    assert torch.allclose(out.gmacs, torch.full_like(out.gmacs, model.base_gmacs), rtol=1e-6)
    model.set_operating_point(saved)
    model.small_batch = SmallBatchRule(below=3)
    with torch.no_grad():
        assert torch.allclose(model.forward_dynamic(case.x[:2]).logits, out.logits[:2], atol=1e-5, rtol=0)
    assert model.operating_point == saved


def check_exercised_point(case: Case) -> None:
    model = case.model
    with torch.no_grad():
        out = model.forward_dynamic(case.x)
    assert out.logits.shape == (BATCH, model.num_classes) and out.gmacs.shape == (BATCH,)
    assert distance_to_references(out, references(model, case.x)) > DIFFERS
    if model.per_image_paths:
        assert len(paths(out)) > 1
    assert (out.gmacs > 0).all()


def check_gmacs_are_counted_macs(case: Case) -> None:
    model = case.model
    with torch.no_grad(), model.counted_execution():
        out = model.forward_dynamic(case.x)
        for i in range(BATCH):
            counted = count_macs(lambda i=i: model.forward_dynamic(case.x[i:i + 1])) / 1e9
            assert out.gmacs[i].item() == pytest.approx(counted, rel=1e-5), i


def check_simulate_equals_forward(case: Case) -> None:
    model = case.model
    if not isinstance(model, SimulatesPoints):
        pytest.skip(f"{model.method} does not simulate its points")
    with torch.no_grad():
        real = model.forward_at_point(case.x)
        simulated = model.simulate(model.collect(case.x), case.point)
    torch.testing.assert_close(simulated.logits, real.logits.float(), atol=1e-5, rtol=1e-5)
    assert torch.equal(simulated.gmacs, real.gmacs)
    if real.stage is not None:
        assert simulated.stage is not None and torch.equal(simulated.stage, real.stage)


def check_save_load_and_timm(case: Case, tmp_path: Any) -> None:
    model = case.model
    path = vitconvert.save(model, tmp_path / "m")
    with torch.no_grad():
        expected = model(case.x)
        loaded = vitconvert.load(path)
        assert loaded.operating_point == model.operating_point
        assert torch.equal(loaded(case.x), expected)
        via_timm = timm.create_model(f"local-dir:{path}", pretrained=True).eval()
        assert torch.equal(via_timm(case.x), expected)


# Low precision changes logits by rounding; a decision near its threshold may flip, so images are compared only
# where they took the same path, and against a tolerance scaled to the logits.
TOLERANCE = {torch.float16: 0.02, torch.bfloat16: 0.1}


def _agrees(low: DynamicOutput, ref: DynamicOutput, tol: float) -> None:
    assert low.logits.shape == ref.logits.shape and torch.isfinite(low.logits).all()
    same = torch.ones(ref.logits.shape[0], dtype=torch.bool)
    if ref.stage is not None:
        assert low.stage is not None
        same &= low.stage.cpu() == ref.stage.cpu()
    same &= torch.isclose(low.gmacs.float().cpu(), ref.gmacs.float().cpu(), rtol=1e-4)
    assert same.float().mean() >= 0.5, "most images changed their path in low precision"
    scale = float(ref.logits.abs().max()) + 1.0
    diff = (low.logits.float() - ref.logits.float()).abs()[same]
    assert float(diff.max()) <= tol * scale, float(diff.max())


def check_dtype(case: Case, dtype: torch.dtype) -> None:
    model = case.model
    with torch.no_grad():
        ref = model.forward_dynamic(case.x)
        low = copy.deepcopy(model).to(dtype)
        out = low.forward_dynamic(case.x.to(dtype))
    assert out.logits.dtype == dtype
    _agrees(out, ref, TOLERANCE[dtype])


def check_cpu_autocast(case: Case) -> None:
    model = case.model
    with torch.no_grad():
        ref = model.forward_dynamic(case.x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.forward_dynamic(case.x)
    _agrees(out, ref, TOLERANCE[torch.bfloat16])
    # The training step as it runs on a GPU: the forward under autocast, the backward outside it.
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model.forward_train(case.x)
    loss = _loss(model, outputs)
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def check_batch_sizes(case: Case, batch: int) -> None:
    model = case.model
    with torch.no_grad():
        out = model.forward_dynamic(case.x[:batch])
        logits = model(case.x[:batch])
    assert out.logits.shape == (batch, model.num_classes) and out.gmacs.shape == (batch,)
    assert torch.equal(logits, out.logits)
    if out.stage is not None:
        assert out.stage.shape == (batch,)


def check_each_image_alone_equals_the_batch(case: Case) -> None:
    model = case.model
    with torch.no_grad():
        batch = model.forward_dynamic(case.x)
        for i in range(BATCH):
            alone = model.forward_dynamic(case.x[i:i + 1])
            torch.testing.assert_close(alone.logits, batch.logits[i:i + 1], atol=2e-5, rtol=1e-5)
            assert alone.gmacs.item() == pytest.approx(batch.gmacs[i].item(), rel=1e-6)
            if batch.stage is not None:
                assert alone.stage is not None and alone.stage.item() == batch.stage[i].item()


def check_autograd_in_eval(case: Case) -> None:
    model = case.model.eval()
    x = case.x.clone().requires_grad_()
    out = model.forward_dynamic(x)
    out.logits.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def check_deepcopy_and_to(case: Case) -> None:
    model = case.model
    with torch.no_grad():
        ref = model.forward_dynamic(case.x)
        twin = copy.deepcopy(model)
        assert torch.equal(twin.forward_dynamic(case.x).logits, ref.logits)
        for p in twin.parameters():  # the copy owns its weights: changing them leaves the original alone
            p.mul_(0.5)
        assert torch.equal(model.forward_dynamic(case.x).logits, ref.logits)
        wide = copy.deepcopy(model).to(torch.float64)
        out64 = wide.forward_dynamic(case.x.double())
        assert out64.logits.dtype == torch.float64
        _agrees(out64, ref, 1e-4)
        assert torch.equal(model.forward_dynamic(case.x).logits, ref.logits)


def _loss(model: ConvertedModel, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    labels = torch.arange(outputs["logits"].shape[0]) % model.num_classes
    teacher = torch.randn(outputs["logits"].shape, generator=torch.Generator().manual_seed(5))
    terms = loss_terms(model, outputs, teacher, labels, model.recipe.finetune)
    return sum(v.float() for v in terms.values())  # type: ignore[return-value]


def check_training_step(case: Case) -> None:
    model = case.model.train()
    outputs = model.forward_train(case.x)
    assert outputs["logits"].shape == (BATCH, model.num_classes)
    assert model(case.x).shape == (BATCH, model.num_classes)  # forward in training mode: the training logits
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = _loss(model, outputs)
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert changed and all(torch.isfinite(p).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model.forward_dynamic(case.x).logits).all()


def exportable(model: ConvertedModel) -> bool:
    return type(model).forward_traceable is not ConvertedModel.forward_traceable


def check_traceable_path_equals_the_forward(case: Case) -> None:
    """The path an exported graph runs (forward_traceable) is the model's own, decisions and GMACs included."""
    model = case.model
    if not exportable(model):
        pytest.skip(f"{model.method} has no traceable path ({model.export_refusal})")
    knobs = {k: torch.tensor(v) for k, v in graph_knobs(model).items()}
    with torch.no_grad():
        for batch in (1, 3, BATCH):
            eager, traced = model.forward_dynamic(case.x[:batch]), model.forward_traceable(case.x[:batch], knobs)
            torch.testing.assert_close(traced.logits, eager.logits, atol=1e-5, rtol=1e-5)
            assert torch.equal(traced.gmacs, eager.gmacs)
            assert (traced.stage is None) == (eager.stage is None)
            if eager.stage is not None:
                assert torch.equal(traced.stage, eager.stage)
            for name in model.decision_outputs:  # per-image decisions the exported graph outputs (DGE: granularity)
                assert traced.extras[name].shape == (batch,) and torch.equal(traced.extras[name], eager.extras[name])


def exported_optimized(case: Case) -> bool:
    """Whether the ONNX check exports with the exporter's graph optimiser (what users get by default): on each
    method's first architecture. The others export without it, the same graph semantics in about three quarters of
    the time (the suite's ONNX checks are most of its run time)."""
    first = next((arch for method, arch in conformance_cases() if method == case.method), case.arch)
    return case.arch == first


def check_onnx_export(case: Case, tmp_path: Any) -> None:
    """Exported to ONNX at the exercised point, onnxruntime gives the eager logits and decisions at batch 1, an odd
    batch and the whole batch; a method without a traceable path is refused in one line, and nothing is written."""
    ort = pytest.importorskip("onnxruntime")
    model = case.model
    path = tmp_path / "model.onnx"
    if not exportable(model):
        with pytest.raises(UserError, match=r"cannot be exported yet: .+"):
            export(model, path)
        assert list(tmp_path.iterdir()) == []
        return
    export(model, path, optimize=exported_optimized(case))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = output_names(model)
    for batch in (1, 3, BATCH):
        x = case.x[:batch]
        with torch.no_grad():
            eager = model.forward_dynamic(x)
        got = dict(zip(names, session.run(names, {"pixel_values": x.numpy()}), strict=True))
        assert float(abs(got["logits"] - eager.logits.numpy()).max()) <= 1e-4
        assert (got["gmacs"] == eager.gmacs.numpy()).all()
        if eager.stage is not None:
            assert (got["exit"] == eager.stage.numpy()).all()
        for name in model.decision_outputs:
            assert got[name].shape == (batch,) and (got[name] == eager.extras[name].numpy()).all()
    # The knobs are inputs with the stored point as default: another point without exporting again (here every
    # threshold at its full-compute value; knobs that shape the graph, like CF-ViT's alpha, stay as exported).
    full = model.operating_space().full()
    point = {k: full[k] for k in graph_knobs(model)}
    other = copy.deepcopy(model)
    other.set_operating_point(point)
    with torch.no_grad():
        eager_other = other.forward_dynamic(case.x)
    fed = {k: np.array(v, dtype=np.float32) for k, v in point.items()}
    got = session.run(["logits"], {"pixel_values": case.x.numpy(), **fed})[0]
    assert float(abs(got - eager_other.logits.numpy()).max()) <= 1e-4
    if eager.stage is None:
        return
    # Every image leaves at the first stage (every exit threshold 0): the later stages get no image (an empty
    # sub-batch, or one stand-in row where the family cannot run an empty batch), at batch 1 and an odd batch.
    other.set_operating_point({k: 0.0 for k in graph_knobs(model)})
    fed = {k: np.array(0.0, dtype=np.float32) for k in graph_knobs(model)}
    for batch in (1, 3):
        with torch.no_grad():
            eager_other = other.forward_dynamic(case.x[:batch])
        assert (eager_other.stage == 0).all()
        got = dict(zip(names, session.run(names, {"pixel_values": case.x[:batch].numpy(), **fed}), strict=True))
        assert float(abs(got["logits"] - eager_other.logits.numpy()).max()) <= 1e-4
        assert (got["exit"] == 0).all() and (got["gmacs"] == eager_other.gmacs.numpy()).all()


CHECKS: list[Callable[..., None]] = [
    check_full_compute_contract, check_dense_point, check_exercised_point, check_gmacs_are_counted_macs,
    check_simulate_equals_forward,
    check_save_load_and_timm, check_dtype, check_cpu_autocast, check_batch_sizes,
    check_each_image_alone_equals_the_batch, check_autograd_in_eval, check_deepcopy_and_to, check_training_step,
    check_traceable_path_equals_the_forward, check_onnx_export,
]


# --- the parametrised tests ------------------------------------------------------------------------------------


def test_every_method_has_cases() -> None:
    assert {m for m, _ in conformance_cases()} == set(METHODS)


@cases_param()
def test_full_compute_contract(case: Case) -> None:
    check_full_compute_contract(case)


@cases_param()
def test_dense_point(case: Case) -> None:
    check_dense_point(case)


@cases_param()
def test_exercised_point(case: Case) -> None:
    check_exercised_point(case)


@cases_param()
def test_gmacs_are_counted_macs(case: Case) -> None:
    check_gmacs_are_counted_macs(case)


@cases_param()
def test_simulate_equals_forward(case: Case) -> None:
    check_simulate_equals_forward(case)


@cases_param()
def test_save_load_and_timm(case: Case, tmp_path: Any) -> None:
    check_save_load_and_timm(case, tmp_path)


@cases_param()
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_dtype(case: Case, dtype: torch.dtype) -> None:
    check_dtype(case, dtype)


@cases_param()
def test_cpu_autocast(case: Case) -> None:
    check_cpu_autocast(case)


@cases_param()
@pytest.mark.parametrize("batch", [0, 1, 3])
def test_batch_sizes(case: Case, batch: int) -> None:
    check_batch_sizes(case, batch)


@cases_param()
def test_each_image_alone_equals_the_batch(case: Case) -> None:
    check_each_image_alone_equals_the_batch(case)


@cases_param()
def test_autograd_in_eval(case: Case) -> None:
    check_autograd_in_eval(case)


@cases_param()
def test_deepcopy_and_to(case: Case) -> None:
    check_deepcopy_and_to(case)


@cases_param()
def test_training_step(case: Case) -> None:
    check_training_step(case)


@cases_param()
def test_traceable_path_equals_the_forward(case: Case) -> None:
    check_traceable_path_equals_the_forward(case)


# Architectures that export through their sibling's paths except in one part (SigLIP-style attention pooling beside
# the class token; SwinV2's cosine attention and continuous position bias beside Swin's): the ONNX check runs on them
# for the one method whose exported path reads that part most (CF-ViT pools refined and reused tokens; DGE's queries
# run the attention itself), not for every method (the ONNX checks are most of the suite's run time).
ONNX_SIBLINGS = {"vit_attn_pool": "cfvit", "swinv2": "dge"}


def onnx_cases() -> list[tuple[str, str]]:
    return [(m, a) for m, a in conformance_cases() if ONNX_SIBLINGS.get(a, m) == m]


@pytest.mark.parametrize("case", onnx_cases(), ids=_ids(onnx_cases()), indirect=True)
def test_onnx_export(case: Case, tmp_path: Any) -> None:
    check_onnx_export(case, tmp_path)


# --- a method registered here gets the suite -------------------------------------------------------------------


class HalfDepthSettings(Strict):
    threshold: float = Field(1.0, ge=0, le=1, description="exit after half the blocks above this confidence")


class HalfDepthLosses(Strict):
    distill: float = Field(1.0, ge=0)
    ce: float = Field(1.0, ge=0)


class HalfDepthExit(ConvertedModel, SimulatesPoints):
    """A two-stage cascade over a ViT's own blocks: the head after half the blocks answers confident images.

    Small on purpose: what a new method writes (settings, knob, forward at the point, training forward), with the
    shared cascade doing the early exit; exact at threshold 1, where every image runs every block.
    """

    method = "test_half_depth"
    families = ("vit",)
    description = "test method: exit after half the blocks"
    Settings = HalfDepthSettings
    Losses = HalfDepthLosses

    def __init__(self, base: nn.Module, spec: BaseSpec, recipe: Recipe, anatomy: Anatomy) -> None:
        super().__init__(base, spec, recipe, anatomy)
        embed, head = vfx.split_at_blocks(base, anatomy.block_paths)
        blocks = [base.get_submodule(p) for p in anatomy.block_paths]
        half = len(blocks) // 2
        # Graphs sharing the base model's modules stay out of the module tree: every weight is saved once.
        attach(self, _parts=(embed, blocks[:half], blocks[half:], head),
               cascade=Cascade([Stage("half", self._first, 0.0), Stage("all", self._rest, 0.0)]))
        self.threshold = self.settings.threshold
        self._count_cascade_costs(self.cascade)

    def _first(self, x: torch.Tensor, carry: Carry) -> tuple[torch.Tensor, Carry]:
        embed, first, _, head = self._parts
        tokens = embed(x)
        for block in first:
            tokens = block(tokens)
        return head(tokens), {"tokens": tokens}

    def _rest(self, x: torch.Tensor, carry: Carry) -> tuple[torch.Tensor, Carry]:
        _, _, rest, head = self._parts
        tokens = carry["tokens"]
        for block in rest:
            tokens = block(tokens)
        return head(tokens), {}

    def operating_space(self) -> OperatingSpace:
        return OperatingSpace((Knob("threshold", 0.0, 1.0, full=1.0, sweep=(0.5, 1.0),
                                    simulated=True),))

    def simulated_points(self, collected: dict[str, torch.Tensor]) -> list[OperatingPoint]:
        """Thresholds under which a quarter, half or three quarters of the images exit (as DVT calibrates)."""
        logits = [collected["half"], collected["all"]]
        return [{"threshold": thresholds_for_exit_shares(logits, [share])[0]} for share in (0.25, 0.5, 0.75)]

    def forward_at_point(self, x: torch.Tensor) -> DynamicOutput:
        out = self.cascade.run(x, [self.threshold])
        return DynamicOutput(out.logits, out.gmacs, out.exit)

    def forward_traceable(self, x: torch.Tensor, point: Mapping[str, torch.Tensor]) -> DynamicOutput:
        out = self.cascade.run_traceable(x, point["threshold"].reshape(1))
        return DynamicOutput(out.logits, out.gmacs, out.exit)

    def collect(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        half, full = self.cascade.run_all(x)
        return {"half": half.float(), "all": full.float()}

    def simulate(self, collected: Mapping[str, torch.Tensor], point: Mapping[str, float]) -> DynamicOutput:
        out = self.cascade.simulate([collected["half"], collected["all"]], [point.get("threshold", self.threshold)])
        return DynamicOutput(out.logits, out.gmacs, out.exit)

    def forward_train(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        half, full = self.cascade.run_all(x)
        return {"logits": full, "exit.half": half}

    def method_losses(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor | None,
                      teacher_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {"agree": F.mse_loss(outputs["exit.half"].float(), outputs["logits"].detach().float())}


@contextmanager
def registered(cls: type[ConvertedModel]) -> Iterator[None]:
    register_method(cls)
    try:
        yield
    finally:
        METHODS.pop(cls.method, None)


def test_a_registered_toy_method_gets_the_suite(tmp_path: Any) -> None:
    with registered(HalfDepthExit):
        cases = [c for c in conformance_cases() if c[0] == HalfDepthExit.method]
        assert cases == [(HalfDepthExit.method, a) for a, (_, family, _) in ARCHITECTURES.items() if family == "vit"]
        case = _case(*cases[0])
        for check in CHECKS:
            for args in _check_args(check, tmp_path):
                fresh = Case(case.method, case.arch, copy.deepcopy(case.model), case.x.clone(), dict(case.point))
                try:
                    check(fresh, *args)
                except pytest.skip.Exception as e:  # the toy has every capability: no check may pass it by
                    pytest.fail(f"{check.__name__} skipped the toy method: {e}")
    assert HalfDepthExit.method not in {m for m, _ in conformance_cases()}


def _check_args(check: Callable[..., None], tmp_path: Any) -> list[tuple[Any, ...]]:
    if check is check_dtype:
        return [(torch.float16,), (torch.bfloat16,)]
    if check is check_batch_sizes:
        return [(0,), (1,), (3,)]
    if check in (check_save_load_and_timm, check_onnx_export):
        (tmp_path / check.__name__).mkdir()
        return [(tmp_path / check.__name__,)]
    return [()]

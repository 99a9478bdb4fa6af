"""``torch.compile(model)`` on converted models: the compiled model answers as the eager one, and batch sizes do not
recompile it.

Each case is the conformance suite's (tests/test_conformance.py): a tiny random-init model of the family with
trained-like new parameters, at its exercised point (images take different paths). The model is compiled with plain
``torch.compile`` and a backend that counts the graphs it is given (:class:`CompileCounterWithBackend` around
``aot_eager``: dynamo's tracing and AOT autograd's functionalisation, without inductor's C++ build, which takes
minutes on the 2-core CI machine). Then, at the exercised point and at full compute:

* the compiled logits equal the eager ones (fp32, 1e-4), and the compiled ``forward_dynamic`` takes the same
  decisions (exits, GMACs per image);
* batches of 1, 3, 8 and 64 images compile at most ``RECOMPILES`` graphs beyond those of the first call at each point
  (a count from the backend, not a timing).

DGE and FSLA compile and answer exactly, but their per-block Python decisions (DGE's execution path and ragged
queries, FSLA's clustering plan) still compile again for new batch sizes: their cases are expected failures, not run
(the recompiles take minutes on the CI machine).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from test_conformance import _case, conformance_cases
from torch._dynamo.testing import CompileCounterWithBackend

pytestmark = pytest.mark.usefixtures("one_thread")

BATCHES = (1, 3, 8, 64)
# Graphs a batch-size sweep may compile beyond the first call's (the base timm model compiles 2 more here: one for a
# batch of 1, one with a symbolic batch size).
RECOMPILES = 2
# Methods whose batch sizes still recompile (see the module docstring): expected failures of the bound.
STILL_RECOMPILE = {"dge", "fsla", "fsla_replace"}
# Cases of other methods that run DGE's query blocks (CF-ViT's region path on PVT-v2): they recompile as DGE does.
STILL_RECOMPILE_CASES = {("cfvit", "pvt_v2")}


# One architecture per family (the conformance suite's other architectures differ in parts compile does not care
# about, and each case compiles for minutes).
COMPILED_ARCHITECTURES = ("vit", "pvt_v2", "swin")


def compile_cases() -> list[tuple[str, str]]:
    return [(m, a) for m, a in conformance_cases() if a in COMPILED_ARCHITECTURES]


def _params() -> list:
    out = []
    for method, family in compile_cases():
        # Not run: their many recompiles take minutes here (DGE on the ViT test model: 59 more graphs over 8 batch
        # sizes). Remove a method from STILL_RECOMPILE once it gets the cascade's treatment.
        marks = [pytest.mark.xfail(run=False, reason=f"{method}: batch sizes still recompile")] \
            if method in STILL_RECOMPILE or (method, family) in STILL_RECOMPILE_CASES else []
        out.append(pytest.param(method, family, id=f"{method}-{family}", marks=marks))
    return out


def _check_same(model: torch.nn.Module, compiled: torch.nn.Module, dynamic: object, x: torch.Tensor,
                where: str) -> None:
    with torch.no_grad():
        eager = model.forward_dynamic(x)
        got_logits = compiled(x)
        got = dynamic(x)
    assert got_logits.shape == eager.logits.shape
    torch.testing.assert_close(got_logits, eager.logits, atol=1e-4, rtol=0, msg=f"{where}: logits differ")
    torch.testing.assert_close(got.logits, eager.logits, atol=1e-4, rtol=0, msg=f"{where}: logits differ")
    assert torch.equal(got.gmacs, eager.gmacs), f"{where}: per-image GMACs differ"
    if eager.stage is not None:
        assert torch.equal(got.stage, eager.stage), f"{where}: exits differ"


@pytest.mark.parametrize(("method", "family"), _params())
def test_compiles_once_for_every_batch_size(method: str, family: str) -> None:
    case = _case(method, family)
    model = copy.deepcopy(case.model)
    full = model.operating_space().full()
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    dynamic = torch.compile(model.forward_dynamic, backend=counter)
    torch.manual_seed(3)
    extra, counts = 0, []
    # A point may change the structure (CF-ViT's alpha: how many tokens are refined): its first call may compile; the
    # batch sizes after it may not.
    for point, name in ((case.point, "exercised point"), (full, "full compute")):
        model.set_operating_point(point)
        _check_same(model, compiled, dynamic, case.x, f"{name}, first call")
        first = counter.frame_count
        for batch in BATCHES:
            x = torch.randn(batch, *case.x.shape[1:])
            _check_same(model, compiled, dynamic, x, f"{name}, batch {batch}")
        extra += counter.frame_count - first
        counts.append(first)
    assert counts[0] >= 1, "nothing was compiled"
    torch._dynamo.reset()
    assert extra <= RECOMPILES, (f"{method}-{family}: batches {BATCHES} at the exercised point and at full compute "
                                 f"compiled {extra} more graphs than their first calls ({counts} graphs after them)")

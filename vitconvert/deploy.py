"""Deploy a converted model: one graph, with its dynamic behaviour inside, for ONNX runtimes or ``torch.export``.

:func:`export` traces the model's :meth:`~vitconvert.methods.base.ConvertedModel.forward_traceable` at its
operating point into a single graph that keeps what makes it cheaper: a cascade's images leave the batch at their
exit (the later stages run on a sub-batch gathered with ``NonZero``/``Gather`` and scattered back, not a masked full
computation), FSLA's tokens are clustered per image and head inside the graph (the eager path's permutation: its
stable sort becomes ``TopK``, see :func:`_onnx_translations`), and DGE's routers choose each region's granularity
inside the graph, each block running only the selected queries of each image (padded to the batch's largest count,
a size known at run time). Its interface:

* input ``pixel_values``: (N, 3, H, W) float32, normalised as the model's data config says (``mean``/``std``, in the
  ONNX file's metadata); N is dynamic;
* one input per *simulated* knob of the operating point (a cascade's exit thresholds: ``eta``, ``threshold_0``...),
  a 0-dim float32 holding the stored point's value by default (an ONNX initializer of the same name, so a runtime
  may leave it out or override it without re-exporting); knobs that change the computation's shapes (CF-ViT's
  ``alpha``, FSLA's ``cluster_size``) are baked in, and so is DGE's ``coarsening`` (a shift of the routers' logits
  before an argmax), so FSLA and DGE graphs take ``pixel_values`` only;
* outputs ``logits`` (N, classes), ``gmacs`` (N,): the GMACs of the path each image took, for cascades ``exit``
  (N,) int64: the stage that answered, then the method's other per-image decisions
  (:attr:`~vitconvert.methods.base.ConvertedModel.decision_outputs`; DGE's ``granularity`` (N,) float32: the share
  of its full-resolution queries the image kept).

With onnxruntime::

    import numpy as np, onnxruntime as ort
    session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
    logits, gmacs, exits = session.run(None, {"pixel_values": images})                    # the stored point
    logits, gmacs, exits = session.run(None, {"pixel_values": images, "eta": np.array(0.7, np.float32)})  # another

Every export is checked before it is written: ``onnx.checker``, then the exported graph (onnxruntime's CPU provider,
or the reloaded ``.pt2``) against the eager model on a few images at batch sizes 1 and 3, logits within 1e-4 and the
same decisions (exits, DGE's granularity); the file is written to a temporary name and moved into place only then.
A method without a traceable path (none of the registered ones today) is refused in one line that says why.

``onnx``, ``onnxruntime`` and ``onnxscript`` come with the ``export`` extra (``pip install "vitconvert[export]"``).
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from vitconvert._version import __version__
from vitconvert.backbones import family_of
from vitconvert.errors import UserError, one_line
from vitconvert.methods.base import ConvertedModel
from vitconvert.operating import Budget
from vitconvert.saving import check_writable_dir
from vitconvert.session import resolve_model

Format = Literal["onnx", "torch-export"]
SUFFIXES: dict[str, str] = {"onnx": ".onnx", "torch-export": ".pt2"}
TOLERANCE = 1e-4  # max abs logit difference between the exported graph and the eager model (fp32)
MAX_BATCH = 65536


class Traceable(nn.Module):
    """The converted model as the graph :func:`export` traces: ``(pixel_values, *knobs) -> (logits, gmacs[, exit],
    *decisions)`` (``decisions``: the model's :attr:`~vitconvert.methods.base.ConvertedModel.decision_outputs`).

    Args:
        model: The converted model (in eval mode).
        knobs: Names of the simulated knobs that become graph inputs, in order.
    """

    def __init__(self, model: ConvertedModel, knobs: list[str]) -> None:
        super().__init__()
        self.model = model
        self.knobs = knobs

    def forward(self, pixel_values: torch.Tensor, *knobs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model.forward_traceable(pixel_values, dict(zip(self.knobs, knobs, strict=True)))
        outputs = (out.logits, out.gmacs) if out.stage is None else (out.logits, out.gmacs, out.stage)
        return (*outputs, *(out.extras[name] for name in self.model.decision_outputs))


def graph_knobs(model: ConvertedModel) -> dict[str, float]:
    """The knobs an exported graph takes as inputs (the simulated ones) with the model's current values."""
    point = model.operating_point
    return {k.name: point[k.name] for k in model.operating_space().knobs if k.simulated}


def output_names(model: ConvertedModel) -> list[str]:
    """``logits``, ``gmacs``, for a model whose images exit at different stages ``exit``, then the model's
    :attr:`~vitconvert.methods.base.ConvertedModel.decision_outputs`."""
    with torch.no_grad():
        out = model.forward_traceable(torch.zeros(1, 3, *model.anatomy.img_size),
                                      {k: torch.tensor(v) for k, v in graph_knobs(model).items()})
    return ["logits", "gmacs"] + (["exit"] if out.stage is not None else []) + list(model.decision_outputs)


def onnx_interface(path: str | os.PathLike[str]) -> tuple[dict[str, float | None], list[str]]:
    """What an exported ONNX file takes and gives, read from the file itself.

    Returns:
        The knob inputs (every input but ``pixel_values``) with the default each file stores for it (None for an
        input without one), and the output names, both in the graph's order.

    Example:
        >>> onnx_interface("deit_small-cfvit/model.onnx")  # doctest: +SKIP
        ({'eta': 0.48}, ['logits', 'gmacs', 'exit'])
    """
    _require_onnx()
    import onnx
    from onnx import numpy_helper

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as e:  # a truncated or foreign file: protobuf raises its own types
        raise UserError(f"{str(path)!r} is not a readable ONNX file ({type(e).__name__}: "
                        f"{one_line(e)[:200]})") from None
    knobs: dict[str, float | None] = {i.name: None for i in graph.input if i.name != "pixel_values"}
    for init in graph.initializer:  # an initializer named like an input is its default
        if init.name in knobs and not init.dims:
            knobs[init.name] = float(numpy_helper.to_array(init))
    return knobs, [o.name for o in graph.output]


def export(
    model: str | os.PathLike[str] | ConvertedModel,
    path: str | os.PathLike[str] | None = None,
    *,
    format: Format = "onnx",
    opset: int | None = None,
    budget: Budget | str | float | None = None,
    overwrite: bool = False,
    optimize: bool = True,
) -> Path:
    """Export a converted model with its dynamic path inside one graph (see the module docstring).

    Args:
        model: Model folder, ``local-dir:PATH``, ``hf-hub:OWNER/NAME`` or a converted model.
        path: The file to write; default ``model.onnx`` / ``model.pt2`` in the model folder.
        format: ``onnx`` (the dynamo exporter; onnxruntime, OpenVINO...) or ``torch-export`` (a ``.pt2`` that
            ``torch.export.load`` reloads).
        opset: ONNX opset (default: the exporter's).
        budget: Export at this point of the stored calibration curve instead of the stored point.
        overwrite: Replace an existing file.
        optimize: Run the ONNX exporter's graph optimiser (constant folding, fusions); off, the export takes about
            half the time and onnxruntime still applies its own optimisations when it loads the file.

    Returns:
        The written file.

    Example:
        >>> export("deit_small-cfvit", format="onnx")  # doctest: +SKIP
        PosixPath('deit_small-cfvit/model.onnx')
    """
    if format not in SUFFIXES:
        raise UserError(f"export format {format!r} is not known; use onnx or torch-export")
    converted, folder = resolve_model(model)
    out = _output_path(path, folder, format, overwrite)
    if format == "onnx":
        _require_onnx()
    if budget is not None:
        converted.set_budget(Budget.parse(budget))
    converted.eval().to("cpu")
    knobs = graph_knobs(converted)
    traceable = Traceable(converted, list(knobs)).eval()
    example = _images(converted, 2)
    args = (example, *(torch.tensor(v, dtype=torch.float32) for v in knobs.values()))
    names = output_names(converted)
    with family_of(converted.anatomy).export_context(converted):
        program = _trace(traceable, args, len(knobs))
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}{out.suffix}")  # torch.export.save wants the .pt2 suffix
    try:
        if format == "onnx":
            _write_onnx(program, args, converted, knobs, names, opset, tmp, optimize)
            _check_onnx(tmp, converted, knobs, names)
        else:
            torch.export.save(program, str(tmp))
            _check_program(tmp, converted, knobs)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _output_path(path: str | os.PathLike[str] | None, folder: Path | None, format: str, overwrite: bool) -> Path:
    suffix = SUFFIXES[format]
    if path is None:
        if folder is None:
            raise UserError(f"export needs an output file (-o) for a model that is not a local folder (e.g. "
                            f"model{suffix})")
        out = folder / f"model{suffix}"
    else:
        out = Path(path).expanduser().resolve()
    if out.suffix != suffix:
        raise UserError(f"a {format} export is written as a {suffix} file, got {str(out)!r}")
    if out.is_dir():
        raise UserError(f"export output {str(out)!r} is a folder; give the file to write")
    if out.exists() and not overwrite:
        raise UserError(f"{str(out)!r} exists; pass --overwrite to replace it")
    check_writable_dir(out.parent, "export output folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _require_onnx() -> None:
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            importlib.import_module(name)
        except ImportError:
            raise UserError(f"ONNX export needs {name}: pip install \"vitconvert[export]\"") from None


def _images(model: ConvertedModel, batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, *model.anatomy.img_size, generator=torch.Generator().manual_seed(seed))


def _trace(traceable: Traceable, args: tuple[torch.Tensor, ...], knobs: int) -> torch.export.ExportedProgram:
    """``torch.export`` with a dynamic batch axis; a model that refuses says why, in one line."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    try:
        with torch.no_grad():
            # The knobs arrive as forward's *args: one (tuple) entry of the dynamic shapes; without knobs (every knob
            # shapes the graph, like FSLA's cluster size) torch.export wants no entry at all, not an empty one.
            shapes = ({0: batch}, (None,) * knobs) if knobs else ({0: batch},)
            return torch.export.export(traceable, args, dynamic_shapes=shapes, strict=False)
    except UserError:
        raise
    except Exception as e:  # torch's own errors on a graph it cannot trace: ours to report in one line
        raise UserError(f"torch.export could not trace {traceable.model.method} ({type(e).__name__}: "
                        f"{one_line(str(e).splitlines()[0] if str(e) else '')}); please report it") from None


def _write_onnx(program: torch.export.ExportedProgram, args: tuple[torch.Tensor, ...], model: ConvertedModel,
                knobs: Mapping[str, float], names: list[str], opset: int | None, path: Path,
                optimize: bool = True) -> None:
    import onnx
    from onnx import numpy_helper

    kwargs: dict[str, Any] = {"opset_version": opset} if opset is not None else {}
    try:
        program_onnx = torch.onnx.export(program, args, dynamo=True, input_names=["pixel_values", *knobs],
                                         output_names=names, verbose=False, optimize=optimize,
                                         custom_translation_table=_onnx_translations(), **kwargs)
    except Exception as e:
        raise UserError(f"the ONNX exporter could not convert {model.method} ({type(e).__name__}: "
                        f"{one_line(str(e).splitlines()[0] if str(e) else '')}); try --format torch-export") from None
    proto = program_onnx.model_proto
    # The stored point as the knobs' defaults: an initializer named like an input makes that input optional.
    for name, value in knobs.items():
        proto.graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=np.float32), name))
    cfg = model.pretrained_cfg
    meta = {"vitconvert_version": __version__, "method": model.method,
            "base_architecture": model.base_spec.architecture, "operating_point": json.dumps(model.operating_point),
            "input_size": json.dumps(list(cfg["input_size"])),
            "mean": json.dumps(list(cfg.get("mean", ()))), "std": json.dumps(list(cfg.get("std", ()))),
            "interpolation": str(cfg.get("interpolation", "")), "crop_pct": str(cfg.get("crop_pct", ""))}
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def _onnx_translations() -> dict[Callable[..., Any], Callable[..., Any]]:
    """ONNX functions for the ops our traceable paths use that the dynamo exporter cannot convert by itself.

    ``aten::sort.stable`` (FSLA's clustering cuts every group at the stable order of its scores, ties by position, as
    its eager path does): the exporter knows only the unstable overload. ONNX ``TopK`` over the whole axis
    (``k`` = its length, ``sorted=1``) is a sort, and the standard breaks its ties by the lower index, which is
    exactly the stable order; onnxruntime's CPU kernel does so.
    """
    from onnxscript import opset18 as op  # TopK is unchanged since opset 11: valid in any opset the exporter targets

    def sort_stable(self: Any, stable: bool | None = None, dim: int = -1, descending: bool = False) -> tuple[Any, Any]:
        size = op.Reshape(op.Gather(op.Shape(self), dim, axis=0), op.Constant(value_ints=[1]))
        values, indices = op.TopK(self, size, axis=dim, largest=descending, sorted=True)
        return values, indices

    return {torch.ops.aten.sort.stable: sort_stable}


def _reference(model: ConvertedModel, x: torch.Tensor) -> tuple[np.ndarray, ...]:
    with torch.no_grad():
        out = model.forward_dynamic(x)
    ref = (out.logits.float().numpy(), out.gmacs.float().numpy())
    ref = ref if out.stage is None else (*ref, out.stage.numpy())
    return (*ref, *(out.extras[name].numpy() for name in model.decision_outputs))


def _same_decision(got: Any, ref: np.ndarray) -> bool:
    """Exits (integers) equal; a float decision (DGE's granularity: a ratio of query counts, computed by the same
    operations in the graph) equal up to rounding, far below what one region changing its level moves it."""
    got = np.asarray(got)
    if np.issubdtype(ref.dtype, np.floating):
        return got.shape == ref.shape and bool(np.allclose(got, ref, rtol=1e-6, atol=0.0))
    return np.array_equal(got, ref)


def _compare(got: list[Any], ref: tuple[np.ndarray, ...], where: str) -> None:
    logits_diff = float(np.abs(np.asarray(got[0]) - ref[0]).max()) if ref[0].size else 0.0
    same = all(_same_decision(g, r) for g, r in zip(got[2:], ref[2:], strict=True))
    gmacs_diff = float(np.abs(np.asarray(got[1]) - ref[1]).max()) if ref[1].size else 0.0
    if logits_diff > TOLERANCE or not same or gmacs_diff > 1e-6 * max(1.0, float(np.abs(ref[1]).max())):
        raise UserError(f"the exported graph does not reproduce the model {where} (logits differ by {logits_diff:.2g}, "
                        f"decisions {'agree' if same else 'differ'}); nothing was written; please report it")


def _check_onnx(path: Path, model: ConvertedModel, knobs: Mapping[str, float], names: list[str]) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # not the notice that the knobs' defaults are overridable inputs (they are meant to)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = _images(model, batch, seed=batch)
        _compare(session.run(names, {"pixel_values": x.numpy()}), _reference(model, x), f"at batch {batch}")


def _check_program(path: Path, model: ConvertedModel, knobs: Mapping[str, float]) -> None:
    module = torch.export.load(str(path)).module()
    values = [torch.tensor(v, dtype=torch.float32) for v in knobs.values()]
    for batch in (1, 3):
        x = _images(model, batch, seed=batch)
        with torch.no_grad():
            got = [t.numpy() for t in module(x, *values)]
        _compare(got, _reference(model, x), f"at batch {batch}")


__all__ = ["SUFFIXES", "Traceable", "export", "graph_knobs", "onnx_interface", "output_names"]

"""What the benchmark suite shares with the studies (``benchmarks/studies``): paths, the machine block every result
file records, forced DGE gates, and the trained CIFAR-10 models of the wall-clock benchmark.

The suite owns this module; studies import it, ``benchmarks.cifar10`` (the data) and the package, never a suite
benchmark, and no suite module imports a study (``tests/test_benchmarks.py`` checks it).

**Forced DGE gates**: an expected dynamic/static GMACs ratio instead of the routers' choice. Plugs into
:meth:`vitconvert.methods.dge.DGE.override_gates` (the routers still run, so their cost is timed and counted).
Each region takes one of two neighbouring granularities: at random per image and region (``"random"``, so images
differ as they do with a trained router) or by a fixed pattern shared by all images (``"pattern"``).

Example:
    >>> from benchmarks.common import force_ratio, machine_block
    >>> force_ratio(model, 0.5)  # doctest: +SKIP
    >>> machine_block()["shared_machine"][:3]
    'CPU'
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

import vitconvert
from benchmarks.protocol import random_batch
from vitconvert.errors import UserError
from vitconvert.methods.base import ConvertedModel
from vitconvert.methods.dge import DGE
from vitconvert.timing import machine_info

__all__ = ["CHECKPOINTS", "CIFAR_BASES", "REPO", "RESULTS", "TRAINED", "TRAINED_MODELS", "ForcedGates",
           "committed_share", "force_ratio", "forced_rho", "machine_block", "onnx_base", "ort_session",
           "point_for_gmacs", "randomize_zero_init", "threading_info"]

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"  # committed results (studies write theirs here too)
CHECKPOINTS = REPO / "benchmarks" / "checkpoints"  # the CIFAR-10 base models, timm local-dir: folders

# The trained CIFAR-10 models of bench_wallclock (fine-tuned and calibrated by cifar10_short_recipe), kept in
# TRAINED/<name>/finetuned: (folder name, recipe, base checkpoint).
TRAINED = REPO / "benchmarks" / "work" / "trained"
TRAINED_MODELS = (("cfvit_vit", "cfvit", "cifar10-vit"), ("dge_vit", "dge", "cifar10-vit"),
                  ("dge_pvt64", "dge", "cifar10-pvt64"))
CIFAR_BASES = {name: base for name, _, base in TRAINED_MODELS}  # trained model -> its base's folder name
# trained model -> the committed short-recipe result (results/<stem>.json) of the same run
_COMMITTED = {"cfvit_vit": "cifar10_cfvit", "dge_vit": "cifar10_dge", "dge_pvt64": "cifar10_dge_pvt64"}


def machine_block() -> dict[str, Any]:
    """:func:`vitconvert.timing.machine_info` plus a note on how shared the machine was: every result file's
    ``machine`` (``report.py`` lists it under "Where and how measured")."""
    info = machine_info()
    info["shared_machine"] = ("CPU shared with other users while measuring; models compared side by side, "
                              "interleaved, medians of repeated runs; ratios are per-round paired medians")
    return info


def threading_info() -> dict[str, Any]:
    """Torch threads and the OpenMP settings that change how they behave on a shared CPU."""
    return {"threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def committed_share(name: str) -> float:
    """GMACs share of the committed short-recipe run's calibrated point for a trained model of
    :data:`TRAINED_MODELS` (``results/cifar10_<...>.json``): where stand-ins for a missing trained model run."""
    path = RESULTS / f"{_COMMITTED[name]}.json"
    return float(json.loads(path.read_text())["evaluation"]["gmacs_fraction"])


# --- forced DGE gates ----------------------------------------------------------------------------------------


@dataclass
class ForcedGates:
    """Gates at level ``low`` or ``low + 1``, the latter with probability ``frac`` per region; a
    :data:`vitconvert.methods.dge.GateOverride`."""

    rho: float
    low: int
    frac: float
    mode: str
    seed: int
    generator: torch.Generator = field(default_factory=torch.Generator)

    def __call__(self, block: int, batch: int, regions: int, device: torch.device) -> torch.Tensor:
        if self.mode == "pattern":
            # The same spread of coarser regions in every image: a fixed permutation, the first round(frac * R).
            g = torch.Generator().manual_seed(self.seed + regions)
            order = torch.randperm(regions, generator=g)
            up = torch.zeros(regions, dtype=torch.long)
            up[order[: round(self.frac * regions)]] = 1
            return (self.low + up).to(device).expand(batch, regions)
        up = (torch.rand(batch, regions, generator=self.generator) < self.frac).long()
        return (self.low + up).to(device)


def force_ratio(model: DGE, rho: float | None, mode: Literal["random", "pattern"] = "random", seed: int = 0
                ) -> float:
    """Force the gates of ``model`` so the expected dynamic/static GMACs ratio is ``rho``.

    Args:
        model: A DGE model.
        rho: Target ratio; ``None`` removes the forcing (the routers decide again).
        mode: ``"random"`` or ``"pattern"``.
        seed: Seed of the random draws / the pattern.

    Returns:
        The expected ratio of the forced gates (rho clipped to what the granularities can reach); NaN when
        the forcing is removed.
    """
    if rho is None:
        model.override_gates(None)
        return float("nan")
    if mode not in ("random", "pattern"):
        raise UserError(f"force_ratio: mode must be 'random' or 'pattern', got {mode!r}")
    levels = model.level_ratios()
    if rho < levels[-1] - 1e-9:
        raise UserError(f"force_ratio: rho={rho} is below the cheapest setting ({levels[-1]:.3f}: every "
                        "region at the coarsest granularity)")
    if rho >= levels[0]:
        low, frac = 0, 0.0
    else:
        low = next(j for j in range(len(levels) - 1) if levels[j] >= rho >= levels[j + 1])
        frac = (levels[low] - rho) / (levels[low] - levels[low + 1])
    model.override_gates(ForcedGates(rho=rho, low=low, frac=frac, mode=mode, seed=seed,
                                     generator=torch.Generator().manual_seed(seed)))
    return levels[low] + frac * (levels[low + 1] - levels[low]) if frac else levels[low]


def forced_rho(model: DGE) -> float | None:
    """The ratio last passed to :func:`force_ratio`, or None when the gates are not forced by it."""
    override = model.gate_override
    return override.rho if isinstance(override, ForcedGates) else None

# --- shared by bench_export and the ONNX studies ------------------------------------------------------------


def randomize_zero_init(model: ConvertedModel, seed: int = 0) -> None:
    """Random weights for the sub-layers that start at zero (FSLA's output projections: with a zero projection an
    FSLA model's logits are the base model's whatever the clusters, and the parity check would not see them) and for
    DGE's routers (fresh ones send every region to the finest grain)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".fsla.proj." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif name.startswith("routers."):  # DGE: fresh routers all pick the finest grain; random ones mix
                p.copy_(torch.randn(p.shape, generator=g))


def onnx_base(model: torch.nn.Module, img_size: tuple[int, int], path: Path) -> None:
    """The base timm model through the same exporter, with a dynamic batch axis."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    with torch.no_grad():
        program = torch.onnx.export(model, (torch.zeros(2, 3, *img_size),), dynamo=True, verbose=False,
                                    dynamic_shapes=({0: batch},), input_names=["pixel_values"],
                                    output_names=["logits"])
    program.save(str(path))


def export_pair(model: ConvertedModel, folder: Path, tag: str) -> tuple[torch.nn.Module, Path, Path]:
    """The base model (eval mode) and the ONNX files of ``model`` (``<tag>-<method>.onnx``) and of its base
    (``<tag>.onnx``, exported once per folder and tag: rows of one tag share a base): what the export benchmark and
    the runtime studies time."""
    base = model.build_base().eval()
    model.eval()
    converted_path = vitconvert.export(model, folder / f"{tag}-{model.method}.onnx", overwrite=True)
    base_path = folder / f"{tag}.onnx"
    if not base_path.exists():
        onnx_base(base, model.anatomy.img_size, base_path)
    return base, converted_path, base_path


def ort_session(path: Path, threads: int) -> Any:
    """An onnxruntime CPU session for timing beside eager PyTorch models in the same rounds.

    Its worker threads do not spin waiting for work after a run (``session.intra_op.allow_spinning`` 0; onnxruntime
    spins by default): spinning threads would take the cores from the eager model timed next and make its times,
    not onnxruntime's, depend on what ran before.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_logits(session: Any) -> Any:
    """An onnxruntime session as a timed callable: the graph's logits for a torch batch."""
    return lambda t: session.run(["logits"], {"pixel_values": t.numpy()})


def point_for_gmacs(model: ConvertedModel, x: torch.Tensor, share: float, steps: int = 10
                    ) -> dict[str, float]:
    """The operating point whose first knob puts the mean GMACs of ``x`` nearest ``share`` of the base's (bisection;
    the knob's GMACs fall as it rises from its full-compute end)."""
    knob = model.operating_space().knobs[0]
    lo, hi = (knob.low, knob.high) if knob.full == knob.low else (knob.high, knob.low)
    for _ in range(steps):
        mid = (lo + hi) / 2
        model.set_operating_point({knob.name: mid})
        with torch.no_grad():
            got = float(model.forward_dynamic(x).gmacs.mean()) / model.base_gmacs
        lo, hi = (mid, hi) if got > share else (lo, mid)
    return model.set_operating_point({knob.name: (lo + hi) / 2})


# bench_export's rows (benchmarks.studies.profile_onnx profiles them too): architecture, recipe, and the exit shares
# forced on the timed images (a cascade), none (the recipe's point) or a GMACs share to reach with the method's knob.
EXPORT_ROWS: tuple[tuple[str, str, list[float] | float], ...] = (
    ("deit_small_patch16_224", "cfvit", [0.5]),
    ("pvt_v2_b1", "cfvit", [0.5]),  # the recipe's PVT-v2 point: every region of a refined image (alpha 1)
    ("swin_tiny_patch4_window7_224", "cfvit", [0.5]),  # alpha 0.5: half the windows of a refined image
    ("deit_small_patch16_224", "dvt", [0.5, 0.25]),
    ("pvt_v2_b1", "dvt", [0.5, 0.25]),
    ("swin_tiny_patch4_window7_224", "dvt", [0.5, 0.25]),
    ("swin_tiny_patch4_window7_224", "fsla", []),  # no exits; the recipe's cluster size (the window area, 49)
    ("deit_small_patch16_224", "fsla_replace", []),  # the recipe's blocks and cluster size
    ("deit_small_patch16_224", "dge", 0.5),  # random routers, coarsening set for ~50% of the base's GMACs
    ("pvt_v2_b1", "dge", 0.6),
    ("swin_tiny_patch4_window7_224", "dge", 0.6),
)


def force_exit_shares(model: ConvertedModel, x: torch.Tensor, shares: list[float]) -> dict[str, float]:
    """Thresholds under which ``shares`` of ``x`` exit at each stage but the last (simulated from one pass)."""
    with torch.no_grad():
        logits = list(model.collect(x).values())
    thresholds = model.cascade.thresholds_for_exit_shares(logits, shares)
    names = [k.name for k in model.operating_space().knobs if k.simulated]
    return model.set_operating_point(dict(zip(names, thresholds, strict=True)))


def build_row(arch: str, recipe: str, shares: list[float] | float, images: int
              ) -> tuple[ConvertedModel, torch.Tensor, dict[str, Any]]:
    """A row's model at its point, its ``images`` benchmark images and the row's fields: ``arch`` converted with
    ``recipe`` (random weights), exit shares forced on the images (none: a method without exits, e.g. FSLA, at the
    recipe's point), or a GMACs share reached with the method's knob."""
    torch.manual_seed(0)
    model = vitconvert.apply(arch, recipe, pretrained=False)
    randomize_zero_init(model)
    x = random_batch(model.anatomy.img_size, images, seed=2)
    if isinstance(shares, float):  # a GMACs share to reach with the method's knob
        point = point_for_gmacs(model, x[:16], shares)
        fields = {"model": f"{arch} (random weights)", "point": point, "target_gmacs_share": shares,
                  "gates": "random routers"}
    else:
        point = force_exit_shares(model, x, shares) if shares else model.operating_point
        fields = {"model": f"{arch} (random weights)", "point": point, "forced_exit_shares": shares,
                  "gates": "forced" if shares else "recipe point"}
    return model, x, fields


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median of per-round ratios of two models' throughputs from the same rounds."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))

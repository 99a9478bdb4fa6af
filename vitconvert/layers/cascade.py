"""Early-exit cascades: stages of increasing cost, each answering or passing an image on.

A :class:`Cascade` holds stages as callables. Stage ``k`` maps the images still running and what the
previous stage handed on (its ``carry``: per-image tensors such as features to reuse) to logits and a
new carry. After every stage but the last, an image whose confidence (a score of its softmax in fp32: the max
probability, or the margin between the top two; :data:`EXIT_SCORES`) is *above* the stage's threshold exits; a
threshold of 1 (or more) never exits. Execution is real:
only undecided images run the next stage, as a sub-batch, with their carry index-selected along.

Every image is charged the cumulative cost of the stages it ran (:attr:`Stage.gmacs` per image), and
:func:`simulate` gives the same logits, exits and costs from every stage's logits on every image
(:meth:`Cascade.run_all`), which is how calibration evaluates any thresholds from one pass.

:meth:`Cascade.run_last` runs the last stage alone on every image, with no carry: a cascade whose last stage
is the base model's architecture (DVT's last member, CF-ViT's fine pass) then runs one dense pass at the base
model's cost, its *dense point*, which is what a model falls back to where early exit does not pay.
:func:`thresholds_for_exit_shares` turns a target exit distribution into thresholds, as DVT calibrates.

Nothing here knows a model: CF-ViT is a two-stage cascade (coarse, fine), DVT a K-stage one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

from .compiled import compile_settings, mark_rows_dynamic
from .costs import count_macs, to_gmacs
from .empty_batches import empty_batch_safe

Carry = dict[str, torch.Tensor]
StageFn = Callable[[torch.Tensor, Carry], tuple[torch.Tensor, Carry]]
# How confident a stage is in an image, from its softmax p: ``max_softmax`` = max p (DVT's and CF-ViT's code);
# ``margin`` = top-1 minus top-2 p (the "score margin" of Park et al. 2015's big/little networks). Both lie in [0, 1].
ExitScore = Literal["max_softmax", "margin"]
EXIT_SCORES: tuple[str, ...] = get_args(ExitScore)


@dataclass
class Stage:
    """One stage: ``run(x, carry) -> (logits, carry)`` and its cost per image in GMACs (given the earlier
    stages ran). ``gmacs`` may be updated when the stage's structure changes (CF-ViT's alpha)."""

    name: str
    run: StageFn
    gmacs: float


@dataclass
class CascadeOutput:
    """Per-image results of a cascade run.

    Attributes:
        logits: (B, classes) logits of the stage each image exited at.
        exit: (B,) index of that stage.
        gmacs: (B,) cumulative GMACs of the stages each image ran (float32).
        confidence: per stage, (B,) confidence of the images that ran it (NaN for those that did not).
    """

    logits: torch.Tensor
    exit: torch.Tensor
    gmacs: torch.Tensor
    confidence: list[torch.Tensor] = field(default_factory=list)


def confidence(logits: torch.Tensor, score: ExitScore = "max_softmax") -> torch.Tensor:
    """A stage's confidence per row (:data:`ExitScore`), computed in fp32 so low-precision models exit the same
    images."""
    p = logits.float().softmax(dim=-1)
    if score == "margin":
        top = p.topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]
    return p.amax(dim=-1)


def exits_at(conf: torch.Tensor, threshold: float) -> torch.Tensor:
    """Which images leave at a stage with this threshold (strictly more confident; never at >= 1)."""
    if threshold >= 1.0:
        return torch.zeros_like(conf, dtype=torch.bool)
    return conf > threshold


def cumulative(costs: Sequence[float]) -> list[float]:
    """Per-stage costs -> cost of exiting at each stage."""
    out, total = [], 0.0
    for c in costs:
        total += c
        out.append(total)
    return out


class Cascade:
    """Stages run with real early exit (see the module docstring)."""

    def __init__(self, stages: Sequence[Stage], score: ExitScore = "max_softmax") -> None:
        if len(stages) < 2:
            raise ValueError("a cascade needs at least two stages")
        if score not in EXIT_SCORES:
            raise ValueError(f"exit score must be one of {EXIT_SCORES}, got {score!r}")
        self.stages = list(stages)
        self.score: ExitScore = score
        # GMACs per image of the last stage run alone (run_last: no carry), set by count_costs
        self.last_alone_gmacs = 0.0

    @property
    def costs(self) -> list[float]:
        """GMACs per image of each stage."""
        return [s.gmacs for s in self.stages]

    @torch.no_grad()
    def count_costs(self, x: torch.Tensor, last_alone: bool = False) -> list[float]:
        """Set every stage's :attr:`Stage.gmacs` by counting it on ``x`` (one image, the model in eval mode),
        each stage given the carry of the stages before it, as it runs in :meth:`run`; returns the costs.
        ``last_alone``: also count :attr:`last_alone_gmacs` (a cascade whose last stage runs without a carry)."""
        carry: Carry = {}
        for stage in self.stages:
            handed_on: list[Carry] = []

            def run_stage(stage: Stage = stage, carry: Carry = carry, handed_on: list[Carry] = handed_on) -> None:
                handed_on.append(stage.run(x, carry)[1])

            stage.gmacs = to_gmacs(count_macs(run_stage))
            carry = handed_on[0]
        if last_alone:
            self.last_alone_gmacs = to_gmacs(count_macs(lambda: self.stages[-1].run(x, {})))
        return self.costs

    def _check(self, thresholds: Sequence[float]) -> None:
        if len(thresholds) != len(self.stages) - 1:
            raise ValueError(f"{len(self.stages)} stages take {len(self.stages) - 1} thresholds, got {len(thresholds)}")

    def run(self, x: torch.Tensor, thresholds: Sequence[float], carry: Carry | None = None) -> CascadeOutput:
        """Early-exit inference: stage k+1 runs only on the images stage k did not answer confidently.

        Eager and under ``torch.compile`` alike, the loop is :meth:`_run_between_graphs`: see there why.
        """
        self._check(thresholds)
        return self._run_between_graphs(x, thresholds, carry, compiled=torch.compiler.is_compiling())

    @torch.compiler.disable(recursive=False)
    def _run_between_graphs(self, x: torch.Tensor, thresholds: Sequence[float], carry: Carry | None,
                            compiled: bool) -> CascadeOutput:
        """:meth:`run`'s loop: the exit decisions in Python and, under ``torch.compile`` (``compiled``), each stage
        a compiled graph.

        Why: a cascade's sub-batch sizes are known only at run time. Traced by dynamo, the loop breaks its graph at
        every decision (``leave.any()``, the sub-batch's size) and each stage's frame sees a new batch size at nearly
        every call, so it compiled again and again (DVT on deit_tiny did not finish its first call in 9 minutes).
        So the loop itself is never traced (``torch.compiler.disable(recursive=False)``: what it calls still is, with
        the caller's backend), it calls no Python function but the stages (:func:`confidence`, :func:`exits_at` and
        :func:`cumulative` are inlined: each call would be a frame of its own for dynamo), and when ``compiled``,
        before each stage the rows it is given are marked as a run-time size
        (:func:`~vitconvert.layers.compiled.mark_rows_dynamic`): each stage compiles once, for every sub-batch size.
        The thresholds are plain floats (changing them does not recompile). The settings it changes
        (:func:`~vitconvert.layers.compiled.compile_settings`) hold only while compiled stages run.
        """
        b = x.shape[0]
        last = len(self.stages) - 1
        total, cost_at = 0.0, []
        for stage in self.stages:
            total += stage.gmacs
            cost_at.append(total)
        active = torch.arange(b, device=x.device)
        exit_stage = torch.full((b,), last, dtype=torch.long, device=x.device)
        logits_out: torch.Tensor | None = None
        confs: list[torch.Tensor] = []
        xs, state = x, dict(carry or {})
        for k, stage in enumerate(self.stages):
            if compiled:
                # Compiled under compile_settings (inductor's layout optimisation off: it mispredicts strides with a
                # run-time batch size; dynamo records run-time sizes), for this call only. What a stage receives is
                # marked every time: its carry comes out of the previous compiled graph unmarked.
                with compile_settings():
                    logits, state = stage.run(mark_rows_dynamic(xs, *state.values()), state)
            else:
                logits, state = stage.run(xs, state)
            if logits_out is None:
                logits_out = logits if active.numel() == b else logits.new_zeros(b, logits.shape[-1])
            elif active.numel() == b:  # nobody exited so far: the whole batch, no scatter needed
                logits_out = logits
            else:
                logits_out = logits_out.index_copy(0, active, logits.to(logits_out.dtype))
            probs = logits.float().softmax(dim=-1)  # confidence(), inlined
            if self.score == "margin":
                top = probs.topk(2, dim=-1).values
                conf = top[:, 0] - top[:, 1]
            else:
                conf = probs.amax(dim=-1)
            confs.append(torch.full((b,), float("nan"), device=x.device).index_copy(0, active, conf))
            if k == last:
                break
            if thresholds[k] >= 1.0:  # exits_at(), inlined: nobody leaves
                continue
            leave = conf > thresholds[k]
            if bool(leave.any()):
                exit_stage = exit_stage.index_fill(0, active[leave], k)
                stay = (~leave).nonzero().squeeze(1)
                if stay.numel() == 0:
                    break
                active = active.index_select(0, stay)
                xs = xs.index_select(0, stay)
                state = {name: t.index_select(0, stay) for name, t in state.items()}
        assert logits_out is not None
        costs = torch.tensor(cost_at, dtype=torch.float32, device=x.device)
        return CascadeOutput(logits=logits_out, exit=exit_stage, gmacs=costs[exit_stage], confidence=confs)

    def run_traceable(self, x: torch.Tensor, thresholds: torch.Tensor, carry: Carry | None = None) -> CascadeOutput:
        """:meth:`run` as one traceable graph (``torch.export``, ONNX): the same exits, logits and costs, with no
        Python decision on the data, so the exported graph keeps the per-image exits.

        ``thresholds`` is a (K-1,) tensor, so an exported graph takes them as an input a runtime can change. Every
        stage after the first runs on the images still undecided (``nonzero``, ``index_select``; their logits go
        back with ``index_copy``): a sub-batch whose size is known only at run time. When every image has left, the
        later stages get an empty sub-batch and cost next to nothing: an image that exits pays only for what it ran.
        They run under :func:`~vitconvert.layers.empty_batches.empty_batch_safe`, which rewrites the calls of timm's
        PVT-v2, Swin, BEiT and EVA that refuse a batch of no images. Confidences are not reported (``confidence``
        stays empty).
        """
        b = x.shape[0]
        last = len(self.stages) - 1
        cost_at = torch.tensor(cumulative(self.costs), dtype=torch.float32, device=x.device)
        active = torch.arange(b, device=x.device)
        exit_stage = torch.full((b,), last, dtype=torch.long, device=x.device)
        xs, state = x, dict(carry or {})
        logits_out: torch.Tensor | None = None
        for k, stage in enumerate(self.stages):
            with empty_batch_safe() if k else contextlib.nullcontext():  # a later sub-batch may hold no image
                logits, state = stage.run(xs, state)
            logits_out = logits if logits_out is None else logits_out.index_copy(0, active, logits.to(
                logits_out.dtype))
            if k == last:
                break
            # exits_at as tensor operations: strictly more confident than a threshold below 1
            leave = (confidence(logits, self.score) > thresholds[k]) & (thresholds[k] < 1.0)
            exit_stage = exit_stage.index_fill(0, active[leave], k)
            stay = (~leave).nonzero().squeeze(1)
            active = active.index_select(0, stay)
            xs = xs.index_select(0, stay)
            state = {name: t.index_select(0, stay) for name, t in state.items()}
        assert logits_out is not None
        return CascadeOutput(logits=logits_out, exit=exit_stage, gmacs=cost_at[exit_stage])

    def run_last(self, x: torch.Tensor) -> CascadeOutput:
        """The last stage alone on every image, with an empty carry (the dense point; see the module docstring).

        No decision depends on the data, so the same code runs eager, exported and compiled. Every image exits at
        the last stage at :attr:`last_alone_gmacs`; the earlier stages' confidences are NaN (they did not run).
        """
        return self.simulate_last(self.stages[-1].run(x, {})[0])

    def simulate_last(self, logits: torch.Tensor) -> CascadeOutput:
        """What :meth:`run_last` returns, from the last stage's logits run alone (calibration's collected pass)."""
        b, last, device = logits.shape[0], len(self.stages) - 1, logits.device
        nan = torch.full((b,), float("nan"), device=device)
        return CascadeOutput(logits=logits, exit=torch.full((b,), last, dtype=torch.long, device=device),
                             gmacs=torch.full((b,), self.last_alone_gmacs, dtype=torch.float32, device=device),
                             confidence=[nan] * last + [confidence(logits, self.score)])

    def run_all(self, x: torch.Tensor, carry: Carry | None = None) -> list[torch.Tensor]:
        """Every stage on every image (for calibration): the logits of each stage."""
        out = []
        state = dict(carry or {})
        for stage in self.stages:
            logits, state = stage.run(x, state)
            out.append(logits)
        return out

    def simulate(self, stage_logits: Sequence[torch.Tensor], thresholds: Sequence[float]) -> CascadeOutput:
        """What :meth:`run` would return at ``thresholds``, from :meth:`run_all`'s logits."""
        self._check(thresholds)
        return simulate(stage_logits, self.costs, thresholds, self.score)

    def thresholds_for_exit_shares(self, stage_logits: Sequence[torch.Tensor], shares: Sequence[float]) -> list[float]:
        """:func:`thresholds_for_exit_shares` with this cascade's exit score."""
        return thresholds_for_exit_shares(stage_logits, shares, self.score)


def simulate(stage_logits: Sequence[torch.Tensor], costs: Sequence[float], thresholds: Sequence[float],
             score: ExitScore = "max_softmax") -> CascadeOutput:
    """Early exit applied afterwards to every stage's logits on every image (see :meth:`Cascade.simulate`)."""
    b = stage_logits[0].shape[0]
    device = stage_logits[0].device
    last = len(stage_logits) - 1
    exit_stage = torch.full((b,), last, dtype=torch.long, device=device)
    undecided = torch.ones(b, dtype=torch.bool, device=device)
    confs = []
    for k, logits in enumerate(stage_logits):
        conf = confidence(logits, score)
        confs.append(torch.where(undecided, conf, torch.full_like(conf, float("nan"))))
        if k == last:
            break
        leave = undecided & exits_at(conf, thresholds[k])
        exit_stage = torch.where(leave, torch.full_like(exit_stage, k), exit_stage)
        undecided &= ~leave
    stacked = torch.stack([lg.float() for lg in stage_logits])  # (K, B, C)
    logits = stacked.gather(0, exit_stage.view(1, b, 1).expand(1, b, stacked.shape[-1])).squeeze(0)
    cost_at = torch.tensor(cumulative(costs), dtype=torch.float32, device=device)
    return CascadeOutput(logits=logits, exit=exit_stage, gmacs=cost_at[exit_stage], confidence=confs)


def thresholds_for_exit_shares(stage_logits: Sequence[torch.Tensor], shares: Sequence[float],
                               score: ExitScore = "max_softmax") -> list[float]:
    """Thresholds under which the given shares of the images exit at each stage (DVT's calibration), for confidences
    of the kind ``score``.

    Args:
        stage_logits: Each stage's logits on the same held-out images (as from :meth:`Cascade.run_all`).
        shares: Target share of the images exiting at each stage but the last (the last takes the rest);
            each in [0, 1], summing to at most 1.

    Returns:
        One threshold per stage but the last. Stage k's threshold lies halfway between the confidences on either
        side of the quantile that lets the wanted share of the images still undecided at k leave (ties can make the
        realised share differ slightly); a share of 0 gives 1.0 (never exit).
    """
    if len(shares) != len(stage_logits) - 1:
        raise ValueError(f"{len(stage_logits)} stages take {len(stage_logits) - 1} shares, got {len(shares)}")
    if any(s < 0 or s > 1 for s in shares) or sum(shares) > 1 + 1e-9:
        raise ValueError(f"exit shares must lie in [0, 1] and sum to at most 1, got {list(shares)}")
    b = stage_logits[0].shape[0]
    undecided = torch.ones(b, dtype=torch.bool, device=stage_logits[0].device)
    thresholds = []
    for k, share in enumerate(shares):
        every = confidence(stage_logits[k], score)
        conf = every[undecided]
        want = round(share * b)
        if want <= 0 or conf.numel() == 0:
            thresholds.append(1.0)
            continue
        if want >= conf.numel():
            t = float(conf.min()) - 1e-7
        else:
            # Halfway between the (want)-th largest confidence and the next one down: those images exit, and an
            # image whose confidence is computed with different rounding (alone instead of in a batch, another
            # device) is not decided by the last bit, as it would be by a threshold equal to a confidence.
            ordered = conf.double().sort(descending=True).values
            t = float((ordered[want - 1] + ordered[want]) / 2)
        thresholds.append(max(0.0, min(t, 1.0)))
        undecided &= ~exits_at(every, thresholds[-1])
    return thresholds

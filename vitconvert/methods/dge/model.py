"""The DGE converted model: its settings, routers on the dynamic blocks, the knob, and the forward passes."""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from vitconvert.anatomy import Anatomy
from vitconvert.backbones import family_of
from vitconvert.backbones.family import norm_cost
from vitconvert.errors import AnatomyError, UserError
from vitconvert.layers.compiled import graph_tracing
from vitconvert.layers.costs import GIGA, linear_macs
from vitconvert.layers.regions import make_layout
from vitconvert.layers.scale_conv import dwconv_macs
from vitconvert.layers.sharing import attach, module_view
from vitconvert.methods.base import ConvertedModel, DynamicOutput
from vitconvert.methods.dge.block import Context, DGEBlock, GateOverride, Record, Router, read_block, window_tables
from vitconvert.methods.dge.costs import block_costs
from vitconvert.methods.dge.plot import plot_granularity
from vitconvert.operating import Knob, OperatingSpace
from vitconvert.recipes import Recipe, Strict
from vitconvert.registry import register_method
from vitconvert.sources import BaseSpec


class DGESettings(Strict):
    region_size: int = Field(4, ge=1, le=32, description="router region side in tokens (S)")
    granularities: list[int] = Field(default_factory=lambda: [4, 2, 1],
                                     description="queries per region side, finest (= region_size) first")
    stages: list[int] | None = Field(None, description="dynamic stages (0-based); null: all")
    init_finest_prob: float = Field(0.95, gt=0, lt=1, description="router probability of the finest at start")
    router_init_std: float = Field(0.0, ge=0, le=1, description="router weight init std (0: zeros, exact start)")
    router_norm: bool = Field(True, description="parameter-free LayerNorm on the router input")
    gumbel_tau: float = Field(1.0, gt=0, le=100, description="Gumbel-softmax temperature at the start")
    gumbel_tau_final: float | None = Field(None, gt=0, le=100, description="temperature at the end (annealed)")
    budget_target: float = Field(0.5, gt=0, le=1, description="gamma: target dynamic/static GMACs ratio")
    router_lr_scale: float = Field(1.0, gt=0, le=1e4, description="fine-tuning learning-rate multiplier of the routers")
    coarsening: float = Field(0.5, ge=0, le=1, description="initial knob (0.5 = router argmax)")
    inference_layout: Literal["packed", "padded"] = Field(
        "packed", description="sparse inference: the batch's queries packed (padded only around the attention core) "
                              "or padded per image; blocks with windows always pack")
    execution: Literal["auto", "sparse", "dense"] = Field(
        "auto", description="inference per block and batch: auto (the cheaper of sparse and dense by the cost "
                            "model), sparse (always gather the queries) or dense (every token a query row)")

    @field_validator("granularities")
    @classmethod
    def _check_granularities(cls, v: list[int], info: Any) -> list[int]:
        size = info.data.get("region_size", 4)
        if len(v) < 2:
            raise ValueError("give at least two granularities")
        if v[0] != size:
            raise ValueError(f"the finest granularity must be region_size ({size}) queries per side, got {v[0]}")
        if any(a <= b for a, b in itertools.pairwise(v)):
            raise ValueError("granularities must be strictly decreasing (finest first)")
        if any(g < 1 or size % g for g in v):
            raise ValueError(f"every granularity must divide region_size ({size})")
        return v


class DGELosses(Strict):
    distill: float = Field(1.0, ge=0, description="KL from the original model")
    ce: float = Field(1.0, ge=0, description="cross-entropy (when labels exist)")
    budget: float = Field(1.0, ge=0, description="lambda of the budget loss (rho - gamma)^2")



@register_method
class DGE(ConvertedModel):
    """Dynamic Grained Encoder (see the module docstring)."""

    method = "dge"
    families = ("vit", "eva", "beit", "pvt_v2", "swin", "swinv2")
    description = "DGE dynamic-granularity queries per region (ViT/DeiT, EVA, BEiT, PVT-v2, Swin, SwinV2)"
    Settings = DGESettings
    Losses = DGELosses
    full_compute_runs_base = True  # coarsening 0: the base blocks, routers not run
    decision_outputs = ("granularity",)

    def __init__(self, base: nn.Module, spec: BaseSpec, recipe: Recipe, anatomy: Anatomy) -> None:
        super().__init__(base, spec, recipe, anatomy)
        s: DGESettings = self.settings
        stages = list(range(len(anatomy.stages))) if s.stages is None else list(s.stages)
        bad = [i for i in stages if not 0 <= i < len(anatomy.stages)]
        if bad or not stages:
            raise UserError(f"recipe: model.stages must list stages in 0..{len(anatomy.stages) - 1}, got {s.stages}")
        family = family_of(anatomy)
        ctx = Context(s.region_size, s.granularities, s.inference_layout, s.execution, s.gumbel_tau)
        attach(self, _ctx=ctx)
        self.num_prefix = anatomy.num_prefix_tokens
        self.routers = nn.ModuleDict()
        self.costs: dict[int, dict[str, float]] = {}
        self.dynamic_blocks: list[int] = []
        k = len(s.granularities)
        originals: dict[str, nn.Module] = {}
        for info in anatomy.blocks:
            if info.stage not in stages:
                continue
            block = base.get_submodule(info.path)
            where = f"dge: block {info.path}"
            parts = read_block(block, where, family)
            grid = anatomy.stages[info.stage].grid
            tokens, windows, cap = info.tokens, 1, None
            if parts.windows is not None:  # the block runs on its windows: regions, layout and costs per window
                if self.num_prefix:
                    raise AnatomyError(f"{where}: attention inside windows with prefix tokens is not supported")
                parts.windows.check(grid, where)
                map_grid, grid = grid, parts.windows.window(grid)
                windows, tokens = math.prod(parts.windows.windows(map_grid)), grid[0] * grid[1]
            router = Router(info.dim, k, s.init_finest_prob, s.router_init_std, s.router_norm)
            self.routers[str(info.index)] = router
            lay = make_layout(grid, s.region_size, ctx.sizes, torch.device("cpu"))
            if parts.windows is not None:
                cap = window_tables(parts.windows, lay, map_grid)[1]
            costs: dict[str, Any] = block_costs(
                block.get_submodule(parts.norm1), block.get_submodule(parts.norm2), parts.attention,
                block.get_submodule(parts.mlp), parts.conv, tokens, grid, parts.post_norm)
            costs["router"] = lay.num_regions * (linear_macs(1, info.dim, k) + norm_cost(router.norm, info.dim))
            costs["level_nq"] = [float(self.num_prefix + v) for v in lay.nq.sum(0).tolist()]
            if cap is not None:  # regions whose coarser levels would straddle a mask stay at their coarsest allowed
                levels = torch.minimum(torch.arange(k).view(k, 1, 1), cap.unsqueeze(0))  # (k, windows, R)
                per = lay.nq[torch.arange(lay.num_regions).view(1, 1, -1), levels].sum(-1)  # (k, windows)
                costs["level_nq"] = per.mean(1).tolist()  # per window, on average
            costs["level_conv"] = [0.0] * k
            if parts.conv is not None:  # every region at level j: what DGEBlock._conv_macs counts
                gates = torch.arange(k).view(k, 1).expand(k, lay.num_regions)
                costs["level_conv"] = dwconv_macs(parts.conv.dwconv, gates, lay).tolist()
            # The block chooses its path per window (its batch is the windows); the model counts per image.
            self.costs[info.index] = {**costs, **{key: costs[key] * windows for key in ("fixed", "dense", "router")},
                                      "level_nq": [v * windows for v in costs["level_nq"]],
                                      "level_conv": [v * windows for v in costs["level_conv"]]}
            self.dynamic_blocks.append(info.index)
            new = DGEBlock(block, parts, info.index, self.num_prefix, grid, router, ctx, costs, family)
            base.set_submodule(info.path, new)
            originals[info.path] = block
        # The base model as timm built it, sharing every weight (unregistered): full compute runs it with no DGE
        # dispatch per block, so the small-batch rule's path costs what the base model costs.
        view, containers = module_view(base, originals)
        attach(self, _plain=view, _plain_containers=containers)
        self.tau = s.gumbel_tau
        self.coarsening = s.coarsening

    # --- knob -----------------------------------------------------------------------------------------

    _ctx: Context
    _plain: nn.Module
    _plain_containers: list[nn.Module]

    @property
    def _c(self) -> Context:
        return self._ctx

    def operating_space(self) -> OperatingSpace:
        # Logit shifts; dense around 0 and wide at the ends: routers trained at a high rate have logit gaps of
        # several units, and the last regions to turn coarse change the cost the most.
        shifts = [-8.0, -6.0, -4.0, -3.0, -2.0, -1.5, -1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0,
                  4.0, 5.0, 6.0, 8.0, 10.0, 12.0]
        sweep = (0.0, *(round(1.0 / (1.0 + math.exp(-b)), 6) for b in shifts), 1.0)
        return OperatingSpace((Knob("coarsening", 0.0, 1.0, full=0.0, sweep=sweep,
                                    description="0: the base blocks; 0.5: the routers' argmax; 1: coarsest"),))

    @property
    def coarsening(self) -> float:
        """The knob: ``logit(coarsening) * rank`` is added to the routers' logits (see the module docstring)."""
        return float(self._coarsening)

    @coarsening.setter
    def coarsening(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise UserError(f"coarsening must lie in [0, 1], got {value}")
        self._coarsening = float(value)
        ctx = self._c
        ctx.level = len(ctx.sizes) - 1 if value >= 1.0 else None
        ctx.shift = math.log(value / (1.0 - value)) if 0.0 < value < 1.0 else 0.0

    @contextlib.contextmanager
    def counted_execution(self) -> Iterator[None]:
        """Sparse execution: the DGE computation ``gmacs`` counts (a dense block runs more MACs to finish sooner)."""
        saved = self._c.execution
        self._c.execution = "sparse"
        try:
            yield
        finally:
            self._c.execution = saved

    @property
    def execution(self) -> str:
        """``auto`` (each block and batch takes the path :func:`path_costs` estimates cheaper), ``sparse`` or
        ``dense`` (see :class:`DGESettings`); the results are the same whichever runs."""
        return self._c.execution

    @execution.setter
    def execution(self, value: str) -> None:
        if value not in ("auto", "sparse", "dense"):
            raise UserError(f"execution must be auto, sparse or dense, got {value!r}")
        self._c.execution = value

    def method_state(self) -> dict[str, Any]:
        return {"gumbel_tau": self.tau}

    def load_method_state(self, state: dict[str, Any]) -> None:
        state = dict(state)
        tau = state.pop("gumbel_tau", None)
        if tau is not None:
            if not isinstance(tau, int | float) or not math.isfinite(tau) or tau <= 0:
                raise UserError(f"config: state.gumbel_tau must be a positive number, got {tau!r}")
            self.tau = float(tau)
        super().load_method_state(state)

    @property
    def tau(self) -> float:
        return self._c.tau

    @tau.setter
    def tau(self, value: float) -> None:
        self._c.tau = float(value)

    def lr_scales(self) -> dict[str, float]:
        """The routers learn at ``router_lr_scale`` times the recipe's rate: from their exact start (P(finest)
        = 0.95) a short recipe at a fine-tuning rate would barely move them."""
        return {"routers": self.settings.router_lr_scale}

    def set_train_progress(self, fraction: float) -> None:
        """Anneal the Gumbel temperature geometrically from ``gumbel_tau`` to ``gumbel_tau_final``.

        Args:
            fraction: Share of fine-tuning done, 0..1 (the pipeline calls this before each step).
        """
        s: DGESettings = self.settings
        end = s.gumbel_tau_final or s.gumbel_tau
        f = min(max(float(fraction), 0.0), 1.0)
        self.tau = s.gumbel_tau * (end / s.gumbel_tau) ** f

    # --- cost queries and gates from outside ---------------------------------------------------------------

    def level_ratios(self) -> list[float]:
        """Dynamic/static GMACs ratio with every region of every dynamic block at each granularity."""
        out = []
        for k in range(len(self._c.sizes)):
            extra = sum(c["fixed"] + c["router"] + c["per_query"] * c["level_nq"][k] + c["level_conv"][k] - c["dense"]
                        for c in self.costs.values())
            out.append(1.0 + extra / GIGA / self.base_gmacs)
        return out

    def override_gates(self, fn: GateOverride | None) -> None:
        """Take every dynamic block's gates from ``fn`` instead of its router (``None``: the routers decide).

        ``fn(block_index, batch, regions, device)`` returns the (batch, regions) granularity index of each
        region (long, 0 = finest), in both the inference and the training path. The routers still run, so
        their cost is timed and counted; the knob is ignored while an override is set.

        Example:
            >>> finest = lambda i, b, r, dev: torch.zeros(b, r, dtype=torch.long, device=dev)  # doctest: +SKIP
            >>> model.override_gates(finest)  # doctest: +SKIP
        """
        self._c.gate_override = fn

    @property
    def gate_override(self) -> GateOverride | None:
        """The function given to :meth:`override_gates`, or None when the routers decide."""
        return self._c.gate_override

    # --- forward --------------------------------------------------------------------------------------

    def _gmacs(self, records: list[Record], batch: int, device: torch.device) -> torch.Tensor:
        """Per-image MACs (float64) of the path taken, from the blocks' records."""
        total = torch.full((batch,), self.base_gmacs * GIGA, dtype=torch.float64, device=device)
        for r in records:
            c = self.costs[r.block]
            const = c["fixed"] - c["dense"] + (c["router"] if r.router_ran else 0.0)
            total = total + const + c["per_query"] * r.nq.to(torch.float64)
            if r.conv_macs is not None:
                total = total + r.conv_macs
        return total

    def _granularity(self, records: list[Record], batch: int, device: torch.device) -> torch.Tensor:
        """(B,) float32: the queries each image ran in the dynamic blocks, as a share of the queries full compute
        runs there (every region at the finest granularity: 1.0; fewer when regions turned coarse). The exported
        graph's ``granularity`` output and ``extras["granularity"]``: one number per image that says how coarse the
        routers made it, whatever the blocks' grids."""
        if not records:
            return torch.ones(batch, device=device)
        kept = sum(r.nq.to(torch.float64) for r in records)
        full = sum(self.costs[r.block]["level_nq"][0] for r in records)
        return (kept / full).float()

    def forward_at_point(self, x: torch.Tensor) -> DynamicOutput:
        """Inference at the current knob; ``gmacs`` per image from the gates each block chose."""
        self.check_input(x)
        # An empty batch has no regions to route; the base blocks return the base model's empty result.
        if (self.coarsening <= 0.0 and self._c.gate_override is None) or x.shape[0] == 0:
            return self.forward_full_compute(x)
        # Under torch.compile the blocks run their traceable twin (the same gates, queries and results, no Python
        # decision on the data; see forward_traceable): the eager path's choices would be guards recompiling for
        # every new batch size and gate pattern.
        with self._c.run("traced" if graph_tracing() else "sparse") as records:
            logits = self.base(x)
            recs = list(records)
        b = x.shape[0]
        gm = self._gmacs(recs, b, x.device)
        extras: dict[str, torch.Tensor] = {"granularity": self._granularity(recs, b, x.device)}
        if recs:
            extras["queries"] = torch.stack([r.nq for r in recs], dim=1).float()
            # Blocks this batch ran not sparse (every token a query row, split by level, or the base block): same
            # results, and ``gmacs`` still counts the DGE computation, which is what the model computes.
            extras["dense_blocks"] = torch.full((b,), float(sum(r.path != "sparse" for r in recs)), device=x.device)
            for r in recs:
                if r.gates is not None:
                    extras[f"granularity.{r.block}"] = r.gates
        return DynamicOutput(logits=logits, gmacs=(gm / GIGA).float(), extras=extras)

    def forward_traceable(self, x: torch.Tensor, point: Mapping[str, torch.Tensor]) -> DynamicOutput:
        """:meth:`forward_at_point` as an exported graph runs it: the routers' gates and each block's sparse path on
        the selected queries, with no Python decision on the data (:meth:`DGEBlock._forward_traced`). The
        coarsening knob shifts logits before an argmax: a constant of the graph, baked in (``point`` is empty).
        ``gmacs`` is the sparse path's per-image count, as :meth:`forward_at_point` reports it."""
        self.check_input(x)
        if self._c.gate_override is not None:
            raise UserError("a DGE model whose gates come from override_gates cannot be exported; call "
                            "override_gates(None) first")
        if self.coarsening <= 0.0:  # the knob is baked in: at 0 the graph is the base model's
            return self.forward_full_compute(x)
        with self._c.run("traced") as records:
            logits = self.base(x)
            recs = list(records)
        b = x.shape[0]
        return DynamicOutput(logits=logits, gmacs=(self._gmacs(recs, b, x.device) / GIGA).float(),
                             extras={"granularity": self._granularity(recs, b, x.device)})

    def forward_full_compute(self, x: torch.Tensor) -> DynamicOutput:
        """The base blocks, routers not run, whatever the knob or a gate override (the small-batch rule's path)."""
        self.check_input(x)
        logits = self._plain(x)
        return DynamicOutput(logits=logits, gmacs=torch.full((x.shape[0],), self.base_gmacs, device=x.device),
                             extras={"granularity": self._granularity([], x.shape[0], x.device)})

    def train(self, mode: bool = True) -> DGE:
        super().train(mode)
        for container in self._plain_containers:  # the rest of the view is shared with self.base
            container.training = mode
        return self

    def forward_train(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Dense training path with straight-through Gumbel gates; ``rho`` = dynamic/static GMACs of the batch."""
        self.check_input(x)
        with self._c.run("train") as records:
            logits = self.base(x)
            recs = list(records)
        gm = self._gmacs(recs, x.shape[0], x.device)
        rho = (gm.mean() / (self.base_gmacs * GIGA)).float()
        return {"logits": logits, "rho": rho}

    def method_losses(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor | None,
                      teacher_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        gamma = self.settings.budget_target
        return {"budget": (outputs["rho"].float() - gamma) ** 2}

    def plot_decisions(self, images: torch.Tensor, path: str | Path) -> Path:
        """Write a PNG of the granularity each region got on ``images`` (:func:`plot_granularity`)."""
        return plot_granularity(self, images, path)



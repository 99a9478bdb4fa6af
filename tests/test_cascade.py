"""The shared early-exit cascade: real sub-batching equals simulation, per-image costs, thresholds from shares."""

from __future__ import annotations

import pytest
import torch

from vitconvert.layers.cascade import Carry, Cascade, Stage, confidence, simulate, thresholds_for_exit_shares


def _toy_cascade(calls: list[int]) -> tuple[Cascade, torch.Tensor]:
    """Three stages of fixed per-image logits (by image id, carried along), recording their batch sizes."""
    torch.manual_seed(0)
    table = torch.randn(3, 16, 5) * torch.tensor([3.0, 2.0, 1.0]).view(3, 1, 1)

    def stage(k: int):
        def run(x: torch.Tensor, carry: Carry) -> tuple[torch.Tensor, Carry]:
            calls.append(x.shape[0])
            ids = x[:, 0].long()
            if k > 0:  # what the previous stage handed on belongs to the same images, in the same order
                assert torch.equal(carry["ids"], ids)
            return table[k, ids] + 0.0 * x[:, :1], {"ids": ids}
        return run

    cascade = Cascade([Stage("a", stage(0), 1.0), Stage("b", stage(1), 2.0), Stage("c", stage(2), 4.0)])
    x = torch.arange(16, dtype=torch.float32).unsqueeze(1).repeat(1, 3)
    return cascade, x


@pytest.mark.parametrize("thresholds", [(1.0, 1.0), (0.0, 0.0), (0.5, 0.7), (0.9, 0.3), (0.7, 1.0), (1.0, 0.5)])
def test_sub_batched_run_equals_simulation(thresholds: tuple[float, float]) -> None:
    calls: list[int] = []
    cascade, x = _toy_cascade(calls)
    run = cascade.run(x, thresholds)
    calls_in_run = list(calls)
    stage_logits = cascade.run_all(x)
    sim = cascade.simulate(stage_logits, thresholds)
    assert torch.equal(run.exit, sim.exit) and torch.equal(run.logits.float(), sim.logits)
    assert torch.equal(run.gmacs, sim.gmacs)
    # costs are cumulative along the path taken
    assert run.gmacs.tolist() == [[1.0, 3.0, 7.0][int(e)] for e in run.exit]
    # only undecided images ran each later stage
    ran = [16, int((run.exit >= 1).sum()), int((run.exit >= 2).sum())]
    assert calls_in_run == [n for n in ran if n > 0]
    # each image's answer is its exit stage's logits, and it left because it was confident enough
    for i in range(16):
        e = int(run.exit[i])
        assert torch.equal(run.logits[i], stage_logits[e][i])
        for k in range(e):
            assert confidence(stage_logits[k][i:i + 1]).item() <= thresholds[k] or thresholds[k] >= 1.0
        if e < 2:
            assert thresholds[e] < 1.0 and confidence(stage_logits[e][i:i + 1]).item() > thresholds[e]


def test_batch_of_one_and_everyone_exiting_early() -> None:
    calls: list[int] = []
    cascade, x = _toy_cascade(calls)
    for i in range(4):
        one = cascade.run(x[i:i + 1], (0.5, 0.5))
        sim = simulate([lg[i:i + 1] for lg in cascade.run_all(x)], cascade.costs, (0.5, 0.5))
        assert torch.equal(one.logits.float(), sim.logits) and torch.equal(one.exit, sim.exit)
    calls.clear()
    out = cascade.run(x, (0.0, 0.0))  # every confidence > 0: all leave after the first stage
    assert calls == [16] and out.exit.eq(0).all() and out.gmacs.eq(1.0).all()


def test_the_traceable_run_gives_later_stages_no_image_when_every_image_left() -> None:
    """When every image left at the first stage, run_traceable runs the later stages on an empty sub-batch (an image
    pays for what it ran); the outputs are the first stage's."""
    calls: list[int] = []
    cascade, x = _toy_cascade(calls)
    out = cascade.run_traceable(x[:3], torch.tensor([0.0, 0.0]))
    assert calls == [3, 0, 0]
    assert out.exit.eq(0).all() and out.gmacs.eq(1.0).all()
    assert torch.equal(out.logits, cascade.run_all(x[:3])[0])


@pytest.mark.parametrize("shares", [(0.5, 0.25), (0.0, 0.5), (0.25, 0.0), (1.0, 0.0), (0.1, 0.9)])
def test_thresholds_reach_target_exit_shares(shares: tuple[float, float]) -> None:
    torch.manual_seed(1)
    logits = [torch.randn(200, 10) * s for s in (2.0, 3.0, 4.0)]  # continuous: no ties
    t = thresholds_for_exit_shares(logits, shares)
    out = simulate(logits, [1.0, 1.0, 1.0], t)
    got = [float((out.exit == k).float().mean()) for k in range(3)]
    assert got[0] == pytest.approx(shares[0], abs=1 / 200) and got[1] == pytest.approx(shares[1], abs=1 / 200)
    assert sum(got) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="sum to at most 1"):
        thresholds_for_exit_shares(logits, (0.8, 0.8))


def test_the_margin_score_routes_run_traceable_simulate_and_thresholds_alike() -> None:
    calls: list[int] = []
    cascade, x = _toy_cascade(calls)
    margin = Cascade(cascade.stages, score="margin")
    stage_logits = margin.run_all(x)
    p = stage_logits[0].softmax(-1).sort(dim=-1, descending=True).values
    torch.testing.assert_close(confidence(stage_logits[0], "margin"), p[:, 0] - p[:, 1])
    t = margin.thresholds_for_exit_shares(stage_logits, (0.5, 0.25))
    for out in (margin.run(x, t), margin.run_traceable(x, torch.tensor(t)), margin.simulate(stage_logits, t)):
        assert out.exit.eq(0).sum() == 8 and out.exit.eq(1).sum() == 4
        assert torch.equal(out.exit, margin.simulate(stage_logits, t).exit)
    # the scores rank images differently: two near-tied classes are confident by max softmax, not by margin
    tied, clear = torch.tensor([[3.0, 2.9, -9.0, -9.0, -9.0]]), torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0]])
    assert confidence(tied) > confidence(clear) and confidence(tied, "margin") < confidence(clear, "margin")
    with pytest.raises(ValueError, match="exit score"):
        Cascade(cascade.stages, score="entropy")  # type: ignore[arg-type]


def test_count_costs_charges_each_stage_its_own_macs_given_the_carry() -> None:
    """Stage 2 multiplies what stage 1 hands on: its count is its own matmul only, with the carry's shape."""
    w1, w2 = torch.randn(8, 6), torch.randn(6, 4)

    def first(x: torch.Tensor, carry: Carry) -> tuple[torch.Tensor, Carry]:
        h = x @ w1
        return h[:, :4], {"h": h}

    def second(x: torch.Tensor, carry: Carry) -> tuple[torch.Tensor, Carry]:
        return carry["h"] @ w2, {}

    cascade = Cascade([Stage("a", first, 0.0), Stage("b", second, 0.0)])
    costs = cascade.count_costs(torch.randn(1, 8))
    assert costs == pytest.approx([8 * 6 / 1e9, 6 * 4 / 1e9])
    assert [s.gmacs for s in cascade.stages] == costs

"""The timing protocol (vitconvert.timing) on fake models whose costs are known: call order (warm-up, rotated
rounds), paired ratios, the stopping rule, the records. Sleeps of clearly different lengths only: no assertion
depends on how fast this machine is beyond their ordering."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch

from vitconvert import timing
from vitconvert.timing import Spread, Timing, compare


def recorder(calls: list[str], name: str, sleep: float = 0.0) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(x: torch.Tensor) -> torch.Tensor:
        calls.append(name)
        if sleep:
            time.sleep(sleep)
        return x

    return fn


X = torch.zeros(4, 2)


def test_spread_quantiles_and_record() -> None:
    s = Spread.of([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (s.median, s.min, s.max) == (3.0, 1.0, 5.0)
    assert s.p10 == pytest.approx(1.4) and s.p90 == pytest.approx(4.6)
    assert s.to_dict() == {"median": 3.0, "p10": s.p10, "p90": s.p90, "min": 1.0, "max": 5.0, "reps": 5,
                           "all": [4.0, 1.0, 3.0, 2.0, 5.0]}
    assert Spread.of([2.0]).p90 == 2.0
    with pytest.raises(ValueError):
        Spread.of([])


def test_warmup_then_rotated_rounds() -> None:
    calls: list[str] = []
    res = compare({n: recorder(calls, n) for n in "abc"}, X, warmup=2, min_rounds=4)
    # Two warm-up rounds in order, then timed rounds with the order rotated: abc, bca, cab, abc.
    assert calls == list("abc" * 2 + "abc" + "bca" + "cab" + "abc")
    assert [r.rounds for r in res.values()] == [4, 4, 4] and list(res) == ["a", "b", "c"]
    assert res["a"].ratio == 1.0 and res["b"].reference == "a" and res["c"].batch == 4


def test_warmup_calls_are_not_timed() -> None:
    slow_first: list[str] = []

    def cold(x: torch.Tensor) -> torch.Tensor:  # only its first two calls are slow: they are the warm-up
        slow_first.append("x")
        time.sleep(0.3 if len(slow_first) <= 2 else 0.0)
        return x

    res = compare({"cold": cold}, X, warmup=2, min_rounds=3)
    assert len(slow_first) == 5
    assert max(res["cold"].seconds) < 0.15


def test_paired_ratio_and_ordering_follow_the_costs() -> None:
    calls: list[str] = []
    models = {"base": recorder(calls, "base", 0.02), "fast": recorder(calls, "fast", 0.002),
              "slow": recorder(calls, "slow", 0.06)}
    res = compare(models, X, reference="base", warmup=1, min_rounds=5)
    assert res["base"].ratio == 1.0 and all(v == 1.0 for v in res["base"].paired)
    assert res["fast"].ratio > 2.0 and res["slow"].ratio < 0.6  # 10x and 1/3 by construction
    assert res["fast"].images_per_s > res["base"].images_per_s > res["slow"].images_per_s
    # each round's ratio pairs the reference's and the model's call of that same round
    for name in ("fast", "slow"):
        t = res[name]
        assert t.paired == pytest.approx([r / s for r, s in zip(res["base"].seconds, t.seconds, strict=True)])
        assert t.ratio_spread.p10 <= t.ratio <= t.ratio_spread.p90
        assert t.throughput.median == pytest.approx(t.images_per_s)
        assert t.latency_ms.median == pytest.approx(1000 * sorted(t.seconds)[2])


def test_stopping_rule() -> None:
    calls: list[str] = []
    # no time asked for: exactly min_rounds
    assert compare({"a": recorder(calls, "a")}, X, warmup=0, min_rounds=3, max_rounds=50)["a"].rounds == 3
    # time asked for, but capped by max_rounds
    assert compare({"a": recorder(calls, "a")}, X, warmup=0, min_rounds=2, max_rounds=4,
                   min_seconds=1000.0)["a"].rounds == 4
    # min_seconds: each round sleeps >= 20 ms, so 0.1 s takes at most 6 rounds (and never fewer than min_rounds)
    res = compare({"a": recorder(calls, "a", 0.01), "b": recorder(calls, "b", 0.01)}, X, warmup=0, min_rounds=2,
                  max_rounds=100, min_seconds=0.1)
    assert 2 <= res["a"].rounds <= 6 and res["a"].rounds == res["b"].rounds
    # min_rounds wins over a time that has passed
    res = compare({"a": recorder(calls, "a", 0.03)}, X, warmup=0, min_rounds=3, max_rounds=3, min_seconds=0.01)
    assert res["a"].rounds == 3


def test_bad_arguments() -> None:
    calls: list[str] = []
    fn = recorder(calls, "a")
    with pytest.raises(ValueError, match="reference"):
        compare({"a": fn}, X, reference="z")
    with pytest.raises(ValueError, match="nothing"):
        compare({}, X)
    with pytest.raises(ValueError, match="min_rounds"):
        compare({"a": fn}, X, min_rounds=5, max_rounds=4)
    with pytest.raises(ValueError, match="training mode"):
        compare({"a": torch.nn.Linear(2, 2)}, X)
    assert calls == []


def test_modules_run_in_inference_mode_with_optional_autocast_and_threads() -> None:
    seen: list[tuple[bool, torch.dtype]] = []
    lin = torch.nn.Linear(2, 2).eval()

    def probe(x: torch.Tensor) -> torch.Tensor:
        y = lin(x)
        seen.append((torch.is_inference_mode_enabled(), y.dtype))
        return y

    before = torch.get_num_threads()
    compare({"p": probe, "lin": lin}, X, warmup=1, min_rounds=1, threads=1)
    assert seen and all(mode and dtype == torch.float32 for mode, dtype in seen)
    assert torch.get_num_threads() == before
    seen.clear()
    compare({"p": probe}, X, warmup=0, min_rounds=1, bf16=True)
    assert seen == [(True, torch.bfloat16)]


def test_record_keeps_every_repetition() -> None:
    t = Timing("m", batch=8, reference="base", seconds=(0.1, 0.2, 0.4, 0.2), paired=(2.0, 1.0, 0.5, 1.0),
               cpu_seconds=(0.1, 0.2, 0.4, 0.2), cpu_paired=(2.0, 1.0, 0.5, 1.0))
    assert t.rounds == 4 and t.ratio == 1.0 and t.ratio_halves == (1.5, 0.75) and t.cpu_time_ratio == 1.0
    rec = t.to_dict()
    assert rec["unit"] == "img/s" and rec["median"] == 40.0 and rec["all"] == [80.0, 40.0, 20.0, 40.0]
    assert rec["seconds"] == 0.2 and rec["ratio_all"] == [2.0, 1.0, 0.5, 1.0] and rec["ratio_halves"] == [1.5, 0.75]
    assert rec["cpu_time_ratio"] == 1.0 and rec["reps"] == 4 and rec["batch"] == 8
    ms = t.to_dict("ms")
    assert ms["unit"] == "ms" and ms["median"] == pytest.approx(200.0) and ms["min"] == pytest.approx(100.0)
    one = Timing("m", 1, "m", (0.1,), (1.0,))
    assert one.ratio_halves is None and one.to_dict()["ratio_halves"] is None and "cpu_time_ratio" not in one.to_dict()


def test_machine_info_and_device_name() -> None:
    info = timing.machine_info()
    assert info["device"] == "cpu" and info["cpu_count"] >= 1 and info["timm"] and info["vitconvert"]
    assert info["date"].endswith("+00:00") and "load_average" in info
    assert timing.device_name(torch.device("cpu")).startswith("cpu (")

"""The benchmark machinery on tiny models: the suite's measurements on vitconvert.timing, pinned exit fractions,
the analytic CF-ViT count, result rows, the model-agnostic runner, suite discovery, the summary report and the
suite/studies layering. No timing assertions (tests/test_timing.py tests the protocol itself)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

import vitconvert
from benchmarks import common, protocol, report
from benchmarks import run as runner
from benchmarks.__main__ import discover, load_runner
from benchmarks.__main__ import main as suite_main
from benchmarks.bench_cfvit import AtEta, analytic_costs, pin_fraction
from benchmarks.tome import ToMe
from tests.utils import TINY_MODELS, model_kwargs_args, tiny_model

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_measure_records_config_and_every_repetition() -> None:
    model, _, _ = tiny_model("deit")
    x = torch.randn(2, 3, 32, 32)
    before = torch.get_num_threads()
    rec = protocol.measure({"timm": model, "again": model}, x, warmup=1, reps=2, threads=1)
    assert torch.get_num_threads() == before
    cfg = rec["config"]
    assert (cfg["batch"], cfg["reps"], cfg["rounds"], cfg["threads"], cfg["reference"]) == (2, 2, 2, 1, "timm")
    assert cfg["precision"] == "fp32" and cfg["device"] == "cpu" and cfg["interleaved"] and cfg["wall_seconds"] >= 0
    thr = rec["results"]["again"]
    assert thr["reps"] == 2 and thr["batch"] == 2 and thr["median"] > 0 and thr["unit"] == "img/s"
    assert len(thr["ratio_all"]) == 2 and "cpu_time_ratio" in thr and rec["results"]["timm"]["ratio"] == 1.0
    lat = protocol.measure({"m": model}, x[:1], warmup=1, reps=2, mode="latency", bf16=True)
    assert lat["results"]["m"]["unit"] == "ms" and len(lat["results"]["m"]["all"]) == 2
    assert lat["config"]["precision"] == "bf16 autocast"
    info = common.machine_block()
    assert info["device"] == "cpu" and info["cpu_count"] >= 1 and info["timm"] and info["vitconvert"]
    assert "paired" in info["shared_machine"]


def test_measure_models_and_rows_with_tome() -> None:
    model, _, _ = tiny_model("deit")
    models = {"timm": model, "tome_r4": ToMe(model, 4)}
    measured = protocol.measure_models(models, (32, 32), quick=True, devices=("cpu",), threads=1)
    cfg = measured["cpu_throughput"]["config"]
    assert cfg["batch"] == protocol.PROTOCOL["quick"]["cpu_throughput"]["batch"] and cfg["threads"] == 1
    assert measured["cpu_latency"]["results"]["tome_r4"]["reps"] == protocol.PROTOCOL["quick"]["cpu_latency"]["reps"]
    rows = protocol.result_row(measured, "tome_r4", method="tome", backbone="tiny", gmacs=0.01)
    assert len(rows) == 1
    row = rows[0]
    assert row["method"] == "tome" and row["device"] == "cpu" and row["gmacs"] == 0.01
    res = measured["cpu_throughput"]["results"]
    assert row["throughput"] == res["tome_r4"]["median"] and row["base_throughput"] == res["timm"]["median"]
    assert row["latency_ratio"] == measured["cpu_latency"]["results"]["tome_r4"]["ratio"]


def test_runner_converts_times_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m benchmarks.run``: any model and recipe, GMACs on the timed batch, converted vs base."""
    arch, kwargs = TINY_MODELS["deit"]
    out = tmp_path / "r.json"
    threads = torch.get_num_threads()
    try:
        assert runner.main(["--model", arch, "--recipe", "dge", "--model-kwargs", *model_kwargs_args(kwargs),
                            "--set", "model.execution=sparse", "--point", "coarsening=1", "--batch-size", "4",
                            "--device", "cpu", "--rounds", "2", "--max-rounds", "2", "--min-seconds", "0",
                            "--warmup", "1", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    assert result["method"] == "dge" and result["weights"] == "random" and result["point"] == {"coarsening": 1.0}
    g = result["gmacs"]
    assert 0 < g["converted"] < g["base"] and g["share"] == pytest.approx(g["converted"] / g["base"])
    speed = result["speed"]
    assert speed["config"]["reference"] == "base" and speed["config"]["batch"] == 4 and speed["config"]["threads"] == 1
    assert set(speed["results"]) == {"converted", "base"} and speed["results"]["converted"]["reps"] == 2
    assert result["summary"]["ratio"] == speed["results"]["converted"]["ratio"]
    assert result["machine"]["shared_machine"] and result["command"][:3] == ["python", "-m", "benchmarks.run"]
    text = capsys.readouterr().out
    assert "speed-up over the base" in text and "GMACs per image" in text
    # a converted folder is loaded (no recipe); a bad point is one line on stderr, exit 2
    folder = tmp_path / "converted"
    vitconvert.save(vitconvert.apply(arch, "cfvit", model_kwargs=kwargs, pretrained=False), folder)
    model, weights = runner.build(str(folder))
    assert model.method == "cfvit" and weights == "converted model folder" and not model.training
    assert runner.main(["--model", str(folder), "--point", "eta"]) == 2
    assert "KNOB=VALUE" in capsys.readouterr().err
    assert runner.parse_point("eta=0.4,alpha=0.5") == {"eta": 0.4, "alpha": 0.5}


def _benchmark_imports(path: Path) -> set[str]:
    """The ``benchmarks.*`` modules a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("benchmarks"):
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "benchmarks" else [node.module]
            found |= set(names)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("benchmarks")}
    return found


def test_suite_and_studies_do_not_cross_import() -> None:
    """The suite never imports a study; studies import only the suite's shared modules (common, the CIFAR-10 data)
    and each other; the package imports no benchmark."""
    studies = sorted((BENCHMARKS / "studies").glob("*.py"))
    assert {p.stem for p in studies} >= {"dge_blocks", "fit_execution", "profile_dge", "small_batch_overhead"}
    for path in BENCHMARKS.glob("*.py"):
        bad = {m for m in _benchmark_imports(path) if m.startswith("benchmarks.studies")}
        assert not bad, (path.name, bad)
    shared = {"benchmarks.common", "benchmarks.cifar10"}
    for path in studies:
        bad = {m for m in _benchmark_imports(path) if m not in shared and not m.startswith("benchmarks.studies")}
        assert not bad, (path.name, bad)
    package = Path(vitconvert.__file__).parent
    assert not [p.name for p in package.rglob("*.py") if _benchmark_imports(p)]


@pytest.fixture(scope="module")
def tiny_cfvit() -> vitconvert.ConvertedModel:
    arch, kwargs = TINY_MODELS["deit"]
    torch.manual_seed(0)
    return vitconvert.apply(arch, "cfvit", pretrained=False, model_kwargs=kwargs)


def test_analytic_cfvit_count_matches_counter(tiny_cfvit: vitconvert.ConvertedModel) -> None:
    analytic = analytic_costs(tiny_cfvit)
    # 8x8 grid -> 4x4 coarse + class token; alpha 0.5 re-splits 8 coarse patches into 32 fine ones.
    assert analytic["tokens_coarse"] == 17 and analytic["tokens_fine"] == 1 + 32 + 8
    assert analytic["coarse"] == pytest.approx(tiny_cfvit.costs["coarse"], rel=1e-9)
    assert analytic["fine"] == pytest.approx(tiny_cfvit.costs["fine"], rel=1e-9)


@pytest.mark.parametrize("fraction", [0.25, 0.5, 1.0])
def test_pin_fraction_is_exact(tiny_cfvit: vitconvert.ConvertedModel, fraction: float) -> None:
    x = torch.randn(8, 3, 32, 32)
    wrapper = AtEta(tiny_cfvit, fraction=fraction)
    note = pin_fraction(wrapper, x, bf16=False)
    assert note["fine_fraction"] == fraction
    costs = tiny_cfvit.costs
    assert note["mean_gmacs"] == pytest.approx(costs["coarse"] + fraction * costs["fine"], rel=1e-6)
    with torch.no_grad():
        tiny_cfvit.eta = 0.0  # the wrapper must restore its own eta on every call
        out = wrapper(x)
        tiny_cfvit.eta = note["eta"]
        ref = tiny_cfvit.forward_dynamic(x).logits
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_suite_discovery_and_list(capsys: pytest.CaptureFixture[str]) -> None:
    found = discover()
    assert found["cfvit"] == "bench_cfvit" and found["tome"] == "tome"
    for module in found.values():
        assert callable(load_runner(module))
    assert suite_main(["--list"]) == 0
    assert "benchmarks/bench_cfvit.py" in capsys.readouterr().out


def _row(method: str, setting: str, ratio: float, **extra: object) -> dict[str, object]:
    return {"method": method, "backbone": "deit_small_patch16_224", "setting": setting, "device": "cpu",
            "precision": "fp32", "batch": 64, "gmacs": 1.83, "base_gmacs": 4.61, "throughput": 30.0,
            "base_throughput": 12.0, "throughput_ratio": ratio, "throughput_ratio_p10": ratio - 0.1,
            "throughput_ratio_p90": ratio + 0.1, "latency_ms": 20.0, "base_latency_ms": 25.0,
            "latency_ratio": 1.25, **extra}


def test_report_from_json(tmp_path: Path) -> None:
    machine = common.machine_block()
    (tmp_path / "cfvit_speed.json").write_text(json.dumps(
        {"name": "cfvit", "quick": False, "machine": machine,
         "rows": [_row("cfvit", "fine fraction 0.25", 2.5, cpu_time_ratio=2.45), _row("tome", "r=13", 1.6)]}))
    (tmp_path / "dge_cifar.json").write_text(json.dumps(
        {"name": "dge", "machine": machine, "rows": [
            {"method": "dge", "backbone": "cifar10-pvt", "setting": "budget 50%", "gmacs": 0.1,
             "base_gmacs": 0.2, "top1": 80.5, "base_top1": 81.0, "finetune_minutes": 12.0,
             "curve": [[0.08, 78.0], [0.1, 80.5], [0.2, 81.0]]}]}))
    (tmp_path / "suite.json").write_text(json.dumps({"cfvit": {"ok": True, "seconds": 600.0, "threads": 1}}))
    (tmp_path / "broken.json").write_text("{not json")
    # a study's own rows (a sweep's points) name no method and backbone: not rows of the summary
    (tmp_path / "points.json").write_text(json.dumps({"rows": [{"point": {"c": 1}, "top1": 50.0, "gmacs": 0.1}]}))
    path = report.generate(tmp_path)
    text = path.read_text()
    assert "| ? |" not in text and "50.00" not in text
    assert ("| cfvit | deit_small_patch16_224 | fine fraction 0.25 | 1.83 (4.61) | 30.0 (12.0) "
            "| **2.50×** (2.40–2.60) | 2.45× | 20.0 (25.0) | 1.25× |") in text
    assert "| tome | deit_small_patch16_224 | r=13 | 1.83 (4.61) | 30.0 (12.0) | **1.60×** (1.50–1.70) | – |" in text
    assert "| dge | cifar10-pvt | budget 50% | 0.10 (0.20) | 80.50 (81.00) | -0.50 | 12 min |" in text
    assert "| cfvit | ok | 10.0 min | 1 |" in text
    assert "### `cfvit_speed.json`: CPU, fp32, batch 64" in text
    assert "Quick run" not in text
    assert (tmp_path / "throughput_ratio.png").stat().st_size > 0
    assert (tmp_path / "accuracy_vs_gmacs.png").stat().st_size > 0


def test_suite_records_failures_and_keeps_going(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import benchmarks.__main__ as suite

    def good(quick: bool, out_dir: Path) -> dict[str, object]:
        row = _row("tome", "r=8", 1.2)
        data = {"name": "good", "quick": quick, "machine": common.machine_block(), "rows": [row]}
        (out_dir / "good_speed.json").write_text(json.dumps(data))
        return data

    def bad(quick: bool, out_dir: Path) -> dict[str, object]:
        raise SystemExit("base model not found")

    runners = {"bad": bad, "good": good}
    monkeypatch.setattr(suite, "discover", lambda: {"bad": "bad", "good": "good"})
    monkeypatch.setattr(suite, "load_runner", lambda module: runners[module])
    threads = torch.get_num_threads()
    try:
        assert suite.main(["--quick", "--out", str(tmp_path), "--threads", "1"]) == 1
    finally:
        torch.set_num_threads(threads)
    record = json.loads((tmp_path / "suite.json").read_text())
    assert record["bad"]["ok"] is False and "base model not found" in record["bad"]["error"]
    assert record["good"]["ok"] is True and record["good"]["threads"] == 1 and record["good"]["quick"] is True
    text = (tmp_path / "SUMMARY.md").read_text()
    assert "Quick run" in text and "**1.20×**" in text and "| bad | failed: SystemExit: base model not found |" in text


@pytest.mark.skipif(not (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10" / "train").is_dir(),
                    reason="needs the shared CIFAR-10 images")
def test_cifar10_short_recipe_quick_dge_on_pvt(tmp_path: Path) -> None:
    from benchmarks import cifar10_short_recipe as runner

    base = runner.DEFAULT_BASE.with_name("cifar10-pvt")
    result = runner.run_recipe("dge", base, 10, tmp_path, quick=True, progress=False)
    stem = runner.result_stem("dge", base)
    assert stem == "cifar10_dge_pvt" and runner.result_stem("cfvit", runner.DEFAULT_BASE) == "cifar10_cfvit"
    assert json.loads((tmp_path / f"{stem}.json").read_text())["target"] == result["target"]
    for suffix in ("curve", "eval", "granularity"):
        assert (tmp_path / f"{stem}_{suffix}.png").stat().st_size > 1000
    assert result["target"]["rule"].startswith("top-1 within 0.7 points of the base model at <= 60%")
    ev = result["evaluation"]
    assert ev["images"] == 500 and ev["base"]["top1"] > 50  # the shipped PVT base is a real classifier
    cal = result["calibration"]
    assert cal["budget"] == "60%" and cal["gmacs"] <= 0.6 * cal["base_gmacs"] + 1e-9  # the DGE target's 60%
    row = result["rows"][0]
    assert row["backbone"] == "cifar10-pvt" and row["method"] == "dge" and row["top1"] == ev["top1"]


def test_dge_speed_runs_and_update_merge(tmp_path: Path, monkeypatch) -> None:
    """The suite measures one thread by default; flags add the two-thread runs; --update re-measures one
    architecture in exactly the runs the file holds and copies the one-thread GMACs next to the others."""
    import benchmarks.bench_dge as bench

    calls: list[tuple[str, tuple[str, ...]]] = []

    def fake_run(key: str, quick: bool, archs: tuple[str, ...] = bench.ARCHS) -> dict:
        calls.append((key, archs))
        gm = {n: {"expected_ratio": 0.5, "reported_mean": 1.0 if key == "threads1" else None, "ratio_to_base": 0.5}
              for n in ("dge_rho0.5", "dge_rho0.7", "dge_rho0.5_padded")}
        return {"threads": 1 if key == "threads1" else 2, "omp_wait_policy": key, "machine": {"run": key},
                "archs": {a: {"base_gmacs": 2.0, "gmacs": gm, "speed": {"tag": key}} for a in archs}}

    written: dict = {}

    def fake_write(runs: dict, quick: bool, out: Path) -> dict:
        written.clear()
        written.update(runs)
        (out / "dge_speed.json").write_text(json.dumps({"runs": runs}))
        return {"runs": runs}

    monkeypatch.setattr(bench, "_measure_run", fake_run)
    monkeypatch.setattr(bench, "_write", fake_write)
    bench.run(False, tmp_path)
    assert list(written) == ["threads1"]
    bench.run(False, tmp_path, threads2=True, omp_default=True)
    assert list(written) == ["threads1", "threads2_omp_passive", "threads2_default"]
    for res in written.values():  # every run carries the one-thread run's measured GMACs
        assert res["archs"]["pvt_v2_b1"]["gmacs"]["dge_rho0.5"]["reported_mean"] == 1.0
    calls.clear()
    bench.update("pvt_v2_b1", tmp_path)
    assert calls == [(k, ("pvt_v2_b1",)) for k in ("threads1", "threads2_omp_passive", "threads2_default")]
    assert written["threads2_default"]["archs"]["pvt_v2_b1"]["machine"] == {"run": "threads2_default"}
    assert "machine" not in written["threads2_default"]["archs"]["deit_small_patch16_224"]  # left as it was


def test_wallclock_rows_table_and_summary(tmp_path: Path) -> None:
    """The wall-clock benchmark's measurements become the issue's table and report rows that lead SUMMARY.md."""
    from benchmarks.bench_wallclock import markdown_table, report_rows

    def timings(ratio: float) -> dict:
        return {"img_s": 100.0 * ratio, "ratio": ratio, "ratio_p10_p90": [ratio - 0.1, ratio + 0.1],
                "ratio_halves": None, "cpu_time_ratio": ratio}

    trained = {"row": "dge_vit calibrated", "model": "dge_vit", "method": "dge", "backbone": "deit_tiny_patch16_224",
               "gates": "trained", "point": {"coarsening": 0.05}, "calibrated": "60%", "batch": 64, "threads": 2,
               "gmacs_share": 0.53, "gmacs": 0.056, "base_gmacs": 0.105, "throughput_ratio": 1.5,
               "share_of_gmacs_ideal": 0.795, "sparse_only_ratio": 1.3,
               "timings": {"base": timings(1.0), "dge_auto": timings(1.5), "dge_sparse": timings(1.3)}}
    forced = {**trained, "row": "pvt_v2_b1 rho 0.7", "model": "pvt_v2_b1", "backbone": "pvt_v2_b1", "rho": 0.7,
              "gates": "forced (random)", "point": None, "calibrated": None, "gmacs_share": 0.7,
              "throughput_ratio": 1.02, "share_of_gmacs_ideal": 0.714,
              "timings": {"base": timings(1.0), "dge_auto": timings(1.02), "dge_sparse": timings(1.3)}}
    table = markdown_table([trained, forced])
    assert "| dge, dge_vit calibrated (coarsening=0.05) | trained | 2 | 64 | 53% | 1.50x | 80% | 1.30x |" in table
    assert "| dge, pvt_v2_b1 rho 0.7  | forced (random) | 2 | 64 | 70% | 1.02x | 71% | 1.30x |" in table
    rows = report_rows([trained, forced])
    assert [(r["backbone"], r["throughput_ratio"]) for r in rows] == [
        ("cifar10-vit", 1.5), ("cifar10-vit", 1.3), ("pvt_v2_b1", 1.02), ("pvt_v2_b1", 1.3)]
    assert rows[0]["setting"] == "calibrated 60% (coarsening=0.05), trained gates, 2 threads"
    assert rows[1]["setting"].endswith(", sparse only")
    (tmp_path / "wallclock.json").write_text(json.dumps({"name": "wallclock", "machine": {}, "rows": rows}))
    (tmp_path / "aaa.json").write_text(json.dumps({"name": "a", "machine": {}, "rows": [
        {**rows[2], "backbone": "x", "setting": "other"}]}))
    text = report.generate(tmp_path).read_text()
    assert text.index("`wallclock.json`") < text.index("`aaa.json`")  # the wall-clock table leads
    # at batch 1 the headline is DGE as shipped, with the small-batch rule calibration stores (full compute here)
    small = {**trained, "batch": 1, "gmacs_share": 1.0, "throughput_ratio": 1.01, "share_of_gmacs_ideal": 1.01,
             "small_batch": {"ratios": {"1": 0.7, "2": 0.8, "4": 1.05}, "threads": 2, "below": 4, "applies": True},
             "without_rule": {"gmacs_share": 0.5, "throughput_ratio": 0.7, "share_of_gmacs_ideal": 0.35},
             "sparse_only_ratio": 0.6, "timings": {"base": timings(1.0), "dge_auto": timings(0.7),
                                                   "dge_sparse": timings(0.6), "dge_rule": timings(1.01)}}
    assert ("| trained | 2 | 1 | 100% | 1.01x | 101% | 0.60x | 50% GMACs, 0.70x (rule: full compute below 4) |"
            in markdown_table([small]))
    by_setting = {r["setting"].rsplit(", ", 1)[-1]: r for r in report_rows([small])}
    assert by_setting["small-batch rule"]["throughput_ratio"] == 1.01
    assert by_setting["small-batch rule"]["gmacs"] == pytest.approx(0.105)
    assert by_setting["without the small-batch rule"]["gmacs"] == pytest.approx(0.0525)
    assert by_setting["without the small-batch rule"]["notes"] == "share of the GMACs ideal 35%"


def test_execution_fit_recovers_known_weights() -> None:
    """The cost-model fit finds the weights that generated the time differences, and scores path choices."""
    import numpy as np

    from benchmarks.studies.fit_execution import TERMS, choice_quality, nnls

    rng = np.random.default_rng(0)
    truth = np.array([1e-10, 1.2e-10, 2e-9, 0.0, 3e-5])  # s per matrix MAC, sparse row MAC, element moved, conv MAC, op
    samples = []
    for _ in range(40):
        terms = {p: dict(zip(TERMS, rng.uniform(0, 1, 5) * np.array([1e9, 1e9, 1e7, 1e7, 100]), strict=True))
                 for p in ("sparse", "dense")}
        seconds = {p: float(np.dot([terms[p][k] for k in TERMS], truth)) for p in terms}
        samples.append({"terms": terms, "seconds": seconds})
    a = np.array([[s["terms"]["sparse"][k] - s["terms"]["dense"][k] for k in TERMS] for s in samples])
    y = np.array([s["seconds"]["sparse"] - s["seconds"]["dense"] for s in samples])
    scale = np.abs(a).max(0)
    coef = nnls(a / scale, y) / scale
    assert np.allclose(coef, truth, rtol=1e-6, atol=1e-15)
    weights = dict(zip(TERMS, coef / coef[0], strict=True))
    assert choice_quality(samples, weights, 1)["right"] == 40
    wrong = choice_quality(samples, {"mm": 1.0, "rows": 1.0, "move": 0.0, "conv": 0.0, "ops": 0.0}, 1)
    assert wrong["right"] < 40 and wrong["seconds_lost"] > 0


def test_dge_execution_constants_are_the_committed_fit(tmp_path: Path) -> None:
    """The package's cost-model constants come from the committed fit through --install, not by hand."""
    from benchmarks.studies.fit_execution import PACKAGE_COSTS, install
    from vitconvert.methods.dge.execution import EXECUTION_COSTS, load_execution_costs

    fit = json.loads((common.RESULTS / "execution_fit_t2.json").read_text())["fitted"]
    shipped = EXECUTION_COSTS["cpu"]["conv_mlp"]
    assert (shipped.move, shipped.conv, shipped.op) == (fit["move"], fit["conv"], fit["op"])
    target = tmp_path / "costs.json"
    target.write_text(PACKAGE_COSTS.read_text().replace(str(fit["op"]), "1.0"))
    assert load_execution_costs(target.read_text())["cpu"]["conv_mlp"].op == 1.0
    install(common.RESULTS / "execution_fit_t2.json", target)
    assert load_execution_costs(target.read_text()) == EXECUTION_COSTS
    assert json.loads(target.read_text())["cpu"]["plain"] == json.loads(PACKAGE_COSTS.read_text())["cpu"]["plain"]


def test_wallclock_rows_measured_again_replace_their_old_rows() -> None:
    """``bench_wallclock --rows``: a row measured again replaces the old one in place (same model, point or rho and
    batch); the others stay, new rows follow."""
    from benchmarks.bench_wallclock import merge

    def m(row: str, batch: int, ratio: float, **kw: object) -> dict:
        return {"row": row, "batch": batch, "throughput_ratio": ratio, **kw}

    old = [m("dge_vit calibrated", 64, 1.6, point={"coarsening": 0.05}), m("dge_vit calibrated", 1, 0.6,
           point={"coarsening": 0.05}), m("pvt_v2_b1 rho 0.7", 64, 0.77, rho=0.7)]
    new = [m("pvt_v2_b1 rho 0.7", 64, 0.9, rho=0.7), m("dge_vit calibrated", 64, 1.7, point={"coarsening": 0.1})]
    merged = merge(old, new)
    assert [r["throughput_ratio"] for r in merged] == [1.6, 0.6, 0.9, 1.7]


def test_path_mix_latency_is_the_weighted_mean_of_the_paths() -> None:
    """A cascade's batch-1 latency at an exit distribution, from its paths timed alone (bench_cfvit, bench_dvt)."""
    results = {"timm": {"median": 10.0}, "exit": {"median": 4.0}, "fine": {"median": 12.0}}
    measured = {"cpu_latency": {"config": {"reference": "timm"}, "results": results}}
    protocol.add_path_mix_latency(measured, "mix", {"exit": 0.75, "fine": 0.25}, "test")
    mix = measured["cpu_latency"]["results"]["mix"]
    assert mix == {"median": 6.0, "ratio": pytest.approx(10 / 6), "unit": "ms", "derived": "test"}


def test_timed_blocks_times_each_block_and_reports_choices_then_unhooks() -> None:
    from benchmarks.studies.dge_hooks import timed_blocks

    arch, kwargs = TINY_MODELS["deit"]
    torch.manual_seed(0)
    model = vitconvert.apply(arch, "dge", model_kwargs=kwargs, pretrained=False, overrides=["model.execution=auto"])
    model.eval().knob = 1.0  # every region coarsest: auto splits the batch by level
    choices: list[tuple[int, str]] = []
    x = torch.randn(2, 3, *model.anatomy.img_size)
    with torch.no_grad():
        ref = model(x)
        with timed_blocks(model, lambda blk, args, path: choices.append((blk.index, path))) as timer:
            for label in ("a", "b", "b"):
                timer.label = label
                assert torch.equal(model(x), ref)  # instrumented, not changed
    indices = [b.index for b in timer.blocks]
    assert indices == sorted(model.dynamic_blocks) and choices == [(i, "split") for i in indices] * 3
    assert {k: len(v) for k, v in timer.seconds.items()} == {**{(i, "a"): 1 for i in indices},
                                                             **{(i, "b"): 2 for i in indices}}
    assert all(t > 0 for t in timer.median("b").values())
    assert all("_choose_path" not in b.__dict__ and not b._forward_hooks and not b._forward_pre_hooks
               for b in timer.blocks)


def test_no_finetune_rows_name_tome_at_the_nearest_gmacs_and_tome_sweeps_r_on_a_tiny_vit(tmp_path) -> None:
    from benchmarks.cifar10_no_finetune import nearest_tome, table, tome_curve
    from vitconvert.data import open_image_folder

    curve = [{"r": 0, "gmacs": 1.0, "top1": 80.0}, {"r": 2, "gmacs": 0.7, "top1": 79.0},
             {"r": 4, "gmacs": 0.55, "top1": 75.0}]
    assert nearest_tome(curve, 0.72)["r"] == 2 and not nearest_tome(curve, 0.72)["above"]
    assert nearest_tome(curve, 0.4) == {"r": 4, "gmacs": 0.55, "top1": 75.0, "above": True}  # ToMe's lowest
    assert nearest_tome([], 0.5) is None
    result = {"settings": {"budget": "50%", "base": "b"}, "date": "2026-12-05T00:00",
              "rows": [{"method": "cfvit", "point": {"eta": 0.4}, "gmacs": 0.45, "base_gmacs": 1.0, "top1": 70.0,
                        "base_top1": 80.0, "tome_at_same_gmacs": nearest_tome(curve, 0.45)}]}
    assert "| cfvit | eta=0.4 | 0.4500 (45%) | 70.00 | 80.00 | -10.00 | 4 | 0.5500 (55%, its lowest) | 75.00 |" \
        in table(result)

    # ToMe's sweep on a tiny ViT (64 patch tokens, 4 blocks): r = 0 .. 15, GMACs falling, r = 0 the base model.
    model, _, _ = tiny_model("deit")
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 32, 32), "crop_pct": 1.0}  # its eval transform
    root = tmp_path / "data"
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(3):
            from PIL import Image
            Image.new("RGB", (32, 32), (40 * i, 90 * c, 20)).save(root / f"c{c}" / f"{i}.png")
    split = open_image_folder(root, holdout=0.5).eval_split(None)
    points = tome_curve(model, split, (32, 32), progress=False)
    assert [p["r"] for p in points] == list(range(16))
    gm = [p["gmacs"] for p in points]
    assert gm == sorted(gm, reverse=True) and gm[0] > gm[-1]
    from benchmarks.tome import gmacs
    assert gm[0] == pytest.approx(gmacs(model, (32, 32)))


def _compile_row(arch: str, recipe: str, converted_s: float, base_s: float) -> dict:
    """A bench_compile row as measure_row writes it (numbers made up; the table and the file are under test)."""
    side = {"compile_s": 1.0, "graphs_first_call": 1, "first_call_at_batch_1_s": 0.5,
            "graphs_after_second_batch_size": 1, "graphs_after_sweep": 1, "sweep": [1, 3, 8, 64]}
    timing = {"gmacs_share": 0.5, "compiled_speedup_vs_compiled_base": 1.5, "compiled_speedup_p10_p90": [1.4, 1.6],
              "eager_speedup_vs_eager_base": 1.4, "agree": {"max_abs_logit_difference": 1e-6, "same_gmacs": True,
                                                            "same_exits": True}}
    return {"method": recipe, "backbone": arch, "converted": {**side, "compile_total_s": converted_s},
            "base": {**side, "compile_total_s": base_s}, "compile_time_vs_base": 1.0,
            "compile_total_vs_base": round(converted_s / base_s, 2), "timing": {"32": timing},
            "load_average_before": [0.1, 0.1, 0.1]}


def test_bench_compile_writes_after_every_row_and_keeps_other_methods(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A stopped run keeps the rows it measured (``complete`` false until the last), ``--only`` keeps the other
    methods' rows in ROWS' order, and the table shows the compile time for every batch size (old rows: '-')."""
    from benchmarks import bench_compile

    monkeypatch.setattr(bench_compile, "warm_up", lambda: None)
    old = _compile_row("deit_small_patch16_224", "cfvit", 10.0, 10.0)
    del old["compile_total_vs_base"]  # a row measured before the totals existed
    (tmp_path / "compile_speed.json").write_text(json.dumps({"rows": [old]}))
    seen: list[dict] = []

    def measure_row(arch: str, recipe: str, *args: object) -> dict:
        if seen:  # the file already holds the first measured row, marked incomplete
            written = json.loads((tmp_path / "compile_speed.json").read_text())
            assert written["complete"] is False and [r["method"] for r in written["rows"]] == ["cfvit", "dvt"]
        seen.append(_compile_row(arch, recipe, 120.0, 40.0))
        return seen[-1]

    monkeypatch.setattr(bench_compile, "measure_row", measure_row)
    result = bench_compile.run(quick=False, out_dir=tmp_path, threads=1, only=["dvt", "dge"])
    assert [r["method"] for r in result["rows"]] == ["cfvit", "dvt", "dge"] and result["complete"] is True
    table = (tmp_path / "compile_speed.md").read_text().splitlines()
    assert "every batch size" in table[2]
    cells = {line.split(" | ")[0].strip("| "): line.split(" | ")[4] for line in table[4:]}
    assert cells == {"cfvit": "-", "dvt": "120 (40), 3.00", "dge": "120 (40), 3.00"}


def test_export_table_names_the_cpu_only_when_rows_ran_on_several() -> None:
    from benchmarks.bench_export import markdown

    row = {"method": "dvt", "model": "deit_small (random weights)", "batch": 64, "gmacs": 2.0, "base_gmacs": 4.0,
           "exit_shares": {"0": 0.5, "1": 0.5}, "onnx_speedup": 1.5, "onnx_speedup_p10_p90": [1.4, 1.6],
           "eager_speedup": 1.6, "onnx_share_of_eager_speedup": 0.94, "cpu": "AMD EPYC"}
    one = markdown([row, {**row, "batch": 1}])
    assert "CPU" not in one and "| dvt | deit_small | 64 | 50% | 50% / 50% | 1.50x (1.40-1.60) | 1.60x | 94% |" in one
    mixed = markdown([row, {**row, "cpu": None}])
    assert mixed.splitlines()[0].endswith(" CPU |")
    assert mixed.splitlines()[2].endswith("| AMD EPYC |") and mixed.splitlines()[3].endswith("| not recorded |")


def test_export_batch_one_rows_take_images_in_the_proportions_of_the_exits() -> None:
    from benchmarks.bench_export import markdown, single_image_mix

    stage = torch.tensor([2, 0, 0, 1, 0, 2, 0, 1, 0, 0, 2, 1, 0, 0, 2, 0])  # 9 / 3 / 4 of 16 exit at stages 0 / 1 / 2
    picked = single_image_mix(stage, 8)  # 4.5 / 1.5 / 2 of 8: the tie of remainders to the first stage
    assert picked.tolist() == [0, 1, 2, 3, 4, 5, 6, 8] and torch.bincount(stage[picked]).tolist() == [5, 1, 2]
    assert single_image_mix(torch.zeros(16, dtype=torch.long), 4).tolist() == [0, 1, 2, 3]
    assert single_image_mix(None, 3).tolist() == [0, 1, 2]  # no exits: the first images
    row = {"method": "dge", "model": "pvt_v2_b1 (random weights)", "batch": 1, "images": 8, "one_at_a_time": True,
           "gmacs": 1.0, "base_gmacs": 2.0, "exit_shares": {}, "onnx_speedup": 1.0, "onnx_speedup_p10_p90": [0.9, 1.1],
           "eager_speedup": 1.0, "onnx_share_of_eager_speedup": 1.0}
    assert "| dge | pvt_v2_b1 | 1 (8 alone) | 50% | - |" in markdown([row])


def test_export_bench_measures_a_fine_tuned_folder_alone_and_keeps_the_other_rows(monkeypatch, tmp_path) -> None:
    """``--trained DIR --only``: the fine-tuned rows are measured (first in the file, replacing the old fine-tuned
    rows) and every other row of the result file is kept; nothing else is measured."""
    from benchmarks import bench_export

    def row(method: str, gates: str) -> dict:
        return {"method": method, "model": f"{method} model", "batch": 64, "gmacs": 1.0, "base_gmacs": 2.0,
                "exit_shares": {}, "onnx_speedup": 1.5, "onnx_speedup_p10_p90": [1.4, 1.6], "eager_speedup": 1.5,
                "onnx_share_of_eager_speedup": 1.0, "gates": gates}

    old = [row("cfvit", "trained"), row("dvt", "forced"), row("dge", "random routers")]
    (tmp_path / "export_speed.json").write_text(json.dumps({"rows": old}))
    monkeypatch.setattr(bench_export, "trained_rows", lambda *a, **k: [row("cfvit", "trained") | {"model": "new"}])
    monkeypatch.setattr(bench_export, "measure_row", lambda *a, **k: pytest.fail("measured a random-weight row"))
    result = bench_export.run(quick=False, out_dir=tmp_path, threads=1, cifar=True, only=[], trained=[tmp_path])
    assert [(r["method"], r["model"]) for r in result["rows"]] == [("cfvit", "new"), ("dvt", "dvt model"),
                                                                    ("dge", "dge model")]


def test_committee_exits_average_the_softmax_of_the_stages_so_far() -> None:
    from benchmarks.studies.exit_scores import committee

    logits = [torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 3.0]])]
    p = [lg.softmax(-1) for lg in logits]
    early = committee(logits, last=False)
    assert torch.allclose(early[0].exp(), p[0]) and torch.allclose(early[1].exp(), (p[0] + p[1]) / 2)
    assert early[2] is logits[2]  # the last stage answers alone: full compute stays the base model
    assert torch.allclose(committee(logits, last=True)[2].exp(), (p[0] + p[1] + p[2]) / 3)


def test_bench_compile_selects_rows_by_method_or_by_method_and_backbone() -> None:
    from benchmarks.bench_compile import ROWS, selects

    assert selects(["cfvit"], "cfvit", "deit_small_patch16_224")
    assert selects(["cfvit:pvt_v2_b1"], "cfvit", "pvt_v2_b1")
    assert not selects(["cfvit:pvt_v2_b1"], "cfvit", "deit_small_patch16_224")
    pvt = [row for row in ROWS if selects(["cfvit:pvt_v2_b1"], row[1], row[0])]
    assert [row[3] for row in pvt] == [[], ["model.alpha=0.5"]]  # the recipe's point and the region path

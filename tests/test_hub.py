"""Push and load through the Hugging Face Hub, against a real Hub-compatible server on loopback.

The ``hub`` fixture (tests/conftest.py) serves reads with olah and writes with tests/hub_server.py; the
stock huggingface_hub client talks to it through ``HF_ENDPOINT``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import yaml
from conftest import HUB_ENDPOINT, HUB_TOKEN, HUB_USER
from hub_server import free_port
from utils import TINY_MODELS, tiny_model

import vitconvert
import vitconvert.saving as saving
from vitconvert.card import fill_repo_id, front_matter, model_card
from vitconvert.errors import UserError
from vitconvert.operating import CurvePoint
from vitconvert.publish import push
from vitconvert.sources import BaseSpec

# A valid 1x1 PNG: the card links plots by name; their content does not matter here.
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d49444154789c63f8cfc0f01f0005000201a5e1d3a20000000049454e44ae426082")
MODEL_FILES = {".gitattributes", "config.json", "model.safetensors", "README.md"}


def _front(card: str) -> dict[str, Any]:
    return yaml.safe_load(card.split("---", 2)[1])


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def converted() -> vitconvert.ConvertedModel:
    """A tiny CF-ViT with a calibration curve, so budgets and the card's table have data."""
    arch, kwargs = TINY_MODELS["deit"]
    torch.manual_seed(0)
    model = vitconvert.apply(arch, "cfvit", model_kwargs=kwargs, pretrained=False)
    costs = model.get_state()["costs"]
    model.curve = [CurvePoint({"eta": 0.0}, costs["coarse"], 41.0),
                   CurvePoint({"eta": 0.6}, costs["coarse"] + 0.4 * costs["fine"], 55.5),
                   CurvePoint({"eta": 1.0}, costs["coarse"] + costs["fine"], 60.25)]
    model.calibration = {"dataset": "cifar10", "split": "held-out", "images": 500, "base_top1": 61.0}
    model.knob = 0.6
    return model


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def folder(converted: vitconvert.ConvertedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved model folder with files a push must leave behind (a .bin, a log, an unreferenced plot)."""
    out = tmp_path_factory.mktemp("saved") / "deit-cfvit"
    return vitconvert.save(converted, out, extra_files={"curve.png": PNG, "pytorch_model.bin": b"pickle!",
                                                        "train.log": "step 1\n", "unused.png": PNG})


def test_push_then_load_three_ways(hub, hub_repo, folder, converted, inputs) -> None:
    url = push(folder, hub_repo, token=HUB_TOKEN)
    head = hub.store.resolve(hub_repo, "main")
    assert url == f"{HUB_ENDPOINT}/{hub_repo}/commit/{head}"
    # Exactly the model files and the plot the card shows; never the .bin, the log or unreferenced files.
    assert set(hub.files(hub_repo)) == MODEL_FILES | {"curve.png"}
    assert hub.commits[-1] == (hub_repo, "main", ["README.md", "config.json", "curve.png", "model.safetensors"])
    readme = vitconvert.hub.download_file(hub_repo, "README.md").read_text()
    assert f"vitconvert.load('hf-hub:{hub_repo}')" in readme and "OWNER/" not in readme
    assert _front(readme)["tags"] == ["image-classification", "timm", "vitconvert", "cfvit", "vit"]

    # The stored operating point through timm, a budget through vitconvert.load: both equal the original.
    via_timm = timm.create_model(f"hf-hub:{hub_repo}", pretrained=True)
    assert isinstance(via_timm, vitconvert.METHODS["cfvit"]) and via_timm.knob == pytest.approx(0.6)
    assert torch.equal(_logits(via_timm, inputs), _logits(converted, inputs))
    # 30% of the base GMACs leaves only the coarse-only point (eta = 0).
    cheap = vitconvert.load(f"hf-hub:{hub_repo}", budget="30%")
    assert type(cheap) is type(via_timm) and cheap.knob == 0.0
    converted.knob = 0.0
    try:
        assert torch.equal(_logits(cheap, inputs), _logits(converted, inputs))
    finally:
        converted.knob = 0.6

    # Pushing the same folder again changes nothing and still reports the (unchanged) head commit.
    assert push(folder, hub_repo, token=HUB_TOKEN) == url


def test_push_to_branch_and_pull_request(hub, hub_repo, folder, converted, inputs, tmp_path) -> None:
    push(folder, hub_repo, token=HUB_TOKEN)
    main_files = hub.files(hub_repo)
    # A second version: other weights and operating point, pushed to a new branch.
    v2 = copy.deepcopy(converted)
    with torch.no_grad():
        v2.base.head.bias.add_(0.5)
    v2.knob = 1.0
    v2_folder = vitconvert.save(v2, tmp_path / "v2")
    url = push(v2_folder, hub_repo, revision="v2", commit_message="v2 weights", token=HUB_TOKEN)
    assert url.endswith(hub.store.resolve(hub_repo, "v2"))
    assert hub.files(hub_repo) == main_files  # main untouched

    v2_logits = _logits(v2, inputs)
    by_arg = vitconvert.load(f"hf-hub:{hub_repo}", revision="v2")
    via_timm = timm.create_model(f"hf-hub:{hub_repo}@v2", pretrained=True)
    for model in (by_arg, via_timm):
        assert model.knob == 1.0 and torch.equal(_logits(model, inputs), v2_logits)
    download = vitconvert.hub.download_model
    assert download(f"{hub_repo}@v2") == download(hub_repo, revision="v2") != download(hub_repo)
    weights = (v2_folder / "model.safetensors").read_bytes()
    assert (download(hub_repo, revision="v2") / "model.safetensors").read_bytes() == weights

    pr_url = push(v2_folder, hub_repo, create_pr=True, token=HUB_TOKEN)
    assert pr_url == f"{HUB_ENDPOINT}/{hub_repo}/discussions/1"
    assert (download(hub_repo, revision="refs/pr/1") / "model.safetensors").read_bytes() == weights
    with pytest.raises(UserError, match="has no such revision"):
        vitconvert.load(f"hf-hub:{hub_repo}", revision="no-such-branch")


def test_apply_to_a_base_model_on_the_hub(hub, hub_repo, tmp_path) -> None:
    from huggingface_hub import HfApi

    base, arch, kwargs = tiny_model("deit", seed=3)
    timm_folder = tmp_path / "timm-base"
    timm.models.save_for_hf(base, str(timm_folder), model_args=kwargs, safe_serialization=True)
    api = HfApi(token=HUB_TOKEN)  # a plain timm folder, pushed with the stock client
    api.create_repo(hub_repo)
    api.upload_folder(repo_id=hub_repo, folder_path=str(timm_folder))
    assert set(hub.files(hub_repo)) == {".gitattributes", "config.json", "model.safetensors"}

    model = vitconvert.apply(f"hf-hub:{hub_repo}", "cfvit")
    assert model.base_spec.hub_id == hub_repo and model.base_spec.architecture == arch
    assert model.base_spec.pretrained
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    # At full compute the converted model is the base model, so equal logits prove the Hub weights arrived.
    torch.testing.assert_close(_logits(model.full_compute(), x), _logits(base, x), atol=1e-5, rtol=1e-5)
    card = model_card(json.loads(json.dumps(vitconvert.saving.model_config(model))))
    assert _front(card)["base_model"] == hub_repo

    with pytest.raises(UserError, match="does not exist"):
        vitconvert.apply(f"hf-hub:{HUB_USER}/no-such-base", "cfvit")


def _corrupt(config: dict[str, Any], case: str) -> None:
    if case == "unknown architecture":
        config["architecture"] = "vitconvert_evil"
    elif case == "unknown base architecture":
        config["model_args"]["base"]["architecture"] = "os.system"
    elif case == "bad recipe value":
        config["model_args"]["recipe"]["model"]["alpha"] = 5.0


@pytest.mark.parametrize("case, message", [
    ("unknown architecture", "is not a vitconvert model"),
    ("unknown base architecture", "is not a timm model"),
    ("bad recipe value", "alpha"),
    ("only pytorch_model.bin", "no model.safetensors"),
])
def test_loading_refuses_unsafe_repos_before_building(hub, hub_repo, folder, monkeypatch, case, message) -> None:
    config = json.loads((folder / "config.json").read_text())
    _corrupt(config, case)
    files = {"config.json": json.dumps(config).encode(), "README.md": b"# not to be trusted\n"}
    if case == "only pytorch_model.bin":
        files["pytorch_model.bin"] = (folder / "model.safetensors").read_bytes()
    else:
        files["model.safetensors"] = (folder / "model.safetensors").read_bytes()
    hub.seed(hub_repo, files)

    def built(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was built from an invalid repository")

    monkeypatch.setattr(BaseSpec, "build", built)
    monkeypatch.setattr(saving, "convert", built)
    with pytest.raises(UserError, match=message):
        vitconvert.load(f"hf-hub:{hub_repo}")
    if case == "unknown architecture":  # timm itself refuses names it does not know
        with pytest.raises(RuntimeError, match="Unknown model"):
            timm.create_model(f"hf-hub:{hub_repo}", pretrained=True)
    else:
        with pytest.raises(UserError, match=message):
            timm.create_model(f"hf-hub:{hub_repo}", pretrained=True)
    # The pickle was never fetched.
    assert not any(path.endswith(".bin") for _, path in hub.requests)


@pytest.mark.parametrize("repo_id", ["bad id", "a/b/c", "hf-hub:tester/x", "tester/x--y", "tester/" + "x" * 100, ""])
def test_push_rejects_invalid_repo_ids(folder, repo_id) -> None:
    with pytest.raises(UserError, match="not a valid Hub repository id"):
        push(folder, repo_id, token=HUB_TOKEN)


def test_push_validates_the_folder_first(hub, folder, tmp_path) -> None:
    requests = len(hub.requests)
    with pytest.raises(UserError, match="does not exist"):
        push(tmp_path / "missing", "tester/x", token=HUB_TOKEN)
    only_bin = tmp_path / "only-bin"
    shutil.copytree(folder, only_bin)
    (only_bin / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"no model.safetensors \(found pytorch_model.bin"):
        push(only_bin, "tester/x", token=HUB_TOKEN)
    plain = tmp_path / "plain-timm"
    timm.models.save_for_hf(tiny_model("deit")[0], str(plain), safe_serialization=True)
    with pytest.raises(UserError, match="is not a vitconvert model"):
        push(plain, "tester/x", token=HUB_TOKEN)
    bad_recipe = tmp_path / "bad-recipe"
    shutil.copytree(folder, bad_recipe)
    config = json.loads((bad_recipe / "config.json").read_text())
    config["model_args"]["recipe"]["model"]["alpha"] = 5.0
    (bad_recipe / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="alpha"):
        push(bad_recipe, "tester/x", token=HUB_TOKEN)
    assert len(hub.requests) == requests  # nothing reached the Hub


def test_push_token_errors(hub, hub_repo, folder, monkeypatch) -> None:
    with pytest.raises(UserError, match="needs a Hugging Face token"):
        push(folder, hub_repo)
    with pytest.raises(UserError, match=r"rejected the token .*HTTP 401"):
        push(folder, hub_repo, token="hf_wrong_token")
    with pytest.raises(UserError, match=r"cannot write to 'someone-else/model' \(HTTP 403"):
        push(folder, "someone-else/model", token=HUB_TOKEN)
    assert not hub.store.exists(hub_repo) and not hub.store.exists("someone-else/model")


def test_push_generates_missing_card_and_private_repos_need_a_token(hub, hub_repo, folder, tmp_path,
                                                                    monkeypatch) -> None:
    no_card = tmp_path / "no-card"
    shutil.copytree(folder, no_card)
    (no_card / "README.md").unlink()
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)  # the usual token source when none is passed
    push(no_card, hub_repo, private=True)
    assert hub.private[hub_repo] is True
    readme = hub.read_file(hub_repo, "README.md").decode()
    assert f"vitconvert.load('hf-hub:{hub_repo}')" in readme and "![top-1 against expected GMACs](curve.png)" in readme
    weights = (folder / "model.safetensors").read_bytes()
    assert (vitconvert.hub.download_model(hub_repo) / "model.safetensors").read_bytes() == weights
    monkeypatch.delenv("HF_TOKEN")
    other_cache = tmp_path / "cache"  # so the copy cached above does not answer
    with pytest.raises(UserError, match="does not exist or is not visible with your token"):
        vitconvert.hub.download_model(hub_repo, cache_dir=other_cache)
    # NAME alone goes to the token's own namespace.
    url = push(folder, hub_repo.split("/")[1] + "-short", token=HUB_TOKEN)
    assert url.startswith(f"{HUB_ENDPOINT}/{hub_repo}-short/commit/")


def test_load_missing_repo(hub) -> None:
    with pytest.raises(UserError, match=f"'{HUB_USER}/never-pushed' does not exist"):
        vitconvert.load(f"hf-hub:{HUB_USER}/never-pushed")


_CHILD = textwrap.dedent("""
    import hashlib
    import sys

    import vitconvert
    from vitconvert.hub import download_model
    from vitconvert.publish import push

    folder, cached, missing = sys.argv[1:4]
    attempts = [("load-missing", lambda: vitconvert.load("hf-hub:" + missing)),
                ("push", lambda: push(folder, missing, token="hf_test_token"))]
    if cached != "-":  # what is in the cache still loads offline
        weights = lambda: (download_model(cached) / "model.safetensors").read_bytes()
        attempts.insert(0, ("load-cached", lambda: hashlib.sha256(weights()).hexdigest()))
    for name, attempt in attempts:
        try:
            result = attempt()
        except vitconvert.UserError as e:
            print(name, "UserError:", e)
        else:
            print(name, "OK", result)
""")


def test_offline_and_unreachable_hub_in_fresh_processes(hub, hub_repo, hub_subprocess_env, folder, tmp_path) -> None:
    push(folder, hub_repo, token=HUB_TOKEN)
    vitconvert.hub.download_model(hub_repo)  # now in the shared cache
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    missing = f"{HUB_USER}/not-in-cache"
    offline_env = {**hub_subprocess_env, "HF_HUB_OFFLINE": "1"}
    dead = f"http://127.0.0.1:{free_port()}"
    dead_env = {**hub_subprocess_env, "HF_ENDPOINT": dead, "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    runs = {name: subprocess.Popen([sys.executable, str(script), str(folder), cached, missing], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for name, env, cached in [("offline", offline_env, hub_repo), ("dead", dead_env, "-")]}
    out = {name: run.communicate(timeout=120)[0] for name, run in runs.items()}
    lines = {name: dict(line.split(" ", 1) for line in text.splitlines() if line.split(" ", 1)[0] in
                        ("load-cached", "load-missing", "push")) for name, text in out.items()}

    offline = lines["offline"]
    assert offline["load-cached"] == "OK " + hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert offline["load-missing"] == (f"UserError: HF_HUB_OFFLINE=1 is set and '{missing}' is not in the local Hub "
                                       "cache; unset HF_HUB_OFFLINE to download it, or use local-dir:PATH"), out
    assert offline["push"] == ("UserError: HF_HUB_OFFLINE=1 is set, so nothing can be pushed; unset HF_HUB_OFFLINE "
                               "and retry")

    dead_lines = lines["dead"]
    assert dead_lines["load-missing"].startswith(f"UserError: cannot reach the Hub at {dead} and '{missing}' is not in "
                                                 "the local Hub cache"), out["dead"]
    assert dead_lines["push"].startswith(f"UserError: cannot reach the Hub at {dead} and '{missing}' could not be "
                                         "pushed"), out["dead"]
    assert not hub.store.exists(missing)


# --- the model card (no server) ------------------------------------------------------------------------


def test_card_front_matter_and_tables(converted, tmp_path) -> None:
    config = vitconvert.saving.model_config(converted)
    config["model_args"]["base"]["hub_id"] = "timm/deit_tiny_patch16_224.fb_in1k@main"
    config["pretrained_cfg"]["license"] = "cc-by-nc-4.0"
    config["model_args"]["state"]["calibration"]["dataset_id"] = "uoft-cs/cifar10"
    (tmp_path / "curve.png").write_bytes(PNG)
    (tmp_path / "eval.png").write_bytes(PNG)
    (tmp_path / "eval.json").write_text(json.dumps({
        "dataset": "cifar10", "split": "val", "images": 5000, "device": "cpu", "batch_size": 64,
        "base": {"top1": 60.5, "gmacs": 0.0091, "throughput": 1000.0},
        "points": [{"knob": 0.6, "eta": 0.6, "top1": 55.0, "gmacs": 0.0044, "throughput": 1900.0,
                    "throughput_ratio": 1.9}]}))
    card = model_card(config, tmp_path, "deit-cfvit")
    meta = _front(card)
    index = meta.pop("model-index")  # issue 17: lineage relation and measured results are new
    assert meta == {"library_name": "timm", "pipeline_tag": "image-classification",
                    "tags": ["image-classification", "timm", "vitconvert", "cfvit", "vit"],
                    "license": "cc-by-nc-4.0", "base_model": "timm/deit_tiny_patch16_224.fb_in1k",
                    "base_model_relation": "finetune", "datasets": ["uoft-cs/cifar10"], "metrics": ["accuracy"]}
    _check_model_index(card, index)
    state = config["model_args"]["state"]
    coarse = state["costs"]["coarse"]
    # Operating points: base row, the three calibrated points, the stored one marked, throughput from eval.json.
    assert f"| base model | 61.00 | {state['base_gmacs']:.4g} | 100% | 1.00× |" in card
    assert f"| 0 | 41.00 | {coarse:.4g} | {coarse / state['base_gmacs']:.0%} | – |" in card
    assert "| **0.6** (default) | 55.50 |" in card and "| 1.90× |" in card
    assert "| 0.6 | 55.00 | 0.0044 | 1900.0 | 1.90× |" in card  # evaluation table
    assert "| base model | 60.50 | 0.0091 | 1000.0 | 1.00× |" in card
    assert "Calibrated on 500 images, cifar10, held-out" in card
    assert "chosen by the budget" not in card  # this calibration record names no budget
    config["model_args"]["state"]["calibration"]["budget"] = "drop=0.5"
    assert ("The default point was chosen by the budget `drop=0.5`: the cheapest point within 0.5 top-1 points of "
            "the base model.") in model_card(config, tmp_path, "deit-cfvit")
    assert "![top-1 against expected GMACs](curve.png)" in card and "(eval.png)" in card
    assert "vitconvert.load('hf-hub:OWNER/deit-cfvit', budget='50%')" in card
    assert fill_repo_id(card, "me/deit-cfvit").count("hf-hub:me/deit-cfvit") == 3
    assert "alpha: 0.5" in card  # the recipe, as YAML

    # Nothing is claimed that is not known: no licence, no datasets, no metrics, no base_model.
    bare = vitconvert.saving.model_config(converted)
    bare["pretrained_cfg"].pop("license")
    bare["model_args"]["state"].update(curve=[], calibration={})
    assert set(front_matter(bare)) == {"library_name", "pipeline_tag", "tags"}
    assert "## Operating points" not in model_card(bare)


def test_card_names_whole_points_when_a_second_knob_varies(converted) -> None:
    """A curve calibrated over several alphas: rows (and the model index) name the whole point, and the stored
    point, not merely the nearest eta, is the one marked."""
    config = vitconvert.saving.model_config(converted)
    state = config["model_args"]["state"]
    state["point"] = {"eta": 0.5, "alpha": 0.25}
    state["curve"] = [{"point": {"eta": 0.5, "alpha": a}, "gmacs": g, "top1": t, "extra": {}}
                      for a, g, t in ((0.5, 0.006, 58.0), (0.25, 0.005, 56.0))]
    card = model_card(config)
    assert "| operating point | top-1 (%) |" in card
    assert "| **eta=0.5, alpha=0.25** (default) | 56.00 | 0.005 |" in card
    assert "| eta=0.5, alpha=0.5 | 58.00 | 0.006 |" in card
    index = _front(card)["model-index"][0]["results"]
    assert {m["config"] for r in index for m in r["metrics"]} == {"eta=0.5, alpha=0.25", "eta=0.5, alpha=0.5"}
    single = vitconvert.saving.model_config(converted)  # one alpha: rows keyed by eta alone, as before
    assert "| operating point |" not in model_card(single) and "| eta | top-1 (%) |" in model_card(single)

def test_cli_push(hub, hub_repo, folder, capsys) -> None:
    from vitconvert.cli import main

    main(["push", str(folder), "--repo-id", hub_repo, "--token", HUB_TOKEN, "--branch", "dev"])
    printed = "".join(capsys.readouterr().out.split())
    assert f"pushedto{HUB_ENDPOINT}/{hub_repo}/commit/{hub.store.resolve(hub_repo, 'dev')}" in printed
    with pytest.raises(SystemExit) as exc:
        main(["push", str(folder), "--repo-id", hub_repo, "--token", "hf_wrong_token"])
    assert exc.value.code == 2
    err = capsys.readouterr()
    assert len((err.out + err.err).strip().splitlines()) == 1 and "rejected the token" in err.out + err.err


def _check_model_index(card: str, index: list[dict[str, Any]]) -> None:
    """The front matter passes huggingface_hub's own card tools and round-trips through them unchanged."""
    from huggingface_hub import ModelCard, ModelCardData
    from huggingface_hub.repocard_data import model_index_to_eval_results

    data = ModelCard(card).data
    meta = _front(card)
    assert ModelCardData(**meta).to_dict() == meta
    assert data.base_model == meta["base_model"] and data.base_model_relation == "finetune"
    name, results = model_index_to_eval_results(index)
    assert name == "deit-cfvit" and [r.metric_value for r in data.eval_results] == [r.metric_value for r in results]
    # Calibration curve (three points: top-1 and GMACs each) on cifar10's held-out split, then the evaluation.
    calibrated = [r for r in results if r.dataset_split == "held-out"]
    assert [(r.metric_type, r.metric_value, r.metric_config) for r in calibrated[:2]] == [
        ("accuracy", 41.0, "eta=0"), ("gmacs", calibrated[1].metric_value, "eta=0")]
    assert len(calibrated) == 6 and all(r.dataset_type == "uoft-cs/cifar10" for r in results)
    evaluated = [r for r in results if r.dataset_split == "val"]
    assert [(r.metric_type, r.metric_value) for r in evaluated] == [("accuracy", 55.0), ("gmacs", 0.0044)]
    assert all(r.task_type == "image-classification" for r in results)


def test_card_reproduce_section_and_metadata_through_the_hub(hub, hub_repo, folder, converted) -> None:
    from huggingface_hub import ModelCard

    card = (folder / "README.md").read_text()
    assert "## How to reproduce" in card
    assert ("vitconvert apply --recipe cfvit deit_tiny_patch16_224 --no-pretrained --model-kwargs img_size=32 "
            "patch_size=4 embed_dim=48 depth=4 num_heads=3 num_classes=10 -o deit-cfvit") in card
    assert "vitconvert calibrate deit-cfvit --data DATA\n" in card and "vitconvert finetune" not in card
    push(folder, hub_repo, token=HUB_TOKEN)
    remote = ModelCard.load(hub_repo)  # the stock client reads and parses what the Hub holds
    meta = _front(card)
    assert remote.data.to_dict() == meta and "base_model" not in meta  # random base weights: no lineage claimed
    assert [r.metric_value for r in remote.data.eval_results][:2] == [41.0, round(converted.curve[0].gmacs, 5)]

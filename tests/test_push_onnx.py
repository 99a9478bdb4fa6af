"""``push --with-onnx``: ``model.onnx`` beside the safetensors on the loopback Hub, the card's onnxruntime section
(run as written), the refusals that stop a push before anything is sent, and loading that never fetches the file.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
from conftest import HUB_ENDPOINT, HUB_TOKEN
from PIL import Image
from utils import TINY_MODELS, exiting_cfvit

import vitconvert
from vitconvert.card import ONNX_HEADING, onnx_section, set_onnx_section
from vitconvert.data import eval_transform
from vitconvert.errors import UserError
from vitconvert.methods.base import ConvertedModel
from vitconvert.methods.dge import DGE
from vitconvert.publish import push

pytestmark = pytest.mark.usefixtures("one_thread")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
MODEL_FILES = {".gitattributes", "config.json", "model.safetensors", "README.md"}
REFUSED = "; nothing was pushed (without --with-onnx the model is pushed alone)"


@pytest.fixture(scope="module")
def cascade(tmp_path_factory: pytest.TempPathFactory) -> tuple[vitconvert.ConvertedModel, Path, torch.Tensor]:
    """A tiny CF-ViT saved as a folder, at a point where some of the images exit early."""
    return exiting_cfvit(tmp_path_factory.mktemp("push-onnx"))


@pytest.fixture(scope="module")
def saved_dge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    arch, kwargs = TINY_MODELS["deit"]
    dge = vitconvert.apply(arch, "dge", model_kwargs=kwargs, pretrained=False)
    return vitconvert.save(dge, tmp_path_factory.mktemp("push-onnx") / "dge")


@pytest.fixture
def dge_folder(saved_dge: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A saved model whose method has no traceable path, so it cannot be exported: every registered method exports,
    so DGE stands in for one with the base class's ``forward_traceable`` (the refusal) while the test runs."""
    monkeypatch.setattr(DGE, "forward_traceable", ConvertedModel.forward_traceable)
    return saved_dge


def _code(card: str) -> str:
    """The Python block of the card's ONNX section."""
    section = card[card.index(ONNX_HEADING):]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_push_with_onnx_runs_in_onnxruntime_and_loading_never_fetches_it(hub, hub_repo, cascade, tmp_path,
                                                                         monkeypatch) -> None:
    from huggingface_hub import hf_hub_download

    model, saved, x = cascade
    folder = tmp_path / "cfvit"
    shutil.copytree(saved, folder)
    (folder / "model.onnx").write_bytes(b"an old export")  # never uploaded: the push exports afresh
    url = push(folder, hub_repo, token=HUB_TOKEN, with_onnx=True)
    assert url == f"{HUB_ENDPOINT}/{hub_repo}/commit/{hub.store.resolve(hub_repo, 'main')}"
    assert set(hub.files(hub_repo)) == MODEL_FILES | {"model.onnx"}
    assert hub.commits[-1] == (hub_repo, "main", ["README.md", "config.json", "model.onnx", "model.safetensors"])

    # Downloaded with the stock client, it runs in onnxruntime as the model does: a mix of exits at the stored eta.
    path = hf_hub_download(hub_repo, "model.onnx", cache_dir=tmp_path / "client-cache")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    assert [i.name for i in session.get_overridable_initializers()] == ["eta"]  # an input with a default
    with torch.no_grad():
        eager = model.forward_dynamic(x)
    logits, gmacs, exits = session.run(None, {"pixel_values": x.numpy()})
    assert np.abs(logits - eager.logits.numpy()).max() <= 1e-4
    assert (exits == eager.stage.numpy()).all() and 0 < int(exits.sum()) < 7
    np.testing.assert_allclose(gmacs, eager.gmacs.numpy(), rtol=1e-6)
    refined = session.run(["exit"], {"pixel_values": x.numpy(), "eta": np.array(1.0, np.float32)})[0]
    assert (refined == 1).all()  # the knob input overrides the stored point

    # The card on the Hub says how, for this repository, this knob and these outputs.
    card = hub.read_file(hub_repo, "README.md").decode()
    assert card.count(ONNX_HEADING) == 1 and card.index(ONNX_HEADING) < card.index("## Recipe")
    section = card[card.index(ONNX_HEADING):card.index("## Recipe")]
    assert f'hf_hub_download("{hub_repo}", "model.onnx")' in section
    assert f"# the stored point: eta = {model.eta:g}" in section
    assert "Fixed in the graph: `alpha = 0.5`, `dense = 0`." in section
    assert "`logits` (N, classes)" in section and "`exit` (N,) int64" in section
    assert "np.array([0.485, 0.456, 0.406], np.float32)" in section and "Image.Resampling.BICUBIC" in section

    # Loading (vitconvert and timm) fetches config, weights and card only.
    before = len(hub.requests)
    loaded = vitconvert.load(f"hf-hub:{hub_repo}")
    via_timm = timm.create_model(f"hf-hub:{hub_repo}", pretrained=True)
    fetched = [p for _, p in hub.requests[before:]]
    assert fetched and not any(p.endswith(".onnx") for p in fetched)
    snapshot = vitconvert.hub.download_model(hub_repo)
    assert sorted(p.name for p in snapshot.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert not list(snapshot.parents[1].rglob("*.onnx"))  # nothing of it anywhere in the repo's cache
    with torch.no_grad():
        for other in (loaded, via_timm):
            assert torch.equal(other.eval()(x), model(x))

    # The card's code, run as written on an image, gives what the model gives after timm's own transform.
    image = tmp_path / "image.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (41, 50, 3), dtype=np.uint8)).save(image)
    monkeypatch.chdir(tmp_path)
    ns: dict[str, Any] = {}
    exec(_code(card), ns)
    reference = eval_transform(model)(Image.open(image).convert("RGB"))[None]
    assert ns["pixel_values"].shape == (1, 3, 32, 32)
    assert np.abs(ns["pixel_values"] - reference.numpy()).max() <= 1e-6
    with torch.no_grad():
        assert np.abs(ns["logits"] - model.forward_dynamic(reference).logits.numpy()).max() <= 1e-4

    # A push without the flag takes the file down with its section: it would describe other weights.
    push(folder, hub_repo, token=HUB_TOKEN)
    assert set(hub.files(hub_repo)) == MODEL_FILES
    assert ONNX_HEADING not in hub.read_file(hub_repo, "README.md").decode()


def test_refusals_stop_the_push_before_anything_is_sent(hub, hub_repo, cascade, dge_folder, monkeypatch) -> None:
    requests = len(hub.requests)
    with pytest.raises(UserError) as refused:
        push(dge_folder, hub_repo, token=HUB_TOKEN, with_onnx=True)
    message = str(refused.value)
    assert message.startswith("dge models cannot be exported yet: its dynamic path has no traceable form") \
        and "\n" not in message
    assert message.endswith(REFUSED)
    assert len(hub.requests) == requests and not hub.store.exists(hub_repo)

    head = hub.seed(hub_repo, {"README.md": b"# an earlier version\n"})
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # the export extra is not installed
    with pytest.raises(UserError, match=re.escape('ONNX export needs onnxscript: pip install "vitconvert[export]"'
                                                  + REFUSED)):
        push(cascade[1], hub_repo, token=HUB_TOKEN, with_onnx=True)
    assert len(hub.requests) == requests and hub.store.resolve(hub_repo, "main") == head


def test_cli_push_with_onnx(hub, hub_repo, cascade, dge_folder, capsys) -> None:
    from vitconvert.cli import main

    main(["push", str(cascade[1]), "--repo-id", hub_repo, "--token", HUB_TOKEN, "--with-onnx"])
    printed = "".join(capsys.readouterr().out.split())
    assert f"pushedto{HUB_ENDPOINT}/{hub_repo}/commit/{hub.store.resolve(hub_repo, 'main')}" in printed
    assert set(hub.files(hub_repo)) == MODEL_FILES | {"model.onnx"}
    with pytest.raises(SystemExit) as exc:
        main(["push", str(dge_folder), "--repo-id", hub_repo + "-dge", "--token", HUB_TOKEN, "--with-onnx"])
    assert exc.value.code == 2
    err = capsys.readouterr()
    text = err.out + err.err
    assert len(text.strip().splitlines()) == 1 and "dge models cannot be exported yet" in text
    assert not hub.store.exists(hub_repo + "-dge")


# --- the card section (no server, no export) ---------------------------------------------------------------


def test_onnx_section_is_written_from_the_interface_and_replaced_not_repeated(cascade) -> None:
    _, folder, _ = cascade
    config = vitconvert.saving.read_config(folder)
    card = (folder / "README.md").read_text()
    section = onnx_section(config, {"eta": 0.25}, ["logits", "gmacs", "exit"], "me/cfvit")
    once = set_onnx_section(card, section)
    assert once.index("## How to load") < once.index(ONNX_HEADING) < once.index("## Recipe")
    assert set_onnx_section(once, section) == once  # a second push does not add a second section
    other = set_onnx_section(once, onnx_section(config, {"eta": 0.75}, ["logits", "gmacs", "exit"], "me/cfvit"))
    assert other.count(ONNX_HEADING) == 1 and "eta = 0.75" in other and "eta = 0.25" not in other
    assert set_onnx_section(once, None) == card
    code = _code(once)
    assert 'logits, gmacs, exits = session.run(None, {"pixel_values": pixel_values})  # the stored point: eta = 0.25' \
        in code
    assert '"eta": np.array(0.25, np.float32)' in code

    # No knob input (everything baked in), a squashing data config, no Recipe section to go before.
    config["pretrained_cfg"].update(crop_mode="squash", crop_pct=1.0, interpolation="bilinear")
    bare = set_onnx_section("# a hand-written card\n", onnx_section(config, {}, ["logits", "gmacs"]))
    assert bare.startswith("# a hand-written card\n\n" + ONNX_HEADING)
    code = _code(bare)
    assert 'hf_hub_download("OWNER/NAME", "model.onnx")' in code
    assert "image.resize((32, 32), Image.Resampling.BILINEAR)" in code
    assert 'logits, gmacs = session.run(None, {"pixel_values": pixel_values})\n' in code
    assert "Fixed in the graph: `eta = " in bare and "`alpha = 0.5`" in bare

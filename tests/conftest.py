"""Test-session setup: every Hub access goes to a loopback server, never to huggingface.co.

huggingface_hub reads ``HF_ENDPOINT`` (and its cache paths) once, when ``huggingface_hub.constants`` is
first imported, so the environment is fixed here, before any test module imports timm or vitconvert:

* ``HF_ENDPOINT=http://127.0.0.1:<port>`` with a port chosen now; the loopback Hub (tests/hub_server.py:
  olah for reads + a small upload handler for writes) is started on it lazily, by the ``hub`` fixture,
  only when a test needs it. Until then nothing listens there, so stray Hub requests fail at once.
* ``HF_HOME`` / ``HF_HUB_CACHE`` in a temporary folder (removed at exit); telemetry, xet and progress
  bars off; no token from the environment or a stored login (``HF_TOKEN`` etc. are removed), and
  ``HF_HUB_OFFLINE`` unset. Tests that push pass ``token=HUB_TOKEN`` ("hf_test_token") explicitly.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from hub_server import TOKEN, USER, LoopbackHub, free_port

HUB_TOKEN = TOKEN
HUB_USER = USER
HUB_TMP = Path(tempfile.mkdtemp(prefix="vitconvert-tests-hub-"))
HUB_PORT = free_port()
HUB_ENDPOINT = f"http://127.0.0.1:{HUB_PORT}"
HUB_ENV = {
    "HF_ENDPOINT": HUB_ENDPOINT,
    "HF_HOME": str(HUB_TMP / "hf-home"),
    "HF_HUB_CACHE": str(HUB_TMP / "hf-home" / "hub"),
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_XET": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}
_REMOVED = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_STORED_TOKENS_PATH", "HF_OIDC_RESOURCE",
            "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT",
            "HF_HUB_DISABLE_IMPLICIT_TOKEN", "HF_XET_CACHE")

if "huggingface_hub.constants" in sys.modules:  # pragma: no cover - a plugin imported it first
    raise RuntimeError("huggingface_hub was imported before tests/conftest.py; HF_ENDPOINT would be ignored. Run "
                       "the tests with `python -m pytest` without plugins that import huggingface_hub or timm")
os.environ.update(HUB_ENV)
for _key in _REMOVED:
    os.environ.pop(_key, None)
atexit.register(shutil.rmtree, HUB_TMP, True)

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models on a shared CPU: a second thread only spins waiting for a busy core (10x slower).

    Modules of many tiny-model runs use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def hub() -> Iterator[LoopbackHub]:
    """The loopback Hub at ``HF_ENDPOINT`` (started on first use, stopped at the end of the session).

    Pushes need ``token=HUB_TOKEN``; repositories live under ``tester/`` (the token's user) or ``testorg/``.
    ``hub.seed(repo_id, {path: bytes})`` writes a commit directly (for repos the client would refuse to
    push), ``hub.files(repo_id, revision)`` lists what the Hub holds.
    """
    import vitconvert.sources as sources

    server = LoopbackHub(HUB_TMP / "server", HUB_PORT).start()
    atexit.register(server.stop)  # also stops olah if the session dies without teardown
    # sources.hub_reachable caches "unreachable" per process; the server is reachable from now on.
    sources.hub_reachable.cache_clear()
    yield server
    server.stop()
    sources.hub_reachable.cache_clear()


_REPO_COUNTER = iter(range(1_000_000))


@pytest.fixture
def hub_repo(request: pytest.FixtureRequest, hub: LoopbackHub) -> str:
    """A fresh repository id under the test user's namespace (not created yet)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name).strip("-.")[:60]
    return f"{HUB_USER}/{name}-{next(_REPO_COUNTER)}"


@pytest.fixture
def hub_subprocess_env() -> dict[str, str]:
    """Environment for a child Python process that uses the loopback Hub like this session does."""
    env = {k: v for k, v in os.environ.items() if k not in _REMOVED}
    env.update(HUB_ENV)
    tests_dir = str(Path(__file__).resolve().parent)
    # This checkout's package, not another installed copy.
    import vitconvert

    package_root = str(Path(vitconvert.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([tests_dir, package_root, *filter(None, [env.get("PYTHONPATH")])])
    return env


@pytest.fixture(autouse=True)
def quick_speed_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Calibration times its chosen point against the base model for a second; tiny test models need far less to
    tell which runs faster, and timing precision is not what the tests check."""
    from vitconvert import calibration

    monkeypatch.setattr(calibration, "SPEED_CHECK_SECONDS", 0.05)

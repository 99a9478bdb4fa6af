"""The support matrix the README and docs show is the one the code gives now (tests/support_matrix.py applies every
method to every architecture's tiny model); every "no" is a one-line refusal, and every "yes" is a conformance case."""

from __future__ import annotations

import pytest
import support_matrix
from support_matrix import ARCHITECTURES, END, MATRIX, START, matrix, parse, render
from test_conformance import conformance_cases

from vitconvert.registry import METHODS

pytestmark = pytest.mark.usefixtures("one_thread")
README = support_matrix.ROOT / "README.md"


@pytest.fixture(scope="module")
def cells() -> dict[str, dict[str, str]]:
    return matrix()


def test_committed_matrix_is_what_the_code_does(cells: dict[str, dict[str, str]]) -> None:
    assert MATRIX.read_text(encoding="utf-8") == render(cells), \
        "docs/support-matrix.md is stale: run `python tests/support_matrix.py --write`"


def test_readme_shows_the_committed_matrix() -> None:
    readme = README.read_text(encoding="utf-8")
    shown = readme[readme.index(START):readme.index(END) + len(END)] + "\n"
    assert shown == MATRIX.read_text(encoding="utf-8")


def test_every_refusal_is_one_line_and_every_yes_is_a_conformance_case(cells: dict[str, dict[str, str]]) -> None:
    supported = parse(render(cells))
    assert set(supported) == {(m, a) for m in METHODS for a in ARCHITECTURES}
    for (method, arch), yes in supported.items():
        reason = cells[arch][method]
        assert "\n" not in reason and reason.startswith("yes" if yes else "no: "), (method, arch, reason)
    assert {pair for pair, yes in supported.items() if yes} == set(conformance_cases())

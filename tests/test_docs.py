"""The README and the documentation site stay short and linked: every relative link points to a file that
exists, every `#anchor` to a heading (or an API object) of its page, and every repository path or
`python -m` module named in code still exists.

`mkdocs build --strict` (CI) checks the site's own links too, but needs the docs extra and does not read
README.md; these checks need neither.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 160

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
EXPLICIT_ID = re.compile(r"\{[^}]*#([\w.-]+)[^}]*\}\s*$")
API_BLOCK = re.compile(r"^:::\s+([\w.]+)", re.MULTILINE)
SNIPPET = re.compile(r"^\s*--8<--\s+\"([^\"]+)\"", re.MULTILINE)
CODE_SPAN = re.compile(r"`([^`\n]+)`")
# A repository path written as code (`benchmarks/results/SUMMARY.md`); placeholders and globs (<name>, *, {a,b}) are
# not checked.
REPO_PATH = re.compile(r"^(?:\./)?((?:benchmarks|vitconvert|tests|docs|recipes|examples|\.ci)/[\w./-]*)$")
RUN_MODULE = re.compile(r"python -m ((?:benchmarks|vitconvert)(?:\.\w+)*)")
# Named by the documentation before they land: the conformance suite is being written in the same issue (24).
# Remove an entry once its file exists.
PENDING_PATHS: set[str] = set()


def doc_pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "_ext" not in p.relative_to(DOCS).parts)


def prose_lines(text: str, code_spans: bool = False) -> list[str]:
    """The lines of a Markdown text outside fenced code blocks, without inline code unless ``code_spans``."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line if code_spans else INLINE_CODE.sub("", line))
    return lines


def links(path: Path) -> list[str]:
    found = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        found += LINK.findall(line)
        if m := REFERENCE_DEFINITION.match(line):
            found.append(m.group(1))
    return found


def is_external(target: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target)) or target.startswith("//")


def slug_python_markdown(title: str) -> str:
    """Python-Markdown's toc slug (what mkdocs gives a heading)."""
    value = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode("ascii")
    value = re.sub(r"[^\w\s-]", "", value).strip().lower()
    return re.sub(r"[-\s]+", "-", value)


def slug_github(title: str) -> str:
    """GitHub's heading anchor (what README.md gets on the repository page)."""
    value = re.sub(r"[^\w\- ]", "", title.strip().lower())
    return value.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors a page offers: its headings (both slug styles) and explicit ``{#id}`` ids."""
    found: set[str] = set()
    for line in prose_lines(path.read_text(encoding="utf-8"), code_spans=True):
        if m := HEADING.match(line):
            title = m.group(2)
            if idm := EXPLICIT_ID.search(title):
                found.add(idm.group(1))
                title = EXPLICIT_ID.sub("", title)
            title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title).replace("`", "")  # a heading's text
            found |= {slug_python_markdown(title), slug_github(title)}
    return found


def api_objects(path: Path) -> list[str]:
    return API_BLOCK.findall(path.read_text(encoding="utf-8"))


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def check_link(page: Path, target: str) -> str | None:
    """None when ``target`` (a link in ``page``) resolves, else what is wrong."""
    if is_external(target):
        return None
    file_part, _, anchor = target.partition("#")
    dest = (page.parent / file_part).resolve() if file_part else page
    if not dest.exists():
        return f"{target}: {shown(dest)} does not exist"
    if not anchor or dest.suffix != ".md":
        return None
    if anchor in anchors(dest):
        return None
    if any(anchor == obj or anchor.startswith(obj + ".") for obj in api_objects(dest)):
        return None  # an object mkdocstrings documents on that page (mkdocs --strict checks it exactly)
    return f"{target}: no heading or API object #{anchor} in {shown(dest)}"


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; keep it at most {README_MAX_LINES}"


def test_readme_keeps_the_commands_ci_runs() -> None:
    """.ci/run runs the README's "Set up" and "Tests" commands: they must stay where CI's comments say."""
    text = README.read_text(encoding="utf-8")
    setup = text.split("\n## Set up\n", 1)[1].split("\n## ", 1)[0]
    tests = text.split("\n## Tests\n", 1)[1].split("\n## ", 1)[0]
    assert 'pip install -e ".[dev]"' in setup
    assert "ruff check ." in tests and "python -m pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    for command in ('pip install -e ".[dev]"', "ruff check .", "python -m pytest"):
        assert command in ci


@pytest.mark.parametrize("page", [README, *doc_pages()], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    problems = [p for target in links(page) if (p := check_link(page, target))]
    assert not problems, f"broken links in {page.relative_to(ROOT)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_snippets_exist(page: Path) -> None:
    missing = [s for s in SNIPPET.findall(page.read_text(encoding="utf-8")) if not (ROOT / s).is_file()]
    assert not missing, f"{page.relative_to(ROOT)} includes missing files: {missing}"


def stale_code_references(page: Path) -> list[str]:
    """Repository paths and ``python -m`` modules a page names in code spans that do not exist."""
    stale = []
    for span in CODE_SPAN.findall(page.read_text(encoding="utf-8")):
        m = REPO_PATH.match(span.strip())
        if m and m.group(1).rstrip("/") not in PENDING_PATHS and not (ROOT / m.group(1)).exists():
            stale.append(m.group(1))
        for module in RUN_MODULE.findall(span):
            base = ROOT.joinpath(*module.split("."))
            if not (base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()):
                stale.append(f"python -m {module}")
    return stale


@pytest.mark.parametrize("page", [README, *doc_pages()], ids=lambda p: str(p.relative_to(ROOT)))
def test_named_files_and_modules_exist(page: Path) -> None:
    """A file or ``python -m`` module the text names (moved benchmarks, renamed modules) still exists."""
    stale = stale_code_references(page)
    assert not stale, f"{page.relative_to(ROOT)} names what does not exist: {stale}"


def _nav_files(node: object) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [f for item in node for f in _nav_files(item)]
    if isinstance(node, dict):
        return [f for value in node.values() for f in _nav_files(value)]
    return []


def test_every_page_is_in_the_nav() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    nav = _nav_files(config["nav"])
    pages = {str(p.relative_to(DOCS)) for p in doc_pages()}
    assert not [f for f in nav if f not in pages], "nav entries without a page"
    assert not sorted(pages - set(nav)), "pages missing from the nav in mkdocs.yml"


def test_the_link_checker_finds_broken_links(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## A section\n\n[ok](#a-section) [bad](#nowhere) [gone](missing.md)\n"
                    "`[code](not-a-link.md)`\n\n```\n[fenced](not-a-link.md)\n```\n", encoding="utf-8")
    problems = [p for target in links(page) if (p := check_link(page, target))]
    assert len(problems) == 2, problems
    page.write_text("`benchmarks/results/SUMMARY.md` `benchmarks/gone.py` `python -m benchmarks.gone`\n"
                    "`vitconvert/methods/<name>.py` `python -m benchmarks`\n", encoding="utf-8")
    assert stale_code_references(page) == ["benchmarks/gone.py", "python -m benchmarks.gone"]

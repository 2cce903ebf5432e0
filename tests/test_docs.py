"""The docs against the code: generated pages as generated, links that resolve, the README's
command table and test command as the CLI and CI have them, and every path the docs name."""

import re
import shlex

import pytest

from orchestrator import cli, docgen
from tests.conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "bench").rglob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# A path under a folder of this repository, in prose or in a code block; a pattern (`*`, `{a,b}`,
# `<name>`) is not a path and does not match.
PATH = re.compile(r"(?<![\w./$-])((?:orchestrator|trainer|bench|cluster|configs|tests|docs)/[\w./-]*)(?=[\s`,;:)|]|$)")
# Raw output and the dated log name code as it was when they were written.
LIVING = [d for d in DOCS if not str(d.relative_to(ROOT)).startswith(("docs/bench-results/", "docs/benchmarks-log/"))]


def _rel(path):
    return str(path.relative_to(ROOT))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#+ (.*)$", text, flags=re.M)}


def _prose(path) -> str:
    """The text outside fenced code blocks (commands and output there are not links)."""
    return re.sub(r"```.*?```", "", path.read_text(), flags=re.S)


@pytest.mark.parametrize("page", docgen.PAGES)
def test_the_generated_reference_pages_are_as_the_code_makes_them(page):
    assert (ROOT / page).read_text() == docgen.PAGES[page](), (
        f"{page} is out of step with the code; run: python -m orchestrator.docgen")


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_every_relative_link_resolves(doc):
    broken = []
    for target in LINK.findall(_prose(doc)):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{_rel(doc)}: broken links: {broken}"


@pytest.mark.parametrize("doc", LIVING, ids=_rel)
def test_every_path_the_docs_name_exists(doc):
    named = {p.rstrip(".") for p in PATH.findall(doc.read_text())}
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"{_rel(doc)} names paths the repository does not have: {missing}"


def test_the_readme_command_table_lists_exactly_the_cli_commands():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Commands", 1)[1].split("\n\n", 2)[1]
    listed = re.findall(r"^\| `([a-z-]+)`", table, flags=re.M)
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.choices and "train" in a.choices).choices
    assert listed == list(commands)


def test_the_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci/run").read_text()
    commands = [line for line in ci.splitlines() if line.startswith("python3 -m ")]
    assert [shlex.split(c)[2] for c in commands] == ["pip", "pytest"]
    readme = (ROOT / "README.md").read_text()
    for command in commands:
        assert command in readme, f"README.md should show CI's command: {command}"


@pytest.mark.parametrize("page,most", [("README.md", 300), ("docs/BENCHMARKS.md", 400)])
def test_the_front_pages_stay_short(page, most):
    lines = len((ROOT / page).read_text().splitlines())
    assert lines <= most, f"{page} has {lines} lines; reference goes to docs/, history to docs/benchmarks-log/"

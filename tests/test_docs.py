"""The README and docs/: short README, the two commands first, links that resolve inside the
repository, and the integration examples run as written (slow)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]

_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...


def _prose(text: str) -> str:
    """The text outside code blocks and inline code, where a `[x](y)` is a link."""
    return _INLINE_CODE.sub("", _FENCE.sub("", text))


def _links(page: Path) -> list[str]:
    return _LINK.findall(_prose(page.read_text(encoding="utf-8")))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = _FENCE.sub("", page.read_text(encoding="utf-8"))
    return {_slug(m) for m in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M)}


def _relative(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def test_readme_is_at_most_300_lines():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= 300, f"README.md has {lines} lines; move detail into docs/"


def test_readme_first_code_block_holds_make_demo_and_make_test():
    first = _FENCE.search(README.read_text(encoding="utf-8"))
    assert first, "README.md has no code block"
    commands = [line.split("#")[0].strip() for line in first.group(0).splitlines()[1:-1]]
    assert "make demo" in commands and "make test" in commands, first.group(0)


@pytest.mark.parametrize("page", PAGES, ids=_relative)
def test_every_relative_link_resolves_inside_the_repository(page):
    problems = []
    for target in _links(page):
        if _EXTERNAL.match(target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if path.startswith("/") or not resolved.is_relative_to(ROOT):
            problems.append(f"{target}: outside the repository")
            continue
        name = _relative(resolved)
        if not resolved.exists():
            problems.append(f"{target}: no such file")
            continue
        if anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            problems.append(f"{target}: no heading #{anchor} in {name}")
    assert not problems, f"{_relative(page)}:\n" + "\n".join(problems)


def test_readme_links_every_docs_page():
    targets = [(ROOT / t.partition("#")[0]).resolve() for t in _links(README)
               if not _EXTERNAL.match(t) and t.partition("#")[0]]
    linked = {_relative(t) for t in targets if t.is_relative_to(ROOT)}
    unlinked = [_relative(p) for p in DOCS.glob("*.md") if _relative(p) not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


@pytest.mark.parametrize("text, links", [
    ("see [a](docs/a.md) and ![p](x.png)", ["docs/a.md", "x.png"]),
    ("`[not](a link)` then [yes](b.md#part)", ["b.md#part"]),
    ("```\n[not](in/code.md)\n```\n[t](u.md \"title\")", ["u.md"]),
])
def test_link_parser(text, links):
    assert _LINK.findall(_prose(text)) == links


def test_slug_matches_github_anchors():
    assert _slug("GPU benchmarks") == "gpu-benchmarks"
    assert _slug("The C++ extension (`cpp`)") == "the-c-extension-cpp"
    assert _slug("How λ is chosen") == "how-λ-is-chosen"


def _python_examples(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), re.S | re.M)


_EXAMPLES = {f"integrations-{i}": code for i, code in enumerate(_python_examples(DOCS / "integrations.md"))}
_EXAMPLES.update({f"readme-{i}": code for i, code in enumerate(_python_examples(README))
                  if "init_process_group" in code})


@pytest.mark.slow
@pytest.mark.parametrize("code", list(_EXAMPLES.values()), ids=list(_EXAMPLES))
def test_integration_examples_run(code, tmp_path):
    """Every Python example of docs/integrations.md, and the README's distributed ones, runs as
    written (under torchrun at 2 ranks when it initialises a process group)."""
    for library in ("avalanche", "lightning"):
        if f"from {library}" in code or f"import {library}" in code:
            pytest.importorskip(library)
    script = tmp_path / "example.py"
    script.write_text(code, encoding="utf-8")
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2"] if "init_process_group" in code else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, *launcher, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]

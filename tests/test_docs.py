"""The documentation: README.md and docs/*.md.

Every relative link resolves (file, and heading anchor when given), every ```python block
runs in a fresh namespace, the tutorial's torchrun script gives the same metrics on two
processes as on one, and nothing points outside the repository for the theory.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _without_code(text: str) -> str:
    """The text with fenced blocks and inline code removed (no links or headings there)."""
    text = FENCE.sub("", text)
    return re.sub(r"`[^`\n]*`", "", text)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces -> hyphens."""
    text = heading.strip().replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links():
    for doc in DOCS:
        for target in LINK.findall(_without_code(doc.read_text(encoding="utf-8"))):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            yield pytest.param(doc, target, id=f"{_rel(doc)}->{target}")


def _python_blocks():
    for doc in DOCS:
        blocks = [body for lang, body in FENCE.findall(doc.read_text(encoding="utf-8")) if lang == "python"]
        for i, body in enumerate(blocks):
            yield pytest.param(body, id=f"{_rel(doc)}#{i}")


def test_docs_exist():
    names = {p.name for p in DOCS}
    assert {"README.md", "theory.md", "metrics.md", "tutorial.md", "run-folders.md"} <= names


@pytest.mark.parametrize("doc, target", list(_links()))
def test_relative_link_resolves(doc, target):
    path, _, anchor = target.partition("#")
    dest = (doc.parent / path).resolve() if path else doc
    assert dest.exists(), f"{_rel(doc)}: link to {target} leads nowhere"
    assert dest.is_relative_to(ROOT), f"{_rel(doc)}: link to {target} leaves the repository"
    if anchor:
        assert dest.suffix == ".md", f"{_rel(doc)}: anchor on a non-markdown file {target}"
        assert anchor in _anchors(dest), f"{_rel(doc)}: no heading #{anchor} in {_rel(dest)}"


@pytest.mark.parametrize("code", list(_python_blocks()))
def test_python_block_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        exec(compile(code, "<doc block>", "exec"), {"__name__": "__main__"})
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def test_readme_quick_start_is_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1]
    lang, body = FENCE.search(section).groups()
    assert lang == "bash"
    assert body.splitlines() == ['pip install torch==2.13.0 -e . && nclab reproduce',
                                 'pip install torch==2.13.0 -e ".[test]" && pytest']


def test_no_reference_outside_the_repository():
    """The theory lives in docs/, not in a file beside the checkout."""
    banned = ["THEORY" + ".md", "THEORY" + " §", "../" + "shared", "/work/" + "shared"]
    roots = [ROOT / "src", ROOT / "tests", ROOT / "benchmarks", ROOT / "docs", ROOT / "README.md"]
    found = []
    for root in roots:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for p in files:
            if p.suffix not in (".py", ".md", ".toml", ".sh", ".txt", ".cfg") or p == Path(__file__).resolve():
                continue
            text = p.read_text(encoding="utf-8", errors="replace")
            found += [f"{_rel(p)}: {b}" for b in banned if b in text]
    assert not found


def test_tutorial_torchrun_script_agrees_across_processes(tmp_path):
    text = (ROOT / "docs" / "tutorial.md").read_text(encoding="utf-8")
    [script] = [body for lang, body in FENCE.findall(text) if lang == "python" and "init_process_group" in body]
    path = tmp_path / "collapse_ddp.py"
    path.write_text(script, encoding="utf-8")

    def run(*launcher):
        out = subprocess.run([sys.executable, *launcher, str(path)], cwd=tmp_path, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        # two processes share the pipe: a line's text and its newline may be split by the other's
        return re.findall(r"rank (\d)/(\d): NC1 = ([0-9.e+-]+)", out.stdout)

    single = run()
    double = run("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
    assert [(r, w) for r, w, _ in single] == [("0", "1")]
    assert sorted((r, w) for r, w, _ in double) == [("0", "2"), ("1", "2")]
    assert {v for _, _, v in double} == {single[0][2]}

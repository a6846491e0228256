"""The documentation site (mkdocs.yml, docs/): it builds with ``mkdocs build --strict`` (any warning fails: broken
links, pages missing from the nav, docstrings mkdocstrings cannot read), every job of the command line has a page
whose option table the build reads from the CLI itself (scripts/mkdocs_cli_options.py), and every python / bash
block of docs/*.md runs, as tests/test_readme.py runs the README's (its parser is reused): python blocks in a fresh
namespace with the page's own line numbers, ``longtail`` lines of bash blocks through the CLI app in-process.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from test_readme import LANGUAGES, Block, command_of, fenced_blocks, logical_lines

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
# Bash lines of the docs that are not run, and why (each must still occur in a block)
SKIPPED: dict[str, str] = {}


def load_hook():
    spec = importlib.util.spec_from_file_location("mkdocs_cli_options", ROOT / "scripts" / "mkdocs_cli_options.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def blocks() -> list[tuple[Path, Block]]:
    return [(page, block) for page in PAGES for block in fenced_blocks(page.read_text(encoding="utf-8"))]


RUNNABLE = [(page, b) for page, b in blocks() if b.lang in LANGUAGES]


def block_id(page: Path, block: Block) -> str:
    return f"{page.relative_to(DOCS)}:{block.id}"


# --- the build ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert not re.search(r"^\s*(WARNING|ERROR)\b", log, re.M), log[-4000:]
    return out


def text_of(site: Path, page: str) -> str:
    html = (site / page / "index.html").read_text(encoding="utf-8")
    return re.sub(r"<[^>]+>", " ", html)


def test_the_site_builds_strictly_with_every_part(site):
    # the option tables come from the CLI: an option of generate, with its help text
    generate = text_of(site, "jobs/generate")
    assert "--weight" in generate and "guidance weight (0: unguided)" in generate
    assert "<!-- cli:" not in (site / "jobs" / "generate" / "index.html").read_text(encoding="utf-8")
    # the API reference is generated from the docstrings
    signals = text_of(site, "reference/signals")
    assert "get_signal" in signals and "Look a signal up by name" in signals
    assert "LongtailGuide" in text_of(site, "reference/guidance")
    # the method's equations go to MathJax (pymdownx.arithmatex)
    method = (site / "method" / "index.html").read_text(encoding="utf-8")
    assert method.count('class="arithmatex"') >= 5 and r"\hat\epsilon" in method
    for image in ("img/tensorboard_scalars.png", "img/gallery_coat_by_signal.png", "js/mathjax.js"):
        assert (site / image).is_file(), image


def test_every_command_has_a_page():
    hook = load_hook()
    documented = {m.group(1): page.name for page in PAGES
                  for m in hook.MARKER.finditer(page.read_text(encoding="utf-8"))}
    assert sorted(documented) == sorted(hook.commands())


def test_the_option_tables_escape_what_markdown_would_read_as_html():
    hook = load_hook()
    assert hook.escape("timm:<name> | `a <b>`") == r"timm:&lt;name&gt; \| `a <b>`"
    table = hook.render("heads overhead")
    assert table.startswith("`longtail heads overhead [OPTIONS]`")
    assert ("| `--arch` | `vit_b_16` | torchvision name (vit_b_16, resnet50 ...), timm:&lt;name&gt; or "
            "hf:&lt;dir&gt; |") in table
    assert "| `--time` / `--no-time` | `--time` |" in table
    with pytest.raises(ValueError, match="no command 'nonsense'"):
        hook.render("nonsense")


# --- the blocks ---------------------------------------------------------------------------------------------


def run_python(page: Path, block: Block) -> dict:
    code = "\n" * block.line + block.code
    namespace: dict = {"__name__": "__docs__"}
    exec(compile(code, str(page), "exec"), namespace)
    return namespace


def run_bash(page: Path, block: Block, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Run each ``longtail`` line of the block through the CLI app in this process (``typer.testing``: the test
    process has torch loaded already, which keeps the docs' budget), in ``cwd``; a line that is not a plain
    ``longtail`` command (pipes, redirections, variables) must be in ``SKIPPED``."""
    from typer.testing import CliRunner

    from longtail.cli import app

    monkeypatch.chdir(cwd)
    done = []
    for number, line in logical_lines(block):
        command = command_of(line)
        where = f"{page.relative_to(ROOT)}:{number}"
        if command in SKIPPED:
            done.append(f"skipped {command}: {SKIPPED[command]}")
            continue
        assert command.startswith("longtail ") and not re.search(r"[|<>;&$`]", command), (
            f"{where}: no runner for {line!r}: make it a plain `longtail ...` line or add it to SKIPPED")
        result = CliRunner().invoke(app, shlex.split(command)[1:])
        assert result.exit_code == 0, (f"{where}: exit {result.exit_code} from\n{line}\noutput:\n"
                                       f"{result.output[-3000:]}\n{result.exception!r}")
        done.append(f"ran {line}: {result.output.strip().splitlines()[-1]}")
    return done


@pytest.mark.parametrize(("page", "block"), RUNNABLE, ids=[block_id(p, b) for p, b in RUNNABLE])
def test_doc_block(page, block, tmp_path, monkeypatch):
    if LANGUAGES[block.lang] == "python":
        monkeypatch.chdir(tmp_path)
        run_python(page, block)
    else:
        assert run_bash(page, block, tmp_path, monkeypatch)


def test_the_docs_have_their_blocks_and_only_runnable_ones():
    kinds = [LANGUAGES[b.lang] for _, b in RUNNABLE]
    assert kinds.count("python") >= 4 and kinds.count("bash") >= 2, [block_id(p, b) for p, b in RUNNABLE]
    unknown = [block_id(p, b) for p, b in blocks() if b.lang and b.lang not in LANGUAGES]
    assert unknown == [], f"fenced blocks in a language this file does not run: {unknown}"
    looks_like_code = re.compile(r"(\$ |longtail |make |python |pip |import |from \w[\w.]* import )")
    unlabelled = [block_id(p, b) for p, b in blocks() if not b.lang and looks_like_code.match(b.code.lstrip())]
    assert unlabelled == [], f"unlabelled fences that open like code: {unlabelled}"
    commands = {command_of(line) for _, b in RUNNABLE if b.lang != "python" for _, line in logical_lines(b)}
    assert sorted(set(SKIPPED) - commands) == []


def test_a_broken_block_fails(tmp_path, monkeypatch):
    page = DOCS / "quickstart.md"
    with pytest.raises(ImportError, match="no_such_name"):
        run_python(page, Block(3, "python", "from longtail.signals import no_such_name\n"))
    with pytest.raises(AssertionError, match=r"docs/quickstart.md:4: exit 2"):
        run_bash(page, Block(3, "bash", "longtail no-such-command\n"), tmp_path, monkeypatch)
    with pytest.raises(AssertionError, match="no runner"):
        run_bash(page, Block(3, "bash", "rm -rf data\n"), tmp_path, monkeypatch)
    with pytest.raises(AssertionError, match="no runner"):
        run_bash(page, Block(3, "bash", "longtail --version > out.txt\n"), tmp_path, monkeypatch)

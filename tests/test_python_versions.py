"""The source runs on the oldest Python that pyproject.toml declares (3.10), checked statically on whatever
interpreter runs the suite: vermin (PyPI) for the standard library's modules, functions and arguments and for
syntax, with annotations evaluated as typer evaluates them; and Python's own parser held to the 3.10 grammar
(``ast.parse(feature_version=(3, 10))``), which also rejects syntax newer than the running interpreter, where vermin
only says it could not parse a file. The interpreters themselves (3.10, 3.12, 3.13) are not run here.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MINIMUM = (3, 10)
CHECKED = ["src/longtail", "tests", "scripts", "benchmarks"]
# vermin reads any `.long` attribute as Python 2's builtin `long` (here always `torch.long` / `Tensor.long()`)
EXCLUDE = ["long"]


def vermin(*paths: str | Path) -> subprocess.CompletedProcess:
    import importlib.util

    assert importlib.util.find_spec("vermin"), "vermin is missing: it is in the dev extra (pip install -e '.[dev]')"
    args = [f"-t={MINIMUM[0]}.{MINIMUM[1]}-", "--no-tips", "--violations", "--eval-annotations",
            *(f"--exclude={name}" for name in EXCLUDE), *map(str, paths)]
    return subprocess.run([sys.executable, "-c", "import sys; from vermin.main import main; sys.exit(main())",
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def verdict(done: subprocess.CompletedProcess) -> list[str]:
    """What is wrong in vermin's output: each violation and any file it could not parse (empty when clean)."""
    lines = done.stdout.splitlines()
    problems = [line for line in lines if "requires" in line or "error:" in line or "not met" in line]
    if done.returncode != 0 and not problems:
        problems.append(f"vermin exited {done.returncode}: {done.stdout[-2000:]} {done.stderr[-2000:]}")
    return problems


def test_the_source_needs_nothing_newer_than_3_10():
    done = vermin(*CHECKED)
    assert done.returncode == 0 and verdict(done) == [], "\n".join(verdict(done))
    assert f"Minimum required versions: {MINIMUM[0]}.{MINIMUM[1]}" in done.stdout, done.stdout


def test_every_file_parses_with_the_3_10_grammar():
    bad = []
    for folder in CHECKED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            try:
                ast.parse(path.read_text(encoding="utf-8"), str(path), feature_version=MINIMUM)
            except SyntaxError as err:
                bad.append(f"{path.relative_to(ROOT)}:{err.lineno}: {err.msg}")
    assert bad == []


@pytest.mark.parametrize(("code", "what"), [
    ("import tomllib\n", "'tomllib' module requires !2, 3.11"),
    ("from typing import Self\n", "'typing.Self' member requires !2, 3.11"),
    ("import datetime\nx = datetime.UTC\n", "'datetime.UTC' member requires !2, 3.11"),
    ("try:\n    pass\nexcept* ValueError:\n    pass\n", "`except*` requires !2, 3.11"),
    ("import torch\nx = torch.zeros(2).long()\n", None),
])
def test_the_checks_catch_newer_python(code, what, tmp_path):
    """Each check fails on code that needs 3.11 (so the tests above can fail); ``.long()`` passes."""
    path = tmp_path / "newer.py"
    path.write_text(code)
    done = vermin(path)
    if what is None:
        assert done.returncode == 0 and verdict(done) == [], done.stdout
        return
    assert done.returncode == 1 and any(what in line for line in verdict(done)), done.stdout
    if "except*" in code:
        with pytest.raises(SyntaxError, match=r"only supported in Python 3\.11"):
            ast.parse(code, feature_version=MINIMUM)


def test_syntax_newer_than_the_interpreter_is_caught():
    """Vermin on 3.11 cannot parse 3.12 syntax and says so without failing; the grammar check fails it."""
    code = "def first[T](items: list[T]) -> T:\n    return items[0]\n"
    with pytest.raises(SyntaxError):
        ast.parse(code, feature_version=MINIMUM)

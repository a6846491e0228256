"""MkDocs hook (``hooks:`` in mkdocs.yml): ``<!-- cli: generate -->`` in a docs page becomes that command's usage
line, its own help text and a table of its arguments and options, read from ``longtail.cli`` (typer) when the site
is built -- so a job page cannot fall behind the command line. An unknown command fails the build.
"""

from __future__ import annotations

import functools
import re
from typing import Any

MARKER = re.compile(r"<!-- cli: ([a-z][a-z -]*?) -->")


@functools.cache
def commands() -> dict[str, Any]:
    """{'generate': command, 'heads train': command, ...}: every leaf command of the ``longtail`` app."""
    import typer.main

    from longtail.cli import app

    found: dict[str, Any] = {}

    def walk(cmd: Any, path: list[str]) -> None:
        if hasattr(cmd, "list_commands"):
            ctx = cmd.context_class(cmd)
            for name in cmd.list_commands(ctx):
                walk(cmd.get_command(ctx, name), [*path, name])
        else:
            found[" ".join(path)] = cmd

    walk(typer.main.get_command(app), [])
    return found


def escape(text: str) -> str:
    """Markdown-safe text: ``<`` ``>`` ``|`` escaped outside backtick spans (``timm:<name>`` is not HTML)."""
    parts = re.split(r"(`[^`]*`)", text)
    safe = [p if p.startswith("`") else p.replace("<", "&lt;").replace(">", "&gt;") for p in parts]
    return " ".join("".join(safe).split()).replace("|", "\\|")


def default_of(param: Any) -> str:
    default = param.default
    if default in (None, (), []) or callable(default) or param.show_default is False:
        return ""
    if param.is_flag and not param.secondary_opts and default is False:
        return ""
    if param.secondary_opts:  # --progress / --no-progress
        return param.opts[0] if default else param.secondary_opts[0]
    return str(default)


def render(name: str) -> str:
    cmds = commands()
    if name not in cmds:
        raise ValueError(f"<!-- cli: {name} -->: longtail has no command {name!r}; it has {sorted(cmds)}")
    cmd = cmds[name]
    arguments = [p for p in cmd.params if p.param_type_name == "argument"]
    usage = " ".join(["longtail", name, "[OPTIONS]", *(p.name.upper() for p in arguments)])
    lines = [f"`{usage}`", "", escape(cmd.help or ""), "", "| argument / option | default | what it is |",
             "| --- | --- | --- |"]
    for param in cmd.params:
        if param.param_type_name == "argument":
            lines.append(f"| `{param.name.upper()}` | required | {escape(getattr(param, 'help', '') or '')} |")
            continue
        names = " / ".join(f"`{opt}`" for opt in [*param.opts, *param.secondary_opts])
        default = default_of(param)
        shown = "required" if param.required else (f"`{default}`" if default else "")
        lines.append(f"| {names} | {shown} | {escape(param.help or '')} |")
    return "\n".join(lines) + "\n"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any, **kwargs: Any) -> str:
    return MARKER.sub(lambda m: render(m.group(1)), markdown)

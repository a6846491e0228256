"""Per-class generation prompts: a template (``"a photo of a {}"``) or a prompt file, cycled per image.

``prompt_table`` gives every class its prompts (the prompt file's entries, else the template);
``job_prompts`` turns that table into the ``prompts(class, index)`` function ``longtail.generate.plan_jobs``
takes; ``read_prompt_file`` reads JSON ``{class: prompt | [prompts]}`` or ``class<TAB>prompt`` lines.
(Prompts *refined* from mined keywords live in ``longtail.introspection.prompts``.)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path


def read_prompt_file(path: str | Path) -> dict[str, list[str]]:
    """Per-class prompts: JSON ``{class: prompt | [prompts]}`` or lines ``class<TAB>prompt`` (repeatable).

    In the text form, blank lines and lines starting with ``#`` are skipped. Raises ``FileNotFoundError`` for a
    missing file and ``ValueError`` naming the file (and line) for a malformed one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompt file at {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object {{class: prompt or [prompts]}}")
        table = {str(k): [v] if isinstance(v, str) else list(v) for k, v in data.items()}
        bad = [k for k, v in table.items() if not v or not all(isinstance(p, str) for p in v)]
        if bad:
            raise ValueError(f"{path}: classes {bad} need a prompt string or a non-empty list of strings")
        return table
    table: dict[str, list[str]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if "\t" not in line:
            raise ValueError(f"{path}:{number}: expected 'class<TAB>prompt', got {line!r}")
        name, prompt = (s.strip() for s in line.split("\t", 1))
        table.setdefault(name, []).append(prompt)
    return table


def _fill(template: str, name: str) -> str:
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return template.format(name, name=name, a=article)


def prompt_table(
    class_names: Sequence[str], template: str = "a photo of a {}", prompt_file: str | Path | None = None
) -> list[list[str]]:
    """All prompts of each class: the prompt file's entries, else the template.

    ``template`` takes the class name as ``{}`` or ``{name}``, and ``{a}`` becomes "a" or "an".
    A prompt file naming a class outside ``class_names`` is an error (a typo would silently fall back).
    """
    table = read_prompt_file(prompt_file) if prompt_file is not None else {}
    unknown = sorted(set(table) - set(class_names))
    if unknown:
        raise ValueError(f"prompt file {prompt_file} names classes that are not in the class list: {unknown}")
    return [table.get(name) or [_fill(template, name)] for name in class_names]


def class_prompts(
    class_names: Sequence[str], template: str = "a photo of a {}", prompt_file: str | Path | None = None
) -> list[str]:
    """One prompt per class ("a photo of a {}" by default); with a prompt file, each class's first prompt."""
    return [prompts[0] for prompts in prompt_table(class_names, template, prompt_file)]


def job_prompts(table: Sequence[Sequence[str]]) -> Callable[[int, int], str]:
    """``prompts(class, index)`` for ``longtail.generate.plan_jobs``: cycles through each class's prompts."""
    return lambda c, i: table[c][i % len(table[c])]

"""Refined prompts: turn (caption, longtail keywords) pairs into text prompts for the generator.

Two backends (paper section 4.3 / A.2, METHOD.md section 5 step 4):

* ``"template"``: ``"a photo of a coat that is dark and tilted left"``, the form the embedded generator was
  trained on (``caption_variants`` in :mod:`longtail.models.tiny`); no model needed.
* an LLM behind a ``messages -> reply`` function (see :func:`longtail.introspection.http.make_chat_fn`),
  asked with the paper's instruction for one sentence "A photo of <class> that ...".

Every LLM reply is checked by :func:`validate_prompt`; a failed request or an invalid reply falls back to the
template and the error is recorded, so one bad reply never stops a run.

Told the generator's token limit (``max_tokens``, with its tokenizer's ``count_tokens``), the template keeps
within it by dropping its last keywords, and an LLM reply over it counts as invalid: the text encoder would
otherwise cut the prompt silently (``LatentDiffusion.prompt_seen``).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from longtail.introspection.captioners import with_article
from longtail.introspection.http import ChatFn
from longtail.introspection.keywords import KeywordPair

# Paper, Supplement A.2: "<VLM description of the image> The following keywords describe the key features of
# the description above: <Keyword 1>, <Keyword 2> ... Use a complete sentence to summarize the key features.
# The sentence should start with: A photo of <Class> that...". The last line is ours: it asks for the
# sentence alone, so replies need no parsing.
LLM_INSTRUCTION = (
    "{caption}\n"
    "The following keywords describe the key features of the description above: {keywords}. "
    "Use a complete sentence to summarize the key features. "
    "The sentence should start with: {start}\n"
    "Reply with that one sentence only."
)
MAX_WORDS = 40
MAX_PHRASE_WORDS = 6  # a caption clause this short is used whole in template prompts ("tilted left")
QUOTES = "\"'`“”‘’«»"


class PromptError(ValueError):
    """A prompt that does not have the required form."""


@dataclass(frozen=True)
class RefinedPrompt:
    """One refined prompt: the ``prompt`` (None when the LLM failed without fallback), the ``backend`` that
    produced it ("template" or "llm"), the pair's keywords and caption, and the LLM ``error`` if any."""

    prompt: str | None
    backend: str
    keywords: tuple[str, ...]
    caption: str
    error: str | None = None


def class_phrase(class_name: str) -> str:
    """``"a photo of a coat"``, ``"a photo of an ankle boot"``."""
    return f"a photo of {with_article(class_name.strip())}"


def join_phrases(phrases: Sequence[str]) -> str:
    """``["dark"]`` -> ``"dark"``; ``["dark", "tall", "tilted left"]`` -> ``"dark, tall and tilted left"``."""
    items = [p.strip() for p in phrases if p.strip()]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def estimate_tokens(text: str) -> int:
    """A tokenizer-free token count: words and punctuation marks, plus a start and an end token. Word-piece
    and BPE tokenizers split rare words further, so pass the generator's own counter where it exists."""
    return len(re.findall(r"\w+|[^\w\s]", text)) + 2


def template_prompt(
    class_name: str,
    keywords: Sequence[str],
    max_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> str:
    """``"a photo of a <class> that is <kw1>, <kw2> and <kw3>"`` (just the class phrase without keywords).

    With ``max_tokens`` the last keywords are dropped until the prompt has at most that many tokens, counted
    by ``count_tokens`` (e.g. ``LatentDiffusion.count_tokens``; default :func:`estimate_tokens`). The class
    phrase itself is always kept.
    """
    keywords = [k for k in keywords if k.strip()]
    while True:
        described = join_phrases(keywords)
        prompt = f"{class_phrase(class_name)} that is {described}" if described else class_phrase(class_name)
        if max_tokens is None or not keywords or (count_tokens or estimate_tokens)(prompt) <= max_tokens:
            return prompt
        keywords = keywords[:-1]


def _usable(clause: str, max_words: int) -> bool:
    """A caption clause short enough to stand for its keyword (and not the "a photo of" head)."""
    return len(clause.split()) <= max_words and not clause.lower().startswith("a photo of")


def keyword_phrases(pair: KeywordPair, max_phrase_words: int = MAX_PHRASE_WORDS) -> list[str]:
    """The keywords of a pair widened to their short caption clauses, in caption order, without repeats.

    Captions of the attribute captioner are comma-separated phrases ("a photo of a coat, dark, tilted
    left"), so keywords "left", "dark" give ``["dark", "tilted left"]``. A keyword whose clause is longer
    than ``max_phrase_words`` words (or is the "a photo of" head) stays a single word.
    """
    clauses = [c.strip() for c in re.split(r"[,;.\n]", pair.caption)]
    found: dict[str, int] = {}  # phrase -> position
    for kw in pair.words:
        pattern = re.compile(rf"(?<![\w-]){re.escape(kw)}(?![\w-])", re.IGNORECASE)
        phrase, position = kw, len(clauses)
        for i, clause in enumerate(clauses):
            if pattern.search(clause):
                phrase, position = (clause.lower() if _usable(clause, max_phrase_words) else kw), i
                break
        found.setdefault(phrase, position)
    return sorted(found, key=lambda p: (found[p], pair.caption.lower().find(p)))


def llm_instruction(pair: KeywordPair, class_name: str, instruction: str = LLM_INSTRUCTION) -> str:
    """The paper's instruction for one pair; the start is ``"A photo of a/an <class> that..."``."""
    start = class_phrase(class_name)
    return instruction.format(
        caption=pair.caption.strip(),
        keywords=", ".join(pair.words),
        start=start[0].upper() + start[1:] + " that...",
        class_name=class_name,
    )


def validate_prompt(
    prompt: str,
    class_name: str,
    max_words: int = MAX_WORDS,
    max_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> str:
    """Check and normalise a prompt; returns it as ``"a photo of a/an <class> ..."``.

    Quotes, surrounding whitespace and trailing periods are stripped and inner whitespace collapsed. The text
    must be one line, start with "a photo of" + an optional article + the class name (any case), and have
    at most ``max_words`` words (and, with ``max_tokens``, at most that many tokens by ``count_tokens``,
    default :func:`estimate_tokens`). The head is rewritten to :func:`class_phrase`. Raises :class:`PromptError`.
    """
    text = prompt.strip().strip(QUOTES).strip()
    if not text:
        raise PromptError("empty prompt")
    if "\n" in text or "\r" in text:
        raise PromptError(f"prompt spans several lines: {text[:80]!r}")
    text = re.sub(r"\s+", " ", text).rstrip(" .").strip(QUOTES).strip()
    name = r"\s+".join(re.escape(w) for w in class_name.split())
    head = re.match(rf"a\s+photo\s+of\s+(?:(?:a|an|the)\s+)?{name}(?![\w-])", text, re.IGNORECASE)
    if head is None:
        raise PromptError(f"prompt must start with {class_phrase(class_name)!r}: {text[:80]!r}")
    n_words = len(text.split())
    if n_words > max_words:
        raise PromptError(f"prompt has {n_words} words, more than {max_words}: {text[:80]!r}...")
    out = class_phrase(class_name) + text[head.end() :]
    if max_tokens is not None:
        n_tokens = (count_tokens or estimate_tokens)(out)
        if n_tokens > max_tokens:
            raise PromptError(f"prompt has {n_tokens} tokens, more than the generator's limit of {max_tokens}: "
                              f"{text[:80]!r}")
    return out


def extract_sentence(reply: str) -> str:
    """The line of an LLM reply that holds "a photo of", from that phrase on (the whole reply if none)."""
    for line in reply.strip().splitlines():
        at = line.lower().find("a photo of")
        if at >= 0:
            return line[at:]
    return reply


def llm_prompt(
    pair: KeywordPair,
    class_name: str,
    chat_fn: ChatFn,
    max_words: int = MAX_WORDS,
    instruction: str = LLM_INSTRUCTION,
    max_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> str:
    """Ask the LLM for one refined prompt for ``pair`` and validate it. Raises ChatError / PromptError."""
    messages = [{"role": "user", "content": llm_instruction(pair, class_name, instruction)}]
    return validate_prompt(extract_sentence(chat_fn(messages)), class_name, max_words, max_tokens, count_tokens)


def refine_prompts(
    pairs: Sequence[KeywordPair],
    class_name: str,
    backend: Literal["template"] | ChatFn = "template",
    fallback_to_template: bool = True,
    max_words: int = MAX_WORDS,
    instruction: str = LLM_INSTRUCTION,
    max_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> list[RefinedPrompt]:
    """One :class:`RefinedPrompt` per pair, in order.

    With an LLM backend, any failure of a pair (request error, invalid reply, exception of ``chat_fn``) is
    recorded in ``error``; the pair then gets the template prompt (``fallback_to_template``) or None.
    ``max_tokens`` (the generator's limit, tokens counted by ``count_tokens``) keeps template prompts within
    it and makes a longer LLM reply invalid.
    """
    if isinstance(backend, str) and backend != "template":
        raise ValueError(f"backend must be 'template' or a chat function, got {backend!r}")
    out = []
    for pair in pairs:
        template = template_prompt(class_name, keyword_phrases(pair), max_tokens, count_tokens)
        keywords = tuple(pair.words)
        if not callable(backend):
            out.append(RefinedPrompt(template, "template", keywords, pair.caption))
            continue
        try:
            prompt = llm_prompt(pair, class_name, backend, max_words, instruction, max_tokens, count_tokens)
        except Exception as err:  # one bad reply must not end the run; the error is kept
            error = f"{type(err).__name__}: {err}"
            fallback = template if fallback_to_template else None
            out.append(
                RefinedPrompt(fallback, "template" if fallback else "llm", keywords, pair.caption, error)
            )
        else:
            out.append(RefinedPrompt(prompt, "llm", keywords, pair.caption))
    return out


def prompt_texts(refined: Sequence[RefinedPrompt], unique: bool = False) -> list[str]:
    """The prompts that exist, in order (first occurrences only when ``unique``)."""
    texts = [r.prompt for r in refined if r.prompt]
    return list(dict.fromkeys(texts)) if unique else texts


# ---------------------------------------------------------------------------------------------------------
# Files


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates owner-only files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_prompts(path: str | Path, prompts_by_class: Mapping[str, Sequence[str]]) -> Path:
    """Write ``{class: [prompt, ...]}`` as JSON, atomically (temporary file + rename)."""
    data = {str(c): [str(p) for p in ps] for c, ps in prompts_by_class.items()}
    return write_text_atomic(Path(path), json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def load_prompts(path: str | Path) -> dict[str, list[str]]:
    """Read a file written by :func:`save_prompts`; raises ``ValueError`` when it is not ``{str: [str]}``."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    ok = isinstance(data, dict) and all(
        isinstance(ps, list) and all(isinstance(p, str) for p in ps) for ps in data.values()
    )
    if not ok:
        raise ValueError(f"{path}: expected a JSON object {{class: [prompt, ...]}}")
    return data

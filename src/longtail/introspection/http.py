"""OpenAI-compatible chat completions through the ``openai`` client.

Works with hosted APIs and local servers that speak the same schema (vLLM, Ollama's ``/v1``, llama.cpp's
server). The client owns the transport: timeouts, retries of connection errors, 408/409/429 and 5xx with
exponential backoff and ``Retry-After``. :func:`chat` raises :class:`ChatError` on any failure;
:func:`try_chat` returns a :class:`ChatResult` instead, so a long run can record a failed request and go on.

The API key comes only from the environment variable ``api_key_env`` (read at call time); it is scrubbed
from every error message.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import openai
from openai._constants import INITIAL_RETRY_DELAY  # pinned by tests/test_vlm.py's backoff test

Message = Mapping[str, Any]
ChatFn = Callable[[list[dict[str, Any]]], str]  # messages -> reply text

DEFAULT_TIMEOUT = 60.0
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF = 1.0  # seconds before the first retry; doubled each retry (capped, jittered by the client)
BODY_EXCERPT = 300  # characters of a server's error body quoted in a ChatError
SUFFIX = "/chat/completions"


class ChatError(RuntimeError):
    """A chat request failed: ``url`` (the endpoint), ``status`` (HTTP status or None) and ``reason``."""

    def __init__(self, url: str, reason: str, status: int | None = None, attempts: int = 1) -> None:
        self.url, self.reason, self.status, self.attempts = url, reason, status, attempts
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        super().__init__(f"chat request to {url} failed{tries}: {reason}")


@dataclass(frozen=True)
class ChatResult:
    """Outcome of :func:`try_chat`: the reply ``text`` or the ``error`` message (exactly one is set)."""

    text: str | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def endpoint(base_url: str) -> str:
    """``http://host:8000/v1`` -> ``http://host:8000/v1/chat/completions`` (a full endpoint is kept)."""
    url = base_url.rstrip("/")
    return url if url.endswith(SUFFIX) else url + SUFFIX


def reply_text(payload: Any) -> str:
    """``choices[0].message.content`` of a parsed response (text parts of a list content are joined).

    Raises ``ValueError`` naming what is missing.
    """
    if not isinstance(payload, dict):
        raise ValueError(f"response is a JSON {type(payload).__name__}, not an object")
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices:
        detail = f" (server error: {payload['error']})" if "error" in payload else ""
        raise ValueError(f"response has no choices{detail}")
    message = choices[0].get("message") if isinstance(choices[0], dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):  # some servers return content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict)) or None
    if not isinstance(content, str):
        raise ValueError("response has no choices[0].message.content")
    return content


class BackoffOpenAI(openai.OpenAI):
    """``openai.OpenAI`` whose first retry waits ``backoff`` seconds (the library's schedule, scaled)."""

    def __init__(self, *, backoff: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.backoff = backoff

    def _calculate_retry_timeout(self, remaining_retries: int, options: Any, response_headers: Any = None) -> float:
        wait = super()._calculate_retry_timeout(remaining_retries, options, response_headers)
        if self._parse_retry_after_header(response_headers):  # the server's wait is kept as it is
            return wait
        return wait * self.backoff / INITIAL_RETRY_DELAY


@functools.lru_cache(maxsize=16)
def _client(base_url: str, api_key: str, timeout: float, retries: int, backoff: float) -> openai.OpenAI:
    # The placeholder keeps the client from looking for $OPENAI_API_KEY when the caller named another
    # variable or none; chat() then omits the Authorization header (local servers need none).
    return BackoffOpenAI(base_url=base_url, api_key=api_key or "no-key", timeout=timeout, max_retries=retries,
                         backoff=backoff)


def _redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


def _excerpt(text: str) -> str:
    text = text.strip().replace("\n", " ")
    return text if len(text) <= BODY_EXCERPT else text[:BODY_EXCERPT] + "..."


def _attempts(err: openai.APIError) -> int:
    """Requests sent, from the retry counter the client puts on each request (1 when it is absent)."""
    request = getattr(err, "request", None)
    count = request.headers.get("x-stainless-retry-count") if request is not None else None
    return int(count) + 1 if count is not None and count.isdigit() else 1


def _reason(err: openai.APIError, timeout: float) -> tuple[str, int | None]:
    if isinstance(err, openai.APITimeoutError):
        return f"timed out after {timeout:g} s", None
    if isinstance(err, openai.APIConnectionError):
        return f"cannot connect ({err.__cause__ or err})", None
    if isinstance(err, openai.APIStatusError):
        return f"HTTP {err.status_code}: {_excerpt(err.response.text)}", err.status_code
    return f"{type(err).__name__}: {err}", None


def chat(
    base_url: str,
    model: str,
    messages: Sequence[Message],
    *,
    api_key_env: str | None = "OPENAI_API_KEY",
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
    max_tokens: int | None = None,
    temperature: float | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Send ``messages`` to ``<base_url>/chat/completions`` and return the reply text.

    ``api_key_env`` names the environment variable holding the key (no ``Authorization`` header when it is
    None or unset, as local servers need none). The ``openai`` client retries timeouts, connection errors,
    429 and 5xx up to ``retries`` times, waiting about ``backoff * 2**retry`` seconds (or the server's
    ``Retry-After``); other 4xx, malformed JSON and a missing ``choices[0].message.content`` fail at once.
    ``extra`` adds fields to the request body. Raises :class:`ChatError`.
    """
    url = endpoint(base_url)
    key = (os.environ.get(api_key_env) if api_key_env else None) or ""
    client = _client(url.removesuffix(SUFFIX), key, timeout, max(0, retries), backoff)
    options: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature}
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=list(messages), extra_body=dict(extra) if extra else None,
            extra_headers=None if key else {"Authorization": openai.Omit()},
            **{k: v for k, v in options.items() if v is not None},
        )
    except openai.APIError as err:
        reason, status = _reason(err, timeout)
        raise ChatError(url, _redact(reason, key), status, _attempts(err)) from None
    text = raw.http_response.text
    try:
        return reply_text(json.loads(text))
    except json.JSONDecodeError as err:
        problem = f"malformed JSON in response ({err}): {_excerpt(text)!r}"
        raise ChatError(url, _redact(problem, key), raw.status_code) from None
    except ValueError as err:
        raise ChatError(url, _redact(str(err), key), raw.status_code) from None


def try_chat(base_url: str, model: str, messages: Sequence[Message], **kwargs: Any) -> ChatResult:
    """:func:`chat` that never raises for a failed request: returns :class:`ChatResult` (text or error)."""
    try:
        return ChatResult(chat(base_url, model, messages, **kwargs))
    except ChatError as err:
        return ChatResult(None, str(err))


def make_chat_fn(base_url: str, model: str, **kwargs: Any) -> ChatFn:
    """A ``messages -> reply`` function bound to one endpoint and model (keyword args go to :func:`chat`)."""

    def chat_fn(messages: list[dict[str, Any]]) -> str:
        return chat(base_url, model, messages, **kwargs)

    return chat_fn

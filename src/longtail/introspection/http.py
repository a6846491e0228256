"""A small client for OpenAI-compatible chat completion endpoints, on the standard library only.

Works with hosted APIs and local servers that speak the same schema (vLLM, Ollama's ``/v1``, llama.cpp's
server). :func:`chat` raises :class:`ChatError` on any failure; :func:`try_chat` returns a
:class:`ChatResult` instead, so a long run can record a failed request and go on.

The API key is read from an environment variable at call time; it is sent only in the ``Authorization``
header and is scrubbed from every error message.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Message = Mapping[str, Any]
ChatFn = Callable[[list[dict[str, Any]]], str]  # messages -> reply text

DEFAULT_TIMEOUT = 60.0
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF = 1.0
MAX_BACKOFF = 30.0
BODY_EXCERPT = 300  # characters of a server's error body quoted in a ChatError


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
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def _redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


def _excerpt(raw: bytes) -> str:
    text = raw.decode("utf-8", errors="replace").strip().replace("\n", " ")
    return text if len(text) <= BODY_EXCERPT else text[:BODY_EXCERPT] + "..."


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


def _retry_after(headers: Any) -> float | None:
    """Seconds from a numeric ``Retry-After`` header, if any."""
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _post_once(url: str, body: bytes, headers: dict[str, str], timeout: float) -> tuple[int, Any, bytes]:
    """One POST -> (status, headers, body); HTTP errors are returned, network errors raised."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read() if err.fp is not None else b""


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
    None or unset, as local servers need none). Timeouts, connection errors, HTTP 429 and 5xx are retried
    up to ``retries`` times, waiting ``backoff * 2**attempt`` seconds (or the server's ``Retry-After``);
    other 4xx, malformed JSON and a missing ``choices[0].message.content`` fail at once.
    ``extra`` adds fields to the request body. Raises :class:`ChatError`.
    """
    url = endpoint(base_url)
    key = os.environ.get(api_key_env) if api_key_env else None
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    payload: dict[str, Any] = {"model": model, "messages": list(messages), **(extra or {})}
    if max_tokens is not None:
        payload["max_tokens"] = max_tokens
    if temperature is not None:
        payload["temperature"] = temperature
    body = json.dumps(payload).encode("utf-8")

    attempts = max(0, retries) + 1
    for attempt in range(attempts):
        wait = min(backoff * 2**attempt, MAX_BACKOFF)
        try:
            status, resp_headers, raw = _post_once(url, body, headers, timeout)
        except TimeoutError:
            reason, status = f"timed out after {timeout:g} s", None
        except urllib.error.URLError as err:
            timed_out = isinstance(err.reason, TimeoutError)
            reason = f"timed out after {timeout:g} s" if timed_out else f"cannot connect ({err.reason})"
            status = None
        except (OSError, http.client.HTTPException, ValueError) as err:  # resets, cut-off bodies, bad URLs
            reason, status = f"{type(err).__name__}: {err}", None
        else:
            if 200 <= status < 300:
                try:
                    return reply_text(json.loads(raw.decode("utf-8")))
                except (UnicodeDecodeError, json.JSONDecodeError) as err:
                    problem = f"malformed JSON in response ({err}): {_excerpt(raw)!r}"
                    raise ChatError(url, _redact(problem, key), status) from None
                except ValueError as err:
                    raise ChatError(url, _redact(str(err), key), status) from None
            reason = _redact(f"HTTP {status}: {_excerpt(raw)}", key)
            if status != 429 and status < 500:
                raise ChatError(url, reason, status, attempt + 1)
            asked = _retry_after(resp_headers)
            wait = min(asked if asked is not None else wait, MAX_BACKOFF)
        if attempt + 1 < attempts:
            time.sleep(wait)
    raise ChatError(url, reason, status, attempts)


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

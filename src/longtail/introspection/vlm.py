"""Vision-language captioners behind the :class:`~longtail.introspection.captioners.Captioner` interface.

* :class:`TransformersCaptioner`: any transformers image-text-to-text model from a local path or hub id
  (LLaVA-1.6 as in the paper, BLIP, ...).
* :class:`OpenAIVisionCaptioner`: an OpenAI-compatible chat endpoint that accepts image content parts
  (vLLM, Ollama, llama.cpp server, hosted APIs).
* :class:`CachedCaptioner`: wraps any captioner and stores each caption on disk, keyed by the image, the
  class, the prompt and the backend, so repeated runs caption each image once.

Images follow the protocol: ``[B, C, H, W]`` in ``[-1, 1]`` with C = 1 or 3; they are turned into RGB
PIL images for the models. The paper's VLM prompt (Supplement A.2) is the default.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from longtail.introspection.captioners import Captioner, with_article
from longtail.introspection.http import DEFAULT_BACKOFF, DEFAULT_RETRIES, ChatError, chat
from longtail.introspection.prompts import write_text_atomic

DEFAULT_PROMPT = "This is an image of {cls}. Describe it in detail."


def format_prompt(prompt: str, class_name: str) -> str:
    """Fill ``{cls}`` (the class name) and ``{a_cls}`` (with its article, "an ankle boot") in a prompt."""
    return prompt.format(cls=class_name, a_cls=with_article(class_name))


def _check_batch(images: Tensor, class_names: Sequence[str]) -> None:
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [B, 1 or 3, H, W], got shape {tuple(images.shape)}")
    if len(class_names) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(class_names)} class names")


def to_pil(images: Tensor) -> list[Image.Image]:
    """``[B, 1 or 3, H, W]`` in ``[-1, 1]`` -> B RGB PIL images (gray is repeated over 3 channels)."""
    x = ((images.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return [Image.fromarray(img.permute(1, 2, 0).contiguous().numpy()) for img in x]


def png_data_url(image: Image.Image) -> str:
    """``data:image/png;base64,...`` for a PIL image."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_digest(image: Tensor) -> str:
    """SHA-256 of one image's shape and float32 bytes (``[C, H, W]``)."""
    x = image.detach().float().cpu().contiguous()
    return hashlib.sha256(str(tuple(x.shape)).encode() + x.numpy().tobytes()).hexdigest()


def backend_id(captioner: object) -> str:
    """A stable name of a captioner and its settings: its ``backend_id`` attribute, else the repr of a
    dataclass (which lists its fields), else the class's qualified name."""
    named = getattr(captioner, "backend_id", None)
    if isinstance(named, str):
        return named
    cls = type(captioner)
    if dataclasses.is_dataclass(captioner):
        return f"{cls.__module__}.{captioner!r}"
    return f"{cls.__module__}.{cls.__qualname__}"


# ---------------------------------------------------------------------------------------------------------
# transformers


def _load_model(path: str, dtype: torch.dtype | str | None) -> Any:
    """An image-text-to-text model (older transformers: vision-to-sequence) from ``path``."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    kwargs = {"dtype" if major >= 5 else "torch_dtype": dtype if dtype is not None else "auto"}
    names = ("AutoModelForImageTextToText", "AutoModelForVision2Seq")
    errors = []
    for name in names:
        auto = getattr(transformers, name, None)
        if auto is None:
            continue
        try:
            return auto.from_pretrained(path, **kwargs)
        except ValueError as err:  # the architecture is not in this auto class's mapping
            errors.append(f"{name}: {err}")
    raise ValueError(f"cannot load {path} as an image-to-text model: " + "; ".join(errors))


def _drop_echo(out: Tensor, prompt_ids: Tensor | None) -> Tensor:
    """Generated ids ``[B, L]`` without the prompt ``[B, P]`` when they start with it (decoder-only models
    echo their input; BLIP-style models do not, and keep their text prefix)."""
    if prompt_ids is None or out.shape[1] < prompt_ids.shape[1]:
        return out
    width = prompt_ids.shape[1]
    return out[:, width:] if torch.equal(out[:, :width].to(prompt_ids.device), prompt_ids) else out


class TransformersCaptioner:
    """Captions with a transformers vision-language model (LLaVA-1.6, BLIP, ...).

    ``model`` is a local directory or hub id (loaded on first use; set ``HF_HUB_OFFLINE=1`` to forbid
    downloads), or an already loaded model together with its ``processor``. ``prompt`` may use ``{cls}``
    and ``{a_cls}``. Models whose processor has a chat template (LLaVA) get the prompt as a user message
    next to the image and only the new tokens are returned; others (BLIP) get it as a text prefix that the
    caption continues, e.g. ``prompt="a photo of {a_cls}"`` (``""``: no prefix). Greedy decoding by
    default, so captions are reproducible.
    """

    def __init__(
        self,
        model: str | Path | Any,
        prompt: str = DEFAULT_PROMPT,
        *,
        processor: Any = None,
        max_new_tokens: int = 128,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        batch_size: int = 8,
        use_chat_template: bool | None = None,
        generate_kwargs: dict[str, Any] | None = None,
    ) -> None:
        loaded = not isinstance(model, (str, Path))
        if loaded and processor is None:
            raise ValueError("a loaded model needs its processor")
        self.name = str(model) if not loaded else str(getattr(model, "name_or_path", type(model).__name__))
        self._model = model if loaded else None
        self._processor = processor
        self._placed = False
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size
        self.use_chat_template = use_chat_template
        self.generate_kwargs = {"do_sample": False, **(generate_kwargs or {})}

    @property
    def backend_id(self) -> str:
        settings = json.dumps(
            {"max_new_tokens": self.max_new_tokens, **self.generate_kwargs}, sort_keys=True, default=str
        )
        return f"transformers:{self.name}:{settings}"

    def load(self) -> tuple[Any, Any]:
        """(model, processor), loading them on first call."""
        if self._model is None:
            from transformers import AutoProcessor

            self._processor = AutoProcessor.from_pretrained(self.name)
            self._model = _load_model(self.name, self.dtype)
        if not self._placed:
            self._model = self._model.to(self.device).eval()
            self._placed = True
        return self._model, self._processor

    def _chat_mode(self, processor: Any) -> bool:
        if self.use_chat_template is not None:
            return self.use_chat_template
        return getattr(processor, "chat_template", None) is not None

    def _texts(self, processor: Any, class_names: Sequence[str]) -> list[str] | None:
        """The text input per image (None: images only)."""
        prompts = [format_prompt(self.prompt, c) for c in class_names]
        if not self._chat_mode(processor):
            return prompts if any(prompts) else None
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None:  # generation continues at the right end of every row
            tokenizer.padding_side = "left"
        conversations = [
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}] for p in prompts
        ]
        return [
            processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
            for c in conversations
        ]

    @torch.no_grad()
    def _generate(self, images: list[Image.Image], class_names: Sequence[str]) -> list[str]:
        """Captions for images that share one prompt (so no prompt padding is needed)."""
        model, processor = self.load()
        texts = self._texts(processor, class_names)
        kwargs: dict[str, Any] = {"images": images, "return_tensors": "pt"}
        if texts is not None:
            kwargs.update(text=texts, padding=True)
        inputs = processor(**kwargs).to(self.device)
        dtype = getattr(model, "dtype", None)
        if "pixel_values" in inputs and dtype is not None:
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        out = model.generate(**inputs, max_new_tokens=self.max_new_tokens, **self.generate_kwargs)
        out = _drop_echo(out, inputs.get("input_ids"))
        return [t.strip() for t in processor.batch_decode(out, skip_special_tokens=True)]

    def caption(self, images: Tensor, class_names: Sequence[str]) -> list[str]:
        """B captions for ``images [B, 1 or 3, H, W]`` in ``[-1, 1]``; batches group images of one class."""
        _check_batch(images, class_names)
        pil = to_pil(images)
        by_prompt: dict[str, list[int]] = defaultdict(list)
        for i, name in enumerate(class_names):
            by_prompt[format_prompt(self.prompt, name)].append(i)
        out: list[str] = [""] * len(pil)
        for indices in by_prompt.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                captions = self._generate([pil[i] for i in chunk], [class_names[i] for i in chunk])
                for i, text in zip(chunk, captions, strict=True):
                    out[i] = text
        return out


# ---------------------------------------------------------------------------------------------------------
# OpenAI-compatible endpoint


@dataclasses.dataclass(frozen=True)
class CaptionFailure:
    """A caption request that failed: position in its batch, class and the error message."""

    index: int
    class_name: str
    error: str


class OpenAIVisionCaptioner:
    """Captions through an OpenAI-compatible chat endpoint with image content parts (base64 PNG data URLs).

    ``base_url`` is e.g. ``https://api.openai.com/v1`` or ``http://localhost:8000/v1`` (vLLM); the key is read
    from the environment variable ``api_key_env`` (unset: no auth header). Requests run on ``workers``
    threads. With ``strict=False`` (default) a failed request gives the caption ``""`` and is appended to
    ``failures``, so a long run goes on (:class:`CachedCaptioner` does not store empty captions);
    ``strict=True`` raises the :class:`~longtail.introspection.http.ChatError`. ``image_size`` upscales the
    longer image side to that many pixels first (tiny images confuse some VLMs).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        prompt: str = DEFAULT_PROMPT,
        *,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout: float = 120.0,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
        max_tokens: int = 300,
        temperature: float = 0.0,
        workers: int = 4,
        image_size: int | None = None,
        strict: bool = False,
    ) -> None:
        self.base_url, self.model, self.prompt = base_url, model, prompt
        self.api_key_env = api_key_env
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.max_tokens, self.temperature = max_tokens, temperature
        self.workers, self.image_size, self.strict = max(1, workers), image_size, strict
        self.failures: list[CaptionFailure] = []

    @property
    def backend_id(self) -> str:
        return f"openai:{self.base_url.rstrip('/')}:{self.model}:{self.max_tokens}:{self.temperature}"

    def messages(self, image: Image.Image, class_name: str) -> list[dict[str, Any]]:
        """One user message: the prompt text and the image as a PNG data URL."""
        if self.image_size is not None and max(image.size) < self.image_size:
            scale = self.image_size / max(image.size)
            image = image.resize(
                (round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC
            )
        content = [
            {"type": "text", "text": format_prompt(self.prompt, class_name)},
            {"type": "image_url", "image_url": {"url": png_data_url(image)}},
        ]
        return [{"role": "user", "content": content}]

    def _one(self, image: Image.Image, class_name: str) -> str:
        return chat(
            self.base_url,
            self.model,
            self.messages(image, class_name),
            api_key_env=self.api_key_env,
            timeout=self.timeout,
            retries=self.retries,
            backoff=self.backoff,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
        ).strip()

    def _safe(self, index: int, image: Image.Image, class_name: str) -> str:
        try:
            return self._one(image, class_name)
        except ChatError as err:
            if self.strict:
                raise
            self.failures.append(CaptionFailure(index, class_name, str(err)))
            return ""

    def caption(self, images: Tensor, class_names: Sequence[str]) -> list[str]:
        """B captions for ``images [B, 1 or 3, H, W]`` in ``[-1, 1]`` (``""`` for failed requests)."""
        _check_batch(images, class_names)
        pil = to_pil(images)
        jobs = list(range(len(pil)))
        if self.workers == 1 or len(pil) <= 1:
            return [self._safe(i, pil[i], class_names[i]) for i in jobs]
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(lambda i: self._safe(i, pil[i], class_names[i]), jobs))


# ---------------------------------------------------------------------------------------------------------
# Cache


class CachedCaptioner:
    """Caches the captions of ``inner`` on disk: one JSON file per (image, class, prompt, backend).

    The key hashes the image's float32 bytes (:func:`image_digest`), the class name, the inner captioner's
    ``prompt`` attribute (empty if none) and :func:`backend_id`. Files are written atomically, so several
    processes may share a cache. Misses are captioned in batches of ``batch_size`` (an image repeated in
    one call is captioned once) under a tqdm bar; empty captions (failed requests) are not stored.
    ``hits`` and ``misses`` count lookups.
    """

    def __init__(
        self,
        inner: Captioner,
        cache_dir: str | Path,
        batch_size: int = 32,
        progress: bool = True,
        desc: str = "captions",
    ) -> None:
        self.inner, self.cache_dir = inner, Path(cache_dir)
        self.batch_size, self.progress, self.desc = max(1, batch_size), progress, desc
        self.hits = self.misses = 0

    @property
    def prompt(self) -> str:
        return str(getattr(self.inner, "prompt", ""))

    @property
    def backend_id(self) -> str:
        return backend_id(self.inner)

    def key(self, image: Tensor, class_name: str) -> str:
        """Cache key (hex SHA-256) of one image ``[C, H, W]`` and its class."""
        parts = [image_digest(image), class_name, self.prompt, self.backend_id]
        return hashlib.sha256(json.dumps(parts).encode("utf-8")).hexdigest()

    def _path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        """The stored caption for ``key`` (None when absent or unreadable)."""
        try:
            return str(json.loads(self._path(key).read_text(encoding="utf-8"))["caption"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, caption: str, class_name: str) -> None:
        record = {
            "caption": caption,
            "class_name": class_name,
            "prompt": self.prompt,
            "backend": self.backend_id,
        }
        write_text_atomic(self._path(key), json.dumps(record, ensure_ascii=False) + "\n")

    def caption(self, images: Tensor, class_names: Sequence[str]) -> list[str]:
        """B captions for ``images [B, 1 or 3, H, W]`` in ``[-1, 1]``, from the cache where possible."""
        if len(class_names) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(class_names)} class names")
        keys = [self.key(img, c) for img, c in zip(images, class_names, strict=True)]
        found = {k: self.get(k) for k in dict.fromkeys(keys)}
        todo = [k for k, v in found.items() if v is None]
        first = {k: i for i, k in reversed(list(enumerate(keys)))}  # first image of each key
        missing = sum(found[k] is None for k in keys)
        self.hits, self.misses = self.hits + len(keys) - missing, self.misses + missing
        with tqdm(total=len(todo), desc=self.desc, disable=not self.progress or not todo, leave=False) as bar:
            for start in range(0, len(todo), self.batch_size):
                chunk = [first[k] for k in todo[start : start + self.batch_size]]
                names = [class_names[i] for i in chunk]
                for i, text in zip(chunk, self.inner.caption(images[chunk], names), strict=True):
                    found[keys[i]] = text
                    if text:
                        self.put(keys[i], text, class_names[i])
                bar.update(len(chunk))
        return [found[k] or "" for k in keys]

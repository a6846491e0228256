"""Captioner backends, the caption cache and the chat client, against a local OpenAI-style test server."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import torch
from PIL import Image

from longtail.introspection.captioners import AttributeCaptioner, Captioner
from longtail.introspection.http import ChatError, chat, endpoint, make_chat_fn, try_chat
from longtail.introspection.keywords import Keyword, KeywordPair
from longtail.introspection.prompts import refine_prompts
from longtail.introspection.vlm import (
    CachedCaptioner,
    OpenAIVisionCaptioner,
    TransformersCaptioner,
    backend_id,
    to_pil,
)

KEY_ENV = "LONGTAIL_TEST_API_KEY"
SECRET = "sk-test-secret-0123456789"


# ---------------------------------------------------------------------------------------------------------
# A local server speaking the chat completions schema; the first path segment picks its behaviour.


def completion(content: Any) -> dict[str, Any]:
    return {
        "id": "x",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
    }


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[dict[str, Any]] = []
        self.reply = "A photo of a coat that is dark."

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def base(self, scenario: str) -> str:
        return f"{self.url}/{scenario}/v1"

    def count(self, scenario: str) -> int:
        return sum(1 for r in self.requests if r["scenario"] == scenario)

    def handle_error(self, request: Any, client_address: Any) -> None:  # clients that time out hang up
        pass


class Handler(BaseHTTPRequestHandler):
    server: ChatServer

    def log_message(self, *args: Any) -> None:
        pass

    def send(
        self, status: int, body: bytes | str | dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        raw = (
            json.dumps(body).encode()
            if isinstance(body, dict)
            else body
            if isinstance(body, bytes)
            else body.encode()
        )
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(raw)

    def do_POST(self) -> None:
        scenario = self.path.strip("/").split("/")[0]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(
            {"scenario": scenario, "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
             "body": body}
        )
        n = self.server.count(scenario)
        if scenario == "ok":
            self.send(200, completion(self.server.reply))
        elif scenario == "slow":
            time.sleep(0.6)
            self.send(200, completion(self.server.reply))
        elif scenario == "flaky":  # fails once, then works
            self.send(500, "upstream crashed") if n == 1 else self.send(200, completion(self.server.reply))
        elif scenario == "busy":
            self.send(429, {"error": "rate limited"}, {"Retry-After": "0"}) if n == 1 else self.send(
                200, completion("ok")
            )
        elif scenario == "down":
            self.send(503, "overloaded")
        elif scenario == "bad":  # echoes what it got, the auth header included
            self.send(400, {"error": {"message": f"bad request, auth={self.headers.get('Authorization')}"}})
        elif scenario == "garbage":
            self.send(200, "<html>proxy error</html>")
        elif scenario == "nochoices":
            self.send(200, {"error": "model not loaded"})
        elif scenario == "nocontent":
            self.send(200, completion(None))
        elif scenario == "parts":
            self.send(200, completion([{"type": "text", "text": "a "}, {"type": "text", "text": "coat"}]))
        else:
            self.send(404, "no such route")


@pytest.fixture
def server() -> Iterator[ChatServer]:
    srv = ChatServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


FAST = {"retries": 2, "backoff": 0.01, "timeout": 5.0, "api_key_env": None}
USER = [{"role": "user", "content": "hello"}]


# ---------------------------------------------------------------------------------------------------------
# chat


def test_endpoint() -> None:
    assert endpoint("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert endpoint("http://h:1/v1/chat/completions") == "http://h:1/v1/chat/completions"


def test_chat_normal_reply_and_request(server: ChatServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    reply = chat(server.base("ok"), "m1", USER, api_key_env=KEY_ENV, max_tokens=7, temperature=0.0)
    assert reply == "A photo of a coat that is dark."
    (req,) = server.requests
    assert req["path"] == "/ok/v1/chat/completions"
    assert req["headers"]["authorization"] == f"Bearer {SECRET}"
    assert req["body"] == {"model": "m1", "messages": USER, "max_tokens": 7, "temperature": 0.0}
    assert try_chat(server.base("ok"), "m1", USER, **FAST).text == reply
    assert chat(server.base("parts"), "m1", USER, **FAST) == "a coat"


def test_no_auth_header_without_a_key(server: ChatServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-this-one")  # only the named variable is read
    chat(server.base("ok"), "m", USER, api_key_env=KEY_ENV)
    chat(server.base("ok"), "m", USER, api_key_env=None)
    assert all("authorization" not in r["headers"] for r in server.requests)  # the server lower-cases names
    monkeypatch.setenv(KEY_ENV, SECRET)  # read at call time, not when the first client was made
    chat(server.base("ok"), "m", USER, api_key_env=KEY_ENV)
    assert server.requests[-1]["headers"]["authorization"] == f"Bearer {SECRET}"


def test_timeout(server: ChatServer) -> None:
    start = time.monotonic()
    with pytest.raises(ChatError, match=r"/slow/v1/chat/completions failed: timed out after 0.1 s"):
        chat(server.base("slow"), "m", USER, **{**FAST, "timeout": 0.1, "retries": 0})
    assert time.monotonic() - start < 0.5
    result = try_chat(server.base("slow"), "m", USER, **{**FAST, "timeout": 0.1, "retries": 1})
    assert not result.ok and result.text is None and "after 2 attempts: timed out" in result.error


def test_server_error_is_retried(server: ChatServer) -> None:
    assert chat(server.base("flaky"), "m", USER, **FAST) == "A photo of a coat that is dark."
    assert server.count("flaky") == 2
    assert chat(server.base("busy"), "m", USER, **FAST) == "ok"  # 429 is retried too
    with pytest.raises(ChatError, match="after 3 attempts: HTTP 503: overloaded") as info:
        chat(server.base("down"), "m", USER, **FAST)
    assert info.value.status == 503 and server.count("down") == 3


def test_backoff_sets_the_wait_before_a_retry(server: ChatServer) -> None:
    start = time.monotonic()
    with pytest.raises(ChatError, match="after 3 attempts"):
        chat(server.base("down"), "m", USER, **FAST)  # two retries, 0.01 s and 0.02 s apart
    assert time.monotonic() - start < 0.25
    start = time.monotonic()
    with pytest.raises(ChatError, match="after 2 attempts"):
        chat(server.base("down"), "m", USER, **{**FAST, "retries": 1, "backoff": 0.4})
    assert time.monotonic() - start >= 0.3  # 0.4 s less the client's jitter (at most 25%)


def test_client_error_is_not_retried_and_hides_the_key(
    server: ChatServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    with pytest.raises(ChatError, match=r"HTTP 400: .*bad request") as info:
        chat(server.base("bad"), "m", USER, **{**FAST, "api_key_env": KEY_ENV})
    assert server.count("bad") == 1 and info.value.status == 400
    assert server.url + "/bad/v1/chat/completions" in str(info.value)
    assert SECRET not in str(info.value) and "***" in str(info.value)


@pytest.mark.parametrize(
    ("scenario", "message"),
    [
        ("garbage", "malformed JSON in response .*proxy error"),
        ("nochoices", r"no choices \(server error: model not loaded\)"),
        ("nocontent", r"no choices\[0\]\.message\.content"),
        ("nowhere", "HTTP 404"),
    ],
)
def test_bad_responses_fail_clearly(server: ChatServer, scenario: str, message: str) -> None:
    with pytest.raises(
        ChatError, match=f"chat request to .*/{scenario}/v1/chat/completions failed.*{message}"
    ):
        chat(server.base(scenario), "m", USER, **FAST)
    assert server.count(scenario) == 1


def test_connection_refused() -> None:
    srv = ChatServer()  # bound, then closed: nothing listens there
    url = srv.base("ok")
    srv.server_close()
    result = try_chat(url, "m", USER, **{**FAST, "retries": 0})
    assert not result.ok and "cannot connect" in result.error


def kw_pair() -> KeywordPair:
    return KeywordPair(
        0, "a photo of a coat, dark, tilted left", (Keyword("left", 0.6), Keyword("dark", 0.5)), 0.55
    )


def test_refine_prompts_over_http(server: ChatServer) -> None:
    (good,) = refine_prompts([kw_pair()], "coat", backend=make_chat_fn(server.base("ok"), "m", **FAST))
    assert good.prompt == "a photo of a coat that is dark" and good.backend == "llm" and good.error is None
    sent = server.requests[0]["body"]["messages"][0]["content"]
    assert "keywords describe the key features of the description above: left, dark" in sent
    for scenario in ("garbage", "nochoices", "bad", "slow"):
        fn = make_chat_fn(server.base(scenario), "m", **{**FAST, "timeout": 0.1, "retries": 0})
        (fell,) = refine_prompts([kw_pair()], "coat", backend=fn)
        assert fell.prompt == "a photo of a coat that is dark and tilted left" and fell.backend == "template"
        assert fell.error.startswith("ChatError: chat request to") and f"/{scenario}/v1" in fell.error


# ---------------------------------------------------------------------------------------------------------
# OpenAI vision captioner


def gray_batch(n: int = 2, size: int = 8) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(n, 1, size, size) * 2 - 1


def test_to_pil_converts_gray_to_rgb() -> None:
    images = torch.full((2, 1, 4, 5), -1.0)
    images[1] = 1.0
    pil = to_pil(images)
    assert [p.mode for p in pil] == ["RGB", "RGB"] and pil[0].size == (5, 4)
    assert pil[0].getpixel((0, 0)) == (0, 0, 0) and pil[1].getpixel((4, 3)) == (255, 255, 255)
    assert to_pil(torch.zeros(1, 3, 2, 2))[0].getpixel((0, 0)) == (128, 128, 128)


def test_openai_captioner_sends_png_and_key(server: ChatServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    server.reply = "  A dark coat.  "
    cap: Captioner = OpenAIVisionCaptioner(
        server.base("ok"), "llava", api_key_env=KEY_ENV, workers=2, image_size=16, retries=0
    )
    images = gray_batch(3)
    assert cap.caption(images, ["coat", "ankle boot", "coat"]) == ["A dark coat."] * 3
    assert len(server.requests) == 3
    texts = []
    for req in server.requests:
        assert req["headers"]["authorization"] == f"Bearer {SECRET}"
        body = req["body"]
        assert body["model"] == "llava" and body["temperature"] == 0.0
        (message,) = body["messages"]
        text_part, image_part = message["content"]
        texts.append(text_part["text"])
        url = image_part["image_url"]["url"]
        assert image_part["type"] == "image_url" and url.startswith("data:image/png;base64,")
        png = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert png.format == "PNG" and png.mode == "RGB" and png.size == (16, 16)
    assert sorted(texts) == sorted(
        [
            "This is an image of coat. Describe it in detail.",
            "This is an image of ankle boot. Describe it in detail.",
            "This is an image of coat. Describe it in detail.",
        ]
    )


def test_openai_captioner_records_failures(server: ChatServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    cap = OpenAIVisionCaptioner(server.base("bad"), "m", api_key_env=KEY_ENV, retries=0, workers=1)
    assert cap.caption(gray_batch(2), ["coat", "shirt"]) == ["", ""]
    assert [(f.index, f.class_name) for f in cap.failures] == [(0, "coat"), (1, "shirt")]
    assert all("HTTP 400" in f.error and SECRET not in f.error for f in cap.failures)
    strict = OpenAIVisionCaptioner(server.base("bad"), "m", api_key_env=KEY_ENV, retries=0, strict=True)
    with pytest.raises(ChatError) as info:
        strict.caption(gray_batch(1), ["coat"])
    assert SECRET not in str(info.value)
    with pytest.raises(ValueError, match="class names"):
        cap.caption(gray_batch(2), ["coat"])


# ---------------------------------------------------------------------------------------------------------
# Cache


class CountingCaptioner:
    """Captions with the class name and the image's mean; remembers every batch it was given."""

    prompt = "describe {cls}"
    backend_id = "counting-v1"

    def __init__(self, fail_on: str | None = None) -> None:
        self.batches: list[int] = []
        self.fail_on = fail_on

    def caption(self, images: torch.Tensor, class_names: Sequence[str]) -> list[str]:
        self.batches.append(len(class_names))
        pairs = zip(images, class_names, strict=True)
        return ["" if c == self.fail_on else f"{c} {float(img.mean()):.4f}" for img, c in pairs]


def test_cached_captioner_captions_each_image_once(tmp_path) -> None:
    inner = CountingCaptioner()
    cached = CachedCaptioner(inner, tmp_path / "cache", batch_size=2, progress=False)
    images = gray_batch(3)
    batch = torch.stack([images[0], images[1], images[0], images[2], images[0]])
    names = ["coat"] * 5
    first = cached.caption(batch, names)
    assert inner.batches == [2, 1] and cached.misses == 5 and cached.hits == 0
    assert first[0] == first[2] == first[4] and len(set(first)) == 3

    again = CachedCaptioner(CountingCaptioner(), tmp_path / "cache", progress=False)
    assert again.caption(batch, names) == first and again.inner.batches == [] and again.hits == 5

    # another class, prompt or backend is another key
    assert cached.caption(images[:1], ["shirt"]) == [f"shirt {float(images[0].mean()):.4f}"]
    other = CountingCaptioner()
    other.backend_id = "counting-v2"
    CachedCaptioner(other, tmp_path / "cache", progress=False).caption(images[:1], ["coat"])
    assert other.batches == [1]
    files = sorted((tmp_path / "cache").rglob("*.json"))
    assert len(files) == 5
    record = json.loads(files[0].read_text())
    assert (
        set(record) == {"caption", "class_name", "prompt", "backend"} and record["prompt"] == "describe {cls}"
    )


def test_cached_captioner_does_not_store_failures(tmp_path) -> None:
    inner = CountingCaptioner(fail_on="coat")
    cached = CachedCaptioner(inner, tmp_path, progress=False)
    assert cached.caption(gray_batch(2), ["coat", "shirt"])[0] == ""
    assert cached.caption(gray_batch(2), ["coat", "shirt"])[0] == ""
    assert inner.batches == [2, 1]  # the failed one is asked again


def test_cached_attribute_captioner_matches_the_plain_one(tmp_path) -> None:
    images = torch.full((4, 1, 32, 32), -1.0)
    images[:, :, 8:24, 10:22] = 0.6
    images[1, :, 2:30, 14:18] = 1.0
    names = ["coat", "trouser", "coat", "bag"]
    plain = AttributeCaptioner().caption(images, names)
    cached = CachedCaptioner(AttributeCaptioner(), tmp_path, progress=False)
    assert cached.caption(images, names) == plain == cached.caption(images, names)
    assert "AttributeCaptioner(max_phrases=4" in backend_id(AttributeCaptioner())
    assert backend_id(AttributeCaptioner(max_phrases=2)) != backend_id(AttributeCaptioner())


# ---------------------------------------------------------------------------------------------------------
# transformers


WORDS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "a",
    "an",
    "photo",
    "of",
    "coat",
    "ankle",
    "boot",
    "dark",
    "large",
    "hollow",
    "tilted",
    "left",
    "that",
    "is",
]


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory: pytest.TempPathFactory):
    """A randomly initialised BLIP captioner with a 19-word vocabulary, saved like a hub checkpoint."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    root = tmp_path_factory.mktemp("tiny-blip")
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
    )
    small = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = BlipConfig(
        vision_config={**small, "image_size": 32, "patch_size": 8},
        text_config={
            **small,
            "vocab_size": len(WORDS),
            "max_position_embeddings": 64,
            "bos_token_id": 2,
            "sep_token_id": 3,
            "pad_token_id": 0,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).eval().save_pretrained(root)
    processor.save_pretrained(root)
    return root


def test_transformers_captioner_with_a_tiny_blip(tiny_blip, tmp_path) -> None:
    cap = TransformersCaptioner(tiny_blip, prompt="a photo of {a_cls}", max_new_tokens=4, batch_size=2)
    images = torch.rand(3, 3, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    names = ["coat", "ankle boot", "coat"]
    captions = cap.caption(images, names)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    assert captions[0].startswith("a photo of a coat") and captions[1].startswith("a photo of an ankle boot")
    assert cap.caption(images, names) == captions  # greedy: reproducible
    assert cap.backend_id.startswith(f"transformers:{tiny_blip}:")

    no_prefix = TransformersCaptioner(tiny_blip, prompt="", max_new_tokens=3)
    assert len(no_prefix.caption(gray_batch(2, 28), ["coat", "coat"])) == 2  # gray input
    cached = CachedCaptioner(cap, tmp_path, progress=False)
    assert cached.caption(images, names) == captions


class FakeTokenizer:
    padding_side = "right"


class FakeChatProcessor:
    """Stands in for a LLaVA processor: a chat template, text ids = one id per character."""

    chat_template = "{{ messages }}"

    def __init__(self) -> None:
        self.tokenizer = FakeTokenizer()
        self.conversations: list[Any] = []

    def apply_chat_template(self, conversation: Any, add_generation_prompt: bool, tokenize: bool) -> str:
        assert add_generation_prompt and not tokenize
        self.conversations.append(conversation)
        return "USER: <image> " + conversation[0]["content"][1]["text"] + " ASSISTANT:"

    def __call__(self, images: list[Image.Image], text: list[str], return_tensors: str, padding: bool):
        from transformers import BatchFeature

        assert all(im.mode == "RGB" for im in images) and padding and return_tensors == "pt"
        ids = torch.tensor([[ord(ch) for ch in t] for t in text])
        pixels = torch.stack([torch.zeros(3, 4, 4) for _ in images])
        return BatchFeature(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}
        )

    def batch_decode(self, ids: torch.Tensor, skip_special_tokens: bool) -> list[str]:
        return ["".join(chr(int(i)) for i in row) for row in ids]


class FakeVLM(torch.nn.Module):
    """Echoes its prompt ids and appends " a coat" (what decoder-only VLMs do)."""

    name_or_path = "fake/llava"

    def generate(
        self, input_ids: torch.Tensor, max_new_tokens: int, do_sample: bool, **kwargs: Any
    ) -> torch.Tensor:
        assert kwargs["pixel_values"].shape[0] == input_ids.shape[0] and not do_sample
        new = torch.tensor([ord(ch) for ch in " a coat"][:max_new_tokens]).expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, new], dim=1)


def test_transformers_captioner_chat_path_returns_only_new_text() -> None:
    processor = FakeChatProcessor()
    cap = TransformersCaptioner(FakeVLM(), processor=processor, max_new_tokens=20, batch_size=2)
    out = cap.caption(gray_batch(3), ["coat", "ankle boot", "coat"])
    assert out == ["a coat"] * 3
    assert processor.tokenizer.padding_side == "left"
    texts = sorted({c[0]["content"][1]["text"] for c in processor.conversations})
    assert len(processor.conversations) == 3 and texts == [
        "This is an image of ankle boot. Describe it in detail.",
        "This is an image of coat. Describe it in detail.",
    ]
    assert processor.conversations[0][0]["content"][0] == {"type": "image"}
    assert cap.backend_id.startswith("transformers:fake/llava:")
    with pytest.raises(ValueError, match="processor"):
        TransformersCaptioner(FakeVLM())

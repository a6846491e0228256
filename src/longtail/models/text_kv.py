"""Cross-attention keys and values computed once per sampling call instead of once per step.

A text-conditioned UNet projects the same prompt embeddings to keys and values in every cross-attention layer
at every denoising step, although they depend on the prompts only. ``TextKVProcessor`` (diffusers'
``AttnProcessor2_0`` plus a one-entry memory) reuses a layer's projection for the text tensor it saw at the
previous call -- but only inside ``text_kv_scope(unet)``, which ``longtail.sampling.sample`` enters for one
sampling call (via ``LatentDiffusion.sampling_scope``) and which forgets everything on exit. Outside a scope the
processor is diffusers' own, call for call, so training, EMA copies, LoRA fusing, device moves and anything else
done to the weights between calls can never meet a stale projection.

Inside a scope a projection is reused when the ``encoder_hidden_states`` tensor is the same object, unmodified
(its ``_version``), the projection weights are unmodified (theirs), and nothing needs a gradient through the
projection (grad mode with the text or a weight requiring grad); never under autocast or while
``torch.compile`` traces. A text is projected twice before it is kept (the memory is filled at its second
sighting), so a caller that passes a new tensor at every step (SDXL's packed conditioning, sliced per call)
holds no extra memory and pays nothing. The sampler builds its CFG text batch once per call
(``sampling.cfg_text``), so the embedded default and SD 1.x / 2.x project twice per call instead of once per
step. The result is bit-identical to diffusers' processor (the same modules on the same input): the saving is
the projections' share of the UNet (0.82x-0.88x the time per call at the embedded default's batch of 200 on 2
CPU cores, ``benchmarks/demo_levers.py``).

Only plain ``nn.Linear`` projections are reused (a peft LoRA layer has a scale that can change without touching
its weights), only without ``norm_cross`` or ``spatial_norm``. The projection modules are swapped for the
length of one call under a per-layer lock, so concurrent callers of one UNet wait for each other.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import Tensor, nn


class _Fixed(nn.Module):
    """Stands in for a projection for one call: returns the kept tensor whatever its input."""

    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, _x: Tensor) -> Tensor:
        return self.value


def _weights(attn: Attention) -> list[Tensor]:
    return [p for m in (attn.to_k, attn.to_v) for p in m.parameters()]


def _autocast_on() -> bool:
    return any(torch.is_autocast_enabled(device) for device in ("cpu", "cuda"))


class TextKVProcessor(AttnProcessor2_0):
    """``AttnProcessor2_0`` that, inside ``text_kv_scope``, reuses a cross-attention layer's keys and values for
    the same text tensor. One instance per attention layer (``install_text_kv``); self-attention, and every call
    outside a scope, is diffusers' processor unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.active = 0  # open scopes
        self._entry: tuple[weakref.ref, tuple[int, ...], tuple[Tensor, Tensor] | None] | None = None
        self._lock = threading.RLock()

    def _reusable(self, attn: Attention, text: Tensor | None) -> list[Tensor] | None:
        """The projections' weights when ``text``'s projection may be kept or reused here, else None."""
        if not self.active or text is None or attn.norm_cross or attn.spatial_norm is not None:
            return None
        if type(attn.to_k) is not nn.Linear or type(attn.to_v) is not nn.Linear:
            return None
        if torch.compiler.is_compiling() or _autocast_on():
            return None
        weights = _weights(attn)
        if torch.is_grad_enabled() and (text.requires_grad or any(w.requires_grad for w in weights)):
            return None
        return weights

    def _keys_values(self, attn: Attention, text: Tensor, weights: list[Tensor]) -> tuple[Tensor, Tensor] | None:
        """The kept projection of ``text``, filling it at the text's second sighting; None at its first."""
        versions = (text._version, *(w._version for w in weights))
        entry = self._entry
        if entry is None or entry[0]() is not text or entry[1] != versions:
            self._entry = (weakref.ref(text), versions, None)
            return None
        if entry[2] is None:
            self._entry = (entry[0], versions, (attn.to_k(text), attn.to_v(text)))
        return self._entry[2]

    def forget(self) -> None:
        self._entry = None

    def __call__(self, attn: Attention, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 *args: object, **kwargs: object) -> Tensor:
        with self._lock:
            weights = self._reusable(attn, encoder_hidden_states)
            kept = None if weights is None else self._keys_values(attn, encoder_hidden_states, weights)
            if kept is None:
                return super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
            modules = attn._modules
            saved = modules["to_k"], modules["to_v"]
            modules["to_k"], modules["to_v"] = _Fixed(kept[0]), _Fixed(kept[1])
            try:
                return super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
            finally:
                modules["to_k"], modules["to_v"] = saved


def _processors(unet: nn.Module) -> list[TextKVProcessor]:
    found = getattr(unet, "attn_processors", None) or {}
    return [p for p in found.values() if isinstance(p, TextKVProcessor)]


def install_text_kv(unet: nn.Module) -> bool:
    """Give every attention layer of ``unet`` (a diffusers ``UNet2DConditionModel``) a ``TextKVProcessor``, if
    all of them use diffusers' default ``AttnProcessor2_0`` (a custom processor, IP-Adapter's say, is left
    alone). Returns whether they were installed. They change nothing until ``text_kv_scope`` is entered."""
    processors = getattr(unet, "attn_processors", None)
    if not processors or any(type(p) is not AttnProcessor2_0 for p in processors.values()):
        return False
    unet.set_attn_processor({name: TextKVProcessor() for name in processors})
    return True


@contextlib.contextmanager
def text_kv_scope(unet: nn.Module) -> Iterator[None]:
    """Let ``unet``'s ``TextKVProcessor`` layers reuse text projections (one sampling call); on exit every kept
    projection is dropped. Nests; a no-op for a module without them."""
    processors = _processors(unet)
    for p in processors:
        p.active += 1
    try:
        yield
    finally:
        for p in processors:
            p.active -= 1
            if not p.active:
                p.forget()


__all__ = ["TextKVProcessor", "install_text_kv", "text_kv_scope"]

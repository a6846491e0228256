"""Cross-attention keys and values computed once per sampling call instead of once per step.

A text-conditioned UNet projects the same prompt embeddings to keys and values in every cross-attention layer
at every denoising step, although they depend on the prompts only. ``TextKVProcessor`` (diffusers'
``AttnProcessor2_0`` with a one-entry cache) keeps the last projection per layer and reuses it while the
``encoder_hidden_states`` tensor is the same object, unmodified, and the projection weights are unchanged; the
sampler (``longtail.sampling.sample``) passes one text batch to every step, so each call projects once. The
result is bit-identical to diffusers' processor (the same modules on the same input): the saving is the
projections' share of the UNet (0.84x-0.88x the time per call at the embedded default's batch of 200 on 2 CPU
cores, ``benchmarks/demo_levers.py``).

Only plain ``nn.Linear`` projections are cached (a peft LoRA layer has a scale that can change between calls
without touching its weights), only without ``norm_cross``, and only projections that need no gradient, so
training a UNet never hits the cache.
"""

from __future__ import annotations

import weakref

from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import Tensor, nn


class _Fixed(nn.Module):
    """Stands in for a projection for one call: returns the cached tensor whatever its input."""

    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, _x: Tensor) -> Tensor:
        return self.value


def _weight_versions(attn: Attention) -> tuple[int, ...]:
    """In-place update counters of the key / value projections' parameters (an optimizer step bumps them)."""
    return tuple(p._version for m in (attn.to_k, attn.to_v) for p in m.parameters())


class TextKVProcessor(AttnProcessor2_0):
    """``AttnProcessor2_0`` that reuses a cross-attention layer's keys and values for the same text tensor.

    One instance per attention layer (``install_text_kv``); self-attention calls pass straight through."""

    def __init__(self) -> None:
        super().__init__()
        self._entry: tuple[weakref.ref, tuple[int, ...], Tensor, Tensor] | None = None

    def _cacheable(self, attn: Attention, text: Tensor | None) -> bool:
        return (text is not None and not attn.norm_cross and type(attn.to_k) is nn.Linear
                and type(attn.to_v) is nn.Linear)

    def _keys_values(self, attn: Attention, text: Tensor) -> tuple[Tensor, Tensor] | None:
        versions = (text._version, *_weight_versions(attn))
        entry = self._entry
        if entry is not None and entry[0]() is text and entry[1] == versions:
            return entry[2], entry[3]
        key, value = attn.to_k(text), attn.to_v(text)
        if key.requires_grad or value.requires_grad:  # training: no cache, the projections need their graph
            self._entry = None
            return None
        self._entry = (weakref.ref(text), versions, key, value)
        return key, value

    def __call__(self, attn: Attention, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 *args: object, **kwargs: object) -> Tensor:
        if not self._cacheable(attn, encoder_hidden_states):
            return super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        cached = self._keys_values(attn, encoder_hidden_states)
        if cached is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        modules = attn._modules
        saved = modules["to_k"], modules["to_v"]
        modules["to_k"], modules["to_v"] = _Fixed(cached[0]), _Fixed(cached[1])
        try:
            return super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        finally:
            modules["to_k"], modules["to_v"] = saved


def install_text_kv(unet: nn.Module) -> bool:
    """Give every attention layer of ``unet`` (a diffusers ``UNet2DConditionModel``) a ``TextKVProcessor``, if
    all of them use diffusers' default ``AttnProcessor2_0`` (a custom processor, IP-Adapter's say, is left
    alone). Returns whether they were installed."""
    processors = getattr(unet, "attn_processors", None)
    if not processors or any(type(p) is not AttnProcessor2_0 for p in processors.values()):
        return False
    unet.set_attn_processor({name: TextKVProcessor() for name in processors})
    return True


def clear_text_kv(unet: nn.Module) -> None:
    """Drop the cached keys / values (the memory of one text batch per layer) of ``unet``'s processors."""
    for p in getattr(unet, "attn_processors", {}).values():
        if isinstance(p, TextKVProcessor):
            p._entry = None


__all__ = ["TextKVProcessor", "clear_text_kv", "install_text_kv"]

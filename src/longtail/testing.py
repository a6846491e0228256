"""Tiny seeded components for tests and benchmarks (as diffusers' ``testing_utils``); nothing is downloaded.

``write_tiny_stable_diffusion``: a random-weight Stable Diffusion in the diffusers layout (sizes of diffusers'
pipeline tests). ``tiny_generator``: a random-weight embedded generator (``longtail.models.tiny``) with the
embedded default's classes, at the sizes ``TINY_GEN`` sets.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from .models.tiny import TinyGeneratorConfig, build_unet, build_vae, save_generator

TINY_GEN = TinyGeneratorConfig(vae_channels=(8, 8, 8), unet_channels=(16, 16), attention_head_dim=4, max_tokens=12)


def write_tiny_stable_diffusion(
    root: str | Path,
    *,
    prediction_type: str = "epsilon",
    seed: int = 0,
    unet_channels: tuple[int, ...] = (4, 8),
    vae_channels: tuple[int, ...] = (4, 8),
    sample_size: int = 32,
    text_dim: int = 32,
) -> Path:
    """Write a random-weight Stable Diffusion in the diffusers layout (sizes of diffusers' pipeline tests).

    UNet with cross-attention, a 3-channel ``AutoencoderKL``, a ``CLIPTextModel`` and a ``CLIPTokenizer``
    whose vocabulary (letters, BPE without merges) is written here: nothing is downloaded. For tests and
    benchmarks.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as tlog

    tlog.disable_progress_bar()
    root = Path(root)
    torch.manual_seed(seed)
    n = len(unet_channels)
    unet = UNet2DConditionModel(
        block_out_channels=unet_channels,
        layers_per_block=1,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=text_dim,
        norm_num_groups=2,
        attention_head_dim=2,
    )
    k = len(vae_channels)
    vae = AutoencoderKL(
        block_out_channels=vae_channels,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        norm_num_groups=2,
        down_block_types=("DownEncoderBlock2D",) * k,
        up_block_types=("UpDecoderBlock2D",) * k,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=text_dim,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=64,
            max_position_embeddings=77,
        )
    )
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: i + 2 for i, c in enumerate(letters)})
    vocab.update({c + "</w>": i + 2 + len(letters) for i, c in enumerate(letters)})
    raw = root / "tokenizer"  # the vocabulary files stay next to what save_pretrained writes, as in SD repos
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "vocab.json").write_text(json.dumps(vocab))
    (raw / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        vocab=str(raw / "vocab.json"), merges=str(raw / "merges.txt"), model_max_length=77
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    for name, part in (
        ("unet", unet),
        ("vae", vae),
        ("text_encoder", text_encoder),
        ("tokenizer", tokenizer),
        ("scheduler", scheduler),
    ):
        part.save_pretrained(root / name)
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root



def tiny_generator(root: Path, seed: int = 0) -> Path:
    """An untrained generator with the embedded default's classes and layout (random weights)."""
    torch.manual_seed(seed)
    vae, unet = build_vae(TINY_GEN), build_unet(TINY_GEN)
    vae.register_to_config(scaling_factor=1.0)
    from .data.datasets import FASHION_MNIST_CLASSES

    save_generator(root, vae, unet, {"format": 1, "max_tokens": TINY_GEN.max_tokens,
                                     "class_names": list(FASHION_MNIST_CLASSES)})
    return root

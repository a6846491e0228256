"""Tiny seeded components for tests and benchmarks (as diffusers' ``testing_utils``); nothing is downloaded.

``write_tiny_stable_diffusion``: a random-weight Stable Diffusion in the diffusers layout (sizes of diffusers'
pipeline tests). ``write_tiny_sd3``: a random-weight SD3 (MMDiT, flow matching, two CLIP encoders with
projection and an optional T5, its tokenizer built in memory with ``tokenizers``). ``write_tiny_flux``: a
random-weight FLUX.1 (packed latents, distilled guidance, resolution-shifted schedule). ``write_tiny_sdxl``: a
random-weight SDXL (two CLIP encoders, pooled embedding, time ids). ``write_tiny_pixart``: a random-weight
PixArt-Sigma (DiT with learned variance, masked T5). ``write_tiny_sana``: a random-weight Sana (flow DiT,
AutoencoderDC, Gemma 2, DPM-Solver++ on flow sigmas). ``tiny_generator``: a random-weight embedded generator (``longtail.models.tiny``) with the
embedded default's classes, at the sizes ``TINY_GEN`` sets.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from .models.tiny import TinyGeneratorConfig, build_unet, build_vae, save_generator

TINY_GEN = TinyGeneratorConfig(vae_channels=(8, 8, 8), unet_channels=(16, 16), attention_head_dim=4, max_tokens=12)


def tiny_clip_tokenizer(folder: Path) -> object:
    """A ``CLIPTokenizer`` over single letters (BPE without merges, 54 ids: bos 0, eos 1), its vocabulary files
    written to ``folder`` (they stay next to what ``save_pretrained`` writes, as in SD repos)."""
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: i + 2 for i, c in enumerate(letters)})
    vocab.update({c + "</w>": i + 2 + len(letters) for i, c in enumerate(letters)})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=77)


# Words of the tiny T5 vocabulary (everything else is <unk>): the tests' prompts and Fashion-MNIST's classes.
T5_WORDS = ("a", "photo", "of", "an", "the", "cat", "dog", "blurry", "t-shirt/top", "trouser", "pullover", "dress",
            "coat", "sandal", "shirt", "sneaker", "bag", "ankle", "boot", "rotated", "small", "faint", "inverted",
            "upside", "down")


def _word_level_tokenizer(specials: dict[str, int], template: str, marker: str, max_length: int,
                          **names: str) -> object:
    """A fast tokenizer built in memory: ``tokenizers`` WordLevel over ``specials`` then ``T5_WORDS`` (lower-cased,
    split on whitespace), the ``template`` post-processor adding ``marker``; ``names`` are the special tokens'
    roles (``pad_token=...``). Nothing downloaded."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = dict(specials)
    for word in T5_WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=names["unk_token"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[(marker, vocab[marker])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, **names)


def tiny_t5_tokenizer(max_length: int = 512) -> object:
    """A T5-style fast tokenizer built in memory: WordLevel over ``T5_WORDS`` (lower-cased, split on whitespace),
    ``<pad>`` 0, ``</s>`` 1 appended, ``<unk>`` 2. Nothing downloaded."""
    return _word_level_tokenizer({"<pad>": 0, "</s>": 1, "<unk>": 2}, "$A </s>", "</s>", max_length,
                                 pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_sd3_components(*, seed: int = 0, with_t5: bool = True, sample_size: int = 8, patch_size: int = 2,
                        vae_channels: tuple[int, ...] = (4, 8, 8)) -> dict[str, object]:
    """Random-weight SD3 components under ``StableDiffusion3Pipeline``'s argument names (diffusers' SD3 test
    sizes: one MMDiT layer, 32-wide text; ``text_encoder_3`` / ``tokenizer_3`` None without T5).

    Latents ``[4, sample_size, sample_size]``, images ``sample_size * 2 ** (len(vae_channels) - 1)`` pixels.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=patch_size, in_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=32,
        out_channels=4, pos_embed_max_size=sample_size // patch_size * 2,
    )
    clip = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16, intermediate_size=37,
                          num_attention_heads=4, num_hidden_layers=2, vocab_size=64, max_position_embeddings=77,
                          projection_dim=16, hidden_act="gelu")
    text_encoder, text_encoder_2 = CLIPTextModelWithProjection(clip), CLIPTextModelWithProjection(clip)
    k = len(vae_channels)
    vae = AutoencoderKL(
        block_out_channels=vae_channels, in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * k, up_block_types=("UpDecoderBlock2D",) * k,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    )
    t5 = None
    if with_t5:
        t5 = T5EncoderModel(T5Config(vocab_size=len(T5_WORDS) + 3, d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                     num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                     decoder_start_token_id=0))
    return {
        "transformer": transformer, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
        "text_encoder_3": t5, "tokenizer": None, "tokenizer_2": None,
        "tokenizer_3": tiny_t5_tokenizer() if with_t5 else None,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
    }


def write_tiny_sd3(root: str | Path, *, seed: int = 0, with_t5: bool = True, sample_size: int = 8) -> Path:
    """Write a random-weight SD3 in the diffusers layout (``tiny_sd3_components``) with ``model_index.json``
    naming ``StableDiffusion3Pipeline``; the CLIP tokenizers are ``tiny_clip_tokenizer``'s. Nothing downloaded."""
    from transformers.utils import logging as tlog

    tlog.disable_progress_bar()
    root = Path(root)
    parts = tiny_sd3_components(seed=seed, with_t5=with_t5, sample_size=sample_size)
    parts["tokenizer"] = tiny_clip_tokenizer(root / "tokenizer")
    parts["tokenizer_2"] = tiny_clip_tokenizer(root / "tokenizer_2")
    return save_pipeline("StableDiffusion3Pipeline", parts, root)


def tiny_flux_components(*, seed: int = 0, guidance_embeds: bool = True) -> dict[str, object]:
    """Random-weight FLUX.1 components under ``FluxPipeline``'s argument names (diffusers' FLUX test sizes: one
    double and one single block, 32-wide text), tokenizers ``tiny_clip_tokenizer`` / ``tiny_t5_tokenizer`` left
    None here (``tokenizer`` needs a folder), FLUX.1-dev's scheduler config (dynamic shifting).

    4 latent channels (16 packed), a VAE with factor 4: latents ``[4, 8, 8]`` for 32-pixel images."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
                                         guidance_embeds=guidance_embeds)
    text_encoder = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32,
                                                intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                                vocab_size=64, max_position_embeddings=77, hidden_act="gelu"))
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(T5_WORDS) + 3, d_model=32, d_kv=8, d_ff=37,
                                             num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                             pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    vae = AutoencoderKL(block_out_channels=(4, 8, 8), in_channels=3, out_channels=3, latent_channels=4,
                        norm_num_groups=2, layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
            "tokenizer": None, "tokenizer_2": tiny_t5_tokenizer(), "scheduler": scheduler}


def write_tiny_flux(root: str | Path, *, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """Write a random-weight FLUX.1 (``tiny_flux_components``; ``guidance_embeds=False`` is schnell-like) in the
    diffusers layout with ``model_index.json`` naming ``FluxPipeline``. Nothing downloaded."""
    from transformers.utils import logging as tlog

    tlog.disable_progress_bar()
    root = Path(root)
    parts = tiny_flux_components(seed=seed, guidance_embeds=guidance_embeds)
    parts["tokenizer"] = tiny_clip_tokenizer(root / "tokenizer")
    return save_pipeline("FluxPipeline", parts, root)


def tiny_sdxl_components(*, seed: int = 0, prediction_type: str = "epsilon") -> dict[str, object]:
    """Random-weight SDXL components under ``StableDiffusionXLPipeline``'s argument names (diffusers' SDXL test
    sizes: a text-time UNet, 32-wide CLIP encoders, the second with projection), an ``EulerDiscreteScheduler``
    (SDXL base's), tokenizers left None (``tiny_clip_tokenizer`` needs a folder). Latents ``[4, 8, 8]``, images
    32 pixels."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=2,
    )  # 80 = 6 time ids x 8 + the 32-wide pooled text embedding
    clip = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                          num_attention_heads=4, num_hidden_layers=2, vocab_size=64, max_position_embeddings=77,
                          projection_dim=32, hidden_act="gelu")
    text_encoder, text_encoder_2 = CLIPTextModel(clip), CLIPTextModelWithProjection(clip)
    vae = AutoencoderKL(block_out_channels=(4, 8, 8), in_channels=3, out_channels=3, latent_channels=4,
                        norm_num_groups=2, layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, force_upcast=True)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule="scaled_linear", timestep_spacing="leading",
                                       prediction_type=prediction_type)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
            "tokenizer": None, "tokenizer_2": None, "scheduler": scheduler}


def write_tiny_sdxl(root: str | Path, *, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Write a random-weight SDXL (``tiny_sdxl_components``) in the diffusers layout with ``model_index.json``
    naming ``StableDiffusionXLPipeline`` (``force_zeros_for_empty_prompt: true``). Nothing downloaded."""
    from transformers.utils import logging as tlog

    tlog.disable_progress_bar()
    root = Path(root)
    parts = tiny_sdxl_components(seed=seed, prediction_type=prediction_type)
    parts["tokenizer"] = tiny_clip_tokenizer(root / "tokenizer")
    parts["tokenizer_2"] = tiny_clip_tokenizer(root / "tokenizer_2")
    return save_pipeline("StableDiffusionXLPipeline", parts, root)


def write_tiny_pixart(root: str | Path, *, seed: int = 0) -> Path:
    """Write a random-weight PixArt-Sigma in the diffusers layout (diffusers' PixArt test sizes: 2 layers, learned
    variance, 32-wide T5 from ``tiny_t5_tokenizer``; a DPM-Solver++ scheduler as PixArt-Sigma ships) with
    ``model_index.json`` naming ``PixArtSigmaPipeline``. Latents ``[4, 8, 8]``, images 32 pixels."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel
    from transformers.utils import logging as tlog

    tlog.disable_progress_bar()
    root = Path(root)
    torch.manual_seed(seed)
    parts = {
        "transformer": PixArtTransformer2DModel(
            sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
            caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True,
            activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
            norm_elementwise_affine=False, norm_eps=1e-6),
        "vae": AutoencoderKL(block_out_channels=(4, 8, 8), in_channels=3, out_channels=3, latent_channels=4,
                             norm_num_groups=2, layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 3,
                             up_block_types=("UpDecoderBlock2D",) * 3),
        "text_encoder": T5EncoderModel(T5Config(vocab_size=len(T5_WORDS) + 3, d_model=32, d_kv=8, d_ff=37,
                                                num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)),
        "tokenizer": tiny_t5_tokenizer(),
        "scheduler": DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear"),
    }
    return save_pipeline("PixArtSigmaPipeline", parts, root)


def save_pipeline(pipeline: str, parts: dict[str, object], root: Path) -> Path:
    """Write ``parts`` (components under the pipeline's argument names; None for a left-out optional one) to
    ``root`` with diffusers' own ``<pipeline>(**parts).save_pretrained``: every sub-folder plus
    ``model_index.json`` (with the pipeline's registered config, SDXL's ``force_zeros_for_empty_prompt``)."""
    import diffusers

    getattr(diffusers, pipeline)(**parts).save_pretrained(root)
    return root


def tiny_gemma_tokenizer(max_length: int = 512) -> object:
    """A Gemma-style fast tokenizer built in memory: WordLevel over ``T5_WORDS``, ``<pad>`` 0, ``<eos>`` 1,
    ``<bos>`` 2 prepended, ``<unk>`` 3. Nothing downloaded."""
    return _word_level_tokenizer({"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}, "<bos> $A", "<bos>", max_length,
                                 pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>")


def write_tiny_sana(root: str | Path, *, seed: int = 0) -> Path:
    """Write a random-weight Sana in the diffusers layout (diffusers' Sana test sizes: one linear-attention
    layer, a 2-block ``AutoencoderDC`` (factor 2), a one-layer ``Gemma2Model``; the flow DPM-Solver++ scheduler
    Sana ships) with ``model_index.json`` naming ``SanaPipeline``. Latents ``[4, 16, 16]``, images 32 pixels."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model
    from transformers.utils import logging as tlog

    tlog.disable_progress_bar()
    root = Path(root)
    torch.manual_seed(seed)
    parts = {
        "transformer": SanaTransformer2DModel(
            patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=4,
            num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
            sample_size=16),
        "vae": AutoencoderDC(
            in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
            decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
            encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), downsample_block_type="conv",
            upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
            scaling_factor=0.41407),
        "text_encoder": Gemma2Model(Gemma2Config(
            head_dim=16, hidden_size=8, intermediate_size=64, max_position_embeddings=512, num_attention_heads=2,
            num_hidden_layers=1, num_key_value_heads=2, vocab_size=len(T5_WORDS) + 4, pad_token_id=0,
            bos_token_id=2, eos_token_id=1, attn_implementation="eager")),
        "tokenizer": tiny_gemma_tokenizer(),
        "scheduler": DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True,
                                                 prediction_type="flow_prediction"),
    }
    return save_pipeline("SanaPipeline", parts, root)


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
    from transformers import CLIPTextConfig, CLIPTextModel
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
    tokenizer = tiny_clip_tokenizer(root / "tokenizer")
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

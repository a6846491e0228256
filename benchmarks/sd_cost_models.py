"""Random-weight generators at real scale for ``sd_cost.py``: SD 1.5, SDXL and FLUX-sized denoisers, their VAEs,
an ``AutoencoderTiny`` per latent space, and CPU-sized ("tiny") versions of each family; nothing is downloaded.

The configs are those of the public checkpoints' ``config.json`` files (runwayml/stable-diffusion-v1-5,
stabilityai/stable-diffusion-xl-base-1.0, black-forest-labs/FLUX.1-dev; madebyollin/taesd, taesdxl, taef1 for
the tiny decoders), typed in here so that nothing is fetched. Weights are random: times, FLOPs and memory are the
architecture's, not a trained model's. ``build_models(spec, device, dtype)`` makes them directly on ``device``
(``"meta"`` for FLOP counting without memory).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, FluxTransformer2DModel, UNet2DConditionModel
from torch import Tensor, nn

from longtail.heads import EpistemicClassifier
from longtail.models.bridge import BridgeConfig
from longtail.models.classifiers import bridged_classifier, load_classifier

SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
              block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_VAE = dict(SD_VAE, latent_channels=16, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)
TAESD = dict()  # AutoencoderTiny's defaults are taesd's (and taesdxl's) config
TAEF1 = dict(latent_channels=16)

TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3, scaling_factor=0.18215)
TINY_TAESD = dict(encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                  num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1))
TINY_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                 attention_head_dim=8, norm_num_groups=8)
TINY_SDXL_UNET = dict(TINY_UNET, transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4),
                      use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=32 + 6 * 8)
TINY_FLUX = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                 axes_dims_rope=(4, 6, 6))

IMAGENET_BRIDGE = BridgeConfig(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), in_channels=3)


@dataclass(frozen=True)
class SizeSpec:
    """One generator size: family (``sd`` | ``sdxl`` | ``flux``), image side in pixels, configs, conditioning.

    ``text`` is (tokens, width) of the text encoder's hidden states; ``pooled`` the width of the pooled text
    embedding (SDXL's ``text_embeds``, FLUX's ``pooled_projections``; 0: none). ``cfg_batch``: the denoiser
    runs on 2B latents (classifier-free guidance) for the SD families and on B for FLUX, which is
    guidance-distilled (FLUX.1-dev takes the CFG scale as an input, one forward per step).
    """

    name: str
    family: str
    image: int
    denoiser: dict
    vae: dict
    taesd: dict
    text: tuple[int, int]
    pooled: int = 0
    batch: int = 8  # default batch on a GPU
    dtype: str = "fp16"  # default dtype on a GPU (CPU: fp32)
    classifier: str = "resnet50"
    num_classes: int = 1000
    bridge: BridgeConfig | None = None  # None: the classifier's own (torchvision's ImageNet 232 -> 224)
    note: str = field(default="", compare=False)

    @property
    def vae_factor(self) -> int:
        """Pixels per latent cell along a side (8 for the real VAEs)."""
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(c, h, w) of the latents the sampler holds (unpacked for FLUX)."""
        side = self.image // self.vae_factor
        return (self.vae["latent_channels"], side, side)

    @property
    def cfg_batch(self) -> int:
        """Denoiser batch per latent: 2 with classifier-free guidance (SD, SDXL), 1 for guidance-distilled FLUX."""
        return 1 if self.family == "flux" else 2


SIZES: dict[str, SizeSpec] = {
    "sd15": SizeSpec("sd15", "sd", 512, dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
                     SD_VAE, TAESD, text=(77, 768), batch=8,
                     note="SD 1.5: UNet 320/640/1280/1280, 768-d cross-attention, 4-level VAE, 512 px"),
    "sdxl": SizeSpec("sdxl", "sdxl", 1024, SDXL_UNET, dict(SD_VAE, sample_size=1024, scaling_factor=0.13025),
                     TAESD, text=(77, 2048), pooled=1280, batch=4,
                     note="SDXL base: UNet 320/640/1280 with 1/2/10 transformer layers, 2048-d text, 1024 px"),
    "flux": SizeSpec("flux", "flux", 1024, FLUX_TRANSFORMER, FLUX_VAE, TAEF1, text=(512, 4096), pooled=768,
                     batch=2, dtype="bf16",
                     note="FLUX.1-dev: 19 double + 38 single blocks, 3072-d, 16-channel VAE, 512 T5 tokens, 1024 px"),
    "tiny": SizeSpec("tiny", "sd", 64, TINY_UNET, TINY_VAE, TINY_TAESD, text=(8, 32), batch=2, dtype="fp32",
                     classifier="resnet18", num_classes=10, bridge=IMAGENET_BRIDGE,
                     note="SD family at test size (CPU)"),
    "tiny-sdxl": SizeSpec("tiny-sdxl", "sdxl", 64, TINY_SDXL_UNET, TINY_VAE, TINY_TAESD, text=(8, 32), pooled=32,
                          batch=2, dtype="fp32", classifier="resnet18", num_classes=10, bridge=IMAGENET_BRIDGE,
                          note="SDXL family at test size (CPU)"),
    "tiny-flux": SizeSpec("tiny-flux", "flux", 64, TINY_FLUX, dict(TINY_VAE, latent_channels=16),
                          dict(TINY_TAESD, latent_channels=16), text=(8, 32), pooled=32, batch=2, dtype="fp32",
                          classifier="resnet18", num_classes=10, bridge=IMAGENET_BRIDGE,
                          note="FLUX family at test size (CPU)"),
}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create floating-point parameters in ``dtype`` (saves the fp32 copy of a 12B-parameter model)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@dataclass
class Models:
    """The parts of one guided step, frozen, in eval mode, on one device.

    ``denoiser``: UNet2DConditionModel or FluxTransformer2DModel; ``vae``: the AutoencoderKL; ``tiny``: the
    AutoencoderTiny of the same latent space; ``classifier``: a ``BridgedClassifier`` (decoded images in
    [-1, 1] -> ``ClassifierOutput``; ResNet + 5-head Epistemic Head); ``cond``: the denoiser's conditioning
    for a batch of ``batch`` latents (already doubled for CFG).
    """

    spec: SizeSpec
    denoiser: nn.Module
    vae: AutoencoderKL
    tiny: AutoencoderTiny
    classifier: nn.Module
    cond: dict[str, Tensor]
    batch: int

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device


def conditioning(spec: SizeSpec, batch: int, device: torch.device | str, dtype: torch.dtype) -> dict[str, Tensor]:
    """Random text conditioning for ``batch`` latents: ``text [cfg_batch * B, L, D]`` and the family's extras
    (SDXL: ``text_embeds [2B, pooled]``, ``time_ids [2B, 6]``; FLUX: ``pooled [B, pooled]``, ``txt_ids [L, 3]``,
    ``img_ids [h/2 * w/2, 3]``, ``guidance [B]``). Seeded, so every call gives the same tensors."""
    gen = torch.Generator().manual_seed(0)
    n = batch * spec.cfg_batch
    tokens, width = spec.text

    def rand(*shape: int) -> Tensor:
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    cond = {"text": rand(n, tokens, width)}
    if spec.family == "sdxl":
        size = float(spec.image)
        cond["text_embeds"] = rand(n, spec.pooled)
        cond["time_ids"] = torch.tensor([size, size, 0.0, 0.0, size, size], dtype=dtype).repeat(n, 1).to(device)
    if spec.family == "flux":
        _, h, w = spec.latent_shape
        cond["pooled"] = rand(n, spec.pooled)
        cond["txt_ids"] = torch.zeros(tokens, 3, dtype=dtype, device=device)
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 1] = torch.arange(h // 2)[:, None]
        ids[..., 2] = torch.arange(w // 2)[None, :]
        cond["img_ids"] = ids.reshape(-1, 3).to(device=device, dtype=dtype)
        cond["guidance"] = torch.full((n,), 3.5, dtype=torch.float32, device=device)
    return cond


def build_classifier(spec: SizeSpec, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """ResNet (random weights) + a 5-head Epistemic Head behind its preprocessing bridge, frozen."""
    loaded = load_classifier(spec.classifier, num_classes=spec.num_classes, preprocess=spec.bridge)
    bridged = bridged_classifier(replace(loaded, model=EpistemicClassifier(loaded.model, num_heads=5)))
    return bridged.to(device=device, dtype=dtype).eval().requires_grad_(False)


def build_models(spec: SizeSpec, device: torch.device | str, dtype: torch.dtype, batch: int,
                 seed: int = 0) -> Models:
    """Every part of ``spec`` with random weights, built directly on ``device`` in ``dtype`` (``"meta"``: shapes
    only, for ``FlopCounterMode``). Raises ``torch.cuda.OutOfMemoryError`` when they do not fit."""
    torch.manual_seed(seed)
    cls = FluxTransformer2DModel if spec.family == "flux" else UNet2DConditionModel
    with torch.device(device), default_dtype(dtype):
        denoiser = cls(**spec.denoiser)
        vae = AutoencoderKL(**spec.vae)
        tiny = AutoencoderTiny(**spec.taesd)
    parts = [m.to(dtype=dtype).eval().requires_grad_(False) for m in (denoiser, vae, tiny)]
    classifier = build_classifier(spec, device, dtype)
    return Models(spec, *parts, classifier=classifier, cond=conditioning(spec, batch, device, dtype), batch=batch)

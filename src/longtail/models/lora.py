"""LoRA adaptation of a Stable Diffusion 1.x / 2.x UNet to the user's images (``longtail adapt-generator``).

The recipe of diffusers' ``train_text_to_image_lora.py`` / DreamBooth-LoRA examples: the UNet, VAE and text
encoder frozen, low-rank adapters (peft ``LoraConfig``, ``unet.add_adapter``) on the attention projections
``to_q``, ``to_k``, ``to_v``, ``to_out.0``, trained with the denoising loss (epsilon or v, as the model's
scheduler predicts) on the user's ImageFolder, each image prompted with its class prompt (``longtail.prompts``,
the template every job prompts with) or, from a captions file, its own caption half of the time. peft starts the
adapters' up-projection ``B`` at zero, so an untrained adapter leaves the model's output unchanged.

Frozen parts are run once: every image is encoded by the VAE before training (its posterior mean and std are
kept; each step draws a latent from them) and every distinct prompt by the text encoder. There is no image
augmentation (an encoded flip would be another image).

Output: ``pytorch_lora_weights.safetensors`` in diffusers' LoRA format (``get_peft_model_state_dict`` ->
``convert_state_dict_to_diffusers`` -> ``StableDiffusionPipeline.save_lora_weights``; diffusers'
``pipeline.load_lora_weights(OUT)`` reads it too) and ``longtail_lora.json`` (base model, class names, prompt
template, settings, final loss). :func:`load_lora` puts it on a loaded UNet at a chosen scale
(``generator.lora`` / ``generator.lora_scale`` in every job).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..config import ConfigError
from ..files import check_run_marker, load_checkpoint, read_state_dict, write_json

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' file name for LoRA weights
LORA_META = "longtail_lora.json"
ADAPTER_NAME = "longtail"
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections, as diffusers' LoRA scripts
MARKER = "lora_in_progress.json"


@dataclass
class LoraTrainConfig:
    """Settings of ``longtail adapt-generator``.

    ``rank`` / ``alpha`` (None: ``alpha = rank``, scale 1): the adapters' size and scale; ``init``: peft's
    ``init_lora_weights`` (``gaussian`` as diffusers' scripts, or ``true`` for peft's default; ``B = 0`` with
    either); ``steps`` optimizer steps of ``batch_size`` images at ``lr`` (AdamW, linear warm-up over
    ``warmup_steps``, cosine decay); ``resolution``: training image side in pixels (None: the model's default);
    ``p_caption``: how often an image with a caption is prompted with it instead of its class prompt.
    """

    rank: int = 4
    alpha: float | None = None
    init: str = "gaussian"
    steps: int = 500
    lr: float = 1e-4
    batch_size: int = 4
    warmup_steps: int = 0
    resolution: int | None = None
    prompt_template: str = "a photo of {a} {}"
    p_caption: float = 0.5
    seed: int = 0
    checkpoint_every: int = 100


def peft_config(cfg: LoraTrainConfig):
    """The peft ``LoraConfig`` of ``cfg`` on :data:`TARGET_MODULES`."""
    from peft import LoraConfig

    init: bool | str = {"true": True, "gaussian": "gaussian"}.get(str(cfg.init).lower(), cfg.init)
    if init not in (True, "gaussian"):
        raise ConfigError(f"init must be 'gaussian' or 'true' (peft's default), got {cfg.init!r}")
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha or cfg.rank, init_lora_weights=init,
                          target_modules=list(TARGET_MODULES))


def check_config(cfg: LoraTrainConfig) -> None:
    """Raise ConfigError naming the first setting out of range."""
    for key in ("rank", "batch_size", "checkpoint_every"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.steps < 0 or cfg.warmup_steps < 0 or cfg.lr < 0:
        raise ConfigError("steps, warmup_steps and lr must be >= 0")
    if not 0 <= cfg.p_caption <= 1:
        raise ConfigError(f"p_caption must lie in [0, 1], got {cfg.p_caption}")


def check_base_model(model: str | Path) -> None:
    """Raise ConfigError unless ``model`` is a local directory whose ``model_index.json`` (if any) names a
    ``StableDiffusionPipeline`` (SD 1.x / 2.x); SDXL, SD3 and the others need other conditioning in training."""
    root = Path(model).expanduser()
    if not root.is_dir():
        raise ConfigError(f"--model {model}: adapt-generator needs a local Stable Diffusion directory "
                          "(diffusers layout)")
    index = root / "model_index.json"
    name = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    if name not in (None, "StableDiffusionPipeline"):
        raise ConfigError(f"--model {model} is a {name}; adapt-generator trains LoRA for Stable Diffusion 1.x / "
                          "2.x (StableDiffusionPipeline)")


# --- loading ----------------------------------------------------------------------------------------------------


def lora_file(path: str | Path) -> Path:
    """The weights file of a LoRA: ``path`` itself (a ``.safetensors`` file) or ``path/`` :data:`LORA_WEIGHTS`.
    Raises FileNotFoundError naming what is missing, ValueError for another file type (only safetensors load)."""
    path = Path(path).expanduser()
    file = path / LORA_WEIGHTS if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no LoRA weights at {file} (longtail adapt-generator writes {LORA_WEIGHTS})")
    if file.suffix != ".safetensors":
        raise ValueError(f"{file}: LoRA weights load only from .safetensors files")
    return file


def load_lora(unet: torch.nn.Module, path: str | Path, scale: float = 1.0, adapter_name: str = ADAPTER_NAME) -> None:
    """Put the LoRA at ``path`` (:func:`lora_file`) on ``unet`` (a diffusers ``UNet2DConditionModel``) at
    ``scale`` (0: the base model's output, bit for bit). The weights are read through safetensors and handed to
    diffusers' ``load_lora_adapter`` (keys ``unet.*``, diffusers or peft naming), then ``set_adapters``.

    Raises FileNotFoundError / ValueError (see :func:`lora_file`) and ValueError naming the file when its
    adapters do not fit the UNet (another base model).
    """
    file = lora_file(path)
    state = read_state_dict(file, "LoRA weights")
    try:
        unet.load_lora_adapter(state, prefix="unet", adapter_name=adapter_name)
    except (ValueError, KeyError, RuntimeError) as err:
        lines = [x.strip() for x in str(err).strip().splitlines() if x.strip()] or [type(err).__name__]
        more = f" (+{len(lines) - 1} more lines; LONGTAIL_DEBUG=1 shows them)" if len(lines) > 1 else ""
        raise ValueError(f"{file}: these LoRA weights do not fit this generator's denoiser (made for another base "
                         f"model?): {lines[0][:200]}{more}") from err
    if not getattr(unet, "peft_config", None) or adapter_name not in unet.peft_config:
        raise ValueError(f"{file}: no adapter of this UNet is in it (keys start with 'unet.'?)")
    unet.set_adapters([adapter_name], weights=[float(scale)])
    unet.requires_grad_(False)


# --- training ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_images(ldm, paths: list[Path], resolution: int, batch: int = 8, show: bool = True) -> tuple[Tensor, Tensor]:
    """VAE posterior means and stds ``[N, c, h, w]`` (unscaled) of the images at ``paths``, each decoded, resized
    (shorter side) and center-cropped to ``resolution`` and mapped to [-1, 1]."""
    from .tiny_data import load_images

    channels = ldm.vae.config.in_channels
    means, stds = [], []
    for start in tqdm(range(0, len(paths), batch), desc="encode", disable=not show):
        x = load_images(paths[start : start + batch], resolution, channels, show=False)
        dist = ldm.vae.encode((x.float() / 127.5 - 1.0).to(ldm.vae.device, ldm.vae.dtype)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _check_marker(out: Path, settings: dict) -> None:
    """Refuse to resume a run in ``out`` begun with other settings (naming them); record the settings. A run
    without a checkpoint yet starts afresh whatever its marker says."""
    check_run_marker(out / MARKER, settings, started=(out / "checkpoint" / "state.pt").is_file()
                     and (out / MARKER).is_file(), what="a LoRA training run", way_out="use another --out")


def _save_state(path: Path, step: int, unet, opt, sched, gen: torch.Generator, losses: list[float]) -> None:
    """Adapter weights (safetensors) and optimizer / schedule / RNG state (weights-only torch) to resume from."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    lora = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME).items()}
    save_file(lora, str(path / "lora.safetensors.tmp"))
    torch.save({"step": step, "opt": opt.state_dict(), "sched": sched.state_dict(), "gen": gen.get_state(),
                "losses": losses[-200:]}, path / "state.pt.tmp")
    for name in ("lora.safetensors", "state.pt"):
        (path / f"{name}.tmp").replace(path / name)


def _load_state(path: Path, unet, opt, sched, gen: torch.Generator) -> tuple[int, list[float]]:
    from peft.utils import set_peft_model_state_dict

    set_peft_model_state_dict(unet, read_state_dict(path / "lora.safetensors", "LoRA checkpoint"),
                              adapter_name=ADAPTER_NAME)
    state = load_checkpoint(path / "state.pt", "LoRA training state")
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    gen.set_state(state["gen"])
    return int(state["step"]), list(state["losses"])


def _prompt_ids(labels: list[int], class_names: list[str], captions: list[str | None], template: str
                ) -> tuple[list[str], Tensor]:
    """Unique prompts and per-image indices ``[N, 2]``: (class prompt, caption or the class prompt again)."""
    from ..prompts import class_prompts

    by_class = class_prompts(class_names, template)
    table: dict[str, int] = {}
    rows = []
    for label, caption in zip(labels, captions, strict=True):
        cls = table.setdefault(by_class[label], len(table))
        rows.append([cls, table.setdefault(caption, len(table)) if caption else cls])
    return list(table), torch.tensor(rows, dtype=torch.long)


def train_lora(
    model: str | Path,
    data: str | Path,
    out: str | Path,
    cfg: LoraTrainConfig | None = None,
    captions: str | Path | None = None,
    device: str | torch.device = "cpu",
    show: bool = True,
    log: Callable[[str], None] | None = print,
) -> Path:
    """Train a LoRA of the Stable Diffusion 1.x / 2.x model in ``model`` (a local diffusers directory) on the
    ImageFolder ``data/<class>/<image>`` and write it to ``out`` (module docstring). Returns ``out``.

    Resumable: the adapters, optimizer and RNG are saved every ``cfg.checkpoint_every`` steps under
    ``out/checkpoint`` and a second call continues from there (ValueError when the settings differ). Loss per
    step: MSE between the UNet's output and the noise (or v, for v-prediction models) at uniform timesteps.
    Raises ConfigError for a model that is not an SD 1.x / 2.x UNet or settings out of range, DataError for
    unreadable data or captions.
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from ..data.imagefolder import scan_imagefolder
    from .stable_diffusion import load_stable_diffusion
    from .tiny_data import check_size, read_captions

    cfg = cfg or LoraTrainConfig()
    check_config(cfg)
    check_base_model(model)
    started = time.perf_counter()
    out = Path(out)
    ldm = load_stable_diffusion(model, dtype="fp32", device=device)
    if not isinstance(ldm.unet, UNet2DConditionModel):
        raise ConfigError(f"{model}: adapt-generator trains LoRA for Stable Diffusion 1.x / 2.x UNets, not "
                          f"{type(ldm.unet).__name__}")
    resolution = cfg.resolution or ldm.image_size[0]
    check_size(resolution, ldm.vae_scale_factor * 2 ** (len(ldm.unet.config.block_out_channels) - 1),
               "resolution (--resolution)")
    index = scan_imagefolder(data)
    texts = read_captions(captions, data, index.paths) if captions is not None else [None] * len(index.paths)
    settings = {"model": str(Path(model).resolve()), "data": str(Path(data).resolve()),
                "images": _digest([str(p) for p in index.paths]), "labels": _digest(index.labels),
                "captions": _digest(texts), "config": {**asdict(cfg), "resolution": resolution}}
    _check_marker(out, settings)
    _log(log, f"{len(index.paths)} images of {len(index.class_names)} classes at {resolution} px; "
              f"{sum(t is not None for t in texts)} captions; LoRA rank {cfg.rank} on {', '.join(TARGET_MODULES)}")

    means, stds = encode_images(ldm, list(index.paths), resolution, show=show)
    prompts, ids = _prompt_ids(list(index.labels), index.class_names, texts, cfg.prompt_template)
    unet = ldm.unet
    unet.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    unet.add_adapter(peft_config(cfg), adapter_name=ADAPTER_NAME)
    losses = fit_adapter(ldm, means * ldm.scaling_factor, stds * ldm.scaling_factor, ldm.encode_prompts(prompts).float(),
                         ids, cfg, out / "checkpoint", show=show, log=log)
    unet.eval()
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME))
    StableDiffusionPipeline.save_lora_weights(save_directory=out, unet_lora_layers=layers, safe_serialization=True)
    final = sum(losses[-50:]) / len(losses[-50:]) if losses else math.nan
    write_json(out / LORA_META, {
        "format": 1, "base_model": str(model), "class_names": list(index.class_names),
        "prompt_template": cfg.prompt_template, "config": {**asdict(cfg), "resolution": resolution},
        "train_images": len(index.paths), "captions": sum(t is not None for t in texts),
        "final_loss": None if math.isnan(final) else final, "seconds": round(time.perf_counter() - started, 1),
    })
    (out / MARKER).unlink(missing_ok=True)
    shutil.rmtree(out / "checkpoint", ignore_errors=True)
    _log(log, f"LoRA saved to {out / LORA_WEIGHTS} (final loss {final:.4f}); use it with "
              f"--set generator.lora={out}")
    return out


def fit_adapter(ldm, latents: Tensor, latent_std: Tensor, text: Tensor, prompt_ids: Tensor, cfg: LoraTrainConfig,
                checkpoint: Path, show: bool = True, log: Callable[[str], None] | None = print) -> list[float]:
    """The denoising loss on the adapters of ``ldm.unet`` (its only trainable parameters) for ``cfg.steps``
    steps; returns the loss per step (of this call and the resumed ones, the last 200 kept across a resume).

    ``latents`` / ``latent_std [N, c, h, w]``: scaled posterior means and stds (each step draws
    ``mean + std * noise``); ``text [P, L, D]``: prompt embeddings; ``prompt_ids [N, 2]``: per image the class
    prompt and the caption (chosen with probability ``cfg.p_caption``). Noise at uniform timesteps of the
    model's scheduler, target epsilon or v (``prediction_type``), AdamW with warm-up + cosine decay, gradient
    norm clipped to 1. The state is saved to ``checkpoint`` every ``cfg.checkpoint_every`` steps and resumed.
    """
    from diffusers.optimization import get_cosine_schedule_with_warmup

    unet, device = ldm.unet, ldm.device
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    sched = get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, max(1, cfg.steps))
    alphas = ldm.scheduler.alphas_cumprod.float()
    v_pred = ldm.scheduler.config.prediction_type == "v_prediction"
    gen = torch.Generator().manual_seed(cfg.seed)
    random.seed(cfg.seed)
    first, losses = 0, []
    if (checkpoint / "state.pt").is_file():
        first, losses = _load_state(checkpoint, unet, opt, sched, gen)
        _log(log, f"resuming at step {first}")
    unet.train()
    bar = tqdm(range(first, cfg.steps), desc="lora", disable=not show, initial=first, total=cfg.steps)
    for step in bar:
        idx = torch.randint(0, len(latents), (cfg.batch_size,), generator=gen)
        z0 = latents[idx] + latent_std[idx] * torch.randn(latents[idx].shape, generator=gen)
        col = (torch.rand(cfg.batch_size, generator=gen) < cfg.p_caption).long()
        cond = text[prompt_ids[idx, col]]
        t = torch.randint(0, len(alphas), (cfg.batch_size,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * z0 if v_pred else noise
        pred = unet(z_t.to(device), t.to(device), encoder_hidden_states=cond.to(device)).sample
        loss = F.mse_loss(pred.float(), target.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            _save_state(checkpoint, step + 1, unet, opt, sched, gen, losses)
    return losses


def _log(log: Callable[[str], None] | None, msg: str) -> None:
    if log is not None:
        log(msg)

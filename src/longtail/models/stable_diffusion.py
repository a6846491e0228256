"""Stable Diffusion 1.x / 2.x as a ``LatentDiffusion``, per-class prompts, the decoder -> classifier bridge.

``load_stable_diffusion`` reads a diffusers-layout directory (``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``) or a hub id and returns the same ``LatentDiffusion`` the embedded default
uses, so ``longtail.generate.generate`` and ``longtail.sampling.sample`` run on it unchanged. The noise
prediction type (epsilon for SD 1.x and 2.x-base, v for SD 2.x 768) comes from the scheduler config; the
sampler converts it. Any scheduler choice is built with ``clip_sample=False``: clipping *latents* to [-1, 1]
collapses samples (``longtail.sampling.check_scheduler`` refuses it).

``ClassifierBridge`` maps decoded images (``[B, 3, H, W]`` in [-1, 1]) into a classifier's own input
convention with differentiable ops only, so the longtail gradient flows from the classifier back to the
latent.

Memory on the guidance path. Longtail guidance backpropagates through the VAE decoder at every guided step;
the paper (A.5) reports 45 GB at batch 8 for SD 1.4 in fp16 at 512 px without gradient checkpointing, most of
it decoder activations (the memory problem of diffusers issue 1883, for which PR 2536 made the decoder
checkpointable). ``decoder_checkpointing=True`` recomputes the decoder's mid and up blocks during the
backward pass (``longtail.models.ldm.set_decoder_checkpointing``; active in eval mode under
``torch.enable_grad()``, inactive under ``no_grad``). Measured on 2 CPU cores (one thread, the other core busy
with another job), float32, one 64x64x4 latent -> 512x512x3 through an ``AutoencoderKL`` decoder with
block_out_channels (32, 64, 64, 64) and 2 layers per block (1.0M decoder parameters; SD's decoder has
about 49M, widths (128, 256, 512, 512)), as peak-RSS growth of a fresh process over a no-grad decode of the
same latent, with ``OMP_NUM_THREADS=1 python benchmarks/surrogate_decoder.py --memory``:

    decode + backward, plain               +1239 MiB   9.0 s
    decode + backward, checkpointing        +695 MiB   9.4 s
    decode + backward, 32-channel surrogate +195 MiB   1.7 s   (``longtail.models.surrogate``)

Checkpointing saves less than half here: each checkpointed segment is a whole up block, and recomputing the
last (full-resolution) block during backward holds its activations again, as do the output norm and conv,
which diffusers leaves outside the checkpoints. The gradient is the same with and without checkpointing
(tests/test_stable_diffusion.py).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
)
from torch import Tensor, nn

from ..heads import ClassifierOutput
from .ldm import LatentDiffusion, set_decoder_checkpointing

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SCHEDULERS = ("ddim", "dpm++", "euler")
# Sub-folders of the diffusers layout and the file each must hold.
LAYOUT: dict[str, str | None] = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "tokenizer": None,
    "scheduler": "scheduler_config.json",
}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


# --- loading ------------------------------------------------------------------------------------------------


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"fp32" | "fp16" | "bf16"`` (or a ``torch.dtype``) -> ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}") from None


def make_scheduler(name: str, config: Mapping[str, object], prediction_type: str | None = None) -> object:
    """A ``ddim`` | ``dpm++`` | ``euler`` scheduler from a (Stable Diffusion) scheduler config.

    Betas, timestep spacing and ``prediction_type`` come from ``config`` (``prediction_type`` overrides it);
    sample clipping and thresholding are always off (they are meant for pixel-space models).
    """
    base = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    base.update(clip_sample=False, thresholding=False)
    if prediction_type is not None:
        base["prediction_type"] = prediction_type
    key = name.lower().replace("_", "").replace("-", "")
    if key == "ddim":
        return DDIMScheduler.from_config(base)
    if key in ("dpm++", "dpmpp", "dpmsolver++", "dpmsolver"):
        return DPMSolverMultistepScheduler.from_config(base, algorithm_type="dpmsolver++")
    if key == "euler":
        return EulerDiscreteScheduler.from_config(base)
    raise ValueError(f"unknown scheduler {name!r}; choose one of {list(SCHEDULERS)}")


def _source(model: str | Path) -> tuple[str | Path, bool]:
    """``(location, is_local)``: an existing directory, else something that reads as a hub id ``org/name``."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path, True
    if path.is_file():
        raise ValueError(
            f"{path} is a file; load_stable_diffusion needs a directory in the diffusers layout "
            "(unet/, vae/, text_encoder/, tokenizer/, scheduler/). Convert a single-file checkpoint once "
            "with StableDiffusionPipeline.from_single_file(...).save_pretrained(<dir>)"
        )
    text = str(model)
    if isinstance(model, str) and _HUB_ID.fullmatch(text) and not text.startswith((".", "~")):
        return text, False
    raise FileNotFoundError(
        f"no Stable Diffusion directory at {path} (and {text!r} is not a hub id 'org/name')"
    )


def check_layout(root: Path) -> None:
    """Raise ``FileNotFoundError`` naming the first missing sub-folder, config or weights of a local model."""
    for part, config in LAYOUT.items():
        folder = root / part
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder} is missing: a Stable Diffusion directory in the diffusers layout has "
                f"{', '.join(f'{p}/' for p in LAYOUT)} "
                "(write one with StableDiffusionPipeline.save_pretrained)"
            )
        if config is not None and not (folder / config).is_file():
            raise FileNotFoundError(f"{folder / config} is missing (is {folder} a diffusers {part} folder?)")
        if part in ("unet", "vae", "text_encoder") and not any(
            f.suffix in (".safetensors", ".bin") for f in folder.iterdir()
        ):
            raise FileNotFoundError(f"{folder} has no weights (*.safetensors or *.bin)")
        if part == "tokenizer" and not any(folder.iterdir()):
            raise FileNotFoundError(
                f"{folder} is empty (expected tokenizer files such as vocab.json, merges.txt)"
            )


def load_stable_diffusion(
    model: str | Path,
    *,
    dtype: str | torch.dtype = "fp32",
    vae_dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    scheduler: str = "ddim",
    prediction_type: str | None = None,
    height: int | None = None,
    width: int | None = None,
    local_files_only: bool = True,
    decoder_checkpointing: bool = False,
    revision: str | None = None,
    variant: str | None = None,
) -> LatentDiffusion:
    """Load a Stable Diffusion 1.x / 2.x model as a ``LatentDiffusion`` in eval mode with frozen weights.

    ``model``: a local directory in the diffusers layout or a hub id (only the local cache unless
    ``local_files_only=False``). ``dtype`` applies to UNet, VAE and text encoder; ``vae_dtype`` overrides it
    for the VAE (keep the decoder in fp32 where fp16 overflows). ``height``/``width`` set the sampled image
    size (default: the UNet's ``sample_size`` times the VAE factor, 512 for SD 1.x). ``decoder_checkpointing``
    trades decoder recomputation for activation memory on the guidance path.
    """
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as tlog

    tlog.disable_progress_bar()
    where, local = _source(model)
    if local:
        check_layout(Path(where))
    torch_dtype = resolve_dtype(dtype)
    vae_torch_dtype = resolve_dtype(vae_dtype) if vae_dtype is not None else torch_dtype
    hub = {} if local else {"local_files_only": local_files_only, "revision": revision}

    def part(name: str) -> tuple[str | Path, dict]:
        if local:
            return Path(where) / name, {}
        return where, {"subfolder": name, **hub}

    def load(name: str, loader: Callable[..., object], **kw: object) -> object:
        """Run one component's loader; failures name the component and where it was looked for."""
        path, extra = part(name)
        shown = path if local else f"{where} (subfolder {name})"
        try:
            return loader(path, **extra, **kw)
        except OSError as err:
            if not local and local_files_only:
                raise OSError(
                    f"{where!r} is not a local directory and its {name} is not in the Hugging Face "
                    f"cache; pass local_files_only=False to download it, or give a local path ({err})"
                ) from err
            raise OSError(f"could not load the {name} from {shown}: {err}") from err
        except (ValueError, KeyError, RuntimeError, TypeError) as err:
            raise ValueError(f"could not load the {name} from {shown}: {err}") from err

    weights_kw = {"variant": variant} if variant else {}
    unet = load("unet", UNet2DConditionModel.from_pretrained, torch_dtype=torch_dtype, **weights_kw)
    vae = load("vae", AutoencoderKL.from_pretrained, torch_dtype=vae_torch_dtype, **weights_kw)
    text_encoder = load("text_encoder", AutoModel.from_pretrained, dtype=torch_dtype)
    tokenizer = load("tokenizer", AutoTokenizer.from_pretrained)
    sched_config = load("scheduler", DDIMScheduler.load_config)
    ldm = LatentDiffusion(
        unet=unet,
        vae=vae,
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        scheduler=make_scheduler(scheduler, sched_config, prediction_type),
        max_length=_max_length(tokenizer, text_encoder),
    )
    ldm.to(device).eval()
    _check_text_encoder(ldm, where)
    if decoder_checkpointing:
        set_decoder_checkpointing(ldm.vae, True)
    return ldm.set_image_size(height, width)


def _max_length(tokenizer: object, text_encoder: nn.Module) -> int:
    """Token length of prompts: the tokenizer's ``model_max_length`` unless it is a "no limit" sentinel."""
    n = int(getattr(tokenizer, "model_max_length", 0) or 0)
    if 0 < n <= 4096:
        return n
    return int(getattr(text_encoder.config, "max_position_embeddings", 77))


def _check_text_encoder(ldm: LatentDiffusion, where: str | Path) -> None:
    """The text encoder must give ``last_hidden_state`` whose width is the UNet's cross-attention width."""
    try:
        hidden = ldm.encode_prompts([""])  # stays cached: the empty prompt is the default negative prompt
    except AttributeError as err:
        raise ValueError(
            f"{where}: the text encoder {type(ldm.text_encoder).__name__} returns no last_hidden_state "
            f"({err})"
        ) from err
    want = ldm.unet.config.cross_attention_dim
    if isinstance(want, int) and hidden.shape[-1] != want:
        raise ValueError(
            f"{where}: text encoder width {hidden.shape[-1]} != UNet cross_attention_dim {want} "
            "(mixed components?)"
        )


# --- prompts ------------------------------------------------------------------------------------------------


def read_prompt_file(path: str | Path) -> dict[str, list[str]]:
    """Per-class prompts: JSON ``{class: prompt | [prompts]}`` or lines ``class<TAB>prompt`` (repeatable).

    In the text form, blank lines and lines starting with ``#`` are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompt file at {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object {{class: prompt or [prompts]}}")
        table = {str(k): [v] if isinstance(v, str) else list(v) for k, v in data.items()}
        bad = [k for k, v in table.items() if not v or not all(isinstance(p, str) for p in v)]
        if bad:
            raise ValueError(f"{path}: classes {bad} need a prompt string or a non-empty list of strings")
        return table
    table: dict[str, list[str]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if "\t" not in line:
            raise ValueError(f"{path}:{number}: expected 'class<TAB>prompt', got {line!r}")
        name, prompt = (s.strip() for s in line.split("\t", 1))
        table.setdefault(name, []).append(prompt)
    return table


def _fill(template: str, name: str) -> str:
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return template.format(name, name=name, a=article)


def prompt_table(
    class_names: Sequence[str], template: str = "a photo of a {}", prompt_file: str | Path | None = None
) -> list[list[str]]:
    """All prompts of each class: the prompt file's entries, else the template.

    ``template`` takes the class name as ``{}`` or ``{name}``, and ``{a}`` becomes "a" or "an".
    A prompt file naming a class outside ``class_names`` is an error (a typo would silently fall back).
    """
    table = read_prompt_file(prompt_file) if prompt_file is not None else {}
    unknown = sorted(set(table) - set(class_names))
    if unknown:
        raise ValueError(f"prompt file {prompt_file} names classes that are not in the class list: {unknown}")
    return [table.get(name) or [_fill(template, name)] for name in class_names]


def class_prompts(
    class_names: Sequence[str], template: str = "a photo of a {}", prompt_file: str | Path | None = None
) -> list[str]:
    """One prompt per class ("a photo of a {}" by default); with a prompt file, each class's first prompt."""
    return [prompts[0] for prompts in prompt_table(class_names, template, prompt_file)]


def job_prompts(table: Sequence[Sequence[str]]) -> Callable[[int, int], str]:
    """``prompts(class, index)`` for ``longtail.generate.plan_jobs``: cycles through each class's prompts."""
    return lambda c, i: table[c][i % len(table[c])]


# --- decoder -> classifier bridge ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BridgeConfig:
    """A classifier's preprocessing, applied to decoded images in [-1, 1].

    ``resize``: shorter side (int, aspect kept, as torchvision's ``Resize(int)``) or exact ``(H, W)``; then a
    center crop to ``size`` (``(H, W)``); ``None`` skips the step. The image is scaled to [0, 1] and
    normalised by ``mean``/``std``. The defaults (no resize, mean = std = 0.5) pass the decoder's [-1, 1]
    images unchanged. ``in_channels``: what the classifier reads; ``None`` keeps the decoder's channels (rule:
    ``match_channels``).
    """

    size: tuple[int, int] | None = None
    resize: int | tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    interpolation: str = "bilinear"
    in_channels: int | None = None
    source: str = "explicit"

    def __post_init__(self) -> None:
        if self.interpolation not in ("bilinear", "bicubic", "nearest", "area", "nearest-exact"):
            raise ValueError(f"unsupported interpolation {self.interpolation!r}")
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean {self.mean} and std {self.std} differ in length")

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> BridgeConfig:
        """From a plain dict (JSON / YAML); ``size`` and ``resize`` accept an int or a pair."""
        d = dict(data)
        if d.get("size") is not None:
            size = d["size"]
            d["size"] = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
        if d.get("resize") is not None and not isinstance(d["resize"], int):
            d["resize"] = tuple(int(s) for s in d["resize"])
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(float(v) for v in d[key])
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"unknown bridge settings {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_timm(cls, model: nn.Module) -> BridgeConfig:
        """From a timm model's resolved data config (``input_size``, ``crop_pct``, ``crop_mode``, ...).

        Eval transform as timm builds it: resize to ``floor(size / crop_pct)`` (the shorter side for a square
        input, exact for ``crop_mode="squash"``), then center crop to ``input_size``. A non-square input in
        ``center`` mode (timm keeps the aspect ratio there) is approximated by an exact resize.
        """
        from timm.data import resolve_model_data_config

        cfg = resolve_model_data_config(model)
        channels, h, w = cfg["input_size"]
        crop_pct = cfg.get("crop_pct") or 0.875
        mode = cfg.get("crop_mode") or "center"
        scale = (math.floor(h / crop_pct), math.floor(w / crop_pct))
        if mode == "squash" or scale[0] != scale[1]:
            resize: int | tuple[int, int] = scale
        elif mode == "center":
            resize = scale[0]
        else:
            raise ValueError(
                f"timm crop_mode {mode!r} is not supported by the bridge; pass an explicit BridgeConfig"
            )
        interp = cfg.get("interpolation", "bilinear")
        return cls(
            size=(h, w),
            resize=resize,
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
            interpolation=interp if interp in ("bilinear", "bicubic", "nearest") else "bilinear",
            in_channels=int(channels),
            source=f"timm {getattr(model, 'default_cfg', {}).get('architecture', '')}",
        )

    @classmethod
    def from_torchvision(cls, weights: object, in_channels: int = 3) -> BridgeConfig:
        """From torchvision weights, their name (``"ResNet50_Weights.IMAGENET1K_V2"``) or ``transforms()``.

        Uses the transform's ``resize_size`` / ``crop_size`` / ``mean`` / ``std`` / ``interpolation``;
        building the transform downloads nothing.
        """
        import torchvision

        if isinstance(weights, str):
            weights = torchvision.models.get_weight(weights)
        transform = weights.transforms() if hasattr(weights, "transforms") else weights
        resize = list(transform.resize_size)
        crop = list(transform.crop_size)
        crop = crop * 2 if len(crop) == 1 else crop
        interp = getattr(transform.interpolation, "value", str(transform.interpolation))
        return cls(
            size=(int(crop[0]), int(crop[1])),
            resize=int(resize[0]) if len(resize) == 1 else (int(resize[0]), int(resize[1])),
            mean=tuple(transform.mean),
            std=tuple(transform.std),
            interpolation=interp,
            in_channels=in_channels,
            source=f"torchvision {weights}",
        )


def match_channels(x: Tensor, channels: int | None) -> Tensor:
    """Adapt ``[B, C, H, W]`` to ``channels``: equal -> unchanged; RGB -> 1 channel: the unweighted mean over
    channels; 1 -> N channels: the single channel repeated. Anything else is an error."""
    c = x.shape[1]
    if channels is None or channels == c:
        return x
    if channels == 1:
        return x.mean(dim=1, keepdim=True)
    if c == 1:
        return x.expand(-1, channels, -1, -1)
    raise ValueError(
        f"cannot map {c}-channel images to a {channels}-channel classifier (only 1 <-> N is defined)"
    )


def _resized_size(h: int, w: int, resize: int | tuple[int, int]) -> tuple[int, int]:
    """torchvision's rule: an int sets the shorter side, the longer becomes ``int(size * long / short)``."""
    if not isinstance(resize, int):
        return (int(resize[0]), int(resize[1]))
    if h <= w:
        return (resize, int(resize * w / h))
    return (int(resize * h / w), resize)


def center_crop(x: Tensor, size: tuple[int, int]) -> Tensor:
    """torchvision's ``center_crop`` (same rounding; zero padding when the crop is larger than the image)."""
    ch, cw = size
    h, w = x.shape[-2:]
    if ch > h or cw > w:
        pad = [
            (cw - w) // 2 if cw > w else 0,
            (cw - w + 1) // 2 if cw > w else 0,
            (ch - h) // 2 if ch > h else 0,
            (ch - h + 1) // 2 if ch > h else 0,
        ]
        x = F.pad(x, pad, value=0.0)
        h, w = x.shape[-2:]
    top, left = round((h - ch) / 2.0), round((w - cw) / 2.0)
    return x[..., top : top + ch, left : left + cw]


class ClassifierBridge(nn.Module):
    """Differentiable preprocessing from the decoder's output to a classifier's input.

    ``[B, C, H, W]`` in [-1, 1] -> ``[B, C', h, w]`` float32: channels matched (``match_channels``), scaled to
    [0, 1], resized (``F.interpolate``, antialiased for bilinear/bicubic, as torchvision does on tensors),
    center cropped, normalised by mean/std. No clamping, so out-of-range pixels keep their gradient.
    """

    def __init__(self, config: BridgeConfig | None = None, **overrides: object) -> None:
        super().__init__()
        config = config or BridgeConfig()
        self.config = BridgeConfig.from_dict({**config.to_dict(), **overrides}) if overrides else config
        self.register_buffer("mean", torch.tensor(self.config.mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(self.config.std, dtype=torch.float32), persistent=False)

    @classmethod
    def from_timm(cls, model: nn.Module) -> ClassifierBridge:
        return cls(BridgeConfig.from_timm(model))

    @classmethod
    def from_torchvision(cls, weights: object, in_channels: int = 3) -> ClassifierBridge:
        return cls(BridgeConfig.from_torchvision(weights, in_channels))

    def _normalise(self, x: Tensor) -> Tensor:
        mean, std = self.mean, self.std
        c = x.shape[1]
        if len(mean) not in (1, c):
            if c != 1:
                raise ValueError(f"bridge mean/std have {len(mean)} values for {c}-channel images")
            mean, std = mean.mean(0, keepdim=True), std.mean(0, keepdim=True)  # a grayscale view of RGB stats
        return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Decoded images ``[B, C, H, W]`` in [-1, 1] -> classifier input ``[B, C', h, w]`` (float32)."""
        cfg = self.config
        x = match_channels(x.float(), cfg.in_channels)
        x = (x + 1.0) / 2.0
        if cfg.resize is not None:
            size = _resized_size(x.shape[-2], x.shape[-1], cfg.resize)
            if size != tuple(x.shape[-2:]):
                smooth = cfg.interpolation in ("bilinear", "bicubic")
                x = F.interpolate(
                    x,
                    size=size,
                    mode=cfg.interpolation,
                    antialias=smooth,
                    align_corners=False if smooth else None,
                )
        if cfg.size is not None:
            x = center_crop(x, cfg.size)
        return self._normalise(x)

    def extra_repr(self) -> str:
        return repr(self.config)


class BridgedClassifier(nn.Module):
    """``classifier(bridge(x))``: the callable to pass as ``classifier=`` to ``generate`` / ``sample``.

    The bridged input is cast to the classifier's parameter dtype; the output (logits or ``ClassifierOutput``)
    is passed through unchanged.
    """

    def __init__(self, bridge: ClassifierBridge, classifier: nn.Module) -> None:
        super().__init__()
        self.bridge = bridge
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor | ClassifierOutput:
        param = next(self.classifier.parameters(), None)
        x = self.bridge(x)
        return self.classifier(x.to(param.dtype) if param is not None else x)


# --- tiny random model (tests, benchmarks) ------------------------------------------------------------------


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

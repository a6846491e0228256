"""Generator commands of the ``longtail`` CLI: ``train-generator``, ``adapt-generator`` and ``distill-decoder``.

Kept apart from ``longtail.cli`` so that each family of commands lives in one module; ``register`` adds them
to the main ``typer`` app."""

from __future__ import annotations

from pathlib import Path

import typer


def distill_decoder_cmd(
    out: Path = typer.Option(..., help="output directory (surrogate.safetensors + surrogate.json)"),
    images: str = typer.Option(..., help="an ImageFolder of your images (or 'fashion-mnist' for the embedded default)"),
    sd: str | None = typer.Option(None, "--model", "--sd", help="a diffusers model directory or hub id (else "
                                  "the embedded generator)"),
    generator: str | None = typer.Option(None, help="an embedded generator directory"),
    steps: int = typer.Option(1000, help="training steps"),
    batch_size: int = typer.Option(16, help="latents per step"),
    channels: int = typer.Option(32, help="surrogate width"),
    limit: int = typer.Option(2000, help="at most this many images are encoded"),
    size: int | None = typer.Option(None, help="image size fed to the VAE (default: the generator's)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    progress: bool = typer.Option(True, help="progress bars"),
) -> None:
    """Distil a small decoder from the generator's VAE for cheap guidance (`--set generator.guide_decoder=OUT`)."""
    import torch

    from .jobs.common import GeneratorSpec, load_generator, pick_device
    from .models.surrogate import distill_decoder, save_surrogate

    dev = pick_device(device)
    spec = GeneratorSpec(kind="sd" if sd else "embedded", model=sd or generator)
    ldm, _, _ = load_generator(spec, dev)
    if images == "fashion-mnist":
        from .data.datasets import load_fashion_mnist, to_model_range

        x = to_model_range(load_fashion_mnist("train")[0][:limit])
    else:
        from .data.imagefolder import ImageListDataset, Preprocess, eval_transform, scan_imagefolder

        index = scan_imagefolder(images)
        channels_in = ldm.vae.config.in_channels
        pre = Preprocess(size=size or ldm.image_size[0], mean=(0.5,) * channels_in, std=(0.5,) * channels_in,
                         channels=channels_in, crop_pct=1.0)
        ds = ImageListDataset(index.paths[:limit], index.labels[:limit], eval_transform(pre), pre.mode)
        x = torch.stack([ds[i][0] for i in range(len(ds))])
    module = distill_decoder(ldm, x.to(dev), steps=steps, batch_size=batch_size, channels=channels, show=progress)
    typer.echo(f"{save_surrogate(module, out)}: {module.stats}")


def train_generator_cmd(
    out: Path = typer.Option(..., help="output directory (diffusers layout + longtail_generator.json)"),
    data: Path | None = typer.Option(None, help="an ImageFolder <data>/<class>/<image> to train on (default: "
                                     "full Fashion-MNIST)"),
    captions: Path | None = typer.Option(None, help="with --data: CSV 'path,caption' (paths relative to --data), "
                                         "one caption per image; others get their class prompt only"),
    unlabeled: Path | None = typer.Option(None, help="with --data: a folder of further images for the autoencoder"),
    size: int | None = typer.Option(None, help="image side in pixels (default: the data's median, rounded to a "
                                    "multiple of 8)"),
    channels: int | None = typer.Option(None, help="1 or 3 (default: 1 when every image is grayscale)"),
    init: str | None = typer.Option(None, help="warm start from a generator: a directory or a shipped name "
                                    "(clean, nuisance); same architecture, channels and size"),
    config: Path | None = typer.Option(None, help="YAML with TinyGeneratorConfig keys"),
    set_: list[str] = typer.Option([], "--set", help="override a key: --set unet_steps=2000"),
    data_dir: Path | None = typer.Option(None, help="Fashion-MNIST directory (default: the Debian package's)"),
    nuisance: str | None = typer.Option(None, help="rare modes inside classes: 'default' (3% each) or "
                                        "'mode=rate,...' (longtail.data.nuisance); captions name them"),
    progress: bool = typer.Option(True, help="progress bars"),
) -> None:
    """Train the embedded text-conditioned latent diffusion model on your ImageFolder (--data) or on full
    Fashion-MNIST; resumable (run it again to continue). Use it with `--set generator.model=OUT`."""
    from dataclasses import replace

    from .config import ConfigError, load_config
    from .models.tiny import TinyGeneratorConfig, train_generator, train_generator_folder

    cfg = load_config(TinyGeneratorConfig, config, set_)
    given = {k: v for k, v in (("image_size", size), ("channels", channels), ("init_from", init)) if v is not None}
    cfg = replace(cfg, **given)
    if data is None:
        for flag, value in (("--captions", captions), ("--unlabeled", unlabeled)):
            if value is not None:
                raise ConfigError(f"{flag} needs --data (an ImageFolder)")
        train_generator(out, cfg, data_dir=data_dir, show=progress, nuisance=parse_rates(nuisance))
        return
    if nuisance or data_dir is not None:
        raise ConfigError("--nuisance and --data-dir are for Fashion-MNIST; with --data leave them out")
    train_generator_folder(out, data, cfg, captions=captions, unlabeled=unlabeled, show=progress)


def adapt_generator_cmd(
    model: str = typer.Option(..., help="a Stable Diffusion 1.x / 2.x directory (diffusers layout)"),
    data: Path = typer.Option(..., help="an ImageFolder <data>/<class>/<image> of your images"),
    out: Path = typer.Option(..., help="output directory (pytorch_lora_weights.safetensors + longtail_lora.json)"),
    captions: Path | None = typer.Option(None, help="CSV 'path,caption' (paths relative to --data), one caption "
                                         "per image; used half of the time, the class prompt otherwise"),
    rank: int | None = typer.Option(None, help="LoRA rank (default 4)"),
    steps: int | None = typer.Option(None, help="training steps (default 500)"),
    lr: float | None = typer.Option(None, help="learning rate (default 1e-4)"),
    batch_size: int | None = typer.Option(None, help="images per step (default 4)"),
    resolution: int | None = typer.Option(None, help="training image side in pixels (default: the model's)"),
    config: Path | None = typer.Option(None, help="YAML with longtail.models.lora.LoraTrainConfig keys"),
    set_: list[str] = typer.Option([], "--set", help="override a key: --set rank=8"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    progress: bool = typer.Option(True, help="progress bars"),
) -> None:
    """LoRA fine-tuning of a Stable Diffusion UNet on your images with class-name prompts (resumable); use it
    with `--set generator.lora=OUT` in generate / calibrate / mine."""
    from dataclasses import replace

    from .config import load_config
    from .jobs.common import pick_device
    from .models.lora import LoraTrainConfig, train_lora

    cfg = load_config(LoraTrainConfig, config, set_)
    given = {"rank": rank, "steps": steps, "lr": lr, "batch_size": batch_size, "resolution": resolution}
    cfg = replace(cfg, **{k: v for k, v in given.items() if v is not None})
    train_lora(model, data, out, cfg, captions=captions, device=pick_device(device), show=progress,
               log=typer.echo)


def parse_rates(text: str | None) -> dict[str, float] | None:
    """``default`` -> ``DEFAULT_RATES``; ``rotate=0.03,invert=0.02`` -> that mapping; None -> None."""
    from .config import ConfigError
    from .data.nuisance import DEFAULT_RATES, MODE_NAMES

    if not text:
        return None
    if text == "default":
        return dict(DEFAULT_RATES)
    rates = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        try:
            rates[name.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--nuisance: {part!r} is not mode=rate") from None
    unknown = sorted(set(rates) - set(MODE_NAMES))
    if unknown:
        raise ConfigError(f"--nuisance: unknown modes {unknown}; known: {list(MODE_NAMES)}")
    return rates


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app`` (the ``longtail`` CLI)."""
    app.command("distill-decoder")(distill_decoder_cmd)
    app.command("train-generator")(train_generator_cmd)
    app.command("adapt-generator")(adapt_generator_cmd)

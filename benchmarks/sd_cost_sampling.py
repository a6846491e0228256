"""Guided vs unguided sampling at Stable Diffusion scale, end to end: time per image and peak GPU memory.

    python benchmarks/sd_cost.py --sampling --sd /path/to/stable-diffusion-v1-5 --checkpoint W.pth
    python benchmarks/sd_cost.py --sampling       # no checkpoint at hand: SD 1.5-sized components, random weights

(``sd_cost.py --sampling ...`` runs this file's ``main``; ``sd_cost.py`` without it prints the per-part FLOPs,
achieved TFLOP/s and the levers of one guided step.) Whole sampling runs through ``longtail.generate``,
with the window / every-n-th-step / guide-decoder variants of the benchmarks README's GPU table.

Without ``--sd`` the script writes random-weight components with Stable Diffusion 1.5's architecture (UNet
320/640/1280/1280 with 768-d cross-attention, the 4-level VAE, a 12-layer 768-d CLIP text encoder; 512 px) and
loads them through ``load_stable_diffusion``, the path a user's checkpoint takes. Their *times and memory* are
those of the real model; their signal gains are not (random decoders give noise gradients), so the gain
column is printed for a real checkpoint only. Every variant runs on the same jobs and seeds after a warm-up.

Also checks, at this scale and dtype, that w = 0 through our sampler equals diffusers' StableDiffusionPipeline.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from longtail.generate import generate, plan_jobs
from longtail.heads import EpistemicClassifier
from longtail.models.classifiers import bridged_classifier, load_classifier
from longtail.models.ldm import set_decoder_checkpointing
from longtail.models.stable_diffusion import load_stable_diffusion
from longtail.sampling import GuidanceConfig, initial_latents
from longtail.testing import write_tiny_stable_diffusion


def write_sd15_sized(root: Path, seed: int = 0) -> Path:
    """Random weights in SD 1.5's architecture, saved in fp16 in the diffusers layout (tokenizer: a small
    local vocabulary, as in the tests; nothing is downloaded)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    write_tiny_stable_diffusion(root, seed=seed)  # tokenizer, scheduler and model_index; the rest replaced
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    for name, part in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        part.half().save_pretrained(root / name)
    return root


def guide_decoders(ldm, taesd_dir: str | None, tmp: Path, device: torch.device, dtype: str):
    """(TAESD, distilled-surrogate) guidance decoders. TAESD from ``taesd_dir`` (e.g. madebyollin/taesd saved
    locally), else its architecture with random weights (the same time and memory); the surrogate is the
    ``longtail distill-decoder`` architecture, untrained here (cost only)."""
    from diffusers import AutoencoderTiny

    from longtail.models.stable_diffusion import resolve_dtype
    from longtail.models.surrogate import (
        SurrogateDecoder,
        load_tiny_autoencoder,
        surrogate_config_for,
        surrogate_decode,
    )

    if taesd_dir is None:
        taesd_dir = str(tmp / "taesd-random")
        AutoencoderTiny().save_pretrained(taesd_dir)
    taesd = load_tiny_autoencoder(taesd_dir, device=device, dtype=resolve_dtype(dtype))
    module = SurrogateDecoder(surrogate_config_for(ldm)).to(device=device, dtype=resolve_dtype(dtype))
    return taesd, surrogate_decode(module, 1.0)


def peak_mib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parity(ldm, device: torch.device, steps: int, cfg: float) -> float:
    """Max |ours - diffusers| over 2 images at w = 0 (pixels in [0, 1])."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=ldm.vae, text_encoder=ldm.text_encoder, tokenizer=ldm.tokenizer,
                                   unet=ldm.unet, scheduler=ldm.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    jobs = plan_jobs([2], lambda c, i: "a photo of a cat", base_seed=7)
    ours = generate(ldm, jobs, num_steps=steps, cfg_scale=cfg, batch_size=2, show=False).images
    latents = initial_latents([j.seed for j in jobs], ldm.latent_shape, device, ldm.dtype)
    theirs = pipe(["a photo of a cat"] * 2, num_inference_steps=steps, guidance_scale=cfg, latents=latents,
                  output_type="pt", height=ldm.image_size[0], width=ldm.image_size[1]).images
    return float(((ours.float().clamp(-1, 1) + 1) / 2 - theirs.float().to(ours.device)).abs().max())


def text_kv_off_row(ldm, jobs, steps: int, kw: dict, device: torch.device, reference: float) -> None:
    """Unguided again with diffusers' own attention processors: what ``longtail.models.text_kv`` (text keys /
    values once per sampling call, on by default) saves at this scale."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    saved = ldm.unet.attn_processors
    ldm.unet.set_attn_processor(AttnProcessor2_0())
    try:
        sync(device)
        t0 = time.perf_counter()
        generate(ldm, jobs, guidance=None, num_steps=steps, **kw)
        sync(device)
    finally:
        ldm.unet.set_attn_processor(saved)
    per_image = (time.perf_counter() - t0) / len(jobs)
    print(f"{'unguided, text K/V per step':<30}{per_image:>9.3f}{per_image / reference:>9.2f}x  (diffusers' "
          "AttnProcessor2_0; the rows above reuse them per call)")


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` (default: ``sys.argv``) and print the sampling table."""
    ap = argparse.ArgumentParser(prog="sd_cost.py --sampling", description=__doc__.split("\n")[0])
    ap.add_argument("--sd", default=None, help="a Stable Diffusion directory (default: SD 1.5-sized random weights)")
    ap.add_argument("--classifier", default="resnet50", help="torchvision / timm name")
    ap.add_argument("--checkpoint", default=None, help="classifier weights (default: random)")
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--signal", default="total")
    ap.add_argument("--weight", type=float, default=10.0)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--taesd", default=None, help="a TAESD (AutoencoderTiny) directory (default: random weights)")
    ap.add_argument("--keep", default=None, help="write the random SD 1.5-sized components here (default: a temp dir)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        sd = Path(args.sd) if args.sd else write_sd15_sized(Path(args.keep or Path(tmp) / "sd15-random"))
        ldm = load_stable_diffusion(sd, dtype=args.dtype, device=device)
        print(f"generator: {'random SD 1.5-sized weights' if not args.sd else sd}, {args.dtype}, "
              f"{ldm.image_size[0]}x{ldm.image_size[1]} px, UNet {sum(p.numel() for p in ldm.unet.parameters()) / 1e6:.0f}M "
              f"params, ready in {time.perf_counter() - started:.0f} s on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")

        loaded = load_classifier(args.classifier, num_classes=args.num_classes, checkpoint=args.checkpoint,
                                 device=device)
        loaded = replace(loaded, model=EpistemicClassifier(loaded.model, num_heads=5).to(device).eval())
        classifier = bridged_classifier(loaded)

        print(f"w = 0 vs diffusers StableDiffusionPipeline ({args.steps} DDIM steps, CFG {args.cfg}, {args.dtype}): "
              f"max |diff| {parity(ldm, device, args.steps, args.cfg):.2e} (pixels in [0, 1])")

        jobs = plan_jobs([args.images // 2, args.images - args.images // 2], lambda c, i: "a photo of a dog")
        full = GuidanceConfig(signal=args.signal, weight=args.weight)
        taesd, surrogate = guide_decoders(ldm, args.taesd, Path(tmp), device, args.dtype)
        variants: list[tuple[str, GuidanceConfig | None, bool, object]] = [
            ("unguided", None, False, None),
            ("full guidance", full, False, None),
            ("full + decoder checkpointing", full, True, None),
            ("window [0, 0.5)", replace(full, end=0.5), False, None),
            ("every 2nd step", replace(full, every=2), False, None),
            ("[0, 0.5) every 2nd", replace(full, end=0.5, every=2), False, None),
            ("window [0, 0.25)", replace(full, end=0.25), False, None),
            ("TAESD guide decoder", full, False, taesd),
            ("surrogate guide decoder", full, False, surrogate),
            ("TAESD, [0, 0.5) every 2nd", replace(full, end=0.5, every=2), False, taesd),
        ]
        kw = dict(classifier=classifier, cfg_scale=args.cfg, batch_size=args.batch_size, show=False,
                  record_signal=args.signal)
        for g in (None, full):  # warm-up: kernels, autotuning, allocator
            generate(ldm, jobs[:args.batch_size], guidance=g, num_steps=2, **kw)
        base_mib = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
        print(f"{args.images} images per variant, batch {args.batch_size}, {args.steps} DDIM steps, "
              f"{args.signal} w={args.weight:g}; model weights etc. resident: {base_mib:.0f} MiB")
        print(f"{'variant':<30}{'s/image':>9}{'slowdown':>10}{'peak MiB':>10}{'extra MiB':>11}{'signal':>9}{'non-finite':>12}")
        reference = None
        for name, g, ckpt, guide in variants:
            set_decoder_checkpointing(ldm.vae, ckpt)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t0 = time.perf_counter()
            try:
                out = generate(ldm, jobs, guidance=g, num_steps=args.steps, guide_decode=guide, **kw)
            except Exception as err:  # a benchmark reports a failing variant and goes on
                print(f"{name:<30} failed: {type(err).__name__}: {err}")
                continue
            sync(device)
            per_image = (time.perf_counter() - t0) / len(jobs)
            reference = reference or per_image
            peak = peak_mib(device)
            signal = float(out.signal.float().mean()) if out.signal is not None else float("nan")
            print(f"{name:<30}{per_image:>9.3f}{per_image / reference:>9.2f}x{peak:>10.0f}{peak - base_mib:>11.0f}"
                  f"{signal:>9.3f}{out.nonfinite:>12}")
        set_decoder_checkpointing(ldm.vae, False)
        if reference is not None:
            text_kv_off_row(ldm, jobs, args.steps, kw, device, reference)
        if not args.sd:
            print("(random weights: times and memory are the architecture's; the signal column means nothing)")


if __name__ == "__main__":
    main()

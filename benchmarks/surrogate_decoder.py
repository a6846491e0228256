"""Guidance through the full VAE decoder vs a distilled surrogate decoder: time per image and signal gain.

One run measures, with the same seeds and prompts for every row:

* unguided sampling, guided sampling with the full decoder on the guidance path, and guided sampling with a
  surrogate decoder distilled here (``longtail.models.surrogate.distill_decoder``); final images always come
  from the full decoder, so the signal of every row is measured the same way;
* per part: (i) the embedded generator (``--generator``, default the shipped assets) with a ``SmallCNN`` +
  Epistemic Head quickly trained on Fashion-MNIST, surrogate distilled on Fashion-MNIST images, signal
  ``--signal`` (total uncertainty) at weight ``--weight``; (ii) tiny random Stable Diffusion components built
  here (the VAE sized so that the decoder dominates, as in SD), a small random CNN behind a
  ``ClassifierBridge``, surrogate distilled on smooth random images, normalised guidance (``--sd-weight`` is a
  fraction of the noise estimate's size). Part (ii) measures the mechanics, mainly speed; its signal is that
  of random networks.

``gain`` = mean signal (guided) - mean signal (unguided); ``gain ratio`` = surrogate gain / full gain;
``speed-up`` = seconds per image of full-decoder guidance / surrogate guidance.

``--memory`` instead measures the VAE decoder's activation memory on the guidance path (peak-RSS growth of a
fresh process, 64x64x4 latent -> 512x512x3, with and without decoder gradient checkpointing, and a surrogate).

Exit status 2 when part (i) was asked for and no embedded generator (or no Fashion-MNIST) is available.

    OMP_NUM_THREADS=1 python benchmarks/surrogate_decoder.py                 # both parts (~5 min, 2 cores)
    OMP_NUM_THREADS=1 python benchmarks/surrogate_decoder.py --parts sd      # part (ii) only (~1 min)
    python benchmarks/surrogate_decoder.py --memory
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import Tensor, nn

from longtail.generate import generate, plan_jobs
from longtail.guidance import make_score_fn
from longtail.models.ldm import LatentDiffusion, set_decoder_checkpointing
from longtail.models.surrogate import distill_decoder, reconstruction_error, surrogate_decode
from longtail.sampling import GuidanceConfig, frozen


def log(msg: str) -> None:
    print(msg, flush=True)


# --- one comparison -----------------------------------------------------------------------------------------


def decoder_cost(decode: Callable[[Tensor], Tensor], z: Tensor, repeats: int = 3) -> float:
    """Seconds per image of decode + backward to the latent (the guidance path's decoder cost)."""
    best = float("inf")
    for _ in range(repeats):
        x = z.detach().clone().requires_grad_(True)
        started = time.perf_counter()
        with torch.enable_grad():
            decode(x).float().square().mean().backward()
        best = min(best, time.perf_counter() - started)
    return best / len(z)


def grad_cosine(
    ldm: LatentDiffusion, guide: nn.Module, classifier: nn.Module, signal: str, z: Tensor
) -> float:
    """Mean per-sample cosine between d signal / d z through the full decoder and through the surrogate."""
    grads = []
    with frozen(classifier):
        for decode in (ldm.decode, guide):
            x = z.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                score, _ = make_score_fn(decode, classifier, signal)(x)
                (grad,) = torch.autograd.grad(score.float().sum(), x)
            grads.append(grad.flatten(1))
    return float(torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=1).mean())


def compare(
    name: str,
    ldm: LatentDiffusion,
    classifier: nn.Module,
    prompts: list[str],
    surrogate: nn.Module,
    args: argparse.Namespace,
    guidance: GuidanceConfig,
    probe: Tensor,
) -> list[dict]:
    """Unguided, full-decoder-guided and surrogate-guided generation of the same jobs; one row each."""
    per_class = max(1, args.images // len(prompts))
    jobs = plan_jobs([per_class] * len(prompts), lambda c, i: prompts[c], base_seed=args.seed)
    guide = surrogate_decode(surrogate)
    ldm.encode_prompts([*prompts, ""])  # text encoding outside the timed rows
    kw = dict(
        classifier=classifier,
        num_steps=args.steps,
        cfg_scale=args.cfg,
        batch_size=args.batch,
        show=False,
        record_signal=guidance.signal,
    )
    log(
        f"{name}: {len(jobs)} images per row, {args.steps} steps, signal {guidance.signal}, "
        f"w={guidance.weight}"
        f"{' (normalized)' if guidance.normalize else ''}"
    )
    z = torch.randn(args.batch, *ldm.latent_shape, generator=torch.Generator().manual_seed(1))
    costs = {"full": decoder_cost(ldm.decode, z), "surrogate": decoder_cost(guide, z)}
    cosine = grad_cosine(ldm, guide, classifier, guidance.signal, probe)
    log(
        f"{name}: cosine(full-decoder gradient, surrogate gradient) on {len(probe)} perturbed latents: "
        f"{cosine:.3f}"
    )
    rows = []
    for label, extra in (
        ("none", {}),
        ("full", {"guidance": guidance}),
        ("surrogate", {"guidance": guidance, "guide_decode": guide}),
    ):
        gen = generate(ldm, jobs, **kw, **extra)
        rows.append(
            {
                "part": name,
                "decoder": label,
                "images": len(jobs),
                "s_per_image": gen.seconds / len(jobs),
                "signal": float(gen.signal.mean()),
                "p_class": float(gen.p_class.mean()),
                "decode_bwd_ms": 1000 * costs.get(label, float("nan")),
                "grad_cosine": cosine if label == "surrogate" else float("nan"),
            }
        )
        log(f"  {name:5s} {label:9s} {rows[-1]['s_per_image']:.3f} s/img  signal {rows[-1]['signal']:.4f}")
    base = rows[0]["signal"]
    for row in rows:
        row["gain"] = row["signal"] - base
    return rows


def print_table(rows: list[dict]) -> None:
    head = (
        f"{'part':5s} {'decoder':9s} {'s/img':>7s} {'dec+bwd ms/img':>14s} {'signal':>8s} {'gain':>8s} "
        f"{'P(class)':>8s}"
    )
    log("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        cost = "-" if r["decoder"] == "none" else f"{r['decode_bwd_ms']:.2f}"
        log(
            f"{r['part']:5s} {r['decoder']:9s} {r['s_per_image']:7.3f} {cost:>14s} {r['signal']:8.4f} "
            f"{r['gain']:8.4f} {r['p_class']:8.3f}"
        )
    for part in dict.fromkeys(r["part"] for r in rows):
        by = {r["decoder"]: r for r in rows if r["part"] == part}
        full, sur, none = by["full"], by["surrogate"], by["none"]
        gain_ratio = sur["gain"] / full["gain"] if abs(full["gain"]) > 1e-12 else float("nan")
        log(
            f"{part}: guided/unguided time {full['s_per_image'] / none['s_per_image']:.2f}x (full) vs "
            f"{sur['s_per_image'] / none['s_per_image']:.2f}x (surrogate); speed-up of guided sampling "
            f"{full['s_per_image'] / sur['s_per_image']:.2f}x; decoder fwd+bwd speed-up "
            f"{full['decode_bwd_ms'] / sur['decode_bwd_ms']:.1f}x; gain ratio (surrogate / full) "
            f"{gain_ratio:.2f}; "
            f"gradient cosine {sur['grad_cosine']:.3f}"
        )


# --- part (i): the embedded generator -----------------------------------------------------------------------


def part_tiny(args: argparse.Namespace) -> list[dict] | None:
    from longtail.data.datasets import FASHION_MNIST_CLASSES, DataError, load_fashion_mnist, to_model_range
    from longtail.models.tiny import class_prompt, load_tiny_generator
    from longtail.train import TrainConfig, fit, make_classifier

    try:
        ldm = load_tiny_generator(args.generator)
    except (FileNotFoundError, RuntimeError) as err:
        log(f"part (i) skipped: no embedded generator ({err})")
        return None
    try:
        raw, labels = load_fashion_mnist("train", args.data_dir)
    except DataError as err:
        log(f"part (i) skipped: Fashion-MNIST not found ({err})")
        return None
    gen = torch.Generator().manual_seed(args.seed)
    images = to_model_range(raw)
    pick = torch.randperm(len(images), generator=gen)
    clf_idx, distill_idx = (
        pick[: args.clf_images],
        pick[args.clf_images : args.clf_images + args.distill_images],
    )
    started = time.perf_counter()
    clf = make_classifier(width=16, seed=args.seed)
    fit(
        clf,
        images[clf_idx],
        labels[clf_idx],
        TrainConfig(epochs=args.clf_epochs, lr=2e-3, seed=args.seed),
        show=False,
    )
    log(f"(i) classifier trained on {len(clf_idx)} images in {time.perf_counter() - started:.0f} s")
    surrogate, probe = distill(ldm, images[distill_idx], args, "(i)", args.distill_steps, 32)
    prompts = [class_prompt(c) for c in FASHION_MNIST_CLASSES]
    guidance = GuidanceConfig(args.signal, weight=args.weight)
    return compare("tiny", ldm, clf, prompts, surrogate, args, guidance, probe)


def distill(
    ldm: LatentDiffusion, images: Tensor, args: argparse.Namespace, tag: str, steps: int, batch_size: int
) -> tuple[nn.Module, Tensor]:
    """Distill a surrogate; also return probe latents (held-out encodings + noise 0.3) for gradient checks."""
    started = time.perf_counter()
    surrogate = distill_decoder(
        ldm,
        images,
        steps=steps,
        batch_size=batch_size,
        lr=2e-3,
        channels=args.surrogate_channels,
        seed=args.seed,
    )
    n_full = sum(p.numel() for p in ldm.vae.decoder.parameters()) + sum(
        p.numel() for p in ldm.vae.post_quant_conv.parameters()
    )
    n_sur = sum(p.numel() for p in surrogate.parameters())
    s = surrogate.stats
    log(
        f"{tag} surrogate distilled on {len(images)} images, {steps} steps of {batch_size} in "
        f"{time.perf_counter() - started:.0f} s: MSE vs full decoder {s['mse_before']:.4f} -> "
        f"{s['mse_after']:.4f} "
        f"(perturbed latents); parameters {n_sur:,} vs {n_full:,}"
    )
    clean = ldm.encode(images[-64:].to(ldm.device)).detach()
    log(f"{tag} MSE on clean latents: {reconstruction_error(ldm, surrogate, clean):.4f}")
    probe = clean[:16] + 0.3 * torch.randn(clean[:16].shape, generator=torch.Generator().manual_seed(2))
    return surrogate, probe


# --- part (ii): tiny random Stable Diffusion ----------------------------------------------------------------


def smooth_images(n: int, size: int, generator: torch.Generator) -> Tensor:
    """Random low-frequency RGB images ``[n, 3, size, size]`` in [-1, 1] (a stand-in data set)."""
    coarse = torch.rand(n, 3, 4, 4, generator=generator) * 2 - 1
    return torch.nn.functional.interpolate(
        coarse, size=(size, size), mode="bicubic", align_corners=False
    ).clamp(-1, 1)


def random_classifier(num_classes: int = 10) -> nn.Module:
    """A small random CNN without normalisation layers, so its logits do depend on the input."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, num_classes),
    ).eval()


def part_sd(args: argparse.Namespace) -> list[dict]:
    from longtail.models.bridge import BridgeConfig, BridgedClassifier, ClassifierBridge
    from longtail.models.stable_diffusion import load_stable_diffusion
    from longtail.testing import write_tiny_stable_diffusion

    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_stable_diffusion(
            tmp, unet_channels=(32, 64), vae_channels=tuple(args.sd_vae_channels), sample_size=args.sd_latent
        )
        ldm = load_stable_diffusion(tmp)
    log(
        f"(ii) tiny SD: latents {ldm.latent_shape} -> images {ldm.image_size}, "
        f"VAE {tuple(args.sd_vae_channels)}"
    )
    torch.manual_seed(args.seed)
    bridge = ClassifierBridge(BridgeConfig(size=(32, 32), resize=32, mean=(0.5,) * 3, std=(0.25,) * 3))
    classifier = BridgedClassifier(bridge, random_classifier())
    images = smooth_images(
        args.sd_distill_images, ldm.image_size[0], torch.Generator().manual_seed(args.seed)
    )
    surrogate, probe = distill(ldm, images, args, "(ii)", args.sd_distill_steps, 16)
    prompts = [f"a photo of a {c}" for c in ("cat", "dog", "car", "tree", "boat")]
    guidance = GuidanceConfig(args.sd_signal, weight=args.sd_weight, normalize=True)
    return compare("sd", ldm, classifier, prompts, surrogate, args, guidance, probe)


# --- memory -------------------------------------------------------------------------------------------------


def memory_child(mode: str, latent: int) -> None:
    """In a fresh process: peak-RSS growth of decode + backward over a no-grad decode of the same latent."""
    from diffusers import AutoencoderKL

    from longtail.models.surrogate import SurrogateConfig, SurrogateDecoder

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    vae.eval().requires_grad_(False)
    if mode == "checkpointing":
        set_decoder_checkpointing(vae, True)
    decode: nn.Module | Callable[[Tensor], Tensor]
    if mode == "surrogate":
        decode = SurrogateDecoder(SurrogateConfig(upsample=3, channels=32)).eval().requires_grad_(False)
    else:

        def decode(z: Tensor) -> Tensor:
            return vae.decode(z).sample

    z = torch.randn(1, 4, latent, latent)
    with torch.no_grad():
        decode(z)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    x = z.clone().requires_grad_(True)
    started = time.perf_counter()
    decode(x).square().mean().backward()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    params = sum(p.numel() for p in vae.decoder.parameters())
    print(
        json.dumps(
            {
                "mode": mode,
                "delta_mib": (peak - base) / 1024,
                "peak_mib": peak / 1024,
                "seconds": seconds,
                "decoder_params": params,
                "grad_norm": float(x.grad.norm()),
            }
        )
    )


def memory(args: argparse.Namespace) -> None:
    rows = []
    for mode in ("plain", "checkpointing", "surrogate"):
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", mode, "--memory-latent", str(args.memory_latent)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        log(json.dumps(rows[-1]))
    size = args.memory_latent
    log(
        f"\ndecode + backward of one {size}x{size}x4 latent -> {size * 8}x{size * 8}x3, float32, "
        f"decoder {rows[0]['decoder_params']:,} parameters, {os.cpu_count()} CPU cores"
    )
    for r in rows:
        log(
            f"  {r['mode']:14s} +{r['delta_mib']:7.0f} MiB over the no-grad decode "
            f"(peak RSS {r['peak_mib']:.0f} MiB), "
            f"{r['seconds']:.2f} s"
        )


# --- main ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--parts", default="tiny,sd", help="comma list of: tiny (embedded generator), sd (tiny random SD)"
    )
    p.add_argument(
        "--generator", default=None, help="embedded generator directory (default: the shipped assets)"
    )
    p.add_argument(
        "--data-dir", default=None, help="Fashion-MNIST directory (default: the usual search path)"
    )
    p.add_argument("--images", type=int, default=20, help="images per row (split evenly over classes)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--signal", default="total", help="guidance signal of part (i)")
    p.add_argument("--weight", type=float, default=1.0, help="guidance weight w of part (i)")
    p.add_argument("--clf-images", type=int, default=3000)
    p.add_argument("--clf-epochs", type=int, default=3)
    p.add_argument("--distill-images", type=int, default=2000)
    p.add_argument("--distill-steps", type=int, default=300)
    p.add_argument("--surrogate-channels", type=int, default=16)
    p.add_argument("--sd-signal", default="energy", help="guidance signal of part (ii)")
    p.add_argument("--sd-weight", type=float, default=1.0, help="part (ii) weight, with normalize=True")
    p.add_argument("--sd-distill-images", type=int, default=256)
    p.add_argument("--sd-distill-steps", type=int, default=80)
    p.add_argument("--sd-vae-channels", type=lambda s: [int(c) for c in s.split(",")], default=[32, 64, 64])
    p.add_argument(
        "--sd-latent", type=int, default=16, help="latent side of the tiny SD (image = side x VAE factor)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--memory", action="store_true", help="measure decoder activation memory instead")
    p.add_argument("--memory-latent", type=int, default=64)
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, args.memory_latent)
        return 0
    if args.memory:
        memory(args)
        return 0
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    rows: list[dict] = []
    if "tiny" in parts:
        tiny = part_tiny(args)
        if tiny is None:
            log(
                "part (i) needs the embedded generator and Fashion-MNIST: pass --generator DIR (the "
                "output of `longtail train-generator`) and --data-dir, or run part (ii) alone with --parts sd"
            )
            return 2
        rows += tiny
    if "sd" in parts:
        rows += part_sd(args)
    if rows:
        print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The model-family layer on tiny random components built offline: SDXL, SD3, FLUX.1, PixArt-Sigma and Sana
against diffusers' own StableDiffusionXLPipeline / StableDiffusion3Pipeline / FluxPipeline / PixArtSigmaPipeline /
SanaPipeline, guided generation through the library's path, family
detection, clear errors, and the half-precision VAE fallback."""

import json
import shutil

import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    PixArtSigmaPipeline,
    SanaPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
)

from longtail.config import ConfigError
from longtail.generate import generate, plan_jobs
from longtail.models.classifiers import bridged_classifier, load_classifier
from longtail.models.families import FAMILY_DEFAULTS, detect_family, family_defaults, load_generator
from longtail.models.flow import Flux, StableDiffusion3, pack_cond, pack_latents, split_cond, unpack_latents
from longtail.models.pixart import PixArtSigma
from longtail.models.sana import Sana
from longtail.models.sdxl import StableDiffusionXL
from longtail.models.stable_diffusion import load_stable_diffusion
from longtail.sampling import GuidanceConfig, initial_latents, sample
from longtail.testing import (
    write_tiny_flux,
    write_tiny_pixart,
    write_tiny_sana,
    write_tiny_sd3,
    write_tiny_sdxl,
    write_tiny_stable_diffusion,
)

PROMPTS = ["a photo of a cat", "a photo of a dog"]


@pytest.fixture(scope="module")
def sd3_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    return {"t5": write_tiny_sd3(root / "t5"), "no_t5": write_tiny_sd3(root / "no_t5", with_t5=False)}


@pytest.fixture(scope="module")
def flux_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    return {"dev": write_tiny_flux(root / "dev"), "schnell": write_tiny_flux(root / "schnell", guidance_embeds=False)}


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return write_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "xl")


@pytest.fixture(scope="module")
def pixart_dir(tmp_path_factory):
    return write_tiny_pixart(tmp_path_factory.mktemp("pixart") / "px")


@pytest.fixture(scope="module")
def sana_dir(tmp_path_factory):
    return write_tiny_sana(tmp_path_factory.mktemp("sana") / "sana")


@pytest.fixture(scope="module")
def classifier():
    """A random timm classifier (32 px input) behind the bridge its data config implies."""
    loaded = load_classifier("timm:test_resnet", num_classes=5,
                             model_kwargs={"pretrained_cfg_overlay": {"input_size": (3, 32, 32)}})
    return bridged_classifier(loaded)


def _pipeline(ldm: StableDiffusion3) -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline(
        transformer=ldm.unet, vae=ldm.vae, text_encoder=ldm.text_encoder, text_encoder_2=ldm.text_encoder_2,
        text_encoder_3=ldm.text_encoder_3, tokenizer=ldm.tokenizer, tokenizer_2=ldm.tokenizer_2,
        tokenizer_3=ldm.tokenizer_3, scheduler=FlowMatchEulerDiscreteScheduler.from_config(ldm.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pack_and_split_cond_round_trip():
    embeds, pooled = torch.randn(2, 5, 6), torch.randn(2, 9)
    packed = pack_cond(embeds, pooled)
    assert packed.shape == (2, 6, 9)
    e, p = split_cond(packed, 6, 9)
    assert torch.equal(e, embeds) and torch.equal(p, pooled)
    z = torch.randn(2, 4, 6, 8)
    assert pack_latents(z).shape == (2, 12, 16) and torch.equal(unpack_latents(pack_latents(z), 6, 8), z)
    assert torch.equal(pack_latents(z), FluxPipeline._pack_latents(z, 2, 4, 6, 8))


@pytest.mark.parametrize("variant", ["t5", "no_t5"])
def test_sd3_unguided_equals_diffusers_pipeline(sd3_dirs, variant):
    """w = 0 through ``generate`` (the library's path) = StableDiffusion3Pipeline: same latents, prompts, steps."""
    ldm = load_stable_diffusion(sd3_dirs[variant])
    assert isinstance(ldm, StableDiffusion3) and (ldm.text_encoder_3 is None) == (variant == "no_t5")
    assert ldm.latent_shape == (4, 8, 8) and ldm.image_size == (32, 32)
    jobs = plan_jobs([1, 1], lambda c, i: PROMPTS[c])
    kw = dict(num_steps=2, cfg_scale=3.0, negative_prompt="blurry", show=False)
    ours = generate(ldm, jobs, **kw)
    zero = generate(ldm, jobs, guidance=GuidanceConfig("entropy", 0.0), classifier=lambda x: x.mean((2, 3)), **kw)
    assert torch.equal(zero.images, ours.images)
    latents = initial_latents([j.seed for j in jobs], ldm.latent_shape)
    theirs = _pipeline(ldm)(prompt=PROMPTS, negative_prompt=["blurry"] * 2, num_inference_steps=2, guidance_scale=3.0,
                            latents=latents, height=32, width=32, output_type="pt").images
    assert torch.allclose((ours.images / 2 + 0.5).clamp(0, 1), theirs, atol=1e-5)
    # and the latents themselves, through sample()
    res = sample(denoiser=ldm.denoise, scheduler=ldm.scheduler, decode=ldm.decode, latents=latents, num_steps=2,
                 cond=ldm.encode_prompts(PROMPTS), uncond=ldm.encode_prompts(["blurry"] * 2), cfg_scale=3.0)
    raw = _pipeline(ldm)(prompt=PROMPTS, negative_prompt=["blurry"] * 2, num_inference_steps=2, guidance_scale=3.0,
                         latents=latents, height=32, width=32, output_type="latent").images
    assert torch.allclose(res.latents, raw, atol=1e-5)


def guided_run(ldm, classifier, weight: float = 200.0, cfg_scale: float = 2.0):
    """The guided-generation checks every family shares: w = 0 gives exactly the unguided images; w > 0 finite
    images, different ones, with a higher signal. Returns (jobs, generate's keywords, the guided result)."""
    jobs = plan_jobs([1, 1], lambda c, i: PROMPTS[c])
    kw = dict(classifier=classifier, num_steps=3, cfg_scale=cfg_scale, show=False)
    plain = generate(ldm, jobs, **kw)
    zero = generate(ldm, jobs, guidance=GuidanceConfig("entropy", 0.0), **kw)
    guided = generate(ldm, jobs, guidance=GuidanceConfig("entropy", weight=weight), **kw)
    assert torch.equal(zero.images, plain.images)
    assert torch.isfinite(guided.images).all() and guided.nonfinite == 0
    assert not torch.allclose(guided.images, plain.images, atol=1e-4)
    assert guided.signal.mean() > plain.signal.mean()
    return jobs, kw, guided


def test_sd3_guided_generation(sd3_dirs, classifier):
    ldm = load_generator(sd3_dirs["t5"])
    jobs, kw, guided = guided_run(ldm, classifier)
    assert guided.images.shape == (2, 3, 32, 32)
    projected = generate(ldm, jobs, guidance=GuidanceConfig("entropy", weight=200.0, project=True, lowpass=1.0), **kw)
    assert torch.isfinite(projected.images).all() and not torch.allclose(projected.images, guided.images, atol=1e-4)
    z = initial_latents([3], ldm.latent_shape)  # encode inverts decode's scaling and shift
    x = ldm.vae.decode(z / ldm.scaling_factor + ldm.shift_factor).sample
    assert torch.allclose(ldm.encode(x), (ldm.vae.encode(x).latent_dist.mean - ldm.shift_factor) * ldm.scaling_factor)
    with pytest.raises(ValueError, match="height=36 is not a multiple of 8"):
        ldm.set_image_size(36, 32)
    assert ldm.set_image_size(16, 24).latent_shape == (4, 4, 6)


@pytest.mark.parametrize(("variant", "cfg"), [("dev", 1.0), ("schnell", 3.0)])
def test_flux_unguided_equals_diffusers_pipeline(flux_dirs, variant, cfg):
    """w = 0 through ``generate`` = FluxPipeline: packed latents, distilled guidance (dev), resolution-shifted
    sigmas; with cfg > 1 and a negative prompt, FluxPipeline's true CFG."""
    ldm = load_stable_diffusion(flux_dirs[variant], height=32, width=32)
    assert isinstance(ldm, Flux) and ldm.latent_shape == (4, 8, 8) and ldm.scheduler.image_seq_len == 16
    assert ldm.t5_max_length == (512 if variant == "dev" else 256)
    jobs = plan_jobs([1, 1], lambda c, i: PROMPTS[c])
    ours = generate(ldm, jobs, num_steps=3, cfg_scale=cfg, negative_prompt="blurry", show=False)
    pipe = FluxPipeline(transformer=ldm.unet, vae=ldm.vae, text_encoder=ldm.text_encoder, tokenizer=ldm.tokenizer,
                        text_encoder_2=ldm.text_encoder_2, tokenizer_2=ldm.tokenizer_2,
                        scheduler=FlowMatchEulerDiscreteScheduler.from_config(ldm.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    latents = pack_latents(initial_latents([j.seed for j in jobs], ldm.latent_shape))
    true_cfg = {"negative_prompt": ["blurry"] * 2, "true_cfg_scale": cfg} if cfg > 1 else {}
    theirs = pipe(prompt=PROMPTS, num_inference_steps=3, guidance_scale=ldm.guidance_scale, latents=latents,
                  max_sequence_length=ldm.t5_max_length, height=32, width=32, output_type="pt", **true_cfg).images
    assert torch.allclose((ours.images / 2 + 0.5).clamp(0, 1), theirs, atol=1e-5)


def test_flux_guided_generation_and_resolution(flux_dirs, classifier):
    ldm = load_generator(flux_dirs["dev"], height=32, width=32)
    guided_run(ldm, classifier, cfg_scale=1.0)
    ldm.set_image_size(64, 32)
    assert ldm.latent_shape == (4, 16, 8) and ldm.scheduler.image_seq_len == 32  # FLUX's shift follows the size
    with pytest.raises(ValueError, match="height=36 is not a multiple of 8"):
        ldm.set_image_size(36, 32)
    with pytest.raises(ConfigError, match="use_t5=False is not possible"):
        load_stable_diffusion(flux_dirs["dev"], use_t5=False)
    custom = load_stable_diffusion(flux_dirs["dev"], guidance_scale=5.0, t5_max_length=32, height=32, width=32)
    assert custom.guidance_scale == 5.0 and custom.t5_max_length == 32 and custom.encode_prompts(["a"]).shape[1] == 33


@pytest.mark.parametrize(("scheduler", "negative"), [("euler", ""), ("ddim", "blurry")])
def test_sdxl_unguided_equals_diffusers_pipeline(sdxl_dir, scheduler, negative):
    """w = 0 through ``generate`` = StableDiffusionXLPipeline (pooled text, time ids; the empty negative prompt
    is zeros, as the pipeline's default negative_prompt=None with force_zeros_for_empty_prompt)."""
    ldm = load_stable_diffusion(sdxl_dir, scheduler=scheduler)
    assert isinstance(ldm, StableDiffusionXL) and ldm.latent_shape == (4, 8, 8) and ldm.image_size == (32, 32)
    jobs = plan_jobs([1, 1], lambda c, i: PROMPTS[c])
    ours = generate(ldm, jobs, num_steps=3, cfg_scale=3.0, negative_prompt=negative, show=False)
    pipe = StableDiffusionXLPipeline(vae=ldm.vae, text_encoder=ldm.text_encoder, text_encoder_2=ldm.text_encoder_2,
                                     tokenizer=ldm.tokenizer, tokenizer_2=ldm.tokenizer_2, unet=ldm.unet,
                                     scheduler=ldm.scheduler, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt=PROMPTS, negative_prompt=[negative] * 2 if negative else None, num_inference_steps=3,
                  guidance_scale=3.0, latents=initial_latents([j.seed for j in jobs], ldm.latent_shape), height=32,
                  width=32, output_type="pt").images
    assert torch.allclose((ours.images / 2 + 0.5).clamp(0, 1), theirs, atol=1e-5)


def test_sdxl_guided_generation(sdxl_dir, classifier):
    guided_run(load_generator(sdxl_dir), classifier)


@pytest.mark.parametrize(("scheduler", "negative"), [("dpm++", ""), ("ddim", "blurry")])
def test_pixart_unguided_equals_diffusers_pipeline(pixart_dir, scheduler, negative):
    """w = 0 through ``generate`` = PixArtSigmaPipeline (masked T5, learned variance dropped, clean_caption off)."""
    ldm = load_stable_diffusion(pixart_dir, scheduler=scheduler)
    assert isinstance(ldm, PixArtSigma) and ldm.latent_shape == (4, 8, 8) and ldm.max_length == 300
    prompts = ["a photo of a Cat", "a dog"]  # different lengths: the attention mask matters
    jobs = plan_jobs([1, 1], lambda c, i: prompts[c])
    ours = generate(ldm, jobs, num_steps=3, cfg_scale=3.0, negative_prompt=negative, show=False)
    pipe = PixArtSigmaPipeline(vae=ldm.vae, text_encoder=ldm.text_encoder, tokenizer=ldm.tokenizer,
                               transformer=ldm.unet, scheduler=ldm.scheduler)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt=prompts, negative_prompt=negative, num_inference_steps=3, guidance_scale=3.0,
                  latents=initial_latents([j.seed for j in jobs], ldm.latent_shape), height=32, width=32,
                  output_type="pt", clean_caption=False, use_resolution_binning=False).images
    assert torch.allclose((ours.images / 2 + 0.5).clamp(0, 1), theirs, atol=1e-5)
    other = generate(ldm, plan_jobs([1, 1], lambda c, i: prompts[1 - c]), num_steps=3, cfg_scale=3.0,
                     negative_prompt=negative, show=False)
    assert not torch.allclose(other.images, ours.images, atol=1e-4)  # the prompt reaches the transformer


def test_pixart_guided_generation(pixart_dir, classifier):
    guided_run(load_generator(pixart_dir, scheduler="dpm++"), classifier)


@pytest.mark.parametrize(("scheduler", "negative"), [("dpm++", ""), ("euler", "blurry")])
def test_sana_unguided_equals_diffusers_pipeline(sana_dir, scheduler, negative):
    """w = 0 through ``generate`` = SanaPipeline (DPM-Solver++ on flow sigmas, or flow Euler; AutoencoderDC; masked
    Gemma 2), without the instruction prefix and caption cleaning."""
    ldm = load_stable_diffusion(sana_dir, scheduler=scheduler)
    assert isinstance(ldm, Sana) and ldm.latent_shape == (4, 16, 16) and ldm.image_size == (32, 32)
    prompts = ["a photo of a Cat", "a dog"]
    jobs = plan_jobs([1, 1], lambda c, i: prompts[c])
    ours = generate(ldm, jobs, num_steps=3, cfg_scale=3.0, negative_prompt=negative, show=False)
    pipe = SanaPipeline(vae=ldm.vae, text_encoder=ldm.text_encoder, tokenizer=ldm.tokenizer, transformer=ldm.unet,
                        scheduler=ldm.scheduler)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt=prompts, negative_prompt=negative, num_inference_steps=3, guidance_scale=3.0,
                  latents=initial_latents([j.seed for j in jobs], ldm.latent_shape), height=32, width=32,
                  output_type="pt", clean_caption=False, use_resolution_binning=False,
                  complex_human_instruction=None).images
    assert torch.allclose((ours.images / 2 + 0.5).clamp(0, 1), theirs, atol=1e-5)


def test_sana_guided_generation(sana_dir, classifier):
    ldm = load_generator(sana_dir)
    jobs, kw, _ = guided_run(ldm, classifier, weight=20.0)
    projected = generate(ldm, jobs, guidance=GuidanceConfig("entropy", weight=20.0, project=True), **kw)
    assert torch.isfinite(projected.images).all()  # AutoencoderDC's encode (no latent_dist) serves MPGD


def test_family_detection_and_defaults(sd3_dirs, tmp_path):
    sd = write_tiny_stable_diffusion(tmp_path / "sd")
    assert detect_family(sd) == "sd" and detect_family(sd3_dirs["t5"]) == "sd3"
    assert detect_family(write_tiny_flux(tmp_path / "flux")) == "flux"
    assert detect_family(write_tiny_sdxl(tmp_path / "xl")) == "sdxl"
    assert detect_family(write_tiny_pixart(tmp_path / "px")) == "pixart"
    assert detect_family(write_tiny_sana(tmp_path / "sana")) == "sana"
    assert type(load_generator(sd)).__name__ == "LatentDiffusion"
    (sd / "model_index.json").unlink()  # no model_index.json: Stable Diffusion 1.x / 2.x, as before
    assert detect_family(sd) == "sd"
    assert set(FAMILY_DEFAULTS) == {"sd", "sdxl", "sd3", "flux", "pixart", "sana"} and FAMILY_DEFAULTS["sd3"]["num_steps"] == 28
    assert family_defaults(sd3_dirs["t5"])["cfg_scale"] == 7.0 and family_defaults("org/hub-id")["num_steps"] == 50
    with pytest.raises(ConfigError, match=r"Stable Diffusion 1\.x / 2\.x; not an option of it: guidance_scale"):
        load_stable_diffusion(sd, guidance_scale=3.0)


def _with_class(src, dst, name):
    root = shutil.copytree(src, dst)
    index = json.loads((root / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps({**index, "_class_name": name}))
    return root


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_clear_errors(sd3_dirs, tmp_path):
    src = sd3_dirs["t5"]
    with pytest.raises(ConfigError, match=r"FLUX\.2 \(Flux2Pipeline\) is not supported yet"):
        load_stable_diffusion(_with_class(src, tmp_path / "flux2", "Flux2Pipeline"))
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'odd'}: unknown model family KandinskyPipeline"):
        load_stable_diffusion(_with_class(src, tmp_path / "odd", "KandinskyPipeline"))
    broken = shutil.copytree(src, tmp_path / "broken")
    shutil.rmtree(broken / "text_encoder_3")
    with pytest.raises(FileNotFoundError, match=rf"{broken / 'text_encoder_3'} is missing"):
        load_stable_diffusion(broken)
    assert load_stable_diffusion(broken, use_t5=False).text_encoder_3 is None  # T5 optional
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="transformer has no weights"):
        load_stable_diffusion(broken, use_t5=False)
    with pytest.raises(ConfigError, match="is a sd3 model; not an option of it: guidance_scale"):
        load_stable_diffusion(src, guidance_scale=3.0)
    with pytest.raises(ConfigError, match="prediction_type='epsilon' does not apply"):
        load_stable_diffusion(src, prediction_type="epsilon")
    with pytest.raises(ConfigError, match="not 'dpm\\+\\+'"):
        load_stable_diffusion(src, scheduler="dpm++")
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'nofix'}/config.json is missing"):
        load_stable_diffusion(src, vae=tmp_path / "nofix")
    fixed = load_stable_diffusion(src, vae=sd3_dirs["no_t5"] / "vae", vae_dtype="bf16")  # a fixed VAE from elsewhere
    assert fixed.vae.dtype == torch.bfloat16 and fixed.unet.dtype == torch.float32
    bad = shutil.copytree(src, tmp_path / "bad_index")
    (bad / "model_index.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"model_index\.json is not a JSON object"):
        load_stable_diffusion(bad)


def test_half_precision_vae_overflow_upcasts_instead_of_nan_images(sd3_dirs):
    """A VAE whose fp16 activations overflow (here: a first conv scaled by 1e5, normalised away in fp32) gives
    NaN / inf images in fp16; decode upcasts the VAE, decodes again and the sampler reports the fallback."""
    ldm = load_stable_diffusion(sd3_dirs["no_t5"], vae_dtype="fp16")
    with torch.no_grad():
        ldm.vae.decoder.conv_in.weight.mul_(1e5)
    z = initial_latents([0, 1], ldm.latent_shape)
    try:
        raw = ldm.vae.decode((z / ldm.scaling_factor + ldm.shift_factor).half()).sample
    except RuntimeError as err:  # some CPU builds lack fp16 kernels
        pytest.skip(f"fp16 compute not supported on this CPU: {err}")
    assert not torch.isfinite(raw).all()  # the failure the fallback exists for
    res = sample(denoiser=ldm.denoise, scheduler=ldm.scheduler, decode=ldm.decode, latents=z, num_steps=2,
                 cond=ldm.encode_prompts(PROMPTS))
    assert ldm.vae.dtype == torch.float32 and res.images.dtype == torch.float32
    assert torch.isfinite(res.images).all() and res.nonfinite_images == 0
    assert res.fallbacks == ["vae upcast float16->float32: non-finite float16 decode"]
    again = sample(denoiser=ldm.denoise, scheduler=ldm.scheduler, decode=ldm.decode, latents=z, num_steps=2,
                   cond=ldm.encode_prompts(PROMPTS))
    assert again.fallbacks == [] and torch.equal(again.images, res.images)  # upcast once, for good


def test_generate_job_runs_sd3_from_the_sd_option(sd3_dirs, tmp_path):
    """`longtail generate --sd <SD3 dir>` (GeneratorSpec kind "sd") through the job, guided: an ImageFolder with
    a manifest; no change to the job's code."""
    import csv

    import timm
    from safetensors.torch import save_file

    from longtail.config import load_config
    from longtail.jobs.generate import GenerateConfig, run_generate

    torch.manual_seed(0)
    save_file(timm.create_model("test_resnet", num_classes=2).state_dict(), str(tmp_path / "clf.safetensors"))
    (tmp_path / "names.json").write_text(json.dumps(["cat", "dog"]))
    cfg = load_config(GenerateConfig, overrides=[
        f"out={tmp_path / 'out'}", "generator.kind=sd", f"generator.model={sd3_dirs['t5']}", "per_class=1",
        "generator.num_steps=2", "generator.cfg_scale=2.0", "device=cpu", "classifier.spec=timm:test_resnet",
        f"classifier.checkpoint={tmp_path / 'clf.safetensors'}", "classifier.num_classes=2",
        f"classifier.class_names={tmp_path / 'names.json'}", "guidance.weight=5.0", "guidance.signal=entropy",
        "generator_check.per_class=0"])
    run_generate(cfg, show=False, log=lambda m: None)
    with (tmp_path / "out" / "manifest.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["class_name"] for r in rows] == ["cat", "dog"] and all(float(r["weight"]) == 5.0 for r in rows)
    assert all(r["signal"] for r in rows)


def test_a_job_takes_each_familys_sampling_defaults_and_its_options(sd3_dirs, flux_dirs):
    """``with_sampling_defaults`` fills unset steps / CFG from the family (FLUX: no CFG, its distilled guidance
    instead); ``use_t5`` and ``guidance_scale`` reach the loader through ``GeneratorSpec``."""
    from longtail.jobs.common import GeneratorSpec, with_sampling_defaults
    from longtail.jobs.common import load_generator as load_job_generator

    flux = with_sampling_defaults(GeneratorSpec(kind="sd", model=str(flux_dirs["dev"])))
    assert (flux.num_steps, flux.cfg_scale) == (28, 1.0)
    sd3 = with_sampling_defaults(GeneratorSpec(kind="sd", model=str(sd3_dirs["t5"]), cfg_scale=2.0))
    assert (sd3.num_steps, sd3.cfg_scale) == (28, 2.0)  # a value the user set stays
    hub = with_sampling_defaults(GeneratorSpec(kind="sd", model="org/some-hub-id"))
    assert (hub.num_steps, hub.cfg_scale) == (50, 7.5)
    ldm, _, _ = load_job_generator(GeneratorSpec(kind="sd", model=str(sd3_dirs["t5"]), use_t5=False),
                                   torch.device("cpu"))
    assert getattr(ldm, "text_encoder_3", None) is None
    ldm, _, _ = load_job_generator(GeneratorSpec(kind="sd", model=str(flux_dirs["dev"]), guidance_scale=2.5),
                                   torch.device("cpu"))
    assert ldm.guidance_scale == 2.5


def test_a_setting_added_after_a_run_does_not_make_its_directory_foreign():
    from longtail.jobs.common import changed_keys

    old = {"generator": {"kind": "sd", "model": "m", "num_steps": 28}}
    assert changed_keys(old, {"generator": {"kind": "sd", "model": "m", "num_steps": 28, "use_t5": True}}) == []
    assert changed_keys(old, {"generator": {"kind": "sd", "model": "m", "num_steps": 20}}) == ["generator.num_steps"]
    assert changed_keys({"a": {"b": 1}}, {"a": {}}) == ["a.b"]


def test_the_generate_job_records_the_vae_fallback_in_the_manifest(sd3_dirs, tmp_path):
    """A half-precision VAE that overflows (its first decoder conv scaled by 1e5 on disk): the job's images come
    out finite, every row says which dtype decoded it, and the fallback is logged."""
    import csv
    import shutil

    from diffusers import AutoencoderKL

    from longtail.config import load_config
    from longtail.jobs.generate import GenerateConfig, run_generate

    model = tmp_path / "sd3"
    shutil.copytree(sd3_dirs["no_t5"], model)
    vae = AutoencoderKL.from_pretrained(model / "vae")
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e5)
    vae.save_pretrained(model / "vae")
    lines: list[str] = []
    cfg = load_config(GenerateConfig, overrides=[
        f"out={tmp_path / 'out'}", "generator.kind=sd", f"generator.model={model}", "generator.vae_dtype=fp16",
        "generator.num_steps=2", "generator.cfg_scale=2.0", "per_class=2", "device=cpu",
        f"classifier.class_names={tmp_path / 'names.json'}", "generator_check.per_class=0"])
    (tmp_path / "names.json").write_text(json.dumps(["cat", "dog"]))
    try:
        stats = run_generate(cfg, show=False, log=lines.append)
    except RuntimeError as err:  # some CPU builds lack fp16 kernels
        pytest.skip(f"fp16 compute not supported on this CPU: {err}")
    with (tmp_path / "out" / "manifest.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["vae_dtype"] for r in rows} == {"float32"}
    assert stats["decode_fallbacks"] == ["vae upcast float16->float32: non-finite float16 decode"]
    assert any(line.startswith("warning: vae upcast float16->float32") for line in lines)


def test_a_chunk_with_non_finite_images_is_refused_before_anything_is_written():
    from types import SimpleNamespace

    from longtail.data.datasets import DataError
    from longtail.generate import check_finite, job_id, plan_jobs

    jobs = plan_jobs([2], lambda c, i: "a cat")
    images = torch.zeros(2, 3, 4, 4)
    check_finite(SimpleNamespace(jobs=jobs, images=images))  # finite: nothing to say
    images[1, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match=rf"1 of 2 generated images are not finite .*\(ids {job_id(jobs[1])}\)"):
        check_finite(SimpleNamespace(jobs=jobs, images=images))


def test_missing_parts_name_the_way_out(sd3_dirs, tmp_path):
    import shutil

    sd3 = tmp_path / "sd3"
    shutil.copytree(sd3_dirs["t5"], sd3)
    shutil.rmtree(sd3 / "text_encoder_3")
    with pytest.raises(FileNotFoundError, match=r"text_encoder_3 is missing.*; without the T5 encoder set "
                                                r"generator\.use_t5=false"):
        load_stable_diffusion(sd3)
    assert load_stable_diffusion(sd3, use_t5=False) is not None
    shutil.rmtree(sd3 / "transformer")  # not a T5 part: no T5 hint
    with pytest.raises(FileNotFoundError) as err:
        load_stable_diffusion(sd3, use_t5=False)
    assert "use_t5" not in str(err.value)
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(FileNotFoundError, match=r"unet is missing.*also has no model_index\.json"):
        load_stable_diffusion(bare)

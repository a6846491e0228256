"""The Stable Diffusion adapter on tiny random components in the diffusers layout (nothing downloaded)."""

import shutil

import pytest
import torch

from longtail.generate import generate, plan_jobs
from longtail.models.classifiers import bridged_classifier, load_classifier
from longtail.models.ldm import set_decoder_checkpointing
from longtail.models.stable_diffusion import load_stable_diffusion
from longtail.sampling import GuidanceConfig
from longtail.testing import write_tiny_stable_diffusion

PROMPTS = ["a photo of a cat", "a photo of a dog"]


@pytest.fixture(scope="module")
def sd_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    return {p: write_tiny_stable_diffusion(root / p, prediction_type=p) for p in ("epsilon", "v_prediction")}


@pytest.fixture(scope="module")
def classifier():
    """A random timm classifier (32 px input) behind the bridge its data config implies."""
    loaded = load_classifier(
        "timm:test_resnet",
        num_classes=5,
        model_kwargs={"pretrained_cfg_overlay": {"input_size": (3, 32, 32)}},
    )
    return bridged_classifier(loaded)


def _jobs():
    return plan_jobs([1, 1], lambda c, i: PROMPTS[c])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_load_generate_and_guide(sd_dirs, classifier, prediction_type):
    ldm = load_stable_diffusion(sd_dirs[prediction_type])
    assert ldm.scheduler.config.prediction_type == prediction_type
    assert type(ldm.scheduler).__name__ == "DDIMScheduler" and ldm.scheduler.config.clip_sample is False
    assert ldm.latent_shape == (4, 32, 32) and ldm.image_size == (64, 64) and ldm.max_length == 77
    kw = dict(classifier=classifier, num_steps=2, cfg_scale=2.0, show=False, negative_prompt="blurry")
    plain = generate(ldm, _jobs(), **kw)
    assert plain.images.shape == (2, 3, 64, 64) and torch.isfinite(plain.images).all()
    zero = generate(ldm, _jobs(), guidance=GuidanceConfig("entropy", weight=0.0), **kw)
    assert torch.allclose(zero.images, plain.images, atol=1e-6)
    guided = generate(ldm, _jobs(), guidance=GuidanceConfig("entropy", weight=200.0), **kw)
    assert torch.isfinite(guided.images).all() and guided.nonfinite == 0
    assert not torch.allclose(guided.images, plain.images, atol=1e-4)


@pytest.mark.parametrize("scheduler", ["dpm++", "euler"])
def test_other_schedulers(sd_dirs, scheduler):
    ldm = load_stable_diffusion(sd_dirs["v_prediction"], scheduler=scheduler)
    assert ldm.scheduler.config.prediction_type == "v_prediction"
    out = generate(ldm, _jobs(), num_steps=2, cfg_scale=2.0, show=False)
    assert out.images.shape == (2, 3, 64, 64) and torch.isfinite(out.images).all()


def test_height_width(sd_dirs):
    ldm = load_stable_diffusion(sd_dirs["epsilon"], height=32, width=48)
    assert ldm.latent_shape == (4, 16, 24) and ldm.image_size == (32, 48)
    out = generate(ldm, _jobs()[:1], num_steps=2, cfg_scale=1.0, show=False)
    assert out.images.shape == (1, 3, 32, 48)
    with pytest.raises(ValueError, match="height=30 is not a multiple of 4"):
        ldm.set_image_size(30, 48)
    assert ldm.set_image_size().latent_shape == (4, 32, 32)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_clear_errors(sd_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        load_stable_diffusion(tmp_path / "nope")
    broken = shutil.copytree(sd_dirs["epsilon"], tmp_path / "broken")
    shutil.rmtree(broken / "vae")
    with pytest.raises(FileNotFoundError, match=rf"{broken / 'vae'} is missing"):
        load_stable_diffusion(broken)
    shutil.copytree(sd_dirs["epsilon"] / "vae", broken / "vae")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="unet has no weights"):
        load_stable_diffusion(broken)
    single = tmp_path / "v1-5.safetensors"
    single.write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        load_stable_diffusion(single)
    with pytest.raises(OSError, match="local_files_only=False"):
        load_stable_diffusion("longtail-tests/not-a-cached-model")
    with pytest.raises(ValueError, match="unknown scheduler"):
        load_stable_diffusion(sd_dirs["epsilon"], scheduler="lms")


def test_reduced_precision_loading(sd_dirs):
    ldm = load_stable_diffusion(sd_dirs["epsilon"], dtype="bf16", vae_dtype="fp32")
    assert ldm.unet.dtype == torch.bfloat16 and ldm.text_encoder.dtype == torch.bfloat16
    assert ldm.vae.dtype == torch.float32 and ldm.dtype == torch.bfloat16
    out = generate(ldm, _jobs(), num_steps=2, cfg_scale=2.0, show=False)  # bf16 compute runs on CPU
    assert out.images.dtype == torch.float32 and torch.isfinite(out.images).all()
    half = load_stable_diffusion(sd_dirs["epsilon"], dtype="fp16")
    assert half.unet.dtype == half.vae.dtype == half.text_encoder.dtype == torch.float16
    try:
        out = generate(half, _jobs(), num_steps=2, cfg_scale=2.0, show=False)
    except RuntimeError as err:  # some CPU builds lack fp16 kernels
        pytest.skip(f"fp16 compute not supported on this CPU: {err}")
    assert out.images.dtype == torch.float16 and torch.isfinite(out.images).all()


def test_decoder_checkpointing_same_gradient(sd_dirs):
    ldm = load_stable_diffusion(sd_dirs["epsilon"])
    z = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    calls = []
    block = ldm.vae.decoder.up_blocks[0]
    forward = block.forward

    def counted(*args, **kwargs):  # forward hooks do not fire on recomputation, so count forward itself
        calls.append(1)
        return forward(*args, **kwargs)

    block.forward = counted

    def grad() -> torch.Tensor:
        x = z.clone().requires_grad_(True)
        with torch.enable_grad():
            ldm.decode(x).square().sum().backward()
        return x.grad

    plain = grad()
    assert len(calls) == 1
    set_decoder_checkpointing(ldm.vae, True)
    calls.clear()
    assert not ldm.vae.training
    checkpointed = grad()
    assert len(calls) == 2  # recomputed in the backward pass: active in eval mode
    assert torch.allclose(plain, checkpointed, rtol=1e-5, atol=1e-7)
    calls.clear()
    with torch.no_grad():
        ldm.decode(z)
    assert len(calls) == 1  # no recomputation without autograd
    assert load_stable_diffusion(
        sd_dirs["epsilon"], decoder_checkpointing=True
    ).vae.decoder.gradient_checkpointing

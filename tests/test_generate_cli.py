"""`longtail generate` on tiny Stable Diffusion components: parity with diffusers, guidance, resume, sharding."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import save_file

from longtail.config import ConfigError, load_config
from longtail.generate import generate, plan_jobs
from longtail.jobs.common import GeneratorSpec, with_sampling_defaults
from longtail.jobs.generate import GenerateConfig, run_generate
from longtail.models.stable_diffusion import load_stable_diffusion
from longtail.sampling import GuidanceConfig
from longtail.testing import write_tiny_stable_diffusion

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    save_file(model.state_dict(), str(root / "clf.safetensors"))
    (root / "names.json").write_text(json.dumps(["cat", "dog", "bird"]))
    return {"sd": write_tiny_stable_diffusion(root / "sd"), "sd_v": write_tiny_stable_diffusion(
        root / "sd_v", prediction_type="v_prediction"), "root": root}


def cli_args(parts, out: Path, per_class: int = 3, batch: int = 1, extra: tuple[str, ...] = ()) -> list[str]:
    r = parts["root"]
    return ["generate", "--out", str(out), "--sd", str(parts["sd"]), "--classifier", "timm:test_resnet",
            "--checkpoint", str(r / "clf.safetensors"), "--class-names", str(r / "names.json"),
            "--set", "classifier.num_classes=3", "--per-class", str(per_class), "--steps", "2", "--weight", "5",
            "--signal", "entropy", "--batch-size", str(batch), "--set", "chunk=2", "--device", "cpu",
            "--set", "generator_check.per_class=0",  # random weights draw no class (test_generator_check.py)
            "--no-progress", *extra]


def rows(out: Path) -> list[dict]:
    with (out / "manifest.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("kind", ["sd", "sd_v"])
def test_unguided_equals_diffusers_pipeline(parts, kind):
    """w = 0 through our loop == StableDiffusionPipeline, same components, seed, DDIM steps and CFG scale."""
    ldm = load_stable_diffusion(parts[kind])
    pipe = StableDiffusionPipeline(vae=ldm.vae, text_encoder=ldm.text_encoder, tokenizer=ldm.tokenizer,
                                   unet=ldm.unet, scheduler=ldm.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    jobs = plan_jobs([2], lambda c, i: "a photo of a cat", base_seed=7)
    ours = generate(ldm, jobs, num_steps=3, cfg_scale=4.0, batch_size=2, show=False).images
    from longtail.sampling import initial_latents

    latents = initial_latents([j.seed for j in jobs], ldm.latent_shape)
    theirs = pipe(["a photo of a cat"] * 2, num_inference_steps=3, guidance_scale=4.0, latents=latents,
                  output_type="pt", height=ldm.image_size[0], width=ldm.image_size[1]).images
    assert torch.allclose((ours.clamp(-1, 1) + 1) / 2, theirs, atol=1e-4)


def test_guidance_raises_the_signal(parts):
    """Entropy guidance on a classifier of mean brightness (checkable): outputs move toward its boundary."""
    ldm = load_stable_diffusion(parts["sd"])

    def brightness(x):
        m = x.mean(dim=(1, 2, 3)).unsqueeze(1) * 20
        return torch.cat([m, -m], dim=1)

    jobs = plan_jobs([4], lambda c, i: "a photo of a cat")
    kw = dict(classifier=brightness, num_steps=4, cfg_scale=2.0, batch_size=4, show=False)
    plain = generate(ldm, jobs, **kw)
    guided = generate(ldm, jobs, guidance=GuidanceConfig("entropy", weight=200.0), **kw)
    assert guided.signal.mean() > plain.signal.mean() + 0.01


@pytest.mark.slow
def test_one_and_two_processes_make_the_same_dataset(parts, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "longtail", *cli_args(parts, one, per_class=3)], env=ENV, check=True,
                   capture_output=True)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "longtail", *cli_args(parts, two, per_class=3)]
    done = subprocess.run(launch, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "over 2 process(es)" in done.stdout + done.stderr
    a, b = rows(one), rows(two)
    assert [r["id"] for r in a] == [r["id"] for r in b] and len(a) == 9
    assert not list(two.glob("manifest.part-*"))
    for ra, rb in zip(a, b, strict=True):
        assert ra["seed"] == rb["seed"] and ra["prompt"] == rb["prompt"]
        assert np.array_equal(np.asarray(Image.open(one / ra["path"])), np.asarray(Image.open(two / rb["path"])))


def test_kill_midway_then_resume(parts, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "longtail", *cli_args(parts, out, per_class=12, batch=2)]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if (out / "manifest.csv").is_file() and len(rows(out)) >= 4:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = len(rows(out))
    assert 4 <= before < 36, f"kill landed at {before} rows; stderr: {proc.stderr.read().decode()[-1000:]}"
    done = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    after = rows(out)
    assert len(after) == 36 == len({r["id"] for r in after})
    for r in after:  # every listed file is complete
        Image.open(out / r["path"]).load()
    assert len(list(out.rglob("*.png"))) == 36


def test_settings_that_cannot_work_fail_before_any_output(parts, tmp_path):
    base = cli_args(parts, tmp_path / "a")
    bad = subprocess.run([sys.executable, "-m", "longtail", *base, "--signal", "epistemic"], env=ENV,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "needs an Epistemic Head" in bad.stderr
    assert not (tmp_path / "a").exists()
    cfg = load_config(GenerateConfig, overrides=["out=" + str(tmp_path / "b"), "generator.kind=sd",
                                                  f"generator.model={parts['sd']}", "per_class=1",
                                                  f"classifier.class_names={parts['root'] / 'names.json'}",
                                                  "generator.num_steps=1", "device=cpu"])
    run_generate(cfg, show=False, log=lambda m: None)
    identity = json.loads((Path(cfg.out) / "settings.json").read_text())
    assert len(identity["settings_sha256"]) == 64 and "per_class" in identity["keys"]
    with pytest.raises(ConfigError, match=r"other settings \(per_class differ"):
        run_generate(load_config(GenerateConfig, overrides=[f"out={cfg.out}", "generator.kind=sd",
                                                            f"generator.model={parts['sd']}", "per_class=2",
                                                            f"classifier.class_names={parts['root'] / 'names.json'}",
                                                            "generator.num_steps=1", "device=cpu"]),
                     show=False, log=lambda m: None)


def test_distill_decoder_then_generate_with_it(parts, tmp_path):
    from test_mine import write_folder

    images = write_folder(tmp_path / "imgs", 3, "RGB")
    done = subprocess.run([sys.executable, "-m", "longtail", "distill-decoder", "--out", str(tmp_path / "sur"),
                           "--images", str(images), "--sd", str(parts["sd"]), "--steps", "5", "--batch-size", "4",
                           "--channels", "8", "--size", "32", "--device", "cpu", "--no-progress"],
                          env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "sur" / "surrogate.json").is_file()
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-m", "longtail", *cli_args(parts, out, per_class=1),
                    "--set", f"generator.guide_decoder={tmp_path / 'sur'}"], env=ENV, check=True, capture_output=True)
    assert len(rows(out)) == 3


def test_calibrate_records_points_choices_and_grids(parts, tmp_path):
    r = parts["root"]
    out = tmp_path / "cal"
    done = subprocess.run([sys.executable, "-m", "longtail", "calibrate", "--out", str(out), "--sd", str(parts["sd"]),
                           "--classifier", "timm:test_resnet", "--checkpoint", str(r / "clf.safetensors"),
                           "--class-names", str(r / "names.json"), "--set", "classifier.num_classes=3",
                           "--signals", "entropy,energy", "--weights", "1,50", "--per-class", "1", "--steps", "2",
                           "--set", "generator_check.per_class=0", "--device", "cpu", "--no-progress"], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "calibration.json").read_text())
    assert sorted((p["signal"], p["weight"]) for p in result["points"]) == [
        ("energy", 0.0), ("energy", 1.0), ("energy", 50.0), ("entropy", 0.0), ("entropy", 1.0), ("entropy", 50.0)]
    assert set(result["choices"]) == {"entropy", "energy"} and result["timing"]["slowdown"] > 0
    assert (out / "grid_entropy.png").is_file() and (out / "config.yaml").is_file()
    assert "weight for entropy" in done.stdout


def test_calibrate_refuses_a_directory_of_other_settings(parts, tmp_path):
    from longtail.jobs.calibrate import CalibrateConfig, run_calibrate

    r = parts["root"]
    def config(*extra: str) -> CalibrateConfig:
        return load_config(CalibrateConfig, overrides=[
            f"out={tmp_path / 'cal'}", "generator.kind=sd", f"generator.model={parts['sd']}", "generator.num_steps=1",
            "classifier.spec=timm:test_resnet", f"classifier.checkpoint={r / 'clf.safetensors'}",
            f"classifier.class_names={r / 'names.json'}", "classifier.num_classes=3", "signals=[entropy]",
            "weights=[1.0]", "per_class=1", "device=cpu", "generator_check.per_class=0", *extra])

    first = run_calibrate(config(), show=False, log=lambda m: None)
    assert len(first["settings_sha256"]) == 64
    again = run_calibrate(config("generator.batch_size=1"), show=False, log=lambda m: None)  # speed, not results
    assert again["settings_sha256"] == first["settings_sha256"]
    before = (tmp_path / "cal" / "calibration.json").read_bytes()
    with pytest.raises(ConfigError, match=r"other settings \(weights differ"):
        run_calibrate(config("weights=[2.0]"), show=False, log=lambda m: None)
    assert (tmp_path / "cal" / "calibration.json").read_bytes() == before  # the earlier results are untouched


def test_settings_hash_is_canonical():
    from longtail.jobs.common import settings_hash

    assert settings_hash({"a": 1, "b": [1, 2]}) == settings_hash({"b": [1, 2], "a": 1})
    assert settings_hash({"a": 1}) != settings_hash({"a": 1.5})


def test_sampling_settings_default_per_generator_kind():
    embedded = with_sampling_defaults(GeneratorSpec())
    assert (embedded.num_steps, embedded.cfg_scale, embedded.batch_size) == (20, 3.0, 100)
    sd = with_sampling_defaults(GeneratorSpec(kind="sd", model="x", batch_size=2))
    assert (sd.num_steps, sd.cfg_scale, sd.batch_size) == (50, 7.5, 2)  # a given value is kept
    assert isinstance(sd.num_steps, int) and isinstance(sd.cfg_scale, float)
    with pytest.raises(ConfigError, match="'dalle'"):
        with_sampling_defaults(GeneratorSpec(kind="dalle"))

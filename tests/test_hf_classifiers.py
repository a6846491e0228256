"""`hf:<dir>` classifiers: tiny random ViT / ConvNeXt / ResNet written offline with save_pretrained; loading,
class names, the bridge against the image processors on real images, the Epistemic Head, guidance, fine-tuning,
class-count errors, and the mine / heads-train jobs."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    AutoImageProcessor,
    ConvNextConfig,
    ConvNextForImageClassification,
    ConvNextImageProcessor,
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

try:  # transformers 5: the default processor classes resize with torchvision, the *Pil ones with PIL
    from transformers.models.convnext.image_processing_pil_convnext import ConvNextImageProcessorPil
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil
except ImportError:  # transformers 4: the default classes are the PIL ones
    ConvNextImageProcessorPil, ViTImageProcessorPil = ConvNextImageProcessor, ViTImageProcessor

from longtail.data.datasets import load_fashion_mnist
from longtail.heads import EpistemicClassifier, HeadsOnly, oracle_loss
from longtail.models.bridge import ClassifierBridge
from longtail.models.classifiers import bridged_classifier, load_classifier
from longtail.models.hf import HFImageClassifier, bridge_from_processor

LABELS = ["coat", "sandal", "bag"]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _labels(names):
    return {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


def _write(root, model, processor):
    model.save_pretrained(root)
    processor.save_pretrained(root)
    return f"hf:{root}"


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Three tiny random classifiers with 3 named classes and their processors (32 x 32 inputs)."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                              num_attention_heads=2, intermediate_size=32, **_labels(LABELS)))
    convnext = ConvNextForImageClassification(ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
                                                             **_labels(LABELS)))
    resnet = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                       layer_type="basic", **_labels(LABELS)))
    return {
        "vit": _write(root / "vit", vit, ViTImageProcessor(size={"height": 32, "width": 32})),
        # crop_pct 0.9: resize to int(32 / 0.9) = 35, an odd margin of 3 for the 32 crop (floor vs round differ)
        "convnext": _write(root / "convnext", convnext,
                           ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.9)),
        "resnet": _write(root / "resnet", resnet, ConvNextImageProcessor(
            size={"shortest_edge": 32}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)),
    }


@pytest.fixture(scope="module")
def real_images():
    """Real images as uint8 HWC arrays: Fashion-MNIST test images (28 x 28, grey as RGB: upsampled by the
    processors) and 56 x 84 colour mosaics of them (2 x 3 garments, another garment per channel: downsampled)."""
    x, _ = load_fashion_mnist("test")
    small = [np.repeat(x[100 + i].numpy()[..., None], 3, axis=-1) for i in range(4)]
    mosaics = []
    for i in range(3):
        channels = [torch.cat([torch.cat(list(x[18 * i + 6 * c + 3 * r: 18 * i + 6 * c + 3 * r + 3]), 1)
                               for r in range(2)], 0) for c in range(3)]
        mosaics.append(torch.stack(channels, -1).numpy())
    return {"fmnist": small, "mosaic": mosaics}


def _bridge_vs_processor(processor, bridge, images) -> float:
    """max |bridge - processor| over the images, in grey levels (0..255) of the un-normalised image."""
    expected = processor([Image.fromarray(a) for a in images], return_tensors="pt")["pixel_values"]
    decoded = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1  # as the decoder gives
    got = bridge(decoded)
    assert got.shape == expected.shape
    std = torch.tensor(processor.image_std).view(1, -1, 1, 1)
    return float(((got - expected).abs() * std).max() * 255)


def test_processor_settings_become_the_bridge(hf_dirs):
    vit, convnext, resnet = (load_classifier(hf_dirs[k]).bridge for k in ("vit", "convnext", "resnet"))
    assert (vit.resize, vit.size, vit.interpolation, vit.mean, vit.std) == ((32, 32), (32, 32), "bilinear",
                                                                           (0.5,) * 3, (0.5,) * 3)
    assert (convnext.resize, convnext.size, convnext.interpolation, convnext.crop_offset) == (35, (32, 32),
                                                                                              "bicubic", "floor")
    assert (resnet.resize, resnet.size, resnet.mean, resnet.std) == (36, (32, 32), IMAGENET_MEAN, IMAGENET_STD)
    assert vit.in_channels == convnext.in_channels == 3 and vit.clamp_resize and "ViTImageProcessor" in vit.source
    # 0..255 input without rescaling: mean and std scale by 255; >= 384 ConvNeXt warps without a crop
    raw = bridge_from_processor(ViTImageProcessor(do_rescale=False, image_mean=[10.0] * 3, image_std=[2.0] * 3))
    assert raw.mean == (10 / 255,) * 3 and raw.std == (2 / 255,) * 3 and raw.resize == (224, 224)
    assert bridge_from_processor(ConvNextImageProcessor(size={"shortest_edge": 384})).resize == (384, 384)
    with pytest.raises(ValueError, match="resample"):
        bridge_from_processor(ViTImageProcessor(resample=1))  # lanczos
    with pytest.raises(ValueError, match="longest_edge"):
        bridge_from_processor(ViTImageProcessorPil(size={"shortest_edge": 20, "longest_edge": 40}))


@pytest.mark.parametrize("name", ["vit", "convnext", "resnet"])
def test_bridge_equals_the_processors_on_real_images(hf_dirs, real_images, name):
    """Both transformers backends (torchvision on uint8 tensors, PIL) round to 8 bits after each resize pass:
    <= 0.5 grey level per pass, so the bridge (float) must agree within 1.5 grey levels (measured: <= 1.1)."""
    path = hf_dirs[name].removeprefix("hf:")
    pil_class = ViTImageProcessorPil if name == "vit" else ConvNextImageProcessorPil
    bridge = ClassifierBridge(load_classifier(hf_dirs[name]).bridge)
    for processor in (AutoImageProcessor.from_pretrained(path), pil_class.from_pretrained(path)):
        for images in real_images.values():
            assert _bridge_vs_processor(processor, bridge, images) < 1.5
    if name == "convnext":  # each part of the rule is needed: torchvision's crop offset, no per-pass clamp
        processor = AutoImageProcessor.from_pretrained(path)
        for change in ({"crop_offset": "round"}, {"clamp_resize": False}):
            other = ClassifierBridge(bridge.config, **change)
            assert _bridge_vs_processor(processor, other, real_images["fmnist"]) > 5


def test_load_logits_and_class_names(hf_dirs, tmp_path):
    from transformers import AutoModelForImageClassification

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for name, spec in hf_dirs.items():
        loaded = load_classifier(spec)
        raw = AutoModelForImageClassification.from_pretrained(spec[3:]).eval()
        with torch.no_grad():
            logits = loaded.model(x)
            assert isinstance(logits, torch.Tensor) and logits.shape == (2, 3), name
            assert torch.equal(logits, raw(pixel_values=x).logits), name
        assert loaded.class_names == LABELS and loaded.num_classes == 3 and loaded.info()["spec"] == spec
    names = tmp_path / "names.txt"
    names.write_text("a\nb\nc\n")
    assert load_classifier(hf_dirs["vit"], class_names_file=names).class_names == ["a", "b", "c"]  # a file wins
    torch.manual_seed(0)
    placeholder = tmp_path / "placeholder"
    ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1],
                                              num_labels=2)).save_pretrained(placeholder)
    with pytest.raises(FileNotFoundError, match=r"no preprocessor_config\.json"):
        load_classifier(f"hf:{placeholder}")
    ConvNextImageProcessor(size={"shortest_edge": 32}).save_pretrained(placeholder)
    assert load_classifier(f"hf:{placeholder}").class_names is None  # LABEL_0, LABEL_1 are not names


@pytest.mark.parametrize("name,head", [("vit", "model.classifier"), ("resnet", "model.classifier.1")])
def test_epistemic_head_attaches_and_the_base_stays_untouched(hf_dirs, tmp_path, name, head):
    loaded = load_classifier(hf_dirs[name])
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    wrapped = EpistemicClassifier(loaded.model, num_heads=3)
    assert wrapped.head_name == head
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    trainer = HeadsOnly(wrapped)
    opt = torch.optim.SGD(trainer.parameters(), lr=0.5)
    heads_before = wrapped.heads.weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        oracle_loss(trainer(x).head_logits, y).backward()
        opt.step()
    assert not torch.equal(wrapped.heads.weight, heads_before)
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())  # bit for bit
    wrapped.eval()
    out = wrapped(x)
    assert out.head_logits.shape == (6, 3, 3) and out.features.shape[0] == 6
    wrapped.save_heads(tmp_path / "heads.safetensors")
    again = load_classifier(hf_dirs[name], heads=tmp_path / "heads.safetensors")
    with torch.no_grad():
        assert torch.equal(again.model(x).head_logits, out.head_logits.detach())


def test_epistemic_head_on_a_bare_transformers_model(hf_dirs):
    from transformers import AutoModelForImageClassification

    raw = AutoModelForImageClassification.from_pretrained(hf_dirs["convnext"][3:]).eval()
    wrapped = EpistemicClassifier(raw, num_heads=2)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = wrapped(x)
        assert wrapped.head_name == "classifier" and torch.equal(out.logits, raw(pixel_values=x).logits)
    assert out.head_logits.shape == (2, 2, 3)


def test_guided_sampling_through_an_hf_classifier(hf_dirs, tmp_path):
    from longtail.generate import generate, plan_jobs
    from longtail.models.tiny import load_tiny_generator
    from longtail.sampling import GuidanceConfig
    from longtail.signals import get_signal
    from longtail.testing import tiny_generator

    loaded = load_classifier(hf_dirs["convnext"])
    loaded.model = EpistemicClassifier(loaded.model, num_heads=3)
    bridged = bridged_classifier(loaded).eval()
    # the gradient of the total uncertainty reaches the decoded image through classifier and bridge
    loaded.model.base.requires_grad_(False)
    x = (torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1).requires_grad_()
    out = bridged(x)
    get_signal("total")(out.logits, out.head_logits).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    loaded.model.base.requires_grad_(True)
    ldm = load_tiny_generator(tiny_generator(tmp_path / "gen"))
    jobs = plan_jobs([1, 1], lambda c, i: ["a photo of a coat", "a photo of a sandal"][c])
    kw = dict(classifier=bridged, num_steps=2, cfg_scale=2.0, batch_size=2, show=False)
    plain = generate(ldm, jobs, **kw)
    guided = generate(ldm, jobs, guidance=GuidanceConfig("total", weight=50.0), **kw)
    assert guided.nonfinite == 0 and guided.signal.shape == (2,) and not torch.allclose(guided.images, plain.images)
    assert all(p.requires_grad for p in bridged.parameters())  # the sampler restores the classifier


def test_finetuning_changes_weights_and_checkpoints_round_trip(hf_dirs, tmp_path):
    spec = hf_dirs["vit"]
    model = load_classifier(spec).model.train()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, start[k])]
    assert "model.classifier.weight" in changed and any(k.startswith("model.vit.") for k in changed)
    model.eval()
    with torch.no_grad():
        tuned = model(x)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "tuned.safetensors"))
    # transformers' own keys (no "model." prefix), as save_pretrained writes them, load too
    save_file({k: v.contiguous() for k, v in model.model.state_dict().items()}, str(tmp_path / "bare.safetensors"))
    for checkpoint in ("tuned.safetensors", "bare.safetensors"):
        loaded = load_classifier(spec, checkpoint=tmp_path / checkpoint)
        with torch.no_grad():
            assert torch.equal(loaded.model(x), tuned), checkpoint


def test_class_count_mismatches_are_one_line_naming_the_path_or_number(hf_dirs, tmp_path):
    spec = hf_dirs["resnet"]
    names = tmp_path / "four.txt"
    names.write_text("a\nb\nc\nd\n")
    with pytest.raises(ValueError, match=r"four.txt lists 4 class names but the classifier has 3 outputs"):
        load_classifier(spec, class_names_file=names)
    with pytest.raises(ValueError, match=r"has 3 classes but num_classes=5.*num_labels: 5") as err:
        load_classifier(spec, num_classes=5)
    assert spec in str(err.value) and "\n" not in str(err.value)
    # a new head of 5 classes on the pretrained backbone, asked for explicitly
    fresh = load_classifier(spec, num_classes=5, model_kwargs={"num_labels": 5, "ignore_mismatched_sizes": True})
    assert fresh.num_classes == 5 and fresh.class_names is None  # LABEL_0..4: names come from the data
    assert fresh.model(torch.zeros(1, 3, 32, 32)).shape == (1, 5)
    # config.json naming 4 classes for weights with 3 outputs
    broken = tmp_path / "broken"
    load_classifier(spec).model.model.save_pretrained(broken)
    config = json.loads((broken / "config.json").read_text())
    config.update(_labels(["a", "b", "c", "d"]))
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(str(broken)) + ".*id2label names 4 classes but "
                       r"classifier\.1\.weight .* has 3 outputs") as err:
        load_classifier(f"hf:{broken}")
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_classifier(f"hf:{tmp_path / 'nowhere'}")


def test_hf_image_classifier_without_a_linear_classifier_is_named():
    model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1], num_labels=0))
    with pytest.raises(ValueError, match="ResNetForImageClassification has no linear 'classifier'"):
        HFImageClassifier(model).get_classifier()


def _write_folder(root, per_class: int, seed: int):
    """Class-dependent squares as 28 x 28 grey PNGs, one folder per class of ``LABELS``."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(LABELS):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = np.zeros((28, 28), np.uint8)
            size = 6 + 5 * c
            y, x = rng.integers(0, 28 - size, 2)
            img[y : y + size, x : x + size] = 200
            Image.fromarray(img, "L").save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    return {"train": _write_folder(root / "train", 6, 0), "val": _write_folder(root / "val", 3, 1)}


def test_heads_train_command_on_an_hf_classifier(hf_dirs, folders, tmp_path):
    from typer.testing import CliRunner

    from longtail.cli import app

    out = tmp_path / "heads"
    result = CliRunner().invoke(app, ["heads", "train", "--classifier", hf_dirs["resnet"], "--data",
                                      str(folders["train"]), "--val", str(folders["val"]), "--out", str(out),
                                      "--num-heads", "2", "--epochs", "1", "--batch-size", "6", "--device", "cpu",
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    described = json.loads((out / "classifier.json").read_text())
    assert described["spec"] == hf_dirs["resnet"] and described["head_name"] == "model.classifier.1"
    loaded = load_classifier(hf_dirs["resnet"], heads=out / "heads.safetensors")
    assert isinstance(loaded.model, EpistemicClassifier) and loaded.model.heads.num_heads == 2
    assert loaded.model.head_name == "model.classifier.1" and loaded.class_names == LABELS


def test_mine_job_with_an_hf_classifier(hf_dirs, folders, tmp_path):
    """`longtail mine` with `classifier.spec: hf:DIR` and the smallest settings: heads trained, one guided round."""
    from longtail.config import load_config
    from longtail.jobs.mine import MineConfig, run_mine
    from longtail.testing import tiny_generator

    out = tmp_path / "run"
    over = [f"out={out}", f"data.train={folders['train']}", f"data.val={folders['val']}",
            f"classifier.spec={hf_dirs['vit']}", "generator.kind=embedded",
            f"generator.model={tiny_generator(tmp_path / 'gen')}", "generator.num_steps=2", "generator.cfg_scale=2.0",
            "generator.batch_size=3", "guidance.signal=total", "guidance.weight=1.0", "heads.epochs=1",
            "heads.num_heads=2", "schedule.epochs=2", "schedule.every=1", "schedule.per_round=3",
            "schedule.allocation=even", "finetune.batch_size=6", "finetune.num_workers=0", "device=cpu",
            "generator_check.per_class=0", "conditions=[ltg]"]
    result = run_mine(load_config(MineConfig, overrides=over), show=False, log=lambda m: None)
    rounds = result["per_seed"]["0"]["mining"]["ltg"]
    assert [r["synthetic"] for r in rounds] == [0, 3, 6]
    described = json.loads((out / "seed_0" / "base" / "classifier.json").read_text())
    assert described["spec"] == hf_dirs["vit"] and described["heads"] == "heads.safetensors"
    tuned = out / "seed_0" / "mining" / "ltg" / "round_2" / "classifier.safetensors"
    assert tuned.is_file()

import json
import math

import pytest
import torch

from helpers import Brightness
from longtail.evaluation.judge import (
    Judge,
    check_classes,
    clip_judge,
    load_judge,
    realism,
    realism_from_features,
    save_judge,
    train_judge,
)
from longtail.generate import Generated
from longtail.models.bridge import BridgeConfig, ClassifierBridge
from longtail.train import SmallCNN


def const_images(values, size: int = 4) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, size, size).clone()


def brightness_judge(**kw) -> Judge:
    return Judge(Brightness(), ["dark", "bright"], **kw)


def test_score_is_exact_on_a_brightness_classifier():
    judge = brightness_judge()
    images = const_images([0.5, 0.5, -0.5, -0.5])
    labels = torch.tensor([1, 0, 0, 0])  # predictions 1, 1, 0, 0: the second image is wrong
    score = judge.score(images, labels)
    assert score["n"] == 4
    assert score["accuracy"] == pytest.approx(0.75)
    assert score["p_class"] == pytest.approx((0.75 + 0.25 + 0.75 + 0.75) / 4)
    assert torch.allclose(judge.features(images), torch.tensor([[0.5], [0.5], [-0.5], [-0.5]]))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        judge.score(images, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="labels must be"):
        judge.score(images, torch.tensor([0, 1]))


def test_the_bridge_maps_the_decoder_range_before_the_judge():
    # mean 0 / std 1: [-1, 1] -> [0, 1]: -0.5 becomes 0.25 (judged bright, P(bright) = sigmoid(ln 3 / 2)),
    # +0.5 becomes 0.75 (P(bright) = sigmoid(3 ln 3 / 2))
    judge = brightness_judge(bridge=ClassifierBridge(BridgeConfig(mean=(0.0,), std=(1.0,))))
    score = judge.score(const_images([-0.5, 0.5]), torch.tensor([0, 1]))
    p_dark_img, p_bright_img = 3**0.5 / (1 + 3**0.5), 3**1.5 / (1 + 3**1.5)
    assert score["accuracy"] == pytest.approx(0.5)
    assert score["p_class"] == pytest.approx(((1 - p_dark_img) + p_bright_img) / 2)


def tiny_cnn_judge(seed: int = 0) -> Judge:
    torch.manual_seed(seed)
    return Judge(SmallCNN(1, 3, width=4), ["a", "b", "c"])


def test_realism_of_a_set_against_itself_is_perfect():
    judge = tiny_cnn_judge()
    images = torch.rand(24, 1, 8, 8) * 2 - 1
    labels = torch.arange(24) % 3
    gen = Generated(images=images, jobs=[], labels=labels, signal=None, p_class=None, pred=None, output=None,
                    signal_name=None, seconds=1.0)
    r = realism(judge, gen, images, labels)
    assert r["precision"] == 1.0 and r["recall"] == 1.0
    assert r["fid"] == pytest.approx(0.0, abs=1e-6)
    far = images + 50.0  # a second "class" nowhere near the generated one
    noisy = torch.rand(24, 1, 8, 8) * 2 - 1
    assert realism(judge, noisy, images)["precision"] < 1.0 or realism(judge, noisy, images)["recall"] < 1.0
    # the reference is restricted to the generated classes: a far-away real class costs no recall
    only0 = Generated(images=images[labels == 0], jobs=[], labels=labels[labels == 0], signal=None, p_class=None,
                      pred=None, output=None, signal_name=None, seconds=1.0)
    real = torch.cat([images[labels == 0], far])
    real_labels = torch.cat([torch.zeros(8, dtype=torch.long), torch.full((24,), 1)])
    assert realism(judge, only0, real, real_labels)["recall"] == 1.0
    assert realism(judge, only0.images, real)["recall"] < 1.0  # without labels: all real images count


def test_realism_is_nan_when_a_set_is_too_small():
    feats = torch.randn(3, 4)
    r = realism_from_features(feats, torch.randn(10, 4), k=3)
    assert math.isnan(r["precision"]) and math.isnan(r["recall"]) and not math.isnan(r["fid"])


def test_a_judge_with_other_classes_is_refused_naming_both_lists():
    judge = brightness_judge()
    judge.check_classes([" Dark", "BRIGHT "])  # case and surrounding whitespace do not matter
    with pytest.raises(ValueError) as err:
        judge.check_classes(["dark", "medium", "bright"])
    assert "['dark', 'bright']" in str(err.value) and "['dark', 'medium', 'bright']" in str(err.value)
    with pytest.raises(ValueError, match="differ"):
        check_classes(["a", "b"], ["b", "a"])  # order matters: class id c is the c-th name


def toy_set(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes separable by brightness: dark (-0.6) and bright (+0.6) 16x16 images with noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = (labels.float() * 1.2 - 0.6).view(-1, 1, 1, 1) + 0.1 * torch.randn(n, 1, 16, 16, generator=g)
    return images.clamp(-1, 1), labels


@pytest.fixture(scope="module")
def trained():
    images, labels = toy_set(256, seed=0)
    return train_judge(images, labels, num_classes=2, epochs=8, seed=0, width=8, batch_size=64)


def test_train_judge_separates_a_toy_set(trained):
    assert isinstance(trained, SmallCNN) and not trained.training
    judge = Judge(trained, ["dark", "bright"])
    for seed in (0, 1):  # the training set and a fresh draw
        images, labels = toy_set(64, seed)
        assert judge.score(images, labels)["accuracy"] == 1.0
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        train_judge(*toy_set(8, 0)[:1], torch.full((8,), 2), num_classes=2, epochs=1)


def test_save_load_round_trip_gives_identical_logits(trained, tmp_path):
    path = save_judge(trained, tmp_path / "judge", ["dark", "bright"])
    data = json.loads(path.read_text())
    assert data["spec"] == "longtail.train:SmallCNN" and data["model_kwargs"] == {"in_channels": 1, "width": 8}
    loaded = load_judge(tmp_path / "judge")
    assert loaded.class_names == ["dark", "bright"]
    images, _ = toy_set(16, seed=3)
    with torch.no_grad():
        assert torch.equal(loaded.model(images), trained(images))
    original = Judge(trained, ["dark", "bright"], bridge=ClassifierBridge(BridgeConfig(in_channels=1)))
    assert torch.equal(loaded.logits(images), original.logits(images))
    with pytest.raises(ValueError, match="class names"):
        save_judge(trained, tmp_path / "nameless", [])


def tiny_clip(root, with_processor: bool = True):
    """A random-weight CLIP (32 px images, 8 px patches) and a letter-level tokenizer, saved locally."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1, "hidden_size": 32,
                     "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 64,
                     "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
                       "num_hidden_layers": 2, "image_size": 32, "patch_size": 8, "num_channels": 3},
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: i + 2 for i, c in enumerate(letters)})
    vocab.update({c + "</w>": i + 2 + len(letters) for i, c in enumerate(letters)})
    raw = root / "raw"
    raw.mkdir(parents=True)
    (raw / "vocab.json").write_text(json.dumps(vocab))
    (raw / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(vocab=str(raw / "vocab.json"), merges=str(raw / "merges.txt"), model_max_length=77)
    model.save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    if with_processor:
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
            root / "clip")
    return model, tokenizer, root / "clip"


def test_clip_judge_on_a_tiny_random_clip(tmp_path):
    names = ["shirt", "shoe", "bag"]
    clip, tokenizer, path = tiny_clip(tmp_path)
    judge = clip_judge(path, names)
    assert judge.bridge.config.size == (32, 32) and judge.bridge.config.in_channels == 3
    images = torch.rand(5, 1, 28, 28) * 2 - 1  # grayscale decoder output, not CLIP's size
    probs = judge.probs(images)
    assert probs.shape == (5, 3) and torch.isfinite(probs).all()
    assert torch.allclose(probs.sum(dim=1), torch.ones(5), atol=1e-6)
    # parity with CLIPModel's own zero-shot logits on the same pixels
    tokens = tokenizer([f"a photo of a {n}" for n in names], padding=True, return_tensors="pt")
    pixels = judge.bridge(images)
    with torch.no_grad():
        expected = clip(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                        pixel_values=pixels).logits_per_image
    torch.testing.assert_close(judge.logits(images), expected, atol=1e-5, rtol=1e-5)
    score = judge.score(images, torch.tensor([0, 1, 2, 0, 1]))
    assert 0.0 <= score["accuracy"] <= 1.0 and 0.0 < score["p_class"] < 1.0
    assert judge.features(images).shape == (5, 16)


def test_clip_judge_without_a_processor_file_uses_the_vision_size_and_never_downloads(tmp_path):
    _, _, path = tiny_clip(tmp_path, with_processor=False)
    judge = clip_judge(path, ["shirt", "shoe"])
    assert judge.bridge.config.size == (32, 32) and judge.bridge.config.interpolation == "bicubic"
    assert judge.probs(torch.zeros(2, 3, 40, 40)).shape == (2, 2)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        clip_judge(tmp_path / "openai/clip-vit-base-patch32", ["shirt"])


def test_judge_training_set_carries_the_generators_nuisance_modes(tmp_path):
    from helpers import fake_fashion_mnist
    from longtail.data.nuisance import assign_modes
    from longtail.evaluation.judge import fashion_mnist_train

    data = fake_fashion_mnist(tmp_path / "data", per_class_train=8, per_class_test=1)
    clean, labels = fashion_mnist_train(data)
    images, same = fashion_mnist_train(data, {"invert": 0.25}, 3)
    assert torch.equal(labels, same)
    inverted = assign_modes(labels, {"invert": 0.25}, 3) >= 0
    assert int(inverted.sum()) == 20 and torch.equal(images[inverted], -clean[inverted])
    assert torch.equal(images[~inverted], clean[~inverted])


def test_generator_nuisance_reads_the_generators_metadata(tmp_path):
    from longtail.jobs.mine import MineConfig
    from longtail.jobs.stages import generator_nuisance

    (tmp_path / "longtail_generator.json").write_text(json.dumps({"nuisance": {"rates": {"blur": 0.03}, "seed": 2}}))
    cfg = MineConfig()
    cfg.generator.model = str(tmp_path)
    assert generator_nuisance(cfg) == ({"blur": 0.03}, 2)
    cfg.generator.model = "clean"  # the shipped clean generator has no modes
    assert generator_nuisance(cfg) is None
    cfg.generator.kind = "sd"
    assert generator_nuisance(cfg) is None

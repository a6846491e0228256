"""Loading the user's classifier: specs, checkpoints (safetensors / weights-only torch), heads, names."""

import json

import pytest
import torch
from safetensors.torch import save_file

from longtail.heads import EpistemicClassifier
from longtail.models.bridge import BridgeConfig
from longtail.models.classifiers import (
    bridged_classifier,
    classifier_bridge,
    load_classifier,
    read_class_names,
    strip_prefixes,
)

ENTRY_POINT = """
import torch

def build(num_classes=3, width=4):
    torch.manual_seed(0)
    layers = [torch.nn.Conv2d(1, width, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, num_classes))

def not_a_model():
    return 42
"""


@pytest.fixture(scope="module")
def mobilenet():
    torch.manual_seed(0)
    loaded = load_classifier("mobilenet_v3_small", num_classes=4)
    return loaded.model, {k: v.clone() for k, v in loaded.model.state_dict().items()}


def _same_outputs(a, b):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.allclose(a.eval()(x), b.eval()(x), atol=1e-6)


def test_torchvision_from_safetensors_and_wrapped_pt(mobilenet, tmp_path):
    model, state = mobilenet
    save_file(state, str(tmp_path / "w.safetensors"))
    loaded = load_classifier("mobilenet_v3_small", num_classes=4, checkpoint=tmp_path / "w.safetensors")
    assert _same_outputs(loaded.model, model) and loaded.num_classes == 4
    # DataParallel-style prefix inside a {"state_dict": ...} wrapper, saved with torch.save
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "w.pt")
    loaded = load_classifier("mobilenet_v3_small", num_classes=4, checkpoint=tmp_path / "w.pt")
    assert _same_outputs(loaded.model, model)
    assert loaded.bridge.size == (224, 224) and loaded.bridge.resize == 256  # default weights' transforms


def test_bad_checkpoints_name_the_problem(mobilenet, tmp_path):
    _, state = mobilenet
    partial = {k: v for k, v in state.items() if not k.startswith("classifier.3")}
    partial["extra.weight"] = torch.zeros(1)
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(
        ValueError, match=r"missing keys \['classifier\.3\.weight', 'classifier\.3\.bias'\]"
    ) as err:
        load_classifier("mobilenet_v3_small", num_classes=4, checkpoint=tmp_path / "partial.pt")
    assert "extra.weight" in str(err.value) and "partial.pt" in str(err.value)
    report = load_classifier(
        "mobilenet_v3_small", num_classes=4, checkpoint=tmp_path / "partial.pt", strict=False
    )
    assert report.num_classes == 4
    with pytest.raises(
        ValueError, match=r"classifier\.3\.weight: checkpoint \(4, 1024\) vs model \(7, 1024\)"
    ):
        load_classifier("mobilenet_v3_small", num_classes=7, checkpoint=_full(state, tmp_path))
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled.pt")  # a whole pickled module, not a state dict
    with pytest.raises(ValueError, match="weights_only=True"):
        load_classifier("mobilenet_v3_small", num_classes=4, checkpoint=tmp_path / "pickled.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_classifier("mobilenet_v3_small", num_classes=4, checkpoint=tmp_path / "missing.pt")


def _full(state, tmp_path):
    path = tmp_path / "full.pt"
    torch.save(state, path)
    return path


def test_timm_with_model_prefix(tmp_path):
    torch.manual_seed(0)
    first = load_classifier("timm:test_resnet", num_classes=3)
    torch.save({"model": {f"model.{k}": v for k, v in first.model.state_dict().items()}}, tmp_path / "t.pth")
    second = load_classifier("timm:test_resnet", num_classes=3, checkpoint=tmp_path / "t.pth")
    assert _same_outputs(first.model, second.model)
    assert (
        second.bridge.size == (160, 160)
        and second.bridge.resize == 168
        and second.bridge.source.startswith("timm")
    )


def test_entry_points(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(ENTRY_POINT)
    by_file = load_classifier(f"{tmp_path / 'my_models.py'}:build", num_classes=5)
    assert by_file.num_classes == 5
    assert by_file.bridge == BridgeConfig(in_channels=1, source=by_file.bridge.source)  # identity, 1 channel
    monkeypatch.syspath_prepend(str(tmp_path))
    by_module = load_classifier("my_models:build", num_classes=2, model_kwargs={"width": 6})
    assert by_module.model[-1].weight.shape == (2, 6)
    with pytest.raises(TypeError, match=r"not an nn\.Module"):
        load_classifier("my_models:not_a_model")
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        load_classifier("my_models:nope")
    with pytest.raises(ValueError, match="unknown classifier 'resnet_fifty'"):
        load_classifier("resnet_fifty")


def test_heads_class_names_and_bridge(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(ENTRY_POINT)
    monkeypatch.syspath_prepend(str(tmp_path))
    base = load_classifier("my_models:build", num_classes=3).model
    wrapped = EpistemicClassifier(base, num_heads=3, head_name="3", seed=1)
    wrapped.save_heads(tmp_path / "heads.safetensors")
    torch.save(base.state_dict(), tmp_path / "base.pt")
    (tmp_path / "names.txt").write_text("coat\nbag\n\nshirt\n")
    loaded = load_classifier(
        "my_models:build",
        num_classes=3,
        checkpoint=tmp_path / "base.pt",
        heads=tmp_path / "heads.safetensors",
        head_name="3",
        class_names_file=tmp_path / "names.txt",
        preprocess={"size": 8, "resize": 8, "mean": [0.5], "std": [0.25]},
    )
    assert (
        isinstance(loaded.model, EpistemicClassifier) and loaded.model.heads.num_heads == 3
    )  # from the file
    assert loaded.class_names == ["coat", "bag", "shirt"]
    x = torch.rand(2, 1, 12, 12) * 2 - 1
    out = bridged_classifier(loaded)(x)
    assert out.logits.shape == (2, 3) and out.head_logits.shape == (2, 3, 3)
    expected = wrapped(classifier_bridge(loaded)(x))
    assert torch.allclose(out.head_logits, expected.head_logits, atol=1e-6)
    assert json.dumps(loaded.info())  # JSON-ready
    (tmp_path / "names.json").write_text(json.dumps(["a", "b"]))
    with pytest.raises(ValueError, match="2 class names but the classifier has 3 outputs"):
        load_classifier("my_models:build", num_classes=3, class_names_file=tmp_path / "names.json")


def test_class_name_files_and_prefixes(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"1": "dog", "0": "cat"}))
    assert read_class_names(tmp_path / "a.json") == ["cat", "dog"]
    keys = {"fc.weight", "fc.bias"}
    t = torch.zeros(1)
    assert set(strip_prefixes({"module.model.fc.weight": t, "module.model.fc.bias": t}, keys)) == keys
    # a prefix the model itself uses is kept
    assert set(strip_prefixes({"model.fc.weight": t}, {"model.fc.weight"})) == {"model.fc.weight"}

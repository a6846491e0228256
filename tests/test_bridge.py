"""The decoder -> classifier bridge: parity with torchvision / timm transforms, gradients, the channel rule."""

import pytest
import timm
import torch
import torchvision

from longtail.models.bridge import BridgeConfig, ClassifierBridge, match_channels


def test_bridge_matches_torchvision_transforms():
    image = torch.rand(2, 3, 300, 260, generator=torch.Generator().manual_seed(0))
    for weights in (
        torchvision.models.ResNet18_Weights.DEFAULT,
        torchvision.models.ResNet50_Weights.IMAGENET1K_V2,
    ):
        expected = weights.transforms()(image)
        got = ClassifierBridge.from_torchvision(weights)(image * 2 - 1)
        assert got.shape == expected.shape == (2, 3, 224, 224)
        assert torch.allclose(got, expected, atol=1e-4)


def test_bridge_matches_timm_transforms():
    model = timm.create_model(
        "test_resnet",
        pretrained_cfg_overlay={"input_size": (3, 48, 48), "crop_pct": 0.9, "interpolation": "bicubic"},
    )
    cfg = timm.data.resolve_model_data_config(model)
    image = torch.rand(1, 3, 70, 90, generator=torch.Generator().manual_seed(1))
    expected = timm.data.create_transform(**cfg)(image)
    bridge = ClassifierBridge.from_timm(model)
    assert bridge.config.resize == 53 and bridge.config.size == (48, 48)
    assert torch.allclose(bridge(image * 2 - 1), expected, atol=1e-4)


def test_bridge_is_differentiable_and_identity_by_default():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(ClassifierBridge()(x), x, atol=1e-6)
    x.requires_grad_(True)
    ClassifierBridge(BridgeConfig(size=(8, 8), resize=10))(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_channel_rule():
    rgb = torch.rand(2, 3, 8, 8)
    assert torch.allclose(match_channels(rgb, 1), rgb.mean(dim=1, keepdim=True))
    gray = torch.rand(2, 1, 8, 8)
    assert torch.equal(match_channels(gray, 3), gray.expand(-1, 3, -1, -1))
    with pytest.raises(ValueError, match="cannot map 2-channel"):
        match_channels(torch.rand(1, 2, 4, 4), 3)
    # a grayscale classifier with RGB statistics: the stats are averaged
    bridge = ClassifierBridge(BridgeConfig(mean=(0.4, 0.5, 0.6), std=(0.2, 0.2, 0.2), in_channels=1))
    out = bridge(rgb * 2 - 1)
    assert out.shape == (2, 1, 8, 8)
    assert torch.allclose(out, (rgb.mean(dim=1, keepdim=True) - 0.5) / 0.2, atol=1e-5)


def test_crop_offset_and_per_pass_clamp():
    from longtail.models.bridge import center_crop, resize_passes, straight_through_clamp

    x = torch.arange(7.0).view(1, 1, 1, 7).expand(1, 1, 7, 7)  # column index as value
    assert center_crop(x, (4, 4))[0, 0, 0].tolist() == [2.0, 3.0, 4.0, 5.0]  # round(1.5) = 2, torchvision
    assert center_crop(x, (4, 4), "floor")[0, 0, 0].tolist() == [1.0, 2.0, 3.0, 4.0]  # transformers
    with pytest.raises(ValueError, match="crop_offset"):
        BridgeConfig(crop_offset="ceil")
    # forward clamps, backward is the identity
    v = torch.tensor([-0.5, 0.5, 1.5], requires_grad=True)
    out = straight_through_clamp(v)
    out.sum().backward()
    assert out.tolist() == [0.0, 0.5, 1.0] and v.grad.tolist() == [1.0, 1.0, 1.0]
    # a hard edge: bicubic overshoots; the clamped passes stay in [0, 1] and equal the joint resize elsewhere
    edge = torch.zeros(1, 1, 8, 8)
    edge[..., 4:] = 1.0
    joint = resize_passes(edge, (12, 12), "bicubic", clamp=False)
    passes = resize_passes(edge, (12, 12), "bicubic", clamp=True)
    assert joint.min() < 0 and joint.max() > 1 and passes.min() == 0 and passes.max() == 1
    assert torch.allclose(passes, joint.clamp(0, 1), atol=1e-6)  # an edge along one axis: one clamp suffices
    grads = []
    for clamp in (True, False):  # straight-through: the clamped passes have the unclamped resize's gradient
        y = edge.clone().requires_grad_(True)
        (resize_passes(y, (12, 12), "bicubic", clamp=clamp) * torch.arange(144.0).view(12, 12)).sum().backward()
        grads.append(y.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-4) and grads[0].abs().min() > 0

"""Bridge vs Hugging Face image processors: max |bridge - processor| in grey levels on real images
(Fashion-MNIST test images 100-103 as RGB 28x28, and three 56x84 colour mosaics of Fashion-MNIST test images), per
processor backend (torchvision and PIL), with and without the bridge's per-pass clamp.

    OMP_NUM_THREADS=1 python benchmarks/hf_bridge_parity.py
"""
import numpy as np
import torch
from PIL import Image
from transformers import ConvNextImageProcessor, ViTImageProcessor
from transformers.models.convnext.image_processing_pil_convnext import ConvNextImageProcessorPil
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from longtail.data.datasets import load_fashion_mnist
from longtail.models.bridge import BridgeConfig, ClassifierBridge

x, _ = load_fashion_mnist("test")
small = [np.repeat(x[100 + i].numpy()[..., None], 3, -1) for i in range(4)]
mosaic = [torch.stack([torch.cat([torch.cat(list(x[18*i+6*c+3*r:18*i+6*c+3*r+3]), 1) for r in range(2)], 0)
                       for c in range(3)], -1).numpy() for i in range(3)]
M, S = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
cases = {"ViT 32 bilinear": (ViTImageProcessor, ViTImageProcessorPil, dict(size={"height": 32, "width": 32})),
         "ConvNeXt 32 crop_pct .9 bicubic": (ConvNextImageProcessor, ConvNextImageProcessorPil,
                                             dict(size={"shortest_edge": 32}, crop_pct=0.9)),
         "ResNet 32 crop_pct .875 bicubic": (ConvNextImageProcessor, ConvNextImageProcessorPil,
                                             dict(size={"shortest_edge": 32}, image_mean=M, image_std=S)),
         "ConvNeXt 400 warp bicubic": (ConvNextImageProcessor, ConvNextImageProcessorPil, dict(size={"shortest_edge": 400}))}
print(f"{'processor':34s} {'backend':12s} {'images':8s} {'bridge':>7s} {'no clamp':>9s} {'mean':>7s}")
for name, (tv, pil, kw) in cases.items():
    for backend, cls in (("torchvision", tv), ("PIL", pil)):
        p = cls(**kw)
        cfg = BridgeConfig.from_transformers(p, 3)
        for label, imgs in (("28x28", small), ("56x84", mosaic)):
            ref = p([Image.fromarray(a) for a in imgs], return_tensors="pt")["pixel_values"]
            t = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
            std = torch.tensor(p.image_std).view(1, -1, 1, 1)
            d = [((ClassifierBridge(cfg, clamp_resize=c)(t) - ref).abs() * std * 255) for c in (True, False)]
            print(f"{name:34s} {backend:12s} {label:8s} {d[0].max():7.3f} {d[1].max():9.3f} {d[0].mean():7.4f}")

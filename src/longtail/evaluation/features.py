"""Feature extractors for ``distribution.py``: images ``[N, C, H, W]`` -> feature vectors ``[N, D]``.

- ``LayerFeatures``: any classifier's own features, by default the input of its classification head (the
  features the Epistemic Head reads), or any named module's output, pooled over space / tokens;
- ``InceptionFeatures``: the FID Inception-v3 (pool3, 2048-d), built from torchvision's blocks with the
  TensorFlow-compatible pooling of the original FID network and loaded *only* from a local weights file
  (pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` or torch-fidelity's
  ``weights-inception-2015-12-05-6726825d.pth``, as torchmetrics uses; same parameter names). Nothing is
  ever downloaded. With those weights the numbers are FID proper (paper Eq. 13, Figure 15).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..files import read_state_dict
from ..heads import EpistemicClassifier, find_head

Pool = Literal["avg", "flatten"]


@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps a batch of images ``[B, C, H, W]`` to feature vectors ``[B, D]``."""

    def __call__(self, images: Tensor) -> Tensor: ...


def pool_features(x: Tensor, pool: Pool = "avg") -> Tensor:
    """Reduce a captured activation to ``[B, D]``.

    ``avg``: ``[B, C, H, W]`` -> mean over H, W; ``[B, T, D]`` (transformer tokens) -> mean over T;
    ``[B, D]`` unchanged. ``flatten``: everything after the batch dim in one vector.
    """
    if pool == "flatten" or x.ndim == 2:
        return x.flatten(1)
    if pool != "avg":
        raise ValueError(f"pool must be 'avg' or 'flatten', got {pool!r}")
    if x.ndim == 4:
        return x.mean(dim=(2, 3))
    if x.ndim == 3:
        return x.mean(dim=1)
    return x.flatten(1)


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


class LayerFeatures:
    """Features of a classifier at one layer, captured by a hook for the duration of each call.

    ``layer_name=None``: the input of the classification head (found by ``longtail.heads.find_head``; for an
    ``EpistemicClassifier`` the base model's head). Otherwise the output of the module with that name in
    ``model.named_modules()``. Runs the model in eval mode under ``no_grad``; restores its mode afterwards.
    Images go in as the model expects them (the embedded default: ``[B, 1, 32, 32]`` in [-1, 1]).
    """

    def __init__(self, model: nn.Module, layer_name: str | None = None, pool: Pool = "avg") -> None:
        self.model, self.pool = model, pool
        if layer_name is None:
            runner = model.base if isinstance(model, EpistemicClassifier) else model
            self.layer_name, self.module = find_head(runner)
            self.runner, self.capture_input = runner, True
        else:
            modules = dict(model.named_modules())
            if layer_name not in modules:
                raise ValueError(
                    f"no module {layer_name!r} in {type(model).__name__} (see model.named_modules())"
                )
            self.layer_name, self.module = layer_name, modules[layer_name]
            self.runner, self.capture_input = model, False

    def __call__(self, images: Tensor) -> Tensor:
        """images ``[B, ...]`` -> features ``[B, D]`` (float32, CPU)."""
        captured: list[Tensor] = []

        def keep_input(_m: nn.Module, args: tuple[Tensor, ...]) -> None:
            captured.append(args[0])

        def keep_output(_m: nn.Module, _args: tuple[Tensor, ...], out: Tensor) -> None:
            captured.append(out[0] if isinstance(out, tuple) else out)

        if self.capture_input:
            handle = self.module.register_forward_pre_hook(keep_input)
        else:
            handle = self.module.register_forward_hook(keep_output)
        was_training = self.runner.training
        self.runner.eval()
        try:
            with torch.no_grad():
                self.runner(images.to(_device(self.runner)))
        finally:
            handle.remove()
            self.runner.train(was_training)
        if not captured:
            raise RuntimeError(f"module {self.layer_name!r} was not called during the forward pass")
        return pool_features(captured[0], self.pool).float().cpu()  # first call if the module is reused


def extract(extractor: FeatureExtractor, images: Tensor, batch_size: int = 256) -> Tensor:
    """Run ``extractor`` over ``images [N, C, H, W]`` in batches: ``[N, D]`` (float32, CPU)."""
    if images.shape[0] == 0:
        raise ValueError("no images to extract features from")
    chunks = [
        extractor(images[i : i + batch_size]).float().cpu() for i in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(chunks)


# --- the FID Inception-v3 -----------------------------------------------------------------------------------


def _fid_blocks() -> tuple[type[nn.Module], ...]:
    """torchvision's Inception blocks with the original FID network's pooling.

    TensorFlow's average pool ignores the zero padding (``count_include_pad=False``), and the last block
    pools its branch with a max instead of an average; parameters (and their names) are unchanged.
    """
    from torchvision.models import inception as tv

    def avg(x: Tensor) -> Tensor:
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)

    class FIDInceptionA(tv.InceptionA):
        def _forward(self, x: Tensor) -> list[Tensor]:
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return [self.branch1x1(x), b5, b3, self.branch_pool(avg(x))]

    class FIDInceptionC(tv.InceptionC):
        def _forward(self, x: Tensor) -> list[Tensor]:
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            d = x
            for layer in (
                self.branch7x7dbl_1,
                self.branch7x7dbl_2,
                self.branch7x7dbl_3,
                self.branch7x7dbl_4,
                self.branch7x7dbl_5,
            ):
                d = layer(d)
            return [self.branch1x1(x), b7, d, self.branch_pool(avg(x))]

    class FIDInceptionE(tv.InceptionE):
        max_pool = False

        def _forward(self, x: Tensor) -> list[Tensor]:
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else avg(x)
            return [self.branch1x1(x), b3, d, self.branch_pool(pooled)]

    class FIDInceptionEMax(FIDInceptionE):
        max_pool = True

    return FIDInceptionA, FIDInceptionC, FIDInceptionE, FIDInceptionEMax


def build_fid_inception() -> nn.Module:
    """The FID Inception-v3 architecture (1008-way fc, no aux head), random weights."""
    from torchvision.models import inception as tv

    block_a, block_c, block_e, block_e_max = _fid_blocks()
    net = tv.Inception3(
        num_classes=1008,
        aux_logits=False,
        transform_input=False,
        init_weights=False,
        inception_blocks=[
            tv.BasicConv2d,
            block_a,
            tv.InceptionB,
            block_c,
            tv.InceptionD,
            block_e,
            tv.InceptionAux,
        ],
    )
    net.Mixed_7c = block_e_max(2048)
    return net.eval()


_POOL3_PATH = (
    "Conv2d_1a_3x3",
    "Conv2d_2a_3x3",
    "Conv2d_2b_3x3",
    "maxpool1",
    "Conv2d_3b_1x1",
    "Conv2d_4a_3x3",
    "maxpool2",
    "Mixed_5b",
    "Mixed_5c",
    "Mixed_5d",
    "Mixed_6a",
    "Mixed_6b",
    "Mixed_6c",
    "Mixed_6d",
    "Mixed_6e",
    "Mixed_7a",
    "Mixed_7b",
    "Mixed_7c",
    "avgpool",
)


def load_fid_state(path: str | Path) -> dict[str, Tensor]:
    """Read FID Inception weights from a local ``.pth`` / ``.pt`` / ``.safetensors`` file; never downloads.

    Raises ``FileNotFoundError`` (with where to get them) or ``longtail.files.WeightsError`` for a file that
    is not a state dict of tensors (a pickled module, a bare tensor, a corrupt file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"FID Inception weights not found at {path}. They are never downloaded: fetch "
            "pt_inception-2015-12-05-6726825d.pth (pytorch-fid) or weights-inception-2015-12-05-6726825d.pth "
            "(torch-fidelity) on a machine with internet and pass its path, or use LayerFeatures(classifier)."
        )
    return read_state_dict(path, "FID Inception weights")


class InceptionFeatures(nn.Module):
    """FID Inception-v3 pool3 features ``[B, 2048]`` from a local weights file.

    Input ``[B, C, H, W]`` float in ``input_range`` (the project's [-1, 1] by default); one channel is
    repeated to three; resized to 299x299 bilinearly (as pytorch-fid; torch-fidelity's TF1-exact resize
    differs slightly, so scores agree with torchmetrics closely but not bit for bit).
    """

    def __init__(
        self,
        weights_path: str | Path,
        input_range: tuple[float, float] = (-1.0, 1.0),
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        state = {k: v for k, v in load_fid_state(weights_path).items() if not k.startswith("AuxLogits.")}
        fc = state.get("fc.weight")
        if fc is not None and tuple(fc.shape) != (1008, 2048):
            raise ValueError(
                f"{weights_path}: fc.weight is {tuple(fc.shape)}, the FID Inception has (1008, 2048); "
                "torchvision's ImageNet Inception weights are not the FID network"
            )
        self.net = build_fid_inception()
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{weights_path} is not an FID Inception state dict: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        self.input_range = input_range
        self.to(device).eval().requires_grad_(False)

    @property
    def dim(self) -> int:
        return 2048

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """images ``[B, C, H, W]`` (C = 1 or 3) -> pool3 features ``[B, 2048]`` (float32, CPU)."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images [B, 1 or 3, H, W], got {tuple(images.shape)}")
        lo, hi = self.input_range
        x = images.to(_device(self.net), torch.float32)
        x = (x - lo) / (hi - lo) * 2.0 - 1.0  # the network expects [-1, 1]
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        for name in _POOL3_PATH:
            x = getattr(self.net, name)(x)
        return x.flatten(1).float().cpu()

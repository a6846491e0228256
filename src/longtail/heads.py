"""The Epistemic Head: K copies of a classifier's last linear layer, trained behind a stop-gradient.

METHOD.md section 2. ``EpistemicClassifier(model, num_heads=5)`` finds the model's classification head
(timm ``get_classifier``, the torchvision families, or a module name you give), hooks the features that
enter it, and evaluates K head copies on those features *detached*. One forward pass returns the base
logits, untouched, and the head logits ``[B, K, C]`` that every head signal reads.

Initialisation: each copy starts as the base head plus Gaussian noise of standard deviation
``init_noise * std(base weight)`` (default 0.1). Copies start where the base model already is (so each
head is a competent classifier from step one) and the noise breaks their symmetry, which the oracle
loss needs: with identical copies the argmin is always head 0 and the others never train.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from .files import read_state_dict, to_json
from .outputs import ClassifierOutput

# Module paths of the classification head in torchvision's families (first that exists and is Linear wins).
_TORCHVISION_HEAD_PATHS = (
    "fc",  # resnet*, resnext*, wide_resnet*, regnet*, googlenet, inception_v3, shufflenet
    "heads.head",  # vit_*
    "head",  # swin_*
    "classifier.3",  # mobilenet_v3_*
    "classifier.2",  # convnext_*
    "classifier.1",  # efficientnet_*, mobilenet_v2, mnasnet
    "classifier.6",  # vgg*, alexnet
    "classifier",  # densenet*
)


def find_head(model: nn.Module, head_name: str | None = None) -> tuple[str, nn.Linear]:
    """Return ``(module path, nn.Linear)`` of the model's classification head.

    Order: an explicit ``head_name``; timm's ``get_classifier()``; torchvision's known head paths.
    Raises ``ValueError`` naming the model class when none is a ``nn.Linear``.
    """
    modules = dict(model.named_modules())
    if head_name is not None:
        if head_name not in modules:
            raise ValueError(f"head module {head_name!r} not found in {type(model).__name__}")
        head = modules[head_name]
        if not isinstance(head, nn.Linear):
            raise ValueError(f"head module {head_name!r} is {type(head).__name__}, not nn.Linear")
        return head_name, head
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        head = get_classifier()
        for name, module in modules.items():
            if module is head and isinstance(module, nn.Linear):
                return name, module
    for name in _TORCHVISION_HEAD_PATHS:
        if isinstance(modules.get(name), nn.Linear):
            return name, modules[name]
    raise ValueError(
        f"could not find a linear classification head in {type(model).__name__}; "
        "pass head_name='<module path>' (see model.named_modules())"
    )


class EpistemicHead(nn.Module):
    """K linear heads on shared features: ``[B, D]`` -> ``[B, K, C]``."""

    def __init__(self, in_features: int, num_classes: int, num_heads: int = 5) -> None:
        super().__init__()
        if num_heads < 2:
            raise ValueError(f"an Epistemic Head needs num_heads >= 2, got {num_heads}")
        self.weight = nn.Parameter(torch.zeros(num_heads, num_classes, in_features))
        self.bias = nn.Parameter(torch.zeros(num_heads, num_classes))

    @property
    def num_heads(self) -> int:
        return self.weight.shape[0]

    @classmethod
    def from_linear(
        cls, base: nn.Linear, num_heads: int = 5, init_noise: float = 0.1, seed: int = 0
    ) -> EpistemicHead:
        """K copies of ``base`` plus noise ``init_noise * std(base.weight)`` (seeded, device-independent)."""
        head = cls(base.in_features, base.out_features, num_heads).to(base.weight.device, base.weight.dtype)
        gen = torch.Generator().manual_seed(seed)
        w = base.weight.detach().float().cpu()
        noise = torch.randn((num_heads, *w.shape), generator=gen) * (init_noise * w.std().clamp_min(1e-8))
        with torch.no_grad():
            head.weight.copy_(w.unsqueeze(0) + noise)
            if base.bias is not None:
                head.bias.copy_(base.bias.detach().float().cpu().expand(num_heads, -1))
        return head

    def forward(self, features: Tensor) -> Tensor:
        """features ``[B, D]`` -> head logits ``[B, K, C]``."""
        return torch.einsum("bd,kcd->bkc", features, self.weight) + self.bias


def oracle_loss(head_logits: Tensor, targets: Tensor) -> Tensor:
    """Multiple-choice (oracle) loss: per example only the lowest-loss head counts. ``[B, K, C]`` -> scalar.

    ``targets`` are class ids ``[B]`` or class probabilities ``[B, C]`` (mixed labels). ``min`` routes the
    gradient to the argmin head alone, which is what makes the heads diverse.
    """
    k = head_logits.shape[1]
    if targets.dim() == 1:
        expanded = targets.unsqueeze(1).expand(-1, k)  # [B, K]
    else:
        expanded = targets.unsqueeze(2).expand(-1, -1, k)  # [B, C, K]
    per_head = F.cross_entropy(head_logits.transpose(1, 2), expanded, reduction="none")  # [B, K]
    return per_head.min(dim=1).values.mean()


class EpistemicClassifier(nn.Module):
    """A base classifier plus an Epistemic Head fed by the base head's input, behind a stop-grad.

    ``forward(x)`` runs the base model once; a forward pre-hook on its head captures the features.
    While the base is trainable the features are detached, so the base model's parameters and outputs are
    never changed by the head or its loss. With the base frozen (``requires_grad_(False)``, as the sampler
    does) the features stay attached and head signals have input gradients.
    """

    def __init__(
        self,
        model: nn.Module,
        num_heads: int = 5,
        head_name: str | None = None,
        init_noise: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.base = model
        self.head_name, base_head = find_head(model, head_name)
        self.heads = EpistemicHead.from_linear(base_head, num_heads, init_noise, seed)
        self._features: Tensor | None = None
        base_head.register_forward_pre_hook(self._capture)

    def _capture(self, _module: nn.Module, args: tuple[Tensor, ...]) -> None:
        self._features = args[0]

    @property
    def num_classes(self) -> int:
        return self.heads.weight.shape[1]

    def base_trainable(self) -> bool:
        """True when any base parameter requires grad: then the heads see detached features.

        With the base frozen (generation), nothing can reach its weights, so the features stay attached and the
        head signals are differentiable w.r.t. the *input*, which is what guidance needs.
        """
        return any(p.requires_grad for p in self.base.parameters())

    def forward(self, x: Tensor) -> ClassifierOutput:
        """x ``[B, ...]`` -> ``ClassifierOutput(logits [B, C], head_logits [B, K, C], features [B, D])``."""
        self._features = None
        logits = self.base(x)
        features = self._features
        self._features = None
        if features is None:
            raise RuntimeError(f"head {self.head_name!r} was not called during the forward pass")
        features = features.flatten(1)
        if self.base_trainable():
            features = features.detach()  # stop-grad: the head loss never reaches the base model's weights
        return ClassifierOutput(logits=logits, head_logits=self.heads(features.to(self.heads.weight.dtype)),
                                features=features)

    def save_heads(self, path: str | Path) -> None:
        """Write the head weights as safetensors with shape metadata."""
        meta = {"head_name": self.head_name, "num_heads": str(self.heads.num_heads),
                "num_classes": str(self.num_classes), "in_features": str(self.heads.weight.shape[2])}
        save_file({k: v.detach().contiguous().cpu() for k, v in self.heads.state_dict().items()},
                  str(path), metadata=meta)

    def load_heads(self, path: str | Path) -> None:
        """Load head weights saved by ``save_heads``; shape mismatches raise with both shapes named."""
        state = read_state_dict(path, "Epistemic Head weights")
        for key, value in self.heads.state_dict().items():
            if key not in state:
                raise ValueError(f"{path}: missing tensor {key!r} (not an Epistemic Head file?)")
            if state[key].shape != value.shape:
                raise ValueError(
                    f"{path}: {key} has shape {tuple(state[key].shape)}, this model's heads need {tuple(value.shape)}"
                )
        self.heads.load_state_dict(state)


class HeadsOnly(nn.Module):
    """Train only the heads of an ``EpistemicClassifier``: the optimizer sees the head parameters alone and the
    base runs in eval mode (BatchNorm statistics frozen), so base weights and base logits stay bit-identical.

    The recommended way to add heads to a *trained* classifier (as the paper does: duplicate an existing head,
    then train the copies with the oracle loss). Heads trained jointly from a random start specialise per class
    instead (each wins the oracle on a few classes), which makes their disagreement useless as a signal.
    """

    def __init__(self, wrapped: EpistemicClassifier) -> None:
        super().__init__()
        self.heads = wrapped.heads
        self._wrapped = [wrapped]  # a list, not a submodule: the base stays out of .parameters()

    def _apply(self, fn, *args, **kwargs):  # .to(device) / .half() move the (hidden) base with the heads
        self._wrapped[0].base._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: Tensor) -> ClassifierOutput:
        wrapped = self._wrapped[0]
        wrapped.base.eval()
        out = wrapped(x)
        return ClassifierOutput(logits=out.logits.detach(), head_logits=out.head_logits, features=out.features)


# --- parameter overhead (METHOD.md section 2, paper Table 9) -----------------------------------------------


def parameter_overhead(model: nn.Module, num_heads: int, head_name: str | None = None) -> dict[str, float]:
    """Parameters the heads add (``K * d * C``, weights only, as the paper counts) vs the base model's total.

    Returns ``{"base_params", "d_model", "num_classes", "added_params", "added_with_bias", "percent"}``.
    """
    _, head = find_head(model, head_name)
    base = sum(p.numel() for p in model.parameters())
    added = num_heads * head.in_features * head.out_features
    return {
        "base_params": base,
        "d_model": head.in_features,
        "num_classes": head.out_features,
        "added_params": added,
        "added_with_bias": added + (num_heads * head.out_features if head.bias is not None else 0),
        "percent": 100.0 * added / base,
    }


def overhead_json(stats: dict[str, float]) -> str:
    return to_json(stats)

"""The Epistemic Head: K copies of a classifier's last linear layer, trained behind a stop-gradient.

METHOD.md section 2. ``EpistemicClassifier(model, num_heads=5)`` finds the model's classification head
(timm ``get_classifier``, the torchvision families, a Hugging Face model's ``classifier``
through ``models.hf.HFImageClassifier``, or a module name you give), hooks the features that
enter it, and evaluates K head copies on those features *detached*. One forward pass returns the base
logits, untouched, and the head logits ``[B, K, C]`` that every head signal reads.

Initialisation (``init``): ``"copy"`` (default) starts each copy as the base head plus Gaussian noise of
standard deviation ``init_noise * std(base weight)`` (default 0.1). Copies start where the base model already is
(so each head is a competent classifier from step one) and the noise breaks their symmetry, which the oracle
loss needs: with identical copies the argmin is always head 0 and the others never train. ``"fresh"`` draws
each head independently as ``nn.Linear`` would (``EpistemicHead.fresh``), as deep ensembles start their members.

Training loss (``HeadLoss``, carried by ``HeadsOnly``): the oracle (winner-takes-all) loss of multiple-choice
learning, optionally relaxed (the winner gets ``1 - eps``, the others share ``eps``; Rupprecht et al. 2017,
"Learning in an uncertain world", ``relaxed_oracle_loss``), with ``eps`` annealed linearly over training, and
optionally with per-head bootstrap resamples (Poisson(1) counts per example and head, ``bootstrap_counts``;
the Poisson bootstrap of Oza & Russell 2001 / Hanley & MacGibbon 2006, as deep ensembles resample).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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

    Order: an explicit ``head_name``; ``get_classifier()`` (timm models, and ``models.hf.HFImageClassifier``,
    whose ``classifier`` layer it returns); torchvision's known head paths.
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

    @classmethod
    def fresh(
        cls, in_features: int, num_classes: int, num_heads: int = 5, seed: int = 0,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> EpistemicHead:
        """K independently initialised heads, each as ``nn.Linear(in_features, num_classes)`` draws itself:
        weight and bias uniform in ``[-1/sqrt(D), 1/sqrt(D)]`` (PyTorch's default, Kaiming-uniform with
        ``a = sqrt(5)``). Seeded on the CPU, so a seed gives the same heads on every device."""
        head = cls(in_features, num_classes, num_heads)
        gen = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(in_features)
        with torch.no_grad():
            head.weight.copy_((torch.rand(head.weight.shape, generator=gen) * 2 - 1) * bound)
            head.bias.copy_((torch.rand(head.bias.shape, generator=gen) * 2 - 1) * bound)
        return head.to(device=device, dtype=dtype)

    def forward(self, features: Tensor) -> Tensor:
        """features ``[B, D]`` -> head logits ``[B, K, C]``."""
        return torch.einsum("bd,kcd->bkc", features, self.weight) + self.bias


def per_head_cross_entropy(head_logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of every head on every example: ``[B, K, C]`` -> ``[B, K]``.

    ``targets`` are class ids ``[B]`` or class probabilities ``[B, C]`` (mixed labels, as CutMix makes them).
    """
    k = head_logits.shape[1]
    if targets.dim() == 1:
        expanded = targets.unsqueeze(1).expand(-1, k)  # [B, K]
    else:
        expanded = targets.unsqueeze(2).expand(-1, -1, k)  # [B, C, K]
    return F.cross_entropy(head_logits.transpose(1, 2), expanded, reduction="none")


def oracle_loss(head_logits: Tensor, targets: Tensor) -> Tensor:
    """Multiple-choice (oracle) loss: per example only the lowest-loss head counts. ``[B, K, C]`` -> scalar.

    ``targets`` are class ids ``[B]`` or class probabilities ``[B, C]`` (mixed labels). ``min`` routes the
    gradient to the argmin head alone, which is what makes the heads diverse.
    """
    return per_head_cross_entropy(head_logits, targets).min(dim=1).values.mean()


def relaxed_assignment(per_head: Tensor, epsilon: float, counts: Tensor | None = None) -> Tensor:
    """Relaxed winner-takes-all weights ``[B, K]`` for per-head losses ``per_head [B, K]`` (no gradient).

    Per example the winning head (lowest loss) gets ``1 - epsilon``, each of the other ``K - 1`` heads
    ``epsilon / (K - 1)`` (Rupprecht et al. 2017, "Learning in an uncertain world: representing ambiguity
    through multiple hypotheses", ICCV 2017). ``counts [B, K]`` (bootstrap counts, ``bootstrap_counts``)
    multiply the weights, and the winner is chosen among the heads whose resample holds the example
    (count > 0); an example no head drew gets weight 0 everywhere. Raises ``ValueError`` unless
    ``0 <= epsilon <= 1``, ``K >= 2``, and ``counts`` has ``per_head``'s shape.
    """
    k = per_head.shape[1]
    if k < 2:
        raise ValueError(f"relaxed winner-takes-all needs K >= 2 heads, got {k}")
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must lie in [0, 1], got {epsilon}")
    if counts is not None and counts.shape != per_head.shape:
        raise ValueError(f"bootstrap counts have shape {tuple(counts.shape)}, the head losses {tuple(per_head.shape)}")
    loss = per_head.detach()
    if counts is not None:
        loss = loss.masked_fill(counts <= 0, math.inf)
    winner = loss.argmin(dim=1, keepdim=True)  # [B, 1]
    weights = torch.full_like(loss, epsilon / (k - 1)).scatter_(1, winner, 1.0 - epsilon)
    return weights if counts is None else weights * counts.to(weights)


def relaxed_oracle_loss(head_logits: Tensor, targets: Tensor, epsilon: float = 0.0,
                        counts: Tensor | None = None) -> Tensor:
    """Relaxed multiple-choice loss ``mean_b sum_k a_bk CE_bk`` (``a = relaxed_assignment``): ``[B, K, C]`` ->
    scalar.

    ``epsilon = 0`` is ``oracle_loss`` exactly (bit for bit); ``epsilon = 1 - 1/K`` weights every head
    ``1/K``, the plain mean of the K heads' losses (independent heads). ``counts [B, K]``: per-head bootstrap
    counts (``bootstrap_counts``); with all counts 1 the loss is the unweighted one. ``targets``: class ids
    ``[B]`` or probabilities ``[B, C]``. Errors as ``relaxed_assignment``.
    """
    per_head = per_head_cross_entropy(head_logits, targets)  # [B, K]
    return (relaxed_assignment(per_head, epsilon, counts) * per_head).sum(dim=1).mean()


def linear_schedule(start: float, end: float, progress: float) -> float:
    """``start + (end - start) * progress`` with ``progress`` clipped to [0, 1] (0: first step, 1: last)."""
    return start + (end - start) * min(max(progress, 0.0), 1.0)


# --- example identity and bootstrap counts -------------------------------------------------------------------

_MASK64 = (1 << 64) - 1
# P(N <= j) for N ~ Poisson(1), j = 0..9, in float32; the tail past 9 (~1e-7) is cut, so counts lie in 0..9
_POISSON1_CDF = torch.tensor([math.exp(-1.0) * sum(1.0 / math.factorial(i) for i in range(j + 1)) for j in range(10)])


def _signed64(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _srl(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 ``x`` (torch's ``>>`` is arithmetic on negative values)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: Tensor) -> Tensor:
    """The SplitMix64 finaliser (Steele et al. 2014) on int64 tensors, elementwise, with wrap-around
    arithmetic: equal inputs give equal outputs on every device, nearby inputs give unrelated outputs."""
    x = x + _signed64(0x9E3779B97F4A7C15)
    x = (x ^ _srl(x, 30)) * _signed64(0xBF58476D1CE4E5B9)
    x = (x ^ _srl(x, 27)) * _signed64(0x94D049BB133111EB)
    return x ^ _srl(x, 31)


def example_keys(x: Tensor) -> Tensor:
    """A 64-bit identity per example of a batch ``x [B, ...]`` -> int64 ``[B]``, from its content: the same
    image gives the same key in any batch, position or shuffle, on any device.

    The bits of ``x`` as float32, weighted by fixed pseudo-random odd coefficients and summed with
    wrap-around (order-free), then mixed (``splitmix64``). Hash the *un-augmented* batch: ``fit`` does, before
    its batch augmentation. A loader whose dataset augments per item (the ImageFolder path) hands over a
    different image each epoch, so the key (and the bootstrap counts drawn from it) changes per epoch there.
    """
    flat = x.detach().float().reshape(len(x), -1).contiguous().view(torch.int32).long()  # [B, D]
    gen = torch.Generator().manual_seed(0x5EED)
    coeffs = (torch.randint(0, 1 << 62, (flat.shape[1],), generator=gen, dtype=torch.long) | 1).to(flat.device)
    return splitmix64((flat * coeffs).sum(dim=1))


def bootstrap_counts(keys: Tensor, num_heads: int, seed: int = 0) -> Tensor:
    """Poisson(1) bootstrap counts ``[B, K]`` (float32) for examples with keys ``[B]`` (``example_keys``, or
    dataset indices): how often head ``k``'s resample holds each example.

    Deterministic per ``(seed, key, head)``, independent across heads and examples, so the counts are the
    same whatever the batch or the shuffle. The Poisson bootstrap (Hanley & MacGibbon 2006; online bagging,
    Oza & Russell 2001) approximates the multinomial one for large N without knowing N or the other
    examples; about ``e^-1 = 37%`` of the examples are out of each head's resample. Raises ``ValueError`` for
    ``num_heads < 1`` or keys that are not a 1-D integer tensor.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    if keys.dim() != 1 or keys.dtype.is_floating_point or keys.dtype == torch.bool:
        raise ValueError(f"keys must be a 1-D integer tensor [B], got {keys.dtype} {tuple(keys.shape)}")
    base = splitmix64(keys.long() ^ _signed64(seed * 0xD1B54A32D192ED03))  # [B]
    heads = torch.arange(num_heads, device=keys.device, dtype=torch.long) * _signed64(0x9E3779B97F4A7C15)
    bits = splitmix64(base.unsqueeze(1) + heads)  # [B, K]
    uniform = _srl(bits, 40).float() * 2.0 ** -24  # [0, 1), 24 random bits: exact in float32 (no float64 on MPS)
    return (uniform.unsqueeze(-1) >= _POISSON1_CDF.to(keys.device)).sum(dim=-1).float()


@dataclass
class HeadLoss:
    """How ``fit`` trains an Epistemic Head (``HeadsOnly(wrapped, loss=HeadLoss(...))``).

    ``epsilon``: the relaxed winner-takes-all share of the losing heads (``relaxed_oracle_loss``; 0: the
    oracle loss); ``epsilon_end``: if set, epsilon moves linearly from ``epsilon`` at the first training step to
    ``epsilon_end`` at the last (``fit`` passes its progress through the cosine schedule's steps, resumed
    rounds included). ``bootstrap``: each head trains on its own Poisson(1) resample (``bootstrap_counts`` of
    the un-augmented examples' ``example_keys``, seeded with ``seed``). The default is the oracle loss.
    Raises ``ValueError`` for an epsilon outside [0, 1].
    """

    epsilon: float = 0.0
    epsilon_end: float | None = None
    bootstrap: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epsilon", "epsilon_end"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
                raise ValueError(f"HeadLoss.{name} must lie in [0, 1], got {value!r}")

    @property
    def needs_keys(self) -> bool:
        """True when the loss needs ``example_keys`` of the un-augmented batch (bootstrap)."""
        return self.bootstrap

    def epsilon_at(self, progress: float) -> float:
        """Epsilon at ``progress`` in [0, 1] through training (constant without ``epsilon_end``)."""
        return self.epsilon if self.epsilon_end is None else linear_schedule(self.epsilon, self.epsilon_end, progress)

    def __call__(self, head_logits: Tensor, targets: Tensor, keys: Tensor | None = None,
                 progress: float = 0.0) -> Tensor:
        """The loss of head logits ``[B, K, C]`` against ``targets`` (``[B]`` ids or ``[B, C]`` probabilities);
        ``keys [B]``: the examples' identities (required with ``bootstrap``, else ``ValueError``)."""
        counts = None
        if self.bootstrap:
            if keys is None:
                raise ValueError("a bootstrap HeadLoss needs the examples' keys (example_keys of the un-augmented "
                                 "batch); fit passes them")
            counts = bootstrap_counts(keys.to(head_logits.device), head_logits.shape[1], self.seed)
        return relaxed_oracle_loss(head_logits, targets, self.epsilon_at(progress), counts)


HEAD_INITS = ("copy", "fresh")
"""``EpistemicClassifier(init=...)``: copies of the trained head + noise, or independent fresh heads."""


class EpistemicClassifier(nn.Module):
    """A base classifier plus an Epistemic Head fed by the base head's input, behind a stop-grad.

    ``init``: ``"copy"`` (the base head + ``init_noise`` x std noise, seeded) or ``"fresh"``
    (``EpistemicHead.fresh``, seeded). Raises ``ValueError`` for another ``init``. ``head_loss`` (attribute,
    default None: the oracle loss): the ``HeadLoss`` that ``fit`` trains the heads with when it trains this
    model jointly (fine-tuning rounds) and that ``HeadsOnly`` takes by default.

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
        init: str = "copy",
    ) -> None:
        super().__init__()
        if init not in HEAD_INITS:
            raise ValueError(f"init must be one of {', '.join(map(repr, HEAD_INITS))}, got {init!r}")
        self.base = model
        self.head_name, base_head = find_head(model, head_name)
        if init == "copy":
            self.heads = EpistemicHead.from_linear(base_head, num_heads, init_noise, seed)
        else:
            self.heads = EpistemicHead.fresh(base_head.in_features, base_head.out_features, num_heads, seed,
                                             device=base_head.weight.device, dtype=base_head.weight.dtype)
        self.head_loss: HeadLoss | None = None  # fit's loss for the heads; None: oracle_loss
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
        """x ``[B, ...]`` -> ``ClassifierOutput(logits [B, C], head_logits [B, K, C], features [B, D])``; a base
        returning an output object with ``.logits`` (a bare transformers model) gives those logits."""
        self._features = None
        logits = self.base(x)
        if not isinstance(logits, Tensor) and isinstance(getattr(logits, "logits", None), Tensor):
            logits = logits.logits  # a transformers model's output object (e.g. ImageClassifierOutput)
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

    ``loss``: how ``fit`` trains the heads (``HeadLoss``: relaxed / annealed / bootstrap); default the wrapped
    model's ``head_loss``, else the oracle loss.
    """

    def __init__(self, wrapped: EpistemicClassifier, loss: HeadLoss | None = None) -> None:
        super().__init__()
        self.heads = wrapped.heads
        self.head_loss = loss or wrapped.head_loss or HeadLoss()
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

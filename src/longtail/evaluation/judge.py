"""A judge: a classifier that is *not* the guided one, measuring whether guided images are still real images.

The paper's weight rule (section 3.1) reads P(class) from the classifier that guidance is pushing against, so
it cannot tell an image that is hard for that classifier from a broken one (METHOD.md section 7, "Hard but
real"). A judge is an independent classifier over the same classes:

- ``Judge.score``: its accuracy and mean P(intended class) on generated images;
- ``Judge.features`` / ``realism``: k-NN precision / recall and FID of generated images against real ones, in
  the judge's feature space (the input of its classification head);
- ``train_judge`` / ``save_judge`` / ``load_judge``: an independently trained ``SmallCNN`` for the embedded
  default (trained on the full, balanced Fashion-MNIST training set: the data the generator saw);
- ``clip_judge``: CLIP zero-shot from a local checkpoint, for Stable Diffusion users.

Images enter every function as the generator makes them: ``[N, C, H, W]`` in [-1, 1]; the judge's own bridge
(``longtail.models.bridge``) maps them to its input convention.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..models.bridge import BridgeConfig, ClassifierBridge
from ..outputs import as_output
from .distribution import frechet_distance, precision_recall
from .features import LayerFeatures

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ..generate import Generated
    from ..models.classifiers import LoadedClassifier

SMALL_CNN_SPEC = "longtail.train:SmallCNN"


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _normalise_name(name: str) -> str:
    return " ".join(name.strip().lower().split())


def check_classes(judge_classes: Sequence[str], run_classes: Sequence[str]) -> None:
    """Raise ``ValueError`` naming both lists unless they hold the same classes in the same order.

    Names are compared ignoring case and surrounding / repeated whitespace ("T-shirt/top" == "t-shirt/top").
    """
    if [_normalise_name(n) for n in judge_classes] != [_normalise_name(n) for n in run_classes]:
        raise ValueError(
            f"the judge's classes {list(judge_classes)} differ from the run's classes {list(run_classes)}: "
            "a judge must score the same classes, in the same order (class id c = the c-th name)"
        )


@dataclass
class Judge:
    """An independent classifier that scores generated images.

    ``model``: maps its own input (``bridge(images)``) to logits ``[B, C]`` or a ``ClassifierOutput`` (an
    ``EpistemicClassifier`` is judged by its base logits). ``bridge``: decoder range [-1, 1] -> the model's
    input (``None``: the images as they are). ``class_names``: ``C`` names, class id c = ``class_names[c]``.
    ``feature_layer``: the module whose output ``features`` returns (``None``: the input of the model's
    classification head, found by ``longtail.heads.find_head``). The model is put in eval mode.
    """

    model: nn.Module
    class_names: list[str]
    bridge: nn.Module | None = None
    name: str = "judge"
    feature_layer: str | None = None
    batch_size: int = 256
    _features: LayerFeatures | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.class_names = list(self.class_names)
        if not self.class_names:
            raise ValueError("a judge needs its class names")
        self.model.eval()
        if self.bridge is not None:
            self.bridge = self.bridge.to(_device(self.model))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @classmethod
    def from_loaded(cls, loaded: LoadedClassifier, name: str | None = None) -> Judge:
        """From a ``longtail.models.classifiers.LoadedClassifier`` (its model, bridge and class names).

        Raises ``ValueError`` when the loaded classifier has no class names (pass a class-name file).
        """
        if not loaded.class_names:
            raise ValueError(f"classifier {loaded.spec!r} has no class names; a judge needs them")
        return cls(model=loaded.model, class_names=list(loaded.class_names),
                   bridge=ClassifierBridge(loaded.bridge), name=name or str(loaded.spec))

    def check_classes(self, run_classes: Sequence[str]) -> None:
        """Raise ``ValueError`` naming both lists when the run's classes are not the judge's."""
        check_classes(self.class_names, run_classes)

    def _input(self, images: Tensor) -> Tensor:
        if images.ndim != 4:
            raise ValueError(f"images must be [N, C, H, W] in [-1, 1], got shape {tuple(images.shape)}")
        x = images.to(_device(self.model), torch.float32)
        if self.bridge is not None:
            x = self.bridge(x)
        param = next(self.model.parameters(), None)
        return x.to(param.dtype) if param is not None else x

    @torch.no_grad()
    def logits(self, images: Tensor) -> Tensor:
        """images ``[N, C, H, W]`` in [-1, 1] -> logits ``[N, num_classes]`` (float32, CPU), in batches.

        Raises ``ValueError`` for a non-4-D input or a model whose outputs are not ``num_classes``.
        """
        outs = [as_output(self.model(self._input(x))).logits.float().cpu() for x in images.split(self.batch_size)]
        logits = torch.cat(outs) if outs else torch.empty(0, self.num_classes)
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"judge {self.name!r} returned {logits.shape[-1]} logits for "
                             f"{self.num_classes} class names")
        return logits

    def probs(self, images: Tensor) -> Tensor:
        """images ``[N, C, H, W]`` in [-1, 1] -> class probabilities ``[N, num_classes]`` (rows sum to 1)."""
        return self.logits(images).softmax(dim=-1)

    def score(self, images: Tensor, labels: Tensor) -> dict[str, float | int]:
        """Accuracy and mean P(intended class) of images ``[N, C, H, W]`` in [-1, 1] with classes ``labels [N]``.

        Returns ``{"accuracy", "p_class", "n"}`` (NaN accuracy / p_class for ``N = 0``). Raises ``ValueError``
        when ``labels`` is not ``[N]`` or holds a class id outside ``[0, num_classes)``.
        """
        labels = torch.as_tensor(labels).long().cpu()
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be [N] = [{images.shape[0]}], got shape {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}) (the judge's classes), got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        if labels.numel() == 0:
            return {"accuracy": float("nan"), "p_class": float("nan"), "n": 0}
        probs = self.probs(images)
        return {"accuracy": float((probs.argmax(dim=-1) == labels).float().mean()),
                "p_class": float(probs.gather(1, labels[:, None]).mean()), "n": int(labels.numel())}

    def features(self, images: Tensor) -> Tensor:
        """images ``[N, C, H, W]`` in [-1, 1] -> features ``[N, D]`` (float32, CPU): by default the input of the
        judge's classification head (``LayerFeatures``). Raises ``ValueError`` when no head is found."""
        if self._features is None:
            self._features = LayerFeatures(self.model, self.feature_layer)
        if images.shape[0] == 0:
            raise ValueError("no images to extract features from")
        return torch.cat([self._features(self._input(x)) for x in images.split(self.batch_size)])

    def info(self) -> dict:
        """JSON-ready description (written next to a sweep that used the judge)."""
        return {"name": self.name, "class_names": self.class_names,
                "bridge": self.bridge.config.to_dict() if isinstance(self.bridge, ClassifierBridge) else None}


# --- realism: k-NN precision / recall and FID in the judge's feature space ---------------------------------


def realism_from_features(
    fake: Tensor, real: Tensor, fake_labels: Tensor | None = None, real_labels: Tensor | None = None, k: int = 3,
) -> dict[str, float]:
    """Precision, recall (k-NN, Kynkäänniemi et al. 2019) and Fréchet distance of ``fake [M, D]`` vs ``real [N, D]``.

    With both label vectors (``[M]``, ``[N]``), the real reference is restricted to the classes present among
    the fake samples (a sweep over a few classes is not penalised in recall for the classes it did not make).
    Precision / recall are NaN when either set has ``<= k`` samples, FID when either has fewer than 2.
    """
    if fake_labels is not None and real_labels is not None:
        real_labels = torch.as_tensor(real_labels).long().cpu()
        if real_labels.shape != (real.shape[0],):
            raise ValueError(f"real_labels must be [N] = [{real.shape[0]}], got {tuple(real_labels.shape)}")
        keep = torch.isin(real_labels, torch.as_tensor(fake_labels).long().cpu().unique())
        real = real[keep]
    out = {"precision": float("nan"), "recall": float("nan"), "fid": float("nan")}
    if min(real.shape[0], fake.shape[0]) > k:
        out["precision"], out["recall"] = precision_recall(real, fake, k)
    if min(real.shape[0], fake.shape[0]) >= 2:
        out["fid"] = frechet_distance(real, fake)
    return out


def realism(
    judge: Judge, generated: Generated | Tensor, real_images: Tensor, real_labels: Tensor | None = None, k: int = 3,
) -> dict[str, float]:
    """``{"precision", "recall", "fid"}`` of generated images against real ones, on ``judge.features``.

    ``generated``: a ``longtail.generate.Generated`` (its ``images`` and ``labels``) or images
    ``[M, C, H, W]``; ``real_images [N, C', H', W']`` in [-1, 1] with ``real_labels [N]`` (optional: with them
    the reference is the real images of the generated classes, see ``realism_from_features``).
    Precision: share of generated images inside the real manifold (fidelity); recall: share of real images
    inside the generated one (coverage).
    """
    images = generated if isinstance(generated, Tensor) else generated.images
    labels = None if isinstance(generated, Tensor) else generated.labels
    return realism_from_features(judge.features(images), judge.features(real_images), labels, real_labels, k)


# --- an independently trained judge (the embedded default) -------------------------------------------------


def train_judge(
    images: Tensor, labels: Tensor, num_classes: int, epochs: int = 10, seed: int = 0, *, width: int = 32,
    batch_size: int = 128, lr: float = 1e-3, show: bool = False, accelerator: Accelerator | None = None,
    augment: bool = True,
) -> nn.Module:
    """Train a ``SmallCNN`` (``longtail.train``) judge with ``longtail.train.fit`` (Adam, cosine LR, the usual
    rotation / shift / flip augmentation); returns it in eval mode, on the device it was built on (CPU).

    ``images [N, C, H, W]`` in [-1, 1], ``labels [N]`` in ``[0, num_classes)``. For the embedded default pass
    the full, balanced Fashion-MNIST training set (``fashion_mnist_train``): the data the generator saw, not
    the long-tailed subset the guided classifier saw. ``augment``: the usual rotation / shift / flip
    augmentation (off for a judge of orientation or position). ``accelerator``: the job's (under ``accelerate launch``
    every process must call this; save on the main one). Raises ``ValueError`` for mismatched lengths or
    labels out of range.
    """
    from ..train import SmallCNN, TrainConfig, fit

    labels = torch.as_tensor(labels).long()
    if images.ndim != 4 or labels.shape != (images.shape[0],):
        raise ValueError(f"need images [N, C, H, W] and labels [N], got {tuple(images.shape)} and "
                         f"{tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    torch.manual_seed(seed)
    model = SmallCNN(images.shape[1], num_classes, width)
    recipe = TrainConfig(epochs=epochs, seed=seed, batch_size=batch_size, lr=lr)
    if not augment:  # e.g. a detector of orientation: no rotation or flips
        recipe = replace(recipe, rotation=0.0, translate=0.0, hflip=False)
    fit(model, (images, labels), recipe,
        accelerator=accelerator, num_classes=num_classes, desc="judge", show=show)
    return model.eval()


def fashion_mnist_train(data_dir: str | Path | None = None, nuisance: dict | None = None,
                        nuisance_seed: int = 0) -> tuple[Tensor, Tensor]:
    """The full Fashion-MNIST training set (60k, balanced) as the embedded generator sees it: images
    ``[60000, 1, 32, 32]`` in [-1, 1] and labels ``[60000]``. ``nuisance``: the generator's mode rates (its
    metadata's ``nuisance.rates``, with ``nuisance_seed``), applied exactly as its trainer did, so a judge
    knows the rare modes the generator can draw. Raises ``DataError`` when the files are missing."""
    from ..data.datasets import load_fashion_mnist, to_model_range
    from ..data.nuisance import assign_modes, with_modes

    images, labels = load_fashion_mnist("train", data_dir)
    images = to_model_range(images)
    if nuisance:
        images = with_modes(images, assign_modes(labels, nuisance, nuisance_seed), nuisance_seed)
    return images, labels


def _small_cnn_kwargs(model: nn.Module) -> dict:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return {"in_channels": convs[0].in_channels, "width": convs[0].out_channels}


def save_judge(
    model: nn.Module | Judge, directory: str | Path, class_names: Sequence[str] | None = None, *,
    spec: str = SMALL_CNN_SPEC, model_kwargs: dict | None = None, preprocess: dict | None = None,
) -> Path:
    """Write ``classifier.safetensors`` + ``classifier.json`` (+ ``class_names.json``) into ``directory``, in
    the convention of ``longtail.jobs.common.write_classifier_json``, so that ``load_judge(directory)`` or
    ``--classifier <directory>/classifier.json`` loads it. Returns the JSON's path.

    ``model``: an ``nn.Module`` built by ``spec`` (default: a ``SmallCNN``, whose ``in_channels`` / ``width``
    are read off the model when ``model_kwargs`` is None) or a ``Judge`` (its model and class names).
    Raises ``ValueError`` without class names.
    """
    from safetensors.torch import save_file

    from ..jobs.common import write_classifier_json

    if isinstance(model, Judge):
        class_names = class_names or model.class_names
        model = model.model
    if not class_names:
        raise ValueError("save_judge needs the judge's class names")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if model_kwargs is None:
        model_kwargs = _small_cnn_kwargs(model) if spec == SMALL_CNN_SPEC else {}
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
              str(directory / "classifier.safetensors"))
    return write_classifier_json(directory, spec, "classifier.safetensors", model_kwargs=model_kwargs,
                                 num_classes=len(class_names), class_names=list(class_names), preprocess=preprocess)


# Judges that ship with the package, one per shipped embedded generator (``judge.spec: shipped``): a SmallCNN
# (width 32) trained for 3 epochs, seed 10000, on the full balanced Fashion-MNIST training set as that generator
# saw it (its nuisance modes included), exactly as ``judge.spec: train`` trains one: the same weights bit for bit
# (float32 safetensors; the training is deterministic on the CPU).
# Rebuilt by scripts/ship_detectors.py.
SHIPPED_JUDGES = {"clean": "judge-clean", "nuisance": "judge-nuisance"}


def shipped_judge_dir(generator_model: str | None) -> Path:
    """The shipped judge for a shipped embedded generator (``None`` = ``clean``). Raises ``ConfigError`` for
    any other generator (train one with ``judge.spec: train``, or give a directory)."""
    from ..config import ConfigError
    from ..models.tiny import ASSETS_ROOT

    name = generator_model or "clean"
    if name not in SHIPPED_JUDGES:
        raise ConfigError(f"judge.spec: shipped exists only for the shipped generators {sorted(SHIPPED_JUDGES)}, "
                          f"not generator.model={generator_model!r}: use judge.spec: train or a judge directory")
    return ASSETS_ROOT / SHIPPED_JUDGES[name]


def copy_judge(source: str | Path, directory: str | Path) -> Path:
    """Copy a saved judge (``classifier.json``, its weights and class names) into ``directory``, atomically
    (a temporary sibling renamed into place), so a run directory holds every model it used. Returns it."""
    import shutil

    source, directory = Path(source), Path(directory)
    if not (source / "classifier.json").is_file():
        raise FileNotFoundError(f"no judge at {source} (classifier.json missing)")
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial)
    partial.replace(directory)
    return directory


def load_judge(directory: str | Path, device: str | torch.device = "cpu", name: str | None = None) -> Judge:
    """A judge from a directory with ``classifier.json`` (``save_judge``, or a run's ``seed_*/base``).

    Raises ``longtail.config.ConfigError`` when there is no ``classifier.json``, ``ValueError`` when it names no
    classes or the weights do not fit.
    """
    from ..jobs.common import ClassifierSpec, load_classifier_spec

    path = Path(directory) / "classifier.json"
    loaded = load_classifier_spec(ClassifierSpec(spec=str(path)), torch.device(device))
    return Judge.from_loaded(loaded, name=name or str(Path(directory)))


# --- CLIP zero-shot (Stable Diffusion users) ---------------------------------------------------------------

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL codes in CLIPImageProcessor


class CLIPZeroShot(nn.Module):
    """CLIP as a classifier: normalised image embedding -> ``head`` (a bias-free linear layer whose rows are the
    normalised class-prompt embeddings times CLIP's logit scale): ``pixel_values [B, 3, S, S]`` -> ``[B, C]``.

    The head's input is the judge's feature space (``LayerFeatures`` finds ``head`` through ``get_classifier``).
    """

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module, text_embeds: Tensor,
                 logit_scale: float) -> None:
        super().__init__()
        self.vision_model, self.visual_projection = vision_model, visual_projection
        self.head = nn.Linear(text_embeds.shape[1], text_embeds.shape[0], bias=False)
        with torch.no_grad():
            self.head.weight.copy_(text_embeds / text_embeds.norm(dim=-1, keepdim=True) * logit_scale)

    def get_classifier(self) -> nn.Linear:
        return self.head

    def forward(self, pixel_values: Tensor) -> Tensor:
        emb = self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)
        return self.head(emb / emb.norm(dim=-1, keepdim=True))


def _pair(value: object, default: int) -> tuple[int, int]:
    if value is None:
        return (default, default)
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, dict) and "height" in value:
        return (int(value["height"]), int(value["width"]))
    if isinstance(value, dict) and "shortest_edge" in value:
        return (int(value["shortest_edge"]),) * 2
    return (int(value[0]), int(value[1]))


def _clip_bridge(path: Path, image_size: int) -> BridgeConfig:
    """CLIP's preprocessing, read from ``preprocessor_config.json`` (plain JSON, as ``CLIPImageProcessor`` writes
    it) when there is one; OpenAI's mean / std, bicubic resize of the shorter side and center crop to the
    vision tower's ``image_size`` for whatever it does not say."""
    file = path / "preprocessor_config.json"
    cfg = json.loads(file.read_text()) if file.is_file() else {}
    size = cfg.get("size", image_size)
    if isinstance(size, dict) and "shortest_edge" in size:
        resize: int | tuple[int, int] = int(size["shortest_edge"])
    elif isinstance(size, int):
        resize = size
    else:
        resize = _pair(size, image_size)
    crop = _pair(cfg.get("crop_size"), image_size)
    resample = cfg.get("resample", 3)
    return BridgeConfig(
        size=crop if cfg.get("do_center_crop", True) else None,
        resize=resize if cfg.get("do_resize", True) else None,
        mean=tuple(float(v) for v in cfg.get("image_mean", OPENAI_CLIP_MEAN)),
        std=tuple(float(v) for v in cfg.get("image_std", OPENAI_CLIP_STD)),
        interpolation=_RESAMPLE.get(int(resample), "bicubic") if isinstance(resample, int) else "bicubic",
        in_channels=3, source=f"clip {path}",
    )


@torch.no_grad()
def clip_judge(
    path: str | Path, class_names: Sequence[str], template: str = "a photo of a {}",
    device: str | torch.device = "cpu",
) -> Judge:
    """CLIP zero-shot judge from a LOCAL checkpoint directory (``CLIPModel`` + tokenizer; never downloads).

    Class c's text is ``template.format(class_names[c])``; its logit is ``logit_scale * cos(image, text)``.
    Images (``[N, 1 or 3, H, W]`` in [-1, 1]) are preprocessed as the checkpoint's ``preprocessor_config.json``
    says (OpenAI's CLIP mean / std and the vision tower's size when absent), grayscale repeated to RGB.
    Raises ``FileNotFoundError`` when ``path`` is not a directory, ``ValueError`` without class names.
    """
    from transformers import AutoTokenizer, CLIPModel

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no CLIP checkpoint directory at {path} (clip_judge never downloads)")
    if not class_names:
        raise ValueError("clip_judge needs class names")
    clip = CLIPModel.from_pretrained(str(path), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    texts = [template.format(name) for name in class_names]
    tokens = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    pooled = clip.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
    text_embeds = clip.text_projection(pooled)
    model = CLIPZeroShot(clip.vision_model, clip.visual_projection, text_embeds, float(clip.logit_scale.exp()))
    bridge = ClassifierBridge(_clip_bridge(path, int(clip.config.vision_config.image_size)))
    return Judge(model=model.to(device).eval(), class_names=list(class_names), bridge=bridge,
                 name=f"clip {path.name}")

"""The generator check: before a job spends compute, does the generator draw the classes at all?

Every ``mine``, ``generate`` and ``calibrate`` run first generates ``generator_check.per_class`` unguided images
per class (default 4; 0 switches the check off) with the run's generator, prompts and sampling settings, and
scores them with the classifier (and, in ``mine``, the judge when the run has one). A class the generator does not
produce stops the job with :class:`GeneratorCheckError` (a ``ConfigError``: one line, exit code 2) naming the
classes and what to do; ``--force`` (``generator_check.force: true``) turns the error into a warning. The numbers
go to ``<out>/generator_check.json`` (and ``generator_check.png``, the images, one row per class); a resumed run
reuses them when the settings they depend on are unchanged.

The rule (:func:`decide`), with C classes and n images of a class:

- a scorer (the classifier, the judge) finds the class **at chance** when its top-1 accuracy on the class's
  images is at most 1/C *and* their mean P(class) is at most 1.5/C. With n = 4 accuracy alone is too coarse
  (C >= 5: "0 of 4 right"), and it convicts a class the classifier merely confuses with a neighbour (every image
  a shirt drawn well, P(shirt) 0.3, argmax t-shirt); P(class) alone has no natural scale. Both together say the
  scorer sees nothing of the class in the images: no image is its top class and the class gets little more than
  a uniform share of probability (the 0.5/C margin absorbs the noise of 4 images). A generator that draws
  something else, or noise, gives P(class) well below 1/C for a confident classifier.
- a scorer is a **witness** for a class when it could have recognised the class: the classifier only when its
  accuracy on the real evaluation images of that class (``mine``: the base stage's per-class accuracy) is at
  least ``1 - 0.05 ** (1 / n)`` (0.53 for n = 4): then missing all n images of a class the generator does draw
  would be a < 5% accident, were generated images like real ones. A long-tailed classifier is often blind on its
  rarest classes: the demo's base classifier (seed 0) gets no real shirt, bag or ankle boot right, and finds the
  shipped generator's (good) shirts, bags and ankle boots at chance too; that is the longtail to mine, not a broken
  generator. ``generate`` and ``calibrate`` know the real accuracy only of a run's ``classifier.json`` (the
  ``metrics.json`` beside it); otherwise the classifier is taken as a witness for every class, and a class it never
  recognises is refused (the message says so; ``--force``). The judge (an independent classifier meant to judge
  generated images) is always a witness.
- a class is **refused** when no scorer recognises it and a witness finds it at chance; **unverified** when no
  scorer recognises it and none is a witness (reported, not refused); otherwise it passes.

A class that passes may still be drawn badly (a classifier that puts every image in one class passes that class);
the check is a cheap smoke test for the classes a generator cannot draw, not a measure of quality.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..config import ConfigError, to_dict
from ..files import read_json, write_json
from .common import ClassifierSpec, GeneratorSpec, settings_hash

FILE = "generator_check.json"
GRID = "generator_check.png"
BASE_SEED = 50_000  # the check's image seeds (sweep 10_000, trajectory 20_000, introspection 30_000)
FORMAT = 1  # bump when the rule changes: a saved check of another format is redone
P_MARGIN = 1.5  # at chance: mean P(class) <= P_MARGIN / C
WITNESS_ALPHA = 0.05  # a witness misses all n images of a drawn class with probability < WITNESS_ALPHA

Log = Callable[[str], None]


@dataclass
class GeneratorCheckSpec:
    """``per_class`` unguided images per class scored before any long work (0: off); ``force``: a class the
    generator does not draw is a warning, not an error (the CLI's ``--force``)."""

    per_class: int = 4
    force: bool = False


class GeneratorCheckError(ConfigError):
    """The generator does not draw some of the run's classes; the message names them and what to do."""


# --- the rule -------------------------------------------------------------------------------------------------


def witness_accuracy(n: int) -> float:
    """The real-image accuracy from which a scorer missing all ``n`` images of a class is a < 5% accident."""
    return 1.0 - WITNESS_ALPHA ** (1.0 / n) if n > 0 else 1.0


def at_chance(accuracy: float, p_class: float, num_classes: int) -> bool:
    """accuracy <= 1/C and mean P(class) <= 1.5/C."""
    return accuracy <= 1.0 / num_classes and p_class <= P_MARGIN / num_classes


def decide(probs: Mapping[str, Tensor], labels: Tensor, class_names: Sequence[str], *,
           real_accuracy: Mapping[str, Sequence[float | None]] | None = None,
           classes: Sequence[int] | None = None) -> dict:
    """Per class, each scorer's accuracy and mean P(class) on the class's images, and the verdict (module doc).

    ``probs``: scorer name -> class probabilities ``[N, C]`` of the same N images (``"classifier"`` first; the
    judge's keys are prefixed ``judge_``); ``labels``: their intended classes ``[N]``; ``real_accuracy``: scorer
    -> per-class accuracy on real images (``None`` entries and absent scorers: unknown, taken as a witness);
    ``classes``: the class ids checked (default: those in ``labels``). Non-finite probabilities count as 0.

    Returns ``{"num_classes", "thresholds", "classes": {name: {"n", "accuracy", "p_class", ["real_accuracy"],
    ["judge_accuracy", "judge_p_class", ...], "verdict"}}, "refused": [names], "unverified": [names]}``, where
    ``verdict`` is ``ok``, ``refused`` or ``unverified``."""
    labels = torch.as_tensor(labels).long().cpu()
    num_classes = len(class_names)
    real_accuracy = real_accuracy or {}
    chosen = sorted(set(labels.tolist())) if classes is None else list(classes)
    rows: dict[str, dict] = {}
    for c in chosen:
        mask = labels == c
        n = int(mask.sum())
        row: dict = {"n": n}
        recognised = witness = False
        for name, p in probs.items():
            p = torch.nan_to_num(torch.as_tensor(p).float().cpu(), nan=0.0)
            if p.shape != (labels.numel(), num_classes):
                raise ValueError(f"{name} probabilities must be [N, C] = [{labels.numel()}, {num_classes}], got "
                                 f"{tuple(p.shape)}")
            key = "" if name == "classifier" else f"{name}_"
            acc = float((p[mask].argmax(-1) == c).float().mean()) if n else float("nan")
            p_class = float(p[mask, c].mean()) if n else float("nan")
            row[f"{key}accuracy"], row[f"{key}p_class"] = acc, p_class
            real = list(real_accuracy.get(name) or [None] * num_classes)[c]
            real = None if real is None or not math.isfinite(real) else float(real)
            if name in real_accuracy:
                row[f"{key}real_accuracy"] = real
            if not n:
                continue
            if not at_chance(acc, p_class, num_classes):
                recognised = True
            elif real is None or real >= witness_accuracy(n):
                witness = True
        row["verdict"] = "ok" if recognised or not n else "refused" if witness else "unverified"
        rows[class_names[c]] = row
    return {
        "num_classes": num_classes,
        "thresholds": {"accuracy": 1.0 / num_classes, "p_class": P_MARGIN / num_classes,
                       "witness_real_accuracy": {str(n): witness_accuracy(n)
                                                 for n in sorted({r["n"] for r in rows.values()})}},
        "classes": rows,
        "refused": [name for name, r in rows.items() if r["verdict"] == "refused"],
        "unverified": [name for name, r in rows.items() if r["verdict"] == "unverified"],
    }


RULE = (f"a class is refused when no scorer recognises it and a witness finds it at chance: top-1 accuracy <= 1/C "
        f"and mean P(class) <= {P_MARGIN}/C on its images; the classifier is a witness for a class when its "
        f"accuracy on real images of it (when known) is >= 1 - {WITNESS_ALPHA}^(1/n), the judge always")


# --- the check of a job ---------------------------------------------------------------------------------------


def check_settings(gs: GeneratorSpec) -> dict:
    """The generator settings the check's images depend on (not the batch size)."""
    return {k: v for k, v in to_dict(gs).items() if k != "batch_size"}


def run_generator_check(spec: GeneratorCheckSpec, out: Path, ldm, gs: GeneratorSpec, class_names: list[str],
                        classifier, *, settings: dict, classes: Sequence[int] | None = None, judge=None,
                        real_accuracy: Sequence[float | None] | None = None, is_main: bool = True,
                        show: bool = True, log: Log = print) -> dict | None:
    """Run (or reuse) the generator check of a job and enforce it; returns what ``generator_check.json`` holds,
    or None when the check is off or impossible.

    ``classifier``: the job's ``LoadedClassifier`` (None: skipped with a note); ``judge``: a
    ``longtail.evaluation.judge.Judge`` or None; ``settings``: what else the classifier's (and judge's) outputs
    depend on (the job's result-defining settings), hashed with the generator settings into the file's
    ``settings_sha256``: a saved check is reused only when that hash is the same. ``classes``: the class ids the
    job generates (default all); ``real_accuracy``: the classifier's per-class accuracy on real images, when known.
    Raises :class:`GeneratorCheckError` when a class is refused and ``spec.force`` is not set."""
    if spec.per_class <= 0:
        log("generator check: off (generator_check.per_class: 0)")
        return None
    if classifier is None:
        log("generator check: skipped, there is no classifier to score the images with (--classifier)")
        return None
    if len(class_names) < 2:
        log("generator check: skipped, one class cannot be at chance")
        return None
    classes = list(range(len(class_names))) if classes is None else sorted(set(classes))
    if not classes:
        return None
    identity = settings_hash({"format": FORMAT, "per_class": spec.per_class, "generator": check_settings(gs),
                              "classes": [class_names[c] for c in classes], "judge": judge is not None,
                              "real_accuracy": real_accuracy is not None, **settings})
    path = out / FILE
    saved = read_json(path)
    if isinstance(saved, dict) and saved.get("settings_sha256") == identity:
        result = saved
        log(f"generator check: reusing {path}")
    else:
        result = _measure(spec, out, ldm, gs, class_names, classifier, classes, judge, real_accuracy, is_main, show)
        result["settings_sha256"] = identity
    forced = bool(result["refused"]) and spec.force
    if is_main and (result is not saved or saved.get("forced") != forced):
        write_json(path, {**result, "forced": forced})
    result["forced"] = forced
    enforce(result, spec, path, log)
    return result


def _measure(spec: GeneratorCheckSpec, out: Path, ldm, gs: GeneratorSpec, class_names: list[str], classifier,
             classes: list[int], judge, real_accuracy, is_main: bool, show: bool) -> dict:
    from ..calibrate import save_grid
    from ..generate import generate, plan_jobs
    from ..models.classifiers import bridged_classifier
    from ..prompts import job_prompts, prompt_table

    counts = [spec.per_class if c in classes else 0 for c in range(len(class_names))]
    jobs = plan_jobs(counts, job_prompts(prompt_table(class_names, gs.prompt_template, gs.prompt_file)),
                     base_seed=BASE_SEED)
    gen = generate(ldm, jobs, classifier=bridged_classifier(classifier), num_steps=gs.num_steps,
                   cfg_scale=gs.cfg_scale, negative_prompt=gs.negative_prompt, batch_size=gs.batch_size, show=show,
                   desc="generator check")
    probs = {"classifier": gen.output.logits.float().softmax(-1).cpu()}
    if judge is not None:
        probs["judge"] = judge.probs(gen.images)
    real = {"classifier": list(real_accuracy)} if real_accuracy is not None else None
    result = decide(probs, gen.labels, class_names, real_accuracy=real, classes=classes)
    if is_main:
        save_grid({0.0: gen.images.float().cpu()}, gen.labels, out / GRID, per_class=spec.per_class)
    return {"per_class": spec.per_class, "images": len(jobs), "seed": BASE_SEED, "num_steps": gs.num_steps,
            "cfg_scale": gs.cfg_scale, "scorers": list(probs), "rule": RULE, **result,
            "nonfinite": gen.nonfinite}


def enforce(result: dict, spec: GeneratorCheckSpec, path: Path, log: Log = print) -> None:
    """Log the outcome; raise :class:`GeneratorCheckError` for refused classes unless ``spec.force``."""
    refused, unverified = result["refused"], result["unverified"]
    n = result["per_class"]
    if unverified:
        log(f"generator check: no scorer recognises {', '.join(unverified)} and none can tell (the classifier "
            "misses most real images of them too): not verified")
    if not refused:
        log(f"generator check: passed ({len(result['classes'])} classes, {n} unguided images each, {path})")
        return
    c, rows = result["num_classes"], [result["classes"][name] for name in refused]
    seen_real = all((row.get("real_accuracy") or 0.0) >= witness_accuracy(row["n"]) for row in rows)
    blind = any(row.get("real_accuracy") is None for row in rows)  # the classifier's real accuracy unknown
    why = (f"their {n} unguided images each are at chance for the {' and the '.join(result['scorers'])} (top-1 "
           f"accuracy <= 1/{c} and mean P(class) <= {P_MARGIN:g}/{c})"
           + (", although the classifier recognises real images of them" if seen_real else "")
           + f"; numbers in {path}, images in {path.with_name(GRID)}")
    hint = ("check the prompts (generator.prompt_template / prompt_file) or use a generator that draws these classes"
            + ("; if the classifier itself misses real images of them, the check cannot tell" if blind else ""))
    head = f"generator check: the generator does not draw {', '.join(refused)} ({len(refused)} of {c} classes): {why}"
    if spec.force:
        log(f"warning: {head}; running anyway (--force)")
        return
    raise GeneratorCheckError(f"{head}; {hint}; --force (generator_check.force: true) runs anyway")


def real_accuracy_beside(cs: ClassifierSpec, num_classes: int) -> tuple[list | None, Path | None]:
    """The classifier's per-class accuracy on real images, when ``cs`` is a run's ``classifier.json`` as the run
    wrote it (no other checkpoint or heads given): the ``per_class`` of the ``metrics.json`` beside it (the base
    stage's evaluation). ``(None, None)`` otherwise."""
    if not cs.spec or not cs.spec.endswith(".json") or cs.checkpoint or cs.heads:
        return None, None
    path = Path(cs.spec).parent / "metrics.json"
    try:
        per_class = (read_json(path) or {}).get("per_class")
    except (ValueError, AttributeError):
        return None, None
    if not isinstance(per_class, list) or len(per_class) != num_classes:
        return None, None
    return per_class, path


def job_generator_check(cfg, out: Path, ldm, class_names: list[str], loaded, jobs, *, is_main: bool = True,
                        show: bool = True, log: Log = print) -> dict | None:
    """``generate``'s and ``calibrate``'s check (``cfg``: their config): the classes of ``jobs``, scored by the
    job's classifier ``loaded`` (None: skipped), with its real per-class accuracy when it is a run's
    ``classifier.json`` (:func:`real_accuracy_beside`)."""
    real, source = real_accuracy_beside(cfg.classifier, len(class_names)) if loaded is not None else (None, None)
    if real is not None and cfg.generator_check.per_class > 0:
        log(f"generator check: the classifier's accuracy on real images per class from {source}")
    return run_generator_check(cfg.generator_check, out, ldm, cfg.generator, class_names, loaded,
                               settings={"classifier": to_dict(cfg.classifier)}, classes=[j.class_id for j in jobs],
                               real_accuracy=real, is_main=is_main, show=show, log=log)


def stage_generator_check(ctx, loaded, base_metrics: dict) -> dict | None:
    """``mine``'s check, with the first seed's base classifier ``loaded`` (its real per-class accuracy from
    ``base_metrics``) and the run's judge when it has one (loaded here and kept in ``ctx.judge``)."""
    from .mine import RUN_DEFINING
    from .stages import stage_judge

    cfg = ctx.cfg
    if cfg.generator_check.per_class > 0 and cfg.judge.spec and ctx.judge is None:
        ctx.judge = stage_judge(ctx)
    settings = {"run": {k: to_dict(cfg).get(k) for k in RUN_DEFINING}, "seed": cfg.seeds[0]}
    result = run_generator_check(cfg.generator_check, ctx.run, ctx.ldm, cfg.generator, ctx.source.class_names,
                                 loaded, settings=settings, judge=ctx.judge, real_accuracy=base_metrics.get("per_class"),
                                 is_main=ctx.is_main, show=ctx.show, log=ctx.log)
    ctx.acc.wait_for_everyone()
    return result

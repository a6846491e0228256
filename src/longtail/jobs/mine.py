"""``longtail mine``: one job, many stages, one run directory. The demo is a config of it (configs/demo.yaml).

Modules: ``mine_config`` (the config and the plan), ``stages`` (each stage), this one (the job that runs them,
the summary, the dry-run estimate).

Stages, in the data flow's order; each reads and writes only the run directory, resumes on its own and can
be switched off:

1. generator -- the embedded model (trained if absent) or Stable Diffusion;
2. base -- per seed, the classifier: trained on the real data (``base.epochs > 0``) or the user's as given,
   then an Epistemic Head when asked (``heads.epochs > 0``); accuracy by Many / Medium / Few and detection
   AUROC per signal -> ``seed_<s>/base/``;
3. sweep -- signal and P(class) against the guidance weight, the paper's rule picks a weight per signal
   (``sweep.signals`` empty: skipped) -> ``sweep/``;
4. introspection -- keywords of guided vs unguided captions, refined prompts (when asked, or for the
   ``introspect`` condition) -> ``introspection/``;
5. mining -- per seed and condition (``longtail.conditions``), the loop: generate with the current classifier,
   fine-tune, evaluate -> ``seed_<s>/mining/<condition>/``;
6. trajectory (A.7) -> ``trajectory.json``; 7. distances (FID, precision / recall) -> ``distribution.json``;
8. summary -> ``metrics.json``, ``summary.txt``; 9. report -> ``report.html``.

Under ``accelerate launch`` generation is sharded and fine-tuning is data parallel; only the main process
writes checkpoints and metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from ..conditions import Condition, parse_conditions
from ..config import ConfigError, dump_config, to_dict
from ..data.store import check_class_folders
from ..evaluation.stats import mean_std, mean_std_cell, number_cell, paired_table
from ..files import read_json, write_json
from ..heads import EpistemicClassifier
from ..models.classifiers import LoadedClassifier, bridged_classifier
from . import tracking
from .common import (
    active,
    changed_keys,
    check_generator_classes,
    check_guidance,
    load_classifier_spec,
    load_generator,
    settings_hash,
    with_sampling_defaults,
)
from .generator_check import stage_generator_check
from .mine_config import (
    BaseSpec,
    DataSpec,
    FinetuneSpec,
    HeadsSpec,
    IntrospectionSpec,
    JudgeSpec,
    MineConfig,
    Plan,
    ScheduleSpec,
    SweepSpec,
    check_captioner,
    check_config,
    check_paths,
    generation_epochs,
    images_per_round,
    load_demo_config,
    make_plan,
    quick_overrides,
)
from .stages import (
    Context,
    base_dir_of,
    hard_split,
    load_base,
    make_source,
    preprocess_for,
    stage_base,
    stage_distances,
    stage_efficiency,
    stage_introspection,
    stage_judge,
    stage_mining,
    stage_modes,
    stage_sweep,
    stage_trajectory,
    weight_of,
)

__all__ = [  # the job's public names, wherever they are defined
    "BaseSpec", "DataSpec", "FinetuneSpec", "HeadsSpec", "IntrospectionSpec", "JudgeSpec", "MineConfig", "Plan", "ScheduleSpec",
    "SweepSpec", "format_summary", "generation_epochs", "images_per_round", "load_demo_config", "preprocess_for",
    "quick_overrides", "run_introspect", "run_mine", "summarize",
]

Log = Callable[[str], None]
METRICS = ("top1", "many", "medium", "few")


class StageClock:
    """Wall-clock seconds per stage of one invocation (a resumed stage costs only its loading), summed over
    repeated entries: ``with clock("sweep"): ...``; ``clock.seconds`` maps stage -> seconds, in order."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started


# --- summary ------------------------------------------------------------------------------------------------


def summarize(ctx: Context, base: dict[int, dict], mining: dict[int, dict[str, list[dict]]],
              conditions: list[Condition], guidance_of: dict[str, dict], sweep: dict | None) -> dict:
    seeds = ctx.cfg.seeds
    table = {c.text: {k: mean_std([mining[s][c.text][-1].get(k) for s in seeds]) for k in (*METRICS, "hard")}
             for c in conditions}
    splits = sorted({name for s in seeds for c in conditions for name in mining[s][c.text][-1].get("splits", {})})
    split_table = {name: {c.text: mean_std([mining[s][c.text][-1].get("splits", {}).get(name, {}).get("top1")
                                            for s in seeds]) for c in conditions} for name in splits}
    detection = {}
    first = base[seeds[0]].get("detection", {})
    for name in first:
        detection[name] = {k: mean_std([base[s]["detection"][name][k] for s in seeds])
                           for k in ("auroc_rare", "auroc_hard", "acc_above_q90", "acc_below_q90")}
    ltg = guidance_of.get("ltg") or next(iter(guidance_of.values()), None)
    return {
        "seeds": seeds,
        "evaluated_on": ctx.source.eval_name,
        "class_names": ctx.source.class_names,
        "train_counts": ctx.source.train_counts,
        "groups": ctx.source.groups,
        "base": {k: mean_std([base[s][k] for s in seeds]) for k in METRICS},
        "detection": detection,
        "sweep": sweep,
        "ltg": ltg,
        "condition_guidance": guidance_of,
        "conditions": table,
        "splits": split_table,
        "per_seed": {str(s): {"base": base[s], "mining": mining[s]} for s in seeds},
        # every condition of a seed starts from the seed's base classifier: differences to unguided, paired
        "paired": {"baseline": "unguided", "table": paired_table(
            {s: {c.text: mining[s][c.text][-1] for c in conditions} for s in seeds}, baseline="unguided",
            metrics=("few", "medium", "top1", "hard"))},
    }


def format_summary(summary: dict) -> str:
    """The printed table: accuracy per condition (mean ± std over seeds), detection AUROCs, timing."""
    from ..conditions import condition_label

    labels = ("top-1", "many", "medium", "few")
    lines = [f"{summary.get('evaluated_on', 'evaluation split')}; mean ± std over seeds {summary['seeds']}", ""]
    lines.append(f"{'condition':<26}" + "".join(f"{k:>14}" for k in labels))
    lines.append(f"{'base (LT real only)':<26}" + "".join(mean_std_cell(summary["base"][k]) for k in METRICS))
    guidance = summary.get("condition_guidance", {})
    for cond, m in summary["conditions"].items():
        lines.append(f"{condition_label(cond, guidance.get(cond)):<26}" + "".join(mean_std_cell(m[k]) for k in METRICS))
    if any(m.get("hard", {}).get("n") for m in summary["conditions"].values()):
        lines += ["", "hard split (evaluation images most base classifiers get wrong), top-1:"]
        lines += [f"{condition_label(c, guidance.get(c)):<26}{mean_std_cell(m['hard'])}"
                  for c, m in summary["conditions"].items()]
    if summary.get("splits"):
        names = list(summary["splits"])
        lines += ["", f"{'extra splits, top-1':<26}" + "".join(f"{n.split(':')[-1]:>16}" for n in names)]
        for cond in summary["conditions"]:
            lines.append(f"{condition_label(cond, guidance.get(cond)):<26}"
                         + "".join(mean_std_cell(summary["splits"][n][cond], 16) for n in names))
    if summary.get("mode_shares"):
        modes = list(next(iter(summary["mode_shares"].values()))["all"])
        by = "the mode detector" if summary.get("mode_detector") else "the attribute captioner"
        lines += ["", f"nuisance modes in the synthetic data (share of images, as {by} sees them)",
                  f"{'condition':<26}" + "".join(f"{m[:12]:>13}" for m in modes)]
        for cond, shares in summary["mode_shares"].items():
            lines.append(f"{condition_label(cond, guidance.get(cond)):<26}"
                         + "".join(f"{shares['all'][m]:>13.3f}" for m in modes))
        if summary.get("mode_detector"):
            d = summary["mode_detector"]
            lines.append(f"{'detector recall (test)':<26}" + "".join(number_cell(d["recall"].get(m), width=13)
                                                                     for m in modes))
            lines.append(f"{'':<26}clean test images given a mode: {d['clean_false_alarm']:.3f}")
    lines += format_paired(summary.get("paired"), guidance)
    lines += format_efficiency(summary.get("efficiency"), guidance)
    if summary.get("detection"):
        keys = ("auroc_rare", "auroc_hard", "acc_above_q90", "acc_below_q90")
        lines += ["", f"{'signal':<20}" + "".join(f"{k:>14}" for k in ("AUROC rare", "AUROC hard", "acc > q90",
                                                                         "acc < q90"))]
        for name, d in summary["detection"].items():
            lines.append(f"{name:<20}" + "".join(mean_std_cell(d[k]) for k in keys))
    if summary.get("distribution"):
        lines += ["", f"{'synthetic vs real':<26}" + "".join(f"{k:>14}" for k in ("FID", "precision", "recall"))]
        for cond, d in summary["distribution"].items():
            label = condition_label(cond, guidance.get(cond))
            lines.append(f"{label:<26}" + "".join(mean_std_cell(d[k]) for k in ("fid", "precision", "recall")))
    timing = (summary.get("sweep") or {}).get("timing")
    if timing:
        lines += ["", f"generation: unguided {timing['unguided_img_per_s']:.1f} img/s, guided "
                  f"{timing['guided_img_per_s']:.1f} img/s ({timing['slowdown']:.1f}x slower)"]
    stages = summary.get("stage_seconds")
    if stages:
        total = summary.get("seconds") or sum(stages.values())
        lines += ["", f"compute this invocation: {total:.1f} s; by stage (s): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in stages.items())]
    return "\n".join(lines)


def format_efficiency(efficiency: dict | None, guidance: dict) -> list[str]:
    """The data-efficiency curve: Few accuracy (mean ± std over seeds) per condition and images per class, and
    the paired Few difference to unguided per size."""
    from ..conditions import condition_label

    if not efficiency or not efficiency.get("table"):
        return []
    sizes = [str(n) for n in efficiency["sizes"]]
    lines = ["", f"data efficiency: few after one round of n synthetic images per class, {efficiency['epochs']} "
             "fine-tuning epochs", f"{'condition':<26}" + "".join(f"{'n = ' + n:>16}" for n in sizes)]
    for cond, row in efficiency["table"].items():
        lines.append(f"{condition_label(cond, guidance.get(cond)):<26}"
                     + "".join(mean_std_cell(row[n]["few"], 16) for n in sizes))
    for cond in efficiency["table"]:
        diffs = [efficiency.get("paired", {}).get(n, {}).get(cond, {}).get("few", {}) for n in sizes]
        if any(d.get("mean") is not None for d in diffs):
            label = f"  {cond} - unguided (paired)"
            lines.append(f"{label:<26}" + "".join(f"{d['mean']:>+16.3f}" if d.get("mean") is not None else f"{'-':>16}"
                                   for d in diffs))
    return lines


def format_paired(paired: dict | None, guidance: dict) -> list[str]:
    """Per-seed differences to the baseline condition: mean [95% CI] (wins/losses over seeds)."""
    from ..conditions import condition_label

    if not paired or not paired.get("table"):
        return []
    keys = ("few", "medium", "top1")

    def cell(d: dict) -> str:
        if d.get("mean") is None:
            return f"{'-':>30}"
        ci = f" [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]" if d.get("ci") else ""
        text = f"{d['mean']:+.3f}{ci} ({d['wins']}/{d['losses']})"
        return f"{text:>30}"

    lines = ["", f"paired difference to {paired['baseline']} (mean [95% CI] (wins/losses) over seeds)",
             f"{'condition':<26}" + "".join(f"{k:>30}" for k in ("few", "medium", "top-1"))]
    for cond, row in paired["table"].items():
        lines.append(f"{condition_label(cond, guidance.get(cond)):<26}" + "".join(cell(row[k]) for k in keys))
    return lines


# --- the job ------------------------------------------------------------------------------------------------


def _accelerator(cfg: MineConfig):
    from accelerate import Accelerator, DataLoaderConfiguration

    # split_batches: each global batch is divided over the processes, so the optimisation is the same as on one
    # device up to floating-point order (BatchNorm statistics aside, which are per process)
    cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    return Accelerator(cpu=cpu, dataloader_config=DataLoaderConfiguration(split_batches=True),
                       **tracking.accelerator_kwargs(cfg.track, cfg.out))


def _load_generator(cfg: MineConfig, device: torch.device, log: Log):
    if cfg.generator.kind == "embedded":
        from ..models.tiny import TinyGeneratorConfig, generator_dir, train_generator

        root = generator_dir(cfg.generator.model)
        if not (root / "longtail_generator.json").is_file():
            log(f"no generator at {root}: training one on full Fashion-MNIST (about an hour on 2 cores)")
            train_generator(root, TinyGeneratorConfig(), data_dir=cfg.data.data_dir, log=log)
    ldm, guide, known = load_generator(cfg.generator, device)
    return ldm, guide, known


# Sections whose change invalidates what a run directory already holds; seeds, conditions and the switchable
# stages (trajectory, distances, report) may change between calls (a run grows).
RUN_DEFINING = ("data", "classifier", "base", "heads", "generator", "guidance", "sweep", "schedule", "finetune",
                "judge", "introspection")


def _judge_as_trained(judge: dict) -> dict:
    """``judge.spec: shipped`` as the ``train`` spec it equals bit for bit (scripts/ship_detectors.py)."""
    return {**judge, "spec": "train", "epochs": 3} if judge.get("spec") == "shipped" else judge


def differs(old: object, new: object) -> bool:
    """Whether a setting of a finished run (``old``, from its config.yaml) differs from ``new``
    (``differing_keys`` is not empty)."""
    return bool(differing_keys(old, new))


def differing_keys(old: object, new: object, prefix: str = "") -> list[str]:
    """The dotted keys (``heads.epsilon``) at which a finished run's setting ``old`` differs from ``new``
    (``common.changed_keys``: keys the run's config lacks do not count), where an embedded generator
    ``model: null`` is the shipped ``clean`` one and ``judge.spec: shipped`` is ``train`` with 3 epochs (the
    shipped judges are those weights)."""
    return changed_keys(old, new, prefix, normalise=_same_spelling)


def _same_spelling(old: dict, new: dict) -> tuple[dict, dict]:
    """One spelling for settings that mean the same (see ``differing_keys``)."""
    if "spec" in old and "min_ratio" in old:  # a judge: the shipped one is what `train` (3 epochs) makes
        old, new = _judge_as_trained(old), _judge_as_trained(new)
    if old.get("kind") == "embedded" and "model" in old:
        old, new = {**old, "model": old["model"] or "clean"}, {**new, "model": new.get("model") or "clean"}
    return old, new


def _lookup(settings: dict, dotted: str) -> object:
    for part in dotted.split("."):
        settings = settings.get(part, "(absent)") if isinstance(settings, dict) else "(absent)"
    return settings


def check_same_run(cfg: MineConfig) -> None:
    """Refuse to resume a run directory that was made with other settings (finished stages would be reused
    under the new label); names each key that differs, the run's value -> the new one."""
    import yaml

    previous = Path(cfg.out) / "config.yaml"
    if not previous.is_file():
        return
    old, new = yaml.safe_load(previous.read_text()) or {}, to_dict(cfg)
    changed = [k for key in RUN_DEFINING if key in old for k in differing_keys(old[key], new[key], key)]
    if changed:
        shown = "; ".join(f"{k}: {_lookup(old, k)!r} -> {_lookup(new, k)!r}" for k in changed[:6])
        more = f"; and {len(changed) - 6} more" if len(changed) > 6 else ""
        raise ConfigError(f"{cfg.out} holds a run made with other settings ({shown}{more}; the run's are in "
                          f"{previous}); use another out, or the same settings to resume (seeds and conditions "
                          "may be added)")


def _set_up(cfg: MineConfig, show: bool, log: Log):
    """Checks, the data source, the plan and the generator: what every entry point needs first."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    conditions = check_config(cfg)
    cfg = replace(cfg, generator=with_sampling_defaults(cfg.generator))
    check_paths(cfg)
    acc = _accelerator(cfg)
    spec_loaded = load_classifier_spec(replace(cfg.classifier, heads=None) if cfg.base.epochs else cfg.classifier,
                                       acc.device)
    source, skipped = make_source(cfg, spec_loaded)
    try:
        check_class_folders(source.class_names)  # synthetic images are stored one folder per class name
    except ValueError as err:
        raise ConfigError(str(err)) from None
    plan = make_plan(cfg, source, skipped)
    log(plan.format())
    ctx = Context(cfg, Path(cfg.out), source, acc, log, show)
    ctx.ldm, ctx.guide_decode, known = _load_generator(cfg, acc.device, log)
    check_generator_classes(cfg.generator, known, source.class_names)
    if cfg.base.epochs == 0 and not spec_loaded.checkpoint and not cfg.classifier.spec.endswith(".json"):
        log("warning: classifier.checkpoint is not set and base.epochs is 0, so the classifier keeps the weights "
            f"{cfg.classifier.spec} builds (random unless it loads its own); set base.epochs to train one")
    return cfg, conditions, ctx, spec_loaded, plan


def run_introspect(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = (), show: bool = True,
                   log: Log = print) -> dict[str, list[str]]:
    """Longtail Introspection on a finished (or at least base-trained) run: its config, its first seed's
    classifier, its calibrated weight. ``overrides`` (``introspection.*``) set the captioner, embedder, LLM.
    Returns the refined prompts per class (also in ``<run>/introspection/prompts.json``)."""
    from ..config import load_config

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{run} is not a run directory: config.yaml is missing")
    cfg = load_config(MineConfig, run / "config.yaml", [*overrides, f"out={run}"])
    check_captioner(cfg.introspection)
    cfg, _, ctx, _, _ = _set_up(cfg, show, log)
    seed = cfg.seeds[0]
    if not (base_dir_of(run, seed) / "classifier.json").is_file():
        raise ConfigError(f"{run}: the base stage has not run (seed_{seed}/base/classifier.json is missing); run "
                          "`longtail mine` on this config first")
    weight = weight_of(cfg, read_json(run / "sweep" / "sweep.json"))
    guidance = replace(cfg.guidance, weight=weight(cfg.guidance.signal))
    return stage_introspection(ctx, load_base(ctx, seed), guidance)


def describe_run(cfg: MineConfig, conditions: list[Condition]) -> str:
    """What a run will do, for ``--dry-run``: where it writes, its seeds, conditions, generator and stages."""
    gs = cfg.generator
    stages = [name for name, on in (
        ("base classifier (trained)" if cfg.base.epochs else "base classifier (as given)", True),
        (f"generator check ({cfg.generator_check.per_class} images per class)", cfg.generator_check.per_class > 0),
        (f"Epistemic Head ({cfg.heads.epochs} epochs)", cfg.heads.epochs > 0),
        (f"sweep {list(cfg.sweep.signals)}", bool(cfg.sweep.signals)), (f"judge ({cfg.judge.spec})", bool(cfg.judge.spec)),
        ("introspection", cfg.introspection.enabled or any(c.kind == "introspect" for c in conditions)),
        ("mining", True), (f"efficiency curve {sorted(cfg.efficiency.sizes)}", bool(cfg.efficiency.sizes)),
        ("trajectory", cfg.trajectory), ("distances", cfg.distances), ("report", cfg.report))
        if on]
    return (f"run directory: {Path(cfg.out).resolve()}\nseeds: {list(cfg.seeds)}; conditions: "
            f"{[c.text for c in conditions]}\ngenerator: {gs.kind} {gs.model or '(shipped)'}, {gs.num_steps} steps, "
            f"CFG {gs.cfg_scale}, batch {gs.batch_size}\nstages: {', '.join(stages)}")


def run_mine(cfg: MineConfig, dry_run: bool = False, show: bool = True, log: Log = print) -> dict:
    """Validate, plan and (unless ``dry_run``) run or resume every stage. Returns the summary (also written to
    ``<out>/metrics.json``), or with ``dry_run`` the plan and a generation-time estimate."""
    check_same_run(replace(cfg, generator=with_sampling_defaults(cfg.generator)))
    cfg, conditions, ctx, spec_loaded, plan = _set_up(cfg, show, log)
    run, source, skipped = ctx.run, ctx.source, plan.skipped
    if dry_run:
        log(describe_run(cfg, conditions))
        return {"plan": plan.__dict__, "estimate": estimate(ctx, spec_loaded, plan)}
    started = time.perf_counter()
    clock = StageClock()
    if ctx.is_main:
        run.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run / "config.yaml")
        write_json(run / "plan.json", plan.__dict__)
        write_json(run / "class_names.json", source.class_names)
        if skipped:
            write_json(run / "skipped_images.json", skipped)
    tracker = tracking.start(cfg, ctx.acc)
    log(f"real training data: {source.describe()}")
    base, models, generator_check = {}, {}, None
    for seed in cfg.seeds:
        with clock("base"):
            models[seed], base[seed] = stage_base(ctx, seed)
        if seed == cfg.seeds[0] and cfg.generator_check.per_class > 0:  # before any other long work
            with clock("generator check"):
                generator_check = stage_generator_check(ctx, models[seed], base[seed])
    with clock("base"):
        ctx.hard = hard_split(ctx)
    if ctx.hard is not None:
        log(f"hard split: {int(ctx.hard.sum())} evaluation images that most base classifiers get wrong")
    first = models[cfg.seeds[0]]
    with clock("judge"):
        uses_judge = cfg.sweep.signals or any(c.judge_filter for c in conditions)
        ctx.judge = (ctx.judge or stage_judge(ctx)) if uses_judge else None  # the generator check may have it
    with clock("sweep"):
        sweep = stage_sweep(ctx, first, ctx.judge)
    tracker.sweep(sweep, run / "sweep")
    weight = weight_of(cfg, sweep)
    for signal, choice in ((sweep or {}).get("choices") or {}).items():
        if cfg.sweep.choose and choice.get("weight") is None:  # the rule passed no weight: say what is used
            ctx.log(f"weight for {signal}: the rule passed none, so mining uses the smallest swept weight, "
                    f"{weight(signal):g}")
    guidance_of = {c.text: {"signal": g.signal, "weight": g.weight} for c in conditions
                   if (g := c.guidance(cfg.guidance, weight)) is not None}
    main_guidance = replace(cfg.guidance, weight=weight(cfg.guidance.signal))
    prompts = None
    if cfg.introspection.enabled or any(c.kind == "introspect" for c in conditions):
        log("longtail introspection (keywords of guided vs unguided captions):")
        with clock("introspection"):
            prompts = stage_introspection(ctx, first, main_guidance)
    def guidance_for(cond: Condition):
        return active(g) if (g := cond.guidance(cfg.guidance, weight)) is not None else None

    mining: dict[int, dict[str, list[dict]]] = {}
    for seed in cfg.seeds:
        mining[seed] = {}
        for cond in conditions:
            with clock(f"mining {cond.text}"):
                mining[seed][cond.text] = stage_mining(ctx, seed, cond, guidance_for(cond), plan, prompts)
            tracker.rounds(seed, cond.text, mining[seed][cond.text])
    summary = summarize(ctx, base, mining, conditions, guidance_of, sweep)
    summary["generator_check"] = generator_check
    if cfg.efficiency.sizes:
        log(f"data-efficiency curve: {sorted(cfg.efficiency.sizes)} images per class")
        with clock("efficiency"):
            summary["efficiency"] = stage_efficiency(ctx, conditions, guidance_for, plan, prompts)
    if cfg.trajectory:
        with clock("trajectory"):
            summary["trajectory"] = stage_trajectory(ctx, first, main_guidance)
    if cfg.data.nuisance and any(c.synthetic for c in conditions):
        with clock("modes"):
            modes = stage_modes(ctx, conditions)
        summary["mode_shares"], summary["mode_detector"] = modes["conditions"], modes.get("detector")
    if cfg.distances and any(c.synthetic for c in conditions):
        with clock("distances"):
            summary["distribution"] = stage_distances(ctx, conditions)["summary"] or None
    summary["stage_seconds"] = clock.seconds
    summary["settings_sha256"] = settings_hash({k: to_dict(cfg).get(k) for k in RUN_DEFINING})
    summary["seconds"] = time.perf_counter() - started
    table = format_summary(summary)
    if ctx.is_main:
        write_json(run / "metrics.json", summary)
        (run / "summary.txt").write_text(table + "\n")
    tracker.finish(summary)
    log(table)
    if cfg.report and ctx.is_main:
        from ..report import write_report

        log(f"report: {write_report(run)}")
    return read_json(run / "metrics.json") if ctx.is_main else summary


def estimate(ctx: Context, loaded: LoadedClassifier, plan: Plan) -> dict:
    """Time a short guided warm-up (one batch of up to 8 images, 2 steps) and scale it to the plan's steps,
    images, conditions and seeds. Batches larger than 8 are usually faster per image, so it errs high."""
    from ..generate import generate, plan_jobs
    from ..prompts import job_prompts, prompt_table
    from ..signals import get_signal

    gs = ctx.cfg.generator
    guidance = active(ctx.cfg.guidance)
    if guidance is not None and get_signal(guidance.signal).needs_heads and not isinstance(
            loaded.model, EpistemicClassifier):
        if ctx.cfg.heads.epochs <= 0:
            check_guidance(guidance, loaded)
        guidance = None  # the run trains the heads first; time the warm-up without them
    n = max(1, min(gs.batch_size, 8))
    table = prompt_table(ctx.source.class_names, gs.prompt_template, gs.prompt_file)
    jobs = plan_jobs([n] + [0] * (len(table) - 1), job_prompts(table))
    classifier = bridged_classifier(loaded)
    kw = dict(classifier=classifier, guidance=guidance, cfg_scale=gs.cfg_scale, show=False)
    generate(ctx.ldm, jobs[:1], num_steps=1, batch_size=1, **kw)  # first-call overheads
    started = time.perf_counter()
    generate(ctx.ldm, jobs, num_steps=2, batch_size=n, guide_decode=ctx.guide_decode, **kw)
    per_image = (time.perf_counter() - started) / len(jobs) * gs.num_steps / 2
    total = sum(sum(r["counts"]) for r in plan.rounds)
    runs = len(ctx.cfg.seeds) * sum((c.factor or 1) for c in parse_conditions(ctx.cfg.conditions) if c.synthetic)
    hours = per_image * total * runs / 3600
    ctx.log(f"estimated generation time: {per_image:.2f} s/image, {hours:.2f} h for all rounds, conditions and "
            f"seeds (from a warm-up of {len(jobs)} images x 2 steps, scaled to {gs.num_steps} steps)")
    return {"seconds_per_image": per_image, "total_hours": hours, "warmup_images": len(jobs), "warmup_steps": 2,
            "images": total}

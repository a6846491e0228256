"""The ``longtail`` command line. Each subcommand is a thin layer over a library call."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Longtail Guidance: mine a classifier's longtail.")
heads_app = typer.Typer(no_args_is_help=True, help="Epistemic Head utilities.")
app.add_typer(heads_app, name="heads")


@heads_app.command("overhead")
def heads_overhead(
    arch: str = typer.Option("vit_b_16", help="torchvision name (vit_b_16, resnet50 ...) or timm:<name>"),
    num_classes: int = typer.Option(1000, help="number of classes C"),
    heads: int = typer.Option(5, help="number of heads K"),
    head_name: str | None = typer.Option(None, help="module path of the head, if it is not found automatically"),
) -> None:
    """Parameters an Epistemic Head adds to an architecture (random weights, nothing downloaded)."""
    from .heads import build_architecture, parameter_overhead

    stats = parameter_overhead(build_architecture(arch, num_classes), heads, head_name)
    typer.echo(f"architecture {arch}: C={stats['num_classes']} classes, d_model={stats['d_model']}, K={heads} heads")
    typer.echo(f"base parameters:  {stats['base_params']:,}")
    extra = stats["added_with_bias"] - stats["added_params"]
    typer.echo(f"added parameters: {stats['added_params']:,} (K x d x C) + {extra:,} biases")
    typer.echo(f"overhead: {stats['percent']:.2f}%")


@app.command()
def demo(
    config: Path | None = typer.Option(None, help="YAML config (see configs/demo.yaml); flags override it"),
    quick: bool = typer.Option(False, "--quick", help="a few-minute run: one seed, smaller sizes"),
    out: str | None = typer.Option(None, help="run directory (default runs/demo, or runs/demo-quick with --quick)"),
    seeds: str | None = typer.Option(None, help="comma-separated seeds, e.g. 0,1,2"),
    set_: list[str] = typer.Option([], "--set", help="override any config key: --set mining.rounds=3"),
    progress: bool = typer.Option(True, help="progress bars"),
) -> None:
    """The embedded default end to end: train, detect, sweep the weight, mine, summarise (resumable)."""
    from .config import load_config
    from .demo import DemoConfig, quick_overrides, run_demo

    overrides = list(set_)
    if seeds:
        overrides.append(f"seeds=[{seeds}]")
    if out:
        overrides.append(f"out={out}")
    elif quick:
        overrides.append("out=runs/demo-quick")
    cfg = load_config(DemoConfig, config, overrides, base=quick_overrides() if quick else None)
    run_demo(cfg, show=progress)


@app.command()
def introspect(
    config: Path | None = typer.Option(None, help="YAML config of the demo (the same run directory is reused)"),
    out: str = typer.Option("runs/introspect", help="run directory"),
    seeds: str | None = typer.Option(None, help="comma-separated seeds, e.g. 0,1,2"),
    llm_url: str | None = typer.Option(None, help="OpenAI-compatible chat endpoint for refined prompts "
                                       "(key from $OPENAI_API_KEY); default: the offline template"),
    llm_model: str = typer.Option("default", help="model name at that endpoint"),
    set_: list[str] = typer.Option([], "--set", help="override any config key: --set introspection.pairs=20"),
    progress: bool = typer.Option(True, help="progress bars"),
) -> None:
    """Longtail Introspection on the embedded default: keywords, refined prompts, and the Table 4 comparison
    (no synthetic data / prompt-tuned GIF data / introspection-prompt data)."""
    from .config import load_config
    from .demo import DemoConfig, run_demo

    overrides = [f"out={out}", "mining.conditions=[none, gif, introspect]", *set_]
    if seeds:
        overrides.append(f"seeds=[{seeds}]")
    if llm_url:
        overrides += [f"introspection.llm_url={llm_url}", f"introspection.llm_model={llm_model}"]
    run_demo(load_config(DemoConfig, config, overrides), show=progress)


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="a run directory (demo, introspect, mine)"),
    out: Path | None = typer.Option(None, help="output HTML (default RUN_DIR/report.html)"),
) -> None:
    """One self-contained HTML page with the run's images, plots and tables."""
    from .report import write_report

    typer.echo(write_report(run_dir, out))


@app.command("train-generator")
def train_generator_cmd(
    out: Path = typer.Option(..., help="output directory (diffusers layout + longtail_generator.json)"),
    config: Path | None = typer.Option(None, help="YAML with TinyGeneratorConfig keys"),
    set_: list[str] = typer.Option([], "--set", help="override a key: --set unet_steps=2000"),
    data_dir: Path | None = typer.Option(None, help="Fashion-MNIST directory (default: the Debian package's)"),
    progress: bool = typer.Option(True, help="progress bars"),
) -> None:
    """Train the embedded text-conditioned latent diffusion model on full Fashion-MNIST."""
    from .config import load_config
    from .models.tiny import TinyGeneratorConfig, train_generator

    cfg = load_config(TinyGeneratorConfig, config, set_)
    train_generator(out, cfg, data_dir=data_dir, show=progress)


def main() -> None:
    app()
